"""Where budget counters live: in this process, or in Redis for replicas that share them.

Both keep the same record per counter: `spent`, `reserved`, one hold per reservation with its
expiry, and a marker per threshold already reported. In Redis a counter is a hash (`spent`,
`reserved`, `r:<reservation>` holds, `a:<limit>:<share>` markers) plus a sorted set of hold
expiries (`<key>:holds`); Lua scripts update all of a call's counters in one atomic step, and
every key expires some time after its window ends. Amounts cross into Lua as decimal strings and
are added with HINCRBY, so they stay exact 64-bit integers.
"""

from __future__ import annotations

import fnmatch
import itertools
import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from keel.budgets.counters import Counter, Crossing, Refusal
from keel.cost.money import Nanos
from keel.errors import BudgetStoreUnavailable

if TYPE_CHECKING:
    from redis.asyncio import Redis

log = logging.getLogger("keel.budgets")

DEFAULT_PREFIX = "keel:budget"


@dataclass(slots=True)
class _Count:
    spent: Nanos = 0
    reserved: Nanos = 0
    holds: dict[str, tuple[Nanos, float]] = field(default_factory=dict)  # reservation → (amount, until)
    reported: set[str] = field(default_factory=set)
    expires_at: int | None = None
    next_lapse: float = math.inf  # the earliest hold expiry: nothing to scan before it

    def hold(self, reservation: str, amount: Nanos, until: float) -> None:
        self.reserved += amount
        self.holds[reservation] = (amount, until)
        self.next_lapse = min(self.next_lapse, until)

    def drop_lapsed(self, now: float) -> None:
        if now < self.next_lapse:
            return
        for reservation, (amount, until) in list(self.holds.items()):
            if until <= now:
                del self.holds[reservation]
                self.reserved -= amount
        self.next_lapse = min((until for _, until in self.holds.values()), default=math.inf)


class MemoryBudgetBackend:
    """Counters in this process. No method awaits while it updates, so under asyncio each is
    atomic; one process only (several workers must share Redis)."""

    shared = False

    def __init__(self, prefix: str = DEFAULT_PREFIX) -> None:
        self.prefix = prefix
        self._counts: dict[str, _Count] = {}
        self._rules: dict[str, str] = {}
        self._ids = itertools.count(1)
        self._swept_at = -math.inf

    def _count(self, key: str, now: float, expires_at: int | None = None, create: bool = True) -> _Count:
        count = self._counts.get(key)
        if count is not None and count.expires_at is not None and count.expires_at <= now:
            count = None
            del self._counts[key]
        if count is None:
            count = _Count(expires_at=expires_at)
            if create:
                self._sweep(now)
                self._counts[key] = count
        count.drop_lapsed(now)
        return count

    def _sweep(self, now: float) -> None:
        """Forget counters of windows long over (each day brings new ones), at most once a minute."""
        if now - self._swept_at < 60:
            return
        self._swept_at = now
        for key in [k for k, c in self._counts.items() if c.expires_at is not None and c.expires_at <= now]:
            del self._counts[key]

    async def reserve(
        self, counters: list[Counter], reservation: str, amount: Nanos, now: float, hold_until: float
    ) -> Refusal | None:
        counts = [self._count(c.key, now, c.expires_at) for c in counters]
        for i, (counter, count) in enumerate(zip(counters, counts, strict=True)):
            if count.spent + count.reserved + amount > counter.limit:
                alert = (
                    bool(counter.cap_marker) and count.spent + amount > counter.limit
                    and counter.cap_marker not in count.reported
                )
                if alert:
                    count.reported.add(counter.cap_marker)
                return Refusal(i, count.spent, count.reserved, alert)
        for count in counts:
            count.hold(reservation, amount, hold_until)
        return None

    async def settle(self, counters: list[Counter], reservation: str, actual: Nanos, now: float) -> list[Crossing]:
        crossings: list[Crossing] = []
        for i, counter in enumerate(counters):
            count = self._count(counter.key, now, counter.expires_at)
            held = count.holds.pop(reservation, None)
            if held is not None:
                count.reserved -= held[0]
            count.spent += actual
            for j, threshold in enumerate(counter.thresholds):
                if count.spent >= threshold.nanos and threshold.marker not in count.reported:
                    count.reported.add(threshold.marker)
                    crossings.append(Crossing(i, j, count.spent))
        return crossings

    async def snapshot(self, keys: list[str], now: float) -> list[tuple[Nanos, Nanos]]:
        counts = [self._count(key, now, create=False) for key in keys]
        return [(count.spent, count.reserved) for count in counts]

    async def scan(self, pattern: str) -> list[str]:
        return [key for key in self._counts if fnmatch.fnmatchcase(key, pattern)]

    async def rules(self) -> list[tuple[str, str]]:
        return list(self._rules.items())

    async def add_rule(self, rule_json: str) -> str:
        rule_id = str(next(self._ids))
        self._rules[rule_id] = rule_json
        return rule_id

    async def remove_rule(self, rule_id: str) -> bool:
        return self._rules.pop(rule_id, None) is not None

    async def close(self) -> None:
        """Nothing to release."""


