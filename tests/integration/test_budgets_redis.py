"""Budgets shared through a real Redis: two OS processes (two gateway replicas) with 250
concurrent calls each against one cap never pass it, the counter equals the sum of the costs
they logged exactly, and each alert threshold is reported by exactly one of them. Holds lapse,
admin rules reach every replica, and an unreachable Redis refuses calls with a 503."""

from __future__ import annotations

import asyncio
import multiprocessing
import random
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis
import redis.asyncio
from conftest import REDIS_URL

from keel.config import AlertsConfig, BudgetConfig, parse_config
from keel.cost import CostMeter, PricingTable, to_nanos
from keel.cost.accounting import COST_NANOS
from keel.engine import Keel
from keel.errors import BudgetExceeded, BudgetStoreUnavailable
from keel.limits import AlertSender, Budgets, BudgetStage, RedisBudgetBackend
from keel.limits.budgets import Alert
from keel.pipeline import Call, Context
from keel.types import ChatRequest

CAP_USD = 1.0
THRESHOLDS = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]


@pytest.fixture
def prefix(redis_prefix: str) -> str:
    return redis_prefix


def config_dict() -> dict[str, Any]:
    # About 0.01 USD per call: 50 answer tokens and a few prompt tokens at 100 USD per 1M each way;
    # the worst case (max_tokens 150) is about three times that.
    deployment = {"provider": "simulated", "model": "sim", "price": {"input": 100, "output": 100},
                  "template": "{last_user_message}", "latency_ms": {"kind": "uniform", "min_ms": 5, "max_ms": 40}}
    return {"models": [{"name": "m", "deployments": [deployment]}]}


class RecordingSender(AlertSender):
    def __init__(self) -> None:
        super().__init__(AlertsConfig())
        self.sent: list[dict[str, Any]] = []

    def send(self, alert: Alert) -> None:
        super().send(alert)
        self.sent.append(alert.payload())


def replica(prefix: str, calls: int, seed: int) -> dict[str, Any]:
    """One gateway process: `calls` concurrent calls through the pipeline, budgets in Redis."""
    return asyncio.run(_replica(prefix, calls, seed))


async def _replica(prefix: str, calls: int, seed: int) -> dict[str, Any]:
    cfg = parse_config({**config_dict(), "budgets": [{"scope": "global", "limit_usd": CAP_USD,
                                                       "alert_at": THRESHOLDS}]})
    budgets = Budgets(cfg.budgets, RedisBudgetBackend(REDIS_URL, prefix))
    alerts = RecordingSender()
    keel = Keel(cfg, stages=[BudgetStage(budgets, CostMeter(PricingTable(cfg)), alerts)])
    rng = random.Random(seed)
    costs: list[int] = []
    refused = 0

    async def one() -> None:
        nonlocal refused
        words = " ".join(["word"] * rng.randrange(30, 70))
        request = ChatRequest.model_validate(
            {"model": "m", "max_tokens": 150, "messages": [{"role": "user", "content": words}]}
        )
        await asyncio.sleep(rng.random() * 1.5)  # calls arrive over a second and a half
        ctx = Context()
        try:
            await keel.handle(request, ctx)
        except BudgetExceeded:
            refused += 1
            return
        costs.append(ctx.extras[COST_NANOS])

    await asyncio.gather(*(one() for _ in range(calls)))
    await keel.close()
    await budgets.close()
    return {"costs": costs, "refused": refused, "alerts": alerts.sent}


def test_two_replicas_with_500_concurrent_calls_never_pass_the_cap(prefix: str) -> None:
    context = multiprocessing.get_context("spawn")
    with context.Pool(2) as pool:
        results = pool.starmap(replica, [(prefix, 250, 1), (prefix, 250, 2)])
    costs = [cost for result in results for cost in result["costs"]]
    refused = sum(result["refused"] for result in results)
    assert len(costs) + refused == 500
    assert all(result["costs"] for result in results), "both replicas served calls"

    client = redis.Redis.from_url(REDIS_URL, decode_responses=True)
    [key] = [k for k in client.scan_iter(match=f"{prefix}:global:month:*") if not k.endswith(":holds")]
    spent, reserved = (int(v or 0) for v in client.hmget(key, ["spent", "reserved"]))
    assert spent == sum(costs), "the counter is the sum of the costs logged"
    assert spent <= to_nanos(CAP_USD)
    assert reserved == 0
    assert 40 <= len(costs) <= 130 and refused >= 300, (len(costs), refused)

    # Each threshold reached is reported once, by one replica or the other, never both.
    reported = [alert["threshold"] for result in results for alert in result["alerts"]]
    assert sorted(reported) == [t for t in THRESHOLDS if t * to_nanos(CAP_USD) <= spent or t == 1.0], (
        reported, spent)
    assert all(alert["id"].startswith(key) for result in results for alert in result["alerts"])


