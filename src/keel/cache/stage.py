"""The exact cache stage: a repeated deterministic request is answered from the cache, without
calling upstream or spending money; on the way out only whole, clean answers are stored.

It sits after the budget stage and outside the cost and output guardrail stages: a hit is never
charged (the budget hold settles at 0), and what it stores has passed the output guardrails. The input
guardrails, outside it, put redacted values back after it: entries keep the placeholders.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Protocol, TypeVar

import orjson

from keel.cache.coalesce import Coalescer, Flight, LiveStream
from keel.cache.entry import CachedAnswer, CorruptEntry
from keel.cache.key import cache_key
from keel.cache.policy import CacheControl, deterministic, storable
from keel.cache.replay import joined_live, passed_on, served
from keel.cache.stores import clear_stores, stores_of
from keel.cost.money import Nanos
from keel.pipeline import Call, ChunkStream, Next, Reply, StreamClosed
from keel.types import ChatRequest

log = logging.getLogger("keel.cache")
T = TypeVar("T")


class CacheStore(Protocol):
    async def get(self, key: str) -> bytes | None: ...
    async def set(self, key: str, value: bytes, ttl_s: float) -> None: ...
    async def delete(self, key: str) -> None: ...
    async def clear(
        self, model: str | None = None, tenant: str | None = None, older_than_s: float | None = None,
        key_prefix: str | None = None,
    ) -> int: ...
    async def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class ExactSetting:
    """One model's exact cache, from its `cache` section."""

    store: CacheStore
    ttl_s: float
    nondeterministic: bool = False


