"""The exact cache: its key, its memory store, and the stage in the pipeline (hits, misses, bypass,
no-store, what is never cached, stream replay, coalescing, tenant scope)."""

from __future__ import annotations

import asyncio
import time
import tracemalloc
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson
import pytest

from keel.cache.coalesce import Coalescer
from keel.cache.entry import CachedAnswer
from keel.cache.key import cache_key
from keel.cache.memory import MemoryStore
from keel.cache.stage import ExactCache
from keel.chunks import folded, replay_chunks
from keel.config import parse_config
from keel.engine import Keel
from keel.errors import GuardrailViolation, KeelError, UpstreamConnectionError
from keel.pipeline import Call, ChunkStream, Completion, Context, Next, Reply
from keel.types import ChatRequest

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}]


def chat(stream: bool = False, **fields: Any) -> ChatRequest:
    return ChatRequest.model_validate({"model": "m", "messages": MESSAGES, "temperature": 0, "stream": stream,
                                       **fields})


# ---------------------------------------------------------------------------- the key


def test_the_key_ignores_field_order() -> None:
    one = ChatRequest.model_validate({"model": "m", "temperature": 0, "messages": MESSAGES,
                                      "response_format": {"type": "json_schema", "json_schema": {
                                          "name": "n", "schema": {"type": "object", "properties": {"a": {}}}}}})
    two = ChatRequest.model_validate({"response_format": {"json_schema": {
        "schema": {"properties": {"a": {}}, "type": "object"}, "name": "n"}, "type": "json_schema"},
        "messages": [{"content": m["content"], "role": m["role"]} for m in MESSAGES], "temperature": 0, "model": "m"})
    assert cache_key(one, None) == cache_key(two, None)


@pytest.mark.parametrize("change", [
    {"temperature": 0.5}, {"top_p": 0.9}, {"seed": 7}, {"max_tokens": 10}, {"max_completion_tokens": 10},
    {"stop": ["\n"]}, {"presence_penalty": 0.1}, {"frequency_penalty": 0.1}, {"logit_bias": {"50256": -100}},
    {"model": "other"}, {"messages": [{"role": "user", "content": "What is 2+3?"}]},
    {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]},
    {"tool_choice": "none"}, {"response_format": {"type": "json_object"}}, {"logprobs": True},
])
def test_any_change_to_what_determines_the_answer_changes_the_key(change: dict[str, Any]) -> None:
    assert cache_key(chat(**change), None) != cache_key(chat(), None)


def test_the_key_is_scoped_by_tenant_and_ignores_delivery_fields() -> None:
    assert cache_key(chat(), "acme") != cache_key(chat(), "globex") != cache_key(chat(), None)
    delivered = chat(stream=True, stream_options={"include_usage": True}, user="u1", metadata={"feature": "x"})
    assert cache_key(delivered, "acme") == cache_key(chat(), "acme")


# ---------------------------------------------------------------------------- the memory store


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_a_memory_entry_expires_after_its_ttl() -> None:
    clock = Clock()
    store = MemoryStore(1 << 20, clock=clock)
    await store.set("k", b"v", ttl_s=60)
    clock.now += 59.9
    assert await store.get("k") == b"v"
    clock.now += 0.1
    assert await store.get("k") is None
    assert len(store) == 0 and store.size == 0


async def test_the_memory_store_evicts_the_least_recently_used_past_its_bytes() -> None:
    store = MemoryStore(max_bytes=3 * (1 + 10))  # three entries of a 1-byte key and a 10-byte value
    for key in "abc":
        await store.set(key, b"x" * 10, ttl_s=60)
    assert await store.get("a") == b"x" * 10  # a is used: b is now the least recently used
    await store.set("d", b"y" * 10, ttl_s=60)
    assert [await store.get(k) is not None for k in "abcd"] == [True, False, True, True]
    assert store.size == 33
    await store.set("big", b"z" * 100, ttl_s=60)  # larger than the whole cache: not stored, nothing evicted
    assert await store.get("big") is None and len(store) == 3


