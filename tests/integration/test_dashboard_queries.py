"""The dashboard's query layer and the rollups under it, on SQLite and PostgreSQL: a differential test
(rollup-based figures against a plain computation over the raw rows of the same random log), the
rollups under replays, purges and the migration's back-fill, and the request search."""

from __future__ import annotations

import dataclasses
import math
import random
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.config import Config
from conftest import fresh_pg_database
from sqlalchemy import select

from keel.observability import queries, rollups, usage_rollups
from keel.observability.queries import Filters, Search, Window
from keel.observability.record import RequestRecord
from keel.observability.rollups import NOT_ATTEMPTED, RELATIVE_ERROR, request_minutes
from keel.observability.store import MIGRATIONS, RecordStore, request_row, requests
from keel.observability.usage_rollups import usage_hours

T0 = 1_790_000_000.0  # a fixed clock: minute-aligned, like any other instant
SPAN = 4 * 3600.0
OUTCOMES = ("ok", "ok", "ok", "ok", "cached", "error", "blocked", "rate_limited", "budget_exceeded", "invalid",
            "client_closed")


@pytest.fixture(scope="module")
def pg_database() -> Iterator[str]:
    with fresh_pg_database("keel_test_dash") as url:
        yield url


@pytest.fixture(params=["sqlite", "postgres"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/log.db"
        return
    pg: str = request.getfixturevalue("pg_database")
    yield pg
    store = RecordStore(pg)  # the module's database is shared by the tests: leave it empty
    with store.transaction("empty") as conn:
        conn.exec_driver_sql("DROP SCHEMA public CASCADE")
        conn.exec_driver_sql("CREATE SCHEMA public")
    store.close()


def logged(url: str, records: list[RequestRecord]) -> RecordStore:
    """A request log at `url` holding `records`, written by the store's own path (rollups included)."""
    store = RecordStore(url)
    store.migrate()
    store.write(records)
    return store


def random_records(n: int, seed: int) -> list[RequestRecord]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        outcome = rng.choice(OUTCOMES)
        started = T0 + rng.random() * SPAN
        latency = rng.lognormvariate(5.5, 1.0) + 1.0  # >= 1 ms: the histogram's floor is far below
        nanos = rng.randrange(0, 3_000_000)
        cache = rng.choice(("none", "none", "miss", "hit_exact", "hit_semantic", "bypass"))
        out.append(RequestRecord(
            request_id=f"req_{seed}_{i:05d}", started_at=started, ended_at=started + latency / 1000,
            tenant=rng.choice(("a", "b", None)), model=rng.choice(("m1", "m2", "m3")),
            feature=rng.choice(("f1", "f2", None)), user=f"u{rng.randrange(5)}", key_id=f"k{rng.randrange(3)}",
            outcome=outcome, latency_ms=latency, ttft_ms=latency * 0.4 if rng.random() < 0.5 else None,
            prompt_tokens=rng.randrange(1, 500), completion_tokens=rng.randrange(0, 300),
            cached_tokens=rng.randrange(0, 50), cost_nanousd=nanos, cost_usd=nanos / 1e9, cache_status=cache,
            cost_saved_usd=0.001 * rng.random() if cache.startswith("hit") else None,
            input=[{"role": "user", "content": f"question {i} about {rng.choice(('refunds', 'invoices', 'tea'))}"}],
            guardrails=[{"direction": "input", "check": "injection", "action": "block"}] * (outcome == "blocked"),
            status={"error": 502, "blocked": 400, "invalid": 400}.get(outcome, 200),
        ))
    return out


def raw_figures(records: list[RequestRecord], window: Window, filters: Filters) -> dict[str, Any]:
    """The plain computation: every figure straight from the records."""
    chosen = [r for r in records if window.since <= r.started_at < window.until
              and all(getattr(filters, n) is None or getattr(r, n) == getattr(filters, n)
                      for n in ("tenant", "model", "feature"))]
    attempted = [r for r in chosen if r.outcome not in NOT_ATTEMPTED]
    latencies = sorted(r.latency_ms for r in attempted)
    ttfts = sorted(r.ttft_ms for r in attempted if r.ttft_ms is not None)
    return {
        "requests": len(chosen), "attempted": len(attempted), "errors": sum(r.outcome == "error" for r in chosen),
        "outcomes": dict(sorted(Counter(r.outcome for r in chosen).items())),
        "prompt_tokens": sum(r.prompt_tokens for r in chosen),
        "completion_tokens": sum(r.completion_tokens for r in chosen),
        "cost_nanousd": sum(r.cost_nanousd for r in chosen), "cost_usd": sum(r.cost_usd for r in chosen),
        "cache_hits": sum(r.cache_status.startswith("hit") for r in chosen),
        "cache_misses": sum(r.cache_status == "miss" for r in chosen),
        "saved_usd": sum(r.cost_saved_usd or 0.0 for r in chosen),
        "p50": queries.percentile(latencies, 0.5), "p99": queries.percentile(latencies, 0.99),
        "ttft_p50": queries.percentile(ttfts, 0.5),
    }


def assert_same(found: queries.Figures, expected: dict[str, Any], exact: bool) -> None:
    assert found.requests == expected["requests"]
    assert found.attempted == expected["attempted"]
    assert found.errors == expected["errors"]
    assert found.outcomes == expected["outcomes"]
    for name in ("prompt_tokens", "completion_tokens", "cost_nanousd", "cache_hits", "cache_misses"):
        assert found.count(name) == expected[name], name
    assert found.cost_usd == pytest.approx(expected["cost_usd"], rel=1e-9, abs=1e-12)
    assert found.saved_usd == pytest.approx(expected["saved_usd"], rel=1e-9, abs=1e-12)
    for name, value in (("p50", found.p50_ms), ("p99", found.p99_ms), ("ttft_p50", found.ttft_p50_ms)):
        want = expected[name]
        if want is None:
            assert value is None
        elif exact:
            assert value == pytest.approx(want, rel=1e-12), name
        else:
            assert value is not None and abs(value - want) <= RELATIVE_ERROR * want + 1e-9, (name, value, want)


def random_windows(rng: random.Random) -> Iterator[tuple[Window, Filters]]:
    yield Window(T0 - 1, T0 + SPAN + 1), Filters()  # everything, hourly units
    yield Window(T0 + 37.5, T0 + 3 * 3600 + 611.25), Filters()  # every width and raw edges
    yield Window(T0 + 10, T0 + 50), Filters()  # inside one minute: raw only
    for _ in range(6):
        since = T0 + rng.random() * SPAN * 0.8
        until = since + rng.random() * (T0 + SPAN - since) + 1
        yield Window(since, until), Filters(tenant=rng.choice(("a", "b", None)), model=rng.choice(("m1", None)),
                                           feature=rng.choice(("f1", "f2", None)))


@pytest.mark.parametrize("exact", [True, False], ids=["exact", "histogram"])
def test_rollup_figures_equal_a_plain_computation_over_the_raw_rows(
    url: str, exact: bool, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(queries, "EXACT_LIMIT", 10**9 if exact else -1)
    records = random_records(3000, seed=1)
    store = RecordStore(url)
    store.migrate()
    for i in range(0, len(records), 700):  # batches that share minutes
        store.write(records[i:i + 700])
    store.write(records[100:900] + random_records(1, seed=99))  # a replay: its rows add nothing twice
    records += random_records(1, seed=99)
    rng = random.Random(5)
    with store.connection() as conn:
        for window, filters in random_windows(rng):
            found = queries.figures(conn, window, filters)
            assert_same(found, raw_figures(records, window, filters), exact)
            counted = queries.totals(conn, window, filters)  # the Cost page's: counts and sums only
            assert counted.agg.counts == found.agg.counts and counted.agg.sums == found.agg.sums
            assert counted.p50_ms is None
    store.close()


def test_the_series_buckets_are_the_figures_of_their_own_windows(
    url: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(queries, "EXACT_LIMIT", -1)  # the histograms of the rollups, per bucket
    records = random_records(1500, seed=2)
    store = logged(url, records)
    window = Window(T0 + 125.0, T0 + SPAN - 200.0)
    step = queries.choose_step(window)
    assert step == 60 and (window.until - window.since) / step <= queries.MAX_BUCKETS
    with store.connection() as conn:
        buckets = queries.series(conn, window, Filters(model="m2"), step)
        total = queries.figures(conn, window, Filters(model="m2"))
    assert sum(b.requests for b in buckets.values()) == total.requests
    assert sum(b.count("prompt_tokens") for b in buckets.values()) == total.count("prompt_tokens")
    for start in random.Random(3).sample(sorted(buckets), 10):
        part = Window(max(start, window.since), min(start + step, window.until))
        assert_same(buckets[start], raw_figures(records, part, Filters(model="m2")), exact=False)
    store.close()


def test_breakdowns_from_rollups_and_from_rows_equal_a_plain_group_by(url: str) -> None:
    records = random_records(1200, seed=3)
    store = logged(url, records)
    window = Window(T0 + 30.0, T0 + SPAN - 30.0)
    inside = [r for r in records if window.since <= r.started_at < window.until]
    with store.connection() as conn:
        for dimension, attribute in (("model", "model"), ("feature", "feature"), ("tenant", "tenant"),
                                     ("user", "user"), ("key", "key_id")):
            rows = {row.name: row for row in queries.usage(conn, dimension, window)}
            expected = Counter(getattr(r, attribute) for r in inside)
            assert {name: row.requests for name, row in rows.items()} == dict(expected), dimension
            for name, row in rows.items():
                mine = [r for r in inside if getattr(r, attribute) == name]
                tried = [r for r in mine if r.outcome not in NOT_ATTEMPTED]
                assert row.prompt_tokens == sum(r.prompt_tokens for r in mine)
                assert row.cost_usd == pytest.approx(sum(r.cost_usd for r in mine), rel=1e-9, abs=1e-12)
                assert row.latency_ms == pytest.approx(sum(r.latency_ms for r in tried) / len(tried), rel=1e-9)
                assert row.errors == sum(r.outcome == "error" for r in mine)
        cache = {row.model: row for row in queries.cache_usage(conn, window)}
    for model, row in cache.items():
        mine = [r for r in inside if r.model == model]
        assert row.hits == sum(r.cache_status.startswith("hit") for r in mine)
        assert row.bypasses == sum(r.cache_status == "bypass" for r in mine)
    store.close()


def stored_rollups(store: RecordStore) -> dict[tuple[Any, ...], dict[str, Any]]:
    with store.connection() as conn:
        rows = conn.execute(select(request_minutes)).mappings().all()
    return {tuple(row[k] for k in rollups.KEY_COLUMNS): {k: v for k, v in row.items() if k not in rollups.KEY_COLUMNS}
            for row in rows}


def expected_rollups(records: list[RequestRecord]) -> dict[tuple[Any, ...], dict[str, Any]]:
    return {key: agg.as_row() for key, agg in rollups.aggregate(request_row(r) for r in records).items()}


Rollups = dict[tuple[Any, ...], dict[str, Any]]


def assert_rollups(found: Rollups, expected: Rollups) -> None:
    assert found.keys() == expected.keys()
    for key, row in expected.items():
        for name, value in row.items():
            if isinstance(value, float):
                assert math.isclose(found[key][name], value, rel_tol=1e-9, abs_tol=1e-12), (key, name)
            else:
                assert found[key][name] == value, (key, name)


def test_a_purge_leaves_the_rollups_of_the_rows_left(url: str) -> None:
    records = random_records(800, seed=4)
    store = logged(url, records)
    cut = T0 + 5437.5  # inside an hour, a ten-minute unit and a minute
    store.purge(cut)
    assert_rollups(stored_rollups(store), expected_rollups([r for r in records if r.started_at >= cut]))
    store.close()


def log_at(store: RecordStore, revision: str, rows: list[dict[str, Any]]) -> None:
    """A log migrated only up to `revision`, holding `rows`: what an older Keel left before an upgrade."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    with store.engine.begin() as conn:
        config.attributes["connection"] = conn
        command.upgrade(config, revision)
        conn.execute(requests.insert(), rows)


def test_the_migration_back_fills_the_rollups_of_rows_logged_before_it(
    url: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    records = random_records(900, seed=5)
    store = RecordStore(url)
    later = ("cost_unpriced",)  # revision 0009
    log_at(store, "0007_evals", [{k: v for k, v in request_row(r).items() if k not in later}
                                 for r in records])  # as a log before 0008 holds them
    monkeypatch.setattr(rollups.backfill, "__defaults__", (250, None, None))  # chunks of 250 rows: many chunk edges
    store.migrate()
    assert_rollups(stored_rollups(store), expected_rollups(records))
    store.close()


# ---------------------------------------------------------------------------- search


def test_search_pages_newest_first_through_every_matching_row_once(url: str) -> None:
    records = random_records(600, seed=6)
    store = logged(url, records)
    window = Window(T0, T0 + SPAN)
    seen: list[str] = []
    before = None
    with store.connection() as conn:
        while True:
            ask = Search(outcome="ok", limit=37, before=before)
            page, before = queries.search(conn, window, Filters(tenant="a"), ask)
            seen += [row["request_id"] for row in page]
            assert all(row["outcome"] == "ok" for row in page)
            if before is None:
                break
    wanted = sorted((r for r in records if r.tenant == "a" and r.outcome == "ok"),
                    key=lambda r: (r.started_at, r.request_id), reverse=True)
    assert seen == [r.request_id for r in wanted]
    store.close()


def test_text_search_reads_a_bounded_scan_and_continues_further_back(
    url: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(queries, "SEARCH_SCAN", 100)
    records = random_records(500, seed=7)
    store = logged(url, records)
    window = Window(T0, T0 + SPAN)
    found: list[str] = []
    before = None
    pages = 0
    with store.connection() as conn:
        while True:
            page, before = queries.search(conn, window, Filters(), Search(q="TEA", limit=50, before=before))
            found += [row["request_id"] for row in page]
            pages += 1
            if before is None:
                break
        blocked, _ = queries.search(conn, window, Filters(), Search(guardrail="block", limit=500))
    wanted = sorted((r for r in records if "tea" in r.input[0]["content"]), key=lambda r: (r.started_at, r.request_id),
                    reverse=True)
    assert found == [r.request_id for r in wanted]
    assert pages >= 5  # 500 rows, 100 read per page
    assert {row["request_id"] for row in blocked} == {r.request_id for r in records if r.outcome == "blocked"}
    assert all(row["guardrail"] == "injection:block" for row in blocked)
    store.close()


def test_a_record_of_another_tenant_is_not_found(url: str) -> None:
    records = random_records(50, seed=8)
    store = logged(url, records)
    theirs = next(r for r in records if r.tenant == "b")
    with store.connection() as conn:
        assert queries.record(conn, theirs.request_id, "a") is None
        assert queries.record(conn, theirs.request_id, "b") is not None
        assert queries.record(conn, theirs.request_id, None) is not None
    store.close()


def test_writers_in_parallel_lose_no_increment(url: str) -> None:
    """Gateway replicas share one log: their batches land in the same rollup rows at once."""
    records = random_records(2400, seed=9)
    logged(url, []).close()
    stores = [RecordStore(url) for _ in range(4)]
    start = threading.Barrier(len(stores))
    failures: list[BaseException] = []

    def write(store: RecordStore, mine: list[RequestRecord]) -> None:
        try:
            start.wait()
            for i in range(0, len(mine), 50):
                store.write(mine[i:i + 50])
        except BaseException as exc:  # reported below, in the test's thread
            failures.append(exc)

    threads = [threading.Thread(target=write, args=(store, records[n::4])) for n, store in enumerate(stores)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    assert_rollups(stored_rollups(stores[0]), expected_rollups(records))
    assert_rollups(stored_usage(stores[0]), expected_usage(records))
    for store in stores:
        store.close()


# ---------------------------------------------------------------------------- spend by user, key, prompt


def with_prompts(records: list[RequestRecord], seed: int) -> list[RequestRecord]:
    """The records with users, keys and prompt versions (some without: stored under '')."""
    rng = random.Random(seed)
    out = []
    for record in records:
        prompt = rng.choice(("greet", "summary", None))
        out.append(dataclasses.replace(
            record, user=rng.choice(("u1", "u2", "u3", None)), key_id=rng.choice(("k1", "k2", None)),
            prompt=prompt, prompt_version=None if prompt is None else rng.choice(("1", "2")),
            # days as well as hours: the usage rollups' daily units
            started_at=record.started_at + rng.randrange(3) * 86_400.0,
        ))
    return out


def stored_usage(store: RecordStore) -> Rollups:
    with store.connection() as conn:
        rows = conn.execute(select(usage_hours)).mappings().all()
    return {tuple(row[k] for k in usage_rollups.KEY_COLUMNS):
            {k: v for k, v in row.items() if k not in usage_rollups.KEY_COLUMNS} for row in rows}


def expected_usage(records: list[RequestRecord]) -> Rollups:
    return {key: {k: v for k, v in usage_rollups.as_row(key, agg).items() if k not in usage_rollups.KEY_COLUMNS}
            for key, agg in usage_rollups.aggregate(request_row(r) for r in records).items()}


def plain_usage(records: list[RequestRecord], dimension: str) -> dict[str | None, dict[str, Any]]:
    """A plain group-by over the records: what usage() must answer."""
    out: dict[str | None, dict[str, Any]] = {}
    for r in records:
        name = {"user": r.user, "key": r.key_id,
                "prompt": f"{r.prompt}@{r.prompt_version}" if r.prompt else None}[dimension] or None
        row = out.setdefault(name, {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0, "cost_usd": 0.0,
                                    "errors": 0, "latencies": []})
        row["requests"] += 1
        row["prompt_tokens"] += r.prompt_tokens
        row["completion_tokens"] += r.completion_tokens
        row["cost_usd"] += r.cost_usd
        row["errors"] += r.outcome == "error"
        if r.outcome not in NOT_ATTEMPTED:
            row["latencies"].append(r.latency_ms)
    return out


def test_spend_by_user_key_and_prompt_from_the_rollup_equals_a_plain_group_by(url: str) -> None:
    records = with_prompts(random_records(2500, seed=11), seed=11)
    store = RecordStore(url)
    store.migrate()
    for i in range(0, len(records), 600):
        store.write(records[i:i + 600])
    store.write(records[300:700])  # a replay adds nothing twice
    rng = random.Random(12)
    windows = [(Window(T0 - 1, T0 + 3 * 86_400.0), None),  # whole days
               (Window(T0 + 1234.5, T0 + 2 * 86_400.0 + 5000.25), None)]  # days, hours and raw ends
    for _ in range(4):
        since = T0 + rng.random() * 2 * 86_400.0
        windows.append((Window(since, since + rng.random() * 86_400.0 + 60), rng.choice(("a", "b", None))))
    with store.connection() as conn:
        for window, tenant in windows:
            inside = [r for r in records if window.since <= r.started_at < window.until
                      and (tenant is None or r.tenant == tenant)]
            for dimension in usage_rollups.DIMENSIONS:
                found = {row.name: row for row in queries.usage(conn, dimension, window, Filters(tenant=tenant))}
                expected = plain_usage(inside, dimension)
                assert found.keys() == expected.keys(), (dimension, window)
                for name, want in expected.items():
                    row = found[name]
                    assert (row.requests, row.prompt_tokens, row.completion_tokens, row.errors) == (
                        want["requests"], want["prompt_tokens"], want["completion_tokens"], want["errors"])
                    assert row.cost_usd == pytest.approx(want["cost_usd"], rel=1e-9, abs=1e-12)
                    lat = want["latencies"]
                    assert row.latency_ms == (pytest.approx(sum(lat) / len(lat), rel=1e-9) if lat else None)
        # Filtered by model: read from `requests`, the same answer as a plain group-by.
        window = Window(T0, T0 + 3 * 86_400.0)
        by_model = {row.name: row.requests for row in queries.usage(conn, "user", window, Filters(model="m1"))}
        assert by_model == {name: row["requests"] for name, row in plain_usage(
            [r for r in records if r.model == "m1" and window.since <= r.started_at < window.until], "user").items()}
    assert_rollups(stored_usage(store), expected_usage(records))
    store.close()


def test_a_purge_leaves_the_usage_rollups_of_the_rows_left(url: str) -> None:
    records = with_prompts(random_records(900, seed=13), seed=13)
    store = logged(url, records)
    # Hourly purges, as the writer runs them: inside a day and an hour, later in the same day (its daily
    # unit is the sum of its hours left), the next day.
    for cut in (T0 + 86_400.0 + 5437.5, T0 + 86_400.0 + 9000.25, T0 + 2 * 86_400.0 + 100.0):
        store.purge(cut)
        left = [r for r in records if r.started_at >= cut]
        assert_rollups(stored_usage(store), expected_usage(left))
    store.write(records)  # the purged rows come back (a spool replayed): counted once again
    assert_rollups(stored_usage(store), expected_usage(records))
    store.close()


def test_the_migration_back_fills_the_usage_rollups_of_rows_logged_before_it(
    url: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    records = with_prompts(random_records(900, seed=14), seed=14)
    store = RecordStore(url)
    log_at(store, "0009_unpriced_alerts", [request_row(r) for r in records])  # as a log before 0010 holds them
    monkeypatch.setattr(usage_rollups.backfill, "__defaults__", (250,))  # chunks of 250 rows: many chunk edges
    store.migrate()
    assert_rollups(stored_usage(store), expected_usage(records))
    store.close()
