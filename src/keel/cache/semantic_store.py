"""What the semantic cache asks of a vector store: the nearest stored queries of one scope, by cosine
similarity of unit vectors, and their answers.

A scope is everything that must be equal for two requests to share an answer beyond the wording of the
last user turn: tenant, model, the conversation before that turn (the system prompt first), and the
sampling and format parameters (`keel.cache.semantic_key.semantic_scope`). It reads
`s1:<tenant>:<model>:<sha256>`, so invalidation by tenant and model reads it as the exact cache's
`KeyScope` reads its keys. A store never returns an entry of another scope.

Backends: `keel.cache.vectors.MemoryVectorStore` (this process: NumPy exact search, an HNSW index past
a measured size) and `keel.cache.postgres_store.PostgresVectorStore` (pgvector, shared by replicas).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

SCOPE_VERSION = "s1"


@dataclass(frozen=True, slots=True)
class Neighbour:
    """A stored entry near a query: its id in the store, its cosine similarity to the query (1 is the
    same direction), the text that was embedded, and the answer (`CachedAnswer.dumps()`)."""

    entry_id: str
    score: float
    query: str
    answer: bytes


class VectorStore(Protocol):
    async def search(
        self, scope: str, vector: npt.NDArray[np.float32], k: int, min_score: float
    ) -> list[Neighbour]:
        """At most `k` live entries of `scope` with a score of at least `min_score`, best first."""
        ...

    async def add(
        self, scope: str, vector: npt.NDArray[np.float32], query: str, answer: bytes, ttl_s: float
    ) -> None:
        """Store an entry, served until `ttl_s` seconds from now. Adding a query already stored in the
        scope (same text) replaces it."""
        ...

    async def delete(self, entry_id: str) -> None:
        """Remove one entry (one that no longer parses); nothing when it is gone already."""
        ...

    async def clear(
        self, model: str | None = None, tenant: str | None = None, older_than_s: float | None = None,
        key_prefix: str | None = None,
    ) -> int:
        """Remove the live entries of `model`, of `tenant`, stored more than `older_than_s` seconds ago, and
        whose scope starts with `key_prefix` (each given narrows it; none: all); how many were removed."""
        ...

    async def close(self) -> None: ...
