"""A fake OpenAI-compatible upstream with fault injection, for chaos tests and benchmarks.

    python -m keel.testing.fake_openai --port 9100 --fail-rate 0.3 --fail-status 503

It answers `/v1/chat/completions` (plain and SSE), `/v1/embeddings` and `/v1/models` like
OpenAI does, with an `echo: <last user message>` answer, and can fail on purpose: an HTTP
status at a given rate (seeded) or for the next N requests, 429 with Retry-After, hanging,
resetting the connection, a malformed body, or a stream cut mid-way or stalled. It can also
replay a recorded SSE transcript byte for byte.

JSON requests get JSON: `response_format` json_schema a small instance of the schema, json_object
`{"echo": ...}`, and `tool_choice` required (the first tool) or a named function a tool call with
arguments matching its parameters. `invalid_json_first` answers the next N of those with JSON broken
on purpose (`invalid_json_how`: truncated, or wrong_type for a value of the wrong type), to exercise
the validation stage's repair. Tests change its behaviour at run time with
`POST /_fake/config` and read what it saw with `GET /_fake/stats`.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import random
import struct
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

from keel.providers.simulated import Broken, broken_json, minimal_instance
from keel.testing.fake_server import Controls, ThreadedServer


@dataclass
class FakeBehaviour:
    fail_rate: float = 0.0  # share of calls answered with fail_status
    fail_first: int = 0  # the next this-many calls are answered with fail_status (counts down)
    fail_status: int = 503
    retry_after: float | None = None  # sent with 429 and 503 failures when set
    hang: bool = False  # never answer
    reset: bool = False  # close the connection without an answer
    malformed: bool = False  # 200 with a body that is not JSON
    cut_after: int | None = None  # streams: drop the connection after this many chunks
    stall_after: int | None = None  # streams: go silent after this many chunks
    chunks: int = 20  # streamed content chunks per answer
    latency_ms: float = 0.0
    chunk_delay_ms: float = 0.0
    replay: str | None = None  # path of an SSE transcript sent as-is to stream requests
    model: str = "gpt-4o-mini-2024-07-18"
    seed: int = 0
    invalid_json_first: int = 0  # the next this-many JSON answers (and forced tool calls) are broken (counts down)
    invalid_json_how: str = "truncated"  # truncated | wrong_type


@dataclass
class FakeStats:
    requests: int = 0
    failures: int = 0
    bodies: list[dict[str, Any]] = field(default_factory=list)
    keep_bodies: int = 50


class FakeOpenAI(Controls[FakeBehaviour, FakeStats]):
    def __init__(self, behaviour: FakeBehaviour | None = None) -> None:
        self.behaviour = behaviour or FakeBehaviour()
        self.stats = FakeStats()
        self.rng = random.Random(self.behaviour.seed)
        self.app = web.Application(client_max_size=64 * 1024 * 1024)
        self.app.add_routes([
            web.post("/v1/chat/completions", self.chat),
            web.post("/v1/embeddings", self.embeddings),
            web.get("/v1/models", self.models),
            web.post("/_fake/config", self.configure),
            web.get("/_fake/stats", self.read_stats),
        ])

    # ------------------------------------------------------------------ control

    def configure_from(self, changes: dict[str, Any]) -> None:
        super().configure_from(changes)
        if "seed" in changes:
            self.rng = random.Random(self.behaviour.seed)

    # ------------------------------------------------------------------ faults

    async def _fault(self, request: web.Request) -> web.StreamResponse | None:
        b = self.behaviour
        if b.latency_ms:
            await asyncio.sleep(b.latency_ms / 1000)
        if b.hang:
            await asyncio.sleep(3600)
        if b.reset:
            self.stats.failures += 1
            assert request.transport is not None
            request.transport.close()
            raise asyncio.CancelledError
        if b.fail_first > 0 or (b.fail_rate and self.rng.random() < b.fail_rate):
            b.fail_first = max(0, b.fail_first - 1)
            self.stats.failures += 1
            headers = {"retry-after": f"{b.retry_after:g}"} if b.retry_after is not None else {}
            error = {"message": f"simulated failure {b.fail_status}", "type": "server_error", "param": None,
                     "code": None}
            return web.Response(status=b.fail_status, body=orjson.dumps({"error": error}),
                                content_type="application/json", headers=headers)
        if b.malformed:
            self.stats.failures += 1
            return web.Response(body=b"<html>bad gateway</html>", content_type="application/json")
        return None

    # ------------------------------------------------------------------ endpoints

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = orjson.loads(await request.read())
        self._count(body)
        if (failed := await self._fault(request)) is not None:
            return failed
        tool, text = self._reply(body)
        if body.get("stream"):
            return await self._stream(request, body, tool, text)
        prompt_tokens, completion_tokens = _count_tokens(body), len(text.split())
        message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None}
        if tool is not None:
            message["content"] = None
            message["tool_calls"] = [{"id": "call_" + _id(), "type": "function",
                                      "function": {"name": tool, "arguments": text}}]
        completion = {
            "id": "chatcmpl-" + _id(),
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.behaviour.model,
            "choices": [{
                "index": 0,
                "message": message,
                "finish_reason": "stop" if tool is None else "tool_calls",
                "logprobs": None,
            }],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens},
            "system_fingerprint": "fp_fake",
        }
        return web.Response(body=orjson.dumps(completion), content_type="application/json")

    def _reply(self, body: dict[str, Any]) -> tuple[str | None, str]:
        """The tool called (None for a text answer) and the text (content, or the call's arguments)."""
        tool, schema = _forced_tool(body)
        fmt = body.get("response_format") or {}
        if tool is not None:
            text = orjson.dumps(minimal_instance(schema) if isinstance(schema, dict) else {}).decode()
        elif fmt.get("type") == "json_schema":
            text = orjson.dumps(minimal_instance((fmt.get("json_schema") or {}).get("schema") or {})).decode()
        elif fmt.get("type") == "json_object":
            text = orjson.dumps({"echo": _answer(body)}).decode()
        else:
            return None, _answer(body)
        b = self.behaviour
        if b.invalid_json_first > 0:
            b.invalid_json_first -= 1
            how: Broken = "wrong_type" if b.invalid_json_how == "wrong_type" else "truncated"
            text = broken_json(text, how, whole=tool is None and fmt.get("type") == "json_object")
        return tool, text

    async def _stream(self, request: web.Request, body: dict[str, Any], tool: str | None,
                      text: str) -> web.StreamResponse:
        b = self.behaviour
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        if b.replay:
            await response.write(await asyncio.to_thread(Path(b.replay).read_bytes))
            await response.write_eof()
            return response
        pieces = _split(text, b.chunks)
        cid, created = "chatcmpl-" + _id(), int(time.time())

        def chunk(delta: dict[str, Any], finish: str | None = None, usage: Any = None) -> bytes:
            obj = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": b.model,
                   "system_fingerprint": "fp_fake",
                   "choices": [] if usage else [{"index": 0, "delta": delta, "logprobs": None,
                                                  "finish_reason": finish}]}
            if usage:
                obj["usage"] = usage
            return b"data: " + orjson.dumps(obj) + b"\n\n"

        def piece_delta(piece: str) -> dict[str, Any]:
            if tool is None:
                return {"content": piece}
            return {"tool_calls": [{"index": 0, "function": {"arguments": piece}}]}

        first: dict[str, Any] = {"role": "assistant", "content": "", "refusal": None}
        if tool is not None:
            first = {"role": "assistant", "content": None, "refusal": None, "tool_calls": [{
                "index": 0, "id": "call_" + _id(), "type": "function", "function": {"name": tool, "arguments": ""}}]}
        try:
            await response.write(chunk(first))
            for n, piece in enumerate(pieces):
                if b.cut_after is not None and n >= b.cut_after:
                    assert request.transport is not None
                    request.transport.close()
                    return response
                if b.stall_after is not None and n >= b.stall_after:
                    await asyncio.sleep(3600)
                if b.chunk_delay_ms:
                    await asyncio.sleep(b.chunk_delay_ms / 1000)
                await response.write(chunk(piece_delta(piece)))
            await response.write(chunk({}, "stop" if tool is None else "tool_calls"))
            if (body.get("stream_options") or {}).get("include_usage"):
                prompt_tokens = _count_tokens(body)
                await response.write(chunk({}, usage={
                    "prompt_tokens": prompt_tokens, "completion_tokens": len(pieces),
                    "total_tokens": prompt_tokens + len(pieces)}))
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
        except ConnectionResetError:
            pass  # the client hung up mid-stream (a deadline, a gap timeout): nothing left to say
        return response

    async def embeddings(self, request: web.Request) -> web.StreamResponse:
        body = orjson.loads(await request.read())
        self._count(body)
        if (failed := await self._fault(request)) is not None:
            return failed
        inputs = body["input"]
        if isinstance(inputs, str) or (inputs and isinstance(inputs[0], int)):
            inputs = [inputs]
        data = []
        for i, item in enumerate(inputs):
            vector = _vector(orjson.dumps(item), body.get("dimensions") or 8)
            encoded: Any = vector
            if body.get("encoding_format") == "base64":
                encoded = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
            data.append({"object": "embedding", "index": i, "embedding": encoded})
        tokens = sum(len(orjson.dumps(x)) // 4 + 1 for x in inputs)
        return web.Response(body=orjson.dumps({
            "object": "list", "data": data, "model": "text-embedding-3-small",
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}), content_type="application/json")

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [
            {"id": self.behaviour.model, "object": "model", "created": 0, "owned_by": "fake"}]})

    def _count(self, body: dict[str, Any]) -> None:
        self.stats.requests += 1
        if len(self.stats.bodies) < self.stats.keep_bodies:
            self.stats.bodies.append(body)


