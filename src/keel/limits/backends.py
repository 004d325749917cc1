"""Where rate-limit counters live: in this process, or in Redis for replicas that share them.

Both are the `limits` library's sliding-window counter on its own storage, keys and arithmetic: a
hit of cost N is atomic and a refused hit counts nothing. What the library lacks is written here:

- correcting a hit after the call (a token charge made on an estimate moves to the actual count,
  or is refunded when the call failed). A correction lands in the window the hit was counted in;
  once that window no longer weighs in, there is nothing left to correct;
- in Redis, charging all of a call's limits in one step that also returns their windows. The
  library's `hit` is one round trip per limit and returns only yes or no, so a call with three
  limits took six round trips (hit, then read for the headers), about 1.7 ms of the gateway's CPU.
  `_CHARGE` is the library's own `acquire_sliding_window.lua`, run over every limit of the call
  at once, all or nothing, on the library's keys: its `get_window_stats` reads the same counts.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

from limits.aio.storage import MemoryStorage, RedisStorage
from limits.aio.strategies import SlidingWindowCounterRateLimiter
from limits.errors import StorageError

from keel.limits.windows import Window

if TYPE_CHECKING:
    from keel.limits.rules import Limit

log = logging.getLogger("keel.limits")

DEFAULT_PREFIX = "keel:limits"


class RateLimitBackend(Protocol):
    shared: bool  # counters seen by every replica (Redis), or by this process only

    async def charge(self, limits: Sequence[Limit], costs: Sequence[int]) -> tuple[bool, list[Window], list[bool]]:
        """Count each cost against its limit if every one fits, else nothing: (counted, the
        windows after it, which limits had room)."""

    async def hit(self, limit: Limit, cost: int) -> bool:
        """Count `cost` against `limit` if it fits; False (and nothing counted) if it does not."""

    async def window(self, limit: Limit) -> Window:
        """The limit's counts now."""

    async def correct(self, limit: Limit, delta: int, shift_at: float, now: float) -> None:
        """Add `delta` (negative: a refund) to the window that was current before `shift_at`
        (`Window.shift_at`, read just after the hit); never below zero."""

    async def close(self) -> None: ...


class MemoryRateLimitBackend:
    """Counters in this process (the library's `MemoryStorage`): one process only."""

    shared = False

    def __init__(self) -> None:
        self.storage = MemoryStorage()
        self.limiter = SlidingWindowCounterRateLimiter(self.storage)

    async def charge(self, limits: Sequence[Limit], costs: Sequence[int]) -> tuple[bool, list[Window], list[bool]]:
        # One limit after another, the earlier ones handed back when one refuses. Nothing awaits
        # anything real in between, so under asyncio no other call sees the steps.
        fits: list[bool] = []
        for limit, cost in zip(limits, costs, strict=True):
            fits.append(await self.hit(limit, cost))
            if not fits[-1]:
                break
        counted = all(fits)
        if not counted:
            for limit, cost in zip(limits, costs[: len(fits) - 1], strict=False):
                await self.storage.decr(self._current(limit, time.time()), cost)
            fits += [True] * (len(limits) - len(fits))  # not tried: not the reason of the refusal
        return counted, [await self.window(limit) for limit in limits], fits

    async def hit(self, limit: Limit, cost: int) -> bool:
        return await self.storage.acquire_sliding_window_entry(limit.key, limit.amount, limit.expiry, cost)

    async def window(self, limit: Limit) -> Window:
        return _window(await self.storage.get_sliding_window(limit.key, limit.expiry), limit.expiry)

    @staticmethod
    def _current(limit: Limit, at: float) -> str:
        """The library's key of the memory window current at `at`: windows start on the clock's
        multiples of the expiry and are keyed by their number."""
        return f"{limit.key}/{int(at / limit.expiry)}"

    async def correct(self, limit: Limit, delta: int, shift_at: float, now: float) -> None:
        expiry = limit.expiry
        counter = self._current(limit, shift_at - expiry / 2)  # the window that ends at shift_at
        if not delta or await self.storage.get(counter) <= 0:
            return  # nothing to correct, or the window is gone (it no longer weighs in)
        if delta < 0:
            await self.storage.decr(counter, -delta)
        else:
            await self.storage.incr(counter, 2 * expiry, delta)

    async def close(self) -> None:
        await self.storage.reset()


