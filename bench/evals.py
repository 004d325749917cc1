"""The eval runner's own cost: a 1,000-case suite against the simulated provider at concurrency 32.

    .venv/bin/python bench/evals.py [--cases 1000] [--concurrency 32] [--rounds 5]

Two ways of making the same 1,000 calls, on one Keel, in the same run, alternating round by round:

- baseline: `keel.handle` on each case's request, bounded by a semaphore (what any script would do);
- runner: `EvalRunner.run` with two cheap metrics (exact match, regex) and the results stored case by
  case in a SQLite request log (a fresh database each round, so no answer is reused).

The runner's overhead per case is (runner wall time - baseline wall time) / cases: building the
request, hashing the case, scoring, storing a row, the progress callback. Also printed: cases/s, and
the CPU time per case of each (process time; the store's writes run in threads and count too).
Target (the issue's): overhead <= 2 ms per case. Medians over the rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import orjson
import yaml

from keel.config import parse_config
from keel.engine import Keel
from keel.evals.results import EvalStore
from keel.evals.runner import EvalRunner
from keel.evals.suite import build_metrics, load_suite
from keel.observability.store import RecordStore
from keel.pipeline import Context
from keel.request_errors import parse_request
from keel.types import ChatRequest


def write_suite(root: Path, cases: int) -> Path:
    rows = [{"id": f"c{i:05d}", "input": f"question {i}", "reference": f"echo: question {i}"} for i in range(cases)]
    (root / "cases.jsonl").write_bytes(b"\n".join(orjson.dumps(r) for r in rows))
    path = root / "bench.yaml"
    path.write_text(yaml.safe_dump({"name": "bench", "dataset": "cases.jsonl", "target": {"model": "sim"},
                                    "params": {"temperature": 0, "max_tokens": 16},
                                    "metrics": [{"type": "exact_match"}, {"type": "regex", "pattern": "^echo"}]}))
    return path


async def baseline(keel: Keel, texts: list[str], concurrency: int) -> None:
    bound = asyncio.Semaphore(concurrency)

    async def one(text: str) -> None:
        async with bound:
            request = parse_request(ChatRequest, {"model": "sim", "temperature": 0, "max_tokens": 16,
                                                  "messages": [{"role": "user", "content": text}]}, strict=False)
            await keel.handle(request, Context(feature="bench"))

    await asyncio.gather(*(one(text) for text in texts))


async def main(cases: int, concurrency: int, rounds: int) -> None:
    root = Path(tempfile.mkdtemp(prefix="keel-bench-evals-"))
    suite = load_suite(write_suite(root, cases))
    dataset = suite.load_dataset()
    texts = [str(case.messages[0]["content"]) for case in dataset.cases]
    config = parse_config({"models": [{"name": "sim", "deployments": [{"provider": "simulated"}]}],
                           "store": {"url": f"sqlite:///{root}/calls.db", "spool_path": str(root / "spool.jsonl")}})
    walls: dict[str, list[float]] = {"baseline": [], "runner": []}
    cpus: dict[str, list[float]] = {"baseline": [], "runner": []}
    async with Keel(config) as keel:
        await baseline(keel, texts[:50], concurrency)  # warm up
        for r in range(rounds):
            for kind in ("baseline", "runner"):
                wall, cpu = time.perf_counter(), time.process_time()
                if kind == "baseline":
                    await baseline(keel, texts, concurrency)
                else:
                    store = RecordStore(f"sqlite:///{root}/results-{r}.db")
                    store.migrate()
                    outcome = await EvalRunner(keel, suite, build_metrics(suite), EvalStore(store)).run(
                        concurrency=concurrency, dataset=dataset, on_case=lambda *_: None)
                    store.close()
                    assert outcome.errors == 0 and outcome.metrics[0].mean == 1.0
                walls[kind].append(time.perf_counter() - wall)
                cpus[kind].append(time.process_time() - cpu)
    base, run = statistics.median(walls["baseline"]), statistics.median(walls["runner"])
    print(f"{cases} cases, concurrency {concurrency}, {rounds} rounds (medians):")
    print(f"  baseline (keel.handle): {base * 1000:8.1f} ms  {cases / base:8.0f} cases/s  "
          f"{statistics.median(cpus['baseline']) / cases * 1000:.3f} ms CPU/case")
    print(f"  eval runner:            {run * 1000:8.1f} ms  {cases / run:8.0f} cases/s  "
          f"{statistics.median(cpus['runner']) / cases * 1000:.3f} ms CPU/case")
    overheads = [(r - b) / cases * 1000 for r, b in zip(walls["runner"], walls["baseline"], strict=True)]
    print(f"  runner overhead: {statistics.median(overheads):.3f} ms/case (median; max {max(overheads):.3f}); "
          "target <= 2 ms")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    asyncio.run(main(args.cases, args.concurrency, args.rounds))
