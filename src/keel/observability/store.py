"""The request log store: one SQLAlchemy Core schema on SQLite (the default) or PostgreSQL.

`requests` holds one row per `RequestRecord`, `spans` one row per `SpanRecord`. Writes are
idempotent (a row whose key is already stored is skipped), so a batch replayed from the
spool after an outage never duplicates. The schema is created and upgraded by the Alembic
revisions shipped in `keel/observability/migrations`, run by `RecordStore.migrate()`.

Errors are of two kinds, because the writer treats them differently: `StoreUnavailable`
(the database cannot be reached or used: spool and retry later) and `RecordRejected` (the
database refused the data itself: retrying the same rows would fail again).
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import logging
import os
import re
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any

import orjson
from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    Connection,
    Engine,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    delete,
    event,
    false,
    inspect,
    select,
    text,
)
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects import sqlite
from sqlalchemy.engine import URL, make_url
from sqlalchemy.pool import StaticPool

from keel.observability.record import RequestRecord, SpanRecord

MIGRATIONS = Path(__file__).with_name("migrations")
# Its own version table, so other Keel schemas (eval runs, caches) can share the database.
VERSION_TABLE = "keel_request_log_version"
# pg_advisory_xact_lock key: replicas starting together run the migrations one at a time.
_MIGRATION_LOCK = 0x6B65656C  # "keel"

# JSON, not JSONB, on PostgreSQL too: the log is written far more than it is searched, and JSONB's
# parsing cost the server ~30% of its write rate (bench/log_store.py). Cast (`input::jsonb`) to query.
# None is SQL NULL, not JSON null.
JSONColumn = JSON(none_as_null=True)

metadata = MetaData()

# Other tables of this database whose rows hold call content and go with the records at retention
# (`purge`): each by its time column in unix seconds. Their modules register them (`retained`).
_RETAINED: list[Column[float]] = []


def retained(column: Column[float]) -> None:
    """Purge the rows of `column`'s table whose `column` (unix seconds) is older than the records kept."""
    _RETAINED.append(column)


# Strings carry no length: PostgreSQL would refuse a longer value, and a refused row is a lost one.
requests = Table(
    "requests",
    metadata,
    Column("request_id", String, primary_key=True),
    Column("started_at", Float, nullable=False),
    Column("ended_at", Float, nullable=False),
    Column("endpoint", String, nullable=False),
    Column("trace_id", String),
    Column("span_id", String),
    Column("key_id", String),
    Column("user", String),
    Column("feature", String),
    Column("model", String),
    Column("deployment", String),
    Column("upstream_model", String),
    Column("system_fingerprint", String),
    Column("stream", Boolean, nullable=False),
    Column("attempts", Integer, nullable=False),
    Column("fallbacks", Integer, nullable=False),
    Column("attempt_log", JSONColumn),
    Column("cache_status", String, nullable=False),
    Column("guardrails", JSONColumn),
    Column("input", JSONColumn),
    Column("output", JSONColumn),
    Column("metadata", JSONColumn),
    Column("prompt_tokens", Integer, nullable=False),
    Column("completion_tokens", Integer, nullable=False),
    Column("cached_tokens", Integer, nullable=False),
    Column("cost_usd", Float, nullable=False),
    Column("cost_nanousd", BigInteger, nullable=False),  # exact: budget counters add these up
    Column("cost_estimated", Boolean, nullable=False),
    Column("latency_ms", Float, nullable=False),
    Column("ttft_ms", Float),
    Column("upstream_ms", Float),
    Column("status", Integer, nullable=False),
    Column("outcome", String, nullable=False),
    Column("error_type", String),
    Column("error_message", Text),
    Column("spans", JSONColumn),  # the call's own spans; other spans (chains) are rows of `spans`
    Column("tenant", String),  # the virtual key's tenant (revision 0002)
    Column("cost_saved_usd", Float),  # a cache hit's cost when stored; null when not a hit (revision 0003)
    Column("dialect", String),  # the API the client spoke; null in-process (revision 0005)
    Column("prompt", String),  # the prompt template's name and version (revision 0006)
    Column("prompt_version", String),
    # A deployment that answered has no known price: its cost is unknown (revision 0009).
    Column("cost_unpriced", Boolean, nullable=False, server_default=false()),
    Index("ix_requests_started_at", "started_at"),
    Index("ix_requests_feature", "feature"),
    Index("ix_requests_model", "model"),
    Index("ix_requests_user", "user"),
    Index("ix_requests_trace_id", "trace_id"),
    Index("ix_requests_tenant", "tenant"),
    Index("ix_requests_prompt", "prompt"),
    # Partial: the report counts a window's unpriced calls by reading these rows only.
    Index("ix_requests_unpriced", "started_at", sqlite_where=text("cost_unpriced"),
          postgresql_where=text("cost_unpriced")),
)

