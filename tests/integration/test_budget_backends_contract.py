"""The budget backends' contract: one suite of semantics run against every backend, so the
in-process one and Redis (its Lua scripts) cannot drift apart.

The pattern, for every store with more than one backend (budgets today; rate limits and caches
next): a parametrised fixture yields a way to open the backend under test (`store`), each
semantic test is written once against it, and a new backend joins by adding one `param` to the
fixture. Tests of what only one backend has (Redis key expiry, a second OS process, an
unreachable server; the memory sweep) stay in that backend's own file.

Clocks are injected but stay near the real time: Redis expires keys by its own clock.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from budget_calls import Clock, call_for, model_config, rule
from conftest import REDIS_URL

from keel.auth.keys import KeyBudget, VirtualKey
from keel.budgets import Budgets, MemoryBudgetBackend, RedisBudgetBackend
from keel.budgets.budgets import Alert
from keel.budgets.counters import BudgetBackend, counter_key
from keel.budgets.windows import period_at
from keel.config import BudgetConfig
from keel.cost import to_nanos
from keel.errors import BudgetExceeded
from keel.pipeline import Context

OpenBackend = Callable[[], BudgetBackend]


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[OpenBackend]:
    """Opens a backend on one shared store: each call is another replica's view of it (in
    memory, the same object: a memory store is shared only within a process)."""
    opened: list[BudgetBackend] = []
    if request.param == "memory":
        memory = MemoryBudgetBackend()

        def open_backend() -> BudgetBackend:
            opened.append(memory)
            return memory
    else:
        prefix = request.getfixturevalue("redis_prefix")  # skips locally without Redis; fails in CI

        def open_backend() -> BudgetBackend:
            opened.append(RedisBudgetBackend(REDIS_URL, prefix))
            return opened[-1]

    yield open_backend
    for backend in opened:
        await backend.close()


def budgets_on(store: OpenBackend, rules: list[BudgetConfig], **settings: Any) -> Budgets:
    return Budgets(rules, store(), **{"clock": Clock(), "rules_refresh_s": 0, **settings})


def key_with_budgets(key_id: str, *budgets: tuple[float, str]) -> Context:
    """The context of a call by a virtual key with budgets of its own: (limit_usd, window) each."""
    own = tuple(KeyBudget(limit, window) for limit, window in budgets)
    return Context(key=VirtualKey(id=key_id, tenant="team-a", digest="", budgets=own), key_id=key_id, tenant="team-a")


# ---------------------------------------------------------------------------- reserve and settle


@pytest.mark.parametrize("capped_by", ["a global rule", "the key's own budget"])
async def test_500_concurrent_calls_never_pass_the_cap_and_the_counter_is_the_sum_settled(
    store: OpenBackend, capped_by: str,
) -> None:
    limit = to_nanos(1.0)
    if capped_by == "a global rule":
        budgets, ctx = budgets_on(store, [rule(scope="global", limit_usd=1.0)]), Context()
    else:
        budgets, ctx = budgets_on(store, []), key_with_budgets("vk_busy", (1.0, "day"))
    rng = random.Random(7)
    settled: list[int] = []
    refused = 0

    async def one() -> None:
        nonlocal refused
        worst = rng.randrange(15_000_000, 20_000_000)  # about 1/60 of the cap...
        actual = rng.randrange(5_000_000, worst)  # ...and about 1/100 actually spent
        await asyncio.sleep(rng.random() * 0.05)  # calls arrive over 50 ms, in any order
        try:
            reservation = await budgets.reserve(call_for(ctx), worst)
        except BudgetExceeded:
            refused += 1
            return
        await asyncio.sleep(rng.random() * 0.01)  # and take a while
        await budgets.settle(reservation, actual)
        settled.append(actual)

    await asyncio.gather(*(one() for _ in range(500)))
    [counter] = budgets.counters(ctx, budgets.config_rules, budgets.clock())
    [(spent, reserved)] = await budgets.backend.snapshot([counter.key], budgets.clock())
    assert spent == sum(settled) <= limit
    assert reserved == 0
    assert 60 <= len(settled) < 150 and refused > 0


async def test_a_reservation_is_all_or_none_across_counters(store: OpenBackend) -> None:
    budgets = budgets_on(store, [rule(scope="global", limit_usd=10), rule(scope="user", limit_usd=1)])
    ann = Context(user="ann")
    await budgets.reserve(call_for(ann), to_nanos(0.8))
    with pytest.raises(BudgetExceeded, match="user 'ann'"):
        await budgets.reserve(call_for(Context(user="ann")), to_nanos(0.5))
    global_key = budgets.counters(ann, budgets.config_rules, budgets.clock())[0].key
    [(spent, reserved)] = await budgets.backend.snapshot([global_key], budgets.clock())
    assert (spent, reserved) == (0, to_nanos(0.8))  # the refused call held nothing on the global counter
    await budgets.reserve(call_for(Context(user="bob")), to_nanos(0.5))


async def test_settle_releases_the_rest_of_the_hold_and_twice_is_once(store: OpenBackend) -> None:
    budgets = budgets_on(store, [rule(scope="global", limit_usd=1)])
    reservation = await budgets.reserve(call_for(), to_nanos(0.9))
    await budgets.settle(reservation, to_nanos(0.25))
    await budgets.settle(reservation, to_nanos(0.25))
    key = reservation.counters[0].key
    assert await budgets.backend.snapshot([key], budgets.clock()) == [(to_nanos(0.25), 0)]
    await budgets.reserve(call_for(), to_nanos(0.75))


async def test_a_hold_never_settled_lapses_after_its_ttl_and_a_late_settle_still_counts(store: OpenBackend) -> None:
    clock = Clock()
    first = budgets_on(store, [rule(scope="global", limit_usd=1)], clock=clock, reservation_ttl_s=120)
    second = budgets_on(store, [rule(scope="global", limit_usd=1)], clock=clock, reservation_ttl_s=120)
    crashed = await first.reserve(call_for(), to_nanos(1))  # its replica dies before settling
    with pytest.raises(BudgetExceeded):
        await second.reserve(call_for(), to_nanos(0.1))
    clock.now += 119
    with pytest.raises(BudgetExceeded):
        await second.reserve(call_for(), to_nanos(0.1))
    clock.now += 2
    late = await second.reserve(call_for(), to_nanos(0.1))
    await first.settle(crashed, to_nanos(0.3))  # a late settle still counts what was spent
    await second.settle(late, to_nanos(0.1))
    assert await second.backend.snapshot([crashed.counters[0].key], clock()) == [(to_nanos(0.4), 0)]


async def test_a_hold_lasts_at_least_the_models_timeout(store: OpenBackend) -> None:
    clock = Clock()
    budgets = budgets_on(store, [rule(scope="global", limit_usd=1)], clock=clock, reservation_ttl_s=10)
    await budgets.reserve(call_for(cfg=model_config(timeout_s=600)), to_nanos(1))
    clock.now += 600
    with pytest.raises(BudgetExceeded):
        await budgets.reserve(call_for(), to_nanos(0.1))


async def test_free_calls_and_calls_no_rule_covers_hold_nothing(store: OpenBackend) -> None:
    budgets = budgets_on(store, [rule(scope="user", match="ann", limit_usd=1)])
    assert not (await budgets.reserve(call_for(Context(user="bob")), to_nanos(5))).held
    assert not (await budgets.reserve(call_for(Context(user="ann")), 0)).held


# ---------------------------------------------------------------------------- windows


async def test_a_window_rollover_starts_a_fresh_counter(store: OpenBackend) -> None:
    today = period_at("day", time.time()).resets_at
    assert today is not None
    clock = Clock(today.timestamp() - 1)  # the last second of today (UTC)
    budgets = budgets_on(store, [rule(scope="global", window="day", limit_usd=1)], clock=clock)
    reservation = await budgets.reserve(call_for(), to_nanos(0.9))
    await budgets.settle(reservation, to_nanos(0.9))
    with pytest.raises(BudgetExceeded) as refused:
        await budgets.reserve(call_for(), to_nanos(0.2))
    assert f"It resets at {today:%Y-%m-%d} 00:00 UTC" in refused.value.message
    assert refused.value.headers()["retry-after"] == "1"
    clock.now += 1
    fresh = await budgets.reserve(call_for(), to_nanos(0.2))
    assert fresh.counters[0].key != reservation.counters[0].key


# ---------------------------------------------------------------------------- refusals and alerts


async def test_the_refusal_is_a_429_budget_exceeded_that_names_the_budget_and_its_reset(store: OpenBackend) -> None:
    clock = Clock()
    month = period_at("month", clock())
    assert month.resets_at is not None
    budgets = budgets_on(store, [rule(scope="feature", match="faq", limit_usd=0.5)], clock=clock)
    with pytest.raises(BudgetExceeded) as refused:
        await budgets.reserve(call_for(Context(feature="faq")), to_nanos(0.75))
    error = refused.value
    assert (error.status, error.code, error.type) == (429, "budget_exceeded", "insufficient_quota")
    assert error.body()["error"]["code"] == "budget_exceeded"
    assert f"monthly budget ({month.label}) of feature 'faq', 0.5 USD, has 0.5 USD left" in error.message
    assert "could cost up to 0.75 USD" in error.message
    assert f"resets at {month.resets_at:%Y-%m-%d} 00:00 UTC" in error.message and "max_tokens" in error.message
    assert error.headers()["x-should-retry"] == "false"
    assert int(error.headers()["retry-after"]) >= month.resets_at.timestamp() - clock()


async def test_each_threshold_is_reported_once_and_a_refusal_reports_the_cap(store: OpenBackend) -> None:
    budgets = budgets_on(store, [rule(scope="global", limit_usd=1, alert_at=[0.5, 0.8, 1.0])])
    alerts: list[Alert] = []
    for amount in (0.3, 0.3, 0.1, 0.1):  # 0.6 crosses 50%; 0.8 crosses 80%
        reservation = await budgets.reserve(call_for(), to_nanos(amount))
        alerts += await budgets.settle(reservation, to_nanos(amount))
    assert [a.threshold.share for a in alerts] == [0.5, 0.8]
    assert alerts[0].payload()["spent_usd"] == pytest.approx(0.6)
    for _ in range(2):
        with pytest.raises(BudgetExceeded) as refused:
            await budgets.reserve(call_for(), to_nanos(0.5))
        alerts += refused.value.alerts
    assert [a.threshold.share for a in alerts] == [0.5, 0.8, 1.0]
    payload = alerts[-1].payload()
    assert payload["reason"] == "refused" and payload["threshold"] == 1.0 and payload["limit_usd"] == 1.0
    assert set(payload) >= {"scope", "match", "window", "limit_usd", "spent_usd", "threshold", "at", "id"}


async def test_a_refusal_caused_only_by_calls_in_flight_raises_no_cap_alert(store: OpenBackend) -> None:
    budgets = budgets_on(store, [rule(scope="global", limit_usd=1)])
    await budgets.reserve(call_for(), to_nanos(0.9))  # in flight
    with pytest.raises(BudgetExceeded) as refused:
        await budgets.reserve(call_for(), to_nanos(0.5))
    assert refused.value.alerts == []
    assert refused.value.transient and refused.value.headers() == {"retry-after": "1"}
    assert "has 1 USD left, but calls in flight hold 0.9 USD of it" in refused.value.message
    assert "Try again in a moment" in refused.value.message


# ---------------------------------------------------------------------------- rules added at run time


async def test_admin_rules_reach_every_replica(store: OpenBackend) -> None:
    first = budgets_on(store, [rule(scope="global", limit_usd=1)])
    second = budgets_on(store, [rule(scope="global", limit_usd=1)])
    entry = await first.add_rule(rule(scope="user", match="ann", limit_usd=0.1))
    assert [e.source for e in await second.rules()] == ["config", "admin"]
    with pytest.raises(BudgetExceeded, match="user 'ann'"):
        await second.reserve(call_for(Context(user="ann")), to_nanos(0.2))
    await second.remove_rule(entry.index)
    await first.reserve(call_for(Context(user="ann")), to_nanos(0.2))


async def test_admin_status_reads_the_shared_counters(store: OpenBackend) -> None:
    first = budgets_on(store, [rule(scope="global", limit_usd=1)])
    second = budgets_on(store, [rule(scope="global", limit_usd=1)])
    await first.add_rule(rule(scope="feature", limit_usd=5))
    for feature, amount in (("faq", 0.25), ("chat:v2", 0.5)):
        reservation = await first.reserve(call_for(Context(feature=feature)), to_nanos(amount))
        await first.settle(reservation, to_nanos(amount))
    status = await second.status()
    assert status[0]["counters"][0]["spent_usd"] == 0.75
    per_feature = {c["value"]: c["spent_usd"] for c in status[1]["counters"]}
    assert per_feature == {"faq": 0.25, "chat:v2": 0.5}


# ---------------------------------------------------------------------------- a virtual key's own budgets


async def test_a_keys_own_budget_refuses_the_call_that_would_pass_it_and_no_other_keys(store: OpenBackend) -> None:
    clock = Clock()
    day = period_at("day", clock())
    budgets = budgets_on(store, [rule(scope="global", limit_usd=100)], clock=clock)
    capped, other = key_with_budgets("vk_capped", (1.0, "day")), key_with_budgets("vk_other", (1.0, "day"))
    reservation = await budgets.reserve(call_for(capped), to_nanos(0.6))
    await budgets.settle(reservation, to_nanos(0.6))
    with pytest.raises(BudgetExceeded) as refused:
        await budgets.reserve(call_for(capped), to_nanos(0.5))
    assert f"daily budget ({day.label}) of key 'vk_capped', 1 USD, has 0.4 USD left" in refused.value.message
    assert (refused.value.scope, refused.value.window, refused.value.limit_usd) == ("key", "day", 1.0)
    await budgets.reserve(call_for(capped), to_nanos(0.4))  # what is left still fits
    await budgets.reserve(call_for(other), to_nanos(0.9))  # another key: a counter of its own
    await budgets.reserve(call_for(Context()), to_nanos(5))  # no key (in-process, master key): only the global rule
    keys = [counter_key(budgets.backend.prefix, "key", k, day) for k in ("vk_capped", "vk_other")]
    assert await budgets.backend.snapshot(keys, clock()) == [(to_nanos(0.6), to_nanos(0.4)), (0, to_nanos(0.9))]
    [(global_spent, global_reserved)] = await budgets.backend.snapshot([reservation.counters[0].key], clock())
    assert (global_spent, global_reserved) == (to_nanos(0.6), to_nanos(6.3))  # counted there too


async def test_a_configured_key_rule_and_the_keys_own_budget_both_count_and_the_tighter_binds(
    store: OpenBackend,
) -> None:
    own_tighter = budgets_on(store, [rule(scope="key", match="vk_a", window="day", limit_usd=2)])
    ctx = key_with_budgets("vk_a", (1.0, "day"), (3.0, "month"))
    reservation = await own_tighter.reserve(call_for(ctx), to_nanos(0.75))
    await own_tighter.settle(reservation, to_nanos(0.75))
    with pytest.raises(BudgetExceeded, match=r"daily budget .* of key 'vk_a', 1 USD, has 0.25 USD left"):
        await own_tighter.reserve(call_for(ctx), to_nanos(0.5))
    rule_tighter = budgets_on(store, [rule(scope="key", window="day", limit_usd=0.5)])  # every key, same counter
    with pytest.raises(BudgetExceeded, match=r"daily budget .* of key 'vk_a', 0.5 USD, has 0 USD left"):
        await rule_tighter.reserve(call_for(ctx), to_nanos(0.1))
    status = await own_tighter.status()
    assert [c["spent_usd"] for c in status[0]["counters"]] == [0.75]  # the shared counter
