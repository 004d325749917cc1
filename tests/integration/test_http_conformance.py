"""Conformance: Keel's upstream client against servers Keel did not write, differentially.

Each cell sends one case's POST to one server with Keel's `UpstreamClient` and with aiohttp's
client, and compares what each got: the status, the headers that matter, the body (decoded; by
hash when big), the events of a stream. Cells are "same" (as aiohttp), "clear error" (both fail
with their own typed error, or Keel fails by a documented choice), or "DIFFERS", which fails.
The matrix is printed at the end of the run (a terminal summary, shown with -q).

Documented choices (docs/providers.md, the client's docstring): a 3xx is returned, not followed
(aiohttp is asked with allow_redirects=False); an answer past `max_response_bytes` is
`ResponseTooLarge`; chunked trailers are not headers; a server closing mid-body is
`ConnectionLost`; a request lost on a reused keep-alive connection is `ConnectionLost(reused=True)`
and not sent again by the client (the reliability stage retries it, and so does a cell, once).

The servers (conformance_servers.py) start once for the module; one Keel client and one aiohttp
session per server serve all its cases, so keep-alive connections are reused, and closed under
the client by nginx (`keepalive_requests 2`, `keepalive_timeout 1s`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import shutil
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from importlib.util import find_spec
from typing import Any

import aiohttp
import psutil
import pytest
import pytest_asyncio
from conformance_servers import (
    RawWriter,
    ServerProcess,
    aiohttp_server,
    hypercorn,
    make_certificate,
    nginx,
    nginx_binary,
    raw_answer,
    route,
    uvicorn,
)
from conftest import free_port, require_service
from test_http_client import LocalServer

from keel.providers.http_client import ConnectionLost, HTTPClientError, ResponseTooLarge, UpstreamClient
from keel.providers.sse import read_events

pytestmark = pytest.mark.asyncio(loop_scope="module")

TIMEOUT_S = float(os.environ.get("KEEL_CONFORMANCE_TIMEOUT_S", "30"))  # a hang is a failure, not a stuck suite
KiB, MiB = 1024, 1024 * 1024
REQUEST = b'{"model": "m", "input": "conformance"}'
HEADERS_COMPARED = ("content-type", "content-length", "content-encoding", "transfer-encoding", "location",
                    "x-checksum")
BURST, BURST_LIMIT = 1000, 32
CAP = 1 * MiB

SERVERS = ["uvicorn-h11", "uvicorn-httptools", "hypercorn", "aiohttp", "nginx", "nginx-close", "nginx-tls", "raw"]
TLS = {"hypercorn", "nginx-tls"}
# An ASGI app cannot send a 1xx; nginx does not pass an upstream's on (it sends nothing at all and
# waits, up to its proxy_read_timeout).
WRITES_1XX = {"aiohttp", "raw"}
KEEPALIVE_1S = {"nginx", "nginx-tls"}  # keepalive_timeout 1s: an idle pooled connection is closed under the client


@dataclass(frozen=True)
class Case:
    name: str
    path: str
    how: str = "read"  # read | events | drip | idle | cap | alpn | burst
    servers: frozenset[str] | None = None  # the servers that can produce it (the others are n/a)


def sized(kind: str, label: str, size: int, servers: frozenset[str] | None = None) -> Case:
    return Case(f"{kind} {label}", f"/v1/{kind}/{size}", servers=servers)


SIZES = [("0 B", 0), ("1 B", 1), ("255 KiB", 255 * KiB), ("257 KiB", 257 * KiB), ("16 MiB", 16 * MiB)]
RAW_ONLY = frozenset({"raw"})
CASES = [
    *(sized("body", label, size) for label, size in SIZES),
    *(sized("chunked", label, size) for label, size in SIZES),
    sized("until-close", "257 KiB", 257 * KiB, servers=RAW_ONLY),
    sized("until-close", "16 MiB", 16 * MiB, servers=RAW_ONLY),
    sized("gzip", "257 KiB", 257 * KiB),
    Case("sse", "/v1/sse", "events"),
    Case("drip 1 B / 100 ms", "/v1/drip", "drip"),
    Case("closes mid-body", "/v1/cut/65536"),
    Case("closes mid-chunked", "/v1/cut-chunked/65536"),
    Case("307 + Location", "/v1/redirect"),
    Case("100 Continue unasked", "/v1/continue", servers=frozenset(WRITES_1XX)),
    Case("chunked trailers", "/v1/trailers", servers=RAW_ONLY),
    Case("reused after 1.5 s idle", "/v1/body/1", "idle", frozenset(KEEPALIVE_1S)),
    Case("over the cap (1 MiB)", f"/v1/body/{16 * MiB}", "cap"),
    Case("chunked over the cap", f"/v1/chunked/{16 * MiB}", "cap"),
    Case("TLS: HTTP/1.1 by ALPN", "/v1/body/1", "alpn", frozenset(TLS)),
    Case(f"burst {BURST:,} / {BURST_LIMIT} conns", "/v1/burst", "burst"),
]


def cell_id(case: Case) -> str:
    return "-".join(case.name.replace("/", "").replace(",", "").replace(":", "").split())


PARAMS = [pytest.param(case, server, id=f"{server}-{cell_id(case)}")
          for server in SERVERS for case in CASES if case.servers is None or server in case.servers]


# -- the matrix, printed in the terminal summary

@dataclass
class MatrixReport:
    cells: dict[tuple[str, str], str] = field(default_factory=dict)
    notes: dict[tuple[str, str], list[str]] = field(default_factory=dict)  # (case, note) -> servers

    def record(self, case: Case, server: str, cell: str, note: str = "") -> None:
        self.cells[case.name, server] = cell
        if note:
            self.notes.setdefault((case.name, note), []).append(server)

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if not self.cells:
            return
        write = terminalreporter.write_line
        terminalreporter.section("HTTP conformance: Keel's client against aiohttp's, per server")
        width = max(len(case.name) for case in CASES) + 2
        columns = [max(len(server), 11) + 2 for server in SERVERS]
        write("case".ljust(width) + "".join(s.ljust(w) for s, w in zip(SERVERS, columns, strict=True)))
        for case in CASES:
            row = [self.cells.get((case.name, server), "n/a" if case.servers and server not in case.servers
                                  else "-") for server in SERVERS]
            write(case.name.ljust(width) + "".join(c.ljust(w) for c, w in zip(row, columns, strict=True)))
        write("same = same as aiohttp's client; clear error = both fail with a typed error, or Keel fails "
              "by a documented choice; n/a = not for this server (the raw server sends what the others cannot); "
              "- = not run")
        for (case_name, note), servers in self.notes.items():
            write(f"  {case_name} ({', '.join(servers)}): {note}")


REPORT = MatrixReport()


@pytest.fixture(scope="module", autouse=True)
def _matrix_in_the_summary(request: pytest.FixtureRequest) -> None:
    manager = request.config.pluginmanager
    if not manager.is_registered(REPORT):
        manager.register(REPORT, "keel-http-conformance")


# -- the servers

@dataclass
class Endpoint:
    name: str
    base_url: str  # scheme://host:port
    ssl: ssl.SSLContext | None = None
    missing: str | None = None  # why it cannot run: skipped locally, a failure in CI
    port: int = 0
    ssl_cafile: str | None = None  # the test certificate `ssl` trusts


@pytest.fixture(scope="module")
def endpoints(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Endpoint]]:
    """Every server but the raw one, started in parallel, stopped at the module's end."""
    if shutil.which("openssl") is None:
        require_service("openssl", "the openssl command is not on PATH (it makes the test certificates)")
    folder = tmp_path_factory.mktemp("conformance")
    certificates = {"localhost": make_certificate(folder, "localhost"),
                    "other": make_certificate(folder, "other.invalid")}
    cafile = str(certificates["localhost"][0])
    tls = ssl.create_default_context(cafile=cafile)
    found: dict[str, Endpoint] = {}
    processes: list[ServerProcess] = []

    def serve(name: str, process: ServerProcess | None, scheme: str = "http", missing: str | None = None) -> None:
        host = "localhost" if scheme == "https" else "127.0.0.1"  # a name, so that SNI is sent
        port = process.port if process is not None else 0
        https = scheme == "https"
        found[name] = Endpoint(name, f"{scheme}://{host}:{port}", tls if https else None, missing, port,
                               cafile if https else None)
        if process is not None:
            processes.append(process.start())

    serve("uvicorn-h11", uvicorn("h11", free_port(), folder))
    serve("uvicorn-httptools", uvicorn("httptools", free_port(), folder))
    if find_spec("hypercorn") is None:
        serve("hypercorn", None, missing="hypercorn is not installed (the dev extra: make install-dev)")
    else:
        serve("hypercorn", hypercorn(free_port(), *certificates["localhost"], folder), "https")
    upstream = aiohttp_server(free_port(), folder)
    serve("aiohttp", upstream)
    if nginx_binary() is None:
        for name in ("nginx", "nginx-close", "nginx-tls"):
            serve(name, None, missing="the nginx command is missing (make services installs Debian's)")
    else:
        ports = {name: free_port() for name in ("nginx", "nginx-close", "nginx-tls")}
        proxy = nginx(upstream.port, ports, certificates, folder / "nginx")
        serve("nginx", proxy)
        found["nginx-close"] = Endpoint("nginx-close", f"http://127.0.0.1:{ports['nginx-close']}",
                                        port=ports["nginx-close"])
        found["nginx-tls"] = Endpoint("nginx-tls", f"https://localhost:{ports['nginx-tls']}", tls,
                                      port=ports["nginx-tls"], ssl_cafile=cafile)
    try:
        for process in processes:
            process.wait_ready()
        yield found
    finally:
        for process in reversed(processes):  # nginx before its upstream
            process.stop()


