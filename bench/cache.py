"""The exact cache's speed: hit latency through the gateway, a miss's cost, and memory per entry.

    .venv/bin/python bench/cache.py [--rounds 5] [--requests 400] [--rate 50] [--rate-requests 150]
                                    [--miss-requests 300] [--entries 10000,100000] [--redis-url URL]

Every target is a `keel serve` process (one worker, the settings `keel serve` uses) in front of the
same fake OpenAI upstream (`keel.testing.fake_openai`, zero added latency), its own process; the
client is this process (aiohttp, uvloop). Targets:
- `bare`: the gateway with the cache off, answering through the fake upstream. This is the baseline
  the issue's target is read against ("exact hit <= 1 ms p99 added over a bare gateway answer"). It
  includes the gateway's whole path *and* one local HTTP round trip to the fake upstream and the fake's
  own answer, which a hit skips: a hit below it is expected, and "added" comes out negative then;
- `memory 10k`, `memory 100k`: the cache on (memory backend), already holding 10,000 / 100,000 entries;
- `redis 10k`, `redis 100k`: the cache on (redis backend, the real Redis at --redis-url, a key prefix of
  this run's own, deleted at the end, failure or not), already holding 10,000 / 100,000 entries.
  Skipped (said so) when that Redis does not answer.

Requests: one user message of ~1 KB, `temperature: 0`, so the fake upstream's echo answer, and the
cached answer, are ~1 KB too (the same size for the bare gateway and for a hit). A hit request picks
an entry at random (seeded) among the target's entries; every answer's `x-keel-cache` is checked
(`hit` on the cache targets, none on `bare`), so a row can never silently measure misses.

Filling the cache: entries are written straight into the store as the cache stage writes them
(`keel.cache.key.cache_key` of the request as the server parses it, tenant None since no virtual keys;
value `CachedAnswer(...).dumps()`, the store's `set` with the configured TTL). Sending 100k requests
through the gateway would also work but takes minutes on two cores. For the memory backend the store
lives in the gateway process, so the memory targets are started through this file
(`bench/cache.py _serve SPEC serve ...`): it wraps `keel.cache.build.exact_cache`, fills the memory store the
stage gets, records the store's byte count and the RSS before and after, then runs `keel serve`
unchanged. The gateway stays a process of its own (not a thread of the bench, where the client's own
work would share its interpreter). Redis is filled from this process through `RedisStore`'s own key
prefix, pipelined.

Measured, in interleaved rounds (each round visits every target, in a rotated order; the figure is
the median over rounds of each round's p50 / p99):
1. hit latency, one request at a time, and at a fixed rate (`--rate` requests/s per target, open loop);
2. memory per entry: the store's own byte accounting (keys and values), the gateway's RSS growth while
   filling, and tracemalloc over a MemoryStore filled in this process (at the end, servers stopped);
3. a miss: unique requests (never cached) to the bare gateway and to a cache-on gateway (memory and
   Redis, 10k entries): the key hash, the lookup, the coalescer's bookkeeping and the store after the
   answer (the store runs when the reply settles, after the answer has been sent).

A figure, not a test: the machine has two cores shared by the client, the gateways, the fake upstream
and Redis, and whatever else runs; compare within one run.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import psutil
import uvloop
import yaml
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from overhead import free_port, pct, start_gateway, wait_ready

THIS = Path(__file__).resolve()
TTL_S = 3600
MAX_BYTES = 1024**3  # room for 100k ~1 KB entries and the misses: nothing is evicted during the run
FILLER = ("Please summarise the following notes about the quarterly infrastructure review in plain words. " * 10)[:900]
console = Console(width=None if sys.stdout.isatty() else 120)


def label(n: int) -> str:
    return f"{n // 1000}k" if n >= 1000 and n % 1000 == 0 else str(n)


def message(i: int, kind: str = "entry") -> str:
    return f"{kind} {i:07d}: {FILLER}"


def body(i: int, kind: str = "entry") -> dict[str, Any]:
    return {"model": "chat", "messages": [{"role": "user", "content": message(i, kind)}], "temperature": 0}


def entries(count: int, template: dict[str, Any]) -> Iterator[tuple[str, bytes]]:
    """(key, value) as the cache stage stores them for `body(i)`, i < count: the answer is the fake
    upstream's answer to body(0) with its content made the echo of body(i)."""
    from keel.cache.entry import CachedAnswer
    from keel.cache.key import cache_key
    from keel.request_errors import parse_request
    from keel.types import ChatRequest

    choice = template["choices"][0]
    for i in range(count):
        request = parse_request(ChatRequest, body(i), strict=True)  # as the server parses it
        completion = {**template, "choices": [
            {**choice, "message": {**choice["message"], "content": f"echo: {message(i)}"}}]}
        yield cache_key(request, None), CachedAnswer(completion, 0, time.time()).dumps()


