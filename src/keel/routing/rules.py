"""The rules strategy: the first rule whose conditions all hold names the tier.

Conditions read what is known before any model runs: the feature tag (`metadata.feature`), the
estimated prompt size, whether the call offers tools or asks for JSON, and the caller's tenant and
tier (its virtual key's: `VirtualKey.tenant`, `VirtualKey.tier`). A call without a key, or with a key
without a tier, matches no `key_tiers` rule. No rule matches: the default tier (the cheapest unless
configured).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from keel.config import RouteRuleConfig
from keel.cost.tokens import prompt_tokens
from keel.pipeline import Call
from keel.routing.route import Choice, Tier
from keel.types import ChatRequest


@dataclass(frozen=True, slots=True)
class CallTraits:
    """What rules look at, read once per call."""

    feature: str | None
    input_tokens: int
    tools: bool
    response_format: bool
    tenant: str | None
    key_tier: str | None  # None: no key, or a key without a tier

    @classmethod
    def of(cls, call: Call, count_tokens: bool = True) -> CallTraits:
        """The call's traits; its input tokens only when `count_tokens` (else 0: no rule reads them)."""
        request = call.request
        chat = request if isinstance(request, ChatRequest) else None
        feature = call.ctx.feature
        if feature is None and chat is not None and chat.metadata:
            feature = chat.metadata.get("feature")
        fmt = chat.response_format if chat is not None else None
        return cls(
            feature=feature,
            input_tokens=prompt_tokens(request) if count_tokens else 0,
            tools=chat is not None and bool(chat.tools),
            response_format=fmt is not None and fmt.type != "text",
            tenant=call.ctx.tenant,
            key_tier=call.ctx.key.tier if call.ctx.key is not None else None,
        )


def matches(rule: RouteRuleConfig, traits: CallTraits) -> bool:
    """Every condition the rule gives holds for the call."""
    if rule.features is not None and traits.feature not in rule.features:
        return False
    if rule.min_input_tokens is not None and traits.input_tokens < rule.min_input_tokens:
        return False
    if rule.max_input_tokens is not None and traits.input_tokens > rule.max_input_tokens:
        return False
    if rule.tools is not None and traits.tools != rule.tools:
        return False
    if rule.response_format is not None and traits.response_format != rule.response_format:
        return False
    if rule.key_tiers is not None and (traits.key_tier is None or traits.key_tier not in rule.key_tiers):
        return False
    return rule.tenants is None or traits.tenant in rule.tenants


class RuleRoute:
    """Rules in order; the first match wins (`reason=rule[2]`), else the default tier (`reason=default`)."""

    def __init__(self, rules: Sequence[RouteRuleConfig], tier_names: Sequence[str], default: str | None = None) -> None:
        self.rules = [(i, rule, list(tier_names).index(rule.tier)) for i, rule in enumerate(rules)]
        self.default = list(tier_names).index(default) if default is not None else 0
        # Counting a prompt's tokens serialises its tools and schema: only when some rule reads them.
        self.counts_tokens = any(r.min_input_tokens is not None or r.max_input_tokens is not None for r in rules)

    async def decide(self, call: Call, tiers: Sequence[Tier]) -> Choice:
        traits = CallTraits.of(call, self.counts_tokens)
        for i, rule, tier in self.rules:
            if matches(rule, traits):
                return Choice(tier, f"rule[{i}]")
        return Choice(self.default, "default")
