"""The semantic cache's PostgreSQL store (`keel.cache.postgres_store.PostgresVectorStore`): search
latency at 10k and 100k entries in one scope, and for a small scope beside them.

    .venv/bin/python bench/pgvector_store.py [--sizes 10000,100000] [--searches 500] [--k 5]
    .venv/bin/python bench/pgvector_store.py --real [--ef 40,64,100]     # ~3 min

The server is a PostgreSQL 16 with pgvector 0.6.2 started by pgserver in a temporary directory (as in
tests/pgvector_server.py), talked to over its Unix socket, deleted at the end. Entries are random unit
vectors of 384 dimensions (no structure: the hard case for HNSW), written with COPY, the HNSW index
dropped for the load and built after it (the index `start` makes, with more maintenance_work_mem). Searches go through
the store's own `search` (pool, deadline, HNSW query, and its exact fallback when HNSW yields fewer
than k rows of the scope), one at a time, in this process.

Rows, per size, for three scopes in one table (the big one, one of 2% of its size, one of 50 entries):
a query close to a stored entry of the scope (cosine ~0.95, a paraphrase): p50 / p99, how often the
entry it was made from comes first (recall@1), and how often the HNSW query alone held fewer than k
rows of the scope (the store then reads the scope exactly; the planner may also read a small scope
exactly by itself). Last, a random query (nothing close) in the big scope: p50 / p99.

`--real`: which `hnsw.ef_search` to ship. Random vectors are HNSW's worst case, and the cache's searches
are for near duplicates of real questions. 100k entries: ~23k real texts (the injection set's and MRPC's
first sentences, embedded by Keel's embedder) and random vectors to the size; queries are 500 stored
texts lightly edited (lower case, a question mark added or dropped, a doubled space: what a user retypes)
and 500 MRPC sentences never stored (misses). Per ef_search, in two interleaved rounds, p50 / p99 of the
store's `search` at the default threshold, and how many of the queries whose exact nearest neighbour is
at or above the threshold got one from the store (what a lower ef_search could lose: hits).

A figure, not a test: two shared cores; compare within one run.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from keel.cache.postgres_store import EF_SEARCH, PostgresVectorStore
from keel.config import SemanticCacheConfig

DIM = 384
ROOT = Path(__file__).resolve().parents[1]
INJECTION = ROOT / "bench" / "guardrails_data" / "injection.jsonl"
MRPC = [ROOT.parent / "shared" / "data" / "paraphrase" / f for f in ("mrpc-train.tsv", "mrpc-val.tsv")]
BIG, MID, SMALL = ("s1:-:m:" + c * 64 for c in "bms")


def unit(rows: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    unit_rows: npt.NDArray[np.float32] = (rows / np.linalg.norm(rows, axis=-1, keepdims=True)).astype(np.float32)
    return unit_rows


def pcts(samples: list[float]) -> str:
    ms = sorted(s * 1000 for s in samples)
    return f"p50 {statistics.median(ms):6.2f} ms  p99 {ms[int(len(ms) * 0.99) - 1]:6.2f} ms"


async def load(url: str, table: str, scope: str, vectors: npt.NDArray[np.float32], start: int) -> None:
    import psycopg
    from pgvector.psycopg import register_vector_async

    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        await register_vector_async(conn)
        async with conn.cursor().copy(
            f"COPY {table} (scope, query, embedding, answer, stored_at, expires_at) FROM STDIN WITH (FORMAT BINARY)"
        ) as copy:
            copy.set_types(["text", "text", "vector", "bytea", "float8", "float8"])
            now = time.time()
            for i, row in enumerate(vectors):
                await copy.write_row((scope, f"q{start + i}", row, b"answer", now, now + 86400))


async def unindex(url: str, table: str) -> None:
    """Drop the HNSW index `start` made: COPY into an indexed table walks the graph for every row."""
    import psycopg

    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        await conn.execute(f"DROP INDEX IF EXISTS {table}_embedding")


async def reindex(url: str, table: str) -> float:
    import psycopg

    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        await conn.execute("SET maintenance_work_mem = '1GB'")
        began = time.perf_counter()
        await conn.execute(f"CREATE INDEX {table}_embedding ON {table} USING hnsw (embedding vector_cosine_ops)")
        await conn.execute(f"ANALYZE {table}")
        return time.perf_counter() - began


async def hnsw_short(url: str, table: str, scope: str, queries: npt.NDArray[np.float32], k: int) -> int:
    """How many of `queries` the HNSW query alone answers with fewer than k rows of `scope`."""
    import psycopg
    from pgvector.psycopg import register_vector_async

    short = 0
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        await register_vector_async(conn)
        await conn.execute(f"SET hnsw.ef_search = {EF_SEARCH}")
        for q in queries:
            rows = await (await conn.execute(
                f"SELECT id FROM {table} WHERE scope = %s AND expires_at > 0 ORDER BY embedding <=> %s LIMIT %s",
                (scope, q, k),
            )).fetchall()
            short += len(rows) < k
    return short


async def timed(
    store: PostgresVectorStore, scope: str, queries: npt.NDArray[np.float32], k: int,
) -> tuple[list[float], list[list[int]]]:
    latencies: list[float] = []
    found: list[list[int]] = []
    for q in queries:
        began = time.perf_counter()
        neighbours = await store.search(scope, q, k, 0.0)
        latencies.append(time.perf_counter() - began)
        found.append([int(n.query[1:]) for n in neighbours])
    return latencies, found


async def bench_size(url: str, n: int, searches: int, k: int, rng: np.random.Generator) -> None:
    store = PostgresVectorStore(url, table_prefix=f"bench{n}", timeout_s=10)
    await store.start()
    await unindex(url, store.table)
    scopes = {"big": (BIG, n), "mid (2%)": (MID, n // 50), "small (50)": (SMALL, 50)}
    data: dict[str, npt.NDArray[np.float32]] = {}
    began, first = time.perf_counter(), 0
    for name, (scope, size) in scopes.items():
        data[name] = unit(rng.standard_normal((size, DIM)).astype(np.float32))
        await load(url, store.table, scope, data[name], first)
        first += size
    loaded = time.perf_counter() - began
    built = await reindex(url, store.table)
    print(f"\n{n:,} entries in one scope, {n // 50:,} and 50 in two others: COPY {loaded:.1f} s, "
          f"HNSW build {built:.1f} s (ef_search {EF_SEARCH}, k {k})")

    first = 0
    for name, (scope, size) in scopes.items():
        rows = data[name]
        picks = rng.choice(size, min(searches, size), replace=False)
        near = unit(rows[picks] + 0.33 / np.sqrt(DIM) * rng.standard_normal((len(picks), DIM)).astype(np.float32))
        await timed(store, scope, near[:20], k)  # warm the pool and the pages
        lat, found = await timed(store, scope, near, k)
        hit = np.mean([f[:1] == [first + int(p)] for f, p in zip(found, picks, strict=True)])
        cos = float(np.mean(np.sum(near * rows[picks], axis=1)))
        short = await hnsw_short(url, store.table, scope, near, k)
        print(f"  {name:<10} near (cos {cos:.2f})  {pcts(lat)}  recall@1 {hit:.3f}  "
              f"HNSW alone short of k: {short}/{len(picks)}")
        first += size

    rand = unit(rng.standard_normal((searches, DIM)).astype(np.float32))
    lat, _ = await timed(store, BIG, rand, k)
    print(f"  big        nothing close     {pcts(lat)}")
    await store.close()


def real_texts() -> tuple[list[str], list[str]]:
    """Texts to store (the injection set's, MRPC's first sentences) and MRPC's second ones (fresh)."""
    with INJECTION.open(encoding="utf-8") as lines:  # by "\n" only: texts hold other line breaks
        stored = [json.loads(line)["text"] for line in lines if line.strip()]
    fresh: list[str] = []
    for path in MRPC:
        with path.open(encoding="utf-8-sig") as f:
            for row in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE):
                stored.append(row["#1 String"])
                fresh.append(row["#2 String"])
    kept = list(dict.fromkeys(t for t in stored if 3 <= len(t.split()) <= 60))
    known = set(kept)
    return kept, [t for t in dict.fromkeys(fresh) if t not in known]


