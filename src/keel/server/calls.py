"""What every gateway route shares (`Served`), and the steps of a hot call before the pipeline: its
context from the headers, its key, its body read and parsed, and its answer made ready to send.
The dialects' routes (`keel.server.dialect_routes`) use the same steps as chat.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import time
from dataclasses import dataclass
from typing import Any

import orjson
from fastapi import Request
from pydantic import BaseModel

from keel.auth.keys import Credential
from keel.engine import Keel
from keel.errors import AuthenticationFailed, InvalidJSON, KeelError
from keel.pipeline import Completion, Context, Dialect
from keel.prompts import PROMPT_HEADER
from keel.request_errors import parse_request
from keel.server.gateway import Answer, Incoming
from keel.server.readiness import Readiness
from keel.types import ChatRequest

log = logging.getLogger("keel.gateway")


@dataclass(slots=True)
class Served:
    """What every route shares, at `app.state.keel` (FastAPI routes) or bound to the hot ones."""

    keel: Keel
    master_key: str | None  # None: requests need no key
    master_key_env: str
    readiness: Readiness
    # OpenAI's `created` is when a model was made; ours were made when this gateway loaded its
    # config: the same on every call, and it moves when the gateway restarts with a new one.
    created: int

    @classmethod
    def of(cls, keel: Keel) -> Served:
        env = keel.config.server.master_key_env
        master_key = os.environ.get(env) or None
        if master_key is None:
            log.warning(
                "%s is not set: the gateway accepts requests without a key. Set it to require "
                "'Authorization: Bearer <key>'.", env,
            )
        return cls(keel, master_key, env, Readiness(keel), int(time.time()))

    def authorise(self, authorization: str | None) -> None:
        if self.master_key is None:
            return
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.master_key.encode()):
            raise AuthenticationFailed(
                "Invalid or missing API key. Send 'Authorization: Bearer <key>' with the gateway's key."
            )


def context(incoming: Incoming, dialect: Dialect, authorization: str | None = None) -> Context:
    """The call's context from its headers; `authorization` when the dialect sends its key another way
    (Anthropic's x-api-key), as `Bearer <key>`."""
    headers = incoming.headers
    authorization = authorization or headers.get("authorization")
    ctx = Context(request_id=incoming.request_id, feature=headers.get("x-keel-feature"),
                  key_id=key_id(authorization), credential=Credential.of(authorization),
                  cache_control=headers.get("cache-control"), dialect=dialect)
    if "traceparent" in headers:  # only these two: the rest (the key) stays out of the context
        ctx.trace_headers = {name: value for name in ("traceparent", "tracestate") if (value := headers.get(name))}
    incoming.ctx = ctx  # the gateway reads what stages leave for the answer's headers (ctx.rate_limit)
    return ctx


async def parse(served: Served, incoming: Incoming, cls: type[BaseModel], ctx: Context) -> Any:
    """The validated body; a refusal here is logged to the request log like any call."""
    try:
        data = await body_json(served, incoming, incoming.headers.get("authorization"))
        if cls is ChatRequest and isinstance(data, dict):  # a prompt template named: rendered here (docs/prompts.md)
            ctx.prompt = served.keel.render_prompt(data, incoming.headers.get(PROMPT_HEADER))
        # Strict: JSON types as OpenAI documents them; "0.7" is not a temperature.
        return parse_request(cls, data, strict=True)
    except KeelError as exc:
        served.keel.observe.rejected(ctx, exc, "chat" if cls is ChatRequest else "embeddings")
        raise


async def body_json(served: Served, incoming: Incoming, authorization: str | None) -> Any:
    """The request's JSON, read within the size limit, once its key has been checked (when the
    gateway has a master key and no virtual keys: with them, the auth stage checks the key)."""
    if served.keel.auth is None:
        served.authorise(authorization)
    raw = await incoming.body(served.keel.config.server.max_body_bytes)
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidJSON(
            f"The request body is not valid JSON ({exc}). Send a JSON object with "
            "'Content-Type: application/json'."
        ) from None


async def answer_of(reply: Completion, body: dict[str, Any]) -> Answer:
    """The answer to send, carrying the reply the gateway settles once it has left (or now, if it
    cannot be made)."""
    try:
        return Answer(orjson.dumps(body), settles=reply)
    except BaseException:
        await reply.settle()
        raise


def served_by(request: Request) -> Served:
    served: Served = request.app.state.keel
    return served


async def authorised(request: Request) -> Served:
    """The dependency of the routes that need the gateway's key (when it has one), or, with
    virtual keys on, any valid key."""
    served = served_by(request)
    if served.keel.auth is None:
        served.authorise(request.headers.get("authorization"))
    else:
        await served.keel.auth.identify(Credential.of(request.headers.get("authorization")))
    return served


def key_id(authorization: str | None) -> str | None:
    """A stable, non-secret id for the key a client sent: budgets per key and the log use it."""
    if not authorization:
        return None
    token = authorization.partition(" ")[2].strip() or authorization.strip()
    return "key_" + hashlib.sha256(token.encode()).hexdigest()[:12]