# The library's acquire_sliding_window.lua over several limits: all of them counted, or none.
# KEYS: per limit, its previous then current window. ARGV: per limit, its amount, expiry (s), cost.
# Returns {counted, then per limit: previous count, previous TTL (ms), current count, current TTL
# (ms), fits}; the windows as they are after the charge (or as they were, when nothing was counted).
_CHARGE = """
local n = #KEYS / 2
local out = {1}
for i = 1, n do
  local previous, current = KEYS[2*i-1], KEYS[2*i]
  local limit, expiry, cost = tonumber(ARGV[3*i-2]), tonumber(ARGV[3*i-1]) * 1000, tonumber(ARGV[3*i])
  local current_ttl = tonumber(redis.call('pttl', current))
  if current_ttl > 0 and current_ttl < expiry then
    -- the current window is over: it becomes the previous one (as the library's scripts do)
    redis.call('rename', current, previous)
    redis.call('set', current, 0, 'PX', current_ttl + expiry)
  end
  local previous_count = tonumber(redis.call('get', previous)) or 0
  local previous_ttl = math.max(tonumber(redis.call('pttl', previous)) or 0, 0)
  local current_count = tonumber(redis.call('get', current)) or 0
  current_ttl = math.max(tonumber(redis.call('pttl', current)) or 0, 0)
  local fits = 0
  if cost <= limit and math.floor(previous_count * previous_ttl / expiry) + current_count + cost <= limit then
    fits = 1
  else
    out[1] = 0
  end
  table.insert(out, previous_count)
  table.insert(out, previous_ttl)
  table.insert(out, current_count)
  table.insert(out, current_ttl)
  table.insert(out, fits)
end
if out[1] == 1 then
  for i = 1, n do
    local current, expiry, cost = KEYS[2*i], tonumber(ARGV[3*i-1]) * 1000, tonumber(ARGV[3*i])
    local base = 1 + 5*(i-1)
    if redis.call('exists', current) == 1 then
      out[base + 3] = redis.call('incrby', current, cost)
    else
      redis.call('set', current, cost, 'PX', expiry * 2)
      out[base + 3] = cost
      out[base + 4] = expiry * 2
    end
  end
end
return out
"""

# The library's Redis windows: `{key}` (current) and `{key}/-1` (previous), shifted lazily by its
# scripts when the current one is older than one expiry. Shift the same way first, then correct
# the window the hit went to; INCRBY keeps the key's TTL, and a missing key is left alone.
# KEYS: previous, current. ARGV: expiry (ms), delta, which (0: the current window, 1: the previous).
_CORRECT = """
local expiry = tonumber(ARGV[1])
local current_ttl = tonumber(redis.call('pttl', KEYS[2]))
if current_ttl > 0 and current_ttl < expiry then
  redis.call('rename', KEYS[2], KEYS[1])
  redis.call('set', KEYS[2], 0, 'PX', current_ttl + expiry)
end
local key = KEYS[2 - tonumber(ARGV[3])]
if redis.call('exists', key) == 1 then
  local value = redis.call('incrby', key, ARGV[2])
  if value < 0 then redis.call('set', key, 0, 'KEEPTTL') end
end
return 1
"""


