"""The semantic cache's speed through the gateway: a semantic hit (embedding included) and a miss,
against the same gateway with the cache off, with 10k and 100k entries, per backend.

    .venv/bin/python bench/semantic_cache.py [--rounds 5] [--requests 200] [--miss-requests 200]
                                             [--entries 10000,100000] [--no-postgres] [--quantize both]
                                             [--ef-search 40,100]

Targets are `keel serve` processes (one worker, `keel serve`'s own settings) in front of the same fake
OpenAI upstream (zero added latency, its own process); the client is this process (aiohttp, uvloop):
- `bare`: the cache off: the baseline ("added" is read against it);
- `memory 10k`, `memory 100k`: the semantic cache on (exact cache off), memory backend;
- `postgres 10k`, `postgres 100k`: the same on the postgres backend: a real PostgreSQL 16 with pgvector
  (`pgserver`, a data directory of this run's own, removed at the end); `--no-postgres` skips them.

Every request is one short user question (a few to twenty words, as users ask) under one system prompt,
`temperature: 0`, so all entries share one scope: the worst case for the search, which sees them all.
The store holds 2,000 real questions (embedded by the gateway's own embedder when filling) and, to reach
the target's size, random unit vectors (a search costs the same whatever the vectors mean; random ones
are far from every question, so they never answer one). A hit asks one of the 2,000 questions, worded
as stored (similarity 1.0; the guards still run); a miss asks a question never asked (random words), so
it is embedded, searched, not found, answered upstream and stored. Every answer's `x-keel-cache` is
checked (`semantic-hit` / `miss`), so a row can never silently measure something else: a hit request
answered as a miss (the HNSW search, approximate, did not return the stored question) is counted,
printed and left out of the hit times; any other mismatch stops the run.

Filling: the memory targets are started through this file (`bench/semantic_cache.py _serve SPEC serve
...`), which wraps `keel.cache.build.semantic_cache` to fill the store the stage gets before the gateway
serves; the postgres ones are filled from here: the real questions through the store's `add`, the filler
with COPY and the HNSW index built after (bench/pgvector_store.py's loader).

Measured in interleaved rounds (each round visits every target in a rotated order); the figure is the
median over rounds of each round's p50 / p99, in milliseconds, client-side. Also: the embedder alone in
this process (one query's latency through the `Batcher`, as the stage calls it). A figure, not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import uvloop
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cache import Bench, Rows, Target, UnexpectedCacheStatus, label, rotated, rss, start_upstream, timed
from overhead import pct

from keel.cache.postgres_store import EF_SEARCH  # psycopg is imported only when a store connects

THIS = Path(__file__).resolve()
SYSTEM = "You are a helpful support assistant. Answer briefly."
REAL = 2000
console = Console()

SUBJECTS = ["my password", "a refund", "the invoice", "two-factor login", "my subscription", "the shipping address",
            "a team member", "the API key", "my email address", "the billing plan", "a support ticket", "the export",
            "dark mode", "notifications", "the mobile app", "a webhook", "the data retention", "my profile photo",
            "the language setting", "a calendar sync", "an order", "the trial", "a coupon", "the time zone"]
ACTIONS = ["reset", "change", "cancel", "update", "find", "download", "turn off", "turn on", "delete", "add",
           "share", "restore", "verify", "transfer", "upgrade", "rename", "schedule", "export", "import", "review"]
FRAMES = ["How do I {a} {s}?", "Where can I {a} {s}?", "Can I {a} {s} from the app?", "Why can't I {a} {s}?",
          "What happens when I {a} {s}?", "Who can {a} {s} in my workspace?", "Is it possible to {a} {s} today?",
          "How long does it take to {a} {s}?", "What do I need to {a} {s}?", "Steps to {a} {s} please"]
def vocabulary() -> list[str]:
    """Whole English words of the embedder's own vocabulary: misses are salads of them, far from any
    question and from each other (a 64-word list made salads that hit each other)."""
    import json
    from importlib.resources import files

    vocab = json.loads((files("keel.embedding") / "tokenizer.json").read_text())["model"]["vocab"]
    return sorted(w for w in vocab if w.isalpha() and w.isascii() and len(w) >= 5)


def questions(count: int) -> list[str]:
    """`count` distinct everyday support questions."""
    combos = [f.format(a=a, s=s) for f in FRAMES for a in ACTIONS for s in SUBJECTS]
    random.Random(7).shuffle(combos)
    return combos[:count]


def body(question: str) -> dict[str, Any]:
    return {"model": "chat", "temperature": 0,
            "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]}


def random_vectors(count: int, seed: int) -> Any:
    import numpy as np

    vectors = np.random.default_rng(seed).standard_normal((count, 384)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


async def fill(store: Any, count: int, template: dict[str, Any], embed: Any, vectors: str) -> dict[str, Any]:
    """The store filled as the stage fills it: REAL embedded questions, then random vectors to `count`, in the
    scope the stage reads (`vectors`: the stage's, from keel.yaml's embedder.quantize)."""
    from keel.cache.entry import CachedAnswer
    from keel.cache.semantic_key import semantic_scope
    from keel.request_errors import parse_request
    from keel.types import ChatRequest

    asked = questions(REAL)
    scope = semantic_scope(parse_request(ChatRequest, body(asked[0]), strict=True), None, vectors)
    choice = template["choices"][0]

    def answer(text: str) -> bytes:
        completion = {**template, "choices": [{**choice, "message": {**choice["message"], "content": f"echo: {text}"}}]}
        return CachedAnswer(completion, 0, time.time()).dumps()

    started = time.perf_counter()
    vectors = await embed(asked)
    for text, vector in zip(asked, vectors, strict=True):
        await store.add(scope, vector, text, answer(text), 3600)
    filler = random_vectors(max(0, count - REAL), seed=count)
    for i, vector in enumerate(filler):
        await store.add(scope, vector, f"filler {i}", answer(f"filler {i}"), 3600)
    return {"entries": count, "fill_s": time.perf_counter() - started, "scope": scope}


def serve_filled(spec_path: str, argv: list[str]) -> None:
    """`keel serve` with its memory vector store filled before it serves (see the docstring)."""
    import keel.cache.build

    spec = orjson.loads(Path(spec_path).read_bytes())
    build = keel.cache.build.semantic_cache

    def filled(*args: Any) -> Any:
        stage = build(*args)
        assert stage is not None
        [store] = stage.stores()
        before = rss()

        async def run() -> dict[str, Any]:
            async def embed(texts: list[str]) -> Any:
                return (await stage.embedder.embed(texts)).array

            try:
                return await fill(store, spec["entries"], spec["template"], embed, stage.vectors)
            finally:
                await stage.embedder.close()  # its batcher belongs to this loop; the gateway starts it again

        report = asyncio.run(run())
        Path(spec["report"]).write_bytes(orjson.dumps({**report, "rss_growth": rss() - before}))
        return stage

    keel.cache.build.semantic_cache = filled  # build_caches looks it up when the engine is made
    from keel.cli import app

    sys.argv = ["keel", *argv]
    app()


async def start(bench: Bench, args: argparse.Namespace, session: aiohttp.ClientSession) -> list[Target]:
    start_upstream(bench)
    url, proc = bench.gateway("bare", bench.config("bare", None), ["-m", "keel.cli"])
    targets = [Target("bare", url, None, proc=proc)]
    async with session.post(url + "/chat/completions", json=body("hello")) as response:
        template = await response.json()
    for n, quantize in ((n, q) for n in args.entries for q in args.variants):
        name = f"memory {label(n)}{'' if quantize else ' exact'}"
        report, spec = bench.tmp / f"{name.replace(' ', '-')}.json", bench.tmp / f"{name.replace(' ', '-')}-spec.json"
        spec.write_bytes(orjson.dumps({"entries": n, "template": template, "report": str(report)}))
        path = with_embedder(bench.config(name, {"semantic": {"enabled": True, "max_entries": n + 100_000}}), args,
                             quantize)
        url, proc = bench.gateway(name, path, [str(THIS), "_serve", str(spec)])
        targets.append(Target(name, url, "semantic-hit", n, proc, orjson.loads(report.read_bytes())))
    if not args.no_postgres:
        targets += await postgres_targets(bench, args, template)
    return targets


def with_embedder(path: Path, args: argparse.Namespace, quantize: bool) -> Path:
    """The config at `path` with keel.yaml's `embedder` from --embedder-threads, --spin and the variant."""
    import yaml

    config = yaml.safe_load(path.read_text())
    config["embedder"] = {"threads": args.embedder_threads, "spin": args.spin, "quantize": quantize}
    path.write_text(yaml.safe_dump(config))
    return path


