"""The servers of the HTTP conformance matrix (test_http_conformance.py) and the app they serve.

Every server answers the same POST paths, so one case reads the same from each of them:

    /v1/body/N          N bytes with Content-Length         /v1/chunked/N     N bytes, chunked
    /v1/gzip/N          N bytes gzipped by the app          /v1/until-close/N N bytes, then the server closes
    /v1/sse             an event stream                     /v1/drip          a few bytes, one every 100 ms
    /v1/cut/N           Content-Length N, half sent, the connection closed
    /v1/cut-chunked/N   chunked, half sent, the connection closed
    /v1/redirect        307 with Location                   /v1/continue      an unasked-for 100 Continue first
    /v1/trailers        a chunked body with trailers        /v1/burst         a small answer after 2 ms

Servers Keel did not write run it as child processes: uvicorn (h11 and httptools parsers), hypercorn
(TLS, offering HTTP/2 by ALPN), aiohttp's web server, and nginx as a reverse proxy in front of the
aiohttp one. What none of them can be made to send (an unasked 100 Continue from an ASGI app,
trailers, a body read until close) comes from `raw_answer`, served in the test's own process by a
`LocalServer` (test_http_client.py).

Run one by hand: `python tests/integration/conformance_servers.py aiohttp 9300`, or uvicorn /
hypercorn with `conformance_servers:app` and this folder on PYTHONPATH.
"""

from __future__ import annotations

import asyncio
import functools
import gzip
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
PIECE = 64 * 1024  # a chunk of a chunked answer
DRIP = b"drip!"  # one byte every 100 ms
SSE_EVENTS = 12


