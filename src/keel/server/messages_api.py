"""POST /v1/messages: Anthropic's Messages API over the one pipeline (docs/messages-api.md).

The body is translated at the edge into a chat request (keel.dialects.messages), which runs through
every stage as a chat call does; the answer comes back as Anthropic's `message`, or as its event stream
(keel.dialects.messages_events), and errors as its error body. When every deployment that may answer is
`provider: anthropic`, the client's own body rides along (`Context.native`) and is what goes upstream,
unless a stage changed the request on the way.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from keel.config import KeelConfig
from keel.dialects import messages
from keel.dialects.messages_events import error_event, message_events
from keel.errors import KeelError
from keel.pipeline import ChunkStream, NativeRequest, fingerprint_of
from keel.request_errors import parse_request
from keel.server.calls import Served, answer_of, body_json, context
from keel.server.gateway import Answer, EventStream, Incoming
from keel.types import ChatRequest


async def create(served: Served, incoming: Incoming) -> Answer | EventStream:
    # The anthropic SDK sends its key as x-api-key; Bearer works too (auth_token=, Claude Code's
    # ANTHROPIC_AUTH_TOKEN).
    api_key = incoming.headers.get("x-api-key")
    authorization = f"Bearer {api_key}" if api_key else incoming.headers.get("authorization")
    ctx = context(incoming, "messages", authorization=authorization)
    body: Any = None
    try:
        body = await body_json(served, incoming, authorization)
        native = isinstance(body, dict) and anthropic_only(served.keel.config, body.get("model"))
        translation = messages.chat_params(body, native=native)
        request = parse_request(ChatRequest, translation.params, strict=True)
    except KeelError as exc:  # refused before the pipeline: logged like any call
        named = body.get("model") if isinstance(body, dict) else None
        served.keel.observe.rejected(ctx, exc, "chat", model=named if isinstance(named, str) else None,
                                     stream=isinstance(body, dict) and body.get("stream") is True)
        raise
    if native:
        ctx.native = NativeRequest("messages", body, fingerprint_of(request), translation.needs_native)
    reply = await served.keel.handle(request, ctx, caller_settles=True)
    if isinstance(reply, ChunkStream):
        return EventStream(reply, partial(message_events, model=request.model), error_event)
    return await answer_of(reply, messages.message_of(reply.body, request.model))


def error_body(exc: KeelError) -> dict[str, Any]:
    return messages.error_body(exc)


def anthropic_only(config: KeelConfig, name: Any, depth: int = 0) -> bool:
    """Whether every deployment that may answer model `name` is Anthropic's (a virtual model's tiers
    included): then the client's body can go upstream as it came."""
    model = config.model(name) if isinstance(name, str) else None
    if model is None or depth > 8:
        return False
    if model.router is not None:
        return all(anthropic_only(config, tier, depth + 1) for tier in model.router.tiers)
    return all(deployment.provider == "anthropic" for deployment in model.deployments)