def retyped(text: str, rng: random.Random) -> str:
    """What a user asking again might change: case, the final mark, a space."""
    text, pick = text.strip(), rng.randrange(3)
    if pick == 0:
        return text.lower()
    if pick == 1:
        return text.rstrip("?.!") if text[-1:] in "?.!" else text + "?"
    return text.replace(" ", "  ", 1)


def embedded(texts: list[str]) -> npt.NDArray[np.float32]:
    from rich.progress import track

    from keel.embedding.model import load_embedder

    embedder = load_embedder()
    batches = [texts[i:i + 64] for i in range(0, len(texts), 64)]
    return np.concatenate([embedder.encode(b).array for b in track(batches, description="embedding")])


async def bench_real(url: str, n: int, efs: list[int], rng: np.random.Generator) -> None:
    threshold = SemanticCacheConfig().threshold
    stored, fresh = real_texts()
    picks = random.Random(3).sample(range(len(stored)), 500)
    vectors = embedded(stored + [retyped(stored[i], random.Random(i)) for i in picks] + fresh[:500])
    real, near, far = vectors[:len(stored)], vectors[len(stored):len(stored) + 500], vectors[len(stored) + 500:]
    table = np.concatenate([real, unit(rng.standard_normal((n - len(real), DIM)).astype(np.float32))])
    store = PostgresVectorStore(url, table_prefix="real", timeout_s=10)
    await store.start()
    await unindex(url, store.table)
    await load(url, store.table, BIG, table, 0)
    built = await reindex(url, store.table)
    await store.close()
    print(f"\n{n:,} entries in one scope: {len(real):,} real texts and random vectors; HNSW build {built:.1f} s; "
          f"threshold {threshold}")
    sets = [(name, queries, (queries @ table.T).max(axis=1)) for name, queries in (("retyped", near), ("fresh", far))]
    for name, queries, best in sets:  # the exact nearest neighbour's score, once per query
        print(f"  {name}: {int((best >= threshold).sum())}/{len(queries)} have a stored neighbour at or above it")
    for round_ in range(2):
        for ef in efs:
            store = PostgresVectorStore(url, table_prefix="real", timeout_s=10, ef_search=ef)
            parts = []
            for name, queries, best in sets:
                await timed(store, BIG, queries[:20], 4)  # warm the pool and the pages
                latencies: list[float] = []
                found = 0
                for q, b in zip(queries, best, strict=True):
                    began = time.perf_counter()
                    got = await store.search(BIG, q, 4, threshold)
                    latencies.append(time.perf_counter() - began)
                    found += bool(got) and b >= threshold
                parts.append(f"{name} {pcts(latencies)} found {found}/{int((best >= threshold).sum())}")
            await store.close()
            print(f"  round {round_ + 1} ef_search {ef:4d}  " + "  ".join(parts))