class RawConformanceServer(LocalServer):
    """The answers no framework writes (conformance_servers.raw_answer), on the shared local-server base."""

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        out = RawWriter(writer)
        try:
            while True:
                request = await reader.readuntil(b"\r\n\r\n")
                lines = request.decode("latin-1").split("\r\n")
                length = next((int(line.split(":", 1)[1]) for line in lines
                               if line.lower().startswith("content-length:")), 0)
                await reader.readexactly(length)
                if not await raw_answer(*route(lines[0].split(" ")[1]), out):
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def raw_server() -> AsyncIterator[Endpoint]:
    async with RawConformanceServer() as server:
        yield Endpoint("raw", f"http://127.0.0.1:{server.port}", port=server.port)


class Clients:
    """One Keel client and one aiohttp session per server, for all its cases."""

    def __init__(self) -> None:
        self.keel: dict[str, UpstreamClient] = {}
        self.aiohttp: dict[str, aiohttp.ClientSession] = {}

    def pair(self, endpoint: Endpoint) -> tuple[UpstreamClient, aiohttp.ClientSession]:
        if endpoint.name not in self.keel:
            self.keel[endpoint.name] = keel_client(endpoint)
            self.aiohttp[endpoint.name] = aiohttp_session(endpoint)
        return self.keel[endpoint.name], self.aiohttp[endpoint.name]

    async def close(self) -> None:
        for client in self.keel.values():
            await client.close()
        for session in self.aiohttp.values():
            await session.close()


