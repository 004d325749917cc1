"""`/readyz`: is every backend a call needs there? One check per backend, named in the answer:

    {"status": "ready" | "not_ready", "checks": {"budget_store": {"ok": false, "detail": "..."}}}

- `started`: providers opened (the lifespan has run, and not yet begun shutting down);
- `budget_store`: with budgets in Redis (`state.redis_url`), a PING answered. Every call
  reads the budget store, so without it every call is refused with 503;
- `rate_limit_store`: with rate limits in Redis and `limits.on_backend_error: fail_closed`, a PING
  answered: without it every limited call is refused with 503 (with `fail_open` calls go on, so
  there is no check);
- `request_log`: the log store, or its spool. Spooling is a degradation, not a refusal: no
  record is lost (they are replayed when the store is back), so the gateway stays ready and
  the detail says it is spooling; records it could not keep at all (the spool's disk full, say)
  are counted in the detail too;
- `model:<deployment>`: each embedded (`local`) model loaded in its worker.

Probes must be cheap: each Redis PING is bounded by `timeout_s` and its result is kept for
`ttl_s`, so a storm of probes (many load balancers, many replicas) sends each Redis at most one
PING per `ttl_s` per replica. The other checks only read state already in memory.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from keel.wording import counted

if TYPE_CHECKING:
    from keel.engine import Keel


@dataclass(frozen=True, slots=True)
class Check:
    ok: bool
    detail: str

    def body(self) -> dict[str, Any]:
        return {"ok": self.ok, "detail": self.detail}


class RedisPing:
    """A PING to a store's Redis, at most one per `ttl_s`, each bounded by `timeout_s`; `refused` is
    the error code calls get while it is down."""

    def __init__(
        self, redis: Any, url: str, *, timeout_s: float = 0.5, ttl_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic, refused: str = "budget_store_unavailable",
    ) -> None:
        self.redis = redis
        self.where = _without_password(url)
        self.refused = refused
        self.timeout_s = timeout_s
        self.ttl_s = ttl_s
        self.clock = clock
        self.pings = 0  # sent so far: what the cache saves is visible to tests
        self._last: tuple[float, Check] | None = None
        self._lock = asyncio.Lock()  # concurrent probes wait for one PING instead of sending their own

    async def __call__(self) -> Check:
        async with self._lock:
            if self._last is not None and self.clock() - self._last[0] < self.ttl_s:
                return self._last[1]
            check = await self._ping()
            self._last = (self.clock(), check)
            return check

    async def _ping(self) -> Check:
        self.pings += 1
        try:
            async with asyncio.timeout(self.timeout_s):
                await self.redis.ping()
        except TimeoutError:
            return Check(False, f"Redis at {self.where} did not answer PING within {self.timeout_s:g} s; "
                                f"calls are refused ({self.refused}) until it does")
        except Exception as exc:  # redis-py's errors and OSError alike: any failure means not ready
            return Check(False, f"Redis at {self.where} cannot be reached ({type(exc).__name__}: {exc}); "
                                f"calls are refused ({self.refused}) until it can")
        return Check(True, f"Redis at {self.where} answered PING")


class Readiness:
    """The checks of one gateway; `started` is set by its lifespan."""

    def __init__(self, keel: Keel, *, redis_timeout_s: float = 0.5, redis_ttl_s: float = 1.0) -> None:
        self.keel = keel
        self.started = False
        self.budget_store: RedisPing | None = None
        redis = getattr(keel.budgets.backend, "redis", None)  # only the Redis backend has one
        url = keel.config.state.redis_url
        if redis is not None and url:
            self.budget_store = RedisPing(redis, url, timeout_s=redis_timeout_s, ttl_s=redis_ttl_s)
        # Rate limits in Redis refuse every limited call while it is down only when they fail closed.
        self.rate_limit_store: RedisPing | None = None
        limiter = keel.rate_limits
        redis = getattr(limiter.backend, "redis", None) if limiter is not None else None  # the Redis backend's
        url = keel.config.limits.redis_url or keel.config.state.redis_url
        if limiter is not None and redis is not None and url and limiter.on_backend_error == "fail_closed":
            self.rate_limit_store = RedisPing(redis, url, timeout_s=redis_timeout_s, ttl_s=redis_ttl_s,
                                              refused="rate_limit_store_unavailable")

    async def report(self) -> tuple[bool, dict[str, Any]]:
        """Whether the gateway is ready, and the body of `/readyz`."""
        checks = {"started": Check(True, "providers started") if self.started
                  else Check(False, "starting (or shutting down): providers are not open")}
        if self.budget_store is not None:
            checks["budget_store"] = await self.budget_store()
        if self.rate_limit_store is not None:
            checks["rate_limit_store"] = await self.rate_limit_store()
        checks["request_log"] = self._request_log()
        for deployments in self.keel.deployments.values():
            for dep in deployments:
                loaded = getattr(dep.provider, "loaded", None)  # only the embedded model has this
                if loaded is not None:
                    checks[f"model:{dep.name}"] = (
                        Check(True, "the embedded model is loaded") if loaded
                        else Check(False, "the embedded model is not loaded"))
        ready = all(check.ok for check in checks.values())
        return ready, {"status": "ready" if ready else "not_ready",
                       "checks": {name: check.body() for name, check in checks.items()}}

    def _request_log(self) -> Check:
        writer = self.keel.writer
        url = writer.store.safe_url
        # Drops are said, never hidden: a full spool disk, say (the log says why of each).
        lost = (f"; {counted(writer.dropped, 'record')} could not be kept since start (the gateway's log says why)"
                if writer.dropped else "")
        if writer.store_available:
            return Check(True, f"writing to {url}{lost}")
        if not writer.spooled:  # the writer thread has not reached the store yet (just started)
            return Check(True, f"connecting to {url}; records wait in the queue, or the spool, until it answers{lost}")
        return Check(True, f"degraded: {url} cannot be reached, so records are spooled to {writer.spool.path} "
                           f"({writer.spooled} so far) and written once it answers{lost or '; none is lost'}")


def _without_password(url: str) -> str:
    parts = urlsplit(url)
    host = parts.hostname or "localhost"
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"