def _answer(body: dict[str, Any]) -> str:
    for message in reversed(body.get("messages") or []):
        if message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, list):
                content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
            return f"echo: {content}"
    return "echo: "


def _forced_tool(body: dict[str, Any]) -> tuple[str | None, Any]:
    """The function tool_choice forces (a named one, or the first for 'required') and its parameters."""
    functions = [t.get("function") or {} for t in body.get("tools") or () if isinstance(t, dict)]
    choice = body.get("tool_choice")
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name")
        chosen = next((f for f in functions if f.get("name") == name), None)
    elif choice == "required" and functions:
        chosen = functions[0]
    else:
        return None, None
    if chosen is None:
        return None, None
    return str(chosen.get("name")), chosen.get("parameters") or {"type": "object"}


def _split(text: str, parts: int) -> list[str]:
    """`text` in `parts` pieces that join back to it exactly (short texts repeat spaces)."""
    size = max(1, -(-len(text) // parts))
    pieces = [text[i:i + size] for i in range(0, len(text), size)]
    return pieces + [""] * (parts - len(pieces)) if len(pieces) < parts else pieces


def _count_tokens(body: dict[str, Any]) -> int:
    return max(1, len(orjson.dumps(body.get("messages") or [])) // 4)


def _id() -> str:
    return hashlib.sha1(str(time.perf_counter_ns()).encode()).hexdigest()[:24]


def _vector(seed: bytes, dims: int) -> list[float]:
    digest = hashlib.sha256(seed).digest()
    raw = [digest[i % len(digest)] / 255 - 0.5 for i in range(dims)]
    norm = sum(x * x for x in raw) ** 0.5 or 1.0
    return [x / norm for x in raw]


class FakeOpenAIServer(ThreadedServer):
    """The fake upstream on its own event loop in a thread: `with FakeOpenAIServer() as s: s.url`."""

    def __init__(self, behaviour: FakeBehaviour | None = None, port: int = 0, shutdown_timeout: float = 0.5) -> None:
        self.fake = FakeOpenAI(behaviour)
        super().__init__(self.fake.app, "fake-openai", port, shutdown_timeout)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"


# One sentence per flag for --help; a FakeBehaviour field without one fails a test.
FLAG_HELP: dict[str, str] = {
    "fail_rate": "share of calls (0 to 1) answered with --fail-status, drawn from --seed",
    "fail_first": "answer the next this-many calls with --fail-status, then behave",
    "fail_status": "HTTP status of the failures that --fail-rate and --fail-first make",
    "retry_after": "seconds sent as Retry-After with 429 and 503 failures; unset: no header",
    "hang": "accept calls and never answer them",
    "reset": "close the connection without an answer",
    "malformed": "answer 200 with a body that is not JSON",
    "cut_after": "streams: drop the connection after this many chunks; unset: never",
    "stall_after": "streams: go silent after this many chunks; unset: never",
    "chunks": "content chunks per streamed answer",
    "latency_ms": "wait this long before answering",
    "chunk_delay_ms": "streams: wait this long between chunks",
    "replay": "an SSE transcript file sent byte for byte to stream requests; unset: none",
    "model": "the model name in answers and in /v1/models",
    "seed": "seed of the failure draws: the same seed fails the same calls",
    "invalid_json_first": "answer the next this-many JSON requests (and forced tool calls) with broken JSON",
    "invalid_json_how": "how --invalid-json-first breaks JSON: truncated (not JSON) or wrong_type (schema-invalid)",
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=lambda prog: argparse.ArgumentDefaultsHelpFormatter(prog, max_help_position=32),
        epilog="At run time: POST /_fake/config changes these settings, GET /_fake/stats says what it saw.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=9100, help="port to listen on")
    for f in fields(FakeBehaviour):
        kind = {"float": float, "int": int, "bool": None, "str": str}.get(str(f.type).split(" ")[0])
        flag = "--" + f.name.replace("_", "-")
        help_text = FLAG_HELP.get(f.name, "")
        if kind is None and "bool" in str(f.type):
            parser.add_argument(flag, action="store_true", help=help_text)
        elif "None" in str(f.type):
            parser.add_argument(flag, type=float if "float" in str(f.type) else
                                (int if "int" in str(f.type) else str), default=None, help=help_text)
        else:
            parser.add_argument(flag, type=kind or str, default=f.default, help=help_text)
    args = vars(parser.parse_args(argv))
    host, port = args.pop("host"), args.pop("port")
    fake = FakeOpenAI(FakeBehaviour(**args))
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover
        pass
    literal = f"[{host}]" if ":" in host else host

    def listening(_: str) -> None:  # aiohttp calls it once the socket listens
        print(f"fake OpenAI upstream listening on http://{literal}:{port}/v1 (Ctrl-C stops it)", flush=True)

    web.run_app(fake.app, host=host, port=port, access_log=None, print=listening, handler_cancellation=True,
                shutdown_timeout=1.0)


if __name__ == "__main__":  # pragma: no cover
    main()
