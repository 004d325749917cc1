"""The in-process exact cache store: entries expire after their TTL, and past `max_bytes` the least
recently used go first."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable


class MemoryStore:
    """Byte values by key, bounded by their total size. `clock` is injectable for tests."""

    def __init__(self, max_bytes: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_bytes = max_bytes
        self.clock = clock
        self.size = 0  # bytes held: keys and values
        self._entries: OrderedDict[str, tuple[float, bytes]] = OrderedDict()  # key -> (expires at, value)

    def __len__(self) -> int:
        return len(self._entries)

    async def get(self, key: str) -> bytes | None:
        found = self._entries.get(key)
        if found is None:
            return None
        expires, value = found
        if self.clock() >= expires:
            self._drop(key)
            return None
        self._entries.move_to_end(key)
        return value

    async def set(self, key: str, value: bytes, ttl_s: float) -> None:
        cost = len(key) + len(value)
        if cost > self.max_bytes:
            return  # larger than the whole cache: never stored
        if key in self._entries:
            self._drop(key)
        self._entries[key] = (self.clock() + ttl_s, value)
        self.size += cost
        while self.size > self.max_bytes:
            self._drop(next(iter(self._entries)))

    async def delete(self, key: str) -> None:
        if key in self._entries:
            self._drop(key)

    async def close(self) -> None:
        self._entries.clear()
        self.size = 0

    def _drop(self, key: str) -> None:
        _, value = self._entries.pop(key)
        self.size -= len(key) + len(value)
