"""The call path's way to a key: a short-lived cache in front of the store.

A found key is reused for `ttl_s` (0.5 s by default), so a key revoked on one replica stops
working on every other within that time, with one database read per key per `ttl_s` at most.
Unknown digests are remembered too, in a bounded LRU, so a flood of made-up keys costs one read
each and cannot grow memory. Concurrent misses of one digest share one read.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Protocol

from keel.auth.keys import VirtualKey


class KeySource(Protocol):
    def find(self, key_digest: str) -> VirtualKey | None: ...


class KeyLookup:
    def __init__(
        self, source: KeySource, *, ttl_s: float = 0.5, negative_size: int = 10_000, max_keys: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.source = source
        self.ttl_s = ttl_s
        self.negative_size = negative_size
        self.max_keys = max_keys
        self.clock = clock
        self._known: dict[str, tuple[float, VirtualKey]] = {}
        self._unknown: OrderedDict[str, float] = OrderedDict()
        self._reading: dict[str, asyncio.Future[VirtualKey | None]] = {}
        self.reads = 0  # database reads so far (tests and metrics)

    async def find(self, key_digest: str) -> VirtualKey | None:
        now = self.clock()
        known = self._known.get(key_digest)
        if known is not None and now - known[0] < self.ttl_s:
            return known[1]
        seen = self._unknown.get(key_digest)
        if seen is not None and now - seen < self.ttl_s:
            return None
        reading = self._reading.get(key_digest)
        if reading is not None:
            return await asyncio.shield(reading)
        future: asyncio.Future[VirtualKey | None] = asyncio.get_running_loop().create_future()
        self._reading[key_digest] = future
        try:
            self.reads += 1
            key = await asyncio.to_thread(self.source.find, key_digest)
            self._remember(key_digest, key, self.clock())
            future.set_result(key)
            return key
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: no "never retrieved" warning when nobody else waited
            raise
        finally:
            del self._reading[key_digest]

    def forget(self, key_digest: str) -> None:
        """Drop what is known of a key (this replica revoked it: no need to wait for the TTL)."""
        self._known.pop(key_digest, None)
        self._unknown.pop(key_digest, None)

    def _remember(self, key_digest: str, key: VirtualKey | None, now: float) -> None:
        if key is not None:
            self._unknown.pop(key_digest, None)
            if len(self._known) >= self.max_keys:
                self._known.clear()  # only stale entries cost a re-read
            self._known[key_digest] = (now, key)
            return
        self._known.pop(key_digest, None)
        self._unknown[key_digest] = now
        self._unknown.move_to_end(key_digest)
        while len(self._unknown) > self.negative_size:
            self._unknown.popitem(last=False)
