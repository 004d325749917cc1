"""The semantic cache's in-process vector store: one index per scope, exact NumPy search while a scope is
small, an HNSW index (`usearch`) past `ann_threshold` entries, re-scored exactly from the stored vectors.

Each scope keeps its vectors in a float32 matrix that grows by doubling (and halves when a quarter full),
one row per live entry; a delete moves the last row into the freed one (swap-remove), so rows stay
packed and the search is one matrix-vector product over `[:size]`. Scores go into a scratch buffer the
store keeps (no array of the scope's size is allocated per search) and the candidates at or above
`min_score` are ranked with `argpartition`.

Past `ann_threshold` entries (measured: bench/vector_index.py, where usearch's single-query search
overtakes NumPy's on this machine) a scope searches an HNSW index instead, asking it for a few more
candidates than `k` and scoring them exactly from the matrix, so a score is always the exact cosine.
The index is built gradually, not in one go that would hold the event loop: it starts at half the
threshold and each `add` inserts its own vector and a few of the older ones, so it is complete by the
time the scope reaches the threshold; until then (or while anything is missing from it) the scope
stays on the exact search. A scope that shrinks below a quarter of the threshold drops its index.
The index stores int8 vectors (a quarter of float32's memory, faster; exact re-scoring makes up for
the coarse distances). Without usearch installed everything stays exact, logged once.

Bounds: entries expire after their TTL (never returned; removed at the next call past their expiry,
from a heap of expiry times), and past `max_entries` across all scopes the oldest stored go first
(FIFO by insertion: a search does not refresh an entry; adding a query again counts as a new entry).
Vectors are expected as unit vectors (all-MiniLM-L6-v2's, 384 dimensions); they are normalised again
on the way in, so a score is a cosine either way.
"""

from __future__ import annotations

import heapq
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt

from keel.cache.key import KeyScope
from keel.cache.semantic_store import SCOPE_VERSION, Neighbour

_UsearchIndex: Any
try:
    from usearch.index import Index as _UsearchIndex
except ImportError:  # the `local` extra is not installed: exact search only
    _UsearchIndex = None

log = logging.getLogger(__name__)

# Where usearch's single-query search overtakes NumPy's exact one on this machine (bench/vector_index.py):
# below it NumPy's product over the whole scope is at least as fast, and exact, and costs nothing to add.
# Measured (two shared cores, p50 of one search, k=5): 4k entries NumPy 0.12 ms / HNSW 0.15-0.17 ms;
# 6k 0.28 / 0.22; 10k 0.31 / 0.23; 100k 5-32 / 0.6-0.7 ms (recall@1 0.90-0.91 on near queries there).
ANN_THRESHOLD = 6000
ANN_DTYPE = "i8"  # what the HNSW index stores: candidates are re-scored from the float32 rows anyway
ANN_CONNECTIVITY = 16
ANN_EXPANSION_ADD = 64
ANN_EXPANSION_SEARCH = 128  # 64 gave recall@1 0.77 at 100k random entries, 128 0.92, 256 0.99 at 2x the time
_ANN_MIN_CANDIDATES = 16  # asked of the index at least (times 4 the `k` when more), then re-scored
_ANN_CATCH_UP = 2  # older vectors inserted into a building index per `add`
_warned_no_usearch = False


class _Entry:
    __slots__ = ("answer", "expires", "indexed", "key", "query", "scope", "slot", "stored_at")

    def __init__(self, key: int, scope: _Scope, slot: int, query: str, answer: bytes, stored_at: float,
                 expires: float) -> None:
        self.key = key
        self.scope = scope
        self.slot = slot  # its row in the scope's matrix: moves when another row is swap-removed
        self.query = query
        self.answer = answer
        self.stored_at = stored_at  # by `clock`: what clearing by age reads
        self.expires = expires
        self.indexed = False  # in the scope's HNSW index


class _Scope:
    """One scope's rows: `matrix[:size]` the vectors, `keys[:size]` the entry of each row."""

    __slots__ = ("ann", "by_query", "keys", "matrix", "name", "pending", "size")

    def __init__(self, name: str, dimensions: int) -> None:
        self.name = name
        self.matrix: npt.NDArray[np.float32] = np.empty((1, dimensions), dtype=np.float32)
        self.keys: npt.NDArray[np.int64] = np.empty(1, dtype=np.int64)
        self.size = 0
        self.by_query: dict[str, int] = {}  # query text -> entry key: adding it again replaces it
        self.ann: Any = None  # a usearch Index once the scope is past half the threshold
        self.pending: list[int] = []  # entry keys still to insert into `ann` (popped from the end)

    def resize(self, capacity: int) -> None:
        matrix = np.empty((capacity, self.matrix.shape[1]), dtype=np.float32)
        matrix[: self.size] = self.matrix[: self.size]
        keys = np.empty(capacity, dtype=np.int64)
        keys[: self.size] = self.keys[: self.size]
        self.matrix, self.keys = matrix, keys


