"""The router stage: a call to a virtual model becomes a call to one of its tiers.

It sits after auth and rate limits (it may use the caller's tenant and budgets) and before the
budget stage, so the budget hold prices the tier chosen (for a cascade: every tier it may reach,
the dearest binding). It rewrites `call.model` and `call.deployments` and records the route in
`ctx.route`. A call to a plain model passes through untouched: one dict look-up.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

from keel.errors import InvalidRequest
from keel.pipeline import Call, Next, Reply
from keel.routing.balance import LoadBalance
from keel.routing.budget import BudgetDowngrade
from keel.routing.route import Route, Strategy, Tier
from keel.types import ChatRequest

log = logging.getLogger("keel.routing")


@dataclass(frozen=True, slots=True)
class VirtualModel:
    name: str
    tiers: tuple[Tier, ...]  # cheapest first
    strategy: Strategy
    balance: LoadBalance | None = None  # orders the chosen tier's deployments
    downgrade: BudgetDowngrade | None = None  # router.budget_downgrade


class RouterStage:
    def __init__(self, models: Mapping[str, VirtualModel]) -> None:
        self.models = dict(models)

    async def __call__(self, call: Call, next: Next) -> Reply:
        virtual = self.models.get(call.model.name)
        if virtual is None:
            return await next(call)
        if not isinstance(call.request, ChatRequest):
            raise InvalidRequest(
                f"'{virtual.name}' is a virtual model for chat completions; ask one of its tiers for embeddings "
                f"({', '.join(t.name for t in virtual.tiers)})", param="model",
            )
        choice = await virtual.strategy.decide(call, virtual.tiers)
        tier, highest, reason = choice.tier, choice.highest, choice.reason
        if virtual.downgrade is not None and highest > 0:
            passed = await virtual.downgrade.passed_alert(call)
            if passed is not None:
                log.info("request %s routed a tier down: budget %s", call.ctx.request_id, passed)
                highest -= 1
                tier = min(tier, highest)
                reason += ",budget"
        reached = virtual.tiers[tier: highest + 1]
        chosen = reached[0]
        first = virtual.balance.order(chosen.deployments) if virtual.balance else list(chosen.deployments)
        call.model = chosen.model
        # A cascade's later tiers are listed too: the budget hold covers the dearest one, and the cost
        # stage prices each answer by the deployment that gave it. The cascade stage walks them one by one.
        call.deployments = [*first, *(d for t in reached[1:] for d in t.deployments)]
        call.ctx.route = Route(chosen.name, reason, ladder=tuple(reached) if len(reached) > 1 else (),
                               tried=[] if len(reached) > 1 else [chosen.name])
        if virtual.balance is None:
            return await next(call)
        return await self._balanced(call, next, virtual.balance, first[0].name)

    async def _balanced(self, call: Call, next: Next, balance: LoadBalance, name: str) -> Reply:
        balance.started(name)
        try:
            reply = await next(call)
        except BaseException:
            balance.finished(name, call.ctx.attempts)
            raise
        reply.on_finish(lambda _: balance.finished(name, call.ctx.attempts))
        return reply
