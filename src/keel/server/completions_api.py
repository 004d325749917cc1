"""POST /v1/completions: legacy text completions over the one pipeline (keel.dialects.completions
translates at the edge; a list of prompts is a batch of calls, keel.server.prompt_batch). Errors,
streamed ones included, are in OpenAI's shape."""

from __future__ import annotations

from functools import partial

from keel.dialects.completions import error_event, text_completion, text_completion_events, translated
from keel.errors import KeelError
from keel.pipeline import ChunkStream, Context
from keel.server.calls import Served, answer_of, body_json, context
from keel.server.gateway import Answer, EventStream, Incoming
from keel.server.prompt_batch import batch_reply


async def create(served: Served, incoming: Incoming) -> Answer | EventStream:
    ctx = context(incoming, "completions")
    try:
        call = translated(await body_json(served, incoming, incoming.headers.get("authorization")))
    except KeelError as exc:  # refused before the pipeline: logged here, so every call has its one record
        served.keel.observe.rejected(ctx, exc, "chat")
        raise
    if len(call.requests) == 1:
        reply = await served.keel.handle(call.requests[0], ctx, caller_settles=True)
    else:
        reply = await batch_reply(served.keel, call.requests, partial(_prompt_context, ctx, incoming))
        incoming.ctx = ctx  # the answer's headers (rate limits) are the first call's
    if isinstance(reply, ChunkStream):
        events = partial(text_completion_events, echoes=call.echoes) if call.echoes else text_completion_events
        return EventStream(reply, events, error_event)
    return await answer_of(reply, text_completion(reply.body, call.echoes))


def _prompt_context(first: Context, incoming: Incoming, index: int) -> Context:
    """The context of a batch's prompt `index`: the request's own for the first, then `<request id>-<index>`."""
    if index == 0:
        return first
    ctx = context(incoming, "completions")
    ctx.request_id = f"{first.request_id}-{index}"
    return ctx
