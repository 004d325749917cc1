"""Budgets shared through a real Redis: two OS processes (two gateway replicas) with 250
concurrent calls each against one cap never pass it, the counter equals the sum of the costs
they logged exactly, and each alert threshold is reported by exactly one of them. Counter keys
expire with their window, and an unreachable Redis refuses calls with a 503. What every backend
must do, Redis included, is in test_budget_backends_contract.py."""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import random
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis
import redis.asyncio
from conftest import REDIS_URL

from keel.budgets import AlertSender, Budgets, BudgetStage, RedisBudgetBackend
from keel.budgets.budgets import Alert
from keel.config import AlertsConfig, BudgetConfig, parse_config
from keel.cost import CostMeter, PricingTable, to_nanos
from keel.engine import Keel
from keel.errors import BudgetExceeded, BudgetStoreUnavailable
from keel.pipeline import Call, Context
from keel.testing.tcp_proxy import TcpProxy
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
        costs.append(ctx.cost.nanos)

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

    # Each threshold reached is reported once, by one replica or the other, never both. The cap
    # (1.0) is reported when a refusal found it spent; one caused only by calls in flight is not.
    reported = [alert["threshold"] for result in results for alert in result["alerts"]]
    below_cap = sorted(t for t in reported if t < 1.0)
    assert below_cap == [t for t in THRESHOLDS if t < 1.0 and t * to_nanos(CAP_USD) <= spent], (reported, spent)
    assert reported.count(1.0) <= 1, reported
    assert all(alert["id"].startswith(key) for result in results for alert in result["alerts"])


def call_for(ctx: Context | None = None) -> Call:
    cfg = parse_config(config_dict())
    request = ChatRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    return Call(request, cfg.models[0], [], ctx or Context())


async def test_counter_keys_expire_after_their_window(prefix: str) -> None:
    first = Budgets([BudgetConfig(scope="global", limit_usd=1)], RedisBudgetBackend(REDIS_URL, prefix))
    reservation = await first.reserve(call_for(), to_nanos(0.1))
    await first.settle(reservation, to_nanos(0.1))
    client = redis.asyncio.Redis.from_url(REDIS_URL)
    key = reservation.counters[0].key
    expires_at = reservation.counters[0].expires_at
    assert expires_at is not None and await client.expiretime(key) == expires_at
    assert await client.expiretime(key + ":holds") in (expires_at, -2)  # -2: emptied, so gone
    await client.aclose()
    await first.close()


async def test_a_settle_cut_off_by_a_redis_outage_is_logged_with_its_cost_and_no_traceback(
    prefix: str, caplog: pytest.LogCaptureFixture,
) -> None:
    # The call reserved while Redis answered; Redis went away before it settled (an upstream that failed
    # part-way, having billed something): the answer is the client's already, so nothing raises, and the
    # log says what the budgets miss, without a stack trace for a known outage.
    target = urlsplit(REDIS_URL)
    proxy = TcpProxy((target.hostname or "127.0.0.1", target.port or 6379)).start()
    budgets = Budgets([BudgetConfig(scope="global", limit_usd=1)], RedisBudgetBackend(proxy.url(REDIS_URL), prefix))
    stage = BudgetStage(budgets, CostMeter(PricingTable(parse_config(config_dict()))))
    call = call_for()
    call.ctx.request_id = "req_settle_cut"

    async def cut_then_fail(inner: Call) -> Any:
        proxy.stop()
        inner.ctx.cost.nanos = 1234
        raise RuntimeError("the upstream failed part-way")  # the stage settles on the way out

    try:
        with caplog.at_level(logging.ERROR, logger="keel.budgets"), pytest.raises(RuntimeError):
            await stage(call, cut_then_fail)
    finally:
        proxy.stop()
        await budgets.close()
    [settle] = [r for r in caplog.records if "could not settle" in r.getMessage()]
    assert settle.exc_info is None
    assert settle.getMessage() == (
        "could not settle the budgets of request req_settle_cut: the budget store (Redis) did not answer; its "
        "cost (1234 nano-USD) is not counted in its budgets, and its hold lapses on its own")


async def test_an_unreachable_redis_refuses_calls_with_a_503() -> None:
    budgets = Budgets([BudgetConfig(scope="global", limit_usd=1)], RedisBudgetBackend("redis://127.0.0.1:1/0"))
    with pytest.raises(BudgetStoreUnavailable) as failure:
        await budgets.reserve(call_for(), to_nanos(0.1))
    assert failure.value.status == 503 and failure.value.code == "budget_store_unavailable"
    assert "127.0.0.1" not in failure.value.message and "state.redis_url" in failure.value.message
    await budgets.close()
