"""The local embedder (all-MiniLM-L6-v2, int8 ONNX): load time, one query's latency, batch throughput.

    .venv/bin/python bench/embedder.py [--rounds 5] [--queries 200] [--threads N]

Each round loads the model afresh (timed), embeds `--queries` single sentences one at a time
(p50 and p99 of one call to `encode`), then the same sentences in batches of 32 (sentences per
second), and last the same sentences as concurrent single-sentence calls through the `Batcher`
(as the gateway's callers arrive: sentences per second). Reported: the median over rounds of
each figure. The sentences are MRPC news sentences (tests/data/paraphrase-sample.tsv), 10 to 40
words, as chat prompts and cache keys are.

A figure, not a test: the machine's load moves these numbers; compare within one run.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import os
import statistics
import time
from pathlib import Path

from keel.embedding import Batcher, SentenceEmbedder, load_embedder
from keel.embedding.model import default_threads

SAMPLE = Path(__file__).resolve().parent.parent / "tests" / "data" / "paraphrase-sample.tsv"


def sentences(count: int) -> list[str]:
    with SAMPLE.open(encoding="utf-8") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[1:]
    pool = [text for row in rows for text in (row[3], row[4])]
    return [pool[i % len(pool)] for i in range(count)]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def through_batcher(model: SentenceEmbedder, texts: list[str]) -> float:
    batcher = Batcher(model)
    started = time.perf_counter()
    await asyncio.gather(*(batcher.embed([text]) for text in texts))
    seconds = time.perf_counter() - started
    await batcher.close()
    return len(texts) / seconds


def one_round(texts: list[str], threads: int) -> dict[str, float]:
    started = time.perf_counter()
    model = load_embedder(threads=threads)
    load_s = time.perf_counter() - started
    model.encode(texts[:4])  # first run allocates onnxruntime's buffers
    single: list[float] = []
    for text in texts:
        t0 = time.perf_counter()
        model.encode([text])
        single.append((time.perf_counter() - t0) * 1000)
    t0 = time.perf_counter()
    for i in range(0, len(texts), 32):
        model.encode(texts[i:i + 32])
    batched = len(texts) / (time.perf_counter() - t0)
    return {
        "load_s": load_s, "p50_ms": percentile(single, 0.5), "p99_ms": percentile(single, 0.99),
        "batch_per_s": batched, "batcher_per_s": asyncio.run(through_batcher(model, texts)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--threads", type=int, default=default_threads())
    args = parser.parse_args()
    texts = sentences(args.queries)
    rounds = [one_round(texts, args.threads) for _ in range(args.rounds)]
    median = {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}
    print(f"all-MiniLM-L6-v2 int8 ONNX, {args.threads} intra-op thread(s), {os.cpu_count()} CPUs, "
          f"{args.queries} sentences, median of {args.rounds} rounds")
    print(f"  load                    {median['load_s']:.2f} s")
    print(f"  one query p50 / p99     {median['p50_ms']:.1f} / {median['p99_ms']:.1f} ms")
    print(f"  batches of 32           {median['batch_per_s']:.0f} sentences/s")
    print(f"  concurrent via Batcher  {median['batcher_per_s']:.0f} sentences/s")


if __name__ == "__main__":
    main()
