"""The output guardrails stage: PII and secrets, deny patterns, off-topic and harmful answers, on
what a model says before the caller sees it. Inside the cost stage: a blocked answer is still paid
for (it is billed with the call), and the cache, outside this stage, only ever sees clean answers.

On a stream the pattern checks run on a hold-back window (`output.holdback_chars`), so streaming stays
streaming; the checks that need the whole answer (off-topic, harmful) run when it ends, before its
finishing chunk. A block ends the stream with an error event, or (`on_stream_violation: replace`)
with a notice in place of the rest and `finish_reason: content_filter`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Any

from keel.config import OutputGuardrailsConfig
from keel.errors import GuardrailViolation
from keel.guardrails.answer_checks import AnswerChecks
from keel.guardrails.holdback import HoldBack
from keel.guardrails.redaction import Redactor
from keel.guardrails.streaming import texts_of, through_window
from keel.pipeline import BilledUsage, Call, ChunkStream, Completion, Next, Reply
from keel.types import ChatRequest

REPLACED = "[The rest of this answer was withheld by a guardrail ({check}).]"


class OutputGuardrails:
    def __init__(self, policies: Mapping[str, AnswerChecks]) -> None:
        self.policies = policies  # by model name

    async def __call__(self, call: Call, next: Next) -> Reply:
        checks = self.policies.get(call.model.name)
        if checks is None or not isinstance(call.request, ChatRequest) or call.ctx.internal:
            return await next(call)
        reply = await next(call)
        if isinstance(reply, Completion):
            await self._check_completion(call, reply, checks)
        elif isinstance(reply, ChunkStream):
            self._check_stream(call, reply, checks)
        return reply

    async def _check_completion(self, call: Call, reply: Completion, checks: AnswerChecks) -> None:
        redactor = Redactor()
        try:
            for choice in reply.body.get("choices") or ():
                for key, holder, field in texts_of(choice.get("message") or {}):  # content, tool arguments
                    if holder[field]:
                        holder[field] = checks.patterns(holder[field], redactor, call.ctx.guardrails)
                        if key == "content":
                            await checks.whole(holder[field], call.ctx.guardrails)
        except GuardrailViolation:
            # The upstream was paid for an answer the caller will not see: it is billed with the call.
            if usage := reply.body.get("usage"):
                call.ctx.cost.bill(BilledUsage(call.ctx.deployment or "", usage, reply.body.get("model")))
            await reply.settle()
            raise

    def _check_stream(self, call: Call, reply: ChunkStream, checks: AnswerChecks) -> None:
        config, verdicts, redactor = checks.config, call.ctx.guardrails, Redactor()
        reply.wrap(through_window(
            lambda: HoldBack(config.holdback_chars, checks.find),
            lambda text, found: checks.judge(text, found, redactor, verdicts),
        ))
        if checks.needs_whole:
            reply.wrap(lambda source: _checked_at_end(source, checks, verdicts))
        if config.on_stream_violation == "replace":
            reply.wrap(lambda source: _replaced_on_violation(source, config))


async def _checked_at_end(
    source: AsyncIterator[dict[str, Any]], checks: AnswerChecks, verdicts: list[Any]
) -> AsyncIterator[dict[str, Any]]:
    """Chunks pass as they come, but the finishing ones wait for the checks of the whole answer."""
    text: list[str] = []
    held: list[dict[str, Any]] = []
    async for chunk in source:
        choices = chunk.get("choices") or ()
        for choice in choices:
            if isinstance(content := (choice.get("delta") or {}).get("content"), str):
                text.append(content)
        if held or any(c.get("finish_reason") is not None for c in choices) or not choices:
            held.append(chunk)
        else:
            yield chunk
    await checks.whole("".join(text), verdicts)
    for chunk in held:
        yield chunk


async def _replaced_on_violation(
    source: AsyncIterator[dict[str, Any]], config: OutputGuardrailsConfig
) -> AsyncIterator[dict[str, Any]]:
    """A block ends the stream normally, with a notice and `finish_reason: content_filter`."""
    last: dict[str, Any] = {}
    try:
        async for chunk in source:
            last = chunk
            yield chunk
    except GuardrailViolation as violation:
        head = {k: v for k, v in last.items() if k in ("id", "object", "created", "model")}
        yield {**head, "choices": [{"index": 0, "delta": {"content": REPLACED.format(check=violation.check)},
                                    "finish_reason": "content_filter"}]}
