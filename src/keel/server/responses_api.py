"""The OpenAI Responses API: `POST /v1/responses` translated at the edge to the one internal call (so
every stage applies), and the stored responses it keeps (`GET`/`DELETE /v1/responses/{id}`), scoped by
tenant (docs/responses-api.md)."""

from __future__ import annotations

import time
import weakref
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from keel.auth.keys import Credential
from keel.dialects.response_store import ANY_TENANT, ResponseNotFound, ResponseStore, Scope
from keel.dialects.responses import (
    Translated,
    answer_message,
    chat_body,
    in_responses_terms,
    new_id,
    previous_id,
    response_of,
)
from keel.dialects.responses_events import ResponseEvents
from keel.engine import Keel
from keel.errors import InvalidRequest, KeelError
from keel.pipeline import ChunkStream, Completion, Context
from keel.prompts import PROMPT_HEADER
from keel.request_errors import parse_request
from keel.server.calls import Served, answer_of, body_json, context, served_by
from keel.server.gateway import Answer, EventStream, Incoming
from keel.server.responses import json_response
from keel.types import ChatRequest

_stores: weakref.WeakKeyDictionary[Keel, ResponseStore] = weakref.WeakKeyDictionary()


def responses_of(keel: Keel) -> ResponseStore:
    """The gateway's stored responses, in its request-log database."""
    store = _stores.get(keel)
    if store is None:
        store = _stores[keel] = ResponseStore(keel.writer.store)
    return store


async def create(served: Served, incoming: Incoming) -> Answer | EventStream:
    ctx = context(incoming, "responses")
    store = responses_of(served.keel)
    data: Any = None
    try:
        data = await body_json(served, incoming, incoming.headers.get("authorization"))
        request, translated = await _translated(served, store, data, ctx, incoming)
    except KeelError as exc:
        model = data.get("model") if isinstance(data, dict) and isinstance(data.get("model"), str) else None
        served.keel.observe.rejected(ctx, exc, "chat", model=model,
                                     stream=isinstance(data, dict) and data.get("stream") is True)
        raise
    response_id = new_id("resp_")
    if translated.store:
        store.expect(response_id)
    try:
        reply = await served.keel.handle(request, ctx, caller_settles=True)
    except BaseException:
        store.settled(response_id)
        raise
    saver = _saver(store, response_id, translated, ctx, request.model) if translated.store else None
    if isinstance(reply, ChunkStream):
        events = ResponseEvents(response_id, reply.model or request.model, translated.echo)
        if saver is not None:
            reply.on_finish(lambda stream: saver(stream, events.final))
        return EventStream(reply, events.events, events.error)
    response = response_of(reply.body, response_id, translated.echo)
    if saver is not None:
        reply.on_finish(lambda completion: saver(completion, response))
    return await answer_of(reply, response)


async def _translated(served: Served, store: ResponseStore, data: Any, ctx: Context,
                      incoming: Incoming) -> tuple[ChatRequest, Translated]:
    if not isinstance(data, dict):
        parse_request(ChatRequest, data, strict=True)  # refuses it, worded as for chat
    previous: list[dict[str, Any]] | None = None
    if (previous_response_id := previous_id(data)) is not None:
        row = await store.find(previous_response_id, await _scope(served, ctx.credential))
        if row is None:
            raise ResponseNotFound(previous_response_id, param="previous_response_id")
        previous = row["messages"]
    translated = chat_body(data, previous)
    chat = translated.chat
    ctx.prompt = served.keel.render_prompt(chat, incoming.headers.get(PROMPT_HEADER))
    try:
        return parse_request(ChatRequest, chat, strict=True), translated
    except InvalidRequest as exc:
        raise in_responses_terms(exc, translated.origins) from None


def _saver(store: ResponseStore, response_id: str, translated: Translated, ctx: Context, model: str) -> Any:
    """The finaliser that stores the answer once delivered; an answer that failed is not stored."""

    async def save(reply: Completion | ChunkStream, response: dict[str, Any] | None) -> None:
        if reply.error is not None or response is None:
            store.settled(response_id)
            return
        await store.save({
            "id": response_id, "tenant": ctx.tenant, "created_at": time.time(), "request_id": ctx.request_id,
            "model": model, "previous_response_id": translated.previous_response_id,
            "messages": [*translated.conversation, answer_message(reply.completion())], "response": response,
        })

    return save


async def _scope(served: Served, credential: Credential | None) -> Scope:
    """Whose stored responses the caller may read: its tenant's with a virtual key, every one with the
    master key (or when the gateway has no virtual keys, whose responses have no tenant)."""
    auth = served.keel.auth
    if auth is None or credential is None:
        return ANY_TENANT
    key = await auth.identify(credential)
    return ANY_TENANT if key is None else key.tenant


# -------------------------------------------------------------------- stored responses (FastAPI)

stored = APIRouter()


async def caller_scope(request: Request) -> Scope:
    """The key check of every route (the master key, or with virtual keys any valid key), and its scope."""
    served = served_by(request)
    authorization = request.headers.get("authorization")
    if served.keel.auth is None:
        served.authorise(authorization)
    return await _scope(served, Credential.of(authorization))


@stored.get("/v1/responses/{response_id}")
async def retrieve(response_id: str, request: Request, scope: Scope = Depends(caller_scope)) -> Response:
    row = await responses_of(served_by(request).keel).find(response_id, scope)
    if row is None:
        raise ResponseNotFound(response_id)
    return json_response(row["response"])


@stored.delete("/v1/responses/{response_id}")
async def delete(response_id: str, request: Request, scope: Scope = Depends(caller_scope)) -> Response:
    if not await responses_of(served_by(request).keel).delete(response_id, scope):
        raise ResponseNotFound(response_id)
    return json_response({"id": response_id, "object": "response", "deleted": True})