def keel_client(endpoint: Endpoint, **options: Any) -> UpstreamClient:
    return UpstreamClient(endpoint.base_url, {"content-type": "application/json"}, ssl_context=endpoint.ssl,
                          proxy=None, **options)


def aiohttp_session(endpoint: Endpoint, limit: int = 100) -> aiohttp.ClientSession:
    # The same Accept-Encoding as Keel's client (aiohttp would add br when brotli is installed).
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=limit, ssl=endpoint.ssl if endpoint.ssl is not None else True),
        headers={"Accept-Encoding": "gzip, deflate", "Content-Type": "application/json"})


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def clients() -> AsyncIterator[Clients]:
    made = Clients()
    yield made
    await made.close()


# -- what each client got

@dataclass
class Answer:
    status: int
    headers: dict[str, str | None]
    body: str  # length and hash
    events: list[tuple[str | None, bytes]] | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # compared too
    shown: dict[str, Any] = field(default_factory=dict)  # in the notes, not compared


class Hang(Exception):
    """No answer within TIMEOUT_S."""


def digest(body: bytes) -> str:
    return f"{len(body):,} B sha256:{hashlib.sha256(body).hexdigest()[:12]}"


def headers_of(headers: Any, getall: Callable[[str, list[str]], list[str]] | None = None) -> dict[str, str | None]:
    """The headers compared; aiohttp's repeated ones joined with ", ", as Keel's client joins them."""
    if getall is None:
        return {name: headers.get(name) for name in HEADERS_COMPARED}
    return {name: ", ".join(getall(name, [])) or None for name in HEADERS_COMPARED}


