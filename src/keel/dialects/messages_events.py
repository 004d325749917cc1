"""Anthropic's Messages event stream from the pipeline's chat.completion chunks.

The sequence Anthropic sends: `message_start` (the message, content empty), then per content block
`content_block_start`, its `content_block_delta`s (`text_delta`, or `input_json_delta` for a tool_use
block's input) and `content_block_stop`; a `ping` after the first block starts; then `message_delta`
(stop_reason and the usage totals) and `message_stop`. Each event is framed as
`event: <type>\\ndata: <json>\\n\\n`.

OpenAI streams tell the usage after the finish reason (the trailing usage chunk, which the edge asks for),
so `message_delta` waits for the end of the stream, where both are known.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import orjson

from keel.dialects.messages import error_body, message_id, stop_reason, usage_of
from keel.errors import KeelError

PING = b'event: ping\ndata: {"type":"ping"}\n\n'


def event(kind: str, data: dict[str, Any]) -> bytes:
    return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


def error_event(exc: KeelError) -> bytes:
    """A failure after the stream began, as the `error` event Anthropic sends."""
    return event("error", error_body(exc))


class MessageEvents:
    """One stream's translation: chunks in (`chunk`), events out; `end` closes the message."""

    __slots__ = ("block", "blocks", "finish", "model", "pinged", "started", "text", "tools", "usage")

    def __init__(self, model: str) -> None:
        self.model = model  # the model the client named, until a chunk says which answered
        self.started = False
        self.pinged = False
        self.block: int | None = None  # the open content block's index
        self.text: bytes | None = None  # the open text block's delta event, up to the text itself
        self.blocks = 0  # content blocks started so far
        self.tools: dict[int, int] = {}  # OpenAI tool_calls index -> content block index
        self.finish: str | None = None
        self.usage: dict[str, Any] | None = None

    def chunk(self, chunk: dict[str, Any]) -> bytes:
        """The events one chunk makes, as one write (b"" when it makes none). A text delta, the common
        case, is one orjson call of its text into a prefix made when its block opened."""
        out = b"" if self.started else self._start(chunk)
        if (usage := chunk.get("usage")) is not None:
            self.usage = usage
        for choice in chunk.get("choices") or ():
            delta = choice.get("delta") or {}
            if text := delta.get("content") or delta.get("refusal"):
                if self.text is None:
                    out += self._open({"type": "text", "text": ""})
                    self.text = (b'event: content_block_delta\ndata: {"type":"content_block_delta","index":%d,'
                                 b'"delta":{"type":"text_delta","text":' % (self.blocks - 1))
                out += self.text + orjson.dumps(text) + b"}}\n\n"
            if calls := delta.get("tool_calls"):
                for call in calls:
                    out += self._tool_call(call)
            if choice.get("finish_reason"):
                self.finish = choice["finish_reason"]
        return out

    def end(self) -> bytes:
        """The closing events, once the chunks are over."""
        out = (b"" if self.started else self._start({})) + self._close()
        if not self.pinged:
            self.pinged = True
            out += PING
        out += event("message_delta", {
            "type": "message_delta",
            "delta": {"stop_reason": stop_reason(self.finish), "stop_sequence": None},
            "usage": usage_of(self.usage),
        })
        return out + b'event: message_stop\ndata: {"type":"message_stop"}\n\n'

    def _start(self, chunk: dict[str, Any]) -> bytes:
        self.started = True
        self.model = chunk.get("model") or self.model
        message: dict[str, Any] = {
            "id": message_id(chunk.get("id")), "type": "message", "role": "assistant", "content": [],
            "model": self.model, "stop_reason": None, "stop_sequence": None,
            # Counted by the end of the stream: message_delta carries the totals.
            "usage": {"input_tokens": 0, "output_tokens": 0, "cache_creation_input_tokens": 0,
                      "cache_read_input_tokens": 0},
        }
        return event("message_start", {"type": "message_start", "message": message})

    def _tool_call(self, call: dict[str, Any]) -> bytes:
        out = b""
        index = call.get("index", 0)
        function = call.get("function") or {}
        block = self.tools.get(index)
        if block is None:
            out += self._open({"type": "tool_use", "id": call.get("id") or f"toolu_{index}",
                               "name": function.get("name") or "", "input": {}})
            block = self.tools[index] = self.blocks - 1
        if arguments := function.get("arguments"):
            out += event("content_block_delta", {
                "type": "content_block_delta", "index": block,
                "delta": {"type": "input_json_delta", "partial_json": arguments},
            })
        return out

    def _open(self, block: dict[str, Any]) -> bytes:
        out = self._close()
        self.block = self.blocks
        self.blocks += 1
        out += event("content_block_start", {"type": "content_block_start", "index": self.block,
                                             "content_block": block})
        if not self.pinged:
            self.pinged = True
            out += PING
        return out

    def _close(self) -> bytes:
        if self.block is None:
            return b""
        index, self.block, self.text = self.block, None, None
        return b'event: content_block_stop\ndata: {"type":"content_block_stop","index":%d}\n\n' % index


async def message_events(chunks: AsyncIterator[dict[str, Any]], model: str) -> AsyncIterator[bytes]:
    """The whole event stream for `chunks` (the pipeline's stream)."""
    events = MessageEvents(model)
    async for chunk in chunks:
        if out := events.chunk(chunk):
            yield out  # one write per chunk, as for chat
    yield events.end()
