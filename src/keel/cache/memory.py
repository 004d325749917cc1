"""The in-process exact cache store: entries expire after their TTL, and past `max_bytes` the least
recently used go first."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from typing import NamedTuple

from keel.cache.key import KeyScope


class _Entry(NamedTuple):
    stored_at: float  # by `clock`: what invalidation by age reads
    expires: float
    value: bytes


class MemoryStore:
    """Byte values by key, bounded by their total size. `clock` is injectable for tests."""

    def __init__(self, max_bytes: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_bytes = max_bytes
        self.clock = clock
        self.size = 0  # bytes held: keys and values
        self._entries: OrderedDict[str, _Entry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    async def get(self, key: str) -> bytes | None:
        found = self._entries.get(key)
        if found is None:
            return None
        if self.clock() >= found.expires:
            self._drop(key)
            return None
        self._entries.move_to_end(key)
        return found.value

    async def set(self, key: str, value: bytes, ttl_s: float) -> None:
        cost = len(key) + len(value)
        if cost > self.max_bytes:
            return  # larger than the whole cache: never stored
        if key in self._entries:
            self._drop(key)
        now = self.clock()
        # An exact-size copy: orjson.dumps returns bytes that keep its whole output buffer (16 KB for a
        # 1.3 KB answer), which `max_bytes` would not count (bench/cache.py measured 6x).
        self._entries[key] = _Entry(now, now + ttl_s, bytes(memoryview(value)))
        self.size += cost
        while self.size > self.max_bytes:
            self._drop(next(iter(self._entries)))

    async def delete(self, key: str) -> None:
        if key in self._entries:
            self._drop(key)

    async def clear(
        self, model: str | None = None, tenant: str | None = None, older_than_s: float | None = None,
        key_prefix: str | None = None,
    ) -> int:
        """Remove the live entries of `model`, of `tenant`, stored more than `older_than_s` ago and whose
        key starts with `key_prefix` (each given narrows it); how many were removed. Expired entries
        met on the way are dropped too, uncounted."""
        scope, now = KeyScope(model, tenant, key_prefix), self.clock()
        removed = 0
        for key, entry in list(self._entries.items()):
            if now >= entry.expires:
                self._drop(key)
            elif scope.matches(key) and (older_than_s is None or now - entry.stored_at >= older_than_s):
                self._drop(key)
                removed += 1
        return removed

    async def close(self) -> None:
        self._entries.clear()
        self.size = 0

    def _drop(self, key: str) -> None:
        entry = self._entries.pop(key)
        self.size -= len(key) + len(entry.value)