class RedisRateLimitBackend:
    """Counters in Redis (the library's `RedisStorage` on redis-py's asyncio client), shared by every
    replica that uses the same Redis and prefix. Each counter's two keys share a hash tag, so this
    works on Redis Cluster too."""

    shared = True

    def __init__(
        self, url: str, prefix: str = DEFAULT_PREFIX, *, timeout_s: float = 2.0, max_connections: int = 128
    ) -> None:
        try:
            from redis.asyncio import ConnectionPool
            from redis.asyncio.retry import Retry
            from redis.backoff import NoBackoff
            from redis.exceptions import RedisError
        except ImportError:
            raise ImportError(
                "limits.backend is redis but the redis package is not installed: run pip install 'keel[redis]'"
            ) from None

        # No retries inside redis-py, and socket timeouts: an unreachable Redis must be noticed in
        # time for `on_backend_error` to decide, not after the client's own backoff. A burst of calls
        # waits for a connection on the semaphore (free when uncontended) rather than on redis-py's
        # blocking pool, whose checkout costs about as much CPU again as the call's one script; a
        # wait for a connection is not an outage.
        self._errors: tuple[type[Exception], ...] = (RedisError, OSError)
        self._slots = asyncio.Semaphore(max_connections)
        pool = ConnectionPool.from_url(
            url, max_connections=max_connections, socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s, retry=Retry(NoBackoff(), 0),
        )
        options: dict[str, Any] = {"connection_pool": pool}
        self.storage = RedisStorage(
            "async+" + url, implementation="redispy", key_prefix=prefix, wrap_exceptions=True, **options
        )
        self.limiter = SlidingWindowCounterRateLimiter(self.storage)
        self.redis: Any = self.storage.bridge.get_connection()  # type: ignore[attr-defined]  # redis-py's client
        self._correct = self.redis.register_script(_CORRECT)
        self._charge = self.redis.register_script(_CHARGE)

    async def charge(self, limits: Sequence[Limit], costs: Sequence[int]) -> tuple[bool, list[Window], list[bool]]:
        keys: list[str] = []
        args: list[int] = []
        for limit, cost in zip(limits, costs, strict=True):
            current = self._key(limit)
            keys += [current + "/-1", current]
            args += [limit.amount, limit.expiry, cost]
        try:
            async with self._slots:
                out = await self._charge(keys=keys, args=args)
        except self._errors as exc:
            raise StorageError(exc) from exc
        now = time.time()
        windows = [
            Window(int(out[j]), int(out[j + 1]) / 1000, int(out[j + 2]), int(out[j + 3]) / 1000, limit.expiry, now)
            for limit, j in zip(limits, range(1, len(out), 5), strict=True)
        ]
        return int(out[0]) == 1, windows, [int(out[j + 4]) == 1 for j in range(1, len(out), 5)]

    async def hit(self, limit: Limit, cost: int) -> bool:
        return await self.limiter.hit(limit.item, *limit.identifiers, cost=cost)

    async def window(self, limit: Limit) -> Window:
        return _window(await self.storage.get_sliding_window(limit.key, limit.expiry), limit.expiry)

    def _key(self, limit: Limit) -> str:
        """The library's key of a limit's current window (its previous one: this plus "/-1")."""
        return self.storage.bridge.prefixed_key("{" + limit.key + "}")

    async def correct(self, limit: Limit, delta: int, shift_at: float, now: float) -> None:
        expiry = limit.expiry
        if not delta or now >= shift_at + expiry:
            return  # the hit's window no longer weighs in
        current = self._key(limit)
        try:
            async with self._slots:
                await self._correct(keys=[current + "/-1", current], args=[expiry * 1000, delta, int(now >= shift_at)])
        except self._errors as exc:
            raise StorageError(exc) from exc

    async def close(self) -> None:
        await self.redis.aclose()
        await self.redis.connection_pool.disconnect()


def _window(state: tuple[int, float, int, float], expiry: int) -> Window:
    previous_count, previous_ttl, current_count, current_ttl = state
    return Window(previous_count, previous_ttl, current_count, current_ttl, float(expiry), time.time())
