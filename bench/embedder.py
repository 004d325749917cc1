"""The local embedder (all-MiniLM-L6-v2, int8 ONNX): load time, one query's latency, batch throughput,
quantized (the default: int8 matrix products, each text alone) against exact (float32, batched).

    .venv/bin/python bench/embedder.py [--rounds 5] [--queries 200] [--threads N]

Each round visits both variants, in an order that alternates between rounds. It loads the model
afresh (timed; the quantized one from its disk cache, built beforehand), embeds `--queries` single
sentences one at a time (p50 and p99 of one call to `encode`), then the same sentences in batches of
32 (sentences per second; the quantized model runs each alone), and last the same sentences as
concurrent single-sentence calls through the `Batcher` (as the gateway's callers arrive: sentences per
second). Reported: the median over rounds of each figure, and quantized over exact. The sentences are
MRPC news sentences (tests/data/paraphrase-sample.tsv), 10 to 40 words, as chat prompts and cache
keys are.

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


VARIANTS = {"exact": False, "quantized": True}


def one_round(texts: list[str], threads: int, quantize: bool) -> dict[str, float]:
    started = time.perf_counter()
    model = load_embedder(threads=threads, quantize=quantize)
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
    load_embedder(quantize=True)  # builds the quantized model into its cache once: load times are the cached ones
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    rounds: dict[str, list[dict[str, float]]] = {name: [] for name in VARIANTS}
    for r in range(args.rounds):
        for name in list(VARIANTS)[::1 if r % 2 == 0 else -1]:
            rounds[name].append(one_round(texts, args.threads, VARIANTS[name]))
    median = {name: {key: statistics.median(x[key] for x in rs) for key in rs[0]} for name, rs in rounds.items()}
    print(f"all-MiniLM-L6-v2 int8 ONNX, {args.threads} intra-op thread(s), {os.cpu_count()} CPUs, "
          f"{args.queries} sentences, median of {args.rounds} interleaved rounds")
    rows = [("load", "load_s", "{:.2f} s"), ("one query p50", "p50_ms", "{:.2f} ms"),
            ("one query p99", "p99_ms", "{:.2f} ms"), ("batches of 32", "batch_per_s", "{:.0f} sentences/s"),
            ("concurrent via Batcher", "batcher_per_s", "{:.0f} sentences/s")]
    print(f"  {'':24}{'exact':>20}{'quantized':>20}  quantized / exact")
    for title, key, form in rows:
        exact, quantized = median["exact"][key], median["quantized"][key]
        print(f"  {title:<24}{form.format(exact):>20}{form.format(quantized):>20}  {quantized / exact:.2f}")
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
