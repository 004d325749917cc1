"""The exact cache store in Redis, shared by every replica that uses the same Redis and prefix.

A cache is an optimisation: when Redis cannot be reached, a lookup is a miss and a store is skipped,
the call itself is answered. The outage is logged once (and its end once) and each failed operation
is counted in /metrics (`keel_cache_backend_errors_total`).

Invalidation (`clear`) walks the keys with SCAN and MATCH (never KEYS, which blocks Redis) and removes
them with UNLINK in batches. Age is read from the entry itself (its `stored_at`, wall-clock time): the
key must stay what a lookup computes, and Redis keeps no creation time. Unlike lookups, a `clear` that
Redis cannot answer fails (`CacheStoreUnavailable`): an operator must not believe entries are gone.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client.core import Metric

from keel.cache.entry import stored_at_of
from keel.cache.health import BackendHealth
from keel.cache.key import KeyScope, glob_escape
from keel.errors import KeelError

log = logging.getLogger("keel.cache")

SCAN_BATCH = 1000  # keys asked of each SCAN step, and removed by each UNLINK at most


class CacheStoreUnavailable(KeelError):
    """The cache store could not be cleared (Redis did not answer): nothing, or only part, was removed."""

    status = 503
    type = "api_error"
    code = "cache_unavailable"


class RedisStore:
    """Entries as Redis strings with their TTL, under `<prefix>:cache:`."""

    def __init__(
        self, url: str, prefix: str, *, timeout_s: float = 1.0, clock: Callable[[], float] = time.time,
        health: BackendHealth | None = None,
    ) -> None:
        try:
            from redis.asyncio import Redis
            from redis.asyncio.retry import Retry
            from redis.backoff import NoBackoff
            from redis.exceptions import RedisError
        except ImportError:
            raise ImportError(
                "cache.backend is redis but the redis package is not installed: run pip install 'keel[redis]'"
            ) from None
        # No retries inside redis-py and short timeouts: a down Redis must cost a call little.
        self.redis: Any = Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, retry=Retry(NoBackoff(), 0)
        )
        self.prefix = prefix + ":cache:"
        self.clock = clock  # wall-clock, as entries' stored_at
        self.health = health or BackendHealth("Redis")
        self._errors: tuple[type[Exception], ...] = (RedisError, OSError)

    async def get(self, key: str) -> bytes | None:
        try:
            value: bytes | None = await self.redis.get(self.prefix + key)
        except self._errors as exc:
            self.health.failed(exc)
            return None
        self.health.answered()
        return value

    async def set(self, key: str, value: bytes, ttl_s: float) -> None:
        try:
            await self.redis.set(self.prefix + key, value, px=max(1, int(ttl_s * 1000)))
        except self._errors as exc:
            self.health.failed(exc)
            return
        self.health.answered()

    async def delete(self, key: str) -> None:
        try:
            await self.redis.delete(self.prefix + key)
        except self._errors as exc:
            self.health.failed(exc)

    async def clear(
        self, model: str | None = None, tenant: str | None = None, older_than_s: float | None = None,
        key_prefix: str | None = None,
    ) -> int:
        """Remove the entries of `model`, of `tenant`, stored more than `older_than_s` ago (an entry whose
        time is unknown or that does not parse counts as old) and whose key starts with `key_prefix`;
        how many were removed. Raises `CacheStoreUnavailable` when Redis fails on the way."""
        scope = KeyScope(model, tenant, key_prefix)
        pattern = glob_escape(self.prefix) + scope.glob()
        removed, cursor = 0, 0
        try:
            while True:
                cursor, found = await self.redis.scan(cursor, match=pattern, count=SCAN_BATCH)
                keys = [k for k in found if scope.matches(k.decode()[len(self.prefix):])]
                if keys and older_than_s is not None:
                    keys = await self._older(keys, older_than_s)
                if keys:
                    removed += int(await self.redis.unlink(*keys))
                if cursor == 0:
                    return removed
        except self._errors as exc:
            self.health.failed(exc)
            raise CacheStoreUnavailable(
                f"The cache in Redis could not be cleared ({exc}); {removed} entries were removed before it "
                "failed. Check that Redis answers (keel check), then clear again."
            ) from None

    async def _older(self, keys: list[bytes], older_than_s: float) -> list[bytes]:
        cutoff = self.clock() - older_than_s
        values: list[bytes | None] = await self.redis.mget(keys)
        return [key for key, value in zip(keys, values, strict=True)
                if value is not None and stored_at_of(value) <= cutoff]

    async def close(self) -> None:
        await self.redis.aclose()

    @property
    def errors(self) -> int:
        return self.health.errors

    def collect(self) -> Iterable[Metric]:
        """Read at scrape time (a `Keel` registers its stores' healths together instead)."""
        return self.health.collect()