# The primary key (trace_id, span_id) is the index on trace_id that trace look-ups use.
spans = Table(
    "spans",
    metadata,
    Column("trace_id", String, primary_key=True),
    Column("span_id", String, primary_key=True),
    Column("parent_id", String),
    Column("name", String, nullable=False),
    Column("started_at", Float, nullable=False),
    Column("ended_at", Float, nullable=False),
    Column("status", String, nullable=False),
    Column("attributes", JSONColumn),
    Column("request_id", String),
    Index("ix_spans_started_at", "started_at"),
)

REQUEST_FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(RequestRecord))
SPAN_FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(SpanRecord))


class StoreError(Exception):
    """A request log store problem; the message says what to check."""


class StoreUnavailable(StoreError):
    """The store cannot be reached or used right now (server down, file locked, schema missing)."""


class RecordRejected(StoreError):
    """The database refused the rows themselves; writing them again would fail again."""


def request_row(record: RequestRecord) -> dict[str, Any]:
    """A record as a `requests` row: a shallow copy (no deep `asdict`), one key per column."""
    return {name: getattr(record, name) for name in REQUEST_FIELDS}


def span_row(span: SpanRecord) -> dict[str, Any]:
    return {name: getattr(span, name) for name in SPAN_FIELDS}


_MIGRATING = threading.Lock()


