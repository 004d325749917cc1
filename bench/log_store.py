"""The request log's speed: records/s through the batched writer, and what `submit()` costs the caller.

    .venv/bin/python bench/log_store.py [--records 50000] [--postgres URL | --no-postgres]

For SQLite (a file in a temporary directory, WAL) and PostgreSQL (a database made for the
run and dropped after; default postgresql://postgres@127.0.0.1:5432/postgres as the admin URL):
- sustained records/s: N realistic records (messages of ~600 characters in, ~300 out, an
  attempt log, guardrail verdicts) submitted as fast as one thread can, timed until `close()`
  returns with every record in the store, with the default store settings (batches of 500,
  no redaction), then again with two redaction patterns (an API key, a US SSN); the same rows
  through `RecordStore.write` in batches of 500 with no writer, as the store's own ceiling;
- the cost of `submit()` on the calling thread: p50/p99 of one call, timed one at a time
  while the writer threads are draining into the store, with the write-ahead file (the default)
  and without it (`store.write_ahead: false`), beside a no-op call timed the same way,
  interleaved in the same loop (the difference is what the request path pays).
Figures, not asserts: a noisy 2-core machine moves them; run it twice.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from keel.config import KeelConfig, StoreConfig, parse_config
from keel.engine import Keel
from keel.observability.record import RequestRecord, SpanRecord
from keel.observability.stage import Observe
from keel.observability.store import RecordStore, request_row
from keel.observability.tracing import Tracing
from keel.observability.writer import RecordWriter
from keel.types import ChatRequest

REDACT = [r"sk-[A-Za-z0-9]{16,}", r"\b\d{3}-\d{2}-\d{4}\b"]
QUESTION = ("Summarise the attached quarterly report for the board, in three bullet points, and flag any "
            "figure that moved by more than ten percent since the last quarter. ") * 4
ANSWER = "- Revenue grew 12% quarter on quarter.\n- Costs held flat.\n- Churn fell to 2.1%. " * 4


def records(n: int, run: str) -> list[RequestRecord]:
    now = time.time()
    return [
        RequestRecord(
            request_id=f"req_{run}_{i:07d}", started_at=now + i * 1e-4, ended_at=now + i * 1e-4 + 0.8,
            trace_id=f"{i:032x}", span_id=f"{i:016x}", key_id=f"key_{i % 20}", user=f"user{i % 500}",
            feature=("search", "chat", "summary")[i % 3], model="chat", deployment="openai/gpt-4o-mini",
            upstream_model="gpt-4o-mini-2024-07-18", system_fingerprint="fp_44709d6fcb", stream=i % 2 == 0,
            attempts=1, attempt_log=[{"deployment": "openai/gpt-4o-mini", "error": None, "ms": 790.0}],
            cache_status="miss", guardrails=[{"check": "pii", "verdict": "pass"}],
            input=[{"role": "system", "content": "You are concise."}, {"role": "user", "content": QUESTION}],
            output={"role": "assistant", "content": ANSWER}, metadata={"team": "growth"},
            prompt_tokens=160, completion_tokens=70, cost_usd=0.000066, latency_ms=800.0 + i % 400,
            ttft_ms=210.0, upstream_ms=780.0,
        )
        for i in range(n)
    ]


def through_writer(url: str, n: int, spool: Path, run: str, redact: list[str]) -> float:
    """Records/s from the first submit() until close() returns with all of them stored."""
    store = RecordStore(url)
    store.migrate()
    batch = records(n, run)
    writer = RecordWriter(store, StoreConfig(url=url, redact=redact, spool_path=str(spool)))
    writer.start()
    writer.flush()  # the schema is checked before the clock starts
    start = time.perf_counter()
    for record in batch:
        writer.submit(record)
    writer.close(timeout=300)
    elapsed = time.perf_counter() - start
    store.close()
    if writer.written != n or writer.spooled or writer.dropped:
        raise SystemExit(f"writer lost track: {writer.stats()}")
    return n / elapsed


def store_alone(url: str, n: int) -> float:
    store = RecordStore(url)
    rows = [request_row(r) for r in records(n, "s")]
    start = time.perf_counter()
    for i in range(0, n, 500):
        store.write(rows[i : i + 500])
    elapsed = time.perf_counter() - start
    store.close()
    return n / elapsed


def submit_cost(url: str, n: int, spool: Path) -> dict[str, float]:
    store = RecordStore(url)
    ahead = RecordWriter(store, StoreConfig(url=url, redact=REDACT, spool_path=str(spool)), migrate=False)
    memory = RecordWriter(store, StoreConfig(url=url, redact=REDACT, spool_path=str(spool), write_ahead=False),
                          migrate=False)
    ahead.start()
    memory.start()
    batch, twins = records(n, "l"), records(n, "m")
    clock = time.perf_counter_ns

    def noop(record: RequestRecord) -> None:
        return None

    submit: Callable[[RequestRecord], None] = ahead.submit
    submit_memory: Callable[[RequestRecord], None] = memory.submit
    base: list[int] = []
    cost: list[int] = []
    cost_memory: list[int] = []
    for record, twin in zip(batch, twins, strict=True):
        t0 = clock()
        noop(record)
        t1 = clock()
        submit(record)
        t2 = clock()
        submit_memory(twin)
        t3 = clock()
        base.append(t1 - t0)
        cost.append(t2 - t1)
        cost_memory.append(t3 - t2)
    ahead.close(timeout=300)
    memory.close(timeout=300)
    store.close()
    q = lambda xs, p: statistics.quantiles(xs, n=100, method="inclusive")[p - 1] / 1000  # noqa: E731  µs
    return {
        "noop_p50_us": q(base, 50), "noop_p99_us": q(base, 99),
        "submit_p50_us": q(cost, 50), "submit_p99_us": q(cost, 99),
        "memory_p50_us": q(cost_memory, 50), "memory_p99_us": q(cost_memory, 99),
        "added_p50_us": q(cost, 50) - q(base, 50),
    }


@contextmanager
def postgres_database(admin_url: str) -> Iterator[str]:
    import psycopg
    from sqlalchemy.engine import make_url

    name = f"keel_bench_{secrets.token_hex(4)}"
    with psycopg.connect(admin_url, connect_timeout=3, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def run(name: str, url: str, n: int, tmp: Path) -> None:
    plain = through_writer(url, n, tmp / f"{name}-1.jsonl", "plain", [])
    redacted = through_writer(url, n, tmp / f"{name}-2.jsonl", "redacted", REDACT)
    ceiling = store_alone(url, n)
    path = submit_cost(url, min(n, 20_000), tmp / f"{name}-3.jsonl")
    request_path(url, min(n, 5_000))
    print(
        f"{name:<10} writer {plain:>7,.0f} records/s, {redacted:>7,.0f} with 2 redaction patterns; "
        f"store.write alone {ceiling:>7,.0f}/s\n"
        f"{'':<10} submit() p50 {path['submit_p50_us']:.2f} µs p99 {path['submit_p99_us']:.2f} µs; "
        f"without write-ahead p50 {path['memory_p50_us']:.2f} µs p99 {path['memory_p99_us']:.2f} µs; "
        f"no-op p50 {path['noop_p50_us']:.2f} µs p99 {path['noop_p99_us']:.2f} µs; "
        f"added p50 {path['added_p50_us']:.2f} µs"
    )


class _Discard:
    """A sink that keeps nothing: the pipeline with the request log off."""

    def submit(self, record: RequestRecord) -> None:
        return None

    def submit_span(self, span: SpanRecord) -> None:
        return None


def request_path(url: str, calls: int) -> None:
    """p50/p99 of one call through the whole pipeline (simulated deployment, no latency), with the
    request log (and spans) going to `url` through the writer, with and without its write-ahead
    file, and with them discarded; interleaved call by call, in one event loop."""

    async def measure() -> None:
        def config(store: str, write_ahead: bool = True) -> KeelConfig:
            return parse_config({"models": [{"name": "m", "deployments": [{"provider": "simulated"}]}],
                                 "store": {"url": store, "write_ahead": write_ahead}})

        on = Keel(config(url))
        memory = Keel(config(url, write_ahead=False))
        off_config = config(url)
        off = Keel(off_config, stages=[Observe(_Discard(), Tracing(off_config.tracing, _Discard()), on.metrics)])
        request = ChatRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": QUESTION}]})
        keels = [("on", on), ("memory", memory), ("off", off)]
        times: dict[str, list[float]] = {name: [] for name, _ in keels}
        async with on, memory, off:
            for i in range(calls + 200):
                for name, keel in keels[i % 3:] + keels[:i % 3]:  # each first in turn
                    started = time.perf_counter()
                    await keel.handle(request)
                    if i >= 200:  # warmed up
                        times[name].append((time.perf_counter() - started) * 1e6)
        p50 = {k: statistics.median(v) for k, v in times.items()}
        p99 = {k: statistics.quantiles(v, n=100)[98] for k, v in times.items()}
        print(f"{'':<10} request path, one call: log on p50 {p50['on']:.1f} µs p99 {p99['on']:.1f} µs; "
              f"without write-ahead p50 {p50['memory']:.1f} µs p99 {p99['memory']:.1f} µs; "
              f"log off p50 {p50['off']:.1f} µs p99 {p99['off']:.1f} µs; "
              f"added p50 {p50['on'] - p50['off']:+.1f} µs ({p50['memory'] - p50['off']:+.1f} without write-ahead), "
              f"p99 {p99['on'] - p99['off']:+.1f} µs ({p99['memory'] - p99['off']:+.1f})")

    asyncio.run(measure())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--records", type=int, default=50_000)
    parser.add_argument("--postgres", default=os.environ.get(
        "KEEL_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"), help="admin URL")
    parser.add_argument("--no-postgres", action="store_true")
    args = parser.parse_args()
    print(f"{args.records:,} records per run; Python {sys.version.split()[0]}, {os.cpu_count()} CPUs")
    with tempfile.TemporaryDirectory() as tmp:
        run("sqlite", f"sqlite:///{tmp}/log.db", args.records, Path(tmp))
        if not args.no_postgres:
            with postgres_database(args.postgres) as url:
                run("postgresql", url, args.records, Path(tmp))


if __name__ == "__main__":
    main()