async def postgres_targets(bench: Bench, args: argparse.Namespace, template: dict[str, Any]) -> list[Target]:
    """The postgres targets: one pgserver database per size, filled from here."""
    try:
        import pgserver

        from keel.cache.postgres_store import PostgresVectorStore
        from keel.embedding.model import load_embedder
    except ImportError as exc:
        console.print(f"[bold red]postgres rows skipped: {exc}")
        return []
    from keel.embedding.quantize import vectors_name

    server = pgserver.get_server(bench.tmp / "pg", cleanup_mode="stop")
    bench.pg_server = server
    targets = []
    for n, quantize in ((n, q) for n in args.entries for q in args.variants):
        model = load_embedder(quantize=quantize)
        database = f"bench_{n}{'' if quantize else '_exact'}"
        server.psql(f"CREATE DATABASE {database};")
        url = server.get_uri(database)
        store = PostgresVectorStore(url, timeout_s=60)
        await store.start()

        async def embed(texts: list[str], model: Any = model) -> Any:
            return model.encode(texts).array

        filled = await store_fill(store, url, n, template, embed, vectors_name(quantize))
        await store.close()
        for ef in args.ef_search:  # gateways on the same table, each walking its own number of candidates
            name = f"postgres {label(n)}{'' if quantize else ' exact'}{'' if ef == EF_SEARCH else f' ef {ef}'}"
            path = with_embedder(bench.config(name, {"backend": "postgres", "postgres_url": url,
                                                     "semantic": {"enabled": True, "ef_search": ef}}), args, quantize)
            gateway_url, proc = bench.gateway(name, path, ["-m", "keel.cli"])
            targets.append(Target(name, gateway_url, "semantic-hit", n, proc, filled))
    return targets


