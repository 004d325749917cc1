"""The semantic cache's in-process vector store: exact NumPy search against the HNSW index (usearch), both
through `keel.cache.vectors.MemoryVectorStore` itself (so the figures include its Python around them).

    .venv/bin/python bench/vector_index.py [--sizes 1000,2000,4000,6000,8000,10000,30000,100000] [--queries 300]

Two stores grow side by side in one scope, checkpoint by checkpoint: `exact` (ann_threshold too high
to ever switch) and `ann` (ann_threshold 2: every entry goes into the HNSW index as it is added). The
entries are random unit vectors of 384 dimensions, one in 50 followed by a near-duplicate of itself
(cosine ~0.95), each with a ~60-character query and a 1 KB answer. At each checkpoint:
- single-query search p50 / p99 (k=5, min_score 0.8, one query at a time), on queries that are noisy
  copies of stored entries (cosine ~0.9 to it: what a cache hit looks like);
- recall@1 of the ANN store against the exact one on those queries (`near`), and on random queries
  (`rand`, min_score -1: the nearest entry of unstructured data, HNSW's worst case);
- insert cost: the mean and p99 of `add` while growing to the checkpoint.
Then the crossover: the smallest size measured where the ANN search's p50 is below the exact one's,
what `ANN_THRESHOLD` in keel/cache/vectors.py is set from. And memory per entry: tracemalloc over an
exact store of 10,000 entries in one scope, and of 10,000 scopes of one entry each (the answer's
bytes taken out; the query strings are made before, so not counted), plus the HNSW index's own
`memory_usage` per entry (native memory, which tracemalloc does not see).

A figure, not a test: two shared cores; compare within one run.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import sys
import time
import tracemalloc

import numpy as np

from keel.cache.vectors import ANN_DTYPE, ANN_THRESHOLD, MemoryVectorStore

DIM = 384
SCOPE = "s1:-:bench-model:" + "0" * 64


def unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=-1, keepdims=True)).astype(np.float32)


def dataset(n: int, rng: np.random.Generator) -> np.ndarray:
    vectors = unit(rng.standard_normal((n, DIM)))
    for i in range(0, n - 1, 50):  # a near-duplicate right after every 50th entry
        vectors[i + 1] = unit(vectors[i] + 0.33 / np.sqrt(DIM) * rng.standard_normal(DIM))
    return vectors


def noisy(vectors: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return unit(vectors + 0.48 / np.sqrt(DIM) * rng.standard_normal(vectors.shape))


def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def timed_searches(store: MemoryVectorStore, queries: np.ndarray, k: int, min_score: float
                         ) -> tuple[list[float], list[str | None]]:
    times, top = [], []
    for query in queries:
        start = time.perf_counter()
        found = await store.search(SCOPE, query, k, min_score)
        times.append(time.perf_counter() - start)
        top.append(found[0].entry_id if found else None)
    return times, top


async def speed(sizes: list[int], n_queries: int) -> list[dict[str, float]]:
    rng = np.random.default_rng(7)
    vectors = dataset(max(sizes), rng)
    answer = b"a" * 1024
    exact = MemoryVectorStore(10**7, ann_threshold=10**9)
    ann = MemoryVectorStore(10**7, ann_threshold=2)
    rows, added = [], 0
    for size in sizes:
        add_exact: list[float] = []
        add_ann: list[float] = []
        for i in range(added, size):
            query = f"how do I configure the thing number {i} for my project?"
            start = time.perf_counter()
            await exact.add(SCOPE, vectors[i], query, answer, 3600)
            mid = time.perf_counter()
            await ann.add(SCOPE, vectors[i], query, answer, 3600)
            add_ann.append(time.perf_counter() - mid)
            add_exact.append(mid - start)
        added = size
        assert ann.uses_ann(SCOPE) and not exact.uses_ann(SCOPE)
        picks = rng.integers(0, size, n_queries)
        near = noisy(vectors[picks], rng)
        rand = unit(rng.standard_normal((n_queries, DIM)))
        gc.collect()
        t_exact, top_exact = await timed_searches(exact, near, 5, 0.8)
        t_ann, top_ann = await timed_searches(ann, near, 5, 0.8)
        _, rand_exact = await timed_searches(exact, rand, 1, -1.0)
        _, rand_ann = await timed_searches(ann, rand, 1, -1.0)
        found = sum(t is not None for t in top_exact)
        rows.append({
            "size": size,
            "exact_p50": pct(t_exact, 0.5) * 1e3, "exact_p99": pct(t_exact, 0.99) * 1e3,
            "ann_p50": pct(t_ann, 0.5) * 1e3, "ann_p99": pct(t_ann, 0.99) * 1e3,
            "recall_near": sum(a == e for a, e in zip(top_ann, top_exact, strict=True)) / n_queries,
            "hits": found / n_queries,
            "recall_rand": sum(a == e for a, e in zip(rand_ann, rand_exact, strict=True)) / n_queries,
            "add_exact_us": statistics.fmean(add_exact) * 1e6, "add_exact_p99_us": pct(add_exact, 0.99) * 1e6,
            "add_ann_us": statistics.fmean(add_ann) * 1e6, "add_ann_p99_us": pct(add_ann, 0.99) * 1e6,
            "ann_index_bytes": ann._scopes[SCOPE].ann.memory_usage / size,
        })
        print(f"  {size:>7,} done", file=sys.stderr, flush=True)
    return rows


async def memory(n: int) -> tuple[float, float]:
    rng = np.random.default_rng(3)
    vectors = dataset(n, rng)
    answer = b"a" * 1024
    per_entry = []
    for one_scope in (True, False):
        store = MemoryVectorStore(10**7, ann_threshold=10**9)
        queries = [f"how do I configure the thing number {i:06d} for my project?" for i in range(n)]
        gc.collect()
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        for i in range(n):
            scope = SCOPE if one_scope else f"s1:-:bench-model:{i:064x}"
            await store.add(scope, vectors[i], queries[i], answer, 3600)
        gc.collect()
        after = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        per_entry.append((after - before) / n - len(answer))  # the queries were made before: not counted
        del store
    return per_entry[0], per_entry[1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="1000,2000,4000,6000,8000,10000,30000,100000")
    parser.add_argument("--queries", type=int, default=300)
    args = parser.parse_args()
    sizes = sorted(int(s) for s in args.sizes.split(","))
    started = time.perf_counter()
    rows = asyncio.run(speed(sizes, args.queries))
    one_scope, many_scopes = asyncio.run(memory(10_000))

    print(f"\nMemoryVectorStore, one scope, 384-dim float32, k=5 min_score=0.8, {args.queries} queries per row;"
          f" HNSW index dtype {ANN_DTYPE}, re-scored exactly")
    print(f"{'entries':>8} | {'exact p50':>9} {'p99':>7} | {'ANN p50':>8} {'p99':>7} | {'recall@1 near':>13}"
          f" {'rand':>5} | {'add exact':>9} {'p99':>6} | {'add ANN':>8} {'p99':>7} | {'index B/entry':>13}")
    for r in rows:
        print(f"{r['size']:>8,} | {r['exact_p50']:>7.3f}ms {r['exact_p99']:>5.2f}ms | {r['ann_p50']:>6.3f}ms"
              f" {r['ann_p99']:>5.2f}ms | {r['recall_near']:>13.3f} {r['recall_rand']:>5.2f} |"
              f" {r['add_exact_us']:>7.1f}us {r['add_exact_p99_us']:>4.0f}us | {r['add_ann_us']:>6.0f}us"
              f" {r['add_ann_p99_us']:>5.0f}us | {r['ann_index_bytes']:>13.0f}")
    faster = [r["size"] for r in rows if r["ann_p50"] < r["exact_p50"]]
    print(f"\nANN p50 below exact p50 from: {f'{faster[0]:,} entries' if faster else 'never (in these sizes)'};"
          f" ANN_THRESHOLD is {ANN_THRESHOLD:,}")
    print(f"near-duplicate queries that found an entry >= 0.8 (exact): {statistics.fmean(r['hits'] for r in rows):.2f}")
    print(f"memory per entry (tracemalloc, the 1 KB answer's bytes and the query text taken out):"
          f" {one_scope:,.0f} B in one scope of 10,000; {many_scopes:,.0f} B in 10,000 scopes of one;"
          f" the HNSW index adds the 'index B/entry' above (native)")
    print(f"took {time.perf_counter() - started:.0f}s")


if __name__ == "__main__":
    main()
