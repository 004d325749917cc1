"""The validation stage: a JSON answer or tool call is checked against what the caller asked for,
re-asked when it is wrong, and refused rather than passed on invalid.

Only requests with `response_format` json_object/json_schema or `tools` are looked at; others pass
straight through. Their schemas are checked first (a bad one is the caller's 400, `schema.py`).

An invalid answer is discarded (billed with the call: the upstream was paid for it; its attempt in
`ctx.attempts` is marked `invalid_output`) and the same deployment is re-asked with the errors
(`repair.py`), up to `validation.max_repairs` times, inside the call's deadline; then the next
deployment gets the original request; then the call ends with a 422 `invalid_output` naming the
failing path. Each re-ask goes through the reliability stage inside, so it is an attempt of its own
in the log and the trace.

Streams: with `repair_streams: end` the answer streams as it comes and is checked when it ends,
before its finishing chunk; a failure ends the stream with an error event (what was sent cannot be
taken back). With `buffer`, the answer is fetched whole, checked and repaired as above, then sent as
a stream.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace
from typing import Any

from keel.chunks import folded, replay
from keel.config import ValidationConfig
from keel.cost.tokens import completion_tokens, prompt_tokens
from keel.errors import InvalidOutput, KeelError
from keel.pipeline import BilledUsage, Call, ChunkStream, Completion, Next, Reply
from keel.providers.base import Deployment
from keel.types import ChatRequest
from keel.validation.answer import Expectations, expectations, needs_validation, problems
from keel.validation.repair import repair_request
from keel.validation.schema import SchemaCache


class Validation:
    """The stage; its one state is the cache of compiled schemas, shared by every call."""

    def __init__(self, schemas: SchemaCache | None = None) -> None:
        self.schemas = schemas or SchemaCache()

    async def __call__(self, call: Call, next: Next) -> Reply:
        request = call.request
        config = call.model.validation
        if not isinstance(request, ChatRequest) or not config.enabled or not needs_validation(request):
            return await next(call)
        expect = expectations(request, self.schemas)  # a bad schema: 400 before any money is spent
        if not call.stream:
            return await self._complete(call, next, expect, config)
        if config.repair_streams == "buffer":
            return await self._buffered(call, next, expect, config)
        reply = await next(call)
        if isinstance(reply, ChunkStream):
            reply.wrap(lambda source: _checked_at_end(source, reply, call, expect))
        return reply

    async def _complete(self, call: Call, next: Next, expect: Expectations, config: ValidationConfig) -> Completion:
        """Ask, check, re-ask; then the next deployment; then InvalidOutput."""
        request = call.request
        assert isinstance(request, ChatRequest)
        left: Sequence[Deployment] = call.deployments
        found: list[str] = []
        tries = 0
        while left:
            asked = request
            for repair in range(config.max_repairs + 1):
                if tries and (time_left := call.ctx.remaining()) is not None and time_left <= 0:
                    raise _refused(call, expect, found, tries, "no time was left for another try")
                try:
                    reply = await next(replace(call, request=asked, deployments=left))
                except KeelError as exc:
                    if not tries:
                        raise  # nothing invalid yet: the failure is the call's own
                    raise _refused(call, expect, found, tries, f"the next try failed: {exc.message}") from exc
                assert isinstance(reply, Completion)
                tries += 1
                found = problems(expect, reply.body)
                if not found:
                    return reply
                await _discard(call, asked, reply)
                if repair < config.max_repairs:
                    asked = repair_request(asked, reply.body["choices"][0], found, expect)
            failing = call.ctx.deployment
            kept = [d for d in left if d.name != failing]
            left = kept if len(kept) < len(left) else left[1:]
        raise _refused(call, expect, found, tries, None)

    async def _buffered(self, call: Call, next: Next, expect: Expectations, config: ValidationConfig) -> ChunkStream:
        """The answer fetched whole (checked and repaired), then sent as the chunks of a stream."""
        request = call.request
        assert isinstance(request, ChatRequest)
        whole = replace(call, request=request.model_copy(update={"stream": False, "stream_options": None}))
        completion = await self._complete(whole, next, expect, config)
        await completion.settle()
        call.ctx.first_chunk_at = time.monotonic()
        return ChunkStream(replay(completion.body))


async def _discard(call: Call, asked: ChatRequest, reply: Completion) -> None:
    """An invalid answer the caller will not see: billed with the call (estimated when the upstream
    gave no usage), and its attempt marked."""
    body = reply.body
    usage = body.get("usage") or _estimated(asked, body)
    call.ctx.cost.bill(BilledUsage(call.ctx.deployment or "", usage, body.get("model")))
    _mark_invalid(call)
    await reply.settle()


def _estimated(asked: ChatRequest, body: dict[str, Any]) -> dict[str, Any]:
    prompt = prompt_tokens(asked)
    output = completion_tokens((body.get("choices") or [{}])[0].get("message"))
    return {"prompt_tokens": prompt, "completion_tokens": output, "total_tokens": prompt + output}


def _mark_invalid(call: Call) -> None:
    attempts = call.ctx.attempts
    if attempts and attempts[-1].error is None:
        attempts[-1].error = InvalidOutput.code


def _refused(call: Call, expect: Expectations, found: list[str], tries: int, why: str | None) -> InvalidOutput:
    tried = sorted({a.deployment for a in call.ctx.attempts if a.error == InvalidOutput.code})
    where = f" ({', '.join(tried)})" if tried else ""
    ending = f"; then {why}" if why else ""
    return InvalidOutput(
        f"The model's answer did not match what the request asked for after {tries} "
        f"tr{'y' if tries == 1 else 'ies'}{where}{ending}: {'; '.join(found) or 'no answer'}. "
        "Simplify the schema, raise max_tokens, or use a stronger model.",
        param=expect.param,
    )


async def _checked_at_end(
    source: AsyncIterator[dict[str, Any]], stream: ChunkStream, call: Call, expect: Expectations
) -> AsyncIterator[dict[str, Any]]:
    """Chunks pass as they come; the finishing ones wait for the check of the whole answer."""
    seen: list[dict[str, Any]] = []
    held: list[dict[str, Any]] = []
    async for chunk in source:
        seen.append(chunk)
        choices = chunk.get("choices") or ()
        if held or not choices or any(c.get("finish_reason") for c in choices):
            held.append(chunk)
        else:
            yield chunk
    answer = await folded(seen)
    found = problems(expect, answer)
    if found:
        stream.usage = stream.usage or answer.get("usage")  # the cost stage charges what the upstream billed
        _mark_invalid(call)
        raise InvalidOutput(
            f"The streamed answer did not match what the request asked for: {'; '.join(found)}. "
            "Set validation.repair_streams: buffer to have it repaired before it is sent.",
            param=expect.param,
        )
    for chunk in held:
        yield chunk