@pytest.fixture
async def shared(prefix: str) -> AsyncIterator[tuple[Budgets, Budgets, Clock]]:
    clock = Clock(time.time())  # Redis expires keys by its own clock: stay near it
    first = Budgets([BudgetConfig(scope="global", limit_usd=1)], RedisBudgetBackend(REDIS_URL, prefix),
                    clock=clock, reservation_ttl_s=60, rules_refresh_s=0)
    second = Budgets([BudgetConfig(scope="global", limit_usd=1)], RedisBudgetBackend(REDIS_URL, prefix),
                     clock=clock, reservation_ttl_s=60, rules_refresh_s=0)
    yield first, second, clock
    await first.close()
    await second.close()


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def call_for(ctx: Context | None = None) -> Call:
    cfg = parse_config(config_dict())
    request = ChatRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    return Call(request, cfg.models[0], [], ctx or Context())


async def test_a_hold_that_is_never_settled_lapses_in_redis(shared: tuple[Budgets, Budgets, Clock]) -> None:
    first, second, clock = shared
    crashed = await first.reserve(call_for(), to_nanos(0.75))  # its replica dies: never settled
    with pytest.raises(BudgetExceeded):
        await second.reserve(call_for(), to_nanos(0.5))
    clock.now += 121  # the hold lasts the model's timeout_s (60 s) plus 60 s
    late = await second.reserve(call_for(), to_nanos(0.5))
    await second.settle(late, to_nanos(0.5))
    key = late.counters[0].key
    assert await second.backend.snapshot([key], clock()) == [(to_nanos(0.5), 0)]
    assert crashed.counters[0].key == key


async def test_counter_keys_expire_after_their_window(shared: tuple[Budgets, Budgets, Clock]) -> None:
    first, _, _ = shared
    reservation = await first.reserve(call_for(), to_nanos(0.1))
    await first.settle(reservation, to_nanos(0.1))
    client = redis.asyncio.Redis.from_url(REDIS_URL)
    key = reservation.counters[0].key
    expires_at = reservation.counters[0].expires_at
    assert expires_at is not None and await client.expiretime(key) == expires_at
    assert await client.expiretime(key + ":holds") in (expires_at, -2)  # -2: emptied, so gone
    await client.aclose()


async def test_admin_rules_reach_every_replica(shared: tuple[Budgets, Budgets, Clock]) -> None:
    first, second, _ = shared
    entry = await first.add_rule(BudgetConfig(scope="user", match="ann", limit_usd=0.1))
    assert [e.source for e in await second.rules()] == ["config", "admin"]
    with pytest.raises(BudgetExceeded, match="user 'ann'"):
        await second.reserve(call_for(Context(user="ann")), to_nanos(0.2))
    await second.remove_rule(entry.index)
    await first.reserve(call_for(Context(user="ann")), to_nanos(0.2))


async def test_admin_status_reads_the_shared_counters(shared: tuple[Budgets, Budgets, Clock]) -> None:
    first, second, _ = shared
    await first.add_rule(BudgetConfig(scope="feature", limit_usd=5))
    for feature, amount in (("faq", 0.25), ("chat:v2", 0.5)):
        reservation = await first.reserve(call_for(Context(feature=feature)), to_nanos(amount))
        await first.settle(reservation, to_nanos(amount))
    status = await second.status()
    assert status[0]["counters"][0]["spent_usd"] == 0.75
    per_feature = {c["value"]: c["spent_usd"] for c in status[1]["counters"]}
    assert per_feature == {"faq": 0.25, "chat:v2": 0.5}


async def test_an_unreachable_redis_refuses_calls_with_a_503() -> None:
    budgets = Budgets([BudgetConfig(scope="global", limit_usd=1)], RedisBudgetBackend("redis://127.0.0.1:1/0"))
    with pytest.raises(BudgetStoreUnavailable) as failure:
        await budgets.reserve(call_for(), to_nanos(0.1))
    assert failure.value.status == 503 and failure.value.code == "budget_store_unavailable"
    assert "127.0.0.1" not in failure.value.message and "state.redis_url" in failure.value.message
    await budgets.close()