async def keel_answer(client: UpstreamClient, case: Case) -> Answer:
    response = await client.post(case.path, REQUEST)
    try:
        answer = Answer(response.status, headers_of(response.headers), "")
        if case.how == "events":
            answer.events = [(e.event, e.data) async for e in read_events(response.parts())]
        elif case.how == "drip":
            answer.body, answer.extra["streamed"] = await timed(response.parts())
        else:
            answer.body = digest(await response.read())
        return answer
    except BaseException:
        response.close()
        raise
    finally:
        response.release()


async def aiohttp_answer(session: aiohttp.ClientSession, endpoint: Endpoint, case: Case) -> Answer:
    async with session.post(endpoint.base_url + case.path, data=REQUEST, allow_redirects=False) as response:
        answer = Answer(response.status, headers_of(response.headers, response.headers.getall), "")
        if case.how == "events":
            answer.events = [(e.event, e.data) async for e in read_events(response.content.iter_any())]
        elif case.how == "drip":
            answer.body, answer.extra["streamed"] = await timed(response.content.iter_any())
        else:
            answer.body = digest(await response.read())
        return answer


async def timed(parts: AsyncIterator[bytes]) -> tuple[str, bool]:
    """The body, and whether it came as it was sent (the first byte well before the last)."""
    got, first = b"", 0.0
    async for part in parts:
        if not got:
            first = time.monotonic()
        got += part
    return digest(got), time.monotonic() - first > 0.2


async def attempt(side: Callable[[], Awaitable[Answer]]) -> Answer | Exception:
    try:
        async with asyncio.timeout(TIMEOUT_S):
            return await side()
    except TimeoutError:
        return Hang(f"no complete answer within {TIMEOUT_S:g} s")
    except Exception as exc:
        return exc


def lost_on_a_reused_connection(outcome: Answer | Exception) -> bool:
    """The documented race of keep-alive: the server closed a pooled connection as it was reused.
    Neither client sends a POST twice; the reliability stage (or the caller) does, and so does a cell."""
    if isinstance(outcome, ConnectionLost):
        return bool(getattr(outcome, "reused", False))
    return isinstance(outcome, aiohttp.ServerDisconnectedError)


# -- the burst: the pool's limit

def connections_of_this_process() -> list[Any]:
    process = psutil.Process()
    return list(getattr(process, "net_connections", process.connections)("tcp"))  # psutil < 6: connections


async def sockets_to(port: int, exclude: set[int]) -> int:
    """Open TCP connections of this process to `port`, those of `exclude` (local ports) aside."""
    def count() -> int:
        return sum(1 for c in connections_of_this_process()
                   if c.raddr and c.raddr.port == port and c.laddr.port not in exclude
                   and c.status in (psutil.CONN_ESTABLISHED, psutil.CONN_SYN_SENT))
    return await asyncio.to_thread(count)


@contextlib.asynccontextmanager
async def peak_sockets(port: int, peak: list[int], inside: Callable[[], int] | None = None) -> AsyncIterator[None]:
    """Samples this process's connections to `port` (every 10 ms, and `inside()` as often) while in the block."""
    exclude = {c.laddr.port for c in connections_of_this_process() if c.raddr and c.raddr.port == port}

    async def sample() -> None:
        while True:
            peak[0] = max(peak[0], await sockets_to(port, exclude), inside() if inside else 0)
            await asyncio.sleep(0.01)

    sampler = asyncio.create_task(sample())
    try:
        yield
    finally:
        sampler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampler


async def keel_burst(endpoint: Endpoint, case: Case) -> Answer:
    client = keel_client(endpoint, max_connections=BURST_LIMIT)
    peak = [0]

    def pooled() -> int:  # the client's own count: connections open in its pool, in use or idle
        return sum(1 for c in getattr(client, "_all", ()) if not c.closed)

    async def one() -> tuple[int, bytes]:
        response = await client.post(case.path, REQUEST)
        try:
            peak[0] = max(peak[0], pooled())
            return response.status, await response.read()
        finally:
            response.release()

    started = time.monotonic()
    try:
        async with peak_sockets(endpoint.port, peak, pooled):
            results = await asyncio.gather(*(one() for _ in range(BURST)), return_exceptions=True)
    finally:
        await client.close()
    return burst_answer(results, peak[0], time.monotonic() - started)


