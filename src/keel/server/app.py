"""The OpenAI-compatible gateway over the one pipeline: the chat and embeddings endpoints
(served in plain ASGI by `gateway.Gateway`, skipping the framework) and the rest of the API
(models, health, metrics, admin) on FastAPI.

Bodies are read and parsed here once (size-limited, orjson) and validated into the wire
types; replies go out with one orjson serialisation. Every answer, errors included, carries
`x-keel-request-id`; every error has OpenAI's shape.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import PlainTextResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from keel.auth.admin import keys_router
from keel.dashboard.api import dashboard_api_router
from keel.dashboard.auth import SessionSigner, admin_caller
from keel.dashboard.pages import STATIC_PATH, dashboard_router, static_files
from keel.engine import Keel
from keel.errors import InvalidRequest, KeelError, ModelNotFound
from keel.evals.review_admin import review_router
from keel.pipeline import ChunkStream
from keel.server.admin import admin_router, cache_router
from keel.server.calls import Served, answer_of, authorised, context, key_id, parse, served_by
from keel.server.dialect_routes import dialect_routes, stored_responses_router
from keel.server.gateway import REQUEST_ID, Answer, Gateway, HotRoute, Incoming
from keel.server.openapi import openapi_document
from keel.server.responses import error_response, json_response, spec_nulls_dropped
from keel.types import ChatRequest, EmbeddingRequest

log = logging.getLogger("keel.gateway")

__all__ = ["REQUEST_ID", "Served", "create_app", "key_id", "spec_nulls_dropped"]


def create_app(keel: Keel) -> Gateway:
    """The gateway over `keel`: the hot routes in plain ASGI, the rest on FastAPI, sharing one `Served`."""
    served = Served.of(keel)
    api = FastAPI(title="Keel", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    api.state.keel = served
    api.state.dashboard_sessions = SessionSigner(served.master_key)
    api.include_router(routes)
    api.include_router(admin_router(keel.budgets, auth=admin_key, key_ids=tenant_key_ids))
    api.include_router(keys_router(keel.keys, keel.auth.lookup if keel.auth else None, auth=admin_key))
    api.include_router(cache_router(keel.cache, [m.name for m in keel.config.models], auth=admin_key))
    api.include_router(review_router(keel.review.queue, auth=admin_key))
    api.include_router(dashboard_router())
    api.include_router(dashboard_api_router(auth=admin_key))
    api.mount(STATIC_PATH, static_files(), name="dashboard-static")
    api.add_exception_handler(KeelError, keel_error)  # type: ignore[arg-type]
    api.add_exception_handler(StarletteHTTPException, http_error)  # type: ignore[arg-type]
    api.add_exception_handler(RequestValidationError, invalid_parameter)  # type: ignore[arg-type]
    api.add_exception_handler(Exception, unexpected)
    api.include_router(stored_responses_router)
    hot: dict[str, HotRoute] = {
        "/v1/chat/completions": HotRoute(partial(chat_completions, served)),
        "/v1/embeddings": HotRoute(partial(embeddings, served)),
        # The other APIs clients speak, translated at the edge to the one internal call (docs/dialects.md).
        **dialect_routes(served),
    }
    api.state.openapi = partial(openapi_document, api, list(hot), [m.name for m in keel.config.models])
    return Gateway(api, hot, on_error=hot_error, not_allowed=not_allowed)


# -------------------------------------------------------------------- the hot routes


async def chat_completions(served: Served, incoming: Incoming) -> Answer | ChunkStream:
    ctx = context(incoming, "chat.completions")
    body: ChatRequest = await parse(served, incoming, ChatRequest, ctx)
    reply = await served.keel.handle(body, ctx, caller_settles=True)
    if isinstance(reply, ChunkStream):
        return reply
    return await answer_of(reply, spec_nulls_dropped(reply.body, completion=True))


async def embeddings(served: Served, incoming: Incoming) -> Answer | ChunkStream:
    ctx = context(incoming, "embeddings")
    body: EmbeddingRequest = await parse(served, incoming, EmbeddingRequest, ctx)
    reply = await served.keel.handle(body, ctx, caller_settles=True)
    assert not isinstance(reply, ChunkStream)
    return await answer_of(reply, reply.body)


def hot_error(incoming: Incoming, exc: Exception) -> KeelError:
    if not isinstance(exc, KeelError):
        log.exception("request %s failed unexpectedly", incoming.request_id)
        exc = unexpected_error(incoming.request_id)
    log_error(incoming.request_id, incoming.method, incoming.path, exc.status, exc)
    return exc


def not_allowed(incoming: Incoming) -> KeelError:
    return method_not_allowed(incoming.method, incoming.path, "POST")


# -------------------------------------------------------------------- the rest, on FastAPI


async def admin_key(request: Request) -> None:
    """The admin API and the dashboard need a key even when the rest of the gateway does not: the
    master key (every tenant), or with virtual keys on a tenant admin key (its tenant only, left in
    `request.state.tenant`), sent as a bearer key or held in the dashboard's session cookie
    (unsafe methods then need the same origin and the CSRF token: keel.dashboard.auth)."""
    await admin_caller(request)


async def tenant_key_ids(request: Request, tenant: str) -> list[str]:
    """The ids of a tenant's keys: its budgets of scope `key` are counted under them."""
    keys = served_by(request).keel.keys
    return [key.id for key in await asyncio.to_thread(keys.list, tenant)]


