"""An upstream that echoes the deployment's API key back (in an error body, or in a stream's error
event) never gets it into Keel's error message: the OpenAI-compatible and the Anthropic provider
take it out ("[redacted]") before the text reaches the client, the log or the request log."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from aiohttp import web

from keel.config import AnthropicDeployment, ModelConfig, OpenAIDeployment
from keel.errors import KeelError
from keel.pipeline import Call, ChunkStream
from keel.providers.anthropic import AnthropicProvider
from keel.providers.http import REDACTED, secrets_in
from keel.providers.openai_compat import OpenAICompatProvider
from keel.testing.fake_server import ThreadedServer
from keel.types import ChatRequest

KEY_ENV = "KEEL_TEST_ECHOED_KEY"
KEY = "sk-echoed-0123456789abcdef"


def _sse(data: dict[str, Any], event: str | None = None) -> bytes:
    return (f"event: {event}\n".encode() if event else b"") + b"data: " + orjson.dumps(data) + b"\n\n"


async def echo(request: web.Request) -> web.StreamResponse:
    """Fails every call with whatever credential it got in its message: as a 400, or mid-stream."""
    body = await request.json()
    got = request.headers.get("authorization") or request.headers.get("x-api-key") or ""
    message = f"Incorrect API key provided: {got} (key {got.removeprefix('Bearer ')})"
    anthropic = request.path.endswith("/messages")
    if not body.get("stream"):
        error = ({"type": "error", "error": {"type": "invalid_request_error", "message": message}} if anthropic
                 else {"error": {"message": message, "type": "invalid_request_error", "code": None}})
        return web.json_response(error, status=400)
    stream = web.StreamResponse(headers={"content-type": "text/event-stream"})
    await stream.prepare(request)
    if anthropic:
        await stream.write(_sse({"type": "message_start", "message": {
            "id": "msg_1", "type": "message", "role": "assistant", "model": "m", "content": [],
            "usage": {"input_tokens": 1, "output_tokens": 0}}}, "message_start"))
        await stream.write(_sse({"type": "error", "error": {"type": "api_error", "message": message}}, "error"))
    else:
        await stream.write(_sse({"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
                                 "choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": None}]}))
        await stream.write(_sse({"error": {"message": message}}))
    await stream.write_eof()
    return stream


@pytest.fixture
def server() -> Iterator[ThreadedServer]:
    app = web.Application()
    app.add_routes([web.post("/v1/chat/completions", echo), web.post("/v1/messages", echo)])
    with ThreadedServer(app, "echo-keys") as running:
        yield running


def call(stream: bool) -> tuple[ChatRequest, Call]:
    request = ChatRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "hi"}],
                                         "stream": stream})
    model = ModelConfig.model_validate({"name": "m", "deployments": [{"provider": "simulated"}]})
    return request, Call(request=request, model=model, deployments=[])


def test_the_credentials_of_a_deployment_are_its_auth_headers_with_and_without_scheme() -> None:
    headers = {"Authorization": "Bearer sk-1", "x-api-key": "sk-2", "content-type": "application/json",
               "api-key": " "}
    assert set(secrets_in(headers)) == {"Bearer sk-1", "sk-1", "sk-2"}
    assert secrets_in(headers)[0] == "Bearer sk-1"  # longest first: the whole header goes before its key


@pytest.mark.parametrize("kind", ["openai", "anthropic"])
@pytest.mark.parametrize("stream", [False, True], ids=["error-body", "stream-error-event"])
async def test_an_echoed_key_is_redacted_from_the_error(server: ThreadedServer, monkeypatch: pytest.MonkeyPatch,
                                                        kind: str, stream: bool) -> None:
    monkeypatch.setenv(KEY_ENV, KEY)
    root = f"http://127.0.0.1:{server.port}"
    fields = {"base_url": root + "/v1" if kind == "openai" else root, "model": "m", "api_key_env": KEY_ENV}
    provider: OpenAICompatProvider | AnthropicProvider = (
        OpenAICompatProvider(OpenAIDeployment.model_validate({"provider": "openai", **fields}), "up")
        if kind == "openai" else
        AnthropicProvider(AnthropicDeployment.model_validate({"provider": "anthropic", **fields}), "up"))
    await provider.start()
    try:
        with pytest.raises(KeelError) as raised:
            reply = await provider.chat(*call(stream))
            assert isinstance(reply, ChunkStream)
            async for _ in reply:
                pass
    finally:
        await provider.close()
    message = raised.value.message
    assert "Incorrect API key provided" in message  # the upstream's words are kept ...
    assert KEY not in message and REDACTED in message  # ... without its key
