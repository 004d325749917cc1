"""What a call cost (`ctx.cost`, set by the cost stage) and the most it could cost, for reservations."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from keel.cost.money import Nanos
from keel.cost.pricing import PricingTable, cost_nanos
from keel.cost.tokens import completion_tokens, prompt_tokens
from keel.types import ChatRequest

if TYPE_CHECKING:
    from keel.pipeline import Call
    from keel.providers.base import Deployment


class CostMeter:
    """Sets `ctx.cost` (`CallCost`) from the upstream's usage.

    When the upstream reported no usage (or only part of it) the missing counts are estimated
    locally (`keel.cost.tokens`) and the record is marked estimated. A call that reached no
    deployment (no attempt recorded: a cache hit, a refusal before the provider) costs nothing.
    """

    def __init__(self, pricing: PricingTable, *, default_max_tokens: int = 4096) -> None:
        self.pricing = pricing
        self.default_max_tokens = default_max_tokens  # output bound of a request that sets none

    def charge(self, call: Call, answer: Mapping[str, Any] | None) -> None:
        """Set `ctx.cost` for the call's answer (a chat.completion or embeddings body; for a
        stream, `stream.completion()`; None when no upstream answered: nothing is billed), plus
        the answers billed but not delivered (`ctx.cost.billed`). The cost stage calls it once."""
        cost = call.ctx.cost
        if answer is None or not call.ctx.attempts:
            nanos, usage, estimated = 0, dict((answer or {}).get("usage") or {}), False
        else:
            usage, estimated = _usage(call, answer)
            nanos = self._price(call, _answering(call), answer.get("model"), usage)
        for billed in cost.billed or ():
            nanos += self._price(call, _named(call, billed.deployment), billed.model, billed.usage)
        cost.usage = usage or None
        cost.estimated = estimated
        cost.nanos = nanos

    def _price(self, call: Call, deployment: Deployment, model: str | None, usage: Mapping[str, Any]) -> Nanos:
        price = self.pricing.for_deployment(deployment.config, model or None)
        if price is None:
            call.ctx.cost.unpriced = True
            return 0
        return cost_nanos(usage, price)

    def worst_case(self, call: Call) -> Nanos:
        """The most a call can cost: its estimated prompt and its output bound, at the price of the
        dearest deployment it may reach (a fallback may answer it)."""
        request = call.request
        usage = {
            "prompt_tokens": prompt_tokens(request),
            "completion_tokens": (request.output_limit or self.default_max_tokens)
            if isinstance(request, ChatRequest) else 0,
        }
        prices = (self.pricing.for_deployment(d.config) for d in call.deployments)
        return max((cost_nanos(usage, p) for p in prices if p is not None), default=0)


def _usage(call: Call, answer: Mapping[str, Any]) -> tuple[dict[str, Any], bool]:
    """The upstream's usage, with whatever it left out estimated; and whether anything was."""
    usage = dict(answer.get("usage") or {})
    estimated = False
    if usage.get("prompt_tokens") is None:
        usage["prompt_tokens"] = prompt_tokens(call.request)
        estimated = True
    if usage.get("completion_tokens") is None and isinstance(call.request, ChatRequest):
        choices = answer.get("choices") or [{}]
        usage["completion_tokens"] = completion_tokens(choices[0].get("message"))
        estimated = True
    if estimated:
        usage["total_tokens"] = usage["prompt_tokens"] + int(usage.get("completion_tokens") or 0)
    return usage, estimated


def _answering(call: Call) -> Deployment:
    """The deployment that answered: named by the reliability stage, else the one targeted."""
    return _named(call, call.ctx.deployment)


def _named(call: Call, name: str | None) -> Deployment:
    for deployment in call.deployments:
        if deployment.name == name:
            return deployment
    return call.target if call.target is not None else call.deployments[0]