@contextmanager
def _exclusive_file(path: Path) -> Iterator[None]:
    """Hold an flock on `path` and delete the file on release. A waiter that wins the lock on a
    file already deleted (its inode no longer at `path`) opens the path again, so two processes
    never hold locks on two different files at once."""
    while True:
        with open(path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                current = os.stat(path).st_ino
            except FileNotFoundError:
                current = None
            if current != os.fstat(lock.fileno()).st_ino:
                continue  # deleted by the previous holder while this one waited: the lock is stale
            try:
                yield
            finally:
                path.unlink(missing_ok=True)  # before the unlock: a waiter then sees its lock is stale
            return


@contextmanager
def _quiet_alembic() -> Iterator[None]:
    """Alembic logs each plugin and migration step at INFO; at every start that is noise. Its
    logger says only warnings while it runs (unless someone set its level on purpose)."""
    alembic = logging.getLogger("alembic")
    if alembic.level != logging.NOTSET:
        yield
        return
    alembic.setLevel(logging.WARNING)
    try:
        yield
    finally:
        alembic.setLevel(logging.NOTSET)


class RecordStore:
    """The request log in one database: `RecordStore("sqlite:///keel.db")` or a PostgreSQL URL.

    Thread-safe: the writer thread writes while the dashboard and `keel report` read.
    """

    def __init__(self, url: str, *, connect_timeout_s: float = 5.0) -> None:
        self.url = url
        self._url = _driver_url(url)
        self.dialect: str = self._url.get_backend_name()
        self.path: Path | None = _sqlite_path(self._url) if self.dialect == "sqlite" else None
        self.engine: Engine = _engine(self._url, self.path, connect_timeout_s)
        # An in-memory SQLite database is one connection shared by every thread (StaticPool), and
        # sqlite3 crashes when two threads use one connection at once: its users take turns.
        self._turns: AbstractContextManager[Any] = (
            threading.RLock() if self.dialect == "sqlite" and self.path is None else nullcontext()
        )
        self._requests = _Inserter(requests, self.engine)
        self._spans = _Inserter(spans, self.engine)

    @property
    def safe_url(self) -> str:
        """The URL with any password hidden: fit for logs and error messages."""
        return self._url.render_as_string(hide_password=True)

    def migrate(self) -> None:
        """Create the schema, or upgrade it to the newest revision (`alembic upgrade head`)."""
        with _quiet_alembic():
            from alembic import command
            from alembic.config import Config

        config = Config()
        # ConfigParser interpolation: a literal % in the path must be doubled.
        config.set_main_option("script_location", str(MIGRATIONS).replace("%", "%%"))
        with (
            self._migration_lock(), _quiet_alembic(), self._translated("create or upgrade the schema of"),
            self._begin() as conn,
        ):
            if self.dialect == "postgresql":
                conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK})
            config.attributes["connection"] = conn
            command.upgrade(config, "head")

    @contextmanager
    def _migration_lock(self) -> Iterator[None]:
        """SQLite has no advisory lock: two writers (threads or processes) opening one new file
        would both create the tables. A file lock beside the database serialises them, and is
        deleted by its holder, so none is left behind."""
        if self.path is None:
            with _MIGRATING:
                yield
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with _MIGRATING, _exclusive_file(self.path.with_name(self.path.name + ".migrate-lock")):
            yield

    def has_schema(self) -> bool:
        """Whether the tables exist (also a cheap probe of the connection)."""
        with self.connection() as conn:
            return inspect(conn).has_table("requests")

    @contextmanager
    def connection(self) -> Iterator[Connection]:
        """A connection for reading (reports, the dashboard); failures come out as `StoreError`s."""
        with self._translated("read"), self._turns, self.engine.connect() as conn:
            yield conn

    @contextmanager
    def transaction(self, doing: str) -> Iterator[Connection]:
        """A connection in a transaction, committed when the block ends; failures as `StoreError`s
        saying what could not be done (`doing`: "revoke a key in")."""
        with self._translated(doing), self._begin() as conn:
            yield conn

    @contextmanager
    def _begin(self) -> Iterator[Connection]:
        with self._turns, self.engine.begin() as conn:
            yield conn

    def write(
        self,
        records: Sequence[RequestRecord | Mapping[str, Any]],
        spans: Sequence[SpanRecord | Mapping[str, Any]] = (),
    ) -> None:
        """Insert records and spans in one transaction; rows already stored are skipped.

        Rows are `RequestRecord`/`SpanRecord` objects or mappings keyed by column (JSON columns
        hold Python values); what the writer passes is the latter, already redacted.
        """
        request_rows = [request_row(r) if isinstance(r, RequestRecord) else r for r in records]
        span_rows = [span_row(s) if isinstance(s, SpanRecord) else s for s in spans]
        if not request_rows and not span_rows:
            return
        with self._translated("write to"), self._begin() as conn:
            if request_rows:
                # The rollups count the rows actually inserted: a replayed row adds nothing twice.
                inserted = self._requests.insert(conn, request_rows)
                rollups.apply(conn, rollups.aggregate(inserted))
                usage_rollups.apply(conn, usage_rollups.aggregate(inserted))
            if span_rows:
                self._spans.insert(conn, span_rows)

    def purge(self, older_than: float) -> int:
        """Delete records (and spans, rollups and the `retained` tables' rows) that started before
        `older_than` (unix seconds); returns the number of records deleted."""
        with self._translated("purge old records from"), self._begin() as conn:
            deleted = conn.execute(delete(requests).where(requests.c.started_at < older_than)).rowcount
            conn.execute(delete(spans).where(spans.c.started_at < older_than))
            for column in _RETAINED:
                conn.execute(delete(column.table).where(column < older_than))
            rollups.purge(conn, older_than)
            usage_rollups.purge(conn, older_than)
        return int(deleted)

    def records(
        self,
        since: float,
        until: float | None = None,
        feature: str | None = None,
        limit: int | None = None,
        *,
        key_id: str | None = None,
        tenant: str | None = None,
        newest_first: bool = False,
    ) -> list[dict[str, Any]]:
        """Records that started in [since, until), oldest first unless `newest_first`; one dict
        per record, keyed like `RequestRecord`. `key_id` keeps one key's records only, `tenant`
        one tenant's."""
        query = select(requests).where(requests.c.started_at >= since)
        if until is not None:
            query = query.where(requests.c.started_at < until)
        if feature is not None:
            query = query.where(requests.c.feature == feature)
        if key_id is not None:
            query = query.where(requests.c.key_id == key_id)
        if tenant is not None:
            query = query.where(requests.c.tenant == tenant)
        order = requests.c.started_at.desc() if newest_first else requests.c.started_at
        query = query.order_by(order, requests.c.request_id)
        if limit is not None:
            query = query.limit(limit)
        with self.connection() as conn:
            return [dict(row) for row in conn.execute(query).mappings()]

    def spans(self, trace_id: str) -> list[dict[str, Any]]:
        """The spans of one trace, in the order they started: rows of `spans` (chains, stages)
        and the calls' own spans kept in their request rows."""
        query = select(spans).where(spans.c.trace_id == trace_id)
        calls = select(requests.c.spans).where(requests.c.trace_id == trace_id)
        with self.connection() as conn:
            found = [dict(row) for row in conn.execute(query).mappings()]
            for (kept,) in conn.execute(calls):
                found.extend(span for span in kept or () if span.get("trace_id") == trace_id)
        return sorted(found, key=lambda span: (span["started_at"], span["span_id"]))

    def close(self) -> None:
        self.engine.dispose()

    def __repr__(self) -> str:
        return f"RecordStore({self.safe_url!r})"

    @contextmanager
    def _translated(self, doing: str) -> Iterator[None]:
        """SQLAlchemy's errors as ours, with what to check."""
        try:
            yield
        except (sa_exc.IntegrityError, sa_exc.DataError) as exc:
            reason = _first_line(exc.orig)
            raise RecordRejected(f"the request log at {self.safe_url} refused the rows: {reason}") from exc
        except sa_exc.DBAPIError as exc:
            raise StoreUnavailable(self._unavailable(doing, _first_line(exc.orig))) from exc
        except sa_exc.StatementError as exc:
            # Raised before the database saw anything: a value that cannot be sent (not JSON-able).
            raise RecordRejected(f"a row cannot be sent to {self.safe_url}: {_first_line(exc.orig)}") from exc
        except (sa_exc.SQLAlchemyError, OSError) as exc:
            raise StoreUnavailable(self._unavailable(doing, _first_line(exc))) from exc
        except Exception as exc:  # psycopg's own, from the COPY path
            if not _from_psycopg(exc):
                raise
            if _refused_data(exc):
                reason = _first_line(exc)
                raise RecordRejected(f"the request log at {self.safe_url} refused the rows: {reason}") from exc
            raise StoreUnavailable(self._unavailable(doing, _first_line(exc))) from exc

    def _unavailable(self, doing: str, reason: str) -> str:
        if self.dialect == "sqlite":
            check = (
                f"check that the directory of {self.path} exists and is writable, and that no other "
                "program holds the file locked"
            )
        else:
            where = f"{self._url.host or 'localhost'}:{self._url.port or 5432}"
            check = (
                f"check that PostgreSQL is running and reachable at {where}, and that store.url in "
                "keel.yaml names the right host, database and user"
            )
        return f"cannot {doing} the request log at {self.safe_url}: {reason}; {check}"


