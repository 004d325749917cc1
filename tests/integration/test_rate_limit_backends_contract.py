"""The rate-limit backends' contract: one suite run against the memory store and Redis, so the two
cannot drift apart (the pattern of test_budget_backends_contract.py). What only one backend has
(an unreachable Redis, two OS processes) is tested in test_rate_limits_redis.py and the e2e tests.

Some tests use per-second limits, so that windows shift within a test; the library counts them the
same way as per-minute ones.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable

import pytest
from conftest import REDIS_URL
from limits import RateLimitItem, RateLimitItemPerMinute, RateLimitItemPerSecond
from limits.aio.storage import MemoryStorage, RedisStorage
from limits.aio.strategies import SlidingWindowCounterRateLimiter

from keel.config import parse_config
from keel.errors import RateLimited
from keel.limits import (
    Limit,
    MemoryRateLimitBackend,
    RateLimitBackend,
    RateLimiter,
    RateLimitState,
    RateRules,
    RedisRateLimitBackend,
)

OpenBackend = Callable[[], RateLimitBackend]


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[OpenBackend]:
    """Opens a backend on one shared store: each call is another replica's view of it (in memory,
    the same object: a memory store is shared only within a process)."""
    opened: list[RateLimitBackend] = []
    if request.param == "memory":
        memory = MemoryRateLimitBackend()

        def open_backend() -> RateLimitBackend:
            opened.append(memory)
            return memory
    else:
        prefix = request.getfixturevalue("redis_prefix")  # skips locally without Redis; fails in CI

        def open_backend() -> RateLimitBackend:
            opened.append(RedisRateLimitBackend(REDIS_URL, prefix))
            return opened[-1]

    yield open_backend
    for backend in {id(b): b for b in opened}.values():
        await backend.close()


def limit(amount: int, kind: str = "tokens", item: type[RateLimitItem] = RateLimitItemPerMinute,
          name: str = "t") -> Limit:
    return Limit("global", kind, item(amount, namespace=kind), ("global", name), "all calls")  # type: ignore[arg-type]


def limiter_on(backend: RateLimitBackend, limits: dict[str, object]) -> RateLimiter:
    config = parse_config({"models": [{"name": "sim", "deployments": [{"provider": "simulated"}]}],
                           "limits": limits})
    return RateLimiter(RateRules.from_config(config), backend)


# ---------------------------------------------------------------------------- hits


async def test_50_concurrent_hits_of_10_on_a_limit_of_100_let_exactly_10_through(store: OpenBackend) -> None:
    backends = [store(), store()]  # two replicas' views
    tokens = limit(100)
    results = await asyncio.gather(*(backends[i % 2].hit(tokens, 10) for i in range(50)))
    assert sum(results) == 10
    assert (await backends[0].window(tokens)).used == 100


async def test_a_refused_hit_counts_nothing(store: OpenBackend) -> None:
    backend = store()
    tokens = limit(100)
    assert await backend.hit(tokens, 70)
    assert not await backend.hit(tokens, 40)
    assert (await backend.window(tokens)).used == 70
    assert await backend.hit(tokens, 30)


async def test_the_window_read_agrees_with_the_librarys_own_stats(store: OpenBackend) -> None:
    backend = store()
    tokens = limit(1000)
    await backend.hit(tokens, 250)
    window = await backend.window(tokens)
    assert window.remaining(1000) == 750
    assert isinstance(backend, MemoryRateLimitBackend | RedisRateLimitBackend)
    storage: MemoryStorage | RedisStorage = backend.storage
    stats = await SlidingWindowCounterRateLimiter(storage).get_window_stats(tokens.item, *tokens.identifiers)
    assert stats.remaining == 750
    assert 60 <= window.reset_in() <= 120  # the count weighs in until its window has faded out


# ---------------------------------------------------------------------------- corrections


async def test_a_correction_moves_a_hit_to_the_actual_count_either_way(store: OpenBackend) -> None:
    backend = store()
    tokens = limit(1000)
    assert await backend.hit(tokens, 400)
    shift_at = (await backend.window(tokens)).shift_at
    await backend.correct(tokens, -350, shift_at, time.time())
    assert (await backend.window(tokens)).used == 50
    await backend.correct(tokens, +20, shift_at, time.time())  # the estimate was low
    assert (await backend.window(tokens)).used == 70
    await backend.correct(tokens, -500, shift_at, time.time())  # never below zero
    assert (await backend.window(tokens)).used == 0


async def test_a_correction_after_the_window_shifted_lands_in_the_window_of_the_hit(store: OpenBackend) -> None:
    backend = store()
    tokens = limit(1000, item=RateLimitItemPerSecond)
    assert await backend.hit(tokens, 600)
    first = await backend.window(tokens)
    await asyncio.sleep(max(0.0, first.shift_at - time.time()) + 0.05)  # the hit's window is now the previous one
    assert await backend.hit(tokens, 10)  # the new window
    await backend.correct(tokens, -600, first.shift_at, time.time())
    window = await backend.window(tokens)
    assert (window.previous_count, window.current_count) == (0, 10)  # the refund did not touch the new window


async def test_a_correction_of_a_window_that_no_longer_weighs_in_changes_nothing(store: OpenBackend) -> None:
    backend = store()
    tokens = limit(1000, item=RateLimitItemPerSecond)
    assert await backend.hit(tokens, 600)
    first = await backend.window(tokens)
    await asyncio.sleep(max(0.0, first.shift_at + 1 - time.time()) + 0.05)
    assert await backend.hit(tokens, 10)
    await backend.correct(tokens, -600, first.shift_at, time.time())
    assert (await backend.window(tokens)).current_count == 10


# ---------------------------------------------------------------------------- the limiter on each store


async def test_a_call_refused_by_one_limit_hands_back_its_hits_on_the_others(store: OpenBackend) -> None:
    limiter = limiter_on(store(), {"global": {"tokens_per_minute": 1000}, "per_user": {"requests_per_minute": 1}})
    limits = limiter.rules.for_call("sim", None, "ann")
    assert await limiter.charge(limits, 100, 0, RateLimitState()) is not None
    with pytest.raises(RateLimited) as caught:
        await limiter.charge(limits, 300, 0, RateLimitState())
    assert caught.value.scope == "user"
    tokens = next(each for each in limits if each.kind == "tokens")
    assert (await limiter.backend.window(tokens)).used == 100


async def test_concurrent_charges_then_settlements_leave_exactly_what_was_used(store: OpenBackend) -> None:
    limiter = limiter_on(store(), {"global": {"requests_per_minute": 40, "tokens_per_minute": 100_000}})
    limits = limiter.rules.for_call("sim", None, None)

    async def one(i: int) -> bool:
        try:
            charge = await limiter.charge(limits, 100, 400, RateLimitState())
        except RateLimited:
            return False
        assert charge is not None
        await asyncio.sleep(0.01 * (i % 5))
        await limiter.settle(charge, 50 + i)
        return True

    admitted = await asyncio.gather(*(one(i) for i in range(60)))
    assert sum(admitted) == 40
    tokens = next(each for each in limits if each.kind == "tokens")
    assert (await limiter.backend.window(tokens)).used == sum(50 + i for i, ok in enumerate(admitted) if ok)


async def test_a_calls_charge_counts_on_every_limit_or_on_none_and_the_library_reads_the_same(
    store: OpenBackend,
) -> None:
    backend = store()
    requests, tokens = limit(5, "requests", name="r"), limit(1000, name="t")
    counted, windows, fits = await backend.charge([requests, tokens], [1, 400])
    assert counted and fits == [True, True]
    assert [w.used for w in windows] == [1, 400]
    counted, windows, fits = await backend.charge([requests, tokens], [1, 700])  # the tokens do not fit
    assert not counted and fits[1] is False
    assert [w.used for w in windows] == [1, 400]  # nothing counted, not even the request
    assert isinstance(backend, MemoryRateLimitBackend | RedisRateLimitBackend)
    library = SlidingWindowCounterRateLimiter(backend.storage)
    stats = await library.get_window_stats(tokens.item, *tokens.identifiers)
    assert stats.remaining == 600  # the library reads the counters Keel's charge wrote
    assert await library.hit(tokens.item, *tokens.identifiers, cost=600)
    assert not await library.hit(tokens.item, *tokens.identifiers, cost=1)
