"""The caches in PostgreSQL, shared by every replica that uses the same database and table prefix: the
semantic cache's vectors with pgvector (`PostgresVectorStore`) and the exact cache's entries
(`PostgresStore`), for `cache.backend: postgres`.

A cache is an optimisation, as with Redis (`keel.cache.redis_store`): when PostgreSQL cannot be reached
or fails, a lookup or search is a miss and a store is skipped; the outage is logged once (and its end
once) and each failed operation is counted (`keel_cache_backend_errors_total`). Every operation, the
connection included, is bounded by `timeout_s` (a client-side deadline, and the server's
statement_timeout), so a database that is down or hung costs a call little. A connection that failed is
dropped: the next use opens a fresh one, so the store comes back on its own when the database does; a
kept connection the server ended meanwhile (a restart) costs a retry, not a miss.
A `clear` that cannot reach the database fails (`CacheStoreUnavailable`): an operator must not believe
entries are gone.

Writes commit without waiting for the WAL to reach the disk (`synchronous_commit=off` on Keel's own
connections, nobody else's): a server crash may lose the last fraction of a second of entries, which
costs those calls one upstream call each, never a wrong answer; a semantic entry's insert takes ~0.8 ms
less (4.75 against 5.53 ms p50 at 100k entries, most of it HNSW's insert).

Connections: psycopg_pool is not a dependency, so each store keeps a few connections of its own
(`POOL_SIZE`), opened on demand; concurrent calls are not serialised on one connection.

Search: pgvector's HNSW index filters by scope *after* its graph walk, which yields `hnsw.ef_search`
candidates (`ef_search`, default `EF_SEARCH`) of every scope: a scope that holds a small share of the
table gets fewer than `k` of them, often none (pgvector 0.6 has no iterative scan). When the planner's
answer has fewer than `k` rows, the search is run again exactly over the scope's own rows (the scope
index, then a sort), which is cheap when the scope is small, which is when it happens. pgvector's own
default of 40 candidates found every near duplicate that 100 found, on real questions among 100k
entries, in half the time (bench/pgvector_store.py --real; docs/caching.md). Vectors go to the server
in pgvector's binary form (`%b`): its text form costs ~170 µs to write in Python for 384 floats, the
binary one ~2 µs. Same query text in the same scope
replaces the entry (unique on scope and md5 of the query). Expired rows are never served, and are
deleted on a store at most once a `SWEEP_EVERY_S`, `SWEEP_BATCH` at a time.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, TypeVar

from prometheus_client.core import Metric

from keel.cache.entry import stored_at_of
from keel.cache.health import BackendHealth, reason
from keel.cache.key import KEY_VERSION, KeyScope, segment
from keel.cache.redis_store import CacheStoreUnavailable
from keel.cache.semantic_store import SCOPE_VERSION, Neighbour
from keel.config import SemanticCacheConfig
from keel.errors import KeelError

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt
    from psycopg import AsyncConnection
    from psycopg.sql import Composable, Composed

log = logging.getLogger("keel.cache")

POOL_SIZE = 4  # connections a store keeps at most
# HNSW candidates per search: cache.semantic.ef_search's default (pgvector's own, 40)
EF_SEARCH: int = SemanticCacheConfig.model_fields["ef_search"].default
SWEEP_EVERY_S = 60.0  # expired rows are deleted on a store at most this often
SWEEP_BATCH = 1000  # and this many at most each time
CLEAR_TIMEOUT_S = 30.0  # a clear (an operator's, rare) may delete many rows: it gets longer than a lookup
_TABLE_PREFIX = re.compile(r"[a-z_][a-z0-9_]{0,40}")
T = TypeVar("T")


class PgvectorMissing(KeelError):
    """The PostgreSQL of the semantic cache has no pgvector extension, or Keel may not create it."""

    status = 503
    type = "api_error"
    code = "cache_unavailable"


class VectorTableMismatch(KeelError):
    """The semantic cache's table holds vectors of another size than the embedder's."""

    status = 503
    type = "api_error"
    code = "cache_unavailable"


class _Postgres(ABC):
    """What both stores share: a few connections opened on demand, the schema made once, the deadline
    and error handling of every operation, and the sweep of expired rows."""

    table: str
    id_column = "key"  # what the sweep deletes by
    options = ""  # server settings of each connection, beyond the timeouts

    def __init__(
        self, url: str, table: str, *, timeout_s: float, clock: Callable[[], float], health: BackendHealth | None,
    ) -> None:
        try:
            import psycopg  # noqa: F401
        except ImportError:
            raise ImportError("cache.backend is postgres but psycopg is not installed: run "
                              "pip install 'keel[postgres]'") from None
        self.url = url
        self.table = table
        self.timeout_s = timeout_s
        self.clock = clock  # wall-clock: entries' stored_at and expires_at
        self.health = health or BackendHealth("PostgreSQL")
        self._idle: list[AsyncConnection[Any]] = []
        self._slots = asyncio.Semaphore(POOL_SIZE)
        self._ready = False  # schema made (or found) by this store
        self._next_sweep = float("-inf")

    @property
    def errors(self) -> int:
        return self.health.errors

    async def start(self) -> None:
        """Create the tables and indexes that are missing. A database that cannot be reached is only
        logged (the first use that reaches it creates them); a database that can never hold the cache
        raises (`PgvectorMissing`, `VectorTableMismatch`)."""
        try:
            async with asyncio.timeout(self.timeout_s * 10), self._connection():
                pass
        except (PgvectorMissing, VectorTableMismatch):
            raise
        except Exception as exc:
            self.health.failed(exc)

    async def close(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            await conn.close()

    def collect(self) -> Iterable[Metric]:
        """Read at scrape time; register `health` instead when both stores of one database are used."""
        return self.health.collect()

    @abstractmethod
    async def _schema(self, conn: AsyncConnection[Any]) -> None:
        """Create this store's table and indexes when missing."""

    async def _configure(self, conn: AsyncConnection[Any]) -> None:  # noqa: B027  (a hook: most stores need none)
        """Ready a new connection once the schema exists (types to register)."""

    async def _open(self) -> AsyncConnection[Any]:
        from psycopg import AsyncConnection

        ms = max(1, int(self.timeout_s * 1000))
        conn = await AsyncConnection.connect(
            self.url, autocommit=True, connect_timeout=max(2, int(self.timeout_s + 1)),
            options=f"-c statement_timeout={ms} -c lock_timeout={ms} -c synchronous_commit=off {self.options}".rstrip(),
        )
        try:
            if not self._ready:
                async with conn.transaction():  # replicas starting together: one makes it, the others wait
                    await conn.execute("SELECT pg_advisory_xact_lock(hashtext('keel.cache.postgres_store'))")
                    await self._schema(conn)
                self._ready = True
            await self._configure(conn)
        except BaseException:
            await conn.close()
            raise
        return conn

    @asynccontextmanager
    async def _connection(self, *, fresh: bool = False) -> AsyncIterator[AsyncConnection[Any]]:
        """A connection of this store's own (a new one when `fresh`); dropped when the block fails (the
        next use opens another)."""
        from psycopg.pq import TransactionStatus

        async with self._slots:
            conn = self._idle.pop() if self._idle and not fresh else await self._open()
            try:
                yield conn
            except BaseException:
                await conn.close()
                raise
            if conn.closed or conn.info.transaction_status != TransactionStatus.IDLE:
                await conn.close()
            else:
                self._idle.append(conn)

    async def _run(
        self, work: Callable[[AsyncConnection[Any]], Awaitable[T]], timeout_s: float | None = None,
    ) -> T:
        """`work` on a connection within the deadline (`timeout_s`, else the store's); raises what failed
        (the caller decides). A kept connection the server has ended (a restart, a failover) is found out
        only on use: `work` is then tried once more on a new one (every operation here can be repeated)."""
        from psycopg import OperationalError

        async with asyncio.timeout(timeout_s or self.timeout_s):
            kept = bool(self._idle)
            try:
                async with self._connection() as conn:
                    result = await work(conn)
            except OperationalError:
                if not kept:
                    raise
                await self.close()  # the others were ended alike
                async with self._connection(fresh=True) as conn:
                    result = await work(conn)
        self.health.answered()
        return result

    async def _or(self, default: T, work: Callable[[AsyncConnection[Any]], Awaitable[T]]) -> T:
        """`work`, or `default` when the database cannot be reached or fails (counted, logged once)."""
        try:
            return await self._run(work)
        except Exception as exc:
            self.health.failed(exc)
            return default

    async def _execute(self, query: Composed, params: tuple[Any, ...]) -> None:
        """One statement, skipped when the database cannot be reached or fails."""

        async def work(conn: AsyncConnection[Any]) -> None:
            await conn.execute(query, params)

        await self._or(None, work)

    async def _sweep(self, conn: AsyncConnection[Any], now: float) -> None:
        """Delete some expired rows, at most once a SWEEP_EVERY_S."""
        from psycopg import sql

        if now < self._next_sweep:
            return
        self._next_sweep = now + SWEEP_EVERY_S
        await conn.execute(sql.SQL(
            "DELETE FROM {t} WHERE {k} IN (SELECT {k} FROM {t} WHERE expires_at <= %s LIMIT %s)"
        ).format(t=sql.Identifier(self.table), k=sql.Identifier(self.id_column)), (now, SWEEP_BATCH))

    async def _clear(self, column: str, scope: KeyScope, older_than_s: float | None) -> int:
        """Remove the rows `scope` takes in (stored more than `older_than_s` ago: NULL counts as old);
        how many of them were live. Raises `CacheStoreUnavailable` when the database fails."""
        from psycopg import sql

        now = self.clock()
        where, params = scope_filter(scope, column)
        if older_than_s is not None:
            where = sql.SQL("{} AND (stored_at IS NULL OR stored_at <= %s)").format(where)
            params.append(now - older_than_s)
        query = sql.SQL(
            "WITH gone AS (DELETE FROM {t} WHERE {w} RETURNING expires_at) "
            "SELECT count(*) FILTER (WHERE expires_at > %s) FROM gone"
        ).format(t=sql.Identifier(self.table), w=where)

        async def work(conn: AsyncConnection[Any]) -> int:
            async with conn.transaction():
                await conn.execute(sql.SQL("SET LOCAL statement_timeout = {}").format(
                    sql.Literal(int(CLEAR_TIMEOUT_S * 1000))))
                row = await (await conn.execute(query, [*params, now])).fetchone()
            return int(row[0]) if row else 0

        try:
            return await self._run(work, CLEAR_TIMEOUT_S)
        except Exception as exc:
            self.health.failed(exc)
            raise CacheStoreUnavailable(
                f"The cache in PostgreSQL (table {self.table}) could not be cleared ({reason(exc)}); nothing "
                "was removed. Check that the database answers (keel check), then clear again."
            ) from None