# ---------------------------------------------------------------------------- engine set-up


def _driver_url(url: str) -> URL:
    """postgresql:// and postgres:// go to the psycopg 3 driver; sqlite:// stays as it is."""
    if url.startswith(("postgresql://", "postgres://")):
        url = "postgresql+psycopg://" + url.split("://", 1)[1]
    try:
        parsed = make_url(url)
    except sa_exc.ArgumentError:
        raise StoreError(
            f"store.url {url!r} is not a database URL; use sqlite:///PATH or postgresql://HOST/DB"
        ) from None
    if parsed.drivername not in ("sqlite", "sqlite+pysqlite", "postgresql+psycopg"):
        raise StoreError(
            f"store.url uses {parsed.drivername!r}, which Keel does not support; "
            "use sqlite:///PATH or postgresql://USER@HOST:PORT/DB (psycopg 3)"
        )
    if parsed.drivername == "postgresql+psycopg":
        try:
            import psycopg  # noqa: F401
        except ImportError:
            raise StoreError(
                "store.url names PostgreSQL but psycopg 3 is not installed: run pip install 'keel[postgres]'"
            ) from None
    return parsed


def _sqlite_path(url: URL) -> Path | None:
    """The database file, None for an in-memory database."""
    database = url.database
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return Path(database).expanduser().resolve()