@asynccontextmanager
async def lifespan(api: FastAPI) -> AsyncIterator[None]:
    served: Served = api.state.keel
    await served.keel.start()
    served.readiness.started = True
    try:
        yield
    finally:
        served.readiness.started = False
        await served.keel.close()


routes = APIRouter()


@routes.get("/metrics", response_class=PlainTextResponse)  # documented as Prometheus' text
async def metrics(served: Served = Depends(authorised)) -> Response:
    # Behind the key: per-feature spend is not for anyone who can reach the port.
    body, content_type = served.keel.metrics.render()
    return Response(body, media_type=content_type)


@routes.get("/v1/models")
async def models(served: Served = Depends(authorised)) -> Response:
    names = [m.name for m in served.keel.config.models]
    return json_response({"object": "list", "data": [model_object(served, name) for name in names]})


@routes.get("/v1/models/{model:path}")  # a path: model names may hold a slash ("org/model")
async def model(model: str, served: Served = Depends(authorised)) -> Response:
    if served.keel.config.model(model) is None:
        raise ModelNotFound(model, [m.name for m in served.keel.config.models])
    return json_response(model_object(served, model))


def model_object(served: Served, name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": served.created, "owned_by": "keel"}


@routes.get("/openapi.json", include_in_schema=False)
async def openapi(request: Request, served: Served = Depends(authorised)) -> Response:
    # Behind the key, as /v1/models: the document names the configured models.
    document = getattr(request.app.state, "openapi_document", None)
    if document is None:
        document = request.app.state.openapi_document = request.app.state.openapi()
    return json_response(document)


@routes.get("/healthz")
async def healthz() -> Response:
    return Response(b'{"status":"ok"}', media_type="application/json")


@routes.get("/readyz")
async def readyz(served: Served = Depends(served_by)) -> Response:
    ready, body = await served.readiness.report()
    return json_response(body, 200 if ready else 503)


async def keel_error(request: Request, exc: KeelError) -> Response:
    log_error(request.scope.get("keel.request_id", ""), request.method, request.url.path, exc.status, exc)
    return error_response(exc)


async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
    error = route_error(request, exc)
    log_error(request.scope.get("keel.request_id", ""), request.method, request.url.path, exc.status_code, error)
    return error_response(error, status=exc.status_code)


async def invalid_parameter(request: Request, exc: RequestValidationError) -> Response:
    """A path, query or body parameter of the FastAPI routes that does not validate: a 400 in OpenAI's
    shape naming the parameter (FastAPI's own answer is a 422 `{"detail": [...]}`, which clients of an
    OpenAI-compatible API cannot read)."""
    error = parameter_error(exc)
    log_error(request.scope.get("keel.request_id", ""), request.method, request.url.path, error.status, error)
    return error_response(error)


def parameter_error(exc: RequestValidationError) -> InvalidRequest:
    first = exc.errors()[0] if exc.errors() else {}
    where, *names = [str(part) for part in first.get("loc", ())] or ["request"]
    param = ".".join(names) or None
    value = repr(first.get("input"))
    shown = value if len(value) <= 40 else value[:40] + "..."
    what = f"the {where} parameter '{param}'" if param else f"the {where}"
    return InvalidRequest(
        f"Invalid value for {what}: {first.get('msg', 'not valid')} (got {shown}). "
        "See GET /openapi.json for what each parameter takes.", param=param)


async def unexpected(request: Request, exc: Exception) -> Response:
    rid = request.scope.get("keel.request_id", "")
    log.exception("request %s failed unexpectedly", rid)
    return error_response(unexpected_error(rid))


def unexpected_error(request_id: str) -> KeelError:
    return KeelError(
        f"Keel failed unexpectedly; this is a bug, not your request. Report it with the request id {request_id}, "
        "under which the gateway log has the details."
    )


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
    "POST /v1/chat/completions, POST /v1/embeddings, POST /v1/responses, GET and DELETE /v1/responses/{id}, "
    "POST /v1/messages, POST /v1/completions, GET /v1/models, GET /v1/models/{model}, "
    "GET /healthz, GET /readyz, GET /metrics, GET /openapi.json and the dashboard at GET /dashboard"
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