class PostgresVectorStore(_Postgres):
    """The semantic cache's entries in `<table_prefix>_semantic_cache`, searched with pgvector (HNSW,
    cosine distance)."""

    id_column = "id"

    def __init__(
        self, url: str, *, dimensions: int = 384, table_prefix: str = "keel", timeout_s: float = 1.0,
        clock: Callable[[], float] = time.time, health: BackendHealth | None = None, ef_search: int = EF_SEARCH,
    ) -> None:
        try:
            import pgvector.psycopg  # noqa: F401
        except ImportError:
            raise ImportError("cache.semantic.backend is postgres but pgvector is not installed: run "
                              "pip install 'keel[postgres]'") from None
        super().__init__(url, _table(table_prefix, "semantic_cache"), timeout_s=timeout_s, clock=clock, health=health)
        self.dimensions = dimensions
        self.options = f"-c hnsw.ef_search={int(ef_search)}"

    async def search(
        self, scope: str, vector: npt.NDArray[np.float32], k: int, min_score: float
    ) -> list[Neighbour]:
        from psycopg import sql

        if k <= 0:
            return []
        t = sql.Identifier(self.table)
        select = ("SELECT id, embedding <=> %(q)b, query, answer FROM {t} "
                  "WHERE scope = %(scope)s AND expires_at > %(now)s ")
        indexed = sql.SQL(select + "ORDER BY embedding <=> %(q)b LIMIT %(k)s").format(t=t)
        # `+ 0` is not the index's ordering: the planner cannot walk HNSW, it reads the scope's rows.
        exact = sql.SQL(select + "ORDER BY (embedding <=> %(q)b) + 0 LIMIT %(k)s").format(t=t)
        params = {"q": vector, "scope": scope, "now": self.clock(), "k": k}

        async def work(conn: AsyncConnection[Any]) -> list[tuple[Any, ...]]:
            rows = await (await conn.execute(indexed, params)).fetchall()
            if len(rows) < k:  # HNSW's candidates held too few of this scope: read it exactly
                rows = await (await conn.execute(exact, params)).fetchall()
            return rows

        rows: list[tuple[Any, ...]] = await self._or([], work)
        found = [Neighbour(str(id_), 1.0 - float(distance), query, bytes(answer))
                 for id_, distance, query, answer in rows]
        return [n for n in found if n.score >= min_score]

    async def add(
        self, scope: str, vector: npt.NDArray[np.float32], query: str, answer: bytes, ttl_s: float
    ) -> None:
        from psycopg import sql

        now = self.clock()
        upsert = sql.SQL(
            "INSERT INTO {t} (scope, query, embedding, answer, stored_at, expires_at) VALUES (%s, %s, %b, %s, %s, %s) "
            "ON CONFLICT (scope, md5(query)) DO UPDATE SET embedding = excluded.embedding, answer = excluded.answer, "
            "stored_at = excluded.stored_at, expires_at = excluded.expires_at"
        ).format(t=sql.Identifier(self.table))

        async def work(conn: AsyncConnection[Any]) -> None:
            await conn.execute(upsert, (scope, query, vector, answer, now, now + ttl_s))
            await self._sweep(conn, now)

        await self._or(None, work)

    async def delete(self, entry_id: str) -> None:
        from psycopg import sql

        if not entry_id.isdigit():
            return  # not an id of this store
        await self._execute(sql.SQL("DELETE FROM {t} WHERE id = %s").format(t=sql.Identifier(self.table)),
                            (int(entry_id),))

    async def clear(
        self, model: str | None = None, tenant: str | None = None, older_than_s: float | None = None,
        key_prefix: str | None = None,
    ) -> int:
        """Remove the live entries whose scope matches every filter given (none: all); how many were
        removed. Raises `CacheStoreUnavailable` when the database cannot be reached."""
        return await self._clear("scope", KeyScope(model, tenant, key_prefix, version=SCOPE_VERSION), older_than_s)

    async def _schema(self, conn: AsyncConnection[Any]) -> None:
        from psycopg import errors, sql

        try:
            async with conn.transaction():
                await conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
        except (errors.FeatureNotSupported, errors.UndefinedFile) as exc:
            raise PgvectorMissing(
                f"The semantic cache needs the pgvector extension, which this PostgreSQL does not have "
                f"({reason(exc)}). Install pgvector on that server (https://github.com/pgvector/pgvector), "
                "or set cache.semantic.backend: memory."
            ) from None
        except errors.InsufficientPrivilege as exc:
            raise PgvectorMissing(
                f"The semantic cache needs the pgvector extension, and Keel's database user may not create it "
                f"({reason(exc)}). Ask a superuser to run CREATE EXTENSION vector in that database, or set "
                "cache.semantic.backend: memory."
            ) from None
        names = {"t": sql.Identifier(self.table), "scope_query": sql.Identifier(self.table + "_scope_query"),
                 "expires": sql.Identifier(self.table + "_expires"),
                 "hnsw": sql.Identifier(self.table + "_embedding")}
        await conn.execute(sql.SQL(
            "CREATE TABLE IF NOT EXISTS {t} (id bigserial PRIMARY KEY, scope text NOT NULL, query text NOT NULL, "
            "embedding vector({n}) NOT NULL, answer bytea NOT NULL, stored_at double precision NOT NULL, "
            "expires_at double precision NOT NULL)"
        ).format(n=sql.Literal(self.dimensions), **names))
        await self._check_dimensions(conn)
        # Unique on scope first: also the scope index of exact searches and clears.
        await conn.execute(sql.SQL(
            "CREATE UNIQUE INDEX IF NOT EXISTS {scope_query} ON {t} (scope, md5(query))").format(**names))
        await conn.execute(sql.SQL("CREATE INDEX IF NOT EXISTS {expires} ON {t} (expires_at)").format(**names))
        await conn.execute(sql.SQL(
            "CREATE INDEX IF NOT EXISTS {hnsw} ON {t} USING hnsw (embedding vector_cosine_ops)").format(**names))

    async def _check_dimensions(self, conn: AsyncConnection[Any]) -> None:
        row = await (await conn.execute(
            "SELECT format_type(atttypid, atttypmod) FROM pg_attribute "
            "WHERE attrelid = to_regclass(%s) AND attname = 'embedding'", (self.table,),
        )).fetchone()
        expected = f"vector({self.dimensions})"
        if row is not None and row[0] != expected:
            raise VectorTableMismatch(
                f"The table {self.table} holds {row[0]} but the embedder gives {expected}: set another "
                f"cache.semantic table prefix, or drop the table {self.table} (its entries are lost)."
            )

    async def _configure(self, conn: AsyncConnection[Any]) -> None:
        from pgvector.psycopg import register_vector_async

        await register_vector_async(conn)


