"""Both caches in PostgreSQL: the semantic cache's `PostgresVectorStore` (pgvector) and the exact
cache's `PostgresStore`, on a real PostgreSQL 16 with pgvector started by pgserver (skips locally when it
cannot start, fails in CI: KEEL_REQUIRE_SERVICES=1). Each test has tables of its own (a table prefix).
The outage test stops that server and starts it again."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
from collections.abc import AsyncIterator, Iterator
from typing import Any

import numpy as np
import numpy.typing as npt
import psycopg
import pytest
from conftest import free_port, fresh_pg_database
from pgvector_server import PgvectorServer, pgvector_server, pgvector_url  # noqa: F401

from keel.cache.entry import CachedAnswer
from keel.cache.key import KEY_VERSION, segment, tenant_segment
from keel.cache.postgres_store import (
    SWEEP_EVERY_S,
    BackendHealth,
    PgvectorMissing,
    PostgresStore,
    PostgresVectorStore,
    VectorTableMismatch,
)
from keel.cache.redis_store import CacheStoreUnavailable
from keel.cache.semantic_store import SCOPE_VERSION

NOW = 1_000_000.0
DIM = 384
COMPLETION = {"id": "c", "choices": [{"message": {"role": "assistant", "content": "4"}, "finish_reason": "stop"}]}


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now


def vec(angle: float, axis: int = 1) -> npt.NDArray[np.float32]:
    """A unit vector at `angle` radians from the first axis, towards `axis`: its cosine to vec(0) is
    cos(angle)."""
    v = np.zeros(DIM, dtype=np.float32)
    v[0], v[axis] = np.cos(angle), np.sin(angle)
    return v


def scope(tenant: str | None = None, model: str = "m", rest: str = "conversation") -> str:
    return f"{SCOPE_VERSION}:{tenant_segment(tenant)}:{segment(model)}:{hashlib.sha256(rest.encode()).hexdigest()}"


@pytest.fixture
def prefix() -> str:
    return "t" + secrets.token_hex(4)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def vectors(pgvector_url: str, prefix: str, clock: Clock) -> AsyncIterator[PostgresVectorStore]:  # noqa: F811
    store = PostgresVectorStore(pgvector_url, table_prefix=prefix, clock=clock, timeout_s=5)
    await store.start()
    yield store
    await store.close()


@pytest.fixture
async def exact(pgvector_url: str, prefix: str, clock: Clock) -> AsyncIterator[PostgresStore]:  # noqa: F811
    store = PostgresStore(pgvector_url, table_prefix=prefix, clock=clock, timeout_s=5)
    await store.start()
    yield store
    await store.close()


async def test_search_returns_the_nearest_of_the_scope_best_first_above_min_score(
    vectors: PostgresVectorStore,
) -> None:
    s = scope()
    for i, angle in enumerate([0.6, 0.0, 0.3, 1.2]):
        await vectors.add(s, vec(angle), f"q{i}", f"a{i}".encode(), 60)
    found = await vectors.search(s, vec(0.0), 3, 0.0)
    assert [n.query for n in found] == ["q1", "q2", "q0"]
    assert [n.answer for n in found] == [b"a1", b"a2", b"a0"]
    assert [round(n.score, 4) for n in found] == [round(float(np.cos(a)), 4) for a in (0.0, 0.3, 0.6)]
    assert [n.query for n in await vectors.search(s, vec(0.0), 4, float(np.cos(0.45)))] == ["q1", "q2"]
    assert await vectors.search(s, vec(0.0), 0, 0.0) == []


async def test_a_scope_gets_its_own_nearest_even_beside_a_big_scope_hnsw_walks_first(
    vectors: PostgresVectorStore, pgvector_url: str,  # noqa: F811
) -> None:
    big, mid, small, other_tenant = (scope(rest="big"), scope(rest="mid"), scope(rest="small"),
                                     scope("acme", rest="small"))
    rng = np.random.default_rng(7)
    near = unit(vec(0.0) + 0.05 * rng.standard_normal((3000, DIM)))  # cosine ~0.8 to the query
    far = unit(rng.standard_normal((300, DIM)))  # ~0: none among HNSW's candidates; the planner walks HNSW
    await copy_rows(pgvector_url, vectors.table, big, near)
    await copy_rows(pgvector_url, vectors.table, mid, far)
    for i, angle in enumerate([1.0, 1.1, 1.2]):
        await vectors.add(small, vec(angle, axis=2), f"small {i}", b"small", 60)
    await vectors.add(other_tenant, vec(0.0), "other", b"other", 60)
    found = await vectors.search(mid, vec(0.0), 5, -1.0)
    assert [n.query for n in found] == [f"row {i}" for i in np.argsort(-far[:, 0])[:5]]  # exactly the 5 nearest
    assert [n.query for n in await vectors.search(small, vec(0.0), 5, 0.0)] == ["small 0", "small 1", "small 2"]
    assert [n.query for n in await vectors.search(other_tenant, vec(0.0), 3, 0.0)] == ["other"]
    assert {n.answer for n in await vectors.search(big, vec(0.0), 5, 0.0)} == {big.encode()}
    assert await vectors.search(scope(rest="nothing"), vec(0.0), 3, 0.0) == []


async def test_each_connection_walks_the_configured_hnsw_candidates_and_commits_without_a_flush(
    pgvector_url: str, prefix: str,  # noqa: F811
) -> None:
    for store, expected in ((PostgresVectorStore(pgvector_url, table_prefix=prefix), "40"),
                            (PostgresVectorStore(pgvector_url, table_prefix=prefix, ef_search=123), "123")):
        async with store._connection() as conn:
            assert await (await conn.execute("SHOW hnsw.ef_search")).fetchone() == (expected,)
            # a cache's write need not wait for the WAL flush: a crash costs upstream calls, not answers
            assert await (await conn.execute("SHOW synchronous_commit")).fetchone() == ("off",)
        await store.close()


def unit(rows: npt.NDArray[np.float64]) -> npt.NDArray[np.float32]:
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


async def copy_rows(url: str, table: str, scope: str, rows: npt.NDArray[np.float32]) -> None:
    """Many rows at once (COPY), queries `row <i>`, answered with the scope's name; then ANALYZE, so
    the planner knows each scope's size."""
    from pgvector.psycopg import register_vector_async

    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        await register_vector_async(conn)
        async with conn.cursor().copy(
            f"COPY {table} (scope, query, embedding, answer, stored_at, expires_at) FROM STDIN"
        ) as copy:
            for i, row in enumerate(rows):
                await copy.write_row((scope, f"row {i}", row, scope.encode(), NOW, NOW + 60))
        await conn.execute(f"ANALYZE {table}")