async def aiohttp_burst(endpoint: Endpoint, case: Case) -> Answer:
    session = aiohttp_session(endpoint, limit=BURST_LIMIT)
    peak = [0]

    async def one() -> tuple[int, bytes]:
        async with session.post(endpoint.base_url + case.path, data=REQUEST) as response:
            return response.status, await response.read()

    started = time.monotonic()
    try:
        async with peak_sockets(endpoint.port, peak):
            results = await asyncio.gather(*(one() for _ in range(BURST)), return_exceptions=True)
    finally:
        await session.close()
    return burst_answer(results, peak[0], time.monotonic() - started)


def burst_answer(results: list[tuple[int, bytes] | BaseException], peak: int, seconds: float) -> Answer:
    answers = [r for r in results if not isinstance(r, BaseException)]
    errors = sorted({f"{type(r).__name__}: {r}" for r in results if isinstance(r, BaseException)})
    statuses = sorted({status for status, _ in answers})
    bodies = sorted({digest(body) for _, body in answers})
    answer = Answer(statuses[0] if len(statuses) == 1 else 0, {}, " | ".join(bodies))
    answer.extra = {"answered": len(answers), "errors": errors[:3], "within the limit": peak <= BURST_LIMIT}
    answer.shown = {"peak": peak, "seconds": seconds}
    return answer


# -- TLS: what was negotiated

async def with_alpn(endpoint: Endpoint, case: Case, which: str) -> Answer:
    """The answer through a new client whose TLS connections are recorded, with the protocol each
    settled on by ALPN (None: the client offered none, and the server speaks HTTP/1.1)."""
    assert endpoint.ssl is not None
    context = ssl.create_default_context(cafile=endpoint.ssl_cafile)
    seen: dict[int, ssl.SSLObject] = {}

    class Recorded(ssl.SSLObject):
        def do_handshake(self) -> None:
            seen[id(self)] = self
            super().do_handshake()

    context.sslobject_class = Recorded
    recorded = Endpoint(endpoint.name, endpoint.base_url, context, port=endpoint.port)
    if which == "keel":
        client = keel_client(recorded)
        try:
            answer = await keel_answer(client, case)
        finally:
            await client.close()
    else:
        async with aiohttp_session(recorded) as session:
            answer = await aiohttp_answer(session, recorded, case)
    answer.extra["alpn"] = sorted({str(tls.selected_alpn_protocol()) for tls in seen.values()})
    answer.extra["tls"] = sorted({str(tls.version()) for tls in seen.values()})
    return answer


async def alpn_when_h2_is_offered(endpoint: Endpoint) -> str | None:
    context = ssl.create_default_context(cafile=endpoint.ssl_cafile)
    context.set_alpn_protocols(["h2", "http/1.1"])
    _, writer = await asyncio.open_connection("localhost", endpoint.port, ssl=context)
    try:
        return str(writer.get_extra_info("ssl_object").selected_alpn_protocol())
    finally:
        writer.close()


# -- one cell