def rss() -> int:
    gc.collect()
    return int(psutil.Process().memory_info().rss)


# ---------------------------------------------------------------- the memory gateways' launcher


def serve_filled(spec_path: str, argv: list[str]) -> None:
    """`keel serve` with its memory store filled before it starts serving (see the docstring)."""
    import keel.cache.build
    from keel.cache.memory import MemoryStore

    spec = orjson.loads(Path(spec_path).read_bytes())
    build = keel.cache.build.exact_cache

    def filled(config: Any) -> Any:
        stage = build(config)
        stores = [s for s in stage.stores() if isinstance(s, MemoryStore)] if stage else []
        if len(stores) != 1:
            raise SystemExit(f"expected one memory store, found {len(stores)}")
        store = stores[0]
        before, started = rss(), time.perf_counter()

        async def fill() -> None:
            for key, value in entries(spec["entries"], spec["template"]):
                await store.set(key, value, TTL_S)

        asyncio.run(fill())
        report = {"entries": len(store), "store_bytes": store.size, "fill_s": time.perf_counter() - started,
                  "rss_before": before, "rss_after": rss()}
        Path(spec["report"]).write_bytes(orjson.dumps(report))
        return stage

    keel.cache.build.exact_cache = filled  # build_caches looks it up when the engine is made
    from keel.cli import app

    sys.argv = ["keel", *argv]
    app()


# ---------------------------------------------------------------- servers


@dataclass
class Target:
    name: str
    url: str
    expect: str | None  # the x-keel-cache every answer must carry
    entries: int = 0
    proc: subprocess.Popen[bytes] | None = None
    fill: dict[str, Any] = field(default_factory=dict)


@dataclass
class Bench:
    tmp: Path
    redis_url: str
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    prefixes: list[str] = field(default_factory=list)
    upstream_url: str = ""

    def config(self, name: str, cache: dict[str, Any] | None) -> Path:
        config: dict[str, Any] = {"models": [{"name": "chat", "deployments": [
            {"provider": "openai", "base_url": self.upstream_url, "model": "gpt-4o-mini"}]}]}
        if cache is not None:
            config["cache"] = cache
            prefix = f"keel-bench-cache-{os.getpid()}-{name.replace(' ', '-')}"
            config["state"] = {"key_prefix": prefix}
            self.prefixes.append(prefix)
        home = self.tmp / name.replace(" ", "-")
        home.mkdir(exist_ok=True)
        path = home / "keel.yaml"
        path.write_text(yaml.safe_dump(config))
        return path

    def gateway(self, name: str, path: Path, launcher: list[str]) -> tuple[str, subprocess.Popen[bytes]]:
        port = free_port()
        proc = start_gateway(path.parent, path, port, launcher)
        self.procs.append(proc)
        wait_ready(f"http://127.0.0.1:{port}/readyz", proc, timeout=300)
        return f"http://127.0.0.1:{port}/v1", proc

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
        self.procs.clear()

    def clean_redis(self) -> int:
        if not self.prefixes:
            return 0
        import redis

        client = redis.Redis.from_url(self.redis_url, socket_timeout=5)
        deleted = 0
        try:
            for prefix in self.prefixes:
                batch: list[bytes] = []
                for key in client.scan_iter(match=prefix + ":*", count=5000):
                    batch.append(key)
                    if len(batch) >= 5000:
                        deleted += client.delete(*batch)
                        batch.clear()
                if batch:
                    deleted += client.delete(*batch)
        finally:
            client.close()
        return deleted