# KEYS: per counter, its hash then its holds set. Lapsed holds are dropped from both.
_DROP_LAPSED = """
local function drop_lapsed(h, z, now)
  local gone = redis.call('ZRANGEBYSCORE', z, '-inf', now)
  for _, id in ipairs(gone) do
    local amount = redis.call('HGET', h, 'r:' .. id)
    if amount then
      redis.call('HINCRBY', h, 'reserved', '-' .. amount)
      redis.call('HDEL', h, 'r:' .. id)
    end
    redis.call('ZREM', z, id)
  end
end
local function expire(h, z, at)
  if at ~= '0' then
    redis.call('EXPIREAT', h, at)
    redis.call('EXPIREAT', z, at)
  end
end
"""

# ARGV: now, reservation, amount, hold_until, then per counter: limit, expire_at (0: never), cap marker.
# Returns {1} when held everywhere, else {0, counter index (1-based), spent, reserved, cap alert 0/1}.
# The cap is reported when the call would not fit even if every call in flight cost nothing: a
# refusal only because of holds is a burst of concurrency, not a spent budget.
_RESERVE = _DROP_LAPSED + """
local n = #KEYS / 2
for i = 1, n do drop_lapsed(KEYS[2*i-1], KEYS[2*i], ARGV[1]) end
local amount = tonumber(ARGV[3])
for i = 1, n do
  local h, base = KEYS[2*i-1], 4 + 3*(i-1)
  local v = redis.call('HMGET', h, 'spent', 'reserved')
  local spent, reserved = v[1] or '0', v[2] or '0'
  if tonumber(spent) + tonumber(reserved) + amount > tonumber(ARGV[base+1]) then
    local alert = 0
    if ARGV[base+3] ~= '' and tonumber(spent) + amount > tonumber(ARGV[base+1])
        and redis.call('HSETNX', h, ARGV[base+3], ARGV[1]) == 1 then
      alert = 1
      expire(h, KEYS[2*i], ARGV[base+2])
    end
    return {0, i, spent, reserved, alert}
  end
end
for i = 1, n do
  local h, z = KEYS[2*i-1], KEYS[2*i]
  redis.call('HINCRBY', h, 'reserved', ARGV[3])
  redis.call('HSET', h, 'r:' .. ARGV[2], ARGV[3])
  redis.call('ZADD', z, ARGV[4], ARGV[2])
  expire(h, z, ARGV[4 + 3*(i-1) + 2])
end
return {1}
"""

# ARGV: now, reservation, actual, then per counter: expire_at, k, then k pairs (marker, nanos).
# Returns {counter index, threshold index (both 1-based), spent} for each threshold reached first here.
_SETTLE = _DROP_LAPSED + """
local crossed = {}
local p = 4
for i = 1, #KEYS / 2 do
  local h, z = KEYS[2*i-1], KEYS[2*i]
  local held = redis.call('HGET', h, 'r:' .. ARGV[2])
  if held then
    redis.call('HINCRBY', h, 'reserved', '-' .. held)
    redis.call('HDEL', h, 'r:' .. ARGV[2])
  end
  redis.call('ZREM', z, ARGV[2])
  local spent = redis.call('HINCRBY', h, 'spent', ARGV[3])
  expire(h, z, ARGV[p])
  local k = tonumber(ARGV[p+1])
  for j = 1, k do
    local marker = ARGV[p + 2*j]
    if spent >= tonumber(ARGV[p + 2*j + 1]) and redis.call('HSETNX', h, marker, ARGV[1]) == 1 then
      table.insert(crossed, {i, j, spent})
    end
  end
  p = p + 2 + 2*k
end
return crossed
"""

