"""The semantic cache's in-process vector store (keel.cache.vectors.MemoryVectorStore): hits and misses,
order, scope isolation, TTL, eviction, delete and replace (against a brute-force model of the store),
the switch to the HNSW index, and clearing by tenant, model, age and prefix."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keel.cache import vectors
from keel.cache.key import segment
from keel.cache.semantic_store import Neighbour
from keel.cache.vectors import MemoryVectorStore

DIM = 16
A = "s1:-:m:" + "a" * 64
B = "s1:-:m:" + "b" * 64


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def unit(vector: Any) -> np.ndarray:
    v = np.asarray(vector, dtype=np.float64)
    return (v / np.linalg.norm(v)).astype(np.float32)


def basis(i: int, dim: int = DIM) -> np.ndarray:
    v = np.zeros(dim, dtype=np.float32)
    v[i] = 1.0
    return v


def mix(i: int, j: int, weight: float) -> np.ndarray:
    """A unit vector whose cosine to basis(i) is `weight` (and to basis(j) the rest)."""
    return unit(weight * basis(i) + np.sqrt(1 - weight**2) * basis(j))


def store(max_entries: int = 1000, **kw: Any) -> MemoryVectorStore:
    kw.setdefault("dimensions", DIM)
    return MemoryVectorStore(max_entries, **kw)


def scope(tenant: str | None, model: str, digest: str = "0" * 64) -> str:
    return f"s1:{'-' if tenant is None else segment(tenant)}:{segment(model)}:{digest}"


# ---------------------------------------------------------------------------- search


async def test_a_near_query_hits_and_a_far_one_misses() -> None:
    s = store()
    await s.add(A, basis(0), "what is 2+2", b"four", 60)
    [hit] = await s.search(A, mix(0, 1, 0.95), 3, 0.9)
    assert hit.query == "what is 2+2" and hit.answer == b"four"
    assert hit.score == pytest.approx(0.95, abs=1e-6)
    assert await s.search(A, mix(0, 1, 0.85), 3, 0.9) == []
    assert await s.search(A, basis(1), 3, 0.0) == [Neighbour(hit.entry_id, 0.0, "what is 2+2", b"four")]


async def test_top_k_best_first() -> None:
    s = store()
    for i, w in enumerate([0.5, 0.99, 0.7, 0.9, 0.8]):
        await s.add(A, mix(0, i + 1, w), f"q{w}", b"", 60)
    found = await s.search(A, basis(0), 3, 0.0)
    assert [n.query for n in found] == ["q0.99", "q0.9", "q0.8"]
    assert [n.score for n in found] == sorted((n.score for n in found), reverse=True)
    assert [n.query for n in await s.search(A, basis(0), 10, 0.75)] == ["q0.99", "q0.9", "q0.8"]
    assert await s.search(A, basis(0), 0, 0.0) == []


async def test_a_search_never_sees_another_scope() -> None:
    s = store()
    await s.add(A, basis(0), "same words", b"a", 60)
    await s.add(B, basis(0), "same words", b"b", 60)
    assert [n.answer for n in await s.search(A, basis(0), 5, 0.0)] == [b"a"]
    assert [n.answer for n in await s.search(B, basis(0), 5, 0.0)] == [b"b"]
    assert await s.search("s1:-:m:" + "c" * 64, basis(0), 5, 0.0) == []


async def test_vectors_are_checked_and_normalised() -> None:
    s = store()
    await s.add(A, 3 * basis(0), "q", b"", 60)
    [found] = await s.search(A, 2 * mix(0, 1, 0.6), 1, 0.0)
    assert found.score == pytest.approx(0.6, abs=1e-6)
    with pytest.raises(ValueError):
        await s.add(A, np.ones(DIM + 1, dtype=np.float32), "q", b"", 60)


# ---------------------------------------------------------------------------- TTL, eviction, replace, delete


async def test_expired_entries_are_never_returned_and_are_dropped() -> None:
    clock = Clock()
    s = store(clock=clock)
    await s.add(A, basis(0), "short", b"", 10)
    await s.add(A, basis(1), "long", b"", 100)
    clock.now += 9.9
    assert len(await s.search(A, basis(0), 5, -1.0)) == 2
    clock.now += 0.1
    assert [n.query for n in await s.search(A, basis(0), 5, -1.0)] == ["long"]
    assert len(s) == 1
    clock.now += 90
    assert await s.search(A, basis(1), 5, -1.0) == [] and len(s) == 0 and s.scope_size(A) == 0
    await s.add(A, basis(0), "never", b"", 0)
    assert len(s) == 0


async def test_past_max_entries_the_oldest_stored_go_first() -> None:
    s = store(max_entries=3)
    for i in range(3):
        await s.add(A if i % 2 else B, basis(i), f"q{i}", b"", 60)
    await s.search(B, basis(0), 1, 0.0)  # FIFO: a search does not keep an entry
    await s.add(A, basis(3), "q3", b"", 60)
    await s.add(A, basis(1), "q1", b"", 60)  # adding again counts as new: q1 is now the newest
    await s.add(B, basis(4), "q4", b"", 60)
    assert len(s) == 3
    assert {n.query for n in await s.search(A, basis(0), 9, -1.0)} == {"q3", "q1"}
    assert {n.query for n in await s.search(B, basis(0), 9, -1.0)} == {"q4"}


async def test_adding_the_same_query_replaces_it_and_delete_removes_one() -> None:
    s = store()
    await s.add(A, basis(0), "q", b"old", 60)
    await s.add(A, basis(1), "q", b"new", 60)
    await s.add(B, basis(0), "q", b"other scope", 60)
    assert len(s) == 2
    [found] = await s.search(A, basis(0), 5, -1.0)
    assert found.answer == b"new" and found.score == pytest.approx(0.0, abs=1e-6)
    await s.delete(found.entry_id)
    await s.delete(found.entry_id)  # gone already: nothing
    await s.delete("not an id")
    assert await s.search(A, basis(0), 5, -1.0) == []
    assert len(await s.search(B, basis(0), 5, -1.0)) == 1


async def test_clear_by_tenant_model_age_and_prefix() -> None:
    clock = Clock()
    s = store(clock=clock)
    scopes = {
        "t1-m1": scope("t1", "m1", "1" * 64), "t1-m2": scope("t1", "m2", "2" * 64),
        "t2-m1": scope("t2", "m1", "3" * 64), "none-m1": scope(None, "m1", "4" * 64),
        "odd": scope("t:1", "m/1", "5" * 64),
    }
    for i, name in enumerate(scopes.values()):
        await s.add(name, basis(i), "old", b"", 1000)
    clock.now += 100
    for i, name in enumerate(scopes.values()):
        await s.add(name, basis(i), "new", b"", 1000)
    await s.add(scopes["t2-m1"], basis(5), "expired", b"", 1)
    clock.now += 50
    assert await s.clear(tenant="t1", older_than_s=120) == 2  # the two old entries of t1
    assert await s.clear(model="m1", tenant="t2") == 2  # the expired one is dropped, uncounted
    assert await s.clear(key_prefix=scopes["odd"][:20]) == 2
    assert await s.clear(tenant="t:1") == 0 and await s.clear(model="m/1") == 0
    assert await s.clear(model="m1") == 3  # the no-tenant scope's two, t1-m1's new one
    assert await s.clear() == 1  # t1-m2's new one
    assert len(s) == 0
    await s.add("v2:-:m1:" + "0" * 64, basis(0), "another version", b"", 60)
    assert await s.clear() == 0


# ---------------------------------------------------------------------------- against a brute-force model

TOL = 1e-5


class Reference:
    """What the store should hold: a list of live entries, oldest first."""

    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        self.rows: list[dict[str, Any]] = []

    def add(self, scope: str, vector: np.ndarray, query: str, now: float, ttl: float) -> None:
        self.expire(now)
        self.rows = [r for r in self.rows if not (r["scope"] == scope and r["query"] == query)]
        if ttl > 0:
            self.rows.append({"scope": scope, "vector": unit(vector), "query": query, "expires": now + ttl})
        self.rows = self.rows[-self.max_entries:]

    def expire(self, now: float) -> None:
        self.rows = [r for r in self.rows if r["expires"] > now]

    def scored(self, scope: str, vector: np.ndarray) -> dict[str, float]:
        q = unit(vector).astype(np.float64)
        return {r["query"]: float(r["vector"].astype(np.float64) @ q) for r in self.rows if r["scope"] == scope}


def check(found: list[Neighbour], expected: dict[str, float], k: int, min_score: float) -> None:
    """`found` is what an exact top-k search of `expected` (query -> score) gives, ties and rounding aside."""
    assert len(found) <= k and len({n.query for n in found}) == len(found)
    assert [n.score for n in found] == sorted((n.score for n in found), reverse=True)
    for n in found:
        assert n.query in expected and abs(n.score - expected[n.query]) < TOL and n.score >= min_score - TOL
    floor = found[-1].score + TOL if len(found) == k else min_score + TOL
    assert {q for q, score in expected.items() if score >= floor} <= {n.query for n in found}


ops = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.integers(0, 2), st.integers(0, 11), st.integers(0, 2**32 - 1),
                  st.sampled_from([0, 1, 5, 50])),
        st.tuples(st.just("search"), st.integers(0, 2), st.integers(1, 6), st.integers(0, 2**32 - 1),
                  st.sampled_from([-1.0, 0.0, 0.3])),
        st.tuples(st.just("delete"), st.integers(0, 2), st.integers(0, 11), st.just(0), st.just(0)),
        st.tuples(st.just("tick"), st.just(0), st.just(0), st.just(0), st.sampled_from([1, 3, 10])),
    ),
    max_size=80,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=ops, max_entries=st.integers(1, 12), ann_threshold=st.sampled_from([2, 4, 10**6]))
async def test_the_store_agrees_with_a_brute_force_model(
    ops: list[tuple[str, int, int, int, float]], max_entries: int, ann_threshold: int
) -> None:
    clock = Clock()
    s = MemoryVectorStore(max_entries, dimensions=8, ann_threshold=ann_threshold, clock=clock)
    ref = Reference(max_entries)
    scopes = [scope(None, "m", str(i) * 64) for i in range(3)]
    for op, sc, n, seed, arg in ops:
        name = scopes[sc]
        if op == "add":
            vector = np.random.default_rng(seed).standard_normal(8).astype(np.float32)
            await s.add(name, vector, f"q{n}", f"{seed}".encode(), arg)
            ref.add(name, vector, f"q{n}", clock.now, arg)
        elif op == "search":
            vector = np.random.default_rng(seed).standard_normal(8).astype(np.float32)
            found = await s.search(name, vector, n, arg)
            ref.expire(clock.now)
            check(found, ref.scored(name, vector), n, arg)
        elif op == "delete":
            ref.expire(clock.now)
            victims = [r for r in ref.rows if r["scope"] == name and r["query"] == f"q{n}"]
            for hit in await s.search(name, np.ones(8, dtype=np.float32), 20, -1.0):
                if hit.query == f"q{n}":
                    await s.delete(hit.entry_id)
            ref.rows = [r for r in ref.rows if not any(r is v for v in victims)]  # rows hold arrays: by identity
        else:
            clock.now += arg
        ref.expire(clock.now)
        assert len(s) <= max_entries
        for other in scopes:  # every live entry, and only those, in its own scope (a call drops the expired)
            assert await s.search(other, np.ones(8, dtype=np.float32), 1, 2.0) == []
            assert s.scope_size(other) == len(ref.scored(other, np.ones(8)))


# ---------------------------------------------------------------------------- the HNSW index

def clustered(rng: np.random.Generator, n: int, dim: int, centres: int = 20) -> np.ndarray:
    middle = rng.standard_normal((centres, dim))
    rows = middle[rng.integers(0, centres, n)] + 0.35 * rng.standard_normal((n, dim))
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


async def test_past_the_threshold_the_index_finds_the_exact_top_1() -> None:
    pytest.importorskip("usearch")
    rng = np.random.default_rng(11)
    data = clustered(rng, 1500, 64)
    exact = MemoryVectorStore(10_000, dimensions=64, ann_threshold=10**9)
    ann = MemoryVectorStore(10_000, dimensions=64, ann_threshold=200)
    for i, row in enumerate(data):
        await exact.add(A, row, f"q{i}", b"", 60)
        await ann.add(A, row, f"q{i}", b"", 60)
        if i == 150:
            assert not ann.uses_ann(A)  # building from half the threshold, still exact
    assert ann.uses_ann(A) and not exact.uses_ann(A)
    queries = data[rng.integers(0, len(data), 200)] + 0.1 * rng.standard_normal((200, 64)).astype(np.float32)
    agree = 0
    for q in queries:
        [e], [a] = await exact.search(A, q, 1, -1.0), await ann.search(A, q, 1, -1.0)
        agree += e.entry_id == a.entry_id
        if e.entry_id == a.entry_id:
            assert a.score == pytest.approx(e.score, abs=1e-6)  # re-scored exactly
    assert agree >= 196
    # deletes reach the index: a deleted entry is never a candidate
    for q in queries[:50]:
        [top] = await ann.search(A, q, 1, -1.0)
        await ann.delete(top.entry_id)
        assert all(n.entry_id != top.entry_id for n in await ann.search(A, q, 5, -1.0))
    # shrinking far below the threshold drops the index, and the search is exact again
    while ann.scope_size(A) >= 50:
        for n in await ann.search(A, queries[0], 100, -1.0):
            await ann.delete(n.entry_id)
    assert not ann.uses_ann(A)


async def test_without_usearch_the_store_stays_exact_and_says_so_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(vectors, "_UsearchIndex", None)
    monkeypatch.setattr(vectors, "_warned_no_usearch", False)
    s = MemoryVectorStore(1000, dimensions=DIM, ann_threshold=4)
    with caplog.at_level(logging.WARNING, logger="keel.cache.vectors"):
        for i in range(20):
            await s.add(A if i % 2 else B, mix(i % DIM, (i + 1) % DIM, 0.9), f"q{i}", b"", 60)
    assert not s.uses_ann(A)
    assert len([r for r in caplog.records if "usearch" in r.message]) == 1
    assert len(await s.search(A, basis(1), 20, -1.0)) == 10