async def test_the_memory_store_holds_about_what_it_counts() -> None:
    """orjson's bytes keep their whole output buffer (16 KB for 1.3 KB): stored as they are, entries
    took 6x what `max_bytes` counts (bench/cache.py). The store keeps exact-size copies."""
    store = MemoryStore(max_bytes=1 << 30)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(2000):  # each value made as the stage makes it, and given up once stored
            await store.set(f"k{i}", orjson.dumps({"i": i, "answer": "x" * 1300}), ttl_s=60)
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert held < 2 * store.size  # the count, plus the dict and entry overheads; not 6x


# ---------------------------------------------------------------------------- the stage


class Upstream:
    """Counts the calls that get past the cache; may hold them, fail them, or answer itself."""

    def __init__(self) -> None:
        self.calls = 0
        self.hold: asyncio.Event | None = None
        self.fail: Exception | None = None
        self.answer: Callable[[Call], Reply | None] | None = None  # None: the real (simulated) upstream

    async def __call__(self, call: Call, next: Next) -> Reply:
        self.calls += 1
        if self.hold is not None:
            await self.hold.wait()
        if self.fail is not None:
            raise self.fail
        answered = self.answer(call) if self.answer is not None else None
        return answered if answered is not None else await next(call)


@pytest.fixture
async def cached(tmp_path: Any) -> AsyncIterator[Callable[..., tuple[Keel, Upstream]]]:
    made: list[Keel] = []

    def make(**config: Any) -> tuple[Keel, Upstream]:
        upstream = Upstream()
        exact = {"enabled": True, **config.pop("exact", {})}
        keel = Keel(parse_config({
            "models": [{"name": "m", "deployments": [{"provider": "simulated", "price": {"input": 1, "output": 2}}]}],
            "cache": {"backend": "memory", "exact": exact},
            "store": {"url": f"sqlite:///{tmp_path}/keel.db", "spool_path": str(tmp_path / "spool.jsonl")},
            **config,
        }), stages=[upstream])
        made.append(keel)
        return keel, upstream

    yield make
    for keel in made:
        await keel.close()


async def ask(keel: Keel, request: ChatRequest, ctx: Context | None = None) -> tuple[str, Context]:
    ctx = ctx or Context()
    reply = await keel.handle(request, ctx)
    if isinstance(reply, Completion):
        return str(reply.body["choices"][0]["message"]["content"]), ctx
    return "".join([c["choices"][0]["delta"].get("content") or "" async for c in reply if c["choices"]]), ctx


async def test_a_repeated_request_is_a_hit_that_costs_nothing(cached: Any) -> None:
    keel, upstream = cached()
    first, miss = await ask(keel, chat())
    second, hit = await ask(keel, chat())
    assert first == second == "echo: What is 2+2?"
    assert upstream.calls == 1
    assert (miss.cache_status, hit.cache_status) == ("miss", "hit_exact")
    assert miss.cost.nanos > 0 and hit.cost.nanos == 0
    assert hit.cache_saved_nanos == miss.cost.nanos


async def test_only_deterministic_requests_are_cached_unless_keel_yaml_allows(cached: Any) -> None:
    keel, upstream = cached()
    for _ in range(2):
        _, ctx = await ask(keel, chat(temperature=0.7))
        assert ctx.cache_status == "bypass"
    assert upstream.calls == 2
    for _ in range(2):
        await ask(keel, chat(temperature=0.7, seed=1))
    assert upstream.calls == 3  # a seed makes it cacheable
    loose, loose_upstream = cached(exact={"nondeterministic": True})
    for _ in range(2):
        await ask(loose, chat(temperature=0.7))
    assert loose_upstream.calls == 1


