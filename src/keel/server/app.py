"""The OpenAI-compatible gateway over the one pipeline: the chat and embeddings endpoints
(served in plain ASGI by `gateway.Gateway`, skipping the framework) and the rest of the API
(models, health, metrics, admin) on FastAPI.

Bodies are read and parsed here once (size-limited, orjson) and validated into the wire
types; replies go out with one orjson serialisation. Every answer, errors included, carries
`x-keel-request-id`; every error has OpenAI's shape.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import Response
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from keel.engine import Keel
from keel.errors import AuthenticationFailed, InvalidJSON, InvalidRequest, KeelError, ModelNotFound
from keel.observability.stage import TRACEPARENT_HEADERS
from keel.pipeline import ChunkStream, Completion, Context
from keel.request_errors import parse_request
from keel.server.admin import admin_router
from keel.server.gateway import REQUEST_ID, Answer, Gateway, HotEndpoint, Incoming, error_answer
from keel.server.readiness import Readiness
from keel.server.responses import error_response, json_response, spec_nulls_dropped
from keel.types import ChatRequest, EmbeddingRequest

log = logging.getLogger("keel.gateway")

__all__ = ["REQUEST_ID", "create_app", "spec_nulls_dropped"]


def create_app(keel: Keel) -> Gateway:
    server = keel.config.server
    master_key = os.environ.get(server.master_key_env) or None
    if master_key is None:
        log.warning(
            "%s is not set: the gateway accepts requests without a key. Set it to require "
            "'Authorization: Bearer <key>'.", server.master_key_env,
        )
    readiness = Readiness(keel)
    # OpenAI's `created` is when a model was made; ours were made when this gateway loaded its
    # config: the same on every call, and it moves when the gateway restarts with a new one.
    created = int(time.time())

    def authorise(authorization: str | None) -> None:
        if master_key is None:
            return
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), master_key.encode()):
            raise AuthenticationFailed(
                "Invalid or missing API key. Send 'Authorization: Bearer <key>' with the gateway's key."
            )

    # ---------------------------------------------------------------- the hot routes

    async def parse(incoming: Incoming, cls: type[BaseModel], ctx: Context) -> Any:
        """The validated body; a refusal here is logged to the request log like any call."""
        try:
            authorise(incoming.headers.get("authorization"))
            raw = await incoming.body(server.max_body_bytes)
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

    def context(incoming: Incoming) -> Context:
        headers = incoming.headers
        # deliver_first: an answer's bookkeeping (log, cost, budget) runs after it has left.
        ctx = Context(request_id=incoming.request_id, feature=headers.get("x-keel-feature"),
                      key_id=key_id(headers.get("authorization")), deliver_first=True)
        if "traceparent" in headers:  # only these two: the rest (the key) stays out of the context
            ctx.extras[TRACEPARENT_HEADERS] = {
                name: value for name in ("traceparent", "tracestate") if (value := headers.get(name))
            }
        return ctx

    async def chat_completions(incoming: Incoming) -> Answer | ChunkStream:
        ctx = context(incoming)
        body: ChatRequest = await parse(incoming, ChatRequest, ctx)
        reply = await keel.handle(body, ctx)
        if isinstance(reply, ChunkStream):
            return reply
        return await answer_of(reply, spec_nulls_dropped(reply.body, completion=True))

    async def embeddings(incoming: Incoming) -> Answer | ChunkStream:
        ctx = context(incoming)
        body: EmbeddingRequest = await parse(incoming, EmbeddingRequest, ctx)
        reply = await keel.handle(body, ctx)
        assert not isinstance(reply, ChunkStream)
        return await answer_of(reply, reply.body)

    def hot_error(incoming: Incoming, exc: Exception) -> Answer:
        if not isinstance(exc, KeelError):
            log.exception("request %s failed unexpectedly", incoming.request_id)
            exc = unexpected_error(incoming.request_id)
        log_error(incoming.request_id, incoming.method, incoming.path, exc.status, exc)
        return error_answer(exc)

    def not_allowed(incoming: Incoming) -> KeelError:
        return method_not_allowed(incoming.method, incoming.path, "POST")

    # ---------------------------------------------------------------- the rest, on FastAPI

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await keel.start()
        readiness.started = True
        try:
            yield
        finally:
            readiness.started = False
            await keel.close()

    api = FastAPI(title="Keel", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    @api.get("/metrics")
    async def metrics(request: Request) -> Response:
        authorise(request.headers.get("authorization"))  # per-feature spend is not for anyone who can reach the port
        body, content_type = keel.metrics.render()
        return Response(body, media_type=content_type)

    def admin_key(request: Request) -> None:
        if master_key is None:
            raise AuthenticationFailed(
                f"The admin API needs the gateway's key: set {server.master_key_env} and send "
                "'Authorization: Bearer <key>'."
            )
        authorise(request.headers.get("authorization"))

    api.include_router(admin_router(keel.budgets, auth=admin_key))

    def model_object(name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": created, "owned_by": "keel"}

    @api.get("/v1/models")
    async def models(request: Request) -> Response:
        authorise(request.headers.get("authorization"))
        return json_response({"object": "list", "data": [model_object(m.name) for m in keel.config.models]})

    @api.get("/v1/models/{model:path}")  # a path: model names may hold a slash ("org/model")
    async def model(model: str, request: Request) -> Response:
        authorise(request.headers.get("authorization"))
        if keel.config.model(model) is None:
            raise ModelNotFound(model, [m.name for m in keel.config.models])
        return json_response(model_object(model))

    @api.get("/healthz")
    async def healthz() -> Response:
        return Response(b'{"status":"ok"}', media_type="application/json")

    @api.get("/readyz")
    async def readyz() -> Response:
        ready, body = await readiness.report()
        return json_response(body, 200 if ready else 503)

    @api.exception_handler(KeelError)
    async def keel_error(request: Request, exc: KeelError) -> Response:
        log_error(request.scope.get("keel.request_id", ""), request.method, request.url.path, exc.status, exc)
        return error_response(exc)

    @api.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        error = route_error(request, exc)
        log_error(request.scope.get("keel.request_id", ""), request.method, request.url.path, exc.status_code, error)
        return error_response(error, status=exc.status_code)

    @api.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> Response:
        rid = request.scope.get("keel.request_id", "")
        log.exception("request %s failed unexpectedly", rid)
        return error_response(unexpected_error(rid))

    hot: dict[str, HotEndpoint] = {"/v1/chat/completions": chat_completions, "/v1/embeddings": embeddings}
    return Gateway(api, hot, on_error=hot_error, not_allowed=not_allowed)


async def answer_of(reply: Completion, body: dict[str, Any]) -> Answer:
    """The answer to send; the reply's finalisers run after it is sent (or now, if it cannot be made)."""
    try:
        return Answer(orjson.dumps(body), after=reply.finish)
    except BaseException:
        await reply.finish()
        raise


