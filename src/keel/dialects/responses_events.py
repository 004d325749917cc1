"""The Responses API's event stream, made from the pipeline's chat.completion chunks.

The order and shapes are the official API description's: `response.created`, `response.in_progress`;
for text `response.output_item.added` (a message), `response.content_part.added`,
`response.output_text.delta`..., `response.output_text.done`, `response.content_part.done`,
`response.output_item.done`; for each tool call `response.output_item.added` (a function_call),
`response.function_call_arguments.delta`..., `response.function_call_arguments.done`,
`response.output_item.done`; then `response.completed` (or `response.incomplete`) with the whole
Response. Every event has its `sequence_number`. A failure after the first event is an `error` event
(Keel's precise code and message) followed by `response.failed`, the Response's terminal state.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import orjson

from keel.dialects.responses import call_item, finished, message_item, new_id, shell, text_part
from keel.errors import KeelError
from keel.pipeline import ChunkStream

# The Response's `error.code` is one of a fixed list (ResponseErrorCode); the `error` event carries Keel's own.
_FAILED_CODES = {"rate_limit_exceeded": "rate_limit_exceeded"}


class ResponseEvents:
    """One streamed Response: `events` is the EventStream's `events`, `error` its `error`; once the
    stream has ended, `final` is the Response that `response.completed` carried (what is stored)."""

    def __init__(self, response_id: str, model: str, echo: dict[str, Any]) -> None:
        self.response = shell(response_id, model, echo)
        self.final: dict[str, Any] | None = None
        self.sequence = 0
        self.output: list[dict[str, Any]] = []  # the items so far, as the final Response lists them
        self.message_open = False  # a message item is being made (the last in `output`)
        self.text: list[str] | None = None  # its open output_text part's pieces
        self.refusal: list[str] | None = None  # its open refusal part's pieces
        self.calls: dict[int, dict[str, Any]] = {}  # chunk tool-call index -> its open item
        self.open_call: int | None = None
        self._delta_head = b""  # the open text part's delta events up to their `delta` (see `_text_delta`)

    def event(self, kind: str, body: dict[str, Any]) -> bytes:
        body["type"] = kind
        body["sequence_number"] = self.sequence
        self.sequence += 1
        return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(body) + b"\n\n"

    def _response_event(self, kind: str, response: bytes) -> bytes:
        """`event` of `{"response": <response, already encoded>}`."""
        sequence = self.sequence
        self.sequence += 1
        return b"".join((b"event: ", kind.encode(), b'\ndata: {"response":', response, b',"type":"', kind.encode(),
                         b'","sequence_number":%d}\n\n' % sequence))

    async def events(self, stream: ChunkStream) -> AsyncIterator[bytes]:
        """The events, one write per chunk: the events a chunk makes (an item opened, its part, the
        first delta) leave together, as do the opening pair and the closing ones."""
        shell = orjson.dumps(self.response)  # the same Response in both opening events: encoded once
        yield self._response_event("response.created", shell) + self._response_event("response.in_progress", shell)
        async for chunk in stream:
            if self.response["model"] == "" and chunk.get("model"):
                self.response["model"] = chunk["model"]
            for choice in chunk.get("choices") or ():
                if choice.get("index", 0) != 0:
                    continue
                delta = choice.get("delta") or {}
                out: list[bytes] = []
                if text := delta.get("content"):
                    if self.text is not None and self.open_call is None:  # most chunks: more of the open text
                        self.text.append(text)
                        yield self._text_delta(text)
                    else:
                        out += self._text(text, refusal=False)
                if refusal := delta.get("refusal"):
                    out += self._text(refusal, refusal=True)
                for call in delta.get("tool_calls") or ():
                    out += self._call(call)
                if out:
                    yield b"".join(out)
        out = self._close_message() + self._close_call()
        self.response["output"] = self.output
        self.final = finished(self.response, stream.finish_reason, stream.usage)
        kind = "response.incomplete" if self.final["status"] == "incomplete" else "response.completed"
        out.append(self.event(kind, {"response": self.final}))
        yield b"".join(out)

    def error(self, exc: KeelError) -> bytes:
        """The failure as an `error` event, then `response.failed` with what had been made."""
        failed = dict(self.response, status="failed", output=self.output,
                      error={"code": _FAILED_CODES.get(exc.code or "", "server_error"), "message": exc.message})
        return (self.event("error", {"code": exc.code, "message": exc.message, "param": exc.param})
                + self.event("response.failed", {"response": failed}))

    # ------------------------------------------------------------------ the items

    def _text(self, text: str, refusal: bool) -> list[bytes]:
        out = self._close_call()
        if not self.message_open:
            item = message_item(new_id("msg_"), [], "in_progress")
            self.output.append(item)
            self.message_open = True
            out.append(self.event("response.output_item.added", {"output_index": len(self.output) - 1, "item": item}))
        if refusal:
            if self.refusal is None:
                out += self._close_text()
                self.refusal = []
                out.append(self._part_event("response.content_part.added", {"type": "refusal", "refusal": ""}))
            self.refusal.append(text)
            out.append(self._part_event("response.refusal.delta", None, delta=text))
        else:
            if self.text is None:
                out += self._close_refusal()
                self.text = []
                out.append(self._part_event("response.content_part.added", text_part("")))
                item = self.output[-1]
                self._delta_head = b"".join((  # the fixed part of this text part's delta events, encoded once
                    b"event: response.output_text.delta\ndata: ",
                    orjson.dumps({"type": "response.output_text.delta", "item_id": item["id"],
                                  "output_index": len(self.output) - 1, "content_index": len(item["content"]),
                                  "logprobs": []})[:-1],
                    b',"delta":'))
            self.text.append(text)
            out.append(self._text_delta(text))
        return out

    def _text_delta(self, text: str) -> bytes:
        """A `response.output_text.delta` event: the part's fixed fields encoded once, then the delta and
        the sequence number (a chunk's whole cost on the way out)."""
        sequence = self.sequence
        self.sequence += 1
        return self._delta_head + orjson.dumps(text) + b',"sequence_number":%d}\n\n' % sequence

    def _part_event(self, kind: str, part: dict[str, Any] | None, **fields: Any) -> bytes:
        """An event of the open message's part being made (its index: the parts finished before it)."""
        item = self.output[-1]
        body: dict[str, Any] = {"item_id": item["id"], "output_index": len(self.output) - 1,
                                "content_index": len(item["content"])}
        if part is not None:
            body["part"] = part
        return self.event(kind, {**body, **fields})

    def _close_text(self) -> list[bytes]:
        if self.text is None:
            return []
        text = "".join(self.text)
        self.text = None
        part = text_part(text)
        out = [self._part_event("response.output_text.done", None, text=text, logprobs=[]),
               self._part_event("response.content_part.done", part)]
        self.output[-1]["content"].append(part)
        return out

    def _close_refusal(self) -> list[bytes]:
        if self.refusal is None:
            return []
        refusal = "".join(self.refusal)
        self.refusal = None
        part = {"type": "refusal", "refusal": refusal}
        out = [self._part_event("response.refusal.done", None, refusal=refusal),
               self._part_event("response.content_part.done", part)]
        self.output[-1]["content"].append(part)
        return out

    def _close_message(self) -> list[bytes]:
        if not self.message_open:
            return []
        out = self._close_text() + self._close_refusal()
        self.message_open = False
        item = self.output[-1]
        item["status"] = "completed"
        out.append(self.event("response.output_item.done", {"output_index": len(self.output) - 1, "item": item}))
        return out

    def _call(self, delta: dict[str, Any]) -> list[bytes]:
        index = delta.get("index", 0)
        function = delta.get("function") or {}
        out: list[bytes] = []
        new = index not in self.calls
        if new:
            out += self._close_message()
            out += self._close_call()
            item = call_item(new_id("fc_"), delta.get("id") or new_id("call_"), function.get("name") or "", "",
                             "in_progress")
            self.calls[index] = item
            self.open_call = index
            self.output.append(item)
            out.append(self.event("response.output_item.added", {"output_index": len(self.output) - 1, "item": item}))
        item = self.calls[index]
        if index != self.open_call:  # a late delta of an earlier call (providers send them in order)
            item["arguments"] += function.get("arguments") or ""
            return out
        if not new and function.get("name"):  # a name in pieces (OpenAI sends it whole, in the first delta)
            item["name"] += function["name"]
        if arguments := function.get("arguments"):
            item["arguments"] += arguments
            out.append(self.event("response.function_call_arguments.delta", {
                "item_id": item["id"], "output_index": self.output.index(item), "delta": arguments}))
        return out

    def _close_call(self) -> list[bytes]:
        if self.open_call is None:
            return []
        item = self.calls[self.open_call]
        self.open_call = None
        index = self.output.index(item)
        item["status"] = "completed"
        return [
            self.event("response.function_call_arguments.done", {
                "item_id": item["id"], "output_index": index, "name": item["name"], "arguments": item["arguments"]}),
            self.event("response.output_item.done", {"output_index": index, "item": item}),
        ]