async def test_an_entry_expires_and_expired_rows_are_swept_on_a_later_add(
    vectors: PostgresVectorStore, clock: Clock, pgvector_url: str,  # noqa: F811
) -> None:
    s = scope()
    await vectors.add(s, vec(0.0), "short", b"a", 10)
    await vectors.add(s, vec(0.1), "long", b"b", 10 * SWEEP_EVERY_S)
    clock.now += 11
    assert [n.query for n in await vectors.search(s, vec(0.0), 2, 0.0)] == ["long"]
    assert await rows(pgvector_url, vectors.table) == 2  # not served, not yet deleted
    clock.now += SWEEP_EVERY_S
    await vectors.add(s, vec(0.2), "later", b"c", 60)
    assert await rows(pgvector_url, vectors.table) == 2  # "short" deleted, "later" added


async def rows(url: str, table: str) -> int:
    async with await psycopg.AsyncConnection.connect(url) as conn:
        row = await (await conn.execute(f"SELECT count(*) FROM {table}")).fetchone()
        assert row is not None
        return int(row[0])


async def test_the_same_query_in_the_same_scope_replaces_and_delete_removes_one(
    vectors: PostgresVectorStore,
) -> None:
    s, t = scope(), scope("acme")
    await vectors.add(s, vec(0.0), "what is 2+2", b"old", 60)
    await vectors.add(t, vec(0.0), "what is 2+2", b"acme's", 60)
    await vectors.add(s, vec(0.2), "what is 2+2", b"new", 60)
    [entry] = await vectors.search(s, vec(0.0), 5, 0.0)
    assert entry.answer == b"new" and round(entry.score, 4) == round(float(np.cos(0.2)), 4)
    await vectors.delete(entry.entry_id)
    await vectors.delete(entry.entry_id)  # gone already: nothing
    await vectors.delete("not-an-id")
    assert await vectors.search(s, vec(0.0), 5, 0.0) == []
    assert [n.answer for n in await vectors.search(t, vec(0.0), 5, 0.0)] == [b"acme's"]


