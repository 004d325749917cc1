"""A lean HTTP/1.1 client for upstream calls: keep-alive pool, one write per request.

Every call through the gateway makes one upstream request, so this client's cost is on every
call's path. A general client (aiohttp) spends about as much CPU on one small POST as all of
Keel's stages together; this one does only what an upstream LLM API needs:

- POST to one base URL (http or https), the request written in a single `transport.write`;
- responses parsed by httptools (the parser uvicorn uses): content-length, chunked or
  read-until-close bodies, gzip and deflate;
- a pool of keep-alive connections per client, at most `max_connections` in use; idle ones
  are dropped after `idle_timeout` seconds or when the server closes them;
- a response body is read whole (`read`, which drains the buffer as the body arrives, so an
  answer of any size is read) or piece by piece as it arrives (`parts`, `lines`), with
  backpressure: reading from the socket pauses while too much is buffered and unread;
- an answer larger than `max_response_bytes` (after decompression) fails with
  `ResponseTooLarge`: never unbounded memory;
- chunked trailers are read and dropped, never merged into the answer's headers.

A request is never sent twice by this client. Before a pooled connection is reused it is
checked for the server having closed it (a readable idle socket: its FIN, or bytes nobody asked
for) and dropped if so; a request lost on a reused connection in the remaining race fails with
`ConnectionLost(reused=True)`, which the reliability stage retries as an attempt of its own
(logged, priced, counted against `max_attempts`): the server may have acted on the request.

It does not do HTTP/2, redirects (a 3xx is returned as it is; `keel.providers.http` decides),
cookies, or proxies other than http:// ones; docs/providers.md says why that is fine.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import os
import select
import ssl
import time
import urllib.request
import weakref
import zlib
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

import httptools

BUFFER_HIGH = 256 * 1024  # bytes of body buffered before reading from the socket pauses
LINGER_S = 5.0  # a released answer's body still arriving is awaited this long for its connection's reuse
MAX_RESPONSE_BYTES = 64 * 1024 * 1024  # far above any real answer (a 1,000-input embeddings answer is ~20 MB)


class HTTPClientError(Exception):
    """Transport-level failure: the caller maps it to its own error."""


class ConnectFailed(HTTPClientError):
    """No connection could be made (refused, unreachable, DNS, TLS, connect timeout)."""


class ConnectionLost(HTTPClientError):
    """The connection closed or failed before the answer was complete."""

    def __init__(self, message: str, *, answered: bool = False, reused: bool = False) -> None:
        super().__init__(message)
        self.answered = answered  # some of the answer had arrived
        self.reused = reused  # on a pooled keep-alive connection (the server may have closed it as it was reused)


class ProtocolError(HTTPClientError):
    """The server's bytes are not HTTP/1.1 this client can read."""