def redis_up(url: str) -> str | None:
    """None when the Redis answers, else why not."""
    try:
        import redis

        client = redis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1)
        try:
            client.ping()
        finally:
            client.close()
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


async def fill_redis(url: str, prefix: str, count: int, template: dict[str, Any]) -> float:
    """Entries written under the prefix `RedisStore` uses, pipelined; the seconds it took."""
    from keel.cache.redis_store import RedisStore

    store = RedisStore(url, prefix, timeout_s=30)
    started = time.perf_counter()
    try:
        pipe = store.redis.pipeline(transaction=False)
        for n, (key, value) in enumerate(entries(count, template), 1):
            pipe.set(store.prefix + key, value, px=TTL_S * 1000)
            if n % 2000 == 0:
                await pipe.execute()
        await pipe.execute()
    finally:
        await store.close()
    return time.perf_counter() - started


def start_upstream(bench: Bench) -> None:
    """The fake OpenAI upstream, zero added latency, answering every gateway."""
    port = free_port()
    upstream = subprocess.Popen(
        [sys.executable, "-m", "keel.testing.fake_openai", "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    bench.procs.append(upstream)
    wait_ready(f"http://127.0.0.1:{port}/v1/models", upstream)
    bench.upstream_url = f"http://127.0.0.1:{port}/v1"


async def start(bench: Bench, args: argparse.Namespace, session: aiohttp.ClientSession) -> list[Target]:
    start_upstream(bench)
    url, proc = bench.gateway("bare", bench.config("bare", None), ["-m", "keel.cli"])
    targets = [Target("bare", url, None, proc=proc)]
    # The fake upstream's answer as the gateway returns it: the shape of every stored entry.
    template = await request(session, url, body(0), None)
    sizes = ", ".join(label(n) for n in args.entries)
    console.print(f"answer size {len(orjson.dumps(template))} bytes; filling memory stores ({sizes}) in their "
                  "gateways")
    for n in args.entries:
        name = f"memory {label(n)}"
        report = bench.tmp / f"{name.replace(' ', '-')}.json"
        spec = bench.tmp / f"{name.replace(' ', '-')}-spec.json"
        spec.write_bytes(orjson.dumps({"entries": n, "template": template, "report": str(report)}))
        path = bench.config(name, {"backend": "memory", "exact": {"enabled": True, "ttl_s": TTL_S,
                                                                  "max_bytes": MAX_BYTES}})
        url, proc = bench.gateway(name, path, [str(THIS), "_serve", str(spec)])
        targets.append(Target(name, url, "hit", n, proc, orjson.loads(report.read_bytes())))
    down = redis_up(args.redis_url)
    if down:
        console.print(f"[bold red]Redis at {args.redis_url} does not answer ({down}): its rows are skipped")
        return targets
    for n in args.entries:
        name = f"redis {label(n)}"
        path = bench.config(name, {"backend": "redis", "redis_url": args.redis_url,
                                   "exact": {"enabled": True, "ttl_s": TTL_S}})
        seconds = await fill_redis(args.redis_url, bench.prefixes[-1], n, template)
        url, proc = bench.gateway(name, path, ["-m", "keel.cli"])
        targets.append(Target(name, url, "hit", n, proc, {"entries": n, "fill_s": seconds}))
    return targets


# ---------------------------------------------------------------- requests


class UnexpectedCacheStatus(RuntimeError):
    """An answer's `x-keel-cache` is not what the row measures."""

    def __init__(self, base: str, status: str | None, expect: str | None) -> None:
        super().__init__(f"{base}: x-keel-cache {status!r}, expected {expect!r}")
        self.status = status


async def request(session: aiohttp.ClientSession, base: str, payload: dict[str, Any], expect: str | None) -> Any:
    async with session.post(base + "/chat/completions", data=orjson.dumps(payload),
                            headers={"content-type": "application/json"}) as response:
        data = await response.read()
        status = response.headers.get("x-keel-cache")
        if response.status != 200:
            raise RuntimeError(f"{base}: {response.status} {data[:300]!r}")
        if status != expect:
            raise UnexpectedCacheStatus(base, status, expect)
    return orjson.loads(data)


async def timed(session: aiohttp.ClientSession, base: str, payload: dict[str, Any], expect: str | None) -> float:
    started = time.perf_counter()
    await request(session, base, payload, expect)
    return (time.perf_counter() - started) * 1000


class Picker:
    """Hit requests: a random (seeded) entry of the target's; for `bare`, of the smallest fill."""

    def __init__(self, seed: int, smallest: int) -> None:
        self.rng, self.smallest = random.Random(seed), smallest

    def __call__(self, target: Target) -> dict[str, Any]:
        return body(self.rng.randrange(target.entries or self.smallest))


async def sequential(session: aiohttp.ClientSession, target: Target, count: int, pick: Picker) -> list[float]:
    return [await timed(session, target.url, pick(target), target.expect) for _ in range(count)]


async def at_rate(session: aiohttp.ClientSession, target: Target, count: int, rate: float, pick: Picker) -> list[float]:
    """`count` requests sent every 1/rate s whether or not the previous ones were answered."""
    results: list[float] = []

    async def one(payload: dict[str, Any]) -> None:
        results.append(await timed(session, target.url, payload, target.expect))

    tasks = []
    started = time.perf_counter()
    for i in range(count):
        tasks.append(asyncio.create_task(one(pick(target))))
        await asyncio.sleep(max(0.0, started + (i + 1) / rate - time.perf_counter()))
    await asyncio.gather(*tasks)
    return results


@dataclass
class Rows:
    """Each round's p50 and p99 per target."""

    p50: dict[str, list[float]] = field(default_factory=dict)
    p99: dict[str, list[float]] = field(default_factory=dict)

    def add(self, name: str, latencies: list[float]) -> None:
        self.p50.setdefault(name, []).append(pct(latencies, 0.5))
        self.p99.setdefault(name, []).append(pct(latencies, 0.99))

    def median(self, name: str) -> tuple[float, float]:
        return statistics.median(self.p50[name]), statistics.median(self.p99[name])


def rotated(targets: list[Target], r: int) -> list[Target]:
    k = r % len(targets)
    return targets[k:] + targets[:k]


async def hits(session: aiohttp.ClientSession, targets: list[Target], args: argparse.Namespace) -> dict[str, Rows]:
    pick = Picker(1, min(args.entries))
    for target in targets:  # warm every path
        await sequential(session, target, 200, pick)
    one_at_a_time, fixed = Rows(), Rows()
    for r in range(args.rounds):
        for target in rotated(targets, r):
            one_at_a_time.add(target.name, await sequential(session, target, args.requests, pick))
        for target in rotated(targets, r):
            fixed.add(target.name, await at_rate(session, target, args.rate_requests, args.rate, pick))
        console.print(f"  hit round {r + 1}/{args.rounds} done")
    return {"one at a time": one_at_a_time, f"{args.rate:g} req/s": fixed}


async def misses(session: aiohttp.ClientSession, targets: list[Target], args: argparse.Namespace) -> Rows:
    """Unique requests, never cached: the bare gateway against the smallest cache of each backend."""
    chosen = [t for t in targets if t.expect is None or t.entries == min(args.entries)]
    counter = iter(range(10**9))
    rows = Rows()

    async def run(target: Target, count: int) -> list[float]:
        expect = None if target.expect is None else "miss"
        return [await timed(session, target.url, body(next(counter), "miss"), expect) for _ in range(count)]

    for target in chosen:
        await run(target, 100)
    for r in range(args.rounds):
        for target in rotated(chosen, r):
            rows.add(target.name, await run(target, args.miss_requests))
    return rows


# ---------------------------------------------------------------- memory


async def traced_bytes_per_entry(count: int, template: dict[str, Any], exact_copy: bool = False) -> tuple[float, float]:
    """(bytes per entry traced by tracemalloc, the store's own count per entry) for `count` entries in a
    MemoryStore filled in this process. Entries are made while tracing (an object made before is not
    counted); what is left traced once the temporaries are collected is what the store holds.
    `exact_copy`: each value stored as an exact-size copy of the bytes the stage makes, for comparison."""
    from keel.cache.memory import MemoryStore

    next(entries(1, template))  # imports and first-use caches, before tracing
    store = MemoryStore(MAX_BYTES)
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for key, value in entries(count, template):
        await store.set(key, bytes(bytearray(value)) if exact_copy else value, TTL_S)
    gc.collect()
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    return (after - before) / count, store.size / count


# ---------------------------------------------------------------- report


def report_hits(results: dict[str, Rows], targets: list[Target], args: argparse.Namespace) -> None:
    for mode, rows in results.items():
        table = Table(title=f"exact cache hit latency, {mode} (ms; median of {args.rounds} interleaved rounds' "
                            "p50 and p99)")
        for column in ("target", "p50", "p99", "added p50", "added p99 (target <= 1 ms)"):
            table.add_column(column, justify="left" if column == "target" else "right")
        base50, base99 = rows.median("bare")
        for target in targets:
            p50, p99 = rows.median(target.name)
            added = "" if target.expect is None else f"{p50 - base50:+.3f}"
            added99 = "" if target.expect is None else f"{p99 - base99:+.3f}"
            table.add_row(target.name + (" (baseline)" if target.expect is None else ""), f"{p50:.3f}",
                          f"{p99:.3f}", added, added99)
        console.print(table)
        for target in targets[1:]:
            p50, p99 = rows.median(target.name)
            verdict = "met" if p99 - base99 <= 1.0 else "[bold red]NOT met"
            console.print(f"{mode}, {target.name}: hit p99 {p99:.3f} ms vs bare gateway p99 {base99:.3f} ms, "
                          f"added p99 {p99 - base99:+.3f} ms (target <= 1 ms): {verdict}")


def report_misses(rows: Rows, args: argparse.Namespace) -> None:
    table = Table(title=f"a miss, one request at a time (ms; median of {args.rounds} interleaved rounds)")
    for column in ("target", "p50", "p99", "added p50", "added p99"):
        table.add_column(column, justify="left" if column == "target" else "right")
    base50, base99 = rows.median("bare")
    for name in rows.p50:
        p50, p99 = rows.median(name)
        label = "bare, cache off (baseline)" if name == "bare" else f"{name}, cache on"
        table.add_row(label, f"{p50:.3f}", f"{p99:.3f}", "" if name == "bare" else f"{p50 - base50:+.3f}",
                      "" if name == "bare" else f"{p99 - base99:+.3f}")
    console.print(table)
    for name in rows.p50:
        if name != "bare":
            p50 = rows.median(name)[0]
            console.print(f"miss, {name}: p50 {p50:.3f} ms vs cache off {base50:.3f} ms: the exact cache adds "
                          f"{p50 - base50:+.3f} ms p50")


def report_memory(targets: list[Target], traced: tuple[float, float], copied: float, count: int, value: int) -> None:
    table = Table(title="memory per entry, memory backend (bytes)")
    for column in ("measure", "entries", "bytes per entry"):
        table.add_column(column, justify="left" if column == "measure" else "right")
    for target in targets:
        if target.name.startswith("memory"):
            fill = target.fill
            table.add_row(f"{target.name}: the store's own count (keys + values; what max_bytes bounds)",
                          f"{fill['entries']:,}", f"{fill['store_bytes'] / fill['entries']:.0f}")
            table.add_row(f"{target.name}: gateway RSS growth while filling", f"{fill['entries']:,}",
                          f"{(fill['rss_after'] - fill['rss_before']) / fill['entries']:.0f}")
    table.add_row("tracemalloc, a MemoryStore filled in the bench as the stage fills it", f"{count:,}",
                  f"{traced[0]:.0f}")
    table.add_row("  the store's own count for the same entries", f"{count:,}", f"{traced[1]:.0f}")
    table.add_row("tracemalloc, the same with each value an exact-size copy (comparison)", f"{count:,}",
                  f"{copied:.0f}")
    console.print(table)
    console.print(f"an entry's value (CachedAnswer.dumps of a ~1 KB answer) is {value} bytes long; the store holds "
                  f"{traced[0]:.0f} bytes per entry by tracemalloc, {traced[0] / traced[1]:.1f}x what it counts "
                  f"against max_bytes ({copied:.0f} when each value is an exact-size copy)")


async def run(args: argparse.Namespace) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="keel-bench-cache-"))
    bench = Bench(tmp, args.redis_url)
    console.print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; "
                  f"{os.cpu_count()} cores")
    started = time.perf_counter()
    connector = aiohttp.TCPConnector(limit=256, keepalive_timeout=3)
    try:
        async with aiohttp.ClientSession(connector=connector) as session:
            targets = await start(bench, args, session)
            template = await request(session, targets[0].url, body(0), None)
            for target in targets[1:]:
                console.print(f"{target.name}: {target.fill['entries']:,} entries written in "
                              f"{target.fill['fill_s']:.1f} s")
            console.print(f"servers ready after {time.perf_counter() - started:.0f} s; measuring hits")
            hit_rows = await hits(session, targets, args)
            console.print("measuring misses")
            miss_rows = await misses(session, targets, args)
    finally:
        bench.stop()
        try:
            deleted = bench.clean_redis()
            if deleted:
                console.print(f"deleted this run's {deleted:,} Redis keys")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    report_hits(hit_rows, targets, args)
    report_misses(miss_rows, args)
    count = max(args.entries)
    traced = await traced_bytes_per_entry(count, template)
    copied = (await traced_bytes_per_entry(count, template, exact_copy=True))[0]
    report_memory(targets, traced, copied, count, len(next(entries(1, template))[1]))
    console.print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; "
                  f"whole run {time.perf_counter() - started:.0f} s")


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "_serve":  # a memory gateway, filled (see the docstring)
        serve_filled(sys.argv[2], sys.argv[3:])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (median reported)")
    parser.add_argument("--requests", type=int, default=400, help="hit requests per target per round, one at a time")
    parser.add_argument("--rate", type=float, default=50.0, help="requests/s of the fixed-rate runs")
    parser.add_argument("--rate-requests", type=int, default=150, help="requests per target per round at --rate")
    parser.add_argument("--miss-requests", type=int, default=300, help="miss requests per target per round")
    parser.add_argument("--entries", type=lambda s: [int(x) for x in s.split(",")], default=[10_000, 100_000],
                        help="cache sizes, comma-separated")
    parser.add_argument("--redis-url", default=os.environ.get("KEEL_TEST_REDIS_URL", "redis://127.0.0.1:6379/0"))
    uvloop.run(run(parser.parse_args()))  # the loop `keel serve` runs on


if __name__ == "__main__":
    main()
