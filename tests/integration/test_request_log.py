"""The request log: store, migrations, batched writer, spool and replay, redaction, retention.

Every store test runs on SQLite and on the real PostgreSQL (a database of its own, dropped
at the end; skipped locally when PostgreSQL is not running, a failure in CI).
"""

from __future__ import annotations

import errno
import importlib.util
import logging
import os
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, get_args

import orjson
import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from conftest import free_port, fresh_pg_database
from sqlalchemy import MetaData, Table, inspect, select, text
from sqlalchemy.engine import make_url

import keel.auth.store
import keel.budgets.pending_alerts
import keel.dialects.response_store
import keel.evals.tables  # their tables on the request log's metadata, as the gateway has them
from keel.config import StoreConfig
from keel.observability import queries
from keel.observability.queries import Window
from keel.observability.record import Outcome, RequestRecord, SpanRecord
from keel.observability.store import (
    MIGRATIONS,
    REQUEST_FIELDS,
    VERSION_TABLE,
    RecordStore,
    StoreError,
    StoreUnavailable,
    metadata,
    request_row,
    requests,
)
from keel.observability.write_ahead import SegmentEnd, WriteAhead
from keel.observability.writer import REDACTED, RecordWriter, Spool, spool_line
from keel.testing.tcp_proxy import TcpProxy

HEAD = ScriptDirectory(str(MIGRATIONS)).get_current_head()  # the newest migration, whatever it is

STATUS = {"ok": 200, "cached": 200, "error": 502, "blocked": 400, "rate_limited": 429,
          "budget_exceeded": 429, "client_closed": 499, "invalid": 400}


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def pg_database() -> Iterator[str]:
    """A database of this module's own on the real PostgreSQL, dropped afterwards."""
    with fresh_pg_database("keel_test") as url:
        yield url


