"""Answer caches: the exact cache stage and its stores (docs/caching.md)."""

from keel.cache.entry import CachedAnswer
from keel.cache.key import cache_key
from keel.cache.memory import MemoryStore
from keel.cache.stage import ExactCache

__all__ = ["CachedAnswer", "ExactCache", "MemoryStore", "cache_key"]
