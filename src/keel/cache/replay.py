"""A cached answer served (replayed as a stream to a streamed request: `keel.chunks`), joined live, and
a live one kept for the cache."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, cast

import orjson

from keel.cache.coalesce import LiveStream
from keel.cache.entry import CachedAnswer
from keel.chunks import folded, replay
from keel.ids import random_hex
from keel.pipeline import Call, ChunkStream, Completion, Reply


def served(call: Call, cached: CachedAnswer, status: str) -> Reply:
    """`cached` as the call's answer (a stream for a streamed call), marked as a hit (`status`) that
    saved what the answer cost when it was stored."""
    call.ctx.cache_status = status
    call.ctx.cache_saved_nanos = cached.cost_nanos
    # `cached` is this call's own (read from a store, or copied for a waiter: `stage._own`): outer stages
    # may change it in place (restored PII).
    body = {**cached.completion, "id": "chatcmpl-" + random_hex(12)}
    return ChunkStream(replay(body)) if call.stream else Completion(body)


def joined_live(call: Call, live: LiveStream, until: float) -> ChunkStream:
    """The live stream of an identical call under way, as this streamed call's answer: the chunks so far
    at once, then the rest as they arrive, with an id of its own (as a replay's). A hit, that saved
    what the leader's answer cost: known at the end, recorded before the stream ends (the request log
    has it). `until`: the call's deadline (time.monotonic()) for each wait on a next chunk."""
    ctx = call.ctx
    ctx.cache_status = "hit_exact"

    def saved() -> None:
        ctx.cache_saved_nanos = live.saved

    return ChunkStream(live.read("chatcmpl-" + random_hex(12), until, saved))


def passed_on(reply: Reply) -> Callable[[], Awaitable[dict[str, Any]]]:
    """What a cache stage passed on, to read once the reply is settled: outer stages change the answer
    after (the input guardrails put redacted values back), and that must not be stored."""
    if isinstance(reply, Completion):
        snapshot = orjson.dumps(reply.body)

        async def whole() -> dict[str, Any]:
            return cast(dict[str, Any], orjson.loads(snapshot))

        return whole
    chunks: list[dict[str, Any]] = []
    reply.wrap(lambda source: _tap(source, chunks))
    return lambda: folded(chunks)


async def _tap(source: AsyncIterator[dict[str, Any]], seen: list[dict[str, Any]]) -> AsyncIterator[dict[str, Any]]:
    """The chunks as they pass, kept (never held back) for the store at the stream's end."""
    async for chunk in source:
        seen.append(chunk)
        yield chunk