# ARGV: now. Returns {spent, reserved} per counter.
_SNAPSHOT = _DROP_LAPSED + """
local out = {}
for i = 1, #KEYS / 2 do
  drop_lapsed(KEYS[2*i-1], KEYS[2*i], ARGV[1])
  local v = redis.call('HMGET', KEYS[2*i-1], 'spent', 'reserved')
  table.insert(out, {v[1] or '0', v[2] or '0'})
end
return out
"""


class RedisBudgetBackend:
    """Counters in Redis, shared by every replica that uses the same Redis and prefix.

    The scripts touch several keys at once, so on Redis Cluster every key of one call must live
    in one slot; plain Redis (or one primary with replicas) has no such limit.
    """

    shared = True

    def __init__(self, redis: Redis | str, prefix: str = DEFAULT_PREFIX, *, max_connections: int = 64) -> None:
        if isinstance(redis, str):
            try:
                from redis.asyncio import BlockingConnectionPool, Redis
            except ImportError:
                raise ImportError(
                    "state.redis_url is set but the redis package is not installed: run pip install 'keel[redis]'"
                ) from None

            pool = BlockingConnectionPool.from_url(redis, max_connections=max_connections, timeout=10)
            redis = Redis(connection_pool=pool)
        self.redis = redis
        self.prefix = prefix
        self._reserve = redis.register_script(_RESERVE)
        self._settle = redis.register_script(_SETTLE)
        self._snapshot = redis.register_script(_SNAPSHOT)

    async def reserve(
        self, counters: list[Counter], reservation: str, amount: Nanos, now: float, hold_until: float
    ) -> Refusal | None:
        args: list[Any] = [repr(now), reservation, str(amount), repr(hold_until)]
        for counter in counters:
            args += [str(counter.limit), str(counter.expires_at or 0), counter.cap_marker]
        result = await self._run(self._reserve, _keys(counters), args)
        if int(result[0]) == 1:
            return None
        return Refusal(int(result[1]) - 1, int(result[2]), int(result[3]), int(result[4]) == 1)

    async def settle(self, counters: list[Counter], reservation: str, actual: Nanos, now: float) -> list[Crossing]:
        args: list[Any] = [repr(now), reservation, str(actual)]
        for counter in counters:
            args += [str(counter.expires_at or 0), str(len(counter.thresholds))]
            for threshold in counter.thresholds:
                args += [threshold.marker, str(threshold.nanos)]
        result = await self._run(self._settle, _keys(counters), args)
        return [Crossing(int(i) - 1, int(j) - 1, int(spent)) for i, j, spent in result]

    async def snapshot(self, keys: list[str], now: float) -> list[tuple[Nanos, Nanos]]:
        if not keys:
            return []
        result = await self._run(self._snapshot, [k for key in keys for k in (key, key + ":holds")], [repr(now)])
        return [(int(spent), int(reserved)) for spent, reserved in result]

    async def scan(self, pattern: str) -> list[str]:
        with _store_errors():
            return [_text(key) async for key in self.redis.scan_iter(match=pattern, count=1000)]

    async def rules(self) -> list[tuple[str, str]]:
        with _store_errors():
            stored = await self.redis.hgetall(f"{self.prefix}:rules")
        pairs = [(_text(rule_id), _text(text)) for rule_id, text in stored.items()]
        return sorted(pairs, key=lambda pair: int(pair[0]))

    async def add_rule(self, rule_json: str) -> str:
        with _store_errors():
            rule_id = str(await self.redis.incr(f"{self.prefix}:rules:last-id"))
            await self.redis.hset(f"{self.prefix}:rules", rule_id, rule_json)
        return rule_id

    async def remove_rule(self, rule_id: str) -> bool:
        with _store_errors():
            return int(await self.redis.hdel(f"{self.prefix}:rules", rule_id)) == 1

    async def close(self) -> None:
        await self.redis.aclose()

    async def _run(self, script: Any, keys: list[str], args: list[Any]) -> Any:
        with _store_errors():
            return await script(keys=keys, args=args)


def _keys(counters: list[Counter]) -> list[str]:
    return [k for counter in counters for k in (counter.key, counter.key + ":holds")]


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


@contextmanager
def _store_errors() -> Iterator[None]:
    """Redis failures as one precise error; the details go to the log, not to clients."""
    from redis.exceptions import RedisError

    try:
        yield
    except (RedisError, OSError) as exc:
        log.error("budget store (Redis) failed: %s: %s", type(exc).__name__, exc)
        raise BudgetStoreUnavailable(
            "The budget store did not answer, so calls are refused rather than run unmetered; try again "
            "shortly. (Operators: check that Redis is up and that state.redis_url is right.)"
        ) from exc