ENTRIES = {  # name: (model, tenant, stored this many seconds before NOW)
    "m-acme": ("m", "acme", 400), "m-globex": ("m", "globex", 300), "n-acme": ("n", "acme", 200),
    "n-none": ("n", None, 100), "ab-x": ("a:b", "x", 0), "a-bx": ("a", "b:x", 0),
}
CLEARS = [  # filters, with the version's own prefix written {v}; what they remove
    ({"model": "m"}, {"m-acme", "m-globex"}),
    ({"tenant": "acme"}, {"m-acme", "n-acme"}),
    ({"model": "a"}, {"a-bx"}),  # not model "a:b"
    ({"tenant": "b"}, set()),  # not tenant "b:x"
    ({"model": "a:b", "tenant": "x"}, {"ab-x"}),
    ({"key_prefix": "{v}:-:"}, {"n-none"}),
    ({"key_prefix": "{v}:%"}, set()),  # a prefix is literal, never a pattern
    ({"key_prefix": "{v}:_"}, set()),
    ({"older_than_s": 250}, {"m-acme", "m-globex"}),
    ({"older_than_s": 250, "model": "n"}, set()),
    ({}, set(ENTRIES)),
]


def entry_key(version: str, name: str) -> str:
    model, tenant, _ = ENTRIES[name]
    return f"{version}:{tenant_segment(tenant)}:{segment(model)}:{hashlib.sha256(name.encode()).hexdigest()}"


def with_version(filters: dict[str, Any], version: str) -> dict[str, Any]:
    return {k: v.format(v=version) if isinstance(v, str) else v for k, v in filters.items()}


@pytest.mark.parametrize(("filters", "removed"), CLEARS)
async def test_semantic_clear_takes_what_every_filter_given_selects(
    vectors: PostgresVectorStore, clock: Clock, filters: dict[str, Any], removed: set[str],
) -> None:
    for name, (_, _, age) in ENTRIES.items():
        clock.now = NOW - age
        await vectors.add(entry_key(SCOPE_VERSION, name), vec(0.0), name, b"x", 3600)
    await vectors.add(f"{KEY_VERSION}:-:m:x", vec(0.0), "another version", b"x", 3600)  # never taken
    clock.now = NOW
    assert await vectors.clear(**with_version(filters, SCOPE_VERSION)) == len(removed)
    left = {name for name in ENTRIES if await vectors.search(entry_key(SCOPE_VERSION, name), vec(0.0), 1, 0.0)}
    assert left == set(ENTRIES) - removed
    assert await vectors.search(f"{KEY_VERSION}:-:m:x", vec(0.0), 1, 0.0) != []


