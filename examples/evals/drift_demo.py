"""The drift demo: a simulated model is silently updated, and the drift monitor notices.

    python examples/evals/drift_demo.py             # the update: longer, slower, flakier, a new model name
    python examples/evals/drift_demo.py --unshifted # the same model both weeks: nothing fires

Two phases of traffic go through Keel's pipeline to the `simulated` provider (seeded): a baseline, and a
window in which the provider's knobs have moved (answer template, latency, error rate, upstream model name).
Canary prompts (keel.evals.canaries) run in both. The records are written to a temporary request log as if
the baseline were last week and the window the last hour, then `keel drift` reads that log: the table,
the alerts (one per onset, through the budget alerts' channel: here the log), and the command to run
yourself against the same log. Offline, in a few seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from keel.config import AlertsConfig, CanariesConfig, parse_config
from keel.engine import Keel
from keel.evals.canaries import CanarySchedule
from keel.evals.drift import (
    DriftAlertSender,
    DriftReport,
    OnsetTracker,
    build_drift,
    render_table,
    send_onsets,
    windows,
)
from keel.observability.store import RecordStore

HOUR, DAY = 3600.0, 86_400.0
WORDS = "river stone cloud lamp orbit maple signal harbour copper violet meadow lantern".split()
CANARIES = ["What is the capital of France? One word.", "Spell 'keel' backwards.", "2 + 2 = ?"]

BEFORE: dict[str, Any] = {
    "model": "sim-2024-06", "template": "echo: {last_user_message}", "error_rate": 0.01,
    # Latencies of hundreds of ms: a busy machine's few ms of scheduling noise must not look like drift.
    "latency_ms": {"kind": "lognormal", "mean_ms": 200, "stddev_ms": 40},
}
AFTER: dict[str, Any] = {  # the silent update: a new name, wordier, slower, flakier
    "model": "sim-2024-11", "error_rate": 0.08,
    "template": "Certainly! Here is a thorough answer. You asked: {last_user_message}. In short: "
                "{last_user_message}. I hope this helps, and let me know if you need more.",
    "latency_ms": {"kind": "lognormal", "mean_ms": 450, "stddev_ms": 80},
}


def config(url: str, knobs: dict[str, Any], seed: int) -> Any:
    deployment = {"provider": "simulated", "name": "sim", "seed": seed, "price": {"input": 1, "output": 4}, **knobs}
    return parse_config({
        "models": [{"name": "assistant", "retry": {"max_attempts": 1}, "deployments": [deployment]}],
        "store": {"url": url, "flush_interval_ms": 20},
    }, warn_unset_keys=False)


async def phase(url: str, knobs: dict[str, Any], seed: int, calls: int) -> None:
    """`calls` chat calls (50 at a time) and three rounds of canaries, logged to `url`."""
    rng = random.Random(seed)
    questions = [" ".join(rng.choices(WORDS, k=rng.randint(2, 12))) for _ in range(calls)]
    async with Keel(config(url, knobs, seed)) as keel:
        async def ask(question: str, feature: str | None = None) -> None:
            try:
                await keel.chat(model="assistant", messages=[{"role": "user", "content": question}],
                                metadata={"feature": feature} if feature else None)
            except Exception:  # a simulated failure: it is in the log, which is the point
                pass

        # Warm-up calls (a feature of Keel's own: not live traffic), so a cold start is not measured as drift.
        await asyncio.gather(*(ask(q, "keel.warmup") for q in questions[:10]))
        for start in range(0, calls, 50):
            await asyncio.gather(*(ask(q) for q in questions[start:start + 50]))
        canaries = CanarySchedule(keel.handle, CanariesConfig(prompts=CANARIES, models=["assistant"]))
        for _ in range(3):
            await canaries.run_once()


def place(source: str, target: RecordStore, start: float, end: float) -> int:
    """Copy a phase's records into `target`, spread evenly over [start, end) (the demo's time travel)."""
    store = RecordStore(source)
    try:
        rows = store.records(0)
    finally:
        store.close()
    step = (end - start) / max(1, len(rows))
    for i, row in enumerate(rows):
        duration = row["ended_at"] - row["started_at"]
        row["started_at"] = start + i * step
        row["ended_at"] = row["started_at"] + duration
    target.write(rows)
    return len(rows)


async def run_demo(directory: Path, *, shifted: bool = True, calls: int = 200, seed: int = 7) -> DriftReport:
    """Write the two phases into `directory`/keel.db (with a keel.yaml naming it), and return the drift
    report of the last hour against the week before."""
    url = f"sqlite:///{directory / 'keel.db'}"
    await phase(f"sqlite:///{directory / 'baseline.db'}", BEFORE, seed, calls)
    await phase(f"sqlite:///{directory / 'window.db'}", AFTER if shifted else BEFORE, seed + 1, calls)
    now = time.time()
    log = RecordStore(url)
    try:
        log.migrate()
        place(f"sqlite:///{directory / 'baseline.db'}", log, now - 6 * DAY, now - 2 * DAY)
        place(f"sqlite:///{directory / 'window.db'}", log, now - 50 * 60, now - 60)
        window, baseline = windows(HOUR, 7 * DAY, now)
        report = build_drift(log, window=window, baseline=baseline, label="last 1h against the 7d before")
    finally:
        log.close()
    (directory / "keel.yaml").write_text(
        "models: [{name: assistant, deployments: [{provider: simulated}]}]\n"
        f"store: {{url: '{url}'}}\n"
    )
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--unshifted", action="store_true", help="the same model in both phases")
    parser.add_argument("--calls", type=int, default=200, help="chat calls in each phase")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("keel.evals.canaries").setLevel(logging.ERROR)  # canary failures are in the table
    directory = Path(tempfile.mkdtemp(prefix="keel-drift-demo-"))
    report = asyncio.run(run_demo(directory, shifted=not args.unshifted, calls=args.calls))
    console = Console()
    console.print(render_table(report))
    onsets = OnsetTracker().onsets(report)
    asyncio.run(send_onsets(DriftAlertSender(AlertsConfig()), onsets))  # no webhook: the alerts are logged
    console.print(f"\n{len(onsets)} drift alert(s) sent. The same table from the CLI:\n"
                  f"  keel drift --config {directory / 'keel.yaml'} --since 1h --baseline 7d --check")
    return 1 if report.drifted else 0


if __name__ == "__main__":
    sys.exit(main())