async def store_fill(
    store: Any, url: str, count: int, template: dict[str, Any], embed: Any, vectors: str,
) -> dict[str, Any]:
    """`fill` for PostgreSQL: the real questions through the store's own `add`, the random filler with
    COPY into the unindexed table, then the HNSW index built once (bench/pgvector_store.py's way)."""
    from pgvector_store import load, reindex, unindex

    report = await fill(store, REAL, template, embed, vectors)
    started = time.perf_counter()
    if count > REAL:
        await unindex(url, store.table)
        await load(url, store.table, report["scope"], random_vectors(count - REAL, seed=count), REAL)
        await reindex(url, store.table)
    return {**report, "entries": count, "fill_s": report["fill_s"] + time.perf_counter() - started}


async def measure(session: aiohttp.ClientSession, targets: list[Target], args: argparse.Namespace) -> tuple[Rows, Rows]:
    asked, rng = questions(REAL), random.Random(1)
    words = vocabulary()
    fresh = iter(" ".join(random.Random(i).sample(words, 8)) + "?" for i in range(10**9))
    hits, misses = Rows(), Rows()
    lost: Counter[str] = Counter()

    async def hit_run(target: Target, count: int) -> list[float]:
        status = "semantic-hit" if target.entries else None
        latencies = []
        for _ in range(count):
            try:
                latencies.append(await timed(session, target.url, body(rng.choice(asked)), status))
            except UnexpectedCacheStatus as exc:
                if exc.status != "miss" or not target.entries:
                    raise
                lost[target.name] += 1  # the approximate search did not find the stored question: not a hit's time
        return latencies

    async def miss_run(target: Target, count: int) -> list[float]:
        status = "miss" if target.entries else None
        return [await timed(session, target.url, body(next(fresh)), status) for _ in range(count)]

    for target in targets:  # warm every path
        await hit_run(target, 50)
        await miss_run(target, 20)
    for r in range(args.rounds):
        for target in rotated(targets, r):
            hits.add(target.name, await hit_run(target, args.requests))
        for target in rotated(targets, r):
            misses.add(target.name, await miss_run(target, args.miss_requests))
        console.print(f"  round {r + 1}/{args.rounds} done")
    for name, count in sorted(lost.items()):
        console.print(f"{name}: {count} of its hit requests were answered as misses (the approximate search did "
                      "not return the stored question); left out of its hit times")
    return hits, misses