async def main(args: argparse.Namespace) -> None:
    import psycopg
    from pgserver.postgres_server import get_server

    home = Path(tempfile.mkdtemp(prefix="keel-bench-pgvector-"))
    server: Any = get_server(home / "data", cleanup_mode="delete")
    try:
        with psycopg.connect(server.get_uri("postgres"), autocommit=True) as admin:
            admin.execute("CREATE DATABASE bench")
            server_version = admin.execute("SHOW server_version").fetchone()
            vector = admin.execute(
                "SELECT default_version FROM pg_available_extensions WHERE name = 'vector'").fetchone()
        print(f"PostgreSQL {server_version[0] if server_version else '?'}, pgvector {vector[0] if vector else '?'} "
              "(pgserver)")
        rng = np.random.default_rng(1)
        if args.real:
            await bench_real(server.get_uri("bench"), max(args.sizes), args.ef, rng)
            return
        for n in args.sizes:
            await bench_size(server.get_uri("bench"), n, args.searches, args.k, rng)
    finally:
        server.cleanup()
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",")], default=[10_000, 100_000])
    parser.add_argument("--searches", type=int, default=500)
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--real", action="store_true", help="near duplicates of real texts, per --ef")
    parser.add_argument("--ef", type=lambda s: [int(x) for x in s.split(",")], default=[40, 64, 100],
                        help="hnsw.ef_search values --real compares")
    asyncio.run(main(parser.parse_args()))
