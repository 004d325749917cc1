"""The upstream HTTP client against raw servers that send exactly the bytes each case needs."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gc
import gzip
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Self
from urllib.parse import urlsplit

import pytest
from conftest import require_service

from keel.errors import UpstreamConnectionError
from keel.providers import http_client
from keel.providers.http import mid_stream_error
from keel.providers.http_client import (
    ConnectFailed,
    ConnectionLost,
    ProtocolError,
    Proxy,
    ProxyNotSupported,
    ResponseTooLarge,
    UpstreamClient,
    proxy_for,
)

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[None]]


class LocalServer:
    """A TCP server on a free local port while in `async with`; subclasses `_serve` a connection."""

    server: asyncio.Server | None = None

    async def __aenter__(self) -> Self:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError


class RawServer(LocalServer):
    """Counts connections; `handler(reader, writer, n)` answers the n-th request of a connection."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.active = 0
        self.most_active = 0
        self.bodies: list[bytes] = []
        self.heads: list[bytes] = []
        self.writers: list[asyncio.StreamWriter] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        n = 0
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                                  if line.lower().startswith(b"content-length")))
                self.heads.append(head)
                self.bodies.append(await reader.readexactly(length))
                n += 1
                self.active += 1
                self.most_active = max(self.most_active, self.active)
                try:
                    await self.handler(reader, writer, n)
                finally:
                    self.active -= 1
                if writer.is_closing():
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


def ok(body: bytes, extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s\r\n%s" % (
        len(body), extra, body)


async def fetch(client: UpstreamClient, path: str = "/x", body: bytes = b"{}") -> bytes:
    """POST, read the whole answer, give the connection back."""
    response = await client.post(path, body)
    try:
        return await response.read()
    finally:
        response.release()


