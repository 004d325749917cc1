"""The rate-limit stage: refuse a call over a requests or tokens limit before any money is reserved
(it sits just outside the budget stage), and correct its token charge when it ends.

Tokens are charged up front, the prompt estimated (`keel.cost.tokens`) plus the completion
allowance (`max_tokens`, else the deployment's default, else `limits.default_max_tokens`), so a
burst of long answers cannot slip through; when the call is settled the charge moves to the tokens
it actually used (`ctx.cost`, set by the cost stage inside this one), streams and failed calls
included. The tightest limits are left in `ctx.rate_limit` for the gateway's x-ratelimit-* headers.
"""

from __future__ import annotations

from typing import Any

from keel.cost.tokens import prompt_tokens
from keel.limits.headers import RateLimitState
from keel.limits.limiter import Charge, RateLimiter
from keel.pipeline import Call, CallCost, Next, Reply
from keel.types import ChatRequest


class RateLimitStage:
    def __init__(self, limiter: RateLimiter) -> None:
        self.limiter = limiter

    async def __call__(self, call: Call, next: Next) -> Reply:
        ctx = call.ctx
        key = getattr(ctx, "key", None)  # the virtual key (keel.auth), with its own limits
        limits = self.limiter.rules.for_call(call.model.name, ctx.key_id, ctx.user, getattr(key, "limits", None))
        if not limits:
            return await next(call)
        prompt = allowance = 0
        explicit = False
        if any(limit.kind == "tokens" for limit in limits):
            request = call.request
            prompt = prompt_tokens(request)
            if isinstance(request, ChatRequest):
                explicit = request.output_limit is not None
                allowance = request.output_limit or self.limiter.rules.completion_allowance(call.deployments[0].config)
        state = ctx.rate_limit = RateLimitState()
        charge = await self.limiter.charge(limits, prompt, allowance, state, explicit=explicit)
        if charge is None or not charge.hits:  # failed open, or no token limit to correct
            return await next(call)
        try:
            reply = await next(call)
        except BaseException:
            await self._settle(charge, ctx.cost)
            raise
        reply.on_finish(lambda _: self._settle(charge, ctx.cost))
        return reply

    async def _settle(self, charge: Charge, cost: CallCost) -> None:
        await self.limiter.settle(charge, used_tokens(cost))


def used_tokens(cost: CallCost) -> int:
    """The tokens a call consumed, as the cost stage charged them: its answer's and those billed
    without being delivered (a re-ask, a blocked answer)."""
    return _tokens(cost.usage) + sum(_tokens(billed.usage) for billed in cost.billed or ())


def _tokens(usage: dict[str, Any] | None) -> int:
    if not usage:
        return 0
    return int(usage.get("prompt_tokens") or 0) + int(usage.get("completion_tokens") or 0)
