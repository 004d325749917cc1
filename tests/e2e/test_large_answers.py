"""Answers of any size through `keel serve`, read by the openai SDK: embeddings of 1,000 inputs
(LangChain's batch) and 16 MB chat answers, plain and streamed, from an upstream that frames its
bodies by Content-Length, chunks, or the end of the connection (issue 7: such answers hung)."""

from __future__ import annotations

import asyncio
import base64
import struct
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import orjson
import pytest
from conftest import GatewayProcess

FRAMINGS = ("content-length", "chunked", "close")
DIMENSIONS = 1536
BIG = 16 * 1024 * 1024


def vector(index: int) -> list[float]:
    """Exactly representable in float32, so base64 and JSON floats decode to the same numbers."""
    return [((index * 7 + j) % 1024) / 1024 for j in range(DIMENSIONS)]


def embeddings_body(request: dict[str, Any]) -> bytes:
    data = []
    for i in range(len(request["input"])):
        values = vector(i)
        encoded: Any = values
        if request.get("encoding_format") == "base64":
            encoded = base64.b64encode(struct.pack(f"<{DIMENSIONS}f", *values)).decode()
        data.append({"object": "embedding", "index": i, "embedding": encoded})
    return orjson.dumps({"object": "list", "data": data, "model": request["model"],
                         "usage": {"prompt_tokens": len(data), "total_tokens": len(data)}})


def text(size: int) -> str:
    return ("0123456789abcdef" * (size // 16 + 1))[:size]


def chat_body(request: dict[str, Any]) -> bytes:
    return orjson.dumps({
        "id": "chatcmpl-big", "object": "chat.completion", "created": 1, "model": request["model"],
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text(BIG)}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 100, "total_tokens": 105},
    })


def chat_stream(request: dict[str, Any]) -> bytes:
    piece = text(64 * 1024)
    head = {"id": "chatcmpl-big", "object": "chat.completion.chunk", "created": 1, "model": request["model"]}
    events = [orjson.dumps({**head, "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]})
              for _ in range(BIG // len(piece))]
    events.append(orjson.dumps({**head, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}))
    events.append(orjson.dumps({**head, "choices": [],
                                "usage": {"prompt_tokens": 5, "completion_tokens": 100, "total_tokens": 105}}))
    return b"".join(b"data: %s\n\n" % e for e in events) + b"data: [DONE]\n\n"


class FramingUpstream:
    """An OpenAI-shaped upstream on a raw socket, in a thread; the request's `model` names the
    framing of the answer's body: content-length, chunked, or close (HTTP/1.0 style)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.port = 0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> FramingUpstream:
        self.thread.start()
        assert self.ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        server = self.loop.run_until_complete(asyncio.start_server(self._serve, "127.0.0.1", 0))
        self.port = server.sockets[0].getsockname()[1]
        self.ready.set()
        self.loop.run_forever()
        server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length:"))
                request = orjson.loads(await reader.readexactly(length))
                path = head.split(b" ")[1]
                if path.endswith(b"/embeddings"):
                    body, kind = embeddings_body(request), b"application/json"
                elif request.get("stream"):
                    body, kind = chat_stream(request), b"text/event-stream"
                else:
                    body, kind = chat_body(request), b"application/json"
                framing = request["model"]
                await self._send(writer, framing, kind, body)
                if framing == "close":
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    @staticmethod
    async def _send(writer: asyncio.StreamWriter, framing: str, kind: bytes, body: bytes) -> None:
        head = b"HTTP/1.1 200 OK\r\nContent-Type: %s\r\n" % kind
        if framing == "content-length":
            writer.write(head + b"Content-Length: %d\r\n\r\n" % len(body) + body)
        elif framing == "chunked":
            writer.write(head + b"Transfer-Encoding: chunked\r\n\r\n")
            for i in range(0, len(body), 256 * 1024):
                piece = body[i:i + 256 * 1024]
                writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                await writer.drain()
            writer.write(b"0\r\n\r\n")
        else:
            writer.write(head + b"Connection: close\r\n\r\n" + body)
        await writer.drain()


@pytest.fixture(scope="module")
def gateway_to_framings(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    with FramingUpstream() as upstream:
        url = f"http://127.0.0.1:{upstream.port}/v1"
        config = {"models": [{"name": framing, "timeout_s": 120,
                              "deployments": [{"provider": "openai", "base_url": url, "model": framing}]}
                             for framing in FRAMINGS]}
        gateway = GatewayProcess(config, tmp_path_factory.mktemp("large")).start()
        yield gateway
        gateway.stop()


def client(gateway: GatewayProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", timeout=120)  # SDK defaults otherwise


@pytest.mark.parametrize("framing", FRAMINGS)
def test_an_embeddings_call_of_1000_inputs_comes_back_whole(gateway_to_framings: GatewayProcess, framing: str) -> None:
    inputs = [f"document number {i}" for i in range(1000)]
    with client(gateway_to_framings) as sdk:
        answer = sdk.embeddings.create(model=framing, input=inputs)  # the SDK asks for base64 (~8 MB)
    assert [d.index for d in answer.data] == list(range(1000))
    assert answer.data[0].embedding == vector(0) and answer.data[999].embedding == vector(999)
    # The same as JSON floats (~18 MB), read raw: the SDK's own parsing of it takes seconds.
    floats = httpx.post(gateway_to_framings.url + "/v1/embeddings", timeout=120,
                        json={"model": framing, "input": inputs, "encoding_format": "float"})
    assert floats.status_code == 200 and len(floats.content) > BIG
    assert floats.json()["data"][500]["embedding"] == vector(500)


@pytest.mark.parametrize("framing", FRAMINGS)
def test_a_16_mb_answer_comes_back_whole_plain_and_streamed(gateway_to_framings: GatewayProcess, framing: str) -> None:
    body = {"model": framing, "messages": [{"role": "user", "content": "a long answer, please"}]}
    url = gateway_to_framings.url + "/v1/chat/completions"
    plain = httpx.post(url, json=body, timeout=120)
    assert plain.status_code == 200
    assert plain.json()["choices"][0]["message"]["content"] == text(BIG)
    streamed = httpx.post(url, json={**body, "stream": True}, timeout=120)
    assert streamed.headers["content-type"].startswith("text/event-stream")
    events = [event.removeprefix(b"data: ") for event in streamed.content.split(b"\n\n") if event]
    assert events[-1] == b"[DONE]"
    pieces = [orjson.loads(e)["choices"][0]["delta"].get("content", "") for e in events[:-1]]
    assert "".join(pieces) == text(BIG)


def test_the_sdk_reads_a_16_mb_answer(gateway_to_framings: GatewayProcess) -> None:
    with client(gateway_to_framings) as sdk:
        plain = sdk.chat.completions.create(model="chunked", messages=[{"role": "user", "content": "long, please"}])
    assert plain.choices[0].message.content == text(BIG)