def unexpected_error(request_id: str) -> KeelError:
    return KeelError(
        f"Keel failed unexpectedly; this is a bug, not your request. Report it with the request id {request_id}, "
        "under which the gateway log has the details."
    )


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


ROUTES = (
    "POST /v1/chat/completions, POST /v1/embeddings, GET /v1/models, GET /v1/models/{model}, "
    "GET /healthz, GET /readyz and GET /metrics"
)


def method_not_allowed(method: str, path: str, allowed: str) -> MethodNotAllowed:
    return MethodNotAllowed(
        f"Method not allowed ({method} {path}): use {allowed or 'another method'} on this URL.", allowed=allowed
    )


def route_error(request: Request, exc: StarletteHTTPException) -> KeelError:
    """An unknown URL or method, said the way OpenAI says it, with what is served instead."""
    where = f"{request.method} {request.url.path}"
    if exc.status_code == 404:
        return RouteNotFound(
            f"Invalid URL ({where}): Keel serves {ROUTES}. Point the client's base_url at the gateway's /v1."
        )
    if exc.status_code == 405:
        headers = {k.lower(): v for k, v in (exc.headers or {}).items()}
        return method_not_allowed(request.method, request.url.path, headers.get("allow", ""))
    return InvalidRequest(f"{where}: {exc.detail}.")


def log_error(request_id: str, method: str, path: str, status: int, exc: KeelError) -> None:
    level = logging.WARNING if status < 500 else logging.ERROR
    # A body that failed validation is logged by the parameter's name only: its message quotes
    # the client's value, which may be anything the client typed (the request log has the
    # redacted request). Every other refusal is Keel's own sentence: logged as it is.
    if exc.code == InvalidRequest.code and exc.param:
        detail = f"invalid value for parameter '{exc.param}' (the request log has the request)"
    else:
        detail = exc.message
    log.log(level, "request %s %s %s failed: %s %s: %s", request_id, method, path, status, exc.code, detail)