@pytest.fixture(params=["sqlite", "postgres"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty store: a new SQLite file, or the PostgreSQL test database with its schema emptied."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/log.db"
    import psycopg

    database: str = request.getfixturevalue("pg_database")
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute("DROP SCHEMA public CASCADE")
        conn.execute("CREATE SCHEMA public")
    return database


@pytest.fixture
def stores() -> Iterator[Callable[[str], RecordStore]]:
    opened: list[RecordStore] = []

    def open_store(url: str) -> RecordStore:
        store = RecordStore(url, connect_timeout_s=2)
        opened.append(store)
        return store

    yield open_store
    for store in opened:
        store.close()


def test_a_worker_spools_to_its_own_file_and_replays_those_of_workers_that_are_gone(
    url: str, writers: WriterFactory, tmp_path: Path,
) -> None:
    # keel serve --workers N: each worker its own spool file; a killed worker's file is replayed by
    # the next worker to start, never one of a worker still running.
    line = lambda i: orjson.dumps({"kind": "request", "row": record(i).as_dict()}) + b"\n"  # noqa: E731
    gone = subprocess.Popen(["true"])
    gone.wait()
    running = subprocess.Popen(["sleep", "30"])
    try:
        (tmp_path / f"spool.jsonl.worker-{gone.pid}").write_bytes(b"".join(line(i) for i in range(5)))
        (tmp_path / "spool.jsonl").write_bytes(b"".join(line(i) for i in range(5, 10)))  # a one-process run's
        theirs = tmp_path / f"spool.jsonl.worker-{running.pid}"
        kept = line(10)
        theirs.write_bytes(kept)
        writer, store = writers(url, start=False)
        writer.spool = Spool.of_worker(tmp_path / "spool.jsonl")
        assert writer.spool.path == tmp_path / f"spool.jsonl.worker-{os.getpid()}"
        writer.start()
        wait_until(lambda: writer.replayed == 10)
        writer.close()
        assert ids(store) == [f"req_ok_{i:05d}" for i in range(10)]
        assert spool_files(tmp_path) == [theirs] and theirs.read_bytes() == kept
    finally:
        running.kill()
        running.wait()


WriterFactory = Callable[..., tuple[RecordWriter, RecordStore]]


@pytest.fixture
def writers(stores: Callable[[str], RecordStore], tmp_path: Path) -> Iterator[WriterFactory]:
    """`writer, store = writers(url, start=True, **store_config)`: fast flushes and retries."""
    made: list[RecordWriter] = []

    def make(url: str, *, start: bool = True, options: dict[str, Any] | None = None, **settings: Any) -> tuple[
        RecordWriter, RecordStore
    ]:
        config = StoreConfig(**{"url": url, "spool_path": str(tmp_path / "spool.jsonl"),
                                "flush_interval_ms": 20, **settings})
        store = stores(url)
        writer = RecordWriter(store, config, **{"retry_initial_s": 0.05, "retry_max_s": 0.2, **(options or {})})
        made.append(writer)
        if start:
            writer.start()
        return writer, store

    yield make
    for writer in made:
        writer.close(timeout=5)


def record(i: int, outcome: Outcome = "ok", **fields: Any) -> RequestRecord:
    """A record with every field set, different per i and outcome."""
    started = time.time() - 60 + i / 1000
    failed = outcome not in ("ok", "cached")
    values: dict[str, Any] = dict(
        request_id=f"req_{outcome}_{i:05d}",
        started_at=started,
        ended_at=started + 0.25,
        endpoint="chat" if i % 5 else "embeddings",
        trace_id=f"{i:032x}",
        span_id=f"{i:016x}",
        key_id=f"key_{i % 2}",
        user=f"user{i % 3}",
        feature=f"feature{i % 4}",
        model="chat",
        deployment="openai/gpt-4o-mini",
        upstream_model="gpt-4o-mini-2024-07-18",
        system_fingerprint=f"fp_{i}",
        stream=i % 2 == 0,
        attempts=1 + i % 3,
        fallbacks=i % 2,
        attempt_log=[{"deployment": "openai/gpt-4o-mini", "error": "timeout" if failed else None, "ms": 12.5}],
        cache_status="hit_exact" if outcome == "cached" else "miss",
        guardrails=[{"check": "pii", "verdict": "blocked" if outcome == "blocked" else "pass"}],
        input=[{"role": "system", "content": "be brief"}, {"role": "user", "content": f"question {i} é ✓"}],
        output=None if failed else {"role": "assistant", "content": f"answer {i}"},
        metadata={"tag": f"t{i}", "n": i},
        prompt_tokens=10 + i,
        completion_tokens=0 if failed else 5 + i,
        cached_tokens=i % 4,
        cost_usd=0.0 if failed else 0.000123 * (i + 1),
        cost_estimated=i % 3 == 0,
        latency_ms=100.5 + i,
        ttft_ms=None if failed else 20.25 + i,
        upstream_ms=None if outcome in ("blocked", "rate_limited", "budget_exceeded", "invalid") else 80.0 + i,
        status=STATUS[outcome],
        outcome=outcome,
        error_type=outcome if failed else None,
        error_message=f"{outcome} happened" if failed else None,
    )
    values.update(fields)
    return RequestRecord(**values)


def span(i: int, trace_id: str, **fields: Any) -> SpanRecord:
    values: dict[str, Any] = dict(
        trace_id=trace_id, span_id=f"{i:016x}", parent_id=None if i == 0 else f"{0:016x}", name=f"step {i}",
        started_at=time.time() - 60 + i, ended_at=time.time() - 59 + i, status="ok",
        attributes={"keel.model": "chat", "i": i}, request_id=f"req_{i}",
    )
    values.update(fields)
    return SpanRecord(**values)


def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)


def ids(store: RecordStore) -> list[str]:
    return [row["request_id"] for row in store.records(0)]


def spool_files(tmp_path: Path) -> list[Path]:
    """The spool and any claimed part of it (not the file of rejected rows)."""
    return sorted(p for p in tmp_path.glob("spool.jsonl*") if not p.name.endswith(".rejected"))


# ---------------------------------------------------------------------------- schema and store


def test_migrations_create_the_schema_from_empty(url: str, stores: Callable[[str], RecordStore]) -> None:
    store = stores(url)
    assert not store.has_schema()
    store.migrate()
    store.migrate()  # a second run changes nothing
    assert store.has_schema()
    with store.engine.connect() as conn:
        differences = compare_metadata(MigrationContext.configure(conn), metadata)
        assert [d for d in differences if not (d[0] == "remove_table" and d[1].name == VERSION_TABLE)] == []
        assert conn.execute(text(f"SELECT version_num FROM {VERSION_TABLE}")).scalar_one() == HEAD
        indexed = {tuple(ix["column_names"]) for ix in inspect(conn).get_indexes("requests")}
    assert {("started_at",), ("feature",), ("model",), ("user",), ("trace_id",)} <= indexed
    assert [c.name for c in requests.columns] == list(REQUEST_FIELDS)


def _alembic(store: RecordStore, action: str, revision: str) -> None:
    """`alembic upgrade|downgrade REVISION` on the store, as `RecordStore.migrate()` runs it."""
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    with store.engine.begin() as conn:
        config.attributes["connection"] = conn
        getattr(command, action)(config, revision)


def test_a_log_at_0002_with_rows_upgrades_and_its_old_rows_read_with_no_cost_saved(
    url: str, stores: Callable[[str], RecordStore]
) -> None:
    store = stores(url)
    _alembic(store, "upgrade", "0002_virtual_keys")
    old_rows = [record(1), record(2, "cached")]
    with store.engine.begin() as conn:
        before = Table("requests", MetaData(), autoload_with=conn)
        assert "cost_saved_usd" not in before.c and "tenant" in before.c
        later = ("cost_saved_usd", "dialect", "prompt", "prompt_version", "cost_unpriced")  # 0003, 0005, 0006, 0009
        conn.execute(before.insert(), [{k: v for k, v in request_row(r).items() if k not in later}
                                       for r in old_rows])
    store.migrate()
    with store.engine.connect() as conn:
        assert conn.execute(text(f"SELECT version_num FROM {VERSION_TABLE}")).scalar_one() == HEAD
        differences = compare_metadata(MigrationContext.configure(conn), metadata)
        assert [d for d in differences if not (d[0] == "remove_table" and d[1].name == VERSION_TABLE)] == []
    read = {row["request_id"]: row for row in store.records(0)}
    for old in old_rows:
        row = read[old.request_id]
        assert row["cost_saved_usd"] is None
        assert (row["cost_usd"], row["prompt_tokens"], row["cache_status"], row["input"]) == (
            pytest.approx(old.cost_usd), old.prompt_tokens, old.cache_status, old.input,
        )
    store.write([record(3, "cached", cost_saved_usd=0.0042)])
    assert {row["request_id"]: row["cost_saved_usd"] for row in store.records(0)} == {
        "req_ok_00001": None, "req_cached_00002": None, "req_cached_00003": pytest.approx(0.0042),
    }
    _alembic(store, "downgrade", "0002_virtual_keys")  # and back: the column goes, the rows stay
    with store.engine.connect() as conn:
        assert "cost_saved_usd" not in {c["name"] for c in inspect(conn).get_columns("requests")}
        assert conn.execute(text("SELECT count(*) FROM requests")).scalar_one() == 3
        assert ("tenant",) in {tuple(ix["column_names"]) for ix in inspect(conn).get_indexes("requests")}
    store.migrate()
    assert [row["cost_saved_usd"] for row in store.records(0)] == [None, None, None]


def test_a_log_at_0008_upgrades_its_old_rows_to_priced_and_counts_unpriced_ones_by_a_partial_index(
    url: str, stores: Callable[[str], RecordStore]
) -> None:
    store = stores(url)
    _alembic(store, "upgrade", "0008_request_minutes")
    with store.engine.begin() as conn:
        before = Table("requests", MetaData(), autoload_with=conn)
        assert "cost_unpriced" not in before.c
        conn.execute(before.insert(), [{k: v for k, v in request_row(record(1)).items() if k != "cost_unpriced"}])
    store.migrate()
    store.write([record(2, cost_unpriced=True, deployment="mystery"), record(3)])
    assert {row["request_id"]: row["cost_unpriced"] for row in store.records(0)} == {
        "req_ok_00001": False, "req_ok_00002": True, "req_ok_00003": False}
    with store.engine.connect() as conn:
        assert ("started_at",) in {tuple(ix["column_names"]) for ix in inspect(conn).get_indexes("requests")
                                   if ix["name"] == "ix_requests_unpriced"}
        window = Window(0, time.time() + 1)
        assert queries.unpriced(conn, window) == {"mystery": 1}
    _alembic(store, "downgrade", "0008_request_minutes")
    with store.engine.connect() as conn:
        assert "cost_unpriced" not in {c["name"] for c in inspect(conn).get_columns("requests")}
        assert conn.execute(text("SELECT count(*) FROM requests")).scalar_one() == 3
    store.migrate()
    assert [row["cost_unpriced"] for row in store.records(0)] == [False, False, False]


def test_migrations_ship_as_package_modules() -> None:
    # An installed wheel holds Python packages only (package-data lists py.typed alone).
    for module in ("keel.observability.migrations", "keel.observability.migrations.versions"):
        assert importlib.util.find_spec(module) is not None
    spec = importlib.util.find_spec("keel.observability.migrations")
    assert spec is not None and spec.origin is not None
    folder = Path(spec.origin).parent
    assert (folder / "env.py").exists() and list((folder / "versions").glob("0001_*.py"))


def test_writes_are_idempotent_on_request_id(url: str, stores: Callable[[str], RecordStore]) -> None:
    store = stores(url)
    store.migrate()
    batch = [record(i) for i in range(5)]
    store.write(batch, [span(0, "a" * 32)])
    store.write([*batch, record(5)], [span(0, "a" * 32), span(1, "a" * 32)])
    store.write([record(6), record(6)])  # twice in one batch, too
    assert ids(store) == [f"req_ok_{i:05d}" for i in range(7)]
    assert [s["span_id"] for s in store.spans("a" * 32)] == [f"{0:016x}", f"{1:016x}"]


def test_an_in_memory_log_is_used_by_many_threads_at_once_without_crashing_sqlite() -> None:
    """`sqlite:///:memory:` is one connection shared by every thread; sqlite3 crashed with
    "SystemError: ... returned NULL without setting an exception" (CI, stop 22) when the alert
    sender released its rows while the writer wrote. Its users take turns."""
    store = RecordStore("sqlite:///:memory:")
    store.migrate()
    start = threading.Barrier(6)
    failures: list[BaseException] = []

    def writer(first: int) -> None:
        start.wait()
        try:
            for i in range(first, first + 60):
                store.write([record(i)], [span(i, f"{i:032x}")])
                with store.connection() as conn:
                    conn.execute(select(text("count(*)")).select_from(text("requests"))).scalar_one()
        except BaseException as exc:  # the test reports what any thread met
            failures.append(exc)

    threads = [threading.Thread(target=writer, args=(n * 1000,)) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    assert len(ids(store)) == 6 * 60

def test_unreachable_postgres_is_store_unavailable_saying_what_to_check() -> None:
    store = RecordStore(f"postgresql://postgres:secret@127.0.0.1:{free_port()}/keel", connect_timeout_s=1)
    with pytest.raises(StoreUnavailable) as caught:
        store.write([record(1)])
    message = str(caught.value)
    assert "check that PostgreSQL is running and reachable at 127.0.0.1:" in message
    assert "secret" not in message
    store.close()


def test_unusable_sqlite_file_is_store_unavailable_naming_the_path(tmp_path: Path) -> None:
    (tmp_path / "log.db").mkdir()  # a directory where the file should be
    store = RecordStore(f"sqlite:///{tmp_path}/log.db")
    with pytest.raises(StoreUnavailable, match=r"check that the directory of .*log\.db exists and is writable"):
        store.migrate()
    store.close()


def test_unsupported_url_is_refused_with_the_forms_to_use() -> None:
    with pytest.raises(StoreError, match=r"use sqlite:///PATH or postgresql://"):
        RecordStore("mysql://root@localhost/keel")


# ---------------------------------------------------------------------------- the writer


def test_every_outcome_becomes_one_row_with_its_fields(url: str, writers: WriterFactory) -> None:
    writer, store = writers(url)
    submitted = [record(i, outcome) for outcome in get_args(Outcome) for i in range(3)]
    for rec in submitted:
        writer.submit(rec)
    trace = "f" * 32
    spans = [span(i, trace) for i in range(3)]
    for s in spans:
        writer.submit_span(s)
    writer.close()
    rows = {row["request_id"]: row for row in store.records(0)}
    assert len(rows) == len(submitted) == 3 * len(get_args(Outcome))
    for rec in submitted:
        assert rows[rec.request_id] == rec.as_dict()
    assert store.spans(trace) == [s.as_dict() for s in spans]
    assert writer.stats() == {"written": len(submitted) + 3, "spooled": 0, "replayed": 0, "dropped": 0,
                              "queue_depth": 0, "store_available": True}


def test_records_filter_by_window_feature_tenant_and_limit(url: str, stores: Callable[[str], RecordStore]) -> None:
    store = stores(url)
    store.migrate()
    store.write([record(i, started_at=1000.0 + i) for i in range(20)])
    assert len(store.records(1005, 1010)) == 5
    assert {r["feature"] for r in store.records(0, feature="feature1")} == {"feature1"}
    assert {r["key_id"] for r in store.records(0, key_id="key_0")} == {"key_0"}
    newest = store.records(0, limit=3, newest_first=True)
    assert [r["started_at"] for r in newest] == [1019.0, 1018.0, 1017.0]


def test_submit_returns_before_anything_is_written(url: str, writers: WriterFactory) -> None:
    writer, store = writers(url, flush_interval_ms=60_000, batch_size=1000)
    writer.submit(record(1))
    assert writer.queue_depth == 1 and writer.written == 0
    assert writer.flush()
    assert ids(store) == ["req_ok_00001"]


def test_close_flushes_everything_queued(url: str, writers: WriterFactory, tmp_path: Path) -> None:
    writer, store = writers(url, flush_interval_ms=60_000, batch_size=10_000)
    for i in range(250):
        writer.submit(record(i))
    for i in range(10):
        writer.submit_span(span(i, "c" * 32))
    writer.close()
    assert len(ids(store)) == 250 and len(store.spans("c" * 32)) == 10
    assert writer.written == 260 and writer.queue_depth == 0
    # After close nothing is lost either: it goes to the spool, replayed when the writer starts again.
    writer.submit(record(999))
    assert writer.spooled == 1
    assert b"req_ok_00999" in (tmp_path / "spool.jsonl").read_bytes()
    writer.start()
    wait_until(lambda: writer.replayed == 1)
    assert "req_ok_00999" in ids(store) and spool_files(tmp_path) == []


def test_full_queue_spools_and_everything_reaches_the_store(url: str, writers: WriterFactory, tmp_path: Path) -> None:
    spooled: list[tuple[int, str]] = []
    on_spool = lambda n, why: spooled.append((n, why))  # noqa: E731
    writer, store = writers(url, start=False, queue_size=5, options={"on_spool": on_spool})
    for i in range(20):
        writer.submit(record(i))
    assert writer.queue_depth == 5 and writer.spooled == 15 and writer.dropped == 0
    assert spooled == [(1, "queue_full")] * 15
    assert len((tmp_path / "spool.jsonl").read_bytes().splitlines()) == 15
    writer.start()
    writer.close()
    assert sorted(ids(store)) == sorted(f"req_ok_{i:05d}" for i in range(20))
    assert writer.written == 5 and writer.replayed == 15 and writer.dropped == 0
    assert spool_files(tmp_path) == []


def test_a_record_that_cannot_even_be_spooled_is_counted_logged_and_reported(
    url: str, writers: WriterFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "spool-dir").mkdir()
    dropped: list[tuple[int, str]] = []
    writer, store = writers(url, start=False, queue_size=2, spool_path=str(tmp_path / "spool-dir"),
                            options={"on_drop": lambda n, why: dropped.append((n, why))})
    with caplog.at_level(logging.ERROR, logger="keel.request_log"):
        for i in range(5):
            writer.submit(record(i))
    assert writer.dropped == 3 and dropped == [(1, "queue_full")] * 3
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 3 and "dropped (queue_full)" in errors[0] and "spool-dir" in errors[0]
    writer.start()
    writer.close()
    assert len(ids(store)) == 2


def test_postgres_outage_spools_then_replays_exactly_once(
    writers: WriterFactory, pg_database: str, tmp_path: Path
) -> None:
    import psycopg

    with psycopg.connect(pg_database, autocommit=True) as conn:
        conn.execute("DROP SCHEMA public CASCADE")
        conn.execute("CREATE SCHEMA public")
    target = make_url(pg_database)
    proxy = TcpProxy((target.host or "127.0.0.1", target.port or 5432)).start()
    try:
        writer, _ = writers(proxy.url(pg_database))
        for i in range(10):
            writer.submit(record(i))
        assert writer.flush() and writer.written == 10

        proxy.stop()  # the database goes away, with the writer's open connections
        for i in range(10, 30):
            writer.submit(record(i))
        assert writer.flush()
        assert writer.spooled == 20 and not writer.store_available
        assert sum(len(p.read_bytes().splitlines()) for p in spool_files(tmp_path)) == 20

        proxy.start()
        wait_until(lambda: writer.replayed == 20)
        writer.close()
    finally:
        proxy.stop()
    direct = RecordStore(pg_database)
    try:
        assert sorted(ids(direct)) == sorted(f"req_ok_{i:05d}" for i in range(30))
    finally:
        direct.close()
    assert writer.dropped == 0 and spool_files(tmp_path) == []


def test_sqlite_outage_spools_then_migrates_and_replays(writers: WriterFactory, tmp_path: Path) -> None:
    in_the_way = tmp_path / "log.db"
    in_the_way.mkdir()  # the database file cannot be opened
    writer, store = writers(f"sqlite:///{in_the_way}")
    for i in range(15):
        writer.submit(record(i))
    assert writer.flush()
    assert writer.spooled == 15 and writer.written == 0 and not writer.store_available
    in_the_way.rmdir()
    wait_until(lambda: writer.replayed == 15)
    assert sorted(ids(store)) == sorted(f"req_ok_{i:05d}" for i in range(15))
    assert spool_files(tmp_path) == [] and writer.dropped == 0


def test_a_replay_cut_short_is_finished_without_duplicates(
    url: str, writers: WriterFactory, stores: Callable[[str], RecordStore], tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A previous process died mid-replay: its claimed file holds rows 0-9, of which 0-4 reached the
    # store; the main spool holds rows 10-14 and ends in a line cut by the crash.
    first = stores(url)
    first.migrate()
    first.write([record(i) for i in range(5)])
    gone = subprocess.Popen(["true"])
    gone.wait()
    line = lambda i: orjson.dumps({"kind": "request", "row": record(i).as_dict()}) + b"\n"  # noqa: E731
    (tmp_path / f"spool.jsonl.replaying-{gone.pid}").write_bytes(b"".join(line(i) for i in range(10)))
    (tmp_path / "spool.jsonl").write_bytes(b"".join(line(i) for i in range(10, 15)) + b'{"kind": "requ')
    with caplog.at_level(logging.ERROR, logger="keel.request_log"):
        writer, store = writers(url)
        wait_until(lambda: writer.replayed == 15)
        writer.close()
    assert ids(store) == [f"req_ok_{i:05d}" for i in range(15)]
    assert writer.dropped == 1 and any("spool_corrupt" in r.getMessage() for r in caplog.records)
    assert spool_files(tmp_path) == []


def test_postgres_refusing_a_row_drops_that_row_only(
    writers: WriterFactory, pg_database: str, caplog: pytest.LogCaptureFixture
) -> None:
    import psycopg

    with psycopg.connect(pg_database, autocommit=True) as conn:
        conn.execute("DROP SCHEMA public CASCADE")
        conn.execute("CREATE SCHEMA public")
    dropped: list[tuple[int, str]] = []
    writer, store = writers(pg_database, options={"on_drop": lambda n, why: dropped.append((n, why))})
    for i in range(4):
        writer.submit(record(i))
    writer.submit(record(4, prompt_tokens="many"))  # type: ignore[arg-type]  # a bug upstream of the writer
    with caplog.at_level(logging.ERROR, logger="keel.request_log"):
        writer.close()
    assert ids(store) == [f"req_ok_{i:05d}" for i in range(4)]
    assert dropped == [(1, "rejected")] and writer.written == 4
    assert any("req_ok_00004" in r.getMessage() and "spool.jsonl.rejected" in r.getMessage() for r in caplog.records)


def test_a_row_the_driver_cannot_send_is_dropped_while_the_rest_are_written(
    url: str, writers: WriterFactory, tmp_path: Path
) -> None:
    # The driver's error reads like an outage, but the store answers: the row is at fault, so it
    # is dropped (counted) rather than retried from the spool for ever, holding up the others.
    dropped: list[tuple[int, str]] = []
    writer, store = writers(url, options={"on_drop": lambda n, why: dropped.append((n, why))})
    writer.submit(record(1))
    writer.submit(record(2, attempts=object()))
    writer.submit(record(3))
    writer.close()
    assert ids(store) == ["req_ok_00001", "req_ok_00003"]
    assert dropped == [(1, "rejected")] and writer.spooled == 0 and spool_files(tmp_path) == []
    (kept,) = (tmp_path / "spool.jsonl.rejected").read_bytes().splitlines()
    assert orjson.loads(kept)["row"]["request_id"] == "req_ok_00002"  # for a person to look at


def test_a_spool_append_that_runs_out_of_room_part_way_leaves_only_whole_lines(tmp_path: Path) -> None:
    # A full disk (here: a file size limit, which fails a write the same way, part-way) must not leave
    # a cut line: the next append would join it, and the record it holds could not be read back.
    spool = tmp_path / "spool.jsonl"
    script = f"""
import resource
from keel.observability.writer import Spool
resource.setrlimit(resource.RLIMIT_FSIZE, (3000, 3000))  # Python ignores SIGXFSZ: writes fail with EFBIG
spool = Spool({str(spool)!r})
spool.append([b"a" * 999 + b"\\n"])
try:
    spool.append([b"b" * 4999 + b"\\n"])  # room for 2000 bytes of it
except OSError as exc:
    print(exc.errno)
spool.append([b"c" * 999 + b"\\n"])
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [str(errno.EFBIG)]
    assert spool.read_bytes().splitlines() == [b"a" * 999, b"c" * 999]


def test_spool_appends_from_many_threads_survive_concurrent_replays(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool.jsonl")
    read: list[bytes] = []
    stop = threading.Event()

    def append(n: int) -> None:
        for i in range(300):
            spool.append([b"%d-%d\n" % (n, i)])

    def replay() -> None:
        while True:
            done = stop.is_set()
            while (claimed := spool.claim()) is not None:
                read.extend(claimed.read_bytes().splitlines())
                claimed.unlink()
            if done:
                return

    replayer = threading.Thread(target=replay)
    replayer.start()
    appenders = [threading.Thread(target=append, args=(n,)) for n in range(4)]
    for thread in appenders:
        thread.start()
    for thread in appenders:
        thread.join()
    stop.set()
    replayer.join()
    assert sorted(read) == sorted(b"%d-%d" % (n, i) for n in range(4) for i in range(300))


def test_spool_appends_from_other_processes_survive_concurrent_replays(tmp_path: Path) -> None:
    # Several workers on one machine share the spool file: only the flock keeps them apart.
    path = tmp_path / "spool.jsonl"
    script = (
        "import sys\n"
        "from keel.observability.writer import Spool\n"
        "spool = Spool(sys.argv[1])\n"
        "for i in range(400):\n"
        "    spool.append([b'%s-%d\\n' % (sys.argv[2].encode(), i)])\n"
    )
    workers = [subprocess.Popen([sys.executable, "-c", script, str(path), tag]) for tag in ("a", "b")]
    spool = Spool(path)
    read: list[bytes] = []
    while True:
        done = all(worker.poll() is not None for worker in workers)
        while (claimed := spool.claim()) is not None:
            read.extend(claimed.read_bytes().splitlines())
            claimed.unlink()
        if done:
            break
    assert [worker.returncode for worker in workers] == [0, 0]
    assert sorted(read) == sorted(b"%s-%d" % (tag, i) for tag in (b"a", b"b") for i in range(400))


# ---------------------------------------------------------------------------- write-ahead


def write_ahead_files(tmp_path: Path) -> list[Path]:
    return sorted(tmp_path.glob("spool.jsonl.wal-*"))


def lines_of(path: Path) -> list[dict[str, Any]]:
    """A segment's lines: up to its unused end, which is zeros."""
    return [orjson.loads(line) for line in path.read_bytes().split(b"\0", 1)[0].splitlines()]


SECRET = "sk-" + "a1" * 12  # an API key the built-in redaction replaces


def test_a_submitted_record_is_on_disk_before_it_is_written_and_its_file_goes_once_it_is(
    url: str, writers: WriterFactory, tmp_path: Path,
) -> None:
    writer, store = writers(url, flush_interval_ms=60_000, batch_size=1000)
    assert writer.flush()  # the writer's first round is done: it writes nothing more until asked
    submitted = [record(i, input=[{"role": "user", "content": f"my key is {SECRET}"}]) for i in range(5)]
    step = span(0, "e" * 32)
    for rec in submitted:
        writer.submit(rec)
    writer.submit_span(step)
    assert writer.written == 0 and ids(store) == []
    (segment,) = write_ahead_files(tmp_path)
    assert segment.stat().st_mode & 0o777 == 0o600  # unredacted yet: for this user only
    # The spool's line of each record as submitted, in order.
    assert lines_of(segment) == [orjson.loads(spool_line("request", request_row(rec))) for rec in submitted] + [
        orjson.loads(spool_line("span", step.as_dict()))]
    assert writer.flush()
    assert sorted(ids(store)) == [rec.request_id for rec in submitted] and len(store.spans("e" * 32)) == 1
    assert {row["input"][0]["content"] for row in store.records(0)} == {f"my key is {REDACTED}"}
    assert write_ahead_files(tmp_path) == []


KILLED_WRITER = """
import sys, threading
import orjson
from keel.config import StoreConfig
from keel.observability.record import RequestRecord, SpanRecord
from keel.observability.store import RecordStore
from keel.observability.writer import RecordWriter

url, spool, submitted = sys.argv[1], sys.argv[2], orjson.loads(open(sys.argv[3], "rb").read())
writer = RecordWriter(RecordStore(url), StoreConfig(url=url, spool_path=spool, flush_interval_ms=600_000,
                                                    batch_size=10_000))
writer.start()
assert writer.flush()  # its first round is done: it would write nothing more for ten minutes
for row in submitted["records"]:
    writer.submit(RequestRecord(**row))
for row in submitted["spans"]:
    writer.submit_span(SpanRecord(**row))
print("submitted", flush=True)
threading.Event().wait()
"""


def test_a_writer_killed_before_its_flush_loses_nothing_once_another_starts(
    url: str, writers: WriterFactory, stores: Callable[[str], RecordStore], tmp_path: Path,
) -> None:
    submitted = [record(i, input=[{"role": "user", "content": f"key {SECRET}"}]) for i in range(40)]
    spans = [span(i, "f" * 32) for i in range(3)]
    batch = tmp_path / "batch.json"
    batch.write_bytes(orjson.dumps({"records": [r.as_dict() for r in submitted],
                                    "spans": [s.as_dict() for s in spans]}))
    killed = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, url, str(tmp_path / "spool.jsonl"), str(batch)],
                              stdout=subprocess.PIPE)
    try:
        assert killed.stdout is not None and killed.stdout.readline() == b"submitted\n"
    finally:
        killed.kill()
        killed.wait()
    store = stores(url)
    assert ids(store) == []  # none was written: they were in its memory, and in its write-ahead file
    (segment,) = write_ahead_files(tmp_path)
    assert segment.name.startswith(f"spool.jsonl.wal-{killed.pid}.") and len(lines_of(segment)) == 43
    store.write(submitted[:10])  # say a batch of them had been written, and the kill came before its file went

    writer, _ = writers(url)
    wait_until(lambda: writer.replayed == 43)
    assert writer.flush()
    assert sorted(ids(store)) == [r.request_id for r in submitted]  # each once
    assert [s["span_id"] for s in store.spans("f" * 32)] == [s.span_id for s in spans]
    # Redacted as they were replayed (the 10 written "before the kill" were stored as given).
    assert {row["input"][0]["content"] for row in store.records(0)[10:]} == {f"key {REDACTED}"}
    assert write_ahead_files(tmp_path) == [] and spool_files(tmp_path) == [] and writer.dropped == 0


def test_a_running_writer_adopts_the_write_ahead_file_of_a_process_killed_beside_it(
    url: str, writers: WriterFactory, stores: Callable[[str], RecordStore], tmp_path: Path,
) -> None:
    """Not only a writer that starts: one already running looks again every orphan_scan_s."""
    writer, store = writers(url, options={"orphan_scan_s": 0.05})
    assert writer.flush()  # its start-up scan is done, before the other process exists
    submitted = [record(i) for i in range(12)]
    batch = tmp_path / "batch.json"
    batch.write_bytes(orjson.dumps({"records": [r.as_dict() for r in submitted], "spans": []}))
    killed = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, url, str(tmp_path / "spool.jsonl"), str(batch)],
                              stdout=subprocess.PIPE)
    try:
        assert killed.stdout is not None and killed.stdout.readline() == b"submitted\n"
        assert writer.replayed == 0  # alive: its file is its own
    finally:
        killed.kill()
        killed.wait()
    wait_until(lambda: writer.replayed == 12)
    assert sorted(ids(store)) == [r.request_id for r in submitted]
    assert [p for p in write_ahead_files(tmp_path) if f"wal-{killed.pid}." in p.name] == []  # adopted, then gone