@functools.lru_cache(maxsize=8)
def payload(size: int) -> bytes:
    """`size` bytes, the same for a size in every process: lower-case hex of seeded random bytes
    (compresses about 2:1, so gzip neither vanishes nor inflates it)."""
    return random.Random(size).randbytes(size // 2 + 1).hex().encode()[:size]


def sse_stream() -> list[bytes]:
    """The event stream, in the pieces the server writes: names, comments, multi-line data, CRLF."""
    pieces = [b": a comment first\n\n"]
    for i in range(SSE_EVENTS):
        if i % 4 == 1:
            pieces.append(b'event: ping\ndata: {"n": %d}\n\n' % i)
        elif i % 4 == 2:
            pieces.append(b'data: {"n": %d,\ndata:  "two": "lines"}\r\n\r\n' % i)
        else:
            pieces.append(b'data: {"n": %d, "text": "%s"}\n\n' % (i, b"x" * (i * 50)))
    pieces.append(b"data: [DONE]\n\n")
    return pieces


def route(path: str) -> tuple[str, int]:
    """'/v1/body/1024' -> ('body', 1024); a path without a size gets 0."""
    parts = path.strip("/").split("/")
    kind = parts[1] if len(parts) > 1 else ""
    size = int(parts[2]) if len(parts) > 2 and parts[2].isdigit() else 0
    return kind, size


# -- the ASGI app (uvicorn, hypercorn)

Send = Callable[[dict[str, Any]], Awaitable[None]]


async def app(scope: dict[str, Any], receive: Callable[[], Awaitable[dict[str, Any]]], send: Send) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    assert scope["type"] == "http"
    while (await receive()).get("more_body"):  # the request body is read and dropped
        pass
    kind, size = route(scope["path"])

    async def start(status: int, *headers: tuple[bytes, bytes]) -> None:
        await send({"type": "http.response.start", "status": status, "headers": list(headers)})

    async def body(data: bytes, more: bool = False) -> None:
        await send({"type": "http.response.body", "body": data, "more_body": more})

    json = (b"content-type", b"application/json")
    if kind == "body":
        await start(200, json, (b"content-length", b"%d" % size))
        await body(payload(size))
    elif kind == "chunked":
        await start(200, json)
        data = payload(size)
        for at in range(0, len(data), PIECE):
            await body(data[at:at + PIECE], more=True)
        await body(b"")
    elif kind == "gzip":
        packed = gzip.compress(payload(size), compresslevel=1)
        await start(200, json, (b"content-encoding", b"gzip"), (b"content-length", b"%d" % len(packed)))
        await body(packed)
    elif kind in ("sse", "drip"):
        event_stream = kind == "sse"
        await start(200, (b"content-type", b"text/event-stream" if event_stream else b"text/plain"),
                    (b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no"))
        for piece in sse_stream() if event_stream else [DRIP[i:i + 1] for i in range(len(DRIP))]:
            await body(piece, more=True)
            await asyncio.sleep(0.005 if event_stream else 0.1)
        await body(b"")
    elif kind in ("cut", "cut-chunked"):
        await start(200, json, *([(b"content-length", b"%d" % size)] if kind == "cut" else []))
        await body(payload(size)[:size // 2], more=True)
        await asyncio.sleep(0.05)
        raise ConnectionAbortedError("closing mid-body, as the case asks")  # the server drops the connection
    elif kind == "redirect":
        await start(307, (b"location", b"/v1/body/1"), (b"content-type", b"text/plain"), (b"content-length", b"5"))
        await body(b"moved")
    elif kind == "burst":
        await asyncio.sleep(0.002)
        await start(200, json, (b"content-length", b"11"))
        await body(b'{"ok":true}')
    else:
        await start(404, (b"content-type", b"text/plain"), (b"content-length", b"9"))
        await body(b"not found")


# -- the aiohttp app (aiohttp's server; nginx's upstream)

def aiohttp_app() -> Any:
    from aiohttp import web

    async def handle(request: web.Request) -> web.StreamResponse:
        await request.read()
        kind, size = route(request.path)
        if kind == "body":
            return web.Response(body=payload(size), content_type="application/json")
        if kind == "gzip":
            return web.Response(body=gzip.compress(payload(size), compresslevel=1),
                                headers={"Content-Type": "application/json", "Content-Encoding": "gzip"})
        if kind == "redirect":
            return web.Response(status=307, body=b"moved", headers={"Location": "/v1/body/1",
                                                                     "Content-Type": "text/plain"})
        if kind == "continue":  # written before the answer, as aiohttp's own expect handler does
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            return web.Response(body=b'{"continued":true}', content_type="application/json")
        if kind == "burst":
            await asyncio.sleep(0.002)
            return web.Response(body=b'{"ok":true}', content_type="application/json")
        if kind not in ("chunked", "sse", "drip", "cut", "cut-chunked"):
            return web.Response(status=404, text="not found")
        response = web.StreamResponse()
        if kind == "cut":
            response.content_length = size
            response.content_type = "application/json"
        elif kind in ("chunked", "cut-chunked"):
            response.content_type = "application/json"
            response.enable_chunked_encoding()
        else:
            response.content_type = "text/event-stream" if kind == "sse" else "text/plain"
            response.headers.update({"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
            response.enable_chunked_encoding()
        await response.prepare(request)
        if kind == "chunked":
            data = payload(size)
            for at in range(0, len(data), PIECE):
                await response.write(data[at:at + PIECE])
        elif kind in ("cut", "cut-chunked"):
            await response.write(payload(size)[:size // 2])
            await asyncio.sleep(0.05)
            assert request.transport is not None
            request.transport.close()  # mid-body: the connection goes, the answer is never ended
            return response
        else:
            for piece in sse_stream() if kind == "sse" else [DRIP[i:i + 1] for i in range(len(DRIP))]:
                await response.write(piece)
                await asyncio.sleep(0.005 if kind == "sse" else 0.1)
        await response.write_eof()
        return response

    web_app = web.Application(client_max_size=1024 * 1024)
    web_app.router.add_route("POST", "/{tail:.*}", handle)
    return web_app


# -- child processes

class ServerProcess:
    """A server Keel did not write, in a child process with its output in a log file."""

    def __init__(self, name: str, command: list[str], port: int, log_dir: Path, *, tls: bool = False,
                 env: dict[str, str] | None = None) -> None:
        self.name, self.command, self.port, self.tls = name, command, port, tls
        self.log_path = log_dir / f"{name}.log"
        self.env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE), os.environ.get(
            "PYTHONPATH")])), **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> ServerProcess:
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                         start_new_session=True)
        return self

    def wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        assert self.proc is not None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"{self.name} did not listen on port {self.port} within {timeout:g} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:] if self.log_path.exists() else ""

    def stop(self) -> None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM if self.name != "nginx" else signal.SIGQUIT)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def uvicorn(parser: str, port: int, log_dir: Path) -> ServerProcess:
    return ServerProcess(f"uvicorn-{parser}", [
        sys.executable, "-m", "uvicorn", "conformance_servers:app", "--host", "127.0.0.1", "--port", str(port),
        "--http", parser, "--loop", "asyncio", "--log-level", "warning", "--no-access-log"], port, log_dir)


def hypercorn(port: int, cert: Path, key: Path, log_dir: Path) -> ServerProcess:
    """HTTPS, offering h2 and http/1.1 by ALPN (hypercorn's default with a certificate)."""
    return ServerProcess("hypercorn", [
        sys.executable, "-m", "hypercorn", "conformance_servers:app", "--bind", f"127.0.0.1:{port}",
        "--certfile", str(cert), "--keyfile", str(key), "--log-level", "warning"], port, log_dir, tls=True)


def aiohttp_server(port: int, log_dir: Path) -> ServerProcess:
    return ServerProcess("aiohttp", [sys.executable, str(HERE / "conformance_servers.py"), "aiohttp", str(port)],
                         port, log_dir)


NGINX = "/usr/sbin/nginx"


def nginx_binary() -> str | None:
    return shutil.which("nginx") or (NGINX if os.access(NGINX, os.X_OK) else None)


def nginx(upstream_port: int, ports: dict[str, int], certificates: dict[str, tuple[Path, Path]],
          prefix: Path) -> ServerProcess:
    """nginx in front of `upstream_port`, in a prefix of its own, on three ports:
    "nginx": gzip on, `keepalive_requests 2`, `keepalive_timeout 1s` (connections close under the client);
    "nginx-close": the same with keep-alive off, so every answer says `Connection: close`;
    "nginx-tls": the first over TLS with the localhost certificate, chosen by SNI (a client that
    sends no SNI gets the default server's certificate, for another name, and fails its check),
    offering HTTP/2 by ALPN as well."""
    binary = nginx_binary()
    assert binary is not None
    for folder in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (prefix / folder).mkdir(parents=True, exist_ok=True)
    cert, key = certificates["localhost"]
    other_cert, other_key = certificates["other"]
    proxied = """
        location / {
            proxy_pass http://fake;
        }"""
    config = f"""
{"user root;" if os.geteuid() == 0 else ""}
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;

    gzip on;
    gzip_min_length 1;
    gzip_proxied any;
    gzip_types application/json text/plain text/event-stream;
    keepalive_requests 2;
    keepalive_timeout 1s;

    upstream fake {{
        server 127.0.0.1:{upstream_port};
        keepalive 16;
    }}
    proxy_http_version 1.1;
    proxy_set_header Connection "";

    server {{
        listen 127.0.0.1:{ports["nginx"]};{proxied}
    }}
    server {{
        listen 127.0.0.1:{ports["nginx-close"]};
        keepalive_timeout 0;{proxied}
    }}
    server {{
        listen 127.0.0.1:{ports["nginx-tls"]} ssl http2 default_server;
        server_name other.invalid;
        ssl_certificate {other_cert};
        ssl_certificate_key {other_key};
        return 421;
    }}
    server {{
        listen 127.0.0.1:{ports["nginx-tls"]} ssl http2;
        server_name localhost;
        ssl_certificate {cert};
        ssl_certificate_key {key};{proxied}
    }}
}}
"""
    (prefix / "nginx.conf").write_text(config)
    return ServerProcess("nginx", [binary, "-p", str(prefix), "-e", str(prefix / "error.log"),
                                   "-c", str(prefix / "nginx.conf"), "-g", "daemon off;"],
                         ports["nginx"], prefix)


def make_certificate(folder: Path, name: str) -> tuple[Path, Path]:
    """A self-signed P-256 certificate for `name` (cheap handshakes for the burst), with the openssl command."""
    cert, key = folder / f"{name}.pem", folder / f"{name}.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-days", "1", "-subj", f"/CN={name}", "-addext", f"subjectAltName=DNS:{name}",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    return cert, key


# -- the raw server: bytes no framework sends

class RawWriter:
    """What the raw server's handlers write with."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()


def head(status: str, *headers: str) -> bytes:
    return ("\r\n".join([f"HTTP/1.1 {status}", *headers]) + "\r\n\r\n").encode("latin-1")


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


async def raw_answer(kind: str, size: int, out: RawWriter) -> bool:
    """Writes the answer for a path; False when the connection must close after it."""
    json = "Content-Type: application/json"
    if kind == "body":
        await out.send(head("200 OK", json, f"Content-Length: {size}") + payload(size))
    elif kind == "chunked":
        await out.send(head("200 OK", json, "Transfer-Encoding: chunked"))
        data = payload(size)
        for at in range(0, len(data), PIECE):
            await out.send(chunk(data[at:at + PIECE]))
        await out.send(b"0\r\n\r\n")
    elif kind == "until-close":  # no length, no chunks: the end of the connection ends the body
        await out.send(head("200 OK", json, "Connection: close") + payload(size))
        return False
    elif kind == "gzip":
        packed = gzip.compress(payload(size), compresslevel=1)
        await out.send(head("200 OK", json, "Content-Encoding: gzip", f"Content-Length: {len(packed)}") + packed)
    elif kind in ("sse", "drip"):
        await out.send(head("200 OK", "Content-Type: " + ("text/event-stream" if kind == "sse" else "text/plain"),
                            "Cache-Control: no-cache", "Transfer-Encoding: chunked"))
        for piece in sse_stream() if kind == "sse" else [DRIP[i:i + 1] for i in range(len(DRIP))]:
            await out.send(chunk(piece))
            await asyncio.sleep(0.005 if kind == "sse" else 0.1)
        await out.send(b"0\r\n\r\n")
    elif kind in ("cut", "cut-chunked"):
        framing = f"Content-Length: {size}" if kind == "cut" else "Transfer-Encoding: chunked"
        half = payload(size)[:size // 2]
        await out.send(head("200 OK", json, framing) + (half if kind == "cut" else chunk(half)))
        await asyncio.sleep(0.05)
        out.writer.transport.abort()
        return False
    elif kind == "redirect":
        await out.send(head("307 Temporary Redirect", "Location: /v1/body/1", "Content-Type: text/plain",
                            "Content-Length: 5") + b"moved")
    elif kind == "continue":
        await out.send(b"HTTP/1.1 100 Continue\r\n\r\n")
        await asyncio.sleep(0.01)
        body = b'{"continued":true}'
        await out.send(head("200 OK", json, f"Content-Length: {len(body)}") + body)
    elif kind == "trailers":
        await out.send(head("200 OK", json, "Transfer-Encoding: chunked", "Trailer: X-Checksum")
                       + chunk(b'{"part": 1, ') + chunk(b'"part": 2}') + b"0\r\nX-Checksum: abc123\r\n\r\n")
    elif kind == "burst":
        await asyncio.sleep(0.002)
        await out.send(head("200 OK", json, "Content-Length: 11") + b'{"ok":true}')
    else:
        await out.send(head("404 Not Found", "Content-Length: 0"))
    return True


if __name__ == "__main__":
    from aiohttp import web

    if sys.argv[1] != "aiohttp":
        raise SystemExit("usage: conformance_servers.py aiohttp PORT")
    web.run_app(aiohttp_app(), host="127.0.0.1", port=int(sys.argv[2]), access_log=None, print=None)