class PostgresStore(_Postgres):
    """The exact cache's entries in `<table_prefix>_exact_cache`: key, value, stored_at (read from the
    entry, as Redis does, so age means the answer's age) and expires_at."""

    def __init__(
        self, url: str, *, table_prefix: str = "keel", timeout_s: float = 1.0,
        clock: Callable[[], float] = time.time, health: BackendHealth | None = None,
    ) -> None:
        super().__init__(url, _table(table_prefix, "exact_cache"), timeout_s=timeout_s, clock=clock, health=health)

    async def get(self, key: str) -> bytes | None:
        from psycopg import sql

        query = sql.SQL("SELECT value FROM {t} WHERE key = %s AND expires_at > %s").format(t=sql.Identifier(self.table))

        async def work(conn: AsyncConnection[Any]) -> bytes | None:
            row = await (await conn.execute(query, (key, self.clock()))).fetchone()
            return None if row is None else bytes(row[0])

        return await self._or(None, work)

    async def set(self, key: str, value: bytes, ttl_s: float) -> None:
        from psycopg import sql

        now, stored_at = self.clock(), stored_at_of(value)
        upsert = sql.SQL(
            "INSERT INTO {t} (key, value, stored_at, expires_at) VALUES (%s, %s, %s, %s) ON CONFLICT (key) DO UPDATE "
            "SET value = excluded.value, stored_at = excluded.stored_at, expires_at = excluded.expires_at"
        ).format(t=sql.Identifier(self.table))
        params = (key, value, None if stored_at == float("-inf") else stored_at, now + ttl_s)

        async def work(conn: AsyncConnection[Any]) -> None:
            await conn.execute(upsert, params)
            await self._sweep(conn, now)

        await self._or(None, work)

    async def delete(self, key: str) -> None:
        from psycopg import sql

        await self._execute(sql.SQL("DELETE FROM {t} WHERE key = %s").format(t=sql.Identifier(self.table)), (key,))

    async def clear(
        self, model: str | None = None, tenant: str | None = None, older_than_s: float | None = None,
        key_prefix: str | None = None,
    ) -> int:
        """Remove the live entries of `model`, of `tenant`, stored more than `older_than_s` ago (an entry
        whose time is unknown or that does not parse counts as old) and whose key starts with
        `key_prefix`; how many were removed. Raises `CacheStoreUnavailable` when the database fails."""
        return await self._clear("key", KeyScope(model, tenant, key_prefix, version=KEY_VERSION), older_than_s)

    async def _schema(self, conn: AsyncConnection[Any]) -> None:
        from psycopg import sql

        t = sql.Identifier(self.table)
        await conn.execute(sql.SQL(
            "CREATE TABLE IF NOT EXISTS {t} (key text PRIMARY KEY, value bytea NOT NULL, stored_at double precision, "
            "expires_at double precision NOT NULL)").format(t=t))
        await conn.execute(sql.SQL("CREATE INDEX IF NOT EXISTS {i} ON {t} (expires_at)").format(
            t=t, i=sql.Identifier(self.table + "_expires")))