def test_only_the_write_ahead_files_of_processes_that_are_gone_are_replayed(
    url: str, writers: WriterFactory, tmp_path: Path,
) -> None:
    line = lambda i: spool_line("request", request_row(record(i)))  # noqa: E731
    gone = subprocess.Popen(["true"])
    gone.wait()
    running = subprocess.Popen(["sleep", "30"])
    try:
        (tmp_path / f"spool.jsonl.wal-{gone.pid}.0a0a0a0a.1").write_bytes(b"".join(line(i) for i in range(3)))
        # This process's pid, but no writer of it: an earlier process that had the pid (a container restarted).
        (tmp_path / f"spool.jsonl.wal-{os.getpid()}.1b1b1b1b.4").write_bytes(line(3) + line(4))
        theirs = tmp_path / f"spool.jsonl.wal-{running.pid}.2c2c2c2c.1"
        theirs.write_bytes(line(5))
        writer, store = writers(url)
        wait_until(lambda: writer.replayed == 5)
        writer.close()
        assert sorted(ids(store)) == [f"req_ok_{i:05d}" for i in range(5)]
        assert write_ahead_files(tmp_path) == [theirs]
    finally:
        running.kill()
        running.wait()


def test_a_full_segment_is_ended_by_the_record_that_does_not_fit(tmp_path: Path) -> None:
    ahead = WriteAhead(tmp_path / "spool.jsonl", segment_bytes=4096)
    queue: deque[Any] = deque()
    lines = [b"%d %s\n" % (i, b"x" * 1500) for i in range(3)] + [b"long %s\n" % (b"y" * 9000)]
    for i, line in enumerate(lines):
        ahead.append(line, i, queue)
    ahead.rotate(queue)
    first, second, third = sorted(write_ahead_files(tmp_path), key=lambda p: int(p.name.rsplit(".", 1)[1]))
    # Two lines fit in the first 4 KB; the third starts a segment; the long one gets one of its own (12 KB).
    assert [type(entry).__name__ for entry in queue] == ["int", "int", "SegmentEnd", "int", "SegmentEnd", "int",
                                                          "SegmentEnd"]
    assert [entry.path for entry in queue if isinstance(entry, SegmentEnd)] == [first, second, third]
    contents = [path.read_bytes().split(b"\0", 1)[0] for path in (first, second, third)]
    assert contents == [lines[0] + lines[1], lines[2], lines[3]]
    assert [path.stat().st_size for path in (first, second, third)] == [4096, 4096, 12288]
    for entry in queue:
        if isinstance(entry, SegmentEnd):
            entry.set()
    assert write_ahead_files(tmp_path) == []