class ResponseTooLarge(HTTPClientError):
    """The answer is larger than the client's `max_response_bytes`."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"the answer is larger than {limit:,} bytes (max_response_bytes)")
        self.limit = limit


class ProxyNotSupported(ValueError):
    """The environment names a proxy this client cannot use."""


class Headers(dict[str, str]):
    """Response headers by lower-case name; repeated headers joined with ", "."""

    def get(self, key: str, default: Any = None) -> Any:
        return super().get(key.lower(), default)


class Response:
    """One answer. Read it with `read()` or `lines()`, then `release()` (connection back to the
    pool when the body was read whole) or `close()` (connection dropped)."""

    def __init__(self, connection: _Connection) -> None:
        self._connection: _Connection | None = connection
        self.status = 0
        self.headers = Headers()
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._complete = False
        self._error: HTTPClientError | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._decoder: Any = None
        self._room = connection.pool.max_response_bytes  # bytes of body still allowed

    # -- fed by the connection

    def _feed(self, data: bytes) -> None:
        if self._error is not None or self._connection is None:  # failed, or released: dropped
            return
        if self._decoder is not None:
            try:  # at most one byte past the limit is inflated: a compression bomb stays small
                data = self._decoder.decompress(data, self._room + 1)
            except zlib.error as exc:
                self._fail(ProtocolError(f"the compressed body cannot be read: {exc}"))
                return
            if self._decoder.unconsumed_tail:
                self._too_large()
                return
        self._room -= len(data)
        if self._room < 0:
            self._too_large()
            return
        if data:
            self._chunks.append(data)
            self._buffered += len(data)
            if self._buffered > BUFFER_HIGH and self._connection is not None:
                self._connection.pause()
            self._wake()

    def _finish(self) -> None:
        if self._error is not None:
            return
        if self._decoder is not None:
            tail = self._decoder.flush()
            self._room -= len(tail)
            if self._room < 0:
                self._too_large()
                return
            if tail:
                self._chunks.append(tail)
        self._complete = True
        self._wake()

    def _too_large(self) -> None:
        connection = self._connection
        self._chunks.clear()
        self._buffered = 0
        assert connection is not None
        self._fail(ResponseTooLarge(connection.pool.max_response_bytes))
        connection._drop()  # the rest of the body is not read: the connection cannot be reused

    def _fail(self, error: HTTPClientError) -> None:
        if not self._complete and self._error is None:
            self._error = error
            self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def _wait(self) -> None:
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def _take(self) -> bytes:
        data = b"".join(self._chunks) if len(self._chunks) > 1 else self._chunks[0]
        self._chunks.clear()
        self._buffered = 0
        if self._connection is not None:
            self._connection.resume()
        return data

    # -- the caller's side

    async def read(self) -> bytes:
        """The whole body. The buffer is drained as the body arrives, so reading from the socket
        never pauses here; `max_response_bytes` bounds what is kept."""
        parts: list[bytes] = []
        while True:
            if self._chunks:
                parts.append(self._take())
            if self._error is not None:
                raise self._error
            if self._complete:
                return b"".join(parts) if len(parts) != 1 else parts[0]
            await self._wait()

    async def parts(self, map_error: Callable[[HTTPClientError], Exception] | None = None) -> AsyncIterator[bytes]:
        """The body as it arrives, a piece per network read (or what is buffered since);
        everything that arrived before a failure is given before the failure is raised."""
        while True:
            if self._chunks:
                yield self._take()
                continue
            if self._complete:
                return
            if self._error is not None:
                raise self._error if map_error is None else map_error(self._error) from None
            await self._wait()

    async def lines(self, map_error: Callable[[HTTPClientError], Exception] | None = None) -> AsyncIterator[bytes]:
        """The body's lines (ending in b"\\n", the last one may not) as they arrive, for
        line-delimited bodies (NDJSON); SSE is parsed from `parts` (`keel.providers.sse`)."""
        partial = b""
        async for data in self.parts(map_error):
            if partial:
                data = partial + data
            end = data.rfind(b"\n")
            if end == -1:
                partial = data
                continue
            partial = data[end + 1:]
            for line in data[:end + 1].splitlines(keepends=True):
                yield line
        if partial:
            yield partial

    def __del__(self) -> None:
        # Dropped unread and unreleased (a stream that was never started): its slot is not lost.
        # The garbage collector may run this in any thread (the request log's writer, say), so
        # the close is handed to the connection's event loop.
        connection = self._connection
        if connection is not None:
            self._connection = None
            try:
                connection.loop.call_soon_threadsafe(connection.abandon)
            except RuntimeError:  # the loop is closed: nothing is left to give back
                pass

    async def text(self) -> str:
        return (await self.read()).decode("utf-8", "replace")

    def release(self) -> None:
        """Done with the answer: a fully read keep-alive connection goes back to the pool."""
        connection, self._connection = self._connection, None
        if connection is None:
            return
        connection.pool._slots.release()
        if self._error is not None:
            connection.done(reusable=False)
        elif self._complete:
            connection.done(reusable=True)
        else:  # the rest of the body is on its way (after a stream's [DONE]): read and dropped
            self._chunks.clear()
            self._buffered = 0
            connection.linger()

    def close(self) -> None:
        """Done with the answer, read or not: its connection is closed."""
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.pool._slots.release()
            connection.done(reusable=False)


class _Connection(asyncio.Protocol):
    """One keep-alive connection carrying one request at a time."""

    def __init__(self, pool: UpstreamClient) -> None:
        self.pool = pool
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        # Weak: an answer its reader dropped unreleased is collected, and gives its slot back.
        self._response: weakref.ref[Response] | None = None
        self._held: Response | None = None  # a released answer whose body is still arriving
        self.headers_done: asyncio.Future[None] | None = None
        self.received = False  # any byte of the current answer
        self.keep_alive = False
        self.informational = False  # parsing a 1xx answer
        self.in_trailers = False  # the final answer's headers are done: what follows a chunked body is trailers
        self.closed = False
        self.paused = False
        self.idle_since = 0.0
        self._linger: asyncio.TimerHandle | None = None
        self.tunnel: asyncio.StreamWriter | None = None  # through a proxy's CONNECT

    @property
    def response(self) -> Response | None:
        return None if self._response is None else self._response()

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.response is None:  # bytes nobody asked for: the connection cannot be trusted
            self._drop()
            return
        self.received = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._error(ProtocolError(f"the upstream's answer is not valid HTTP: {exc}"))
            self._drop()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool._forget(self)
        response = self.response
        if response is None:
            return
        if self.headers_done is not None and self.headers_done.done() and self._reads_until_close():
            response._finish()  # an HTTP/1.0-style body: the end of the connection ends it
            return
        if self._linger is not None:
            self.done(reusable=False)
            return
        reason = f": {exc}" if exc else ""
        self._error(ConnectionLost(f"the connection closed before the answer was complete{reason}",
                                   answered=self.received))

    # -- httptools callbacks

    def on_header(self, name: bytes, value: bytes) -> None:
        assert self.response is not None
        if self.in_trailers:  # a chunked body's trailers: not the answer's headers
            return
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        headers = self.response.headers
        headers[key] = f"{headers[key]}, {text}" if key in headers else text

    def on_headers_complete(self) -> None:
        response = self.response
        assert response is not None
        status = self.parser.get_status_code()
        if status < 200:  # 1xx (103 Early Hints, an unasked-for 100): the real answer follows
            self.informational = True
            response.headers.clear()
            return
        response.status = status
        self.in_trailers = True
        self.keep_alive = self.parser.should_keep_alive()  # read here: the parser forgets at the message's end
        length = response.headers.get("content-length", "")
        if length.isdigit() and int(length) > self.pool.max_response_bytes and not response._decoder:
            response._too_large()  # known from the head: not a byte of the body is read
        encoding = response.headers.get("content-encoding", "").strip().lower()
        if encoding in ("gzip", "x-gzip"):
            response._decoder = zlib.decompressobj(16 + zlib.MAX_WBITS)
        elif encoding == "deflate":
            response._decoder = zlib.decompressobj()
        elif encoding not in ("", "identity"):
            response._fail(ProtocolError(f"the answer's content-encoding {encoding!r} is not supported"))
        if self.headers_done is not None and not self.headers_done.done():
            self.headers_done.set_result(None)

    def on_body(self, body: bytes) -> None:
        assert self.response is not None
        self.response._feed(body)

    def on_message_complete(self) -> None:
        assert self.response is not None
        if self.informational:
            self.informational = False
            return
        self.response._finish()
        if self._linger is not None:
            self.done(reusable=True)

    # -- the client's side

    def send(self, head: bytes, body: bytes) -> Response:
        assert self.transport is not None
        response = Response(self)
        self._response = weakref.ref(response)
        self.headers_done = asyncio.get_running_loop().create_future()
        self.received = False
        self.keep_alive = False
        self.in_trailers = False
        self.transport.write(head + body if len(body) < 16384 else head)
        if len(body) >= 16384:
            self.transport.write(body)
        return response

    def dropped_by_server(self) -> bool:
        """An idle keep-alive connection the server has closed (its FIN is readable) or written to
        unasked: either way it cannot carry a request. One poll(2) with no wait."""
        if self.closed or self.transport is None or self.transport.is_closing():
            return True
        sock = self.transport.get_extra_info("socket")
        if sock is None:
            return False
        poller = select.poll()
        poller.register(sock.fileno(), select.POLLIN)
        return bool(poller.poll(0))

    def pause(self) -> None:
        if not self.paused and self.transport is not None and not self.closed:
            self.paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self.paused and self.transport is not None and not self.closed:
            self.paused = False
            self.transport.resume_reading()

    def abandon(self) -> None:
        """Its answer was dropped unreleased: the slot comes back and the connection is dropped."""
        self.pool._slots.release()
        self.done(reusable=False)

    def linger(self) -> None:
        """Released before its body ended: back to the pool when it ends, dropped if it takes long."""
        self.resume()
        self._held = self.response
        self._linger = asyncio.get_running_loop().call_later(LINGER_S, self.done, False)

    def done(self, reusable: bool) -> None:
        """Nobody reads the current answer any more: the connection is reused or dropped."""
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None
        self._response, self._held, self.headers_done = None, None, None
        if reusable and not self.closed and self.keep_alive:
            self.resume()
            self.parser = httptools.HttpResponseParser(self)
            self.idle_since = time.monotonic()
            self.pool._put_back(self)
        else:
            self._drop()
            self.pool._forget(self)

    def _error(self, error: HTTPClientError) -> None:
        if self.headers_done is not None and not self.headers_done.done():
            self.headers_done.set_exception(error)
        elif self.response is not None:
            self.response._fail(error)

    def _reads_until_close(self) -> bool:
        response = self.response
        if response is None or response._complete:
            return False
        headers = response.headers
        return "content-length" not in headers and "chunked" not in headers.get("transfer-encoding", "").lower()

    def _drop(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


FROM_ENVIRONMENT: str | None = "from the environment"  # HTTPS_PROXY, HTTP_PROXY, ALL_PROXY, NO_PROXY


def proxy_for(scheme: str, host: str) -> str | None:
    """The proxy the environment names for this scheme and host (as curl and httpx read it);
    none for a loopback host, as Go's HTTP client does: a local upstream is never proxied."""
    proxies = urllib.request.getproxies_environment()
    if not proxies or _loopback(host) or urllib.request.proxy_bypass_environment(  # type: ignore[attr-defined]
            host, proxies):
        return None
    return proxies.get(scheme) or proxies.get("all")


