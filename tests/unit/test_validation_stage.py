"""The validation stage: re-ask, next deployment, 422; billing of discarded answers; streams."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable
from types import SimpleNamespace
from typing import Any

import pytest

from keel.config import Price, parse_config
from keel.cost.pricing import cost_nanos
from keel.engine import Keel
from keel.errors import InvalidOutput, InvalidRequest
from keel.pipeline import Attempt, Call, ChunkStream, Completion, Context, Reply
from keel.providers.base import chunk_body
from keel.types import AssistantMessage, ChatRequest, UserMessage
from keel.validation.stage import Validation

SCHEMA = {"type": "object", "required": ["price"], "properties": {"price": {"type": "number"}}}
VALID, INVALID = '{"price": 3}', '{"price": "abc"}'
USAGE = {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}


def request(**fields: Any) -> ChatRequest:
    return ChatRequest.model_validate({
        "model": "m", "messages": [{"role": "user", "content": "price?"}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMA}}, **fields,
    })


def call_for(req: ChatRequest, *deployments: str, **validation: Any) -> Call:
    config = parse_config({"models": [{"name": "m", "validation": validation,
                                       "deployments": [{"provider": "simulated"}]}]})
    return Call(req, config.models[0], [SimpleNamespace(name=n) for n in deployments or ("a",)])  # type: ignore[misc]


class Upstream:
    """A fake `next`: answers from a script per deployment (the first one left in `call.deployments`),
    recording each attempt as the reliability stage does; the last answer repeats."""

    def __init__(self, **script: list[str]) -> None:
        self.script = script
        self.asked: list[tuple[str, ChatRequest]] = []
        self.on_answer: Callable[[Call], None] = lambda call: None

    async def __call__(self, call: Call) -> Reply:
        name = call.deployments[0].name
        assert isinstance(call.request, ChatRequest)
        self.asked.append((name, call.request))
        call.ctx.attempts.append(Attempt(deployment=name, started=time.monotonic(), ended=time.monotonic()))
        call.ctx.deployment = name
        answers = self.script[name]
        content = answers.pop(0) if len(answers) > 1 else answers[0]
        self.on_answer(call)
        if call.stream:
            return ChunkStream(chunks(content))
        return Completion({"id": "c", "object": "chat.completion", "created": 0, "model": name, "usage": USAGE,
                           "choices": [{"index": 0, "finish_reason": "stop",
                                        "message": {"role": "assistant", "content": content}}]})


async def chunks(content: str) -> AsyncIterator[dict[str, Any]]:
    yield chunk_body(id="c", model="a", created=0, delta={"role": "assistant", "content": ""})
    for piece in (content[:5], content[5:]):
        yield chunk_body(id="c", model="a", created=0, delta={"content": piece})
    yield chunk_body(id="c", model="a", created=0, delta={}, finish_reason="stop")
    yield chunk_body(id="c", model="a", created=0, delta={}, usage=USAGE)


async def test_an_answer_that_fails_twice_is_repaired_with_the_errors_and_each_try_is_an_attempt() -> None:
    upstream = Upstream(a=[INVALID, "not json", VALID])
    call = call_for(request())
    reply = await Validation()(call, upstream)
    assert isinstance(reply, Completion) and reply.body["choices"][0]["message"]["content"] == VALID
    assert [a.error for a in call.ctx.attempts] == ["invalid_output", "invalid_output", None]
    first_repair = upstream.asked[1][1].messages
    assert isinstance(first_repair[-2], AssistantMessage) and first_repair[-2].content == INVALID
    assert isinstance(first_repair[-1], UserMessage)
    assert "$.price: 'abc' is not of type 'number'" in str(first_repair[-1].content)
    assert len(upstream.asked[2][1].messages) == len(first_repair) + 2  # the second repair adds its own pair


async def test_discarded_answers_are_billed_to_the_deployment_that_gave_them() -> None:
    call = call_for(request())
    await Validation()(call, Upstream(a=[INVALID, VALID]))
    assert call.ctx.cost.billed is not None
    assert [(b.deployment, b.usage) for b in call.ctx.cost.billed] == [("a", USAGE)]


async def test_always_invalid_ends_in_a_422_naming_the_path_after_max_repairs() -> None:
    upstream = Upstream(a=[INVALID])
    call = call_for(request(), max_repairs=1)
    with pytest.raises(InvalidOutput) as caught:
        await Validation()(call, upstream)
    error = caught.value.body()["error"]
    assert caught.value.status == 422
    assert error["code"] == "invalid_output" and error["type"] == "invalid_request_error"
    assert error["param"] == "response_format"
    assert "$.price: 'abc' is not of type 'number'" in error["message"] and "after 2 tries (a)" in error["message"]
    assert len(upstream.asked) == 2
    assert len(call.ctx.cost.billed or ()) == 2


async def test_the_next_deployment_gets_the_original_request_after_the_first_one_keeps_failing() -> None:
    upstream = Upstream(a=[INVALID], b=[VALID])
    call = call_for(request(), "a", "b", max_repairs=1)
    reply = await Validation()(call, upstream)
    assert isinstance(reply, Completion) and reply.body["model"] == "b"
    assert [name for name, _ in upstream.asked] == ["a", "a", "b"]
    assert upstream.asked[2][1].messages == call.request.messages  # type: ignore[union-attr]


async def test_no_repair_is_tried_past_the_deadline() -> None:
    upstream = Upstream(a=[INVALID, VALID])

    def deadline_passes(call: Call) -> None:
        call.ctx.deadline = time.monotonic() - 1

    upstream.on_answer = deadline_passes
    call = call_for(request())
    with pytest.raises(InvalidOutput) as caught:
        await Validation()(call, upstream)
    assert len(upstream.asked) == 1
    assert "no time was left" in caught.value.message


async def test_requests_without_json_or_tools_pass_through_untouched() -> None:
    seen: list[Call] = []

    async def next(call: Call) -> Reply:
        seen.append(call)
        return Completion({"choices": [{"message": {"content": "not json at all"}, "finish_reason": "length"}]})

    call = call_for(ChatRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "hi"}]}))
    await Validation()(call, next)
    assert seen == [call] and seen[0] is call and call.ctx.cost.billed is None


async def test_validation_off_passes_invalid_answers() -> None:
    call = call_for(request(), enabled=False)
    reply = await Validation()(call, Upstream(a=[INVALID]))
    assert isinstance(reply, Completion) and call.ctx.attempts[0].error is None


async def test_a_bad_schema_is_refused_before_any_upstream_call() -> None:
    upstream = Upstream(a=[VALID])
    bad = request(response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": {"type": 5}}})
    with pytest.raises(InvalidRequest) as caught:
        await Validation()(call_for(bad), upstream)
    assert caught.value.param == "response_format.json_schema.schema" and upstream.asked == []


async def test_a_stream_is_checked_at_its_end_and_a_failure_withholds_the_finish() -> None:
    call = call_for(request(stream=True))
    reply = await Validation()(call, Upstream(a=[INVALID]))
    assert isinstance(reply, ChunkStream)
    got: list[dict[str, Any]] = []
    with pytest.raises(InvalidOutput) as caught:
        async for chunk in reply:
            got.append(chunk)
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in got) == INVALID
    assert all(c["choices"][0]["finish_reason"] is None for c in got)
    assert "$.price" in caught.value.message
    assert reply.usage == USAGE  # the withheld usage chunk still reaches the cost stage
    assert call.ctx.attempts[-1].error == "invalid_output"


async def test_a_valid_stream_passes_whole_and_in_order() -> None:
    reply = await Validation()(call_for(request(stream=True)), Upstream(a=[VALID]))
    assert isinstance(reply, ChunkStream)
    got = [chunk async for chunk in reply]
    assert len(got) == 5 and got[3]["choices"][0]["finish_reason"] == "stop"
    assert reply.completion()["choices"][0]["message"]["content"] == VALID


async def test_a_buffered_stream_is_repaired_before_anything_is_sent() -> None:
    upstream = Upstream(a=[INVALID, VALID])
    call = call_for(request(stream=True), repair_streams="buffer")
    reply = await Validation()(call, upstream)
    assert isinstance(reply, ChunkStream)
    text = "".join([c["choices"][0]["delta"].get("content") or "" async for c in reply if c["choices"]])
    assert json.loads(text) == {"price": 3}
    assert [bool(asked.stream) for _, asked in upstream.asked] == [False, False]


async def test_through_the_engine_a_broken_deployment_is_repaired_billed_then_passed_over(
    keel_for: Callable[..., Keel],
) -> None:
    price = {"input": 1.0, "output": 2.0}
    keel = keel_for({"provider": "simulated", "name": "broken", "invalid_json_rate": 1.0, "seed": 1, "price": price},
                    {"provider": "simulated", "name": "good", "price": price}, validation={"max_repairs": 1})
    ctx = Context()
    reply = await keel.handle(request(), ctx)
    assert isinstance(reply, Completion)
    assert json.loads(reply.body["choices"][0]["message"]["content"]) == {"price": 0}
    assert [(a.deployment, a.error) for a in ctx.attempts] == [
        ("broken", "invalid_output"), ("broken", "invalid_output"), ("good", None)]
    assert [b.deployment for b in ctx.cost.billed or ()] == ["broken", "broken"]
    rate = Price(**price)
    usages = [b.usage for b in ctx.cost.billed or ()] + [reply.body["usage"]]
    assert ctx.cost.nanos == sum(cost_nanos(usage, rate) for usage in usages)
    assert ctx.cost.nanos > cost_nanos(reply.body["usage"], rate)
