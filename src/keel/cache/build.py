"""The exact cache stage from keel.yaml: one store per `cache` section (the top-level one shared by
the models that do not set their own)."""

from __future__ import annotations

from keel.cache.memory import MemoryStore
from keel.cache.redis_store import RedisStore
from keel.cache.stage import CacheStore, ExactCache, ExactSetting
from keel.config import CacheConfig, KeelConfig


def exact_cache(config: KeelConfig) -> ExactCache | None:
    """The stage, or None when no model has its exact cache enabled (calls then do no cache work)."""
    stores: dict[int, CacheStore] = {}
    settings: dict[str, ExactSetting] = {}
    for model in config.models:
        section = config.cache_of(model)
        if not section.exact.enabled:
            continue
        if id(section) not in stores:
            stores[id(section)] = _store(section, config)
        settings[model.name] = ExactSetting(stores[id(section)], section.exact.ttl_s, section.exact.nondeterministic)
    return ExactCache(settings) if settings else None


def _store(section: CacheConfig, config: KeelConfig) -> CacheStore:
    if section.backend == "redis":
        url = section.redis_url or config.state.redis_url
        assert url is not None  # the config refuses a redis backend without a Redis
        return RedisStore(url, config.state.key_prefix)
    return MemoryStore(section.exact.max_bytes)
