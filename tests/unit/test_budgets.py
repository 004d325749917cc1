"""Budgets in one process: which counters a call is charged to, UTC windows, the memory backend's
sweep, the stage around a real pipeline, and the admin API. What every backend must do (holds,
refusals, alerts, windows that roll over) is in tests/integration/test_budget_backends_contract.py."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import Any

import pytest
from budget_calls import Clock, call_for, rule
from fastapi import FastAPI, HTTPException, Request
from fastapi.testclient import TestClient

from keel.budgets import AlertSender, Budgets, BudgetStage, MemoryBudgetBackend
from keel.budgets.windows import period_at
from keel.config import AlertsConfig, BudgetConfig, parse_config
from keel.cost import CostMeter, PricingTable, to_nanos
from keel.engine import Keel
from keel.errors import BudgetExceeded, UpstreamServerError
from keel.pipeline import ChunkStream, Context
from keel.server.admin import admin_router
from keel.types import ChatRequest

NOV_30_LATE = datetime(2026, 11, 30, 23, 59, 59, tzinfo=UTC).timestamp()
DEC_31_LATE = datetime(2026, 12, 31, 23, 59, 59, tzinfo=UTC).timestamp()


# ---------------------------------------------------------------------------- windows and counters


def test_windows_are_utc_calendar_days_and_months_that_roll_over() -> None:
    assert period_at("day", NOV_30_LATE).label == "2026-11-30"
    assert period_at("day", NOV_30_LATE + 1).label == "2026-12-01"
    assert period_at("month", NOV_30_LATE).label == "2026-11"
    assert period_at("month", NOV_30_LATE + 1).label == "2026-12"
    assert period_at("month", DEC_31_LATE + 1).label == "2027-01"
    assert period_at("month", NOV_30_LATE).resets_at == datetime(2026, 12, 1, tzinfo=UTC)
    assert period_at("day", DEC_31_LATE).resets_at == datetime(2027, 1, 1, tzinfo=UTC)
    total = period_at("total", NOV_30_LATE)
    assert (total.label, total.resets_at) == ("total", None)


def test_a_call_is_charged_to_each_applicable_counter_by_key() -> None:
    budgets = Budgets([], MemoryBudgetBackend())
    rules = [
        rule(scope="global", window="day"),
        rule(scope="feature", match="faq"),
        rule(scope="feature", match="other"),
        rule(scope="user", window="total"),
        rule(scope="key"),  # the call has no key id: does not apply
    ]
    ctx = Context(user="ann:1", feature="faq")
    keys = [c.key for c in budgets.counters(ctx, rules, NOV_30_LATE)]
    assert keys == [
        "keel:budget:global:day:2026-11-30",
        "keel:budget:feature:faq:month:2026-11",
        "keel:budget:user:ann%3A1:total:total",
    ]
    assert [c.key for c in budgets.counters(ctx, rules, NOV_30_LATE + 1)][:2] == [
        "keel:budget:global:day:2026-12-01", "keel:budget:feature:faq:month:2026-12",
    ]


def test_rules_on_the_same_counter_share_it_and_the_lowest_limit_binds() -> None:
    budgets = Budgets([], MemoryBudgetBackend())
    rules = [rule(scope="feature", limit_usd=10), rule(scope="feature", match="faq", limit_usd=2, alert_at=[0.5])]
    [counter] = budgets.counters(Context(feature="faq"), rules, NOV_30_LATE)
    assert counter.limit == to_nanos(2) and counter.binding.match == "faq"
    assert sorted(t.nanos for t in counter.thresholds) == [to_nanos(1), to_nanos(5), to_nanos(8), to_nanos(10)]


async def test_the_memory_backend_forgets_the_counters_of_past_windows() -> None:
    clock = Clock(NOV_30_LATE)
    budgets = Budgets([rule(scope="global", window="day", limit_usd=1)], MemoryBudgetBackend(), clock=clock)
    await budgets.reserve(call_for(), to_nanos(0.9))
    clock.now += 3 * 86_400 + 1  # long after: the old day's counter is swept
    await budgets.reserve(call_for(), to_nanos(0.2))
    assert await budgets.backend.scan("*") == ["keel:budget:global:day:2026-12-04"]


def test_a_budget_with_an_infinite_limit_stops_start_up() -> None:
    from keel.config import ConfigError, parse_config

    with pytest.raises(ConfigError, match=r"budgets\[0\]\.limit_usd: should be a finite number"):
        parse_config({"models": [{"name": "m", "deployments": [{"provider": "simulated"}]}],
                      "budgets": [{"scope": "global", "limit_usd": float("inf")}]})


# ---------------------------------------------------------------------------- the stage in a pipeline


@pytest.fixture
async def gateway() -> AsyncIterator[Callable[..., Any]]:
    made: list[Keel] = []

    def make(rules: list[BudgetConfig], *, error_rate: float = 0.0, alerts: AlertSender | None = None) -> Any:
        deployment = {"provider": "simulated", "model": "sim", "price": {"input": 1000, "output": 1000},
                      "error_rate": error_rate, "template": " ".join(["word"] * 50)}
        cfg = parse_config({"models": [{"name": "m", "retry": {"max_attempts": 1},
                                        "deployments": [deployment]}]})
        budgets = Budgets(rules, MemoryBudgetBackend())
        keel = Keel(cfg, stages=[BudgetStage(budgets, CostMeter(PricingTable(cfg), default_max_tokens=100), alerts)])
        made.append(keel)
        return keel, budgets

    yield make
    for keel in made:
        await keel.close()


def chat(**extra: Any) -> ChatRequest:
    return ChatRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "hi"}], **extra})


async def spent_and_reserved(budgets: Budgets) -> tuple[int, int]:
    counters = budgets.counters(Context(), budgets.config_rules, budgets.clock())
    [(spent, reserved)] = await budgets.backend.snapshot([counters[0].key], budgets.clock())
    return spent, reserved


async def test_the_stage_settles_each_answer_at_its_logged_cost(gateway: Callable[..., Any]) -> None:
    keel, budgets = gateway([rule(scope="global", limit_usd=10)])
    logged = 0
    for stream in (False, True, False):
        ctx = Context()
        reply = await keel.handle(chat(stream=stream), ctx)
        if isinstance(reply, ChunkStream):
            async for _ in reply:
                pass
        logged += ctx.cost.nanos
        assert ctx.cost.usd > 0
    assert await spent_and_reserved(budgets) == (logged, 0)


async def test_a_refused_call_never_reaches_the_upstream(gateway: Callable[..., Any]) -> None:
    alerts = AlertSender(AlertsConfig())
    keel, budgets = gateway([rule(scope="global", limit_usd=0.01)], alerts=alerts)
    ctx = Context()
    with pytest.raises(BudgetExceeded):
        await keel.handle(chat(), ctx)
    assert ctx.attempts == [] and await spent_and_reserved(budgets) == (0, 0)
    assert alerts.raised == {("global", "month", "1"): 1}


async def test_a_failed_upstream_releases_the_hold_and_costs_nothing(gateway: Callable[..., Any]) -> None:
    keel, budgets = gateway([rule(scope="global", limit_usd=10)], error_rate=1.0)
    ctx = Context()
    with pytest.raises(UpstreamServerError):
        await keel.handle(chat(), ctx)
    assert ctx.cost.usd == 0 and await spent_and_reserved(budgets) == (0, 0)


async def test_a_stream_closed_by_the_client_settles_what_it_consumed(gateway: Callable[..., Any]) -> None:
    keel, budgets = gateway([rule(scope="global", limit_usd=10)])
    ctx = Context()
    reply = await keel.handle(chat(stream=True), ctx)
    assert isinstance(reply, ChunkStream)
    assert (await spent_and_reserved(budgets))[1] > 0  # held while it runs
    for _ in range(3):
        await reply.__anext__()
    await reply.aclose()
    assert ctx.cost.estimated is True
    assert await spent_and_reserved(budgets) == (ctx.cost.nanos, 0)


# ---------------------------------------------------------------------------- the admin API


def admin_client(budgets: Budgets, auth: Callable[..., Any] | None = None) -> TestClient:
    app = FastAPI()
    app.include_router(admin_router(budgets, auth=auth))
    return TestClient(app)


def test_admin_lists_rules_with_their_counters() -> None:
    budgets = Budgets([rule(scope="global", limit_usd=2), rule(scope="user", limit_usd=1)], MemoryBudgetBackend())

    async def spend() -> None:
        for user, amount in (("ann", 0.25), ("bob", 0.5)):
            reservation = await budgets.reserve(call_for(Context(user=user)), to_nanos(amount))
            await budgets.settle(reservation, to_nanos(amount))
        await budgets.reserve(call_for(Context(user="ann")), to_nanos(0.125))

    asyncio.run(spend())
    body = admin_client(budgets).get("/admin/budgets").json()
    [everyone, per_user] = body["data"]
    assert everyone["source"] == "config" and everyone["rule"]["limit_usd"] == 2
    [total] = everyone["counters"]
    assert (total["spent_usd"], total["reserved_usd"], total["remaining_usd"]) == (0.75, 0.125, 1.125)
    users = {c["value"]: c for c in per_user["counters"]}
    assert users["ann"]["remaining_usd"] == 0.625 and users["bob"]["spent_usd"] == 0.5


def test_admin_adds_and_deletes_rules_and_refuses_bad_ones() -> None:
    budgets = Budgets([rule(scope="global")], MemoryBudgetBackend())
    client = admin_client(budgets)
    added = client.post("/admin/budgets", json={"scope": "feature", "match": "faq", "window": "day", "limit_usd": 3})
    assert added.status_code == 201 and added.json()["index"] == 1 and added.json()["source"] == "admin"
    assert len(client.get("/admin/budgets").json()["data"]) == 2

    bad = client.post("/admin/budgets", json={"scope": "global", "limit_usd": -1})
    assert bad.status_code == 400
    assert bad.json()["error"]["message"].startswith("The budget rule is invalid: limit_usd: ")
    typo = client.post("/admin/budgets", json={"scope": "user", "limit": 3})
    assert typo.status_code == 400 and "limit: unknown key" in typo.json()["error"]["message"]
    assert client.post("/admin/budgets", content=b"{nope").json()["error"]["code"] == "invalid_json"

    config_rule = client.delete("/admin/budgets/0")
    assert config_rule.status_code == 409 and "keel.yaml" in config_rule.json()["error"]["message"]
    assert client.delete("/admin/budgets/7").status_code == 404
    assert client.delete("/admin/budgets/1").status_code == 200
    assert len(client.get("/admin/budgets").json()["data"]) == 1


def test_admin_rules_apply_to_calls() -> None:
    budgets = Budgets([], MemoryBudgetBackend())
    admin_client(budgets).post("/admin/budgets", json={"scope": "user", "match": "ann", "limit_usd": 0.1})

    async def reserve() -> None:
        with pytest.raises(BudgetExceeded):
            await budgets.reserve(call_for(Context(user="ann")), to_nanos(0.2))

    asyncio.run(reserve())


def test_admin_routes_sit_behind_the_auth_dependency() -> None:
    def auth(request: Request) -> None:
        if request.headers.get("authorization") != "Bearer master":
            raise HTTPException(401, "bad key")

    client = admin_client(Budgets([], MemoryBudgetBackend()), auth=auth)
    assert client.get("/admin/budgets").status_code == 401
    assert client.delete("/admin/budgets/0").status_code == 401
    assert client.get("/admin/budgets", headers={"authorization": "Bearer master"}).status_code == 200
