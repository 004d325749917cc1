"""A fake Anthropic Messages API upstream, speaking Anthropic's wire format, for tests.

    python -m keel.testing.fake_anthropic --port 9200 --api-key sk-ant-test

`POST /v1/messages` answers plain or streamed (the real event sequence: message_start,
content_block_start, ping, content_block_delta, content_block_stop, message_delta,
message_stop) with `echo: <last user text>` or configured text and tool calls. It checks
`x-api-key` and `anthropic-version`, refuses what Anthropic refuses (roles out of turn,
orphaned tool results, empty text blocks, a missing max_tokens, too long a prompt) in
Anthropic's error shape, and fails on purpose: any status with its error type and
retry-after, an `error` event mid-stream, a stream without message_stop, a cut connection.
A `tool_choice` of type `tool` (how Keel sends JSON answers) is answered with a call of that tool
whose input is a small instance of its `input_schema`; `invalid_json_first` makes the next N of
those inputs schema-invalid (a value of the wrong type), to exercise the validation stage's repair.
Tests change its behaviour at run time with `POST /_fake/config` and read the request
bodies it received with `GET /_fake/stats`.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from keel.providers.simulated import broken_json, minimal_instance
from keel.testing.fake_server import Controls, ThreadedServer

ERROR_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "not_found_error",
    413: "request_too_large", 429: "rate_limit_error", 500: "api_error", 529: "overloaded_error",
}


@dataclass
class FakeAnthropicBehaviour:
    api_key: str | None = None  # when set, x-api-key must equal it
    model: str | None = None  # the model answers name; None: the requested one
    text: str | None = None  # the answer's text; None: "echo: <last user text>"; "": no text block
    tool_uses: list[dict[str, Any]] = field(default_factory=list)  # [{"name": ..., "input": {...}}]
    cache_read_input_tokens: int = 0
    cache_creation_input_tokens: int = 0
    max_input_tokens: int | None = None  # larger prompts are refused as "prompt is too long"
    fail_status: int | None = None  # answer this status instead of a message
    fail_first: int | None = None  # only the first n calls fail; None: all of them
    fail_type: str | None = None  # the error's type; None: the one Anthropic uses for fail_status
    retry_after: float | None = None  # sent with failures when set
    chunks: int = 4  # text deltas per streamed text block
    chunk_delay_ms: float = 0.0
    latency_ms: float = 0.0
    stream_error_after: int | None = None  # streams: an `error` event after this many deltas
    stream_error_type: str = "overloaded_error"
    cut_after: int | None = None  # streams: drop the connection after this many deltas
    omit_message_stop: bool = False  # streams: end cleanly but without message_stop
    invalid_json_first: int = 0  # the next this-many forced tool inputs are schema-invalid (counts down)


@dataclass
class FakeAnthropicStats:
    requests: int = 0
    failures: int = 0
    bodies: list[dict[str, Any]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)  # each request's anthropic-* headers
    keep_bodies: int = 50


class Refused(Exception):
    """A request the fake answers with an error in Anthropic's shape."""

    def __init__(
        self, status: int, message: str, kind: str | None = None, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind or ERROR_TYPES.get(status, "api_error")
        self.headers = headers or {}

    def response(self) -> web.Response:
        body = {"type": "error", "error": {"type": self.kind, "message": str(self)}, "request_id": "req_" + _id()}
        return web.Response(status=self.status, body=orjson.dumps(body), content_type="application/json",
                            headers=self.headers)


class FakeAnthropic(Controls[FakeAnthropicBehaviour, FakeAnthropicStats]):
    def __init__(self, behaviour: FakeAnthropicBehaviour | None = None) -> None:
        self.behaviour = behaviour or FakeAnthropicBehaviour()
        self.stats = FakeAnthropicStats()
        self.app = web.Application(client_max_size=64 * 1024 * 1024)
        self.app.add_routes([
            web.post("/v1/messages", self.messages),
            web.post("/_fake/config", self.configure),
            web.get("/_fake/stats", self.read_stats),
        ])

    # ------------------------------------------------------------------ control

    # ------------------------------------------------------------------ the endpoint

    async def messages(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        self.stats.requests += 1
        try:
            body = self._accept(request, raw)
        except Refused as refused:
            self.stats.failures += 1
            return refused.response()
        if self.behaviour.latency_ms:
            await asyncio.sleep(self.behaviour.latency_ms / 1000)
        message = self._message(body)
        if body.get("stream"):
            return await self._stream(request, message)
        return web.Response(body=orjson.dumps(message), content_type="application/json")

    def _accept(self, request: web.Request, raw: bytes) -> dict[str, Any]:
        """The request body, once it passed what Anthropic checks (and the failures asked for)."""
        b = self.behaviour
        if b.api_key is not None and request.headers.get("x-api-key") != b.api_key:
            raise Refused(401, "invalid x-api-key")
        if not request.headers.get("anthropic-version"):
            raise Refused(400, "anthropic-version: header is required")
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise Refused(400, "There was an error parsing the body of your request") from None
        if not isinstance(body, dict):
            raise Refused(400, "body: Input should be an object")
        if len(self.stats.bodies) < self.stats.keep_bodies:
            self.stats.bodies.append(body)
            self.stats.headers.append(
                {k.lower(): v for k, v in request.headers.items() if k.lower().startswith("anthropic-")}
            )
        if b.fail_status is not None and (b.fail_first is None or self.stats.requests <= b.fail_first):
            headers = {"retry-after": f"{b.retry_after:g}"} if b.retry_after is not None else {}
            raise Refused(b.fail_status, f"simulated failure {b.fail_status}", b.fail_type, headers)
        if problem := validation_problem(body):
            raise Refused(400, problem)
        tokens = _input_tokens(body)
        if b.max_input_tokens is not None and tokens > b.max_input_tokens:
            raise Refused(400, f"prompt is too long: {tokens} tokens > {b.max_input_tokens} maximum")
        return body

    def _message(self, body: dict[str, Any]) -> dict[str, Any]:
        b = self.behaviour
        tool_uses = b.tool_uses or self._forced(body)
        default = "" if tool_uses and not b.tool_uses else _echo(body)  # a forced tool: no text around it
        text, stop_reason, stop_sequence = _stopped(b.text if b.text is not None else default, body)
        content: list[dict[str, Any]] = [{"type": "text", "text": text}] if text else []
        if stop_reason == "end_turn" and tool_uses:  # a cut-short answer never reaches its tool calls
            content += [{"type": "tool_use", "id": "toolu_" + _id(), "name": tool["name"],
                         "input": tool.get("input", {})} for tool in tool_uses]
            stop_reason = "tool_use"
        output_tokens = max(1, len(text.split()) + 8 * (len(content) - bool(text)))
        return {
            "id": "msg_" + _id(), "type": "message", "role": "assistant", "model": b.model or body["model"],
            "content": content, "stop_reason": stop_reason, "stop_sequence": stop_sequence,
            "usage": {
                "input_tokens": _input_tokens(body),
                "cache_creation_input_tokens": b.cache_creation_input_tokens,
                "cache_read_input_tokens": b.cache_read_input_tokens,
                "output_tokens": output_tokens,
            },
        }

    def _forced(self, body: dict[str, Any]) -> list[dict[str, Any]]:
        """The call a `tool_choice` of type `tool` forces, its input made from the tool's input_schema
        (broken on purpose while `invalid_json_first` lasts)."""
        choice = body.get("tool_choice") or {}
        if not isinstance(choice, dict) or choice.get("type") != "tool":
            return []
        tool = next((t for t in body.get("tools") or () if isinstance(t, dict) and t.get("name") == choice.get("name")),
                    None)
        if tool is None:
            return []
        value = minimal_instance(tool.get("input_schema") or {"type": "object"})
        if self.behaviour.invalid_json_first > 0:
            self.behaviour.invalid_json_first -= 1
            value = orjson.loads(broken_json(orjson.dumps(value).decode(), "wrong_type"))
        return [{"name": tool["name"], "input": value}]

    # ------------------------------------------------------------------ streaming

    async def _stream(self, request: web.Request, message: dict[str, Any]) -> web.StreamResponse:
        b = self.behaviour
        response = web.StreamResponse(headers={"content-type": "text/event-stream", "cache-control": "no-cache"})
        await response.prepare(request)
        deltas = 0
        for name, data in _events(message, b.chunks):
            if name == "content_block_delta":
                if b.cut_after is not None and deltas >= b.cut_after:
                    assert request.transport is not None
                    request.transport.close()
                    return response
                if b.stream_error_after is not None and deltas >= b.stream_error_after:
                    error = {"type": "error", "error": {"type": b.stream_error_type, "message": "Overloaded"}}
                    await response.write(_sse("error", error))
                    break
                deltas += 1
                if b.chunk_delay_ms:
                    await asyncio.sleep(b.chunk_delay_ms / 1000)
            if name == "message_stop" and b.omit_message_stop:
                break
            await response.write(_sse(name, data))
        await response.write_eof()
        return response


def _events(message: dict[str, Any], pieces: int) -> Iterator[tuple[str, dict[str, Any]]]:
    """The event sequence Anthropic streams for `message`."""
    usage = message["usage"]
    start = {**message, "content": [], "stop_reason": None, "stop_sequence": None,
             "usage": {**usage, "output_tokens": 1}}
    yield "message_start", {"type": "message_start", "message": start}
    for index, block in enumerate(message["content"]):
        if block["type"] == "text":
            empty: dict[str, Any] = {"type": "text", "text": ""}
            deltas = [{"type": "text_delta", "text": piece} for piece in _split(block["text"], pieces)]
        else:
            empty = {**block, "input": {}}
            json = orjson.dumps(block["input"]).decode()
            deltas = [{"type": "input_json_delta", "partial_json": p} for p in ["", *_split(json, 3)]]
        yield "content_block_start", {"type": "content_block_start", "index": index, "content_block": empty}
        if index == 0:
            yield "ping", {"type": "ping"}
        for delta in deltas:
            yield "content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta}
        yield "content_block_stop", {"type": "content_block_stop", "index": index}
    yield "message_delta", {
        "type": "message_delta",
        "delta": {"stop_reason": message["stop_reason"], "stop_sequence": message["stop_sequence"]},
        "usage": {"output_tokens": usage["output_tokens"]},
    }
    yield "message_stop", {"type": "message_stop"}


def _sse(name: str, data: dict[str, Any]) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


def _split(text: str, parts: int) -> list[str]:
    """`text` in at most `parts` non-empty pieces that join back to it exactly."""
    size = max(1, -(-len(text) // max(1, parts)))
    return [text[i:i + size] for i in range(0, len(text), size)]


# ---------------------------------------------------------------------------- what Anthropic refuses


def validation_problem(body: dict[str, Any]) -> str | None:
    """The message Anthropic would answer 400 with, or None for a request it takes."""
    if not isinstance(body.get("model"), str):
        return "model: Field required"
    if not isinstance(body.get("max_tokens"), int) or body["max_tokens"] < 1:
        return "max_tokens: Field required"
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return "messages: at least one message is required"
    system = body.get("system")
    if system is not None and not isinstance(system, str | list):
        return "system: Input should be a valid string or list"
    for i, message in enumerate(messages):
        if problem := _message_problem(messages, i, message):
            return problem
    return None


def _message_problem(messages: list[Any], i: int, message: Any) -> str | None:
    if not isinstance(message, dict) or message.get("role") not in ("user", "assistant"):
        return f"messages.{i}.role: Input should be 'user' or 'assistant'"
    expected = "user" if i % 2 == 0 else "assistant"
    if message["role"] != expected:
        if i == 0:
            return 'messages: first message must use the "user" role'
        return (f'messages: roles must alternate between "user" and "assistant", '
                f'but found multiple "{message["role"]}" roles in a row')
    blocks = _blocks(message.get("content"))
    if blocks is None:
        return f"messages.{i}.content: Input should be a valid string or list of content blocks"
    if any(b.get("type") == "text" and not b.get("text") for b in blocks):
        return f"messages.{i}: text content blocks must be non-empty"
    previous = (_blocks(messages[i - 1].get("content")) or []) if i else []
    asked = [b.get("id") for b in previous if b.get("type") == "tool_use"]
    answered = [b.get("tool_use_id") for b in blocks if b.get("type") == "tool_result"]
    if stray := [x for x in answered if x not in asked]:
        return (f"messages.{i}.content: unexpected `tool_use_id` found in `tool_result` blocks: {stray[0]}. "
                "Each `tool_result` block must have a corresponding `tool_use` block in the previous message.")
    if missing := [x for x in asked if x not in answered]:
        return (f"messages.{i}: `tool_use` ids were found without `tool_result` blocks immediately after: "
                f"{missing[0]}. Each `tool_use` block must have a corresponding `tool_result` block in the next "
                "message.")
    return None


def _blocks(content: Any) -> list[dict[str, Any]] | None:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if isinstance(content, list) and all(isinstance(b, dict) for b in content):
        return content
    return None


def _stopped(text: str, body: dict[str, Any]) -> tuple[str, str, str | None]:
    """The text as generation would end it: at a stop sequence, at max_tokens words, or whole."""
    stop_reason, stop_sequence = "end_turn", None
    hits = [(text.find(s), s) for s in body.get("stop_sequences") or () if s and s in text]
    if hits:
        cut, stop_sequence = min(hits)
        text, stop_reason = text[:cut], "stop_sequence"
    words = text.split(" ")
    if len(words) > body["max_tokens"]:
        text, stop_reason, stop_sequence = " ".join(words[:body["max_tokens"]]), "max_tokens", None
    return text, stop_reason, stop_sequence


def _echo(body: dict[str, Any]) -> str:
    """`echo: ` and the last user turn's text (a turn of only tool results is skipped)."""
    for message in reversed(body["messages"]):
        if message.get("role") != "user":
            continue
        texts = [b.get("text", "") for b in _blocks(message.get("content")) or () if b.get("type") == "text"]
        if texts:
            return "echo: " + "".join(texts)
    return "echo: "


def _input_tokens(body: dict[str, Any]) -> int:
    prompt = [body.get("system"), body.get("messages"), body.get("tools")]
    return max(1, len(orjson.dumps(prompt)) // 4)


def _id() -> str:
    return hashlib.sha1(str(time.perf_counter_ns()).encode()).hexdigest()[:24]


class FakeAnthropicServer(ThreadedServer):
    """The fake on its own event loop in a thread: `with FakeAnthropicServer() as s: s.url`."""

    def __init__(self, behaviour: FakeAnthropicBehaviour | None = None, port: int = 0) -> None:
        self.fake = FakeAnthropic(behaviour)
        super().__init__(self.fake.app, "fake-anthropic", port)

    @property
    def url(self) -> str:
        """The base URL, as an Anthropic deployment's `base_url` takes it (no /v1)."""
        return f"http://127.0.0.1:{self.port}"

    def configure(self, **changes: Any) -> None:
        """Change the behaviour from the test's thread, on the fake's loop."""
        self.call(lambda: self.fake.configure_from(changes))

    @property
    def bodies(self) -> list[dict[str, Any]]:
        """The request bodies received so far, oldest first."""
        return list(self.fake.stats.bodies)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9200)
    parser.add_argument("--api-key", default=None, help="require this x-api-key")
    parser.add_argument("--text", default=None, help="answer with this text instead of an echo")
    args = parser.parse_args(argv)
    fake = FakeAnthropic(FakeAnthropicBehaviour(api_key=args.api_key, text=args.text))
    web.run_app(fake.app, host=args.host, port=args.port, access_log=None, print=None)


if __name__ == "__main__":  # pragma: no cover
    main()
