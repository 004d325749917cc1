"""What went over the wire between a client and the gateway, and checks on it.

`RecordingTransport` sits under the official SDK's HTTP client (httpx2, the httpx fork this
openai release is built on) and keeps every response body byte for byte as the gateway sent
it, so tests validate the raw wire, not the SDK's parsed view, against OpenAI's spec.
`sse_events` is a small independent SSE parser: the oracle for the gateway's own framing
and for the recorded OpenAI transcripts.
"""

from __future__ import annotations

import base64
import json
import struct
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx2
from spec import CHAT_CHUNK, CHAT_COMPLETION, EMBEDDINGS, ERROR, MODELS, validate

REQUEST_ID = "x-keel-request-id"


@dataclass
class Exchange:
    method: str
    path: str
    request_body: bytes
    status: int = 0
    headers: httpx2.Headers = field(default_factory=httpx2.Headers)
    body: bytearray = field(default_factory=bytearray)

    @property
    def is_stream(self) -> bool:
        return self.headers.get("content-type", "").startswith("text/event-stream")

    def json(self) -> Any:
        return json.loads(self.body)


class _Tee(httpx2.SyncByteStream, httpx2.AsyncByteStream):
    def __init__(self, inner: Any, exchange: Exchange) -> None:
        self.inner = inner
        self.exchange = exchange

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self.inner:
            self.exchange.body += chunk
            yield chunk

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self.inner:
            self.exchange.body += chunk
            yield chunk

    def close(self) -> None:
        self.inner.close()

    async def aclose(self) -> None:
        await self.inner.aclose()


class RecordingTransport(httpx2.BaseTransport):
    """An httpx transport that records each exchange's raw response body as it is read."""

    def __init__(self) -> None:
        self.inner = httpx2.HTTPTransport()
        self.exchanges: list[Exchange] = []

    def handle_request(self, request: httpx2.Request) -> httpx2.Response:
        exchange = Exchange(request.method, request.url.path, request.read())
        self.exchanges.append(exchange)
        response = self.inner.handle_request(request)
        exchange.status, exchange.headers = response.status_code, response.headers
        return httpx2.Response(
            response.status_code, headers=response.headers, stream=_Tee(response.stream, exchange),
            extensions=response.extensions,
        )

    def close(self) -> None:
        self.inner.close()


class AsyncRecordingTransport(httpx2.AsyncBaseTransport):
    def __init__(self) -> None:
        self.inner = httpx2.AsyncHTTPTransport()
        self.exchanges: list[Exchange] = []

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        exchange = Exchange(request.method, request.url.path, await request.aread())
        self.exchanges.append(exchange)
        response = await self.inner.handle_async_request(request)
        exchange.status, exchange.headers = response.status_code, response.headers
        return httpx2.Response(
            response.status_code, headers=response.headers, stream=_Tee(response.stream, exchange),
            extensions=response.extensions,
        )

    async def aclose(self) -> None:
        await self.inner.aclose()


def sse_events(raw: bytes) -> list[str]:
    """The `data` of each event in an SSE body (WHATWG framing: blank line ends an event)."""
    events: list[str] = []
    data: list[str] = []
    for line in raw.decode("utf-8").replace("\r\n", "\n").split("\n"):
        if not line:
            if data:
                events.append("\n".join(data))
            data = []
        elif line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
    if data:
        events.append("\n".join(data))
    return events


def stream_chunks(raw: bytes) -> list[dict[str, Any]]:
    """The chunk objects of a complete chat stream; it must end with `[DONE]`."""
    events = sse_events(raw)
    assert events and events[-1] == "[DONE]", f"stream did not end with [DONE]: {raw[-300:]!r}"
    assert "[DONE]" not in events[:-1], "[DONE] sent before the end of the stream"
    return [json.loads(event) for event in events[:-1]]


def transcript_chunks(path: Path) -> list[dict[str, Any]]:
    return stream_chunks(path.read_bytes())


def decode_base64_embedding(value: str) -> list[float]:
    raw = base64.b64decode(value)
    return list(struct.unpack(f"<{len(raw) // 4}f", raw))


def check_exchange(exchange: Exchange) -> None:
    """The response is what OpenAI's spec says for its route and status, and carries a request id."""
    assert exchange.headers.get(REQUEST_ID, "").startswith("req_"), f"no {REQUEST_ID} on {exchange.path}"
    if exchange.status >= 400:
        body = exchange.json()
        validate(ERROR, body)
        assert "Traceback" not in exchange.body.decode(errors="replace")
        return
    if exchange.path.endswith("/chat/completions"):
        if exchange.is_stream:
            for chunk in stream_chunks(bytes(exchange.body)):
                assert "error" not in chunk, f"stream carried an error: {chunk}"
                validate(CHAT_CHUNK, chunk)
        else:
            validate(CHAT_COMPLETION, exchange.json())
    elif exchange.path.endswith("/embeddings"):
        body = exchange.json()
        # The spec only describes float vectors; base64 ones are checked as the floats they encode.
        for item in body.get("data", []):
            if isinstance(item.get("embedding"), str):
                item["embedding"] = decode_base64_embedding(item["embedding"])
        validate(EMBEDDINGS, body)
    elif exchange.path.endswith("/models"):
        validate(MODELS, exchange.json())


def check_all(exchanges: list[Exchange]) -> None:
    assert exchanges, "no request went to the gateway"
    for exchange in exchanges:
        check_exchange(exchange)
