"""The cache stages from keel.yaml: one store per `cache` section and kind (the top-level section's
shared by the models that do not set their own), the exact stage first, then the semantic one."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from keel.cache.health import BackendHealth
from keel.cache.memory import MemoryStore
from keel.cache.redis_store import RedisStore
from keel.cache.semantic import ReviewHook, SemanticCache, SemanticSetting
from keel.cache.semantic_store import VectorStore
from keel.cache.stage import CacheStore, ExactCache, ExactSetting
from keel.config import CacheConfig, KeelConfig
from keel.pipeline import Stage

if TYPE_CHECKING:
    from keel.embedding.shared import Embedder  # imports NumPy: only with the local extra


@dataclass(slots=True)
class Caches:
    """A `Keel`'s caches: the stages calls go through, and their stores for start-up, invalidation
    (`DELETE /admin/cache`, `keel cache clear`) and shutdown."""

    exact: ExactCache | None = None
    semantic: SemanticCache | None = None

    def stages(self) -> list[Stage]:
        """Exact first: an exact match costs no embedding."""
        return [stage for stage in (self.exact, self.semantic) if stage is not None]

    def stores(self) -> list[CacheStore | VectorStore]:
        return [*(self.exact.stores() if self.exact else ()), *(self.semantic.stores() if self.semantic else ())]

    def healths(self) -> list[BackendHealth]:
        """The shared stores' health, each once (the stores of one PostgreSQL share theirs)."""
        healths = (getattr(store, "health", None) for store in self.stores())
        return list({id(h): h for h in healths if isinstance(h, BackendHealth)}.values())

    async def start(self) -> None:
        """Create what shared stores need (PostgreSQL's tables and extension)."""
        for store in self.stores():
            start: Callable[[], Any] | None = getattr(store, "start", None)
            if start is not None:
                await start()

    async def clear(
        self, *, model: str | None = None, tenant: str | None = None, older_than_s: float | None = None,
        key_prefix: str | None = None,
    ) -> int:
        """Invalidate both caches: the entries that match every filter given (none: all); how many."""
        filters: dict[str, Any] = {"model": model, "tenant": tenant, "older_than_s": older_than_s,
                                   "key_prefix": key_prefix}
        return sum([await stage.clear(**filters) for stage in (self.exact, self.semantic) if stage is not None])

    async def close(self) -> None:
        if self.exact is not None:  # streams read for waiters that nobody reads or closes any more
            await self.exact.close()
        for store in self.stores():
            await store.close()


def build_caches(
    config: KeelConfig, embedder: Callable[[], Embedder], review: ReviewHook | None = None,
) -> Caches:
    """The configured caches. `embedder` is asked for the shared embedder only when some model has
    the semantic cache on."""
    healths: dict[str, BackendHealth] = {}  # by PostgreSQL URL: its exact and semantic stores share one
    return Caches(exact_cache(config, healths), semantic_cache(config, embedder, review, healths))


def exact_cache(config: KeelConfig, healths: dict[str, BackendHealth] | None = None) -> ExactCache | None:
    """The stage, or None when no model has its exact cache enabled (calls then do no cache work)."""
    stores: dict[int, CacheStore] = {}
    settings: dict[str, ExactSetting] = {}
    for model in config.models:
        section = config.cache_of(model)
        if not section.exact.enabled:
            continue
        if id(section) not in stores:
            stores[id(section)] = _exact_store(section, config, {} if healths is None else healths)
        settings[model.name] = ExactSetting(stores[id(section)], section.exact.ttl_s, section.exact.nondeterministic)
    return ExactCache(settings) if settings else None


def semantic_cache(
    config: KeelConfig, embedder: Callable[[], Embedder], review: ReviewHook | None = None,
    healths: dict[str, BackendHealth] | None = None,
) -> SemanticCache | None:
    """The stage, or None when no model has its semantic cache enabled."""
    stores: dict[int, VectorStore] = {}
    settings: dict[str, SemanticSetting] = {}
    for model in config.models:
        section = config.cache_of(model)
        semantic = section.semantic
        if not semantic.enabled:
            continue
        if id(section) not in stores:
            stores[id(section)] = _vector_store(section, config, {} if healths is None else healths)
        settings[model.name] = SemanticSetting(
            stores[id(section)], semantic.threshold, semantic.ttl_s, guards=semantic.guards,
            candidates=semantic.candidates, nondeterministic=semantic.nondeterministic, tools=semantic.tools,
            review_rate=semantic.review_sample_rate,
        )
    if not settings:
        return None
    from keel.embedding.quantize import vectors_name  # the standard library only: no extra needed

    return SemanticCache(settings, embedder(), review=review, vectors=vectors_name(config.embedder.quantize))


def _exact_store(section: CacheConfig, config: KeelConfig, healths: dict[str, BackendHealth]) -> CacheStore:
    if section.backend == "redis":
        url = section.redis_url or config.state.redis_url
        assert url is not None  # the config refuses a redis backend without a Redis
        return RedisStore(url, config.state.key_prefix)
    if section.backend == "postgres":
        from keel.cache.postgres_store import PostgresStore

        url = _postgres_url(section, config)
        return PostgresStore(url, health=healths.setdefault(url, BackendHealth("PostgreSQL")))
    return MemoryStore(section.exact.max_bytes)


def _vector_store(section: CacheConfig, config: KeelConfig, healths: dict[str, BackendHealth]) -> VectorStore:
    if section.semantic_backend == "postgres":
        from keel.cache.postgres_store import PostgresVectorStore

        url = _postgres_url(section, config)
        return PostgresVectorStore(url, health=healths.setdefault(url, BackendHealth("PostgreSQL")),
                                   ef_search=section.semantic.ef_search)
    from keel.cache.vectors import MemoryVectorStore

    return MemoryVectorStore(section.semantic.max_entries)


def _postgres_url(section: CacheConfig, config: KeelConfig) -> str:
    url = config.cache_postgres_url(section)
    assert url is not None  # the config refuses a postgres backend without a PostgreSQL
    return url
