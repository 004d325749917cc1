"""The routing stages for a keel.yaml: the router (virtual model -> tier) and the cascade walker."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from keel.config import KeelConfig, RouterConfig
from keel.providers.base import Deployment
from keel.routing.balance import LoadBalance
from keel.routing.budget import BudgetDowngrade
from keel.routing.cascade import AnswerCheck, Ask, Cascade, CascadePolicy, CascadeRoute, JudgeCheck, LowConfidence
from keel.routing.complexity import ComplexityRoute, ExampleVote, thresholds_for
from keel.routing.route import Strategy, Tier
from keel.routing.rules import RuleRoute
from keel.routing.stage import RouterStage, VirtualModel

if TYPE_CHECKING:
    from keel.budgets.budgets import Budgets
    from keel.embedding.shared import Embedder


@dataclass(frozen=True, slots=True)
class Routing:
    router: RouterStage
    cascade: Cascade


def build_routing(
    config: KeelConfig, deployments: Mapping[str, Sequence[Deployment]], *, ask: Ask, budgets: Budgets,
    embedder: Callable[[], Embedder],
) -> Routing | None:
    """The stages when some model has a router, else None (and calls do no routing work)."""
    models: dict[str, VirtualModel] = {}
    policies: dict[str, CascadePolicy] = {}
    for model in config.models:
        router = model.router
        if router is None:
            continue
        tiers = tuple(Tier(tier, tuple(deployments[tier.name])) for name in router.tiers
                      if (tier := config.model(name)) is not None)
        balance = LoadBalance(router.weights, router.latency_halflife) if router.strategy == "balance" else None
        models[model.name] = VirtualModel(
            model.name, tiers, balance or _strategy(router, embedder), balance,
            BudgetDowngrade(budgets) if router.budget_downgrade else None,
        )
        if router.strategy == "cascade":
            policies[model.name] = _policy(router, ask)
    if not models:
        return None
    return Routing(RouterStage(models), Cascade(policies))


def _strategy(router: RouterConfig, embedder: Callable[[], Embedder]) -> Strategy:
    if router.strategy == "rules":
        return RuleRoute(router.rules, router.tiers, router.default_tier)
    if router.strategy == "complexity":
        section = router.complexity
        vote = ExampleVote(section.examples, embedder(), section.neighbours) if section.examples else None
        return ComplexityRoute(thresholds_for(len(router.tiers), section.thresholds), vote, section.examples_weight)
    return CascadeRoute()


def _policy(router: RouterConfig, ask: Ask) -> CascadePolicy:
    checks: list[AnswerCheck] = []
    if "low_confidence" in router.escalate_on:
        checks.append(LowConfidence(router.min_logprob))
    if "judge" in router.escalate_on and router.judge_model:
        checks.append(JudgeCheck(ask, router.judge_model))
    return CascadePolicy(tuple(checks), "invalid_output" in router.escalate_on)
