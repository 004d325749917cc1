"""ChunkStream remembers what passed and hides what clients did not ask for; every reply is settled
(its finalisers run) exactly once, by whoever delivers it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from keel.config import parse_config
from keel.engine import Keel
from keel.errors import UpstreamConnectionError
from keel.pipeline import Call, ChunkStream, Completion, Context, Next, Pipeline, Reply, StreamClosed
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


async def test_a_reply_is_settled_by_keel_in_process_or_else_by_its_caller_once() -> None:
    ran: list[str] = []

    class Bookkeeping:
        async def __call__(self, call: Call, next: Next) -> Reply:
            reply = await next(call)
            reply.on_finish(lambda answered: ran.append(f"{call.ctx.request_id} {answered.error!r}"))
            return reply

    keel = Keel(parse_config({"models": [{"name": "sim", "deployments": [{"provider": "simulated"}]}]}),
                stages=[Bookkeeping()])
    plain = ChatRequest.model_validate({"model": "sim", "messages": [{"role": "user", "content": "x"}]})
    ctx = Context()
    await keel.handle(plain, ctx)
    assert ran == [f"{ctx.request_id} None"], "in-process: settled before the answer is returned"

    ran.clear()
    ctx = Context()
    reply = await keel.handle(plain, ctx, caller_settles=True)
    assert ran == []
    await reply.settle()
    await reply.settle()
    assert ran == [f"{ctx.request_id} None"], "the caller settles it, once"

    ran.clear()
    ctx = Context()
    stream = await keel.handle(plain.model_copy(update={"stream": True}), ctx, caller_settles=True)
    assert isinstance(stream, ChunkStream)
    assert [c async for c in stream] and ran == [], "its end is not its settlement: the caller has yet to deliver it"
    await stream.settle()
    assert ran == [f"{ctx.request_id} None"], "a clean end, not a close"
    await keel.close()


async def test_a_failed_stream_delivered_elsewhere_is_settled_with_its_error() -> None:
    ran: list[BaseException | None] = []
    stream = ChunkStream(source([chunk({"content": "a"})], UpstreamConnectionError("cut")))
    stream.settles_at_end = False
    stream.on_finish(lambda s: ran.append(s.error))
    with pytest.raises(UpstreamConnectionError):
        _ = [c async for c in stream]
    assert ran == []
    await stream.settle()
    assert len(ran) == 1 and isinstance(ran[0], UpstreamConnectionError)


async def test_a_failing_finaliser_is_logged_and_the_others_still_run(caplog: pytest.LogCaptureFixture) -> None:
    ran: list[str] = []

    def broken(_: Any) -> None:
        raise RuntimeError("a bug in some stage's bookkeeping")

    completion = Completion({"id": "x"})
    completion.on_finish(broken)
    completion.on_finish(lambda _: ran.append("completion"))
    await completion.settle()

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