@pytest.mark.parametrize(("filters", "removed"), CLEARS)
async def test_exact_clear_takes_what_every_filter_given_selects(
    exact: PostgresStore, filters: dict[str, Any], removed: set[str],
) -> None:
    for name, (_, _, age) in ENTRIES.items():
        await exact.set(entry_key(KEY_VERSION, name), CachedAnswer(COMPLETION, 1, NOW - age).dumps(), 3600)
    assert await exact.clear(**with_version(filters, KEY_VERSION)) == len(removed)
    left = {name for name in ENTRIES if await exact.get(entry_key(KEY_VERSION, name)) is not None}
    assert left == set(ENTRIES) - removed


async def test_clear_counts_only_live_entries_and_an_exact_entry_without_a_time_is_old(
    exact: PostgresStore, vectors: PostgresVectorStore, clock: Clock,
) -> None:
    await exact.set(entry_key(KEY_VERSION, "ab-x"), b"not json", 3600)
    await exact.set(entry_key(KEY_VERSION, "a-bx"), CachedAnswer(COMPLETION, 1).dumps(), 3600)  # no stored_at
    await exact.set(entry_key(KEY_VERSION, "m-acme"), CachedAnswer(COMPLETION, 1, NOW - 400).dumps(), 10)
    await exact.set(entry_key(KEY_VERSION, "n-acme"), CachedAnswer(COMPLETION, 1, NOW).dumps(), 3600)
    await vectors.add(scope(), vec(0.0), "expiring", b"x", 10)
    clock.now += 20  # "m-acme" and "expiring" expired, not yet swept
    assert await exact.clear(older_than_s=1000) == 2
    assert await exact.get(entry_key(KEY_VERSION, "n-acme")) is not None
    assert await vectors.clear() == 0


async def test_the_exact_store_gets_sets_replaces_expires_and_deletes(exact: PostgresStore, clock: Clock) -> None:
    assert await exact.get("v2:-:m:k") is None
    await exact.set("v2:-:m:k", b"one", 10)
    await exact.set("v2:-:m:k", b"two", 10)
    await exact.set("v2:-:m:other", b"three", 100)
    assert await exact.get("v2:-:m:k") == b"two"
    clock.now += 11
    assert await exact.get("v2:-:m:k") is None
    assert await exact.get("v2:-:m:other") == b"three"
    await exact.delete("v2:-:m:other")
    await exact.delete("v2:-:m:other")
    assert await exact.get("v2:-:m:other") is None
    assert exact.errors == 0


@pytest.fixture
def restart_after(pgvector_server: PgvectorServer) -> Iterator[PgvectorServer]:  # noqa: F811
    yield pgvector_server
    pgvector_server.start()  # for the next tests, even when this one failed while it was down


async def test_a_database_outage_is_a_miss_logged_once_counted_and_recovered_from(
    pgvector_url: str, prefix: str, restart_after: PgvectorServer, caplog: pytest.LogCaptureFixture,  # noqa: F811
) -> None:
    health = BackendHealth("PostgreSQL")
    vectors = PostgresVectorStore(pgvector_url, table_prefix=prefix, health=health)
    exact = PostgresStore(pgvector_url, table_prefix=prefix, health=health)
    await vectors.start()
    await exact.start()
    await vectors.add(scope(), vec(0.0), "q", b"a", 60)
    await exact.set("v2:-:m:k", b"v", 60)
    with caplog.at_level(logging.INFO, logger="keel.cache"):
        await asyncio.to_thread(restart_after.stop)
        assert await vectors.search(scope(), vec(0.0), 1, 0.0) == []
        await vectors.add(scope(), vec(0.0), "q2", b"a2", 60)
        assert await exact.get("v2:-:m:k") is None
        await exact.set("v2:-:m:k2", b"v2", 60)
        await exact.delete("v2:-:m:k")
        await vectors.delete("1")
        with pytest.raises(CacheStoreUnavailable, match="could not be cleared"):
            await exact.clear()
        with pytest.raises(CacheStoreUnavailable):
            await vectors.clear(model="m")
        assert health.errors == 8 and vectors.errors == exact.errors == 8
        assert metric(health, "keel_cache_backend_up") == 0
        assert metric(health, "keel_cache_backend_errors") == 8
        await asyncio.to_thread(restart_after.start)
        assert [n.answer for n in await vectors.search(scope(), vec(0.0), 1, 0.0)] == [b"a"]
        assert await exact.get("v2:-:m:k") == b"v"
        assert await exact.get("v2:-:m:k2") is None  # skipped while down
    assert metric(health, "keel_cache_backend_up") == 1 and health.errors == 8
    outage = [r.getMessage() for r in caplog.records if r.name == "keel.cache"]
    assert len(outage) == 2 and "cannot be reached" in outage[0] and "answers again" in outage[1]
    await vectors.close()
    await exact.close()


