"""Coalescing of streams: a streamed call that joins a streamed call of the same key under way reads
its stream live (the chunks so far, then each next one as it arrives), as a hit of its own; failures,
a leader's client that leaves, and the Keel closing. Event-driven: a `Feed` lets the test say when
each upstream chunk is emitted."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import RecordingSink
from test_cache_exact import Upstream, chat, coalesced

from keel.cache.coalesce import LiveStream
from keel.cache.key import cache_key
from keel.cache.memory import MemoryStore
from keel.cache.stage import ExactCache
from keel.chunks import replay_chunks
from keel.config import TracingConfig, parse_config
from keel.engine import Keel
from keel.errors import UpstreamConnectionError
from keel.observability.metrics import Metrics
from keel.observability.stage import Observe
from keel.observability.tracing import Tracing
from keel.pipeline import Attempt, Call, ChunkStream, Completion, Context, StreamClosed

PIECES = ["The ", "answer ", "is ", "four."]
USAGE = {"prompt_tokens": 12, "completion_tokens": 4, "total_tokens": 16}


def upstream_chunks() -> list[dict[str, Any]]:
    """Role, one chunk per piece, finish, usage: what a live upstream stream sends."""
    body = {"id": "chatcmpl-upstream", "created": 1, "model": "m", "usage": USAGE,
            "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": ""}}]}
    role, finish, usage = (c for i, c in enumerate(replay_chunks(body)) if i in (0, 1, 2))
    pieces = [{**role, "choices": [{"index": 0, "delta": {"content": p}, "finish_reason": None, "logprobs": None}]}
              for p in PIECES]
    return [role, *pieces, finish, usage]


class Feed:
    """An upstream stream whose chunks the test releases one by one (or fails, or ends)."""

    END = object()

    def __init__(self) -> None:
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        self.emitted = 0
        self.asked = asyncio.Event()  # someone waits for the next chunk
        self.closed = asyncio.Event()  # the stream was closed before its end

    def emit(self, *chunks: dict[str, Any]) -> None:
        for chunk in chunks:
            self.queue.put_nowait(chunk)

    async def stream(self) -> AsyncIterator[dict[str, Any]]:
        ended = False
        try:
            while True:
                if self.queue.empty():
                    self.asked.set()
                item = await self.queue.get()
                self.asked.clear()
                if item is Feed.END:
                    ended = True
                    return
                if isinstance(item, Exception):
                    ended = True
                    raise item
                self.emitted += 1
                yield item
        finally:
            if not ended:
                self.closed.set()


@pytest.fixture
async def fed(tmp_path: Path) -> AsyncIterator[Callable[[], tuple[Keel, Upstream, Feed, RecordingSink]]]:
    made: list[Keel] = []

    def make() -> tuple[Keel, Upstream, Feed, RecordingSink]:
        upstream, feed, sink = Upstream(), Feed(), RecordingSink()

        def answer(call: Call) -> ChunkStream | None:
            if upstream.calls > 1:
                return None  # the simulated upstream
            name = call.deployments[0].name  # what the reliability stage records: the price is this deployment's
            call.ctx.deployment = name
            call.ctx.attempts.append(Attempt(name, started=0.0))
            return ChunkStream(feed.stream())

        upstream.answer = answer
        keel = Keel(parse_config({
            "models": [{"name": "m", "deployments": [{"provider": "simulated", "price": {"input": 1, "output": 2}}]}],
            "cache": {"backend": "memory", "exact": {"enabled": True}},
            "store": {"url": f"sqlite:///{tmp_path}/keel.db", "spool_path": str(tmp_path / "spool.jsonl")},
        }), stages=[Observe(sink, Tracing(TracingConfig(), sink), Metrics()), upstream])
        made.append(keel)
        return keel, upstream, feed, sink

    yield make
    for keel in made:
        await keel.close()


async def stream_of(keel: Keel, ctx: Context, **fields: Any) -> ChunkStream:
    reply = await keel.handle(chat(stream=True, **fields), ctx)
    assert isinstance(reply, ChunkStream)
    return reply


async def take(stream: ChunkStream, n: int) -> list[dict[str, Any]]:
    return [await stream.__anext__() for _ in range(n)]


def text(chunks: list[dict[str, Any]]) -> str:
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])


def stored(keel: Keel) -> MemoryStore:
    assert keel.cache.exact is not None
    store = keel.cache.exact.settings["m"].store
    assert isinstance(store, MemoryStore)
    return store


async def test_a_streamed_call_joins_a_stream_under_way_and_reads_it_live(fed: Any) -> None:
    keel, upstream, feed, sink = fed()
    sent = upstream_chunks()
    leader_ctx, asked_ctx, plain_ctx = Context(), Context(), Context()
    leader = await stream_of(keel, leader_ctx)
    feed.emit(*sent[:3])  # role and two pieces
    early = await take(leader, 3)
    # Two calls join mid-stream (one asked for the usage chunk): the chunks so far at once, while
    # the upstream still holds the rest.
    asked = await stream_of(keel, asked_ctx, stream_options={"include_usage": True})
    plain = await stream_of(keel, plain_ctx)
    caught_up = [await take(s, 3) for s in (asked, plain)]
    assert feed.emitted == 3 and upstream.calls == 1
    assert [text(c) for c in caught_up] == [text(early)] * 2 and text(early) == "The answer "
    # The next chunk reaches a joiner only once the upstream has emitted it.
    pending = asyncio.create_task(asked.__anext__())
    await feed.asked.wait()
    assert not pending.done() and feed.emitted == 3
    feed.emit(sent[3])
    assert text([await pending]) == "is " and feed.emitted == 4
    feed.emit(*sent[4:], Feed.END)
    rest = {name: [c async for c in s] for name, s in (("leader", leader), ("asked", asked), ("plain", plain))}
    whole = {"leader": early + rest["leader"], "asked": caught_up[0] + [pending.result()] + rest["asked"],
             "plain": caught_up[1] + rest["plain"]}
    assert {text(c) for c in whole.values()} == {"".join(PIECES)} and upstream.calls == 1
    # Usage only for the call that asked; each joiner's chunks carry an id of its own.
    assert [c.get("usage") for c in whole["asked"] if not c["choices"]] == [USAGE]
    assert all(c["choices"] for c in whole["plain"] + whole["leader"])
    ids = {name: {c["id"] for c in chunks} for name, chunks in whole.items()}
    assert ids["leader"] == {"chatcmpl-upstream"}
    assert len(ids["asked"]) == len(ids["plain"]) == 1 and len(ids["asked"] | ids["plain"] | ids["leader"]) == 3
    # Hits that saved what the leader's answer cost, in the context and the request log.
    assert leader_ctx.cache_status == "miss" and leader_ctx.cost.nanos > 0
    for ctx in (asked_ctx, plain_ctx):
        assert (ctx.cache_status, ctx.cache_saved_nanos, ctx.cost.nanos) == ("hit_exact", leader_ctx.cost.nanos, 0)
    records = {r.request_id: r for r in sink.records}
    for ctx in (asked_ctx, plain_ctx):
        record = records[ctx.request_id]
        assert record.cache_status == "hit_exact" and record.cost_saved_usd == records[leader_ctx.request_id].cost_usd
    assert await stored(keel).get(cache_key(chat(), None)) is not None


async def test_100_concurrent_streamed_calls_make_one_upstream_call_and_read_one_text(fed: Any) -> None:
    keel, upstream, _, _ = fed()
    upstream.answer = None  # the simulated upstream
    upstream.hold = asyncio.Event()
    flights = coalesced(keel, 99)

    async def read(ctx: Context) -> str:
        return text([c async for c in await stream_of(keel, ctx)])

    contexts = [Context() for _ in range(100)]
    calls = [asyncio.create_task(read(ctx)) for ctx in contexts]
    await flights.all_waiting.wait()
    upstream.hold.set()
    texts = await asyncio.gather(*calls)
    assert upstream.calls == 1 and set(texts) == {"echo: What is 2+2?"}
    assert sorted(ctx.cache_status for ctx in contexts) == ["hit_exact"] * 99 + ["miss"]
    [leader] = [ctx for ctx in contexts if ctx.cache_status == "miss"]
    assert {ctx.cache_saved_nanos for ctx in contexts if ctx is not leader} == {leader.cost.nanos}


async def test_a_leader_that_fails_mid_stream_fails_every_joined_stream_and_nothing_is_stored(fed: Any) -> None:
    keel, upstream, feed, _ = fed()
    sent = upstream_chunks()
    streams = [await stream_of(keel, Context())]
    feed.emit(*sent[:2])
    await take(streams[0], 2)
    streams += [await stream_of(keel, Context()) for _ in range(2)]
    for joined in streams[1:]:
        assert text(await take(joined, 2)) == "The "
    feed.emit(UpstreamConnectionError("the upstream dropped the connection"))
    for stream in streams:
        with pytest.raises(UpstreamConnectionError, match="dropped"):
            await stream.__anext__()
        assert isinstance(stream.error, UpstreamConnectionError)
    assert await stored(keel).get(cache_key(chat(), None)) is None
    reply = await keel.handle(chat(), Context())
    assert isinstance(reply, Completion) and upstream.calls == 2


async def test_the_stream_is_read_on_for_joiners_when_the_leaders_client_leaves(fed: Any) -> None:
    keel, upstream, feed, sink = fed()
    sent = upstream_chunks()
    leader_ctx, joined_ctx = Context(), Context()
    leader = await stream_of(keel, leader_ctx)
    feed.emit(*sent[:2])
    await take(leader, 2)
    joined = await stream_of(keel, joined_ctx)
    assert text(await take(joined, 2)) == "The "
    # The leader's client leaves: its bookkeeping waits for the stream's end (the whole answer is its cost).
    left = asyncio.create_task(leader.aclose())
    await feed.asked.wait()
    assert not feed.closed.is_set() and not left.done()
    feed.emit(*sent[2:], Feed.END)
    assert text([c async for c in joined]) == "".join(PIECES[1:])
    await left
    assert isinstance(leader.error, StreamClosed) and not feed.closed.is_set()
    assert leader_ctx.cost.nanos > 0 and joined_ctx.cache_saved_nanos == leader_ctx.cost.nanos
    [record] = [r for r in sink.records if r.request_id == leader_ctx.request_id]
    assert record.outcome == "client_closed" and record.cost_nanousd == leader_ctx.cost.nanos
    # Stored whole: the next call is a hit.
    again = await keel.handle(chat(), Context())
    assert isinstance(again, Completion) and again.body["choices"][0]["message"]["content"] == "".join(PIECES)
    assert upstream.calls == 1


async def test_the_upstream_is_closed_once_every_reader_has_left_and_nothing_is_stored(fed: Any) -> None:
    keel, upstream, feed, _ = fed()
    leader = await stream_of(keel, Context())
    feed.emit(*upstream_chunks()[:2])
    await take(leader, 2)
    joined = await stream_of(keel, Context())
    await take(joined, 2)
    await joined.aclose()
    assert not feed.closed.is_set()  # the leader still reads
    await leader.aclose()
    await feed.closed.wait()
    assert await stored(keel).get(cache_key(chat(), None)) is None
    assert isinstance(keel.cache.exact, ExactCache) and not keel.cache.exact.flights._live
    await keel.handle(chat(), Context())
    assert upstream.calls == 2


async def test_a_plain_call_joining_a_streamed_leader_gets_the_whole_answer(fed: Any) -> None:
    keel, upstream, feed, _ = fed()
    leader = await stream_of(keel, Context())
    plain_ctx = Context()
    plain = asyncio.create_task(keel.handle(chat(), plain_ctx))
    await feed.asked.wait()  # the leader has read nothing: the plain call has the stream read for it
    feed.emit(*upstream_chunks(), Feed.END)
    reply = await plain
    assert isinstance(reply, Completion) and reply.body["choices"][0]["message"]["content"] == "".join(PIECES)
    assert plain_ctx.cache_status == "hit_exact" and upstream.calls == 1
    assert text([c async for c in leader]) == "".join(PIECES)


async def test_closing_the_cache_stops_a_stream_under_way(fed: Any) -> None:
    keel, _, feed, _ = fed()
    leader = await stream_of(keel, Context())
    feed.emit(*upstream_chunks()[:2])
    await take(leader, 2)
    joined = await stream_of(keel, Context())
    await take(joined, 2)
    assert isinstance(keel.cache.exact, ExactCache)
    await keel.cache.exact.close()
    assert feed.closed.is_set()
    for stream in (leader, joined):
        with pytest.raises(StreamClosed):
            await stream.__anext__()


# ---------------------------------------------------------------------------- a leader alone: the fast path


async def test_a_leader_alone_reads_upstream_itself_with_no_task_and_no_copy(fed: Any) -> None:
    keel, upstream, feed, _ = fed()
    sent = upstream_chunks()
    before = asyncio.all_tasks()
    leader = await stream_of(keel, Context())
    feed.emit(*sent[:3])
    got = await take(leader, 3)
    # The chunks the source yielded, themselves (no copy made for the leader), and no task reads for it.
    assert all(a is b for a, b in zip(got, sent[:3], strict=True))
    assert asyncio.all_tasks() == before
    feed.emit(*sent[3:], Feed.END)
    got += [c async for c in leader]
    assert all(a is b for a, b in zip(got, sent[:-1], strict=True)) and asyncio.all_tasks() == before
    # Still stored whole (from what passed, before outer stages could change it) and the flight is gone.
    hit = await keel.handle(chat(), Context())
    assert isinstance(hit, Completion) and hit.body["choices"][0]["message"]["content"] == "".join(PIECES)
    assert upstream.calls == 1 and isinstance(keel.cache.exact, ExactCache) and not keel.cache.exact.flights._live


async def test_a_call_joining_while_the_leader_reads_gets_every_chunk_read_once(fed: Any) -> None:
    keel, upstream, feed, _ = fed()
    sent = upstream_chunks()
    leader = await stream_of(keel, Context())
    feed.emit(sent[0])
    first = await take(leader, 1)
    pending = asyncio.create_task(leader.__anext__())  # the leader's own read of the upstream, under way
    await feed.asked.wait()
    # The joiner waits for the leader's read under way before it reads anything (it may be cut).
    joining = asyncio.create_task(stream_of(keel, Context()))
    await feed.asked.wait()
    assert not joining.done()
    feed.emit(sent[1])
    assert text([await pending]) == "The "
    joined = await joining
    assert text(await take(joined, 2)) == "The "  # the role chunk and the one the leader's read brought
    assert feed.emitted == 2  # the read under way finished before anyone else read upstream
    feed.emit(*sent[2:], Feed.END)
    rest = {name: [c async for c in s] for name, s in (("leader", leader), ("joined", joined))}
    assert {text(c) for c in rest.values()} == {"".join(PIECES[1:])} and text(first) == ""
    assert feed.emitted == len(sent) and upstream.calls == 1


async def test_closing_the_cache_stops_a_leader_reading_alone(fed: Any) -> None:
    keel, _, feed, _ = fed()
    before = asyncio.all_tasks()
    leader = await stream_of(keel, Context())
    feed.emit(upstream_chunks()[0])
    await take(leader, 1)
    pending = asyncio.create_task(leader.__anext__())  # the leader waits on upstream
    await feed.asked.wait()
    assert isinstance(keel.cache.exact, ExactCache)
    await keel.cache.exact.close()
    with pytest.raises(StreamClosed):
        await pending
    assert feed.closed.is_set() and not keel.cache.exact.flights._live
    assert asyncio.all_tasks() == before


async def test_a_leader_alone_whose_read_is_cancelled_closes_the_upstream_and_stores_nothing(fed: Any) -> None:
    keel, upstream, feed, _ = fed()
    leader = await stream_of(keel, Context())
    pending = asyncio.create_task(leader.__anext__())  # a gateway client that leaves cancels the read under way
    await feed.asked.wait()
    pending.cancel()
    with pytest.raises(asyncio.CancelledError):
        await pending
    await feed.closed.wait()
    assert isinstance(leader.error, asyncio.CancelledError)
    assert isinstance(keel.cache.exact, ExactCache) and not keel.cache.exact.flights._live
    assert await stored(keel).get(cache_key(chat(), None)) is None
    await keel.handle(chat(), Context())
    assert upstream.calls == 2


async def test_a_call_joining_during_a_leaders_read_that_is_cut_calls_upstream_itself(
    fed: Any, monkeypatch: pytest.MonkeyPatch,
) -> None:
    keel, upstream, feed, _ = fed()
    joins = asyncio.Event()
    join = LiveStream.join

    async def joining_seen(live: LiveStream) -> bool:
        joins.set()  # the joiner waits in `join` from here, in the same step
        return await join(live)

    monkeypatch.setattr(LiveStream, "join", joining_seen)
    leader = await stream_of(keel, Context())
    feed.emit(upstream_chunks()[0])
    await take(leader, 1)
    pending = asyncio.create_task(leader.__anext__())  # the leader's own read of the upstream, under way
    await feed.asked.wait()
    joined_ctx = Context()
    joining = asyncio.create_task(stream_of(keel, joined_ctx))
    await joins.wait()  # it reached the flight, and waits for the read under way
    assert not joining.done()
    pending.cancel()  # the leader's client leaves mid-read: the upstream stream is cut
    with pytest.raises(asyncio.CancelledError):
        await pending
    # The joiner saw none of the cut stream: it called upstream itself and read a whole answer.
    assert text([c async for c in await joining]) == "echo: What is 2+2?"
    assert feed.closed.is_set() and upstream.calls == 2 and joined_ctx.cache_status == "miss"
