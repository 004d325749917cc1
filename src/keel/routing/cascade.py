"""The cascade strategy: answer with the cheapest tier, check the answer, escalate when it fails.

Checks (`router.escalate_on`):
- `invalid_output`: the validation stage (inside this one) gave up on a JSON answer or tool call,
  an error with code `invalid_output`;
- `low_confidence`: the answer's mean token log-probability, where the upstream gave them, is
  below `router.min_logprob`;
- `judge`: another model (`router.judge_model`) asked "is this answer adequate? yes/no" said no.

An escalation is one more attempt in the call's log; the discarded answer is billed with the call
(`ctx.cost.bill`), so the call's cost is what the cascade really spent. A streamed call cannot be
checked before it reaches the client: it goes to the top tier at once.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

from keel.errors import KeelError
from keel.pipeline import BilledUsage, Call, ChunkStream, Next, Reply
from keel.routing.complexity import request_text
from keel.routing.route import Choice, Route, Tier

log = logging.getLogger("keel.routing")

Ask = Callable[[str, str], Awaitable[str]]  # (model, prompt) -> the model's answer text
INVALID_OUTPUT = "invalid_output"


class AnswerCheck(Protocol):
    """Says why an answer is not good enough, or None when it is."""

    @property
    def name(self) -> str: ...

    async def __call__(self, call: Call, answer: Mapping[str, Any]) -> str | None: ...


def mean_logprob(answer: Mapping[str, Any]) -> float | None:
    """The mean log-probability of the answer's tokens, when the upstream gave them."""
    choices = answer.get("choices") or [{}]
    content = ((choices[0] or {}).get("logprobs") or {}).get("content") or []
    values = [t["logprob"] for t in content if isinstance(t, Mapping) and isinstance(t.get("logprob"), int | float)]
    return sum(values) / len(values) if values else None


@dataclass(frozen=True, slots=True)
class LowConfidence:
    min_logprob: float = -1.0
    name: str = "low_confidence"

    async def __call__(self, call: Call, answer: Mapping[str, Any]) -> str | None:
        mean = mean_logprob(answer)
        return self.name if mean is not None and mean < self.min_logprob else None


JUDGE_PROMPT = (
    "You check answers. Reply with one word: yes if the answer below fully and correctly answers the "
    "request, no otherwise.\n\nRequest:\n{request}\n\nAnswer:\n{answer}\n\nIs this answer adequate? yes/no"
)


@dataclass(frozen=True, slots=True)
class JudgeCheck:
    """A judge route: another model says whether the answer is adequate. A judge that fails or
    answers neither yes nor no keeps the answer (the cascade never fails a call the tier answered)."""

    ask: Ask
    model: str
    max_chars: int = 8000
    name: str = "judge"

    async def __call__(self, call: Call, answer: Mapping[str, Any]) -> str | None:
        message = ((answer.get("choices") or [{}])[0] or {}).get("message") or {}
        text = str(message.get("content") or message.get("tool_calls") or "")
        prompt = JUDGE_PROMPT.format(request=request_text(call)[: self.max_chars], answer=text[: self.max_chars])
        try:
            verdict = await self.ask(self.model, prompt)
        except KeelError as exc:
            log.warning("the judge '%s' failed (%s); request %s keeps its answer", self.model, exc.code,
                        call.ctx.request_id)
            return None
        return self.name if verdict.strip().lower().startswith("no") else None


class CascadeRoute:
    """Start at the cheapest tier, escalate up to the top (`reason=cascade`); streams go to the top."""

    async def decide(self, call: Call, tiers: Sequence[Tier]) -> Choice:
        top = len(tiers) - 1
        if call.stream:
            return Choice(top, "cascade-stream")
        return Choice(0, "cascade", up_to=top)


@dataclass(frozen=True, slots=True)
class CascadePolicy:
    """One virtual model's checks."""

    checks: tuple[AnswerCheck, ...] = ()
    on_invalid_output: bool = True

    async def failed(self, call: Call, answer: Mapping[str, Any]) -> str | None:
        for check in self.checks:
            if (why := await check(call, answer)) is not None:
                return why
        return None


class Cascade:
    """The stage that walks a cascade's tiers (`ctx.route.ladder`): inside the cost stage, so each
    discarded answer is billed, and outside validation, so its `invalid_output` is seen."""

    def __init__(self, policies: Mapping[str, CascadePolicy]) -> None:
        self.policies = dict(policies)  # by virtual model name

    async def __call__(self, call: Call, next: Next) -> Reply:
        route = call.ctx.route
        policy = self.policies.get(call.request.model)
        if route is None or len(route.ladder) < 2 or policy is None:
            return await next(call)
        for i, tier in enumerate(route.ladder):
            last = i == len(route.ladder) - 1
            route.model = tier.name
            route.tried.append(tier.name)
            rung = replace(call, model=tier.model, deployments=tier.deployments, target=None)
            try:
                reply = await next(rung)
            except KeelError as exc:
                if last or exc.code != INVALID_OUTPUT or not policy.on_invalid_output:
                    raise
                _escalated(route, INVALID_OUTPUT)  # the validation stage billed its attempts
                continue
            if last or isinstance(reply, ChunkStream):
                return reply
            why = await policy.failed(rung, reply.body)
            if why is None:
                return reply
            call.ctx.cost.bill(BilledUsage(
                deployment=call.ctx.deployment or tier.deployments[0].name,
                usage=dict(reply.body.get("usage") or {}), model=reply.body.get("model"),
            ))
            _escalated(route, why)
        raise AssertionError("a cascade's last tier returns or raises")  # pragma: no cover


def _escalated(route: Route, why: str) -> None:
    route.escalations += 1
    route.reason = f"{route.reason},{route.model}:{why}"