async def test_a_restart_between_calls_costs_no_miss(
    vectors: PostgresVectorStore, restart_after: PgvectorServer,
) -> None:
    await vectors.add(scope(), vec(0.0), "q", b"a", 60)
    assert len(await vectors.search(scope(), vec(0.0), 1, 0.0)) == 1  # a connection is kept
    await asyncio.to_thread(restart_after.stop)
    await asyncio.to_thread(restart_after.start)  # the kept connection was ended by the server
    assert [n.answer for n in await vectors.search(scope(), vec(0.0), 1, 0.0)] == [b"a"]
    assert vectors.errors == 0 and not vectors.health.down


def metric(health: BackendHealth, name: str) -> float:
    [value] = [m.samples[0].value for m in health.collect() if m.name == name]
    return value


async def test_a_database_that_never_answers_is_a_miss_within_the_deadline() -> None:
    held: list[asyncio.StreamWriter] = []

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)  # accept, never answer

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    store = PostgresStore(f"postgresql://keel@127.0.0.1:{port}/keel", timeout_s=0.2)
    vectors = PostgresVectorStore(f"postgresql://keel@127.0.0.1:{port}/keel", timeout_s=0.2)
    async with server:
        assert await store.get("v2:-:m:k") is None
        assert await vectors.search(scope(), vec(0.0), 1, 0.0) == []
    assert store.errors == 1 and vectors.errors == 1 and held


async def test_start_on_a_closed_port_is_logged_not_raised_and_the_store_misses() -> None:
    store = PostgresVectorStore(f"postgresql://keel@127.0.0.1:{free_port()}/keel")
    await store.start()
    assert store.errors == 1 and store.health.down
    assert await store.search(scope(), vec(0.0), 1, 0.0) == []
    assert store.errors == 2


async def test_start_refuses_a_table_of_another_vector_size(pgvector_url: str, prefix: str) -> None:  # noqa: F811
    first = PostgresVectorStore(pgvector_url, table_prefix=prefix)
    await first.start()
    await first.close()
    with pytest.raises(VectorTableMismatch, match="vector\\(384\\) but the embedder gives vector\\(8\\)"):
        await PostgresVectorStore(pgvector_url, table_prefix=prefix, dimensions=8).start()


def test_a_table_prefix_is_an_identifier() -> None:
    with pytest.raises(ValueError, match="lower-case letters"):
        PostgresStore("postgresql://x/y", table_prefix='keel"; DROP TABLE x; --')


async def test_start_without_pgvector_on_the_server_says_to_install_it() -> None:
    with fresh_pg_database("keel_nopgv") as url:  # the Debian PostgreSQL: no pgvector
        store = PostgresVectorStore(url.replace("postgresql+psycopg://", "postgresql://"))
        with pytest.raises(PgvectorMissing, match=r"Install pgvector on that server.*backend: memory"):
            await store.start()
        await store.close()
        exact = PostgresStore(url.replace("postgresql+psycopg://", "postgresql://"))
        await exact.start()  # the exact cache needs no extension
        await exact.set("v2:-:m:k", b"v", 60)
        assert await exact.get("v2:-:m:k") == b"v"
        await exact.close()
