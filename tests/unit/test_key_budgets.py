"""A virtual key's own budgets in one process: counted like a `scope: key` rule for that key, on
the same counter as one; through the budget stage in a pipeline; alerted; shown by the budgets
view, a tenant admin seeing only its own keys'. Refusals and concurrency on every backend are in
tests/integration/test_budget_backends_contract.py."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

import pytest
from budget_calls import Clock, call_for, rule
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient

from keel.auth.keys import KeyBudget, VirtualKey
from keel.budgets import AlertSender, Budgets, BudgetStage, MemoryBudgetBackend
from keel.budgets.key_budgets import InvalidKeyBudget
from keel.config import AlertsConfig, parse_config
from keel.cost import CostMeter, PricingTable, to_nanos
from keel.engine import Keel
from keel.errors import BudgetExceeded
from keel.pipeline import Completion, Context
from keel.server.admin import admin_router
from keel.types import ChatRequest


def key(key_id: str, *budgets: tuple[float, str], tenant: str = "team-a", revoked: bool = False) -> VirtualKey:
    own = tuple(KeyBudget(limit, window) for limit, window in budgets)
    return VirtualKey(id=key_id, tenant=tenant, digest="", budgets=own, revoked_at=1.0 if revoked else None)


def by(virtual_key: VirtualKey) -> Context:
    return Context(key=virtual_key, key_id=virtual_key.id, tenant=virtual_key.tenant)


def test_a_keys_own_budgets_are_counters_of_scope_key_beside_the_configured_ones() -> None:
    budgets = Budgets([], MemoryBudgetBackend())
    ctx = by(key("vk_a", (1.0, "day"), (5.0, "month")))
    counters = budgets.counters(ctx, [rule(scope="global", window="total")], Clock()())
    assert [(c.scope, c.value, c.period.window, c.limit) for c in counters] == [
        ("global", None, "total", to_nanos(1)), ("key", "vk_a", "day", to_nanos(1)),
        ("key", "vk_a", "month", to_nanos(5)),
    ]
    assert budgets.counters(by(key("vk_b")), [], Clock()()) == []  # a key without budgets of its own
    assert budgets.counters(Context(key_id="master"), [], Clock()()) == []  # the master key has none


def test_a_configured_rule_for_the_key_and_its_own_budget_share_one_counter_the_lower_limit_binding() -> None:
    budgets = Budgets([], MemoryBudgetBackend())
    ctx = by(key("vk_a", (1.0, "day")))
    [counter] = budgets.counters(ctx, [rule(scope="key", match="vk_a", window="day", limit_usd=3)], Clock()())
    assert counter.limit == to_nanos(1) and counter.binding.limit_usd == 1.0
    [counter] = budgets.counters(ctx, [rule(scope="key", window="day", limit_usd=0.5)], Clock()())
    assert counter.limit == to_nanos(0.5) and counter.binding.match is None
    assert {t.share for t in counter.thresholds} == {0.5, 0.8, 1.0}  # both rules' alerts


async def test_a_keys_own_budget_alerts_at_half_four_fifths_and_its_cap() -> None:
    budgets = Budgets([], MemoryBudgetBackend())
    ctx = by(key("vk_a", (1.0, "day")))
    alerts = []
    for amount in (0.5, 0.3):
        reservation = await budgets.reserve(call_for(ctx), to_nanos(amount))
        alerts += await budgets.settle(reservation, to_nanos(amount))
    with pytest.raises(BudgetExceeded) as refused:
        await budgets.reserve(call_for(ctx), to_nanos(0.5))
    alerts += refused.value.alerts
    payloads = [a.payload() for a in alerts]
    assert [(p["scope"], p["match"], p["window"], p["threshold"]) for p in payloads] == [
        ("key", "vk_a", "day", 0.5), ("key", "vk_a", "day", 0.8), ("key", "vk_a", "day", 1.0),
    ]
    assert payloads[-1]["reason"] == "refused" and payloads[-1]["limit_usd"] == 1.0


async def test_a_stored_budget_that_is_not_valid_refuses_the_keys_calls_with_what_to_do() -> None:
    budgets = Budgets([], MemoryBudgetBackend())
    with pytest.raises(InvalidKeyBudget, match=r"The key vk_a has an invalid budget stored .* revoke it") as refused:
        await budgets.reserve(call_for(by(key("vk_a", (1.0, "week")))), to_nanos(0.1))
    assert (refused.value.status, refused.value.code) == (500, "invalid_key_budget")


# ---------------------------------------------------------------------------- the stage in a pipeline


@pytest.fixture
async def keel() -> AsyncIterator[tuple[Keel, Budgets, AlertSender]]:
    deployment = {"provider": "simulated", "model": "sim", "price": {"input": 1000, "output": 1000}}
    cfg = parse_config({"models": [{"name": "m", "deployments": [deployment]}]})
    budgets, alerts = Budgets([], MemoryBudgetBackend()), AlertSender(AlertsConfig())
    made = Keel(cfg, stages=[BudgetStage(budgets, CostMeter(PricingTable(cfg)), alerts)])
    yield made, budgets, alerts
    await made.close()


async def test_the_stage_refuses_a_key_whose_own_budget_is_spent_and_serves_another(
    keel: tuple[Keel, Budgets, AlertSender],
) -> None:
    gateway, budgets, alerts = keel
    request = ChatRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "hi"}],
                                          "max_tokens": 5})
    capped, other = key("vk_capped", (0.03, "day")), key("vk_other", (0.03, "day"))
    spent, answered = 0, 0
    with pytest.raises(BudgetExceeded, match=r"budget .* of key 'vk_capped'"):
        for _ in range(20):  # about 0.01 USD a call: refused within a few
            ctx = by(capped)
            await gateway.handle(request, ctx)
            spent, answered = spent + ctx.cost.nanos, answered + 1
    assert 1 <= answered < 20 and spent <= to_nanos(0.03)
    [counter] = budgets.counters(by(capped), [], budgets.clock())
    assert await budgets.backend.snapshot([counter.key], budgets.clock()) == [(spent, 0)]
    served = by(other)
    reply = await gateway.handle(request, served)
    assert isinstance(reply, Completion) and reply.body["choices"] and served.cost.nanos > 0
    assert alerts.raised[("key", "day", "1")] == 1


# ---------------------------------------------------------------------------- the budgets view


class Keys:
    def __init__(self, *keys: VirtualKey) -> None:
        self.keys = keys

    def list(self, tenant: str | None = None) -> Sequence[VirtualKey]:
        return [k for k in self.keys if tenant is None or k.tenant == tenant]


def test_the_budgets_view_shows_keys_own_budgets_and_a_tenant_admin_only_its_keys() -> None:
    budgets = Budgets([rule(scope="global", limit_usd=10)], MemoryBudgetBackend())
    mine, theirs = key("vk_mine", (1.0, "day")), key("vk_theirs", (2.0, "month"), tenant="team-b")
    budgets.keys = Keys(mine, theirs, key("vk_plain"), key("vk_gone", (1.0, "day"), revoked=True),
                        key("vk_broken", (1.0, "week")))

    async def spend() -> None:
        reservation = await budgets.reserve(call_for(by(mine)), to_nanos(0.25))
        await budgets.settle(reservation, to_nanos(0.25))

    asyncio.run(spend())
    everything = asyncio.run(budgets.status())
    assert [(e["source"], e["id"]) for e in everything] == [("config", None), ("key", "vk_mine"), ("key", "vk_theirs")]
    own = everything[1]
    assert own["tenant"] == "team-a" and own["index"] is None
    assert own["rule"] == {"scope": "key", "match": "vk_mine", "window": "day", "limit_usd": 1.0,
                           "alert_at": [0.5, 0.8, 1.0]}
    [counter] = own["counters"]
    assert (counter["value"], counter["spent_usd"], counter["remaining_usd"]) == ("vk_mine", 0.25, 0.75)
    assert everything[2]["counters"][0]["spent_usd"] == 0.0

    async def tenant_key_ids(request: Request, tenant: str) -> list[str]:
        return [k.id for k in budgets.keys.list(tenant)] if budgets.keys else []

    def team_a_admin(request: Request) -> None:
        request.state.tenant = "team-a"

    app = FastAPI()
    app.include_router(admin_router(budgets, auth=team_a_admin, key_ids=tenant_key_ids))
    shown = TestClient(app).get("/admin/budgets").json()["data"]
    assert [(e["source"], e["id"]) for e in shown] == [("key", "vk_mine")]
