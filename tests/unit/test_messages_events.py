"""Anthropic's event stream from chat chunks: the events, in Anthropic's order, each framed as
`event: <type>` + `data: <json>` with the same type, each held strictly to the anthropic SDK's
`RawMessageStreamEvent` (no missing field, nothing unknown), and what they add up to."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from anthropic.types import ErrorResponse, RawMessageStreamEvent
from test_messages_oracle import strictly

from keel.dialects.messages_events import error_event, message_events
from keel.errors import RateLimited, UpstreamServerError


def chunk(delta: dict[str, Any] | None = None, finish: str | None = None,
          usage: dict[str, Any] | None = None) -> dict[str, Any]:
    choices = [] if usage else [{"index": 0, "delta": delta or {}, "finish_reason": finish}]
    return {"id": "chatcmpl-s1", "object": "chat.completion.chunk", "created": 1, "model": "gpt-x",
            "choices": choices, "usage": usage}


USAGE = chunk(usage={"prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13})
TEXT = [chunk({"role": "assistant", "content": ""}), chunk({"content": "Hel"}), chunk({"content": "lo."}),
        chunk(finish="stop"), USAGE]
TOOLS = [
    chunk({"role": "assistant", "content": "Checking."}),
    chunk({"tool_calls": [{"index": 0, "id": "call_a", "type": "function",
                           "function": {"name": "get_weather", "arguments": ""}}]}),
    chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"city":'}}]}),
    chunk({"tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}}]}),
    chunk({"tool_calls": [{"index": 1, "id": "call_b", "type": "function",
                           "function": {"name": "get_time", "arguments": "{}"}}]}),
    chunk(finish="tool_calls"), USAGE,
]


async def source(chunks: list[dict[str, Any]]) -> AsyncIterator[dict[str, Any]]:
    for item in chunks:
        yield item


def frames(data: bytes) -> list[dict[str, Any]]:
    """The SSE frames, each checked: its `event:` line names its data's type, and the data is one of
    Anthropic's stream events."""
    assert data.endswith(b"\n\n")
    events = []
    for frame in data.decode().split("\n\n")[:-1]:
        name_line, data_line = frame.split("\n")
        assert name_line.startswith("event: ") and data_line.startswith("data: ")
        event = orjson.loads(data_line.removeprefix("data: "))
        assert event["type"] == name_line.removeprefix("event: ")
        if event["type"] == "ping":  # documented by Anthropic; the SDK skips it, so its union has no type for it
            assert event == {"type": "ping"}
        else:
            strictly(RawMessageStreamEvent, event)
        events.append(event)
    return events


async def run(chunks: list[dict[str, Any]], model: str = "claude") -> list[dict[str, Any]]:
    return frames(b"".join([part async for part in message_events(source(chunks), model=model)]))


def assert_anthropic_order(events: list[dict[str, Any]]) -> None:
    """message_start first; each block started, deltas, stopped, with indexes 0, 1, ...; then one
    message_delta and message_stop last."""
    kinds = [e["type"] for e in events]
    assert kinds[0] == "message_start" and kinds[-2:] == ["message_delta", "message_stop"]
    assert kinds.count("ping") == 1
    started = [e["index"] for e in events if e["type"] == "content_block_start"]
    stopped = [e["index"] for e in events if e["type"] == "content_block_stop"]
    assert started == stopped == list(range(len(started)))
    open_block = None
    for event in events:
        if event["type"] == "content_block_start":
            assert open_block is None
            open_block = event["index"]
        elif event["type"] == "content_block_delta":
            assert event["index"] == open_block
        elif event["type"] == "content_block_stop":
            assert event["index"] == open_block
            open_block = None


def folded(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The content blocks the events add up to, as a client assembles them."""
    blocks: list[dict[str, Any]] = []
    for event in events:
        if event["type"] == "content_block_start":
            blocks.append({**event["content_block"], "json": ""})
        elif event["type"] == "content_block_delta":
            delta = event["delta"]
            if delta["type"] == "text_delta":
                blocks[event["index"]]["text"] += delta["text"]
            else:
                blocks[event["index"]]["json"] += delta["partial_json"]
    return blocks


async def test_a_text_stream_is_anthropic_s_event_sequence() -> None:
    events = await run(TEXT)
    assert [e["type"] for e in events] == [
        "message_start", "content_block_start", "ping", "content_block_delta", "content_block_delta",
        "content_block_stop", "message_delta", "message_stop",
    ]
    start = events[0]["message"]
    assert start["id"] == "msg_s1" and start["content"] == [] and start["model"] == "gpt-x"
    assert start["stop_reason"] is None and "input_tokens" in start["usage"]
    assert folded(events) == [{"type": "text", "text": "Hello.", "json": ""}]
    delta = events[-2]
    assert delta["delta"] == {"stop_reason": "end_turn", "stop_sequence": None}
    assert (delta["usage"]["input_tokens"], delta["usage"]["output_tokens"]) == (9, 4)


async def test_tool_calls_stream_as_tool_use_blocks_with_input_json_deltas() -> None:
    events = await run(TOOLS)
    assert_anthropic_order(events)
    blocks = folded(events)
    assert [b["type"] for b in blocks] == ["text", "tool_use", "tool_use"]
    assert blocks[0]["text"] == "Checking."
    assert (blocks[1]["id"], blocks[1]["name"], orjson.loads(blocks[1]["json"])) == (
        "call_a", "get_weather", {"city": "Paris"})
    assert (blocks[2]["id"], blocks[2]["name"], orjson.loads(blocks[2]["json"])) == ("call_b", "get_time", {})
    assert events[-2]["delta"]["stop_reason"] == "tool_use"


@pytest.mark.parametrize(("finish", "reason"), [("length", "max_tokens"), ("content_filter", "refusal")])
async def test_the_finish_reason_is_the_message_delta_s_stop_reason(finish: str, reason: str) -> None:
    events = await run([chunk({"content": "x"}), chunk(finish=finish), USAGE])
    assert_anthropic_order(events)
    assert events[-2]["delta"]["stop_reason"] == reason


async def test_a_stream_without_chunks_still_makes_a_whole_message() -> None:
    events = await run([])
    assert [e["type"] for e in events] == ["message_start", "ping", "message_delta", "message_stop"]
    assert events[0]["message"]["model"] == "claude"


async def test_each_chunk_leaves_in_one_write() -> None:
    parts = [part async for part in message_events(source(TEXT), model="claude")]
    # message_start; the block's start, the ping and the first delta together; the second delta; the
    # closing events (the finish and usage chunks make none of their own: message_delta waits for both).
    assert [part.count(b"\n\n") for part in parts] == [1, 3, 1, 3]


@pytest.mark.parametrize(("error", "kind"), [
    (RateLimited("slow down", scope="user", kind="requests", retry_after=1), "rate_limit_error"),
    (UpstreamServerError("deployment failed mid-stream"), "api_error"),
])
def test_a_failure_mid_stream_is_anthropic_s_error_event(error: Exception, kind: str) -> None:
    assert isinstance(error, RateLimited | UpstreamServerError)
    name_line, data_line, *_ = error_event(error).decode().split("\n")
    assert name_line == "event: error"
    data = orjson.loads(data_line.removeprefix("data: "))
    assert data == {"type": "error", "error": {"type": kind, "message": error.message}}
    strictly(ErrorResponse, data)