async def test_no_cache_skips_the_lookup_but_stores_and_no_store_stores_nothing(cached: Any) -> None:
    keel, upstream = cached()
    await ask(keel, chat())
    _, fresh = await ask(keel, chat(), Context(cache_control="no-cache"))
    assert fresh.cache_status == "bypass" and upstream.calls == 2
    _, unstored = await ask(keel, chat(max_tokens=50), Context(cache_control="no-store"))
    assert unstored.cache_status == "miss"
    _, again = await ask(keel, chat(max_tokens=50))
    assert again.cache_status == "miss" and upstream.calls == 4  # nothing was stored by the no-store call
    _, hit = await ask(keel, chat(max_tokens=50))
    assert hit.cache_status == "hit_exact" and upstream.calls == 4


async def test_a_model_without_the_exact_cache_is_not_seen_by_it(cached: Any) -> None:
    keel, upstream = cached(exact={"enabled": False})
    assert keel.cache.exact is None and keel.cache.stages() == []
    for _ in range(2):
        _, ctx = await ask(keel, chat())
        assert ctx.cache_status == "none"
    assert upstream.calls == 2


def completion(finish: str | None, content: str = "answer") -> Completion:
    return Completion({"id": "c1", "object": "chat.completion", "created": 1, "model": "m", "usage": None,
                       "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                                    "finish_reason": finish}]})


async def chunks(fail: Exception | None = None, finish: str | None = "stop") -> AsyncIterator[dict[str, Any]]:
    for chunk in replay_chunks(completion(finish).body):
        if fail is not None and chunk["choices"] and chunk["choices"][0]["finish_reason"]:
            raise fail
        yield chunk


@pytest.mark.parametrize("answer", [
    lambda call: completion("content_filter"),  # an output guardrail replaced it
    lambda call: completion(None),  # no finish: cut short
    lambda call: ChunkStream(chunks(fail=UpstreamConnectionError("gone"))),  # a stream that ended in error
])
async def test_answers_that_did_not_end_cleanly_are_never_cached(
    cached: Any, answer: Callable[[Call], Reply]
) -> None:
    keel, upstream = cached()
    upstream.answer = answer
    for _ in range(2):
        reply = await keel.handle(chat(stream=True), Context())
        if isinstance(reply, ChunkStream):
            with pytest.raises(UpstreamConnectionError):
                _ = [c async for c in reply]
    assert upstream.calls == 2


async def test_errors_and_streams_the_client_left_are_never_cached(cached: Any) -> None:
    keel, upstream = cached()
    upstream.fail = UpstreamConnectionError("refused")
    with pytest.raises(UpstreamConnectionError):
        await keel.handle(chat(), Context())
    upstream.fail = None
    stream = await keel.handle(chat(stream=True), Context())
    assert isinstance(stream, ChunkStream)
    await stream.__anext__()
    await stream.aclose()  # the client left after the first chunk
    _, ctx = await ask(keel, chat())
    assert ctx.cache_status == "miss" and upstream.calls == 3


async def test_an_entry_that_no_longer_parses_is_dropped_not_served(cached: Any) -> None:
    keel, upstream = cached()
    assert keel.cache.exact is not None
    store = keel.cache.exact.settings["m"].store
    key = cache_key(chat(), None)
    await store.set(key, b'{"completion": {"choices": []}, "cost_nanos": 1}', 60)
    text, ctx = await ask(keel, chat())
    assert ctx.cache_status == "miss" and upstream.calls == 1 and text == "echo: What is 2+2?"
    raw = await store.get(key)
    assert raw is not None and CachedAnswer.loads(raw).completion["choices"][0]["message"]["content"] == text


# ---------------------------------------------------------------------------- stream replay


async def test_a_streamed_request_is_replayed_from_the_cache_as_the_live_stream_was(cached: Any) -> None:
    keel, upstream = cached()
    request = chat(stream=True, stream_options={"include_usage": True})
    live = [c async for c in await keel.handle(request, Context())]
    ctx = Context()
    replayed = [c async for c in await keel.handle(request, ctx)]
    assert ctx.cache_status == "hit_exact" and upstream.calls == 1

    def shape(stream: list[dict[str, Any]]) -> list[Any]:
        return [(c["object"], c["model"], [(ch["index"], ch["finish_reason"]) for ch in c["choices"]],
                 c.get("usage")) for c in stream]

    assert [c["choices"][0]["delta"] for c in replayed[:1]] == [{"role": "assistant", "content": ""}]
    assert replayed[-1]["choices"] == [] and replayed[-1]["usage"] == live[-1]["usage"]
    assert shape(replayed)[-2:] == shape(live)[-2:]  # the finish chunk, then the usage chunk
    assert (await folded(replayed))["choices"] == (await folded(live))["choices"]
    # Asked without include_usage, the replay hides the usage chunk like a live stream does.
    plain = [c async for c in await keel.handle(chat(stream=True), Context())]
    assert all(c["choices"] for c in plain) and upstream.calls == 1


async def test_a_plain_request_is_answered_from_a_streamed_one_and_back(cached: Any) -> None:
    keel, upstream = cached()
    streamed, _ = await ask(keel, chat(stream=True))
    plain, ctx = await ask(keel, chat())
    assert streamed == plain and ctx.cache_status == "hit_exact" and upstream.calls == 1


def test_replay_chunks_carry_tool_calls() -> None:
    call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    body = {"id": "c", "created": 1, "model": "m", "usage": {"prompt_tokens": 1},
            "choices": [{"index": 0, "finish_reason": "tool_calls",
                         "message": {"role": "assistant", "content": None, "tool_calls": [call]}}]}
    deltas = [c["choices"][0]["delta"] if c["choices"] else "usage" for c in replay_chunks(body)]
    assert deltas == [{"role": "assistant", "content": ""}, {"tool_calls": [{"index": 0, **call}]}, {}, "usage"]


# ---------------------------------------------------------------------------- coalescing


class CountedCoalescer(Coalescer):
    """Sets `all_waiting` once `expected` calls wait on a flight."""

    def __init__(self, expected: int) -> None:
        super().__init__()
        self.expected = expected
        self.waiting = 0
        self.all_waiting = asyncio.Event()

    def joined(self, key: str) -> asyncio.Future[CachedAnswer | None] | None:
        flight = super().joined(key)
        if flight is not None and not flight.done():
            self.waiting += 1
            if self.waiting >= self.expected:
                self.all_waiting.set()
        return flight


def coalesced(keel: Keel, waiters: int) -> CountedCoalescer:
    assert isinstance(keel.cache.exact, ExactCache)
    keel.cache.exact.flights = CountedCoalescer(waiters)
    return keel.cache.exact.flights


async def test_100_concurrent_identical_calls_make_one_upstream_call(cached: Any) -> None:
    keel, upstream = cached()
    upstream.hold = asyncio.Event()
    flights = coalesced(keel, 99)
    calls = [asyncio.create_task(ask(keel, chat(stream=i % 2 == 0))) for i in range(100)]
    await flights.all_waiting.wait()
    upstream.hold.set()
    answers = await asyncio.gather(*calls)
    assert upstream.calls == 1
    assert {text for text, _ in answers} == {"echo: What is 2+2?"}
    assert sorted(ctx.cache_status for _, ctx in answers) == ["hit_exact"] * 99 + ["miss"]


async def test_a_failed_leader_fails_its_waiters_and_nothing_is_stored(cached: Any) -> None:
    keel, upstream = cached()
    upstream.hold = asyncio.Event()
    upstream.fail = UpstreamConnectionError("the upstream refused")
    flights = coalesced(keel, 9)
    calls = [asyncio.create_task(ask(keel, chat())) for _ in range(10)]
    await flights.all_waiting.wait()
    upstream.hold.set()
    results = await asyncio.gather(*calls, return_exceptions=True)
    assert all(isinstance(r, UpstreamConnectionError) and "refused" in r.message for r in results)
    assert upstream.calls == 1
    upstream.fail = None
    _, ctx = await ask(keel, chat())
    assert ctx.cache_status == "miss" and upstream.calls == 2


async def test_waiters_of_a_leader_whose_answer_is_not_stored_call_upstream_themselves(cached: Any) -> None:
    keel, upstream = cached()
    upstream.hold = asyncio.Event()
    # The leader's answer is filtered, so not stored; the released waiters: one leads, the other waits for it.
    upstream.answer = lambda call: completion("content_filter") if upstream.calls == 1 else None
    flights = coalesced(keel, 2)
    calls = [asyncio.create_task(ask(keel, chat())) for _ in range(3)]
    await flights.all_waiting.wait()
    upstream.hold.set()
    texts = [text for text, _ in await asyncio.gather(*calls)]
    assert texts == ["answer", "echo: What is 2+2?", "echo: What is 2+2?"]
    assert upstream.calls == 2


# ---------------------------------------------------------------------------- tenants and redacted input


async def test_callers_with_different_emails_in_one_prompt_shape_never_get_each_others(cached: Any) -> None:
    keel, upstream = cached(guardrails={"input": {"pii": {"action": "redact"}}})
    asked = [f"Write a greeting to {who}@example.com" for who in ("alice", "bob", "alice", "bob")]
    answers = []
    for text in asked:
        request = chat(messages=[{"role": "user", "content": text}])
        answers.append(await ask(keel, request))
    assert [text for text, _ in answers] == [f"echo: {text}" for text in asked]
    assert [ctx.cache_status for _, ctx in answers] == ["miss", "hit_exact", "hit_exact", "hit_exact"]
    assert upstream.calls == 1
    assert keel.cache.exact is not None
    store = keel.cache.exact.settings["m"].store
    assert isinstance(store, MemoryStore) and len(store) == 1
    redacted = chat(messages=[{"role": "user", "content": "Write a greeting to <EMAIL_ADDRESS_1>"}])
    entry = await store.get(cache_key(redacted, None))  # stored in the placeholder form: no one's address
    assert entry is not None and b"@example.com" not in entry and b"<EMAIL_ADDRESS_1>" in entry


async def test_the_same_prompt_from_two_tenants_is_never_a_cross_tenant_hit(cached: Any) -> None:
    keel, upstream = cached()
    for tenant in ("acme", "globex", "acme", "globex"):
        ctx = Context()
        ctx.tenant = tenant
        await ask(keel, chat(), ctx)
    assert upstream.calls == 2


async def test_a_hit_spends_nothing_from_a_budget_and_leaves_no_hold(cached: Any) -> None:
    keel, _ = cached(budgets=[{"scope": "global", "window": "total", "limit_usd": 1}])
    _, miss = await ask(keel, chat())

    async def counter() -> dict[str, Any]:
        [rule] = await keel.budgets.status()
        [count] = rule["counters"]
        return dict(count)

    spent = await counter()
    assert spent["spent_usd"] == miss.cost.usd > 0 and spent["reserved_usd"] == 0
    for _ in range(3):
        await ask(keel, chat())
    assert await counter() == spent


@pytest.mark.parametrize("stream", [False, True])
async def test_an_answer_an_output_guardrail_blocked_is_never_cached(cached: Any, stream: bool) -> None:
    keel, upstream = cached(guardrails={"output": {"deny_patterns": ["echo"], "deny_action": "block"}})
    for _ in range(2):
        with pytest.raises(GuardrailViolation):
            await ask(keel, chat(stream=stream))
    assert upstream.calls == 2


async def test_a_waiter_waits_no_longer_than_its_own_deadline_for_a_leader_that_never_lands(cached: Any) -> None:
    """A library caller leads with a stream it never reads: the flight never lands. A waiter whose
    deadline has passed does not hang on it; its own call ends as timed out."""
    keel, upstream = cached()
    leader = await keel.handle(chat(stream=True))  # never read, never closed until the end of the test
    assert isinstance(leader, ChunkStream) and upstream.calls == 1
    waiter = Context(deadline=time.monotonic())  # its whole deadline already spent
    with pytest.raises(KeelError) as ended:
        await asyncio.wait_for(keel.handle(chat(), waiter), timeout=30)  # the bound only guards a regression
    assert ended.value.code == "timeout"
    await leader.aclose()
