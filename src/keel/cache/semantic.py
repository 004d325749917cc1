"""The semantic cache stage: a request worded differently from one answered before, but meaning the
same, gets that answer, without an upstream call or any spend.

It sits just inside the exact cache (an exact match is looked up first, and costs no embedding) and
outside the cost and output guardrail stages, as the exact cache does. For a call it may serve (see
`eligible`), the last user turn is embedded with the local embedder and looked up among the entries of
the same scope (`keel.cache.semantic_key`): tenant, model, earlier messages, parameters. A neighbour at
or above the model's threshold is served only when the guards (`keel.cache.guards`) find no difference
that changes the answer ("2 tickets" vs "3 tickets"); the best neighbour the guards let through wins.
On a miss the answer is stored with its vector once it has ended whole.

The store is an optimisation: an embedder or store failure makes the call a miss, logged and counted.
"""

from __future__ import annotations

import logging
import random
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson
from prometheus_client.core import CounterMetricFamily, Metric

from keel.cache.entry import CachedAnswer, CorruptEntry
from keel.cache.guards import guard
from keel.cache.policy import CacheControl, deterministic, storable
from keel.cache.replay import passed_on, served
from keel.cache.semantic_key import semantic_query, semantic_scope
from keel.cache.semantic_store import Neighbour, VectorStore
from keel.cache.stores import clear_stores, stores_of
from keel.embedding.model import TRAINED_TOKENS
from keel.pipeline import Call, Next, Reply
from keel.types import ChatRequest

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    from keel.embedding.shared import Embedder

log = logging.getLogger("keel.cache")


@dataclass(frozen=True, slots=True)
class SemanticSetting:
    """One model's semantic cache, from its `cache.semantic` section."""

    store: VectorStore
    threshold: float  # cosine similarity a neighbour needs
    ttl_s: float
    guards: bool = True  # run the guards on a candidate before serving it
    candidates: int = 4  # neighbours above the threshold the guards may look at, best first
    nondeterministic: bool = False  # also requests with temperature above 0 and no seed
    tools: bool = False  # also requests that offer tools
    review_rate: float = 0.0  # the share of semantic hits handed to the review hook


@dataclass(frozen=True, slots=True)
class SemanticHit:
    """A semantic hit, as the review hook gets it: what was asked, what the served answer was stored
    for, how similar they were, and the answer."""

    request_id: str
    tenant: str | None
    model: str
    query: str
    cached_query: str
    similarity: float
    completion: dict[str, Any]


ReviewHook = Callable[[SemanticHit], None]


def eligible(request: ChatRequest, setting: SemanticSetting) -> bool:
    """Deterministic (or allowed), and without tools (or allowed): a tool call answers the
    conversation's state, not just its words."""
    return deterministic(request, setting.nondeterministic) and (setting.tools or not request.tools)


