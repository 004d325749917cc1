"""How long the event loop waits for the GIL while the request log's writer thread is busy.

    .venv/bin/python bench/gil_handoff.py [--rate 2000] [--seconds 3] [--rounds 3]

One process, as in the gateway: a uvloop event loop and the real `RecordWriter` (SQLite in a
temporary directory, the default settings, built-in redaction on). The loop submits records at
`--rate` per second, as the observe stage does, and meanwhile sleeps 1 ms at a time, noting how
late it wakes: waking means taking the GIL back, and while the writer runs Python the loop
waits for the switch interval before the writer must let go. Rounds alternate the switch
intervals compared (CPython's default 5 ms, and what `keel serve` sets), and an idle writer as
the machine's own noise; the figures are medians over rounds of each round's mean, p90, p99 and max.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from log_store import records

from keel.config import StoreConfig
from keel.observability.store import RecordStore
from keel.observability.writer import RecordWriter
from keel.server.runtime import SWITCH_INTERVAL_S, freeze_heap

NAP_S = 0.001  # uvloop's timers count whole milliseconds


async def lateness(writer: RecordWriter | None, rate: float, seconds: float, run: str) -> list[float]:
    """Milliseconds each 1 ms nap overran, while records are submitted at `rate`/s (none: idle)."""
    batch = records(int(rate * seconds), run)
    freeze_heap()  # as `keel serve` does: full collections would hide the GIL's share
    late: list[float] = []
    clock = time.perf_counter
    started = clock()
    sent = 0
    while (now := clock()) - started < seconds:
        due = min(len(batch), int((now - started) * rate))
        if writer is not None:
            for record in batch[sent:due]:
                writer.submit(record)
        sent = due
        before = clock()
        await asyncio.sleep(NAP_S)
        late.append((clock() - before - NAP_S) * 1000)
    return late


def summary(values: list[float]) -> tuple[float, float, float, float]:
    ordered = sorted(values)
    return statistics.fmean(values), ordered[int(len(ordered) * 0.9)], ordered[int(len(ordered) * 0.99)], ordered[-1]


async def run(args: argparse.Namespace) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="keel-gil-"))
    config = StoreConfig(url=f"sqlite:///{tmp}/keel.db", spool_path=str(tmp / "spool.jsonl"))
    writer = RecordWriter(RecordStore(config.url), config)
    writer.start()
    writer.flush()
    cases: dict[str, tuple[float, bool]] = {
        "idle writer, 5 ms": (0.005, False),
        "busy writer, 5 ms (CPython default)": (0.005, True),
        f"busy writer, {SWITCH_INTERVAL_S * 1000:g} ms (keel serve)": (SWITCH_INTERVAL_S, True),
    }
    found: dict[str, list[tuple[float, float, float, float]]] = {name: [] for name in cases}
    try:
        for i in range(args.rounds):
            for name, (interval, busy) in cases.items():
                sys.setswitchinterval(interval)
                late = await lateness(writer if busy else None, args.rate, args.seconds, f"{i}{name}")
                found[name].append(summary(late))
                await asyncio.to_thread(writer.flush, 60)
    finally:
        writer.close()
    print(f"event loop lateness (ms) with the writer fed {args.rate:g} records/s; median of {args.rounds} rounds")
    print(f"{'case':<40} {'mean':>7} {'p90':>7} {'p99':>7} {'max':>7}")
    for name, rounds in found.items():
        mean, p90, p99, worst = (statistics.median(r[k] for r in rounds) for k in range(4))
        print(f"{name:<40} {mean:>7.2f} {p90:>7.2f} {p99:>7.2f} {worst:>7.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=2000, help="records submitted per second")
    parser.add_argument("--seconds", type=float, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    import uvloop

    uvloop.install()
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
