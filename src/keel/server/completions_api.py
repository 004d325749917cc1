"""POST /v1/completions: legacy text completions over the one pipeline (keel.dialects.completions
translates at the edge). Errors, streamed ones included, are in OpenAI's shape."""

from __future__ import annotations

from functools import partial

from keel.dialects.completions import error_event, text_completion, text_completion_events, translated
from keel.errors import KeelError
from keel.pipeline import ChunkStream
from keel.server.calls import Served, answer_of, body_json, context
from keel.server.gateway import Answer, EventStream, Incoming


async def create(served: Served, incoming: Incoming) -> Answer | EventStream:
    ctx = context(incoming, "completions")
    try:
        call = translated(await body_json(served, incoming, incoming.headers.get("authorization")))
    except KeelError as exc:  # refused before the pipeline: logged here, so every call has its one record
        served.keel.observe.rejected(ctx, exc, "chat")
        raise
    reply = await served.keel.handle(call.request, ctx, caller_settles=True)
    if isinstance(reply, ChunkStream):
        events = partial(text_completion_events, echo=call.echo) if call.echo else text_completion_events
        return EventStream(reply, events, error_event)
    return await answer_of(reply, text_completion(reply.body, call.echo))