def proxy_variable(scheme: str) -> str:
    """The environment variable a proxy for `scheme` was read from, as the user spelled it."""
    for name in (f"{scheme}_proxy", "all_proxy"):
        for spelling in (name, name.upper()):
            if os.environ.get(spelling):
                return spelling
    return f"{scheme.upper()}_PROXY"


def _loopback(host: str) -> bool:
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class Proxy:
    host: str
    port: int
    authorization: str | None = None  # Proxy-Authorization, from user:password in its URL

    @classmethod
    def parse(cls, url: str | None) -> Proxy | None:
        if not url:
            return None
        parts = urlsplit(url if "://" in url else "http://" + url)
        if parts.scheme != "http" or not parts.hostname:
            shown = parts._replace(netloc=parts.hostname or "").geturl() if parts.password else url
            raise ProxyNotSupported(
                f"the proxy {shown!r} is not supported: Keel's upstream client uses http://HOST:PORT proxies "
                "(https upstreams go through them in a CONNECT tunnel); name an http:// proxy, or put the "
                "upstream's host in NO_PROXY")
        authorization = None
        if parts.username is not None:
            credentials = f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()
            authorization = "Basic " + base64.b64encode(credentials).decode()
        return cls(parts.hostname, parts.port or 80, authorization)


class UpstreamClient:
    """POSTs to one base URL over a pool of keep-alive connections (through a proxy when the
    environment names one: HTTPS_PROXY / HTTP_PROXY, NO_PROXY honoured)."""

    def __init__(
        self, base_url: str, headers: Mapping[str, str] | None = None, *, max_connections: int = 256,
        connect_timeout: float = 10.0, idle_timeout: float = 15.0, ssl_context: ssl.SSLContext | None = None,
        proxy: str | None = FROM_ENVIRONMENT, max_response_bytes: int = MAX_RESPONSE_BYTES,
    ) -> None:
        url = urlsplit(base_url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"base_url must be http:// or https:// with a host, got {base_url!r}")
        self.host = url.hostname
        self.port = url.port or (443 if url.scheme == "https" else 80)
        self.base_path = url.path.rstrip("/")
        if proxy is FROM_ENVIRONMENT:
            try:
                self.proxy = Proxy.parse(proxy_for(url.scheme, self.host))
            except ProxyNotSupported as exc:
                raise ProxyNotSupported(f"{proxy_variable(url.scheme)} names {exc}") from None
        else:
            self.proxy = Proxy.parse(proxy)
        self.ssl: ssl.SSLContext | None = None
        if url.scheme == "https":
            if ssl_context is None:
                ssl_context = ssl.create_default_context()
                ssl_context.set_alpn_protocols(["http/1.1"])  # a server offering h2 knows at once: HTTP/1.1 here
            self.ssl = ssl_context
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout
        default_port = self.port == (443 if self.ssl else 80)
        literal = f"[{self.host}]" if ":" in self.host else self.host  # an IPv6 literal goes in brackets
        host = literal if default_port else f"{literal}:{self.port}"
        self.authority = f"{literal}:{self.port}"  # as messages and CONNECT name it
        self.max_response_bytes = max_response_bytes
        lines = [f"Host: {host}", "Accept-Encoding: gzip, deflate", "Connection: keep-alive"]
        # Through a proxy, a plain-HTTP request names the whole URL; an HTTPS one goes through a
        # CONNECT tunnel and looks as it would directly.
        self._target = f"http://{host}" if self.proxy is not None and self.ssl is None else ""
        if self._target and self.proxy is not None and self.proxy.authorization:
            lines.append(f"Proxy-Authorization: {self.proxy.authorization}")
        sent = {"host", "accept-encoding", "connection", "content-length", "transfer-encoding"}
        lines += [f"{name}: {value}" for name, value in (headers or {}).items() if name.lower() not in sent]
        for line in lines:
            if "\r" in line or "\n" in line:
                raise ValueError(f"header {line.split(':', 1)[0]!r} has a line break in its value")
        self._head_rest = ("\r\n".join(lines) + "\r\nContent-Length: ").encode("latin-1")
        self._idle: list[_Connection] = []
        self._all: set[_Connection] = set()
        self._slots = asyncio.Semaphore(max_connections)
        self._closed = False

    def url(self, path: str) -> str:
        scheme = "https" if self.ssl else "http"
        return f"{scheme}://{self.authority}{self.base_path}{path}"

    async def post(self, path: str, body: bytes) -> Response:
        """Send `body` (JSON) and wait for the answer's status and headers."""
        if self._closed:
            raise ConnectFailed("the client is closed")
        head = b"POST %s HTTP/1.1\r\n%s%d\r\n\r\n" % (
            (self._target + self.base_path + path).encode(), self._head_rest, len(body))
        await self._slots.acquire()
        try:
            connection, reused = await self._connection()
        except BaseException:
            self._slots.release()
            raise
        response = connection.send(head, body)  # from here the answer holds the slot
        try:
            assert connection.headers_done is not None
            await connection.headers_done
        except ConnectionLost as exc:
            response.close()
            if reused and not exc.answered:
                raise ConnectionLost(
                    f"{exc} (a pooled keep-alive connection: the server may have closed it as it was reused)",
                    reused=True) from None
            raise
        except BaseException:
            response.close()
            raise
        return response

    async def close(self) -> None:
        self._closed = True
        for connection in list(self._all):
            connection._drop()
        self._idle.clear()
        self._all.clear()

    async def _connection(self) -> tuple[_Connection, bool]:
        now = time.monotonic()
        while self._idle:
            connection = self._idle.pop()
            if now - connection.idle_since < self.idle_timeout and not connection.dropped_by_server():
                return connection, True
            connection._drop()
            self._all.discard(connection)
        via = f" through the proxy {self.proxy.host}:{self.proxy.port}" if self.proxy else ""
        try:
            async with asyncio.timeout(self.connect_timeout):
                protocol = await self._connect()
        except TimeoutError:
            raise ConnectFailed(
                f"no connection to {self.authority}{via} within {self.connect_timeout:g} s") from None
        except (OSError, ssl.SSLError, EOFError, asyncio.LimitOverrunError) as exc:
            reason = str(exc) or type(exc).__name__
            raise ConnectFailed(f"cannot connect to {self.authority}{via}: {reason}") from None
        self._all.add(protocol)
        return protocol, False

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        proxy = self.proxy
        if proxy is None:
            _, protocol = await loop.create_connection(
                lambda: _Connection(self), self.host, self.port, ssl=self.ssl,
                server_hostname=self.host if self.ssl else None,
            )
            return protocol
        if self.ssl is None:  # plain HTTP: the proxy forwards each request
            _, protocol = await loop.create_connection(lambda: _Connection(self), proxy.host, proxy.port)
            return protocol
        reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
        try:
            authority = self.authority
            auth = f"Proxy-Authorization: {proxy.authorization}\r\n" if proxy.authorization else ""
            writer.write(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n{auth}\r\n".encode("latin-1"))
            answer = await reader.readuntil(b"\r\n\r\n")
            status = answer.split(b" ", 2)[1] if answer.count(b" ") >= 1 else b""
            if status != b"200":
                line = answer.split(b"\r\n", 1)[0].decode("latin-1", "replace")
                raise ConnectFailed(f"the proxy {proxy.host}:{proxy.port} refused the tunnel: {line}")
            protocol = _Connection(self)
            tls = await loop.start_tls(writer.transport, protocol, self.ssl,
                                       server_hostname=self.host)
        except BaseException:
            writer.close()
            raise
        assert tls is not None
        protocol.tunnel = writer  # the tunnel's own writer lives as long as the connection
        protocol.connection_made(tls)
        return protocol

    def _put_back(self, connection: _Connection) -> None:
        if self._closed:
            connection._drop()
        else:
            self._idle.append(connection)

    def _forget(self, connection: _Connection) -> None:
        self._all.discard(connection)
        if connection in self._idle:
            self._idle.remove(connection)
