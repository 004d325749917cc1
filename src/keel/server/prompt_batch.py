"""A batch of prompts (`/v1/completions` with a list) as one reply: each prompt is a call of its own through
the pipeline, at most `CONCURRENCY` in flight (keel.parallel), and their answers are merged into what
the dialect sends back — one chat.completion whose choice `index` is the prompt's place, or one stream
whose chunks carry it.

Every call keeps its own bookkeeping: its record in the request log (request ids `<id>`, `<id>-1`,
`<id>-2`, … so the id the client saw finds the first and prefixes the rest), its cost, budget charge and
cache lookup. The merged reply settles them all once it has been delivered. A call that fails fails the
request with its error (OpenAI's behaviour: one answer or none); the calls already answered are settled,
so their records and charges stand.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from keel.engine import Keel
from keel.parallel import CallCancelled, gather
from keel.pipeline import ChunkStream, Completion, Context, Reply
from keel.types import ChatRequest

CONCURRENCY = 8  # prompts of one request in flight at once


async def batch_reply(keel: Keel, requests: Sequence[ChatRequest], contexts: Callable[[int], Context]) -> Reply:
    """The merged reply to `requests`, the call of prompt i in context `contexts(i)`; for the gateway to
    deliver and then settle (which settles every call)."""
    calls = [keel.handle(request, contexts(i), caller_settles=True) for i, request in enumerate(requests)]
    replies = await gather(calls, concurrency=CONCURRENCY, fail_fast=True)
    done = [reply for reply in replies if not isinstance(reply, Exception)]
    failed = [error for error in replies if isinstance(error, Exception)]
    if failed:
        for reply in done:
            await reply.settle()
        raise next((error for error in failed if not isinstance(error, CallCancelled)), failed[0])
    merged: Reply
    if isinstance(done[0], ChunkStream):
        merged = ChunkStream(_merged([reply for reply in done if isinstance(reply, ChunkStream)]))
        merged.settles_at_end = False
    else:
        merged = Completion(_merged_body([reply.body for reply in done if isinstance(reply, Completion)]))

    async def settle_all(_: Reply) -> None:
        for reply in done:
            await reply.settle()

    merged.on_finish(settle_all)
    return merged


def _merged_body(bodies: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Whole answers as one chat.completion: the first's id and model, choice i from answer i, usage summed."""
    merged = dict(bodies[0])
    merged["choices"] = [{**(body.get("choices") or [{}])[0], "index": i} for i, body in enumerate(bodies)]
    usage = _summed_usage([body.get("usage") for body in bodies])
    if usage is not None:
        merged["usage"] = usage
    return merged


async def _merged(streams: Sequence[ChunkStream]) -> AsyncIterator[dict[str, Any]]:
    """The streams' chunks as they come, each choice at its stream's index; their usage chunks (when the
    client asked for usage) summed into one at the end, as one call's stream ends."""
    queue: asyncio.Queue[tuple[int, dict[str, Any] | BaseException | None]] = asyncio.Queue()

    async def pump(index: int, stream: ChunkStream) -> None:
        try:
            async for chunk in stream:
                await queue.put((index, chunk))
        except Exception as exc:
            await queue.put((index, exc))
        else:
            await queue.put((index, None))

    pumps = [asyncio.create_task(pump(i, stream)) for i, stream in enumerate(streams)]
    usages: list[dict[str, Any] | None] = []
    last: dict[str, Any] | None = None
    try:
        running = len(pumps)
        while running:
            index, item = await queue.get()
            if item is None:
                running -= 1
                continue
            if isinstance(item, BaseException):
                raise item
            last = item
            choices = item.get("choices")
            if not choices:
                usages.append(item.get("usage"))
                continue
            yield {**item, "choices": [{**choice, "index": index} for choice in choices], "usage": None}
        usage = _summed_usage(usages)
        if usage is not None and last is not None:
            yield {**last, "choices": [], "usage": usage}
    finally:
        for task in pumps:
            task.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)


def _summed_usage(usages: Sequence[dict[str, Any] | None]) -> dict[str, Any] | None:
    """The token counts of several calls added up (None when none had any)."""
    counted = [usage for usage in usages if usage]
    if not counted:
        return None
    total: dict[str, Any] = {}
    for usage in counted:
        for name, value in usage.items():
            if isinstance(value, int) and not isinstance(value, bool):
                total[name] = total.get(name, 0) + value
            elif isinstance(value, dict):
                inner = total.setdefault(name, {})
                for key, count in value.items():
                    if isinstance(count, int) and not isinstance(count, bool):
                        inner[key] = inner.get(key, 0) + count
    return total
