"""Two promises of a gateway that faces the network, through a real `keel serve`:

- Request limits: oversized headers, too many headers and an oversized body get a clear 431 / 413 in
  OpenAI's error shape (never a 500, never a bare framework page), and the gateway keeps serving.
- No SSRF: where Keel sends a call is configuration (a deployment's `base_url`), never request input.
  No request field (an image URL, a `base_url` or `api_base` in the body, a model named by URL) and no
  header (`Host`, `X-Forwarded-Host`, `Forwarded`, ...) makes Keel fetch a URL: a canary server that
  each case points at must never be called, and the call goes to the configured upstream (or is refused).
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest
from aiohttp import web
from conftest import GatewayProcess
from observability_helpers import assert_openai_error

from keel.server.gateway import MAX_HEADER_BYTES, MAX_HEADERS
from keel.testing.fake_openai import FakeOpenAIServer
from keel.testing.fake_server import ThreadedServer

KEY = "sk-keel-limits-ssrf"
AUTH = {"authorization": f"Bearer {KEY}", "content-type": "application/json"}
MAX_BODY = 200_000
GOOD = b'{"model": "sim", "messages": [{"role": "user", "content": "still here?"}]}'


class Canary:
    """A server that counts every request it gets, whatever its path or method."""

    def __init__(self) -> None:
        self.hits: list[str] = []
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.hit)
        self.server = ThreadedServer(app, "canary")

    async def hit(self, request: web.Request) -> web.Response:
        self.hits.append(f"{request.method} {request.path_qs}")
        return web.Response(body=b"\x89PNG canary", content_type="image/png")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.port}"


@pytest.fixture(scope="module")
def canary() -> Iterator[Canary]:
    probe = Canary()
    with probe.server:
        yield probe


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeOpenAIServer]:
    with FakeOpenAIServer() as server:
        yield server


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, upstream: FakeOpenAIServer) -> Iterator[GatewayProcess]:
    config: dict[str, Any] = {
        "models": [{"name": "sim", "deployments": [{"provider": "simulated"}]},
                   {"name": "up", "deployments": [{"provider": "openai", "model": "gpt-4o-mini",
                                                   "base_url": upstream.url}]}],
        "server": {"max_body_bytes": MAX_BODY},
    }
    process = GatewayProcess(config, tmp_path_factory.mktemp("limits-ssrf"), {"KEEL_MASTER_KEY": KEY})
    process.start()
    yield process
    process.stop()


def raw_post(gw: GatewayProcess, headers: list[tuple[bytes, bytes]], body: bytes = GOOD) -> tuple[int, bytes]:
    """A POST written on the socket (httpx would refuse some of these headers): its status and body."""
    head = b"".join(b"%s: %s\r\n" % pair for pair in headers)
    request = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer " + KEY.encode()
               + b"\r\nContent-Type: application/json\r\nConnection: close\r\nContent-Length: %d\r\n" % len(body)
               + head + b"\r\n" + body)
    with socket.create_connection(("127.0.0.1", gw.port), timeout=30) as sock:
        try:
            sock.sendall(request)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the gateway answered and closed before reading everything: its answer is still there
        answer = b""
        try:
            while chunk := sock.recv(65536):
                answer += chunk
        except ConnectionResetError:
            pass
    head_bytes, _, body_bytes = answer.partition(b"\r\n\r\n")
    return int(head_bytes.split(b" ", 2)[1]), body_bytes


def still_serving(gw: GatewayProcess) -> None:
    answer = httpx.post(gw.url + "/v1/chat/completions", content=GOOD, headers=AUTH, timeout=30)
    assert answer.status_code == 200, answer.text


# ---------------------------------------------------------------------------- limits


@pytest.mark.parametrize(("headers", "body", "status", "code", "says"), [
    pytest.param([(b"x-big", b"a" * (MAX_HEADER_BYTES + 1))], GOOD, 431, "request_headers_too_large",
     ["headers are", f"at most {MAX_HEADER_BYTES}"], id="one-oversized-header"),
    pytest.param([(b"cookie", b"; ".join(b"c%d=%s" % (i, b"v" * 900) for i in range(40)))], GOOD, 431,
     "request_headers_too_large", ["headers are", "cookie"], id="oversized-cookie"),
    pytest.param([(b"x-h%d" % i, b"v") for i in range(MAX_HEADERS + 1)], GOOD, 431,
     "request_headers_too_large", [f"at most {MAX_HEADERS}"], id="too-many-headers"),
    pytest.param([], b'{"model": "sim", "input": "' + b"x" * (MAX_BODY + 1) + b'"}', 413, "request_too_large",
     [f"at most {MAX_BODY}", "server.max_body_bytes"], id="oversized-body"),
])
def test_over_a_limit_is_a_clear_4xx_in_openai_shape_and_the_gateway_keeps_serving(
        gw: GatewayProcess, headers: list[tuple[bytes, bytes]], body: bytes, status: int, code: str,
        says: list[str]) -> None:
    got, answer = raw_post(gw, headers, body)
    assert got == status, answer[:300]
    error = orjson.loads(answer)
    assert_openai_error(error, code)
    for words in says:
        assert words in error["error"]["message"]
    still_serving(gw)


def test_headers_within_the_limits_are_served(gw: GatewayProcess) -> None:
    got, answer = raw_post(gw, [(b"x-h%d" % i, b"v" * 200) for i in range(60)])  # 60 headers, ~13 KB
    assert got == 200, answer[:300]


def test_a_limit_applies_to_every_route(gw: GatewayProcess) -> None:
    answer = httpx.get(gw.url + "/v1/models", headers={**AUTH, "x-big": "a" * (MAX_HEADER_BYTES + 1)}, timeout=30)
    assert answer.status_code == 431
    assert_openai_error(answer.json(), "request_headers_too_large")
    assert answer.headers["x-keel-request-id"]


# ---------------------------------------------------------------------------- SSRF


def image(url: str) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url}}


def ssrf_cases(canary: str) -> dict[str, tuple[str, dict[str, Any], dict[str, str]]]:
    """Each: (path, body, headers), each pointing somewhere at the canary."""
    ask = [{"role": "user", "content": "hi"}]
    return {
        "image-url-part": ("/v1/chat/completions", {"model": "up", "messages": [
            {"role": "user", "content": [{"type": "text", "text": "what is this?"}, image(canary + "/img.png")]}]}, {}),
        "image-url-part-simulated": ("/v1/chat/completions", {"model": "sim", "messages": [
            {"role": "user", "content": [image(canary + "/img.png")]}]}, {}),
        "base-url-in-body": ("/v1/chat/completions",
                             {"model": "up", "messages": ask, "base_url": canary + "/v1"}, {}),
        "api-base-in-body": ("/v1/chat/completions",
                             {"model": "up", "messages": ask, "api_base": canary + "/v1", "api_key": "x",
                              "custom_llm_provider": "openai", "url": canary, "endpoint": canary}, {}),
        "model-as-url": ("/v1/chat/completions", {"model": canary + "/v1", "messages": ask}, {}),
        "forwarded-headers": ("/v1/chat/completions", {"model": "up", "messages": ask}, {
            "x-forwarded-host": canary.removeprefix("http://"), "x-forwarded-proto": "http",
            "forwarded": f"host={canary.removeprefix('http://')};proto=http", "x-original-url": canary,
            "x-keel-base-url": canary, "openai-base-url": canary, "x-base-url": canary}),
        "host-header": ("/v1/chat/completions", {"model": "up", "messages": ask},
                        {"host": canary.removeprefix("http://")}),
        "messages-image-url": ("/v1/messages", {"model": "up", "max_tokens": 5, "messages": [
            {"role": "user", "content": [{"type": "image", "source": {"type": "url", "url": canary + "/img.png"}}]}]},
            {}),
        "responses-input-image": ("/v1/responses", {"model": "up", "input": [{"role": "user", "content": [
            {"type": "input_image", "image_url": canary + "/img.png"}]}]}, {}),
        "embeddings-base-url": ("/v1/embeddings", {"model": "up", "input": "hi", "base_url": canary + "/v1"}, {}),
    }


CASES = list(ssrf_cases("http://canary"))


@pytest.mark.parametrize("case", CASES)
def test_no_request_field_or_header_makes_keel_fetch_a_url(gw: GatewayProcess, canary: Canary,
                                                           upstream: FakeOpenAIServer, case: str) -> None:
    path, body, headers = ssrf_cases(canary.url)[case]
    before = upstream.call(lambda: upstream.fake.stats.requests)
    answer = httpx.post(gw.url + path, content=orjson.dumps(body), headers={**AUTH, **headers}, timeout=30)
    assert answer.status_code < 500, answer.text
    if answer.status_code >= 400:  # refused: in the dialect's error shape, saying why
        assert "error" in answer.json(), answer.text
    elif body["model"] == "up":  # served: by the configured upstream, and only by it
        assert upstream.call(lambda: upstream.fake.stats.requests) == before + 1
    assert canary.hits == [], f"Keel fetched {canary.hits} for {case}"
