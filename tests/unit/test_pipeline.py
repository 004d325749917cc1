"""ChunkStream remembers what passed, runs finalisers exactly once, and hides what clients did not ask for."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from keel.config import parse_config
from keel.engine import Keel
from keel.errors import UpstreamConnectionError
from keel.pipeline import Call, ChunkStream, Completion, Next, Pipeline, Reply, StreamClosed
from keel.types import ChatRequest


def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}


USAGE = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m", "choices": [],
         "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}


async def source(chunks: list[dict[str, Any]], fail: Exception | None = None) -> AsyncIterator[dict[str, Any]]:
    for c in chunks:
        yield c
    if fail is not None:
        raise fail


async def test_text_and_usage_add_up_to_a_completion() -> None:
    stream = ChunkStream(source([chunk({"role": "assistant", "content": ""}), chunk({"content": "Hel"}),
                                 chunk({"content": "lo"}), chunk({}, "stop"), USAGE]))
    seen = [c async for c in stream]
    assert len(seen) == 5
    body = stream.completion()
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "Hello", "refusal": None}
    assert body["choices"][0]["finish_reason"] == "stop" and body["usage"] == USAGE["usage"]


async def test_tool_call_fragments_are_joined_by_index() -> None:
    parts = [
        chunk({"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                               "function": {"name": "get", "arguments": ""}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"a":'}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": "1}"}}]}),
        chunk({}, "tool_calls"),
    ]
    stream = ChunkStream(source(parts))
    _ = [c async for c in stream]
    message = stream.message()
    assert message["content"] is None
    assert message["tool_calls"] == [{"id": "call_1", "type": "function",
                                      "function": {"name": "get", "arguments": '{"a":1}'}}]


async def test_hidden_usage_chunk_is_counted_but_not_yielded() -> None:
    stream = ChunkStream(source([chunk({"content": "x"}, "stop"), USAGE]))
    stream.hide_usage = True
    seen = [c async for c in stream]
    assert seen == [chunk({"content": "x"}, "stop")]
    assert stream.usage == USAGE["usage"]


@pytest.mark.parametrize("how", ["end", "error", "close"])
async def test_finalisers_run_exactly_once(how: str) -> None:
    ran: list[BaseException | None] = []
    fail = UpstreamConnectionError("cut") if how == "error" else None
    stream = ChunkStream(source([chunk({"content": "a"}), chunk({"content": "b"})], fail))
    stream.on_finish(lambda s: ran.append(s.error))
    if how == "close":
        await stream.__anext__()
        await stream.aclose()
    else:
        with pytest.raises(UpstreamConnectionError) if fail else _nothing():
            _ = [c async for c in stream]
    await stream.aclose()  # a second close changes nothing
    assert len(ran) == 1
    expected = {"end": type(None), "error": UpstreamConnectionError, "close": StreamClosed}[how]
    assert isinstance(ran[0], expected)


async def test_prefetch_does_not_consume_the_first_chunk() -> None:
    stream = ChunkStream(source([chunk({"content": "a"}), chunk({"content": "b"})]))
    first = await stream.prefetch()
    assert first == chunk({"content": "a"})
    assert [c["choices"][0]["delta"]["content"] async for c in stream] == ["a", "b"]
    assert "".join(stream.content) == "ab"


async def test_stages_run_outermost_first_and_see_the_reply() -> None:
    order: list[str] = []

    class Tag:
        def __init__(self, name: str) -> None:
            self.name = name

        async def __call__(self, call: Call, next: Next) -> Reply:
            order.append(f"in {self.name}")
            reply = await next(call)
            order.append(f"out {self.name}")
            return reply

    keel = Keel(parse_config({"models": [{"name": "m", "deployments": [{"provider": "simulated"}]}]}),
                stages=[Tag("outer"), Tag("inner")])
    assert isinstance(keel.pipeline, Pipeline)
    reply = await keel.chat(model="m", messages=[{"role": "user", "content": "hi"}])
    assert order == ["in outer", "in inner", "out inner", "out outer"]
    assert not isinstance(reply, Completion)  # the library returns the typed model
    await keel.close()


async def test_engine_hides_the_usage_chunk_unless_asked() -> None:
    keel = Keel(parse_config({"models": [{"name": "m", "deployments": [{"provider": "simulated"}]}]}))
    messages = [{"role": "user", "content": "a b"}]
    plain = [c async for c in await keel.chat(model="m", messages=messages, stream=True)]  # type: ignore[union-attr]
    asked = [c async for c in await keel.chat(  # type: ignore[union-attr]
        model="m", messages=messages, stream=True, stream_options={"include_usage": True})]
    assert all(c.usage is None for c in plain)
    assert asked[-1].usage is not None and asked[-1].choices == []
    assert len(asked) == len(plain) + 1
    await keel.close()


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


async def test_a_completion_is_finished_by_the_pipeline_unless_delivery_comes_first() -> None:
    ran: list[str] = []

    class Bookkeeping:
        async def __call__(self, call: Call, next: Next) -> Reply:
            reply = await next(call)
            assert isinstance(reply, Completion)
            reply.on_finish(lambda completion: ran.append(completion.body["id"]))
            return reply

    keel = Keel(parse_config({"models": [{"name": "sim", "deployments": [{"provider": "simulated"}]}]}))

    class Answer:
        async def __call__(self, call: Call, next: Next) -> Reply:
            return Completion({"id": call.ctx.request_id})

    pipeline = Pipeline([Bookkeeping(), Answer()])
    model, deployments = keel.resolve("sim")
    request = ChatRequest.model_validate({"model": "sim", "messages": [{"role": "user", "content": "x"}]})
    call = Call(request=request, model=model, deployments=deployments)
    await pipeline(call)
    assert ran == [call.ctx.request_id], "the library's path: finished before the answer is returned"

    later = Call(request=request, model=model, deployments=deployments)
    later.ctx.deliver_first = True
    reply = await pipeline(later)
    assert isinstance(reply, Completion) and ran == [call.ctx.request_id]
    await reply.finish()
    await reply.finish()
    assert ran == [call.ctx.request_id, later.ctx.request_id], "the deliverer finishes it, once"


async def test_a_failing_finaliser_is_logged_and_the_others_still_run(caplog: pytest.LogCaptureFixture) -> None:
    ran: list[str] = []

    def broken(_: Any) -> None:
        raise RuntimeError("a bug in some stage's bookkeeping")

    completion = Completion({"id": "x"})
    completion.on_finish(broken)
    completion.on_finish(lambda _: ran.append("completion"))
    await completion.finish()

    stream = ChunkStream(source([chunk({"content": "hi"}, "stop")]))
    stream.on_finish(broken)
    stream.on_finish(lambda s: ran.append("stream"))
    assert [c async for c in stream]
    assert ran == ["completion", "stream"]
    assert [r.getMessage().split(' failed')[0] for r in caplog.records] == [
        "a finaliser of Completion", "a finaliser of ChunkStream"]


def test_ids_do_not_repeat_when_the_application_seeds_random() -> None:
    import random

    from keel.pipeline import new_request_id

    random.seed(42)
    first = new_request_id()
    random.seed(42)
    assert new_request_id() != first