def _engine(url: URL, path: Path | None, connect_timeout_s: float) -> Engine:
    if url.get_backend_name() == "sqlite":
        if path is None:
            # One shared connection, or each connection would see its own empty database.
            engine = create_engine(
                url, poolclass=StaticPool, connect_args={"check_same_thread": False},
                json_serializer=json_text, json_deserializer=orjson.loads,
            )
        else:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StoreUnavailable(
                    f"cannot create the directory {path.parent} for the request log: {exc.strerror or exc}; "
                    "check store.url in keel.yaml"
                ) from None
            engine = create_engine(
                url.set(database=str(path)),
                connect_args={"check_same_thread": False, "timeout": 30},
                json_serializer=json_text, json_deserializer=orjson.loads,
            )
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(
        url,
        pool_pre_ping=True,  # a connection that died with the server is replaced, not reused
        pool_size=4,
        max_overflow=4,
        connect_args={"connect_timeout": max(1, round(connect_timeout_s)), "application_name": "keel"},
        json_serializer=json_text,
        json_deserializer=orjson.loads,
    )


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    try:
        # WAL: readers (the dashboard, `keel report`) never block the writer, nor it them.
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA busy_timeout=30000")
        # 32 MB of page cache (the default is 2 MB): a batch touches six B-trees.
        cursor.execute("PRAGMA cache_size=-32768")
        cursor.execute("PRAGMA wal_autocheckpoint=4000")
    finally:
        cursor.close()


