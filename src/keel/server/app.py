"""The OpenAI-compatible gateway: FastAPI routes over the one pipeline.

Bodies are read and parsed here once (size-limited, orjson) and validated into the wire
types; replies go out with one orjson serialisation. Every answer, errors included, carries
`x-keel-request-id`; every error has OpenAI's shape.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import orjson
from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from keel.engine import Keel
from keel.errors import AuthenticationFailed, InvalidJSON, InvalidRequest, KeelError, RequestTooLarge
from keel.observability.stage import TRACEPARENT_HEADERS
from keel.pipeline import ChunkStream, Context, new_request_id
from keel.providers.sse import DONE, encode_chunk, encode_error
from keel.request_errors import parse_request
from keel.server.admin import admin_router
from keel.server.responses import error_response
from keel.types import ChatRequest, EmbeddingRequest

log = logging.getLogger("keel.gateway")

REQUEST_ID = "x-keel-request-id"


def create_app(keel: Keel) -> FastAPI:
    server = keel.config.server
    master_key = os.environ.get(server.master_key_env) or None
    if master_key is None:
        log.warning(
            "%s is not set: the gateway accepts requests without a key. Set it to require "
            "'Authorization: Bearer <key>'.", server.master_key_env,
        )
    state = {"ready": False}

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await keel.start()
        state["ready"] = True
        try:
            yield
        finally:
            state["ready"] = False
            await keel.close()

    app = FastAPI(title="Keel", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    def authorise(request: Request) -> None:
        if master_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), master_key.encode()):
            raise AuthenticationFailed(
                "Invalid or missing API key. Send 'Authorization: Bearer <key>' with the gateway's key."
            )

    async def parse(request: Request, cls: type[BaseModel], ctx: Context) -> Any:
        """The validated body; a refusal here is logged to the request log like any call."""
        try:
            authorise(request)
            raw = await read_body(request, server.max_body_bytes)
            try:
                data = orjson.loads(raw)
            except orjson.JSONDecodeError as exc:
                raise InvalidJSON(
                    f"The request body is not valid JSON ({exc}). Send a JSON object with "
                    "'Content-Type: application/json'."
                ) from None
            # Strict: JSON types as OpenAI documents them; "0.7" is not a temperature.
            return parse_request(cls, data, strict=True)
        except KeelError as exc:
            keel.observe.rejected(ctx, exc, "chat" if cls is ChatRequest else "embeddings")
            raise

    def context(request: Request) -> Context:
        headers = request.headers
        ctx = Context(request_id=request.scope["keel.request_id"], feature=headers.get("x-keel-feature"),
                      key_id=key_id(headers.get("authorization")))
        if "traceparent" in headers:  # only these two: the rest (the key) stays out of the context
            ctx.extras[TRACEPARENT_HEADERS] = {
                name: value for name in ("traceparent", "tracestate") if (value := headers.get(name))
            }
        return ctx

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        ctx = context(request)
        body: ChatRequest = await parse(request, ChatRequest, ctx)
        reply = await keel.handle(body, ctx)
        if isinstance(reply, ChunkStream):
            return StreamingResponse(
                sse(reply, ctx.request_id),
                media_type="text/event-stream",
                headers={"cache-control": "no-cache", "x-accel-buffering": "no"},
            )
        return Response(orjson.dumps(spec_nulls_dropped(reply.body, completion=True)), media_type="application/json")

    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> Response:
        ctx = context(request)
        body: EmbeddingRequest = await parse(request, EmbeddingRequest, ctx)
        reply = await keel.handle(body, ctx)
        assert not isinstance(reply, ChunkStream)
        return Response(orjson.dumps(reply.body), media_type="application/json")

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        authorise(request)  # per-feature spend is not for anyone who can reach the port
        body, content_type = keel.metrics.render()
        return Response(body, media_type=content_type)

    def admin_key(request: Request) -> None:
        if master_key is None:
            raise AuthenticationFailed(
                f"The admin API needs the gateway's key: set {server.master_key_env} and send "
                "'Authorization: Bearer <key>'."
            )
        authorise(request)

    app.include_router(admin_router(keel.budgets, auth=admin_key))

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        authorise(request)
        created = 1_700_000_000
        data = [{"id": m.name, "object": "model", "created": created, "owned_by": "keel"} for m in keel.config.models]
        return Response(orjson.dumps({"object": "list", "data": data}), media_type="application/json")

    @app.get("/healthz")
    async def healthz() -> Response:
        return Response(b'{"status":"ok"}', media_type="application/json")

    @app.get("/readyz")
    async def readyz() -> Response:
        ready = state["ready"]
        return Response(
            orjson.dumps({"status": "ready" if ready else "starting"}),
            status_code=200 if ready else 503, media_type="application/json",
        )

    @app.exception_handler(KeelError)
    async def keel_error(request: Request, exc: KeelError) -> Response:
        log_error(request, exc.status, exc)
        return error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        error = route_error(request, exc)
        log_error(request, exc.status_code, error)
        return error_response(error, status=exc.status_code)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> Response:
        rid = request.scope.get("keel.request_id", "")
        log.exception("request %s failed unexpectedly", rid)
        error = KeelError(
            f"Keel failed unexpectedly; this is a bug, not your request. Report it with the request id {rid}, "
            "under which the gateway log has the details."
        )
        response = error_response(error)
        # This handler answers from outside the middleware stack: the id header is set here.
        response.headers[REQUEST_ID] = rid
        return response

    async def failed(request: Request, exc: Exception) -> Response:
        if isinstance(exc, KeelError):
            return await keel_error(request, exc)
        response = await unexpected(request, exc)
        del response.headers[REQUEST_ID]  # inside the middleware stack here: it adds the id
        return response

    # The two routes every call takes skip FastAPI's routing and dependency machinery (the same
    # endpoint functions, the same error handlers); the rest of the API goes through FastAPI.
    app.add_middleware(HotRoutes, routes={"/v1/chat/completions": chat_completions, "/v1/embeddings": embeddings},
                       on_error=failed)
    app.add_middleware(RequestIdMiddleware)  # added last: outermost, so every answer has the id
    return app


def spec_nulls_dropped(body: dict[str, Any], completion: bool = False) -> dict[str, Any]:
    """`body` without the top-level nulls OpenAI's spec does not allow, whoever built it.

    `system_fingerprint` is an optional string, never null; a chat.completion's `usage` is an
    optional object, never null (a chunk's may be). Strict clients and validators refuse the
    nulls, lenient ones read a missing key the same way; two lookups per object.
    """
    if "system_fingerprint" in body and body["system_fingerprint"] is None:
        del body["system_fingerprint"]
    if completion and "usage" in body and body["usage"] is None:
        del body["usage"]
    return body


def key_id(authorization: str | None) -> str | None:
    """A stable, non-secret id for the key a client sent: budgets per key and the log use it."""
    if not authorization:
        return None
    token = authorization.partition(" ")[2].strip() or authorization.strip()
    return "key_" + hashlib.sha256(token.encode()).hexdigest()[:12]


class RouteNotFound(InvalidRequest):
    status = 404
    code = "not_found"


class MethodNotAllowed(InvalidRequest):
    status = 405
    code = "method_not_allowed"

    def __init__(self, message: str, *, allowed: str) -> None:
        super().__init__(message)
        self.allowed = allowed

    def headers(self) -> dict[str, str]:
        return {"allow": self.allowed} if self.allowed else {}


ROUTES = "POST /v1/chat/completions, POST /v1/embeddings and GET /v1/models"


def route_error(request: Request, exc: StarletteHTTPException) -> KeelError:
    """An unknown URL or method, said the way OpenAI says it, with what is served instead."""
    where = f"{request.method} {request.url.path}"
    if exc.status_code == 404:
        return RouteNotFound(
            f"Invalid URL ({where}): Keel serves {ROUTES}. Point the client's base_url at the gateway's /v1."
        )
    if exc.status_code == 405:
        headers = {k.lower(): v for k, v in (exc.headers or {}).items()}
        allowed = headers.get("allow", "")
        return MethodNotAllowed(
            f"Method not allowed ({where}): use {allowed or 'another method'} on this URL.", allowed=allowed
        )
    return InvalidRequest(f"{where}: {exc.detail}.")


def log_error(request: Request, status: int, exc: KeelError) -> None:
    rid = request.scope.get("keel.request_id", "")
    level = logging.WARNING if status < 500 else logging.ERROR
    # A refused parameter is logged by name only: its message quotes the client's value,
    # which may be anything the client typed (the request log has the redacted request).
    detail = f"invalid parameter '{exc.param}'" if isinstance(exc, InvalidRequest) and exc.param else exc.message
    log.log(level, "request %s %s %s failed: %s %s: %s",
            rid, request.method, request.url.path, status, exc.code, detail)


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestTooLarge(
            f"The request body is {declared} bytes; this gateway accepts at most {limit} "
            "(server.max_body_bytes). Send a smaller request."
        )
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestTooLarge(
                f"The request body is over {limit} bytes, the most this gateway accepts "
                "(server.max_body_bytes). Send a smaller request."
            )
        chunks.append(chunk)
    return b"".join(chunks)


async def sse(stream: ChunkStream, request_id: str) -> AsyncIterator[bytes]:
    """The stream as SSE; a failure after the first chunk becomes an error event, never a silent end.

    A pump task reads the stream into a small queue and this generator writes whatever is queued
    in one go: chunks that arrived together (one upstream read) leave in one write instead of a
    system call each, and a lone chunk leaves at once (nothing ever waits to be batched).
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
            if data:
                yield data
            if ended:
                return
    finally:
        # A client that went away cancels this generator: stop the pump, and shield the close
        # so the stream's finalisers (log, cost, budget) run.
        pump.cancel()
        with anyio.CancelScope(shield=True):
            await asyncio.gather(pump, return_exceptions=True)
            await stream.aclose()


async def _pump(stream: ChunkStream, queue: asyncio.Queue[bytes | None], request_id: str) -> None:
    try:
        async for chunk in stream:
            await queue.put(encode_chunk(spec_nulls_dropped(chunk)))
        await queue.put(DONE)
    except KeelError as exc:
        log.warning("request %s: stream ended by %s: %s", request_id, exc.code, exc.message)
        await queue.put(encode_error(exc.body()))
    except Exception:
        log.exception("request %s: stream failed unexpectedly", request_id)
        error = KeelError(f"The stream failed unexpectedly; the log has the details under request id {request_id}.")
        await queue.put(encode_error(error.body()))
    await queue.put(None)


Endpoint = Callable[[Request], Awaitable[Response]]


class HotRoutes:
    """Serve POSTs to the given paths straight from their endpoint functions (pure ASGI)."""

    def __init__(
        self, app: ASGIApp, routes: dict[str, Endpoint], on_error: Callable[[Request, Exception], Awaitable[Response]]
    ) -> None:
        self.app = app
        self.routes = routes
        self.on_error = on_error

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        endpoint = self.routes.get(scope["path"]) if scope["type"] == "http" and scope["method"] == "POST" else None
        if endpoint is None:
            await self.app(scope, receive, send)
            return
        request = Request(scope, receive)
        try:
            response = await endpoint(request)
        except Exception as exc:
            response = await self.on_error(request, exc)
        await response(scope, receive, send)


class RequestIdMiddleware:
    """Give every request an id and every response the `x-keel-request-id` header (pure ASGI:
    cheaper than BaseHTTPMiddleware, and it leaves streaming alone)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = new_request_id()
        scope["keel.request_id"] = request_id
        header = (REQUEST_ID.encode(), request_id.encode())

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), header]
            await send(message)

        await self.app(scope, receive, send_with_id)