async def run_sides(case: Case, endpoint: Endpoint, clients: Clients) -> tuple[Answer | Exception,
                                                                              Answer | Exception, list[str]]:
    notes: list[str] = []
    if case.how == "burst":
        return (await attempt(lambda: keel_burst(endpoint, case)),
                await attempt(lambda: aiohttp_burst(endpoint, case)), notes)
    if case.how == "alpn":
        offered = await alpn_when_h2_is_offered(endpoint)
        assert offered == "h2", f"{endpoint.name} should offer HTTP/2 by ALPN (the case would prove nothing)"
        notes.append("the server picks h2 when a client offers it")
        return (await attempt(lambda: with_alpn(endpoint, case, "keel")),
                await attempt(lambda: with_alpn(endpoint, case, "aiohttp")), notes)
    keel, session = clients.pair(endpoint)
    cap: UpstreamClient | None = None
    if case.how == "cap":
        keel = cap = keel_client(endpoint, max_response_bytes=CAP)
    elif case.how == "idle":  # a pooled connection each, then left idle past nginx's keepalive_timeout (1 s)
        warmed = await asyncio.gather(attempt(lambda: keel_answer(keel, case)),
                                      attempt(lambda: aiohttp_answer(session, endpoint, case)))
        for name, warm in zip(("Keel", "aiohttp"), warmed, strict=True):
            if isinstance(warm, Exception):
                notes.append(f"{name}'s first request failed: {describe(warm)}")
        await asyncio.sleep(1.5)

    async def once_more_if_lost_on_reuse(name: str, side: Callable[[], Awaitable[Answer]]) -> Answer | Exception:
        outcome = await attempt(side)
        if lost_on_a_reused_connection(outcome):
            notes.append(f"{name}: {type(outcome).__name__} on a reused connection, asked once more")
            outcome = await attempt(side)
        return outcome

    try:  # both at once: the waits of the slow cases (the drip) overlap
        mine, theirs = await asyncio.gather(
            once_more_if_lost_on_reuse("Keel", lambda: keel_answer(keel, case)),
            once_more_if_lost_on_reuse("aiohttp", lambda: aiohttp_answer(session, endpoint, case)))
    finally:
        if cap is not None:
            await cap.close()
    return mine, theirs, notes


def describe(outcome: Answer | Exception) -> str:
    if isinstance(outcome, Exception):
        return f"{type(outcome).__name__}: {outcome}"
    return repr(outcome)


def differences(keel: Answer, other: Answer) -> list[str]:
    found = []
    for name in ("status", "headers", "body", "events"):
        if getattr(keel, name) != getattr(other, name):
            found.append(f"{name}: Keel {getattr(keel, name)!r}, aiohttp {getattr(other, name)!r}")
    if keel.extra != other.extra:
        found.append(f"Keel {keel.extra}, aiohttp {other.extra}")
    return found


def judge(case: Case, keel: Answer | Exception, other: Answer | Exception) -> tuple[str, str]:
    """The cell, and what explains it (empty when it is plain)."""
    if case.how == "cap":  # documented: past max_response_bytes, a clear error; aiohttp has no such cap
        if isinstance(keel, ResponseTooLarge) and isinstance(other, Answer):
            return "clear error", f"Keel {describe(keel)} (documented); aiohttp reads it all"
        return "DIFFERS", f"expected ResponseTooLarge from Keel; Keel {describe(keel)}; aiohttp {describe(other)}"
    if isinstance(keel, Answer) and isinstance(other, Answer):
        found = differences(keel, other)
        if found:
            return "DIFFERS", "; ".join(found)
        if case.how == "burst":
            peaks = (f"most connections seen open at once: Keel {keel.shown['peak']}, aiohttp {other.shown['peak']} "
                     f"(limit {BURST_LIMIT}); {keel.shown['seconds']:.1f} s and {other.shown['seconds']:.1f} s")
            if keel.extra["answered"] != BURST or not keel.extra["within the limit"]:
                return "DIFFERS", f"Keel's pool: {keel.extra['answered']} of {BURST} answered; {peaks}"
            return "same", peaks
        return "same", ""
    clear = isinstance(keel, HTTPClientError) and isinstance(other, aiohttp.ClientError)
    if case.path.startswith("/v1/cut"):  # documented: a server closing mid-body is ConnectionLost
        clear = clear and isinstance(keel, ConnectionLost)
    if clear:
        return "clear error", f"Keel {type(keel).__name__}, aiohttp {type(other).__name__}"
    return "DIFFERS", f"Keel {describe(keel)}; aiohttp {describe(other)}"


@pytest.mark.parametrize(("case", "server"), PARAMS)
async def test_keel_answers_as_aiohttp_does(case: Case, server: str, endpoints: dict[str, Endpoint],
                                            raw_server: Endpoint, clients: Clients) -> None:
    endpoint = raw_server if server == "raw" else endpoints[server]
    if endpoint.missing:
        REPORT.record(case, server, "skipped")
        require_service(server.split("-")[0], endpoint.missing)
    keel, other, notes = await run_sides(case, endpoint, clients)
    cell, why = judge(case, keel, other)
    REPORT.record(case, server, cell, "; ".join(filter(None, [*notes, why])))
    assert cell != "DIFFERS", f"{case.name} on {server}: Keel's client and aiohttp's differ: {why}"