class MemoryVectorStore:
    """The `VectorStore` of one process. `clock` is injectable for tests."""

    def __init__(
        self, max_entries: int, *, dimensions: int = 384, ann_threshold: int = ANN_THRESHOLD,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_entries < 1 or dimensions < 1 or ann_threshold < 2:
            raise ValueError("max_entries and dimensions must be positive, ann_threshold at least 2")
        self.max_entries = max_entries
        self.dimensions = dimensions
        self.ann_threshold = ann_threshold
        self.clock = clock
        self._scopes: dict[str, _Scope] = {}
        self._entries: OrderedDict[int, _Entry] = OrderedDict()  # by key, oldest stored first
        self._expiries: list[tuple[float, int]] = []  # a heap of (expires, key); stale items are skipped
        self._next_key = 0
        self._scores: npt.NDArray[np.float32] = np.empty(64, dtype=np.float32)  # scratch, grown as needed
        self._mask: npt.NDArray[np.bool_] = np.empty(64, dtype=np.bool_)
        self._query: npt.NDArray[np.float32] = np.empty(dimensions, dtype=np.float32)

    def __len__(self) -> int:
        return len(self._entries)

    def scope_size(self, scope: str) -> int:
        found = self._scopes.get(scope)
        return 0 if found is None else found.size

    def uses_ann(self, scope: str) -> bool:
        """Whether a search of `scope` goes through the HNSW index now (rather than the exact search)."""
        found = self._scopes.get(scope)
        return found is not None and self._ann_ready(found)

    # ------------------------------------------------------------------ the protocol

    async def search(
        self, scope: str, vector: npt.NDArray[np.float32], k: int, min_score: float
    ) -> list[Neighbour]:
        self._purge(self.clock())
        found = self._scopes.get(scope)
        if found is None or k < 1:
            return []
        query = self._normalised(vector, self._query)
        if self._ann_ready(found):
            ranked = self._search_ann(found, query, k, min_score)
        else:
            ranked = self._search_exact(found, query, k, min_score)
        neighbours = []
        for key, score in ranked:
            entry = self._entries[key]
            neighbours.append(Neighbour(str(key), score, entry.query, entry.answer))
        return neighbours

    async def add(
        self, scope: str, vector: npt.NDArray[np.float32], query: str, answer: bytes, ttl_s: float
    ) -> None:
        now = self.clock()
        self._purge(now)
        row = self._normalised(vector, np.empty(self.dimensions, dtype=np.float32))
        existing = self._scopes.get(scope)
        if existing is not None and query in existing.by_query:
            self._drop(existing.by_query[query])  # may remove the scope when it was its last entry
        if ttl_s <= 0:
            return  # expired already: never served
        target = self._scopes.get(scope)
        if target is None:
            target = self._scopes[scope] = _Scope(scope, self.dimensions)
        if target.size == target.matrix.shape[0]:
            target.resize(2 * target.size)
        key, slot = self._next_key, target.size
        self._next_key += 1
        target.matrix[slot] = row
        target.keys[slot] = key
        target.size += 1
        target.by_query[query] = key
        # An exact-size copy of the answer (a buffer handed in may be larger than its bytes).
        entry = _Entry(key, target, slot, query, bytes(memoryview(answer)), now, now + ttl_s)
        self._entries[key] = entry
        heapq.heappush(self._expiries, (entry.expires, key))
        self._grow_ann(target, entry)
        while len(self._entries) > self.max_entries:
            self._drop(next(iter(self._entries)))

    async def delete(self, entry_id: str) -> None:
        try:
            key = int(entry_id)
        except ValueError:
            return
        if key in self._entries:
            self._drop(key)

    async def clear(
        self, model: str | None = None, tenant: str | None = None, older_than_s: float | None = None,
        key_prefix: str | None = None,
    ) -> int:
        """Remove the live entries of `model`, of `tenant`, stored more than `older_than_s` seconds ago and
        whose scope starts with `key_prefix` (each given narrows it); how many were removed. Expired
        entries are dropped first, uncounted."""
        now = self.clock()
        self._purge(now)
        wanted = KeyScope(model, tenant, key_prefix, version=SCOPE_VERSION)
        removed = 0
        for name, scope in list(self._scopes.items()):
            if not wanted.matches(name):
                continue
            keys = [int(key) for key in scope.keys[: scope.size]]
            for key in keys:
                entry = self._entries[key]
                if older_than_s is None or now - entry.stored_at >= older_than_s:
                    self._drop(key)
                    removed += 1
        return removed

    async def close(self) -> None:
        self._scopes.clear()
        self._entries.clear()
        self._expiries.clear()

    # ------------------------------------------------------------------ search

    def _search_exact(
        self, scope: _Scope, query: npt.NDArray[np.float32], k: int, min_score: float
    ) -> list[tuple[int, float]]:
        n = scope.size
        if self._scores.shape[0] < n:
            capacity = max(n, 2 * self._scores.shape[0])
            self._scores = np.empty(capacity, dtype=np.float32)
            self._mask = np.empty(capacity, dtype=np.bool_)
        scores, mask = self._scores[:n], self._mask[:n]
        np.matmul(scope.matrix[:n], query, out=scores)
        np.greater_equal(scores, min_score, out=mask)
        rows = np.flatnonzero(mask)  # as many as pass min_score: few, for a cache's threshold
        if rows.shape[0] > k:
            rows = rows[np.argpartition(scores[rows], -k)[-k:]]
        rows = rows[np.argsort(-scores[rows], kind="stable")]
        return [(int(scope.keys[row]), float(scores[row])) for row in rows]

    def _search_ann(
        self, scope: _Scope, query: npt.NDArray[np.float32], k: int, min_score: float
    ) -> list[tuple[int, float]]:
        count = min(scope.size, max(4 * k, _ANN_MIN_CANDIDATES))
        found = scope.ann.search(query, count)
        rows = []
        for key in found.keys.tolist():
            entry = self._entries.get(key)
            if entry is not None and entry.scope is scope:  # always, unless the index is behind
                rows.append(entry.slot)
        if not rows:
            return []
        scores = scope.matrix[rows] @ query  # exact cosines of at most `count` rows
        ranked = sorted(((float(score), row) for score, row in zip(scores.tolist(), rows, strict=True)
                         if score >= min_score), key=lambda pair: -pair[0])[:k]
        return [(int(scope.keys[row]), score) for score, row in ranked]

    # ------------------------------------------------------------------ the HNSW index

    def _ann_ready(self, scope: _Scope) -> bool:
        return scope.ann is not None and not scope.pending and scope.size >= self.ann_threshold

    def _grow_ann(self, scope: _Scope, entry: _Entry) -> None:
        """After `entry` was added to `scope`: start the index at half the threshold, insert the entry and
        catch up on older rows."""
        if scope.ann is None:
            if scope.size < max(1, self.ann_threshold // 2):
                return
            if _UsearchIndex is None:
                _warn_no_usearch()
                return
            scope.ann = _UsearchIndex(
                ndim=self.dimensions, metric="ip", dtype=ANN_DTYPE, connectivity=ANN_CONNECTIVITY,
                expansion_add=ANN_EXPANSION_ADD, expansion_search=ANN_EXPANSION_SEARCH,
            )
            scope.pending = [int(key) for key in scope.keys[: scope.size - 1]]
        self._index(scope, entry)
        for _ in range(_ANN_CATCH_UP):
            while scope.pending:
                older = self._entries.get(scope.pending.pop())
                if older is not None and older.scope is scope and not older.indexed:
                    self._index(scope, older)
                    break

    def _index(self, scope: _Scope, entry: _Entry) -> None:
        scope.ann.add(entry.key, scope.matrix[entry.slot])
        entry.indexed = True

    # ------------------------------------------------------------------ removal

    def _drop(self, key: int) -> None:
        entry = self._entries.pop(key)
        scope = entry.scope
        if entry.indexed:
            scope.ann.remove(key)
        if scope.by_query.get(entry.query) == key:
            del scope.by_query[entry.query]
        last = scope.size - 1
        if entry.slot != last:  # swap-remove: the last row moves into the freed one
            moved = int(scope.keys[last])
            scope.matrix[entry.slot] = scope.matrix[last]
            scope.keys[entry.slot] = moved
            self._entries[moved].slot = entry.slot
        scope.size = last
        if scope.size == 0:
            del self._scopes[scope.name]
            return
        if scope.ann is not None and scope.size < self.ann_threshold // 4:
            scope.ann, scope.pending = None, []
            for other in scope.keys[: scope.size].tolist():
                self._entries[other].indexed = False
        if 4 * scope.size <= scope.matrix.shape[0] and scope.matrix.shape[0] > 1:
            scope.resize(max(1, 2 * scope.size))

    def _purge(self, now: float) -> None:
        """Drop the entries expired by `now`."""
        heap = self._expiries
        while heap and heap[0][0] <= now:
            _, key = heapq.heappop(heap)
            if key in self._entries:  # else deleted, replaced or evicted before it expired
                self._drop(key)
        if len(heap) > 2 * len(self._entries) + 1024:  # too many stale items: rebuild from the live ones
            self._expiries = [(entry.expires, key) for key, entry in self._entries.items()]
            heapq.heapify(self._expiries)

    def _normalised(self, vector: npt.NDArray[np.float32], out: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        flat = np.asarray(vector, dtype=np.float32).reshape(-1)
        if flat.shape[0] != self.dimensions:
            raise ValueError(f"a vector of {flat.shape[0]} dimensions, expected {self.dimensions}")
        norm = float(np.sqrt(np.dot(flat, flat)))
        if norm > 0:
            np.multiply(flat, 1.0 / norm, out=out)
        else:
            out[:] = flat
        return out


def _warn_no_usearch() -> None:
    global _warned_no_usearch
    if not _warned_no_usearch:
        _warned_no_usearch = True
        log.warning("usearch is not installed (the `local` extra): the semantic cache's vector store "
                    "searches every scope exactly with NumPy, slower past a few thousand entries")