def scope_filter(scope: KeyScope, column: str) -> tuple[Composable, list[Any]]:
    """A WHERE clause on `column` that takes in exactly the keys `scope.matches` takes, with its
    parameters: `<version>:<tenant>:<model>:<rest>`, segments percent-encoded (never a ':')."""
    from psycopg import sql

    col = sql.Identifier(column)
    clauses: list[Composable] = [sql.SQL("{} LIKE %s").format(col)]
    params: list[Any] = [_like_escape(scope.version) + ":%:%:%"]
    if scope.tenant is not None:
        clauses.append(sql.SQL("split_part({}, ':', 2) = %s").format(col))
        params.append(segment(scope.tenant))
    if scope.model is not None:
        clauses.append(sql.SQL("split_part({}, ':', 3) = %s").format(col))
        params.append(segment(scope.model))
    if scope.key_prefix is not None:
        clauses.append(sql.SQL("starts_with({}, %s)").format(col))
        params.append(scope.key_prefix)
    return sql.SQL(" AND ").join(clauses), params


def _like_escape(text: str) -> str:
    return "".join("\\" + c if c in "%_\\" else c for c in text)


def _table(prefix: str, name: str) -> str:
    if not _TABLE_PREFIX.fullmatch(prefix):
        raise ValueError(f"a cache table prefix is lower-case letters, digits and _ (a letter or _ first), "
                         f"got {prefix!r}")
    return f"{prefix}_{name}"