class SemanticCache:
    def __init__(
        self, settings: Mapping[str, SemanticSetting], embedder: Embedder, *,
        review: ReviewHook | None = None, rng: random.Random | None = None, vectors: str = "",
    ) -> None:
        self.settings = settings  # by model name; a model without one is not cached
        self.embedder = embedder
        self.vectors = vectors  # which vectors the embedder makes: part of every scope (`semantic_scope`)
        self.review = review
        self._rng = rng or random.Random()
        self.refusals: Counter[str] = Counter()  # candidates the guards refused, by guard
        self.errors = 0  # embeddings that failed: those calls were misses

    def stores(self) -> list[VectorStore]:
        """Each store once (models may share one)."""
        return stores_of(self.settings)

    async def clear(
        self, *, model: str | None = None, tenant: str | None = None, older_than_s: float | None = None,
        key_prefix: str | None = None,
    ) -> int:
        """Invalidate, as `ExactCache.clear` does: the entries matching every filter given."""
        return await clear_stores(self.settings, model, tenant, older_than_s, key_prefix)

    async def __call__(self, call: Call, next: Next) -> Reply:
        setting, request, ctx = self.settings.get(call.model.name), call.request, call.ctx
        if setting is None or not isinstance(request, ChatRequest) or ctx.internal:
            return await next(call)
        control = CacheControl.parse(ctx.cache_control)
        query, vector = semantic_query(request), None
        if query is not None and eligible(request, setting) and not (control.no_cache and control.no_store):
            vector = await self._embedded(query)
        if query is None or vector is None:  # as the exact stage left it, or bypass
            ctx.cache_status = "bypass" if ctx.cache_status == "none" else ctx.cache_status
            return await next(call)
        scope = semantic_scope(request, ctx.tenant, self.vectors)
        if not control.no_cache and (found := await self._lookup(setting, scope, vector, query)) is not None:
            neighbour, cached = found
            reply = served(call, cached, "hit_semantic")
            self._sample(call, setting, query, neighbour, cached)
            return reply
        ctx.cache_status = "bypass" if control.no_cache else "miss"
        reply = await next(call)
        if control.no_store:
            return reply
        answer = passed_on(reply)

        async def store(answered: Reply) -> None:
            if answered.error is None and storable(completion := await answer()):
                entry = CachedAnswer(completion, call.ctx.cost.nanos, time.time())
                await setting.store.add(scope, vector, query, entry.dumps(), setting.ttl_s)

        reply.on_finish(store)
        return reply

    async def _embedded(self, query: str) -> npt.NDArray[np.float32] | None:
        """The query's unit vector; None when it is longer than the embedder reads (two texts that
        differ past that point would look alike) or the embedder failed."""
        try:
            vectors = await self.embedder.embed([query])
        except Exception as exc:  # the cache is an optimisation: the call goes on as a miss
            self.errors += 1
            log.warning("the semantic cache could not embed a query (%r); the call is a miss", exc)
            return None
        return vectors.array[0] if vectors.tokens[0] < TRAINED_TOKENS else None

    async def _lookup(
        self, setting: SemanticSetting, scope: str, vector: npt.NDArray[np.float32], query: str,
    ) -> tuple[Neighbour, CachedAnswer] | None:
        """The best neighbour at or above the threshold that the guards let through, and its answer."""
        for neighbour in await setting.store.search(scope, vector, setting.candidates, setting.threshold):
            if setting.guards and not (verdict := guard(query, neighbour.query)).ok:
                self.refusals[verdict.reason or "guard"] += 1
                continue
            try:
                return neighbour, CachedAnswer.loads(neighbour.answer)
            except CorruptEntry as exc:
                log.warning("dropped a semantic cache entry that does not parse (%s)", exc)
                await setting.store.delete(neighbour.entry_id)
        return None

    def _sample(
        self, call: Call, setting: SemanticSetting, query: str, neighbour: Neighbour, cached: CachedAnswer,
    ) -> None:
        """Hand a share of the hits to the review hook (humans label them: the live false-hit rate)."""
        if self.review is None or setting.review_rate <= 0 or self._rng.random() >= setting.review_rate:
            return
        # A copy: the served answer shares its parts with `cached`, and outer stages change it in place.
        completion = orjson.loads(orjson.dumps(cached.completion))
        hit = SemanticHit(call.ctx.request_id, call.ctx.tenant, call.model.name, query, neighbour.query,
                          neighbour.score, completion)
        try:
            self.review(hit)
        except Exception:  # a reviewer's bug must not fail the call it reviews
            log.exception("the semantic cache's review hook failed")

    def collect(self) -> Iterable[Metric]:
        """Prometheus: candidates refused by each guard, and embeddings that failed."""
        refused = CounterMetricFamily(
            "keel_cache_semantic_refusals", "Semantic cache candidates above the threshold refused by a guard",
            labels=["guard"],
        )
        for reason, count in sorted(self.refusals.items()):
            refused.add_metric([reason], count)
        yield refused
        yield CounterMetricFamily(
            "keel_cache_semantic_embed_errors", "Semantic cache lookups that could not embed the query (misses)",
            value=self.errors,
        )
