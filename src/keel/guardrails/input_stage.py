"""The input guardrails stage: length limits, PII and secrets, prompt injection, on what goes to a
model; before rate limits and budgets, so a refused call costs nothing.

The cheap checks run inline; the ones that need a model run alongside the call itself, and a block
cancels the call (its budget hold is released as for any failed call). Redacted values go upstream as
placeholders and are put back in the answer for the caller (`pii.restore`), streams included.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from keel.config import InputGuardrailsConfig
from keel.guardrails.holdback import HoldBack
from keel.guardrails.injection_policy import InjectionPolicy
from keel.guardrails.length import TokenCounter, check_length
from keel.guardrails.pii_policy import PiiPolicy
from keel.guardrails.redaction import Redactor
from keel.guardrails.streaming import texts_of, through_window
from keel.guardrails.texts import pieces
from keel.guardrails.verdicts import add
from keel.pipeline import Call, ChunkStream, Completion, Next, Reply
from keel.types import ChatRequest

PLACEHOLDER_WINDOW = 64  # longer than any placeholder, so none is split when a stream's text is restored


@dataclass(slots=True)
class InputPolicy:
    """One model's input guardrails, built once from keel.yaml."""

    limits: InputGuardrailsConfig
    pii: PiiPolicy | None
    injection: InjectionPolicy | None
    counter: TokenCounter | None = None


class InputGuardrails:
    def __init__(self, policies: Mapping[str, InputPolicy]) -> None:
        self.policies = policies  # by model name; a model without one is not checked

    async def __call__(self, call: Call, next: Next) -> Reply:
        policy = self.policies.get(call.model.name)
        request = call.request
        if policy is None or not isinstance(request, ChatRequest) or call.ctx.internal:
            return await next(call)
        verdicts = call.ctx.guardrails
        texts = pieces(request)
        if (length := await check_length(request, texts, policy.limits, policy.counter)) is not None:
            add(verdicts, length)
        redactor = Redactor()
        if policy.pii is not None:
            for piece in texts:
                piece.replace(policy.pii.apply(piece.text, redactor, verdicts, piece.source))
        if policy.injection is not None:
            policy.injection.screen(texts, verdicts)
            if policy.injection.slow:
                reply = await _alongside(next(call), policy.injection.judge_slow(texts, verdicts))
            else:
                reply = await next(call)
        else:
            reply = await next(call)
        if redactor.count and policy.pii is not None and policy.pii.config.restore:
            _restore(reply, redactor)
        return reply


async def _alongside(answer: Any, check: Any) -> Reply:
    """Run the call and a check together; a check that raises cancels the call (or closes the reply
    it already gave, which settles its bookkeeping) and its error is the call's."""
    task: asyncio.Task[Reply] = asyncio.ensure_future(answer)
    try:
        await check
    except BaseException:
        if task.done() and not task.cancelled() and task.exception() is None:
            await task.result().settle()
        else:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        raise
    return await task


def _restore(reply: Reply, redactor: Redactor) -> None:
    """The caller's own values back in place of the placeholders that went upstream."""
    if isinstance(reply, Completion):
        for choice in reply.body.get("choices") or ():
            for _, holder, field in texts_of(choice.get("message") or {}):
                holder[field] = redactor.restore(holder[field])
    elif isinstance(reply, ChunkStream):
        reply.wrap(through_window(
            lambda: HoldBack(PLACEHOLDER_WINDOW, redactor.find_placeholders),
            lambda text, _found: redactor.restore(text),
        ))
