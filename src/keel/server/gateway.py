"""The ASGI app uvicorn runs: an id for every request, and the two routes every call takes
served in plain ASGI; the rest of the API (models, health, metrics, admin) goes to FastAPI.

A chat or embeddings request is on the path of every LLM call, so it skips the framework:
no middleware stack, no routing, no Request or Response objects. The body is read with its
size limit straight from `receive`, the answer leaves in one `send` (a stream: a `send` per
batch of ready chunks), and a client that goes away mid-stream is noticed by a watcher on
`receive`, which cancels the stream. Every reply is settled (its bookkeeping: log, cost,
budget) once its last byte has been written, or once the client has gone.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import anyio
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from keel.errors import HeadersTooLarge, InvalidJSON, KeelError, RequestTooLarge
from keel.pipeline import ChunkStream, Completion, Context, StreamClosed, new_request_id
from keel.providers.sse import DONE, encode_chunk, encode_error
from keel.server.responses import ErrorBody, error_parts, spec_nulls_dropped

log = logging.getLogger("keel.gateway")

REQUEST_ID = "x-keel-request-id"
# Header limits, for every route: a client needs a few headers of a few hundred bytes (a dashboard
# session cookie included); more is a mistake or an attack, refused with 431 before any work.
MAX_HEADER_BYTES = 32 * 1024  # names and values together
MAX_HEADERS = 100
JSON = (b"content-type", b"application/json")
SSE_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
               (b"x-accel-buffering", b"no")]


@dataclass
class Incoming:
    """A hot request: its id, headers (lower-case names) and body, read from ASGI directly."""

    scope: Scope
    receive: Receive
    request_id: str
    headers: dict[str, str] = field(default_factory=dict)
    ctx: Context | None = None  # the call's context, once the endpoint made one

    @property
    def method(self) -> str:
        return str(self.scope["method"])

    @property
    def path(self) -> str:
        return str(self.scope["path"])

    async def body(self, limit: int) -> bytes:
        declared = self.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise RequestTooLarge(
                f"The request body is {declared} bytes; this gateway accepts at most {limit} "
                "(server.max_body_bytes). Send a smaller request."
            )
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await self.receive()
            if message["type"] != "http.request":
                raise StreamClosed("The client went away before sending the whole request.")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise RequestTooLarge(
                    f"The request body is over {limit} bytes, the most this gateway accepts "
                    "(server.max_body_bytes). Send a smaller request."
                )
            chunks.append(chunk)
            if not message.get("more_body", False):
                body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
                if not body.isascii():  # ASCII is UTF-8; the check costs nanoseconds
                    check_utf8(body)
                return body


def headers_over_limits(headers: Sequence[tuple[bytes, bytes]]) -> HeadersTooLarge | None:
    """The refusal of a request with more headers, or more header bytes, than MAX_HEADERS and
    MAX_HEADER_BYTES; None within them."""
    if len(headers) > MAX_HEADERS:
        return HeadersTooLarge(
            f"The request has {len(headers)} headers; this gateway accepts at most {MAX_HEADERS}. "
            "Send only the headers the API needs (authorization, content-type).")
    size = sum(len(name) + len(value) for name, value in headers)
    if size > MAX_HEADER_BYTES:
        return HeadersTooLarge(
            f"The request's headers are {size} bytes; this gateway accepts at most {MAX_HEADER_BYTES}. "
            "Send smaller headers (a large cookie or a header holding data that belongs in the body).")
    return None


def check_utf8(body: bytes) -> None:
    """Refuse a body that is not UTF-8 with where and why (the JSON parser says "surrogates
    not allowed" at character 0 for any bad byte)."""
    try:
        body.decode("utf-8")
    except UnicodeDecodeError as exc:
        bad = body[exc.start:exc.end]
        surrogate = bad[:1] == b"\xed" and body[exc.start + 1:exc.start + 2] >= b"\xa0"
        why = " (a UTF-16 surrogate, which UTF-8 cannot hold)" if surrogate else ""
        raise InvalidJSON(
            f"The request body is not valid UTF-8: byte {exc.start} is 0x{bad[0]:02x}{why}. "
            "Send the JSON encoded as UTF-8; write other characters as they are or as \\u escapes such as \\u00e9."
        ) from None


@dataclass
class Answer:
    """A whole answer: status, JSON body and extra headers."""

    body: bytes
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    settles: Completion | None = None  # the reply this answer delivers: settled once it has left


CACHE_HEADERS = {status: (b"x-keel-cache", word) for status, word in
                 (("hit_exact", b"hit"), ("hit_semantic", b"semantic-hit"), ("miss", b"miss"),
                  ("bypass", b"bypass"))}

@dataclass(frozen=True, slots=True)
class EventStream:
    """A stream in a dialect's own events (the Responses API's, Anthropic's): `events` turns the
    chunks into SSE bytes, its closing events included; `error` turns a failure after the first
    event into the dialect's error event. A bare `ChunkStream` is sent as chat.completion chunks."""

    stream: ChunkStream
    events: Callable[[ChunkStream], AsyncIterator[bytes]]
    error: Callable[[KeelError], bytes]

    async def settle(self) -> None:
        await self.stream.settle()


async def chat_events(stream: ChunkStream) -> AsyncIterator[bytes]:
    """A stream as OpenAI's chat.completion.chunk events, then `[DONE]`."""
    async for chunk in stream:
        yield encode_chunk(spec_nulls_dropped(chunk))
    yield DONE


def chat_stream(stream: ChunkStream) -> EventStream:
    return EventStream(stream, chat_events, lambda exc: encode_error(exc.body()))


HotEndpoint = Callable[[Incoming], Awaitable[Answer | ChunkStream | EventStream]]
OnError = Callable[[Incoming, Exception], KeelError]  # logs the failure; the error to answer with


class Gateway:
    """Serve POSTs to the hot paths in plain ASGI; hand the rest to `api` (FastAPI)."""

    def __init__(self, api: ASGIApp, hot: dict[str, HotRoute], on_error: OnError,
                 not_allowed: Callable[[Incoming], KeelError]) -> None:
        self.api = api
        self.hot = hot
        self.on_error = on_error
        self.not_allowed = not_allowed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.api(scope, receive, send)
            return
        request_id = new_request_id()
        scope["keel.request_id"] = request_id
        id_header = (REQUEST_ID.encode(), request_id.encode())
        if (too_many := headers_over_limits(scope["headers"])) is not None:
            await send_answer(send, error_answer(self.on_error(Incoming(scope, receive, request_id), too_many)),
                              id_header)
            return
        path: str = scope["path"]
        route = self.hot.get(path) or (self.hot.get(path.rstrip("/")) if path.endswith("/") else None)
        if route is None:

            async def send_with_id(message: Message) -> None:
                if message["type"] == "http.response.start":
                    message["headers"] = [*message.get("headers", []), id_header]
                await send(message)

            await self.api(scope, receive, send_with_id)
            return
        incoming = Incoming(scope, receive, request_id,
                            {name.decode("latin-1"): value.decode("latin-1") for name, value in scope["headers"]})
        try:
            if scope["method"] != "POST":
                raise self.not_allowed(incoming)
            reply = await route.endpoint(incoming)
        except Exception as exc:
            reply = error_answer(self.on_error(incoming, exc), body=route.error_body)
        # OpenAI's x-ratelimit-* headers, on every answer of a call some rate limit counted.
        limited = incoming.ctx.rate_limit if incoming.ctx is not None else None
        extra = limited.headers() if limited is not None else []
        if route.id_header is not None:  # the dialect's own name for the request id (Anthropic's request-id)
            extra = [*extra, (route.id_header, id_header[1])]
        # x-keel-cache: hit | semantic-hit | miss | bypass, on every answer of a call a cache saw (docs/caching.md).
        if incoming.ctx is not None and (cached := CACHE_HEADERS.get(incoming.ctx.cache_status)) is not None:
            extra = [*extra, cached]
        # x-keel-route: <tier model>; reason=<why>, on every answer of a call to a virtual model (docs/routing.md).
        if incoming.ctx is not None and incoming.ctx.route is not None:
            extra = [*extra, (b"x-keel-route", incoming.ctx.route.header().encode("latin-1", "replace"))]
        if isinstance(reply, ChunkStream):
            reply = chat_stream(reply)
        if isinstance(reply, Answer):
            await send_answer(send, reply, id_header, extra)
        else:
            await send_stream(reply, request_id, receive, send, id_header, extra)


async def send_answer(send: Send, answer: Answer, id_header: tuple[bytes, bytes],
                      extra: Sequence[tuple[bytes, bytes]] = ()) -> None:
    """A whole answer, then the settlement of the reply it delivers (if any), even when the send failed."""
    headers = [JSON, (b"content-length", b"%d" % len(answer.body)), id_header, *extra]
    headers += [(name.encode("latin-1"), value.encode("latin-1")) for name, value in answer.headers.items()]
    try:
        await send({"type": "http.response.start", "status": answer.status, "headers": headers})
        await send({"type": "http.response.body", "body": answer.body})
    finally:
        if answer.settles is not None:
            await answer.settles.settle()


async def send_stream(stream: EventStream, request_id: str, receive: Receive, send: Send,
                      id_header: tuple[bytes, bytes], extra: Sequence[tuple[bytes, bytes]] = ()) -> None:
    """The stream as SSE until its end, or until the client goes away (then it is closed)."""
    task = asyncio.current_task()
    assert task is not None
    gone = asyncio.Event()

    async def watch() -> None:  # receive() returns when the client disconnects
        while (await receive())["type"] != "http.disconnect":
            pass
        gone.set()
        task.cancel()

    watcher = asyncio.create_task(watch())
    try:
        await send({"type": "http.response.start", "status": 200, "headers": [*SSE_HEADERS, id_header, *extra]})
        async for data, ended in sse(stream, request_id):  # the last write ends the response too
            if ended:  # once the response is complete, receive() says "disconnect" too (uvicorn)
                watcher.cancel()
            await send({"type": "http.response.body", "body": data, "more_body": not ended})
    except asyncio.CancelledError:
        if not gone.is_set():
            raise
        task.uncancel()  # our own cancel, for a client that left: the stream is closed, not failed
    finally:
        watcher.cancel()
        await stream.settle()  # a no-op once sse() settled it; else (it never started) it is settled here


async def sse(stream: EventStream, request_id: str) -> AsyncIterator[tuple[bytes, bool]]:
    """The stream as SSE, as (bytes, is it the end); a failure after the first chunk becomes an
    error event, never a silent end.

    A pump task reads the stream into a small queue and this generator yields whatever is queued
    in one go: chunks that arrived together (one upstream read) leave in one write instead of a
    system call each, and a lone chunk leaves at once (nothing ever waits to be batched). The
    stream is settled (log, cost, budget) after the end has been written.
    """
    queue: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=256)
    pump = asyncio.create_task(_pump(stream, queue, request_id))
    try:
        while True:
            parts = [await queue.get()]
            while not queue.empty():
                parts.append(queue.get_nowait())
            ended = parts[-1] is None
            data = b"".join(part for part in parts if part is not None)
            if data or ended:
                yield data, ended
            if ended:
                return
    finally:
        # A client that went away cancels this generator: stop the pump, and shield the
        # settlement so the stream's bookkeeping (log, cost, budget) runs.
        pump.cancel()
        with anyio.CancelScope(shield=True):
            await asyncio.gather(pump, return_exceptions=True)
            await stream.settle()


async def _pump(stream: EventStream, queue: asyncio.Queue[bytes | None], request_id: str) -> None:
    try:
        async for data in stream.events(stream.stream):
            await queue.put(data)
    except KeelError as exc:
        log.warning("request %s: stream ended by %s: %s", request_id, exc.code, exc.message)
        await queue.put(stream.error(exc))
    except Exception:
        log.exception("request %s: stream failed unexpectedly", request_id)
        error = KeelError(f"The stream failed unexpectedly; the log has the details under request id {request_id}.")
        await queue.put(stream.error(error))
    await queue.put(None)


def error_answer(exc: KeelError, status: int | None = None, body: ErrorBody | None = None) -> Answer:
    status, headers, data = error_parts(exc, status, body)
    return Answer(data, status, headers)


@dataclass(frozen=True, slots=True)
class HotRoute:
    """A hot path's endpoint and the shape of its error bodies (OpenAI's unless the dialect has its own)."""

    endpoint: HotEndpoint
    error_body: ErrorBody | None = None
    id_header: bytes | None = None  # the request id again under this name (besides x-request-id)