class ExactCache:
    def __init__(self, settings: Mapping[str, ExactSetting]) -> None:
        self.settings = settings  # by model name; a model without one is not cached
        self.flights = Coalescer()

    def stores(self) -> list[CacheStore]:
        """Each store once (models may share one)."""
        return stores_of(self.settings)

    async def clear(
        self, *, model: str | None = None, tenant: str | None = None, older_than_s: float | None = None,
        key_prefix: str | None = None,
    ) -> int:
        """Invalidate: remove the entries that match every filter given (none: all), from each store
        they may be in; how many were removed. A model without the exact cache has none."""
        return await clear_stores(self.settings, model, tenant, older_than_s, key_prefix)

    async def __call__(self, call: Call, next: Next) -> Reply:
        setting, request, ctx = self.settings.get(call.model.name), call.request, call.ctx
        if setting is None or not isinstance(request, ChatRequest) or ctx.internal:
            return await next(call)
        control = CacheControl.parse(ctx.cache_control)
        if not deterministic(request, setting.nondeterministic) or (control.no_cache and control.no_store):
            ctx.cache_status = "bypass"
            return await next(call)
        key = cache_key(request, ctx.tenant)
        if not control.no_cache and (cached := await self._cached(setting, key, call)) is not None:
            return cached if isinstance(cached, ChunkStream) else served(call, cached, "hit_exact")
        ctx.cache_status = "bypass" if control.no_cache else "miss"
        if control.no_store:
            return await next(call)
        return await self._answer_and_store(call, next, setting, key)

    async def _cached(self, setting: ExactSetting, key: str, call: Call) -> CachedAnswer | ChunkStream | None:
        """A call of the same key under way, else the store, else (the lookup may have yielded) a call
        under way again."""
        return await self._joined(key, call) or await self._lookup(setting, key) or await self._joined(key, call)

    async def _joined(self, key: str, call: Call) -> CachedAnswer | ChunkStream | None:
        """The answer of the call of `key` under way: its live stream, for a streamed call that joins a
        streamed leader; else its stored answer, once stored."""
        flight = self.flights.joined(key)
        if flight is None:
            return None
        # A waiter waits no longer than its own deadline: a leader whose stream is never read to its end
        # never lands. Past it, the call goes on alone, and the reliability stage ends it as timed out.
        deadline = call.ctx.started + call.model.timeout_s
        if call.ctx.deadline is not None:
            deadline = min(deadline, call.ctx.deadline)
        try:
            live = await _until(flight.live, deadline)  # known once the leader's reply is
            if live is None or live.closed:
                return _own(await _until(flight.answer, deadline))
            if call.stream:
                async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                    joined = await live.join()  # after the leader's own read under way, if any
                if joined:
                    return joined_live(call, live, deadline)
                return _own(await _until(flight.answer, deadline))  # cut: None, the call goes on alone
            if deadline <= time.monotonic():
                return None  # a call with no time left has the stream read for no one
            live.want_whole()  # the leader's client may read slowly, or leave: the stream is read for this call
            try:
                return _own(await _until(flight.answer, deadline))
            finally:
                live.unwant_whole()
        except TimeoutError:
            return None

    async def _lookup(self, setting: ExactSetting, key: str) -> CachedAnswer | None:
        raw = await setting.store.get(key)
        if raw is None:
            return None
        try:
            return CachedAnswer.loads(raw)
        except CorruptEntry as exc:
            log.warning("dropped a cache entry that does not parse (%s); the call is a miss", exc)
            await setting.store.delete(key)
            return None

    async def _answer_and_store(self, call: Call, next: Next, setting: ExactSetting, key: str) -> Reply:
        leads = self.flights.joined(key) is None  # a no-cache call beside a flight stores, but leads nothing
        flight = self.flights.lead(key) if leads else None
        try:
            reply = await next(call)
        except Exception as exc:
            if leads:
                self.flights.land(key, exc)
            raise
        except BaseException:
            if leads:
                self.flights.land(key, None)
            raise
        if flight is not None and isinstance(reply, ChunkStream):
            return self._lead_stream(call, reply, flight, setting, key)
        reply.on_finish(self._storer(call, setting, key, leads, passed_on(reply)))
        return reply

    def _lead_stream(self, call: Call, reply: ChunkStream, flight: Flight, setting: ExactSetting, key: str) -> Reply:
        """The leader's stream, shared by the flight (`LiveStream`): the leader's client is one reader (it
        reads upstream itself while no one else does), the streamed calls that join are others. The
        leader's own reply is settled after the flight's stream: its bookkeeping (log, budget) sees the
        cost of the whole answer."""

        async def whole() -> dict[str, Any]:
            # What the source gathered as the chunks passed, before outer stages changed them in place.
            return reply.completion()

        reply.on_finish(self._storer(call, setting, key, True, whole))
        live = LiveStream(reply, lambda: _cost(call), lambda: self.flights.ended(live))
        self.flights.stream(flight, live)
        leader = ChunkStream(live.read(leads=True))
        leader.on_finish(lambda _: live.leader_settled())  # first: outer stages' finalisers run after it
        return leader

    def _storer(
        self, call: Call, setting: ExactSetting, key: str, leads: bool, answer: Callable[[], Awaitable[dict[str, Any]]],
    ) -> Callable[[Reply], Awaitable[None]]:
        """The finaliser that stores a whole, clean answer and lands the flight the call leads."""

        async def store(answered: Reply) -> None:
            stored: CachedAnswer | BaseException | None = None
            try:
                if answered.error is None:
                    completion = await answer()
                    if storable(completion):
                        stored = CachedAnswer(completion, _cost(call), time.time())
                elif not isinstance(answered.error, StreamClosed):
                    stored = answered.error  # a stream that failed fails its waiters alike
            finally:
                if leads:  # waiters are answered at once, not after the store's write
                    self.flights.land(key, stored)
            if isinstance(stored, CachedAnswer):
                await setting.store.set(key, stored.dumps(), setting.ttl_s)

        return store

    async def close(self) -> None:
        """Stop the streams of calls under way that are read for others (the Keel is closing)."""
        await self.flights.close()


def _cost(call: Call) -> Nanos:
    """What the call's answer cost, or (a semantic hit) what the stored one did: what each hit saves."""
    return call.ctx.cost.nanos + call.ctx.cache_saved_nanos


def _own(answer: CachedAnswer | None) -> CachedAnswer | None:
    """A flight's answer is one object for every waiter: each gets a copy of its own, as outer stages
    change an answer in place (restored PII). An answer read from a store is the call's own already."""
    return None if answer is None else replace(answer, completion=orjson.loads(orjson.dumps(answer.completion)))


async def _until(waited: asyncio.Future[T], deadline: float) -> T:
    """`waited`'s result, waited for until `deadline` (time.monotonic()); TimeoutError past it.
    Shielded: a waiter that is cancelled must not cancel the flight of the others."""
    return await asyncio.wait_for(asyncio.shield(waited), max(0.0, deadline - time.monotonic()))
