"""What the exact cache costs a streamed call: a streamed miss (the leader of a coalescing flight no
call joins) and a streamed hit (a replay), against the cache off.

    .venv/bin/python bench/cache_streams.py [--rounds 5] [--requests 300] [--words 200]

In process, no HTTP: a `Keel` over the simulated provider (no added latency) answering with `--words`
words, streamed as one chunk per word, each call read to its end. Targets, in interleaved rounds:
- `off`: the exact cache off (baseline);
- `miss`: the cache on, every request new (the leader path: the leader's client reads upstream itself,
  a bytes snapshot of each chunk is kept for calls that may join, the store at the end);
- `hit`: the cache on, requests answered from it (replayed as a stream).
Per request: wall time from `keel.chat(stream=True)` to the last chunk read, and CPU time of the
process over the run divided by the requests. The figure is the median over rounds of each round's
p50 / p99; "added" is against `off` in the same round set. A figure, not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from keel.config import parse_config
from keel.engine import Keel

console = Console()


def keel(tmp: Path, name: str, cache: bool, words: int) -> Keel:
    template = " ".join(["word"] * words)
    return Keel(parse_config({
        "models": [{"name": "m", "deployments": [{"provider": "simulated", "template": template}]}],
        "cache": {"exact": {"enabled": cache}},
        "store": {"url": f"sqlite:///{tmp}/{name}.db", "spool_path": str(tmp / f"{name}.jsonl")},
    }))


async def one(k: Keel, text: str) -> float:
    started = time.perf_counter()
    stream = await k.chat(model="m", stream=True, temperature=0, messages=[{"role": "user", "content": text}])
    async for _ in stream:
        pass
    return (time.perf_counter() - started) * 1000


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def run(args: argparse.Namespace) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="keel-bench-streams-"))
    targets = {"off": keel(tmp, "off", False, args.words), "miss": keel(tmp, "miss", True, args.words),
               "hit": keel(tmp, "hit", True, args.words)}
    for k in targets.values():
        await k.start()
    await one(targets["hit"], "the cached one")  # stored: every `hit` request asks it
    counter = iter(range(10**9))
    rows: dict[str, dict[str, list[float]]] = {name: {"p50": [], "p99": [], "cpu": []} for name in targets}
    for name, k in targets.items():  # warm every path
        for _ in range(50):
            await one(k, "the cached one" if name == "hit" else f"warm {next(counter)}")
    names = list(targets)
    for r in range(args.rounds):
        for name in names[r % 3:] + names[:r % 3]:
            k = targets[name]
            cpu = time.process_time()
            latencies = [await one(k, "the cached one" if name == "hit" else f"question {next(counter)}")
                         for _ in range(args.requests)]
            rows[name]["cpu"].append((time.process_time() - cpu) / args.requests * 1000)
            rows[name]["p50"].append(pct(latencies, 0.5))
            rows[name]["p99"].append(pct(latencies, 0.99))
    for k in targets.values():
        await k.close()
    table = Table(title=f"Streamed call of {args.words} chunks, in process, ms (median of {args.rounds} rounds)")
    for header in ("target", "p50", "p99", "CPU/call", "added p50", "added CPU/call"):
        table.add_column(header, justify="left" if header == "target" else "right")
    base = {key: statistics.median(rows["off"][key]) for key in ("p50", "p99", "cpu")}
    for name in names:
        med = {key: statistics.median(rows[name][key]) for key in ("p50", "p99", "cpu")}
        added = ("", "") if name == "off" else (f"{med['p50'] - base['p50']:+.3f}", f"{med['cpu'] - base['cpu']:+.3f}")
        table.add_row(name, f"{med['p50']:.3f}", f"{med['p99']:.3f}", f"{med['cpu']:.3f}", *added)
    console.print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--words", type=int, default=200)
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