class _Inserter:
    """Inserts the rows of one table as fast as the driver allows, skipping rows already stored.

    SQLAlchemy's executemany spends more per row processing parameters than the database spends
    storing them (~5k rows/s measured here), so values reach the driver as plain tuples with the
    JSON already serialised. SQLite: executemany of the Core-compiled INSERT ... ON CONFLICT DO
    NOTHING. PostgreSQL: COPY, and when a row is already there (a spool replayed twice), COPY into
    a temporary table and INSERT ... SELECT ... ON CONFLICT DO NOTHING; see bench/log_store.py.
    """

    def __init__(self, table: Table, engine: Engine) -> None:
        dialect = engine.dialect
        quote = dialect.identifier_preparer.quote
        self.key = table.primary_key.columns.values()[0].name  # what a replay's RETURNING names
        self.postgres = dialect.name == "postgresql"
        if self.postgres:
            self.columns = tuple(c.name for c in table.columns)
            names = ", ".join(quote(name) for name in self.columns)
            target, incoming = quote(table.name), quote(f"keel_incoming_{table.name}")
            self.sql = f"COPY {target} ({names}) FROM STDIN"
            self.staging = f"CREATE TEMPORARY TABLE IF NOT EXISTS {incoming} (LIKE {target}) ON COMMIT DELETE ROWS"
            self.copy_staged = f"COPY {incoming} ({names}) FROM STDIN"
            self.merge = f"INSERT INTO {target} ({names}) SELECT {names} FROM {incoming} ON CONFLICT DO NOTHING"
            self.returning = f" RETURNING {quote(self.key)}"
        else:
            compiled = sqlite.insert(table).on_conflict_do_nothing().compile(dialect=dialect)
            self.columns = tuple(compiled.positiontup or ())
            self.sql = compiled.string
        kinds = {c.name: c.type for c in table.columns}
        self.json_at = [i for i, name in enumerate(self.columns) if isinstance(kinds[name], JSON)]
        self.text_at = [i for i, name in enumerate(self.columns) if isinstance(kinds[name], String)]

    def values(self, row: Mapping[str, Any]) -> tuple[Any, ...]:
        out = [row.get(name) for name in self.columns]
        for i in self.json_at:
            if out[i] is not None:
                out[i] = json_text(out[i])
        # PostgreSQL refuses NUL in text; a NUL in an error message must not cost the record.
        for i in self.text_at:
            value = out[i]
            if type(value) is str and "\x00" in value:
                out[i] = value.replace("\x00", "\ufffd")
        return tuple(out)

    def insert(self, conn: Connection, rows: Sequence[Mapping[str, Any]]) -> Sequence[Mapping[str, Any]]:
        """Insert the rows not stored yet; returns those inserted (all of them but on a replay)."""
        tuples = [self.values(row) for row in rows]
        if not self.postgres:
            raw_sqlite: Any = conn.connection.driver_connection
            if not raw_sqlite.in_transaction:  # else RELEASE of the savepoint would commit
                conn.exec_driver_sql("BEGIN")
            conn.exec_driver_sql("SAVEPOINT keel_rows")
            if conn.exec_driver_sql(self.sql, tuples).rowcount == len(tuples):
                conn.exec_driver_sql("RELEASE SAVEPOINT keel_rows")
                return rows
            # Some rows were there already (a replay): one at a time, to know which were new.
            conn.exec_driver_sql("ROLLBACK TO SAVEPOINT keel_rows")
            conn.exec_driver_sql("RELEASE SAVEPOINT keel_rows")
            return [row for row, values in zip(rows, tuples, strict=True)
                    if conn.exec_driver_sql(self.sql, values).rowcount == 1]
        from psycopg.errors import UniqueViolation

        raw: Any = conn.connection.driver_connection
        with raw.cursor() as cursor:
            cursor.execute("SAVEPOINT keel_copy")
            try:
                with cursor.copy(self.sql) as copy:
                    for values in tuples:
                        copy.write_row(values)
            except UniqueViolation:
                cursor.execute("ROLLBACK TO SAVEPOINT keel_copy")
                cursor.execute(self.staging)
                with cursor.copy(self.copy_staged) as copy:
                    for values in tuples:
                        copy.write_row(values)
                cursor.execute(self.merge + self.returning)
                new = {found for (found,) in cursor.fetchall()}
                return [row for row in rows if row.get(self.key) in new]
            else:
                cursor.execute("RELEASE SAVEPOINT keel_copy")
        return rows


def _from_psycopg(exc: BaseException) -> bool:
    return type(exc).__module__.split(".")[0] == "psycopg"


def _refused_data(exc: BaseException) -> bool:
    """A psycopg error about the rows (not the connection, nor a missing table)."""
    import psycopg
    from psycopg import errors

    if isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError):
        return False
    return not isinstance(exc, errors.UndefinedTable | errors.UndefinedColumn)


# PostgreSQL refuses \u0000 in JSONB; a NUL from a client must not cost the whole record.
_JSON_NUL = re.compile(r"(?<!\\)((?:\\\\)*)\\u0000")


def json_text(value: Any) -> str:
    """JSON for a JSON column: orjson, anything unknown as its str(), NUL characters replaced."""
    try:
        out = orjson.dumps(value, default=str, option=orjson.OPT_NON_STR_KEYS).decode()
    except TypeError:  # an int beyond 64 bits, say
        out = json.dumps(value, default=str)
    if "\\u0000" in out:
        out = _JSON_NUL.sub(r"\1\\ufffd", out)
    return out


def _first_line(error: BaseException | None) -> str:
    text_ = str(error).strip() if error is not None else ""
    return text_.splitlines()[0] if text_ else type(error).__name__


# The rollups' tables are on this module's metadata (one schema), and the writes above maintain
# them: imported last, once `metadata` and `requests` exist for them.
from keel.observability import rollups, usage_rollups  # noqa: E402