def test_with_write_ahead_off_a_queued_record_is_in_memory_only(
    url: str, writers: WriterFactory, tmp_path: Path,
) -> None:
    writer, store = writers(url, write_ahead=False, flush_interval_ms=60_000, batch_size=1000)
    assert writer.flush()
    writer.submit(record(1))
    assert writer.queue_depth == 1 and list(tmp_path.glob("spool.jsonl*")) == []
    assert writer.flush() and ids(store) == ["req_ok_00001"]


def test_a_write_ahead_file_that_cannot_be_made_leaves_records_in_memory_and_says_so_once(
    url: str, writers: WriterFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    (tmp_path / "a-file").write_text("")
    writer, store = writers(url, spool_path=str(tmp_path / "a-file" / "spool.jsonl"))
    with caplog.at_level(logging.ERROR, logger="keel.request_log"):
        for i in range(3):
            writer.submit(record(i))
        assert writer.flush()
    assert sorted(ids(store)) == [f"req_ok_{i:05d}" for i in range(3)] and writer.dropped == 0
    errors = [r.getMessage() for r in caplog.records if "write-ahead" in r.getMessage()]
    assert len(errors) == 1 and "a-file" in errors[0] and "records wait in memory only" in errors[0]


# ---------------------------------------------------------------------------- content policy


def test_redaction_replaces_matches_in_stored_and_spooled_content(
    url: str, writers: WriterFactory, tmp_path: Path
) -> None:
    writer, store = writers(url, start=False, queue_size=1,
                            redact=[r"sk-[A-Za-z0-9]{8,}", r"\b\d{3}-\d{2}-\d{4}\b"])
    secret_input = [{"role": "user", "content": "my key is sk-abcdef123456 and my SSN 123-45-6789"}]
    for i in range(2):  # the second overflows to the spool: redacted before it touches the disk
        writer.submit(record(i, input=secret_input, output={"role": "assistant", "content": "SSN 987-65-4321 noted"}))
    assert b"sk-abcdef" not in (tmp_path / "spool.jsonl").read_bytes()
    writer.start()
    writer.close()
    rows = store.records(0)
    assert len(rows) == 2
    for row in rows:
        assert row["input"] == [{"role": "user", "content": f"my key is {REDACTED} and my SSN {REDACTED}"}]
        assert row["output"] == {"role": "assistant", "content": f"SSN {REDACTED} noted"}
        assert row["user"] in ("user0", "user1")


def test_log_content_false_keeps_everything_but_the_content(url: str, writers: WriterFactory) -> None:
    writer, store = writers(url, log_content=False)
    writer.submit(record(7))
    writer.close()
    (row,) = store.records(0)
    assert row["input"] is None and row["output"] is None
    assert row["prompt_tokens"] == 17 and row["user"] == "user1" and row["cost_usd"] == record(7).cost_usd


def test_content_over_the_limit_is_cut(url: str, writers: WriterFactory) -> None:
    writer, store = writers(url, max_content_chars=50)
    messages = [{"role": "user", "content": "a" * 40}, {"role": "user", "content": "b" * 40}]
    writer.submit(record(1, input=messages, output={"role": "assistant", "content": "c" * 100}))
    writer.close()
    (row,) = store.records(0)
    # Every string counts, in order: "user" + 40 + "user" = 48, so 2 characters of the second fit.
    assert row["input"] == [{"role": "user", "content": "a" * 40}, {"role": "user", "content": "bb…[cut 38 chars]"}]
    assert row["output"] == {"role": "assistant", "content": "c" * 41 + "…[cut 59 chars]"}


def test_nul_characters_do_not_cost_the_record(url: str, writers: WriterFactory) -> None:
    writer, store = writers(url)
    writer.submit(record(1, input=[{"role": "user", "content": "a\x00b"}], error_message="bad\x00byte"))
    writer.close()
    (row,) = store.records(0)
    assert row["input"] == [{"role": "user", "content": "a\ufffdb"}] and row["error_message"] == "bad\ufffdbyte"
    assert writer.dropped == 0


# ---------------------------------------------------------------------------- retention


def test_store_purge_deletes_records_spans_and_stored_responses_before_the_cutoff(
    url: str, stores: Callable[[str], RecordStore]
) -> None:
    store = stores(url)
    store.migrate()
    store.write([record(i, started_at=1000.0 + i) for i in range(10)],
                [span(i, "d" * 32, started_at=1000.0 + i) for i in range(10)])
    stored = keel.dialects.response_store.stored_responses
    with store.engine.begin() as conn:  # stored Responses API answers hold content too: they go with the records
        conn.execute(stored.insert(), [{"id": f"resp_{i}", "tenant": None, "created_at": 1000.0 + i,
                                        "request_id": f"req_{i}", "model": "m", "messages": [],
                                        "response": {}} for i in range(10)])
    assert store.purge(1004.0) == 4
    assert len(ids(store)) == 6 and len(store.spans("d" * 32)) == 6
    with store.engine.connect() as conn:
        assert sorted(conn.execute(select(stored.c.id)).scalars()) == [f"resp_{i}" for i in range(4, 10)]


def test_retention_task_purges_records_older_than_retention_days(url: str, writers: WriterFactory) -> None:
    old = time.time() - 40 * 86_400
    writer, store = writers(url, retention_days=30, start=False, options={"retention_interval_s": 0.05})
    store.migrate()
    store.write([record(i, started_at=old + i) for i in range(3)])
    writer.start()
    writer.submit(record(10))
    wait_until(lambda: ids(store) == ["req_ok_00010"])
    store.write([record(i, started_at=old + i) for i in range(3, 5)])  # and again on the next round
    wait_until(lambda: ids(store) == ["req_ok_00010"])
