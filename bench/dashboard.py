"""The dashboard's queries over a large request log: the Overview and Cost documents and the request search.

    .venv/bin/python bench/dashboard.py [--rows 1000000] [--loads 20] [--postgres URL | --no-postgres]
                                        [--keep DIR]

Fills a request log with --rows calls spread over the 7 days before now (3 tenants, 4 models,
6 features, 2,000 users, 40 keys, 4 prompts at 3 versions in 3 calls of 5, messages of ~250
characters in and ~150 out, realistic outcomes, cache use, guardrail verdicts, streams with a time
to first token; one call in 20,000 mentions 'zanzibar'), through `RecordStore.write` in batches
of 10,000: the writer's own path, which adds the rollups in the same transactions. Then times,
p50, p90 and p99 over --loads runs each:
- the Overview document (`keel.dashboard.api.overview_json`: SLO table, totals, series) over the
  last hour, the last 24 h and the whole 7 d, and over 7 d filtered by one model;
- the Cost document (`keel.dashboard.api.cost_json`: spend by feature, model, user, key and prompt
  version, the forecast) over the last 24 h and 7 d, and 7 d of one tenant;
- the request search (`keel.observability.queries.search`, a page of 50): the newest calls, by
  model and outcome, text search for a common word, for a rare word, and for a word in no call
  (the bounded scan: SEARCH_SCAN rows at most, then a `next` cursor).
Targets (issue 15): Overview and Cost <= 1 s and search <= 500 ms (p50) at 1,000,000 calls.
SQLite is a file in a temporary directory (or --keep DIR, reused when it holds --rows calls);
PostgreSQL a database made for the run and dropped after (with --keep: `keel_bench_dashboard`,
kept and reused). Figures, not asserts: a shared 2-core machine moves them.
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import func, select

from keel.config import SLOConfig
from keel.dashboard.api import cost_json, overview_json
from keel.observability import queries
from keel.observability.queries import Filters, Search, Window
from keel.observability.store import RecordStore, requests

DAY = 86_400.0
TENANTS = ("acme", "globex", "initech")
MODELS = ("chat", "chat-large", "fast", "reasoning")
FEATURES = ("search", "support", "summarise", "classify", "agent", "autocomplete")
WORDS = (
    "order refund invoice shipping account password reset delivery package tracking return policy "
    "warranty battery screen laptop phone charger cable subscription plan upgrade cancel billing "
    "address payment card bank transfer status delayed customer support agent manager question "
    "answer please thanks hello problem issue error broken working update install setting help"
).split()
RARE = "zanzibar"


PROMPTS = ("support-answer", "summary", "triage", "agent-step")


def prompt_of(rng: random.Random) -> dict[str, str | None]:
    """Three calls in five rendered from a prompt template, at one of its three versions."""
    if rng.random() < 0.4:
        return {"prompt": None, "prompt_version": None}
    return {"prompt": rng.choice(PROMPTS), "prompt_version": str(rng.randint(1, 3))}


def make_rows(n: int, until: float, seed: int = 7) -> Iterator[list[dict[str, Any]]]:
    """n calls over the 7 days before `until`, oldest first, in batches of 10,000 rows."""
    rng = random.Random(seed)
    since = until - 7 * DAY
    batch: list[dict[str, Any]] = []
    for i in range(n):
        started = since + (until - since) * (i + rng.random()) / n
        model = rng.choices(MODELS, (50, 20, 25, 5))[0]
        roll = rng.random()
        outcome = ("ok" if roll < 0.86 else "cached" if roll < 0.93 else "error" if roll < 0.95
                   else "blocked" if roll < 0.965 else "rate_limited" if roll < 0.985
                   else "budget_exceeded" if roll < 0.99 else "invalid" if roll < 0.995 else "client_closed")
        cache = ("hit_exact" if outcome == "cached" and rng.random() < 0.7 else
                 "hit_semantic" if outcome == "cached" else rng.choice(("miss", "miss", "none", "bypass")))
        refused = outcome in ("blocked", "rate_limited", "budget_exceeded", "invalid")
        latency = 1.0 + rng.random() * 3 if refused or outcome == "cached" else rng.lognormvariate(6.3, 0.6)
        stream = rng.random() < 0.4
        words = [rng.choice(WORDS) for _ in range(rng.randint(25, 50))]
        if rng.random() < 1 / 20_000:
            words[rng.randrange(len(words))] = RARE
        prompt_tokens = len(words) * 2 + 30
        completion = 0 if refused else rng.randint(20, 400)
        nanos = 0 if refused or outcome == "cached" else prompt_tokens * 150 + completion * 600
        verdicts = ([{"direction": "input", "check": "injection", "action": "block", "score": 0.97}]
                    if outcome == "blocked" else
                    [{"direction": "input", "check": "pii", "action": "redact", "entities": ["email"]}]
                    if rng.random() < 0.03 else [])
        request_id = f"req_{i:08d}"
        batch.append({
            "request_id": request_id, "started_at": started, "ended_at": started + latency / 1000,
            "endpoint": "chat", "trace_id": f"{i:032x}", "span_id": f"{i:016x}", "key_id": f"key_{rng.randrange(40)}",
            "user": f"user{rng.randrange(2000)}", "feature": rng.choice(FEATURES), "model": model,
            "deployment": model + "-primary", "upstream_model": model, "system_fingerprint": None, "stream": stream,
            "attempts": 0 if refused else 1, "fallbacks": 0, "attempt_log": [], "cache_status": cache,
            "guardrails": verdicts, "input": [{"role": "user", "content": " ".join(words)}],
            "output": None if refused else {"role": "assistant", "content": " ".join(rng.choices(WORDS, k=25))},
            "metadata": None, "prompt_tokens": prompt_tokens, "completion_tokens": completion, "cached_tokens": 0,
            "cost_usd": nanos / 1e9, "cost_nanousd": nanos, "cost_estimated": False, "cost_unpriced": False,
            "latency_ms": latency,
            "ttft_ms": latency * 0.3 if stream and not refused else None, "upstream_ms": None,
            "status": {"ok": 200, "cached": 200, "error": 502, "blocked": 400, "rate_limited": 429,
                       "budget_exceeded": 429, "invalid": 400, "client_closed": 499}[outcome],
            "outcome": outcome, "error_type": None, "error_message": None, "spans": [],
            "tenant": rng.choice(TENANTS), "cost_saved_usd": 0.0004 if cache.startswith("hit") else None,
            "dialect": "chat.completions", **prompt_of(rng),
        })
        if len(batch) == 10_000:
            yield batch
            batch = []
    if batch:
        yield batch


def fill(store: RecordStore, n: int, until: float) -> float:
    store.migrate()
    with store.connection() as conn:
        have = conn.execute(select(func.count()).select_from(requests)).scalar() or 0
        newest = conn.execute(select(func.max(requests.c.started_at))).scalar()
    if have == n and newest is not None:
        print(f"  reusing {have:,} calls")
        return float(newest) + 1
    if have:
        sys.exit(f"{store.safe_url} holds {have:,} calls, not {n:,}: remove it or pass another --keep")
    started = time.perf_counter()
    for i, batch in enumerate(make_rows(n, until)):
        store.write(batch)
        if i % 20 == 19:
            print(f"  {(i + 1) * len(batch):,} calls written ({time.perf_counter() - started:.0f} s)", flush=True)
    print(f"  {n:,} calls written with their rollups in {time.perf_counter() - started:.0f} s")
    if store.dialect == "postgresql":  # what autovacuum would do soon after such a load: fresh statistics
        with store.transaction("analyse") as conn:
            conn.exec_driver_sql("ANALYZE requests")
            conn.exec_driver_sql("ANALYZE request_minutes")
            conn.exec_driver_sql("ANALYZE usage_hours")
    return until


def timed(fn: Callable[[], Any], loads: int) -> tuple[float, float, float]:
    """p50, p90 and p99 (nearest rank: of 20 loads, the slowest) in ms."""
    fn()  # warm the caches once: what a dashboard's second load sees
    times = []
    for _ in range(loads):
        started = time.perf_counter()
        fn()
        times.append((time.perf_counter() - started) * 1000)
    times.sort()
    return (statistics.median(times), times[math.ceil(0.9 * len(times)) - 1],
            times[math.ceil(0.99 * len(times)) - 1])


def measure(store: RecordStore, until: float, loads: int) -> None:
    slo = SLOConfig()
    overviews = {
        "overview, last hour": (Window(until - 3600, until), Filters()),
        "overview, last 24 h": (Window(until - DAY, until), Filters()),
        "overview, 7 d (every call)": (Window(until - 7 * DAY - 60, until), Filters()),
        "overview, 7 d, model=chat-large": (Window(until - 7 * DAY - 60, until), Filters(model="chat-large")),
    }
    print(f"  {'query':<44} {'p50 ms':>9} {'p90 ms':>9} {'p99 ms':>9}")
    for name, (window, filters) in overviews.items():
        found = timed(lambda w=window, f=filters: overview_json(store, w, f, slo), loads)  # type: ignore[misc]
        print(f"  {name:<44} {found[0]:>9.1f} {found[1]:>9.1f} {found[2]:>9.1f}", flush=True)
    costs = {
        "cost page, last 24 h": (Window(until - DAY, until), Filters()),
        "cost page, 7 d (every call)": (Window(until - 7 * DAY - 60, until), Filters()),
        "cost page, 7 d, tenant=acme": (Window(until - 7 * DAY - 60, until), Filters(tenant="acme")),
    }
    for name, (window, filters) in costs.items():
        found = timed(lambda w=window, f=filters: cost_json(store, w, f, until), loads)  # type: ignore[misc]
        print(f"  {name:<44} {found[0]:>9.1f} {found[1]:>9.1f} {found[2]:>9.1f}", flush=True)
    week = Window(until - 7 * DAY - 60, until)
    searches = {
        "search: newest 50": (Filters(), Search()),
        "search: model=fast, outcome=error": (Filters(model="fast"), Search(outcome="error")),
        "search: user=user42": (Filters(), Search(user="user42")),
        "search: q=refund (common)": (Filters(), Search(q="refund")),
        f"search: q={RARE} (1 in 20,000)": (Filters(), Search(q=RARE)),
        "search: q=nowhere (no call)": (Filters(), Search(q="nowhere-at-all")),
    }
    for name, (filters, ask) in searches.items():
        def run(f: Filters = filters, a: Search = ask) -> None:
            with store.connection() as conn:
                queries.search(conn, week, f, a)
        found = timed(run, loads)
        print(f"  {name:<44} {found[0]:>9.1f} {found[1]:>9.1f} {found[2]:>9.1f}", flush=True)


@contextmanager
def pg_database(admin_url: str, keep: bool) -> Iterator[str]:
    import psycopg
    from sqlalchemy.engine import make_url

    name = "keel_bench_dashboard" if keep else f"keel_bench_dash_{random.randrange(16**8):08x}"
    conn = psycopg.connect(admin_url, autocommit=True)
    exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
    if not exists:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    finally:
        if not keep:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--loads", type=int, default=20)
    parser.add_argument("--postgres", default="postgresql://postgres@127.0.0.1:5432/postgres",
                        help="an admin URL: a database is made for the run and dropped after")
    parser.add_argument("--no-postgres", action="store_true")
    parser.add_argument("--no-sqlite", action="store_true")
    parser.add_argument("--keep", type=Path, help="keep (and reuse) the SQLite file here and the PostgreSQL database")
    args = parser.parse_args()
    now = time.time()
    if not args.no_sqlite:
        with tempfile.TemporaryDirectory() as tmp:
            where = args.keep or Path(tmp)
            where.mkdir(parents=True, exist_ok=True)
            store = RecordStore(f"sqlite:///{where / 'dashboard.db'}")
            print(f"SQLite, {args.rows:,} calls")
            until = fill(store, args.rows, now)
            measure(store, until, args.loads)
            store.close()
    if not args.no_postgres:
        with pg_database(args.postgres, args.keep is not None) as url:
            store = RecordStore(url)
            print(f"PostgreSQL, {args.rows:,} calls")
            until = fill(store, args.rows, now)
            measure(store, until, args.loads)
            store.close()


if __name__ == "__main__":
    main()
