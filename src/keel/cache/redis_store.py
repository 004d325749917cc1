"""The exact cache store in Redis, shared by every replica that uses the same Redis and prefix.

A cache is an optimisation: when Redis cannot be reached, a lookup is a miss and a store is skipped,
the call itself is answered. The outage is logged once (and its end once) and each failed operation
is counted in /metrics (`keel_cache_backend_errors_total`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

log = logging.getLogger("keel.cache")


class RedisStore:
    """Entries as Redis strings with their TTL, under `<prefix>:cache:`."""

    def __init__(self, url: str, prefix: str, *, timeout_s: float = 1.0) -> None:
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
        self.errors = 0
        self._errors: tuple[type[Exception], ...] = (RedisError, OSError)
        self._down = False

    async def get(self, key: str) -> bytes | None:
        try:
            value: bytes | None = await self.redis.get(self.prefix + key)
        except self._errors as exc:
            self._failed(exc)
            return None
        self._answered()
        return value

    async def set(self, key: str, value: bytes, ttl_s: float) -> None:
        try:
            await self.redis.set(self.prefix + key, value, px=max(1, int(ttl_s * 1000)))
        except self._errors as exc:
            self._failed(exc)
            return
        self._answered()

    async def delete(self, key: str) -> None:
        try:
            await self.redis.delete(self.prefix + key)
        except self._errors as exc:
            self._failed(exc)

    async def close(self) -> None:
        await self.redis.aclose()

    def _failed(self, exc: Exception) -> None:
        self.errors += 1
        if not self._down:
            self._down = True
            log.warning("the cache store (Redis) cannot be reached (%s); calls are answered as cache misses "
                        "until it answers again", exc)

    def _answered(self) -> None:
        if self._down:
            self._down = False
            log.info("the cache store (Redis) answers again")

    def collect(self) -> Iterable[Metric]:
        """Read at scrape time (registered in Keel's metrics registry)."""
        errors = CounterMetricFamily("keel_cache_backend_errors", "Cache lookups and stores Redis failed "
                                     "(each lookup answered as a miss)")
        errors.add_metric([], self.errors)
        up = GaugeMetricFamily("keel_cache_backend_up", "1 when the cache store answers, 0 in an outage")
        up.add_metric([], 0 if self._down else 1)
        return [errors, up]