async def answer_json(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
    writer.write(ok(b'{"n": %d}' % n))
    await writer.drain()


async def test_keep_alive_reuses_one_connection_and_sends_one_request_per_post() -> None:
    async with RawServer(answer_json) as server:
        client = UpstreamClient(server.url, {"authorization": "Bearer k", "content-type": "application/json"})
        for i in range(20):
            response = await client.post("/chat/completions", b'{"i": %d}' % i)
            assert response.status == 200
            assert await response.read() == b'{"n": %d}' % (i + 1)
            response.release()
        await client.close()
        host = server.url.split("/")[2]
    assert server.connections == 1
    assert server.bodies[-1] == b'{"i": 19}'
    head = server.heads[0].decode()
    assert head.startswith("POST /v1/chat/completions HTTP/1.1\r\n")
    assert "authorization: Bearer k" in head and "Content-Length: 8" in head
    assert f"Host: {host}\r\n" in head


async def test_lines_arrive_as_the_server_sends_them() -> None:
    sent_second = asyncio.Event()
    got_first = asyncio.Event()

    async def chunked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Type: text/event-stream\r\n\r\n")
        writer.write(b"d\r\ndata: first\n\n\r\n")
        await writer.drain()
        await asyncio.wait_for(got_first.wait(), 5)  # the client has the first line before the rest exists
        writer.write(b"e\r\ndata: sec")
        await writer.drain()
        writer.write(b"ond\n\n\r\n0\r\n\r\n")
        sent_second.set()
        await writer.drain()

    async with RawServer(chunked) as server:
        client = UpstreamClient(server.url)
        response = await client.post("/x", b"{}")
        lines = []
        async for line in response.lines():
            lines.append(line)
            if line == b"data: first\n":
                assert not sent_second.is_set()
                got_first.set()
        response.release()
        assert lines == [b"data: first\n", b"\n", b"data: second\n", b"\n"]
        assert client._idle, "a fully read chunked answer leaves its connection in the pool"
        await client.close()


async def test_body_until_close_and_gzip_and_headers() -> None:
    payload = b'{"answer": "' + b"x" * 5000 + b'"}'

    async def http10(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        writer.write(b"HTTP/1.0 200 OK\r\nContent-Encoding: gzip\r\nX-Seen: a\r\nx-seen: b\r\n\r\n")
        writer.write(gzip.compress(payload))
        await writer.drain()
        writer.close()

    async with RawServer(http10) as server:
        client = UpstreamClient(server.url)
        for _ in range(2):
            response = await client.post("/x", b"{}")
            assert response.headers.get("X-SEEN") == "a, b"
            assert await response.read() == payload
            response.release()
        await client.close()
    assert server.connections == 2, "an answer read until close cannot leave a reusable connection"


async def test_a_pooled_connection_the_server_closed_is_not_reused() -> None:
    async def answer_then_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        # Keep-alive promised, then the server closes the connection (its idle timeout).
        writer.write(ok(b"{}"))
        await writer.drain()
        writer.close()
        await writer.wait_closed()
        closed.set()

    closed = asyncio.Event()
    async with RawServer(answer_then_close) as server:
        client = UpstreamClient(server.url)
        for _ in range(3):
            closed.clear()
            assert await fetch(client) == b"{}"
            await asyncio.wait_for(closed.wait(), 5)
        await client.close()
    assert server.connections == 3
    assert len(server.bodies) == 3, "no request was sent on a closed connection"


async def test_a_closed_idle_connection_is_found_before_the_loop_has_seen_its_end() -> None:
    async with RawServer(answer_json) as server:
        client = UpstreamClient(server.url)
        assert await fetch(client) == b'{"n": 1}'
        (connection,) = client._idle
        assert not connection.dropped_by_server()
        # The server's FIN is in the socket, but no loop iteration has run since: only a poll sees it.
        connection.transport.pause_reading()  # type: ignore[union-attr]
        for served in server.writers:
            served.close()
            await served.wait_closed()  # on loopback the FIN is in the client's socket once this returns
        assert connection.dropped_by_server()
        assert await fetch(client) == b'{"n": 1}', "a new connection, first request on it"
        await client.close()
    assert server.connections == 2


async def test_a_request_lost_on_a_reused_connection_is_not_sent_again() -> None:
    async def close_second(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        if n == 2:  # the race: the server read the request, then closed without answering
            writer.transport.abort()
            return
        writer.write(ok(b"{}"))
        await writer.drain()

    async with RawServer(close_second) as server:
        client = UpstreamClient(server.url)
        assert await fetch(client) == b"{}"
        with pytest.raises(ConnectionLost) as caught:
            await fetch(client)
        assert caught.value.reused and not caught.value.answered
        assert "pooled keep-alive connection" in str(caught.value)
        assert client._slots._value == 256
        assert await fetch(client) == b"{}", "the caller's next attempt gets a new connection"
        await client.close()
    assert len(server.bodies) == 3, "sent once per call: the server may have acted on the lost one"


async def test_a_fresh_connection_lost_before_answering_fails() -> None:
    async def drop(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        writer.transport.abort()

    async with RawServer(drop) as server:
        client = UpstreamClient(server.url)
        with pytest.raises(ConnectionLost) as caught:
            await client.post("/x", b"{}")
        assert not caught.value.answered
        await client.close()
    assert len(server.bodies) == 1, "a new connection is never retried: the server may have acted on it"


async def test_lines_before_a_reset_are_all_given_then_the_loss_is_raised() -> None:
    async def cut(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\ndata: 1\n\ndata: 2\n\ndata: hal")
        await writer.drain()
        writer.transport.abort()

    async with RawServer(cut) as server:
        client = UpstreamClient(server.url)
        response = await client.post("/x", b"{}")
        lines = []
        with pytest.raises(ConnectionLost) as caught:
            async for line in response.lines():
                lines.append(line)
        assert caught.value.answered
        assert lines == [b"data: 1\n", b"\n", b"data: 2\n", b"\n"]
        response.close()

        response = await client.post("/x", b"{}")  # the same, with the failure mapped by the reader
        with pytest.raises(UpstreamConnectionError, match="deployment 'up' dropped the stream"):
            async for _ in response.lines(mid_stream_error("up")):
                pass
        response.close()
        assert client._slots._value == 256, "the failed answer gave its connection slot back"
        await client.close()


async def test_garbage_is_a_protocol_error_and_refused_connect_is_connect_failed() -> None:
    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        writer.write(b"SMTP ready\r\n\r\n")
        await writer.drain()

    async with RawServer(garbage) as server:
        client = UpstreamClient(server.url)
        with pytest.raises(ProtocolError):
            await client.post("/x", b"{}")
        await client.close()

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    client = UpstreamClient(f"http://127.0.0.1:{port}")
    with pytest.raises(ConnectFailed, match="cannot connect"):
        await client.post("/x", b"{}")
    assert client._slots._value == 256
    await client.close()


async def test_unsupported_content_encoding_fails_reading() -> None:
    async def brotli(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        writer.write(ok(b"\x1b\x00", extra=b"Content-Encoding: br\r\n"))
        await writer.drain()

    async with RawServer(brotli) as server:
        client = UpstreamClient(server.url)
        response = await client.post("/x", b"{}")
        with pytest.raises(ProtocolError, match="'br'"):
            await response.read()
        response.release()
        await client.close()


async def test_at_most_max_connections_are_in_use() -> None:
    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await asyncio.sleep(0.05)
        writer.write(ok(b"{}"))
        await writer.drain()

    async with RawServer(slow) as server:
        client = UpstreamClient(server.url, max_connections=2)

        assert await asyncio.gather(*(fetch(client) for _ in range(6))) == [b"{}"] * 6
        await client.close()
    assert server.most_active == 2
    assert server.connections == 2


async def test_released_before_the_body_ends_the_connection_is_reused_once_it_does() -> None:
    release_now = asyncio.Event()

    async def late_end(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n8\r\n[DONE]\n\n\r\n")
        await writer.drain()
        await release_now.wait()
        writer.write(b"0\r\n\r\n")  # the terminating chunk comes after the client stopped reading
        await writer.drain()
        release_now.clear()

    async with RawServer(late_end) as server:
        client = UpstreamClient(server.url)
        for _ in range(2):
            response = await client.post("/x", b"{}")
            async for line in response.lines():
                if line.startswith(b"[DONE]"):
                    break
            response.release()
            release_now.set()
            await until_idle(client)  # the body's end came in after the release: the connection is back
        await client.close()
    assert server.connections == 1


async def until_idle(client: UpstreamClient, within_s: float = 5.0) -> None:
    """Wait until a connection is back in the client's pool; fail after `within_s`."""
    deadline = time.monotonic() + within_s
    while not client._idle:
        assert time.monotonic() < deadline, f"no connection came back to the pool within {within_s} s"
        await asyncio.sleep(0.005)


async def test_a_stream_closed_early_drops_its_connection() -> None:
    async def endless(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        while not writer.is_closing():
            writer.write(b"6\r\ndata:\n\r\n")
            await writer.drain()
            await asyncio.sleep(0.01)

    async with RawServer(endless) as server:
        client = UpstreamClient(server.url)
        response = await client.post("/x", b"{}")
        async for _ in response.lines():
            break
        response.close()
        assert not client._idle and not client._all
        await client.close()


async def test_reading_pauses_while_the_reader_lags(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(http_client, "BUFFER_HIGH", 64 * 1024)
    size = 8 * 1024 * 1024

    async def big(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
        line = b"y" * 1023 + b"\n"
        for _ in range(size // 1024):
            writer.write(line)
            await writer.drain()

    async with RawServer(big) as server:
        client = UpstreamClient(server.url)
        response = await client.post("/x", b"{}")
        most, total = 0, 0
        async for line in response.lines():
            total += len(line)
            most = max(most, response._buffered)
            if total % (512 * 1024) == 0:
                await asyncio.sleep(0.01)  # a slow reader
        response.release()
        await client.close()
    assert total == size
    assert most < 1024 * 1024, f"{most} bytes buffered: reading did not pause"


def test_header_values_cannot_inject_lines_and_urls_must_be_http() -> None:
    with pytest.raises(ValueError, match="line break"):
        UpstreamClient("http://127.0.0.1:1", {"x-api-key": "k\r\nX-Evil: 1"})
    with pytest.raises(ValueError, match="http:// or https://"):
        UpstreamClient("ftp://example.com")



@pytest.fixture
def certificate(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed certificate for localhost and its key."""
    if shutil.which("openssl") is None:
        require_service("openssl", "the openssl command is not on PATH (it makes the test certificate)")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    return cert, key


@asynccontextmanager
async def tls_upstream(certificate: tuple[Path, Path]) -> AsyncIterator[int]:
    """An HTTPS `answer_json` server for localhost with the test certificate; yields its port."""
    cert, key = certificate
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(cert, key)
    server = await asyncio.start_server(
        lambda r, w: RawServer(answer_json)._serve(r, w), "127.0.0.1", 0, ssl=server_tls)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()


async def assert_https_works_and_checks_the_certificate(cert: Path, port: int, proxy: str | None) -> None:
    client = UpstreamClient(f"https://localhost:{port}/v1", proxy=proxy,
                            ssl_context=ssl.create_default_context(cafile=str(cert)))
    for n in (1, 2):  # one connection, kept alive
        assert await fetch(client) == b'{"n": %d}' % n
    await client.close()
    strict = UpstreamClient(f"https://localhost:{port}/v1", proxy=proxy)  # the system's CAs do not know this one
    with pytest.raises(ConnectFailed, match="CERTIFICATE_VERIFY_FAILED"):
        await strict.post("/chat/completions", b"{}")
    await strict.close()


async def test_https_with_the_servers_certificate_checked(certificate: tuple[Path, Path]) -> None:
    async with tls_upstream(certificate) as port:
        await assert_https_works_and_checks_the_certificate(certificate[0], port, proxy=None)


async def test_informational_answers_before_the_real_one_are_skipped() -> None:
    async def early_hints(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        writer.write(b"HTTP/1.1 103 Early Hints\r\nLink: </x>; rel=preload\r\n\r\n")
        await writer.drain()
        writer.write(ok(b'{"ok": true}'))
        await writer.drain()

    async with RawServer(early_hints) as server:
        client = UpstreamClient(server.url)
        response = await client.post("/x", b"{}")
        assert response.status == 200 and "link" not in response.headers
        assert await response.read() == b'{"ok": true}'
        response.release()
        assert await fetch(client) == b'{"ok": true}'
        await client.close()
    assert server.connections == 1


async def test_an_answer_dropped_without_release_gives_its_slot_back() -> None:
    async with RawServer(answer_json) as server:
        client = UpstreamClient(server.url, max_connections=1)
        response = await client.post("/x", b"{}")
        del response  # never read, never released (a stream generator that never started)
        gc.collect()
        assert await asyncio.wait_for(fetch(client), 2) == b'{"n": 1}', "a new connection, the old one dropped"
        await client.close()


async def test_every_slot_comes_back_whatever_happened_to_the_request() -> None:
    async def varied(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        request = len(server.bodies)  # counted over all connections
        if request == 2:
            writer.transport.abort()  # the reused connection, closed: the call fails
            return
        if request == 4:
            await asyncio.sleep(10)  # hangs: the caller gives up
        writer.write(ok(b"{}"))
        await writer.drain()

    async with RawServer(varied) as server:
        client = UpstreamClient(server.url, max_connections=3)
        assert await fetch(client) == b"{}"
        with pytest.raises(ConnectionLost):
            await fetch(client)
        assert await fetch(client) == b"{}"
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(fetch(client), 0.1)
        gc.collect()
        assert client._slots._value == 3
        assert await fetch(client) == b"{}"
        assert client._slots._value == 3
        await client.close()


async def test_an_answer_collected_in_another_thread_is_given_back_on_the_loop() -> None:
    async with RawServer(answer_json) as server:
        client = UpstreamClient(server.url, max_connections=1)
        response = await client.post("/x", b"{}")
        cycle: list[object] = [response]
        cycle.append(cycle)  # only the cycle collector can free it
        del response, cycle
        gc.disable()
        try:
            await asyncio.to_thread(gc.collect)  # as the request log's writer thread might
        finally:
            gc.enable()
        assert await asyncio.wait_for(fetch(client), 2) == b'{"n": 1}'
        assert client._slots._value == 1
        await client.close()


class ForwardProxy(LocalServer):
    """A forward proxy as small as it gets: CONNECT tunnels, and plain requests by absolute URL.
    It records each request line and the Proxy-Authorization it saw."""

    def __init__(self) -> None:
        self.seen: list[tuple[bytes, bytes | None]] = []

    @property
    def url(self) -> str:
        return f"http://user:p%40ss@127.0.0.1:{self.port}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        first, *headers = head.split(b"\r\n")
        auth = next((h.split(b": ", 1)[1] for h in headers if h.lower().startswith(b"proxy-authorization")), None)
        self.seen.append((first, auth))
        method, target, _ = first.split(b" ")
        if method == b"CONNECT":
            host, port = target.rsplit(b":", 1)
            up_reader, up_writer = await asyncio.open_connection(host.decode(), int(port))
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        else:  # http://host:port/path: sent on as it came, the proxy adds nothing
            where = urlsplit(target.decode())
            up_reader, up_writer = await asyncio.open_connection(where.hostname, where.port)
            up_writer.write(head)

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            try:
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            except ConnectionError:
                pass
            finally:
                sink.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))


def test_the_environment_names_the_proxy_but_never_for_a_loopback_host(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "all_proxy",
                 "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    assert proxy_for("https", "api.openai.com") is None
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.corp:3128")
    monkeypatch.setenv("HTTP_PROXY", "http://plain.corp:8080")
    assert proxy_for("https", "api.openai.com") == "http://proxy.corp:3128"
    assert proxy_for("http", "vllm.internal") == "http://plain.corp:8080"
    for local in ("127.0.0.1", "127.0.0.2", "::1", "localhost"):
        assert proxy_for("http", local) is None, local
    monkeypatch.setenv("NO_PROXY", ".internal,api.anthropic.com")
    assert proxy_for("http", "vllm.internal") is None
    assert proxy_for("https", "api.anthropic.com") is None
    assert proxy_for("https", "api.openai.com") == "http://proxy.corp:3128"
    assert UpstreamClient("https://api.openai.com/v1").proxy == Proxy("proxy.corp", 3128)
    assert UpstreamClient("https://api.openai.com/v1", proxy=None).proxy is None


async def test_plain_http_through_a_proxy_names_the_whole_url() -> None:
    async with RawServer(answer_json) as server, ForwardProxy() as proxy:
        client = UpstreamClient(server.url, proxy=proxy.url)
        assert await fetch(client, "/chat/completions") == b'{"n": 1}'
        assert await fetch(client, "/chat/completions") == b'{"n": 2}', "kept alive through the proxy"
        await client.close()
        upstream = server.url
    line, auth = proxy.seen[0]
    assert line == f"POST {upstream}/chat/completions HTTP/1.1".encode()
    assert auth == b"Basic " + base64.b64encode(b"user:p@ss")
    assert len(proxy.seen) == 1


async def test_https_through_a_proxy_tunnels_and_checks_the_certificate(certificate: tuple[Path, Path]) -> None:
    async with tls_upstream(certificate) as port, ForwardProxy() as proxy:
        await assert_https_works_and_checks_the_certificate(certificate[0], port, proxy=proxy.url)
    tunnel = (f"CONNECT localhost:{port} HTTP/1.1".encode(), b"Basic " + base64.b64encode(b"user:p@ss"))
    assert proxy.seen == [tunnel, tunnel], "one tunnel for both calls, one for the refused certificate"


async def test_a_proxy_that_refuses_the_tunnel_is_a_connect_failure() -> None:
    async def refuse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 407 Proxy Authentication Required\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()
        writer.close()

    proxy = await asyncio.start_server(refuse, "127.0.0.1", 0)
    port = proxy.sockets[0].getsockname()[1]
    try:
        client = UpstreamClient("https://api.example.com/v1", proxy=f"http://127.0.0.1:{port}")
        with pytest.raises(ConnectFailed, match=r"refused the tunnel: HTTP/1\.1 407"):
            await client.post("/chat/completions", b"{}")
        assert client._slots._value == 256
        await client.close()
    finally:
        proxy.close()
    with pytest.raises(ValueError, match="http://HOST:PORT"):
        UpstreamClient("https://api.example.com", proxy="socks5://127.0.0.1:1080")


@pytest.mark.parametrize(("variable", "url"), [("ALL_PROXY", "socks5://127.0.0.1:1080"),
                                               ("https_proxy", "https://user:secret@proxy.corp:443")])
def test_an_unusable_proxy_in_the_environment_is_an_error_naming_the_variable(
        monkeypatch: pytest.MonkeyPatch, variable: str, url: str) -> None:
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "all_proxy",
                 "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(variable, url)
    with pytest.raises(ProxyNotSupported) as caught:
        UpstreamClient("https://api.openai.com/v1")
    message = str(caught.value)
    assert message.startswith(f"{variable} names the proxy"), message
    assert "NO_PROXY" in message and "secret" not in message


def test_ipv6_upstreams_are_named_with_brackets() -> None:
    client = UpstreamClient("http://[::1]:8080/v1")
    assert client.url("/chat/completions") == "http://[::1]:8080/v1/chat/completions"
    assert b"Host: [::1]:8080\r\n" in client._head_rest
    assert b"Host: [::1]\r\n" in UpstreamClient("http://[::1]/v1")._head_rest


# ------------------------------------------------------------------ answers of any size


def big_body(size: int) -> bytes:
    """`size` bytes that are not all alike, so a lost or repeated piece changes the hash."""
    block = bytes(range(256)) * 4096  # 1 MiB
    return (block * (size // len(block) + 1))[:size]


def framed(kind: str, body: bytes) -> list[bytes]:
    """The answer's bytes, as written, for a body framed by content-length, chunks or the close."""
    if kind == "content-length":
        return [b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body), body]
    if kind == "chunked":
        step = 100_000
        parts = [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"]
        for i in range(0, len(body), step):
            piece = body[i:i + step]
            parts.append(b"%x\r\n%s\r\n" % (len(piece), piece))
        return [*parts, b"0\r\n\r\n"]
    return [b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n", body]


@pytest.mark.parametrize("kind", ["content-length", "chunked", "until-close"])
@pytest.mark.parametrize("size", [1024 * 1024, 16 * 1024 * 1024])
async def test_answers_of_any_size_are_read_whole(kind: str, size: int) -> None:
    body = big_body(size)

    async def send(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        for piece in framed(kind, body):
            writer.write(piece)
            await writer.drain()
        if kind == "until-close":
            writer.close()

    async with RawServer(send) as server:
        client = UpstreamClient(server.url)
        for _ in range(2):  # the second on the kept-alive connection (or a new one after a close)
            response = await client.post("/embeddings", b"{}")
            got = await asyncio.wait_for(response.read(), 60)
            response.release()
            assert len(got) == size and got == body
            streamed = await client.post("/embeddings", b"{}")
            pieces = [part async for part in streamed.parts()]
            streamed.release()
            assert b"".join(pieces) == body
        await client.close()


async def test_an_answer_past_max_response_bytes_fails_without_holding_it() -> None:
    limit = 1024 * 1024

    async def too_big(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        kind = ["content-length", "chunked", "until-close"][(n - 1) % 3]
        with contextlib.suppress(ConnectionError):
            for piece in framed(kind, big_body(4 * limit)):
                writer.write(piece)
                await writer.drain()
        writer.close()

    async with RawServer(too_big) as server:
        client = UpstreamClient(server.url, max_response_bytes=limit)
        for _ in range(3):
            response = await client.post("/x", b"{}")
            with pytest.raises(ResponseTooLarge, match="larger than 1,048,576 bytes"):
                await asyncio.wait_for(response.read(), 30)
            assert response._buffered == 0
            response.release()
        assert client._slots._value == 256 and not client._idle
        await client.close()


async def test_a_compression_bomb_is_stopped_at_the_limit() -> None:
    limit = 1024 * 1024
    bomb = gzip.compress(b"\0" * (64 * limit))  # 64 MiB of zeros in ~64 KiB

    async def send(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        writer.write(ok(bomb, b"Content-Encoding: gzip\r\n"))
        await writer.drain()

    async with RawServer(send) as server:
        client = UpstreamClient(server.url, max_response_bytes=limit)
        response = await client.post("/x", b"{}")
        with pytest.raises(ResponseTooLarge):
            await response.read()
        response.release()
        await client.close()


async def test_chunked_trailers_are_not_merged_into_the_headers() -> None:
    async def trailers(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Checksum\r\n"
                     b"Content-Type: application/json\r\n\r\n2\r\n{}\r\n0\r\n"
                     b"X-Checksum: abc\r\nContent-Type: text/evil\r\n\r\n")
        await writer.drain()

    async with RawServer(trailers) as server:
        client = UpstreamClient(server.url)
        for _ in range(2):
            response = await client.post("/x", b"{}")
            assert await response.read() == b"{}"
            assert "x-checksum" not in response.headers
            assert response.headers["content-type"] == "application/json"
            response.release()
        await client.close()
    assert server.connections == 1