async def embedder_alone(count: int, quantize: bool) -> tuple[float, float]:
    """One query at a time through the `Batcher`, as the stage calls it: p50, p99 (ms)."""
    from keel.embedding.shared import SharedEmbedder

    embedder = SharedEmbedder(quantize=quantize)
    await embedder.start()
    texts = questions(count)
    latencies = []
    for text in texts:
        started = time.perf_counter()
        await embedder.embed([text])
        latencies.append((time.perf_counter() - started) * 1000)
    await embedder.close()
    return pct(latencies, 0.5), pct(latencies, 0.99)


def report(title: str, rows: Rows, targets: list[Target]) -> None:
    table = Table(title=title, title_justify="left")
    for header in ("target", "entries", "p50", "p99", "added p50", "added p99"):
        table.add_column(header, justify="left" if header == "target" else "right")
    base = rows.median("bare")
    for target in targets:
        p50, p99 = rows.median(target.name)
        added = ("", "") if target.name == "bare" else (f"{p50 - base[0]:+.3f}", f"{p99 - base[1]:+.3f}")
        table.add_row(target.name, f"{target.entries:,}", f"{p50:.3f}", f"{p99:.3f}", *added)
    console.print(table)


async def run(args: argparse.Namespace) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="keel-bench-semantic-"))
    bench = Bench(tmp, "")
    console.print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; {os.cpu_count()} cores")
    started = time.perf_counter()
    try:
        # Idle connections dropped before the servers' keep-alive ends: a stale one is never reused.
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64, keepalive_timeout=3)) as session:
            targets = await start(bench, args, session)
            for target in targets[1:]:
                console.print(f"{target.name}: {target.fill['entries']:,} entries in {target.fill['fill_s']:.1f} s"
                              + (f", RSS +{target.fill['rss_growth'] / 1e6:.0f} MB" if "rss_growth" in target.fill
                                 else ""))
            console.print(f"servers ready after {time.perf_counter() - started:.0f} s; measuring")
            hits, misses = await measure(session, targets, args)
    finally:
        bench.stop()
        server = getattr(bench, "pg_server", None)
        if server is not None:
            server.cleanup()
        shutil.rmtree(tmp, ignore_errors=True)
    report("Semantic hit (embedding, search, guards, replay), one request at a time, ms", hits, targets)
    report("Miss (embedding, search, upstream call, store), one request at a time, ms", misses, targets)
    for quantize in args.variants:
        p50, p99 = await embedder_alone(300, quantize)
        console.print(f"the embedder alone ({'quantized' if quantize else 'exact'}), one query through the Batcher, "
                      f"in this process: p50 {p50:.2f} ms, p99 {p99:.2f} ms")
    console.print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; "
                  f"whole run {time.perf_counter() - started:.0f} s; {args.rounds} rounds")


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "_serve":
        serve_filled(sys.argv[2], sys.argv[3:])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=200, help="hit requests per target per round")
    parser.add_argument("--miss-requests", type=int, default=100, help="miss requests per target per round")
    parser.add_argument("--entries", type=lambda s: [int(x) for x in s.split(",")], default=[10_000, 100_000])
    parser.add_argument("--no-postgres", action="store_true", help="skip the postgres (pgserver) targets")
    parser.add_argument("--embedder-threads", type=int, default=None, help="keel.yaml's embedder.threads")
    parser.add_argument("--spin", action="store_true", help="keel.yaml's embedder.spin: true")
    parser.add_argument("--quantize", choices=["true", "false", "both"], default="true",
                        help="keel.yaml's embedder.quantize; both: every cache target twice, the exact one "
                        "named '... exact', interleaved in the same rounds (an A/B in one run)")
    parser.add_argument("--ef-search", type=lambda s: [int(x) for x in s.split(",")], default=[EF_SEARCH],
                        help="cache.semantic.ef_search of the postgres targets; several (40,100): a gateway each on "
                        "the same table, named '... ef N' past the default (an A/B in one run)")
    args = parser.parse_args()
    args.variants = {"true": [True], "false": [False], "both": [True, False]}[args.quantize]
    uvloop.run(run(args))


if __name__ == "__main__":
    main()
