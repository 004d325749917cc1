"""`Keel`: the configured pipeline, shared by the gateway and by in-process use.

    keel = Keel.from_config("keel.yaml")
    reply = await keel.chat(model="chat", messages=[{"role": "user", "content": "hi"}])

The gateway calls `handle` with the request it parsed; `chat` builds the same `Call` from
keyword arguments. Both run the one pipeline.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar, overload

from pydantic import BaseModel

from keel import parallel
from keel.auth.lookup import KeyLookup
from keel.auth.stage import Auth
from keel.auth.store import KeyStore
from keel.budgets.alerts import AlertSender
from keel.budgets.budgets import Budgets
from keel.budgets.pending_alerts import PendingAlerts
from keel.budgets.stage import BudgetStage
from keel.cache.build import build_caches
from keel.cache.health import BackendsCollector
from keel.config import ConcurrencyConfig, ConfigError, KeelConfig, ModelConfig, SLOConfig, load_config
from keel.cost.accounting import CostMeter
from keel.cost.pricing import PricingTable
from keel.cost.stage import CostStage
from keel.errors import KeelError, ModelNotFound
from keel.evals.review_feed import ReviewFeed
from keel.guardrails.stages import GuardrailStages
from keel.limits.concurrency import CallerConcurrency, ConcurrencyLimit
from keel.limits.concurrency_stage import ConcurrencyStage
from keel.limits.limiter import RateLimiter
from keel.limits.rules import RateRules
from keel.limits.stage import RateLimitStage
from keel.observability.metrics import Metrics, breaker_states, slo_states
from keel.observability.stage import Observe
from keel.observability.store import RecordStore, StoreError
from keel.observability.tracing import TraceScope, Tracing
from keel.observability.writer import RecordWriter
from keel.pipeline import Call, ChunkStream, Completion, Context, Pipeline, Reply, Stage
from keel.prompts import PromptFileInvalid, PromptRef, PromptRegistry, apply_prompt
from keel.providers.base import Deployment, deployment_name, make_provider
from keel.reliability.breaker import CircuitBreaker
from keel.reliability.slo_guard import SLOGuard
from keel.reliability.stage import Reliability
from keel.request_errors import parse_request
from keel.routing.build import build_routing
from keel.types import ChatCompletion, ChatCompletionChunk, ChatRequest, EmbeddingRequest, EmbeddingResponse
from keel.validation.response_model import M as Model
from keel.validation.response_model import answer_as, chat_request, check_response_model
from keel.validation.stage import Validation

if TYPE_CHECKING:
    from keel.embedding.shared import SharedEmbedder
    from keel.evals.canaries import CanarySchedule

log = logging.getLogger("keel")

T = TypeVar("T")
Item = TypeVar("Item")


class Keel:
    """The configured pipeline. Stages, outermost first: observe (log, trace, metrics), auth, input
    guardrails, rate limit, budget, exact cache, semantic cache, cost, output guardrails, then any `stages`
    given here, then reliability, which calls the providers.
    An `Observe`, `RateLimitStage` or `BudgetStage` among `stages` replaces the default one."""

    def __init__(self, config: KeelConfig, stages: list[Stage] | None = None) -> None:
        self.config = config
        # Overload protection (keel.limits.concurrency): one gate per deployment name with max_concurrency.
        self.concurrency = CallerConcurrency(config.limits.concurrency)
        gates: dict[str, ConcurrencyLimit] = {}
        self.deployments: dict[str, list[Deployment]] = {
            model.name: [_deployment(model, dep, gates, config.limits.concurrency, config.slo)
                         for dep in model.deployments]
            for model in config.models
        }
        self.concurrency.deployments = list(gates.values())
        self.meter = CostMeter(PricingTable(config))
        self.metrics = Metrics()
        self.writer = RecordWriter(RecordStore(config.store.url), config.store)
        self.tracing = Tracing(config.tracing, sink=self.writer)
        self.budgets = Budgets.from_config(config)
        # Alerts the webhook has not taken are kept in the request log's database: a restart delivers them.
        self.alerts = AlertSender(config.alerts, pending=PendingAlerts(self.writer.store))
        self.keys = KeyStore(self.writer.store)
        self.auth = _auth(config, self.keys)
        self.prompts = _prompts(config)
        self.review = ReviewFeed.of(config, self.writer.store)  # the review queue's feeds, the online judge
        if self.auth is not None:  # /admin/budgets shows each usable key's own budgets too
            self.budgets.keys = self.keys
        # An Observe or BudgetStage of the caller's own (a fake sink, other budgets) takes the
        # default one's place.
        stages = list(stages or [])
        observe = _take(stages, Observe)
        budget = _take(stages, BudgetStage)
        rate_limit = _take(stages, RateLimitStage) or _rate_limit_stage(config)
        self.rate_limits = rate_limit.limiter if rate_limit is not None else None
        self.observe = observe or Observe(self.review.watch(self.writer), self.tracing, self.metrics,
                                          log_content=config.store.log_content)
        self.metrics.watch_breakers(breaker_states(self.deployments))
        self.metrics.watch_slo(slo_states(self.deployments))
        self.metrics.watch_queue("request_log", lambda: self.writer.queue_depth)
        self.metrics.watch_dropped(lambda: self.writer.dropped)
        self.metrics.register(self.alerts)
        if self.rate_limits is not None:
            self.metrics.register(self.rate_limits)
        # Calls in flight per key (limits.concurrency.per_key, or a virtual key's own max_concurrency).
        concurrency = ConcurrencyStage(self.concurrency) if (
            config.limits.concurrency.per_key is not None or config.auth.virtual_keys) else None
        self.concurrency.keys_limited = concurrency is not None
        if concurrency is not None or self.concurrency.deployments:
            self.metrics.register(self.concurrency)
        # One local embedder for every check and the semantic cache, made when one of them needs it.
        self.embedder: SharedEmbedder | None = None
        self.guardrails = _guardrails(config, self._ask, self.deployments, self.shared_embedder)
        self.cache = build_caches(config, self.shared_embedder, review=self.review.semantic_hit)
        if healths := self.cache.healths():  # shared stores count their failures
            self.metrics.register(BackendsCollector(healths))
        if self.cache.semantic is not None:  # the guards' refusals
            self.metrics.register(self.cache.semantic)
        guard_in, guard_out = self.guardrails.input, self.guardrails.output
        # Virtual models (keel.routing): the router after auth and rate limits (which count the virtual
        # model) and before budgets, so the hold prices the tier chosen; the cascade inside cost, so an
        # escalation's discarded answer is billed, and outside validation, so its invalid_output is seen.
        self.routing = build_routing(config, self.deployments, ask=self._ask_router, budgets=self.budgets,
                                     embedder=self.shared_embedder)
        self.pipeline = Pipeline([
            self.observe, *([self.auth] if self.auth else []),  # auth: with `auth.virtual_keys` on
            *([guard_in] if guard_in else []),  # input guardrails: for models that have some
            *([rate_limit] if rate_limit else []),  # rate limits: when some limit is configured
            *([concurrency] if concurrency else []),  # calls in flight per key: when a limit may apply
            *([self.routing.router] if self.routing else []),  # virtual model -> tier: when some model routes
            budget or BudgetStage(self.budgets, self.meter, self.alerts),
            *self.cache.stages(),  # exact, then semantic cache: for models with them enabled
            CostStage(self.meter),
            *([self.routing.cascade] if self.routing else []),  # a cascade's tiers, cheapest first
            *([guard_out] if guard_out else []),  # output guardrails: inside cost, a blocked answer is billed
            Validation(),  # JSON answers and tool calls checked, re-asked; inside cost: discarded ones are billed
            *stages, Reliability(),
        ])
        self.canaries: CanarySchedule | None = None  # canaries: in keel.yaml, sent from start to close
        self._started = False
        self._start_lock = asyncio.Lock()

    def shared_embedder(self) -> SharedEmbedder:
        """The one local embedder of this Keel (the checks, the semantic cache, eval metrics): made on first
        use, loaded on its first text, closed with the Keel."""
        from keel.embedding.shared import SharedEmbedder  # NumPy and onnxruntime: the local extra

        self.embedder = self.embedder or SharedEmbedder(
            self.config.embedder.threads, self.config.embedder.spin, self.config.embedder.quantize,
        )
        return self.embedder

    def trace(self, name: str, **attributes: Any) -> TraceScope:
        """A span around a chain of calls: `with keel.trace("answer"):` or `@keel.trace("answer")`."""
        return self.tracing.trace(name, **attributes)

    @classmethod
    def from_config(cls, path: str | Path) -> Keel:
        return cls(load_config(path))

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Open pools and load models; called for you on the first call."""
        async with self._start_lock:
            if self._started:
                return
            await asyncio.to_thread(self.writer.start)
            if self.auth is not None:  # the keys' table must exist before the first call
                await asyncio.to_thread(self.writer.store.migrate)
            elif self.config.alerts.webhook_url is not None:  # the pending alerts' table, before they start
                try:
                    await asyncio.to_thread(self.writer.store.migrate)
                except StoreError as exc:  # alerts are then delivered from memory until the store is back
                    log.warning("pending alerts cannot be kept for a restart yet: %s", exc)
            await self.alerts.start()
            if self.embedder is not None:  # the classifier, off-topic checks and semantic cache embed
                await self.embedder.start()
            await self.cache.start()
            await self.review.start()
            for deployments in self.deployments.values():
                for dep in deployments:
                    await dep.provider.start()
            if self.config.canaries.prompts and self.config.canaries.models:
                from keel.evals.canaries import CanarySchedule

                self.canaries = self.canaries or CanarySchedule(self.handle, self.config.canaries)
                self.canaries.start()
            self._started = True

    async def close(self) -> None:
        """Finish: providers closed, alerts sent or logged as lost, the request log flushed."""
        if self.canaries is not None:
            await self.canaries.stop()
        await self.review.close()  # first: the online judge's calls in flight need the providers
        for deployments in self.deployments.values():
            for dep in deployments:
                await dep.provider.close()
        await self.alerts.stop()
        if self.embedder is not None:
            await self.embedder.close()
        await self.budgets.close()
        await self.cache.close()
        if self.rate_limits is not None:
            await self.rate_limits.close()
        await asyncio.to_thread(self.writer.close)
        await asyncio.to_thread(self.tracing.shutdown)  # flushes OTLP export; may block
        self._started = False

    async def __aenter__(self) -> Keel:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ------------------------------------------------------------------ the one path

    def resolve(self, name: str) -> tuple[ModelConfig, list[Deployment]]:
        model = self.config.model(name)
        if model is None:
            raise ModelNotFound(name, list(self.deployments))
        return model, self.deployments[name]

    async def handle(
        self, request: ChatRequest | EmbeddingRequest, ctx: Context | None = None, *, caller_settles: bool = False
    ) -> Reply:
        """Run one validated request through the pipeline, and settle its reply once delivered: a
        Completion before this returns, a stream when its consumer reaches its end (or closes it).
        With `caller_settles`, the caller delivers the reply elsewhere and then calls
        `await reply.settle()` (the gateway, after the last byte has been written)."""
        if not self._started:
            await self.start()
        ctx = ctx or Context()
        ctx.user = ctx.user or request.user
        if ctx.feature is None and isinstance(request, ChatRequest) and request.metadata:
            ctx.feature = request.metadata.get("feature")
        try:
            model, deployments = self.resolve(request.model)
        except ModelNotFound as exc:  # refused before the pipeline: logged here
            chat = isinstance(request, ChatRequest)
            refused: KeelError = exc
            if self.auth is not None:  # a caller without a key learns nothing of the models
                try:
                    await self.auth.admit(ctx, request.model)
                except KeelError as auth_error:
                    refused = auth_error
            self.observe.rejected(ctx, refused, "chat" if chat else "embeddings", model=request.model,
                                  stream=chat and bool(getattr(request, "stream", False)))
            raise refused from None
        reply = await self.pipeline(Call(request=request, model=model, deployments=deployments, ctx=ctx))
        if isinstance(reply, ChunkStream):
            reply.settles_at_end = not caller_settles
            if isinstance(request, ChatRequest):
                reply.hide_usage = not (request.stream_options and request.stream_options.include_usage)
        elif not caller_settles:
            await reply.settle()
        return reply

    def render_prompt(self, params: dict[str, Any], header: str | None = None) -> PromptRef | None:
        """Render the prompt template a chat request names (`prompt` / `metadata.prompt` / the x-keel-prompt
        header) into `params`, in place; which prompt and version it was, or None (docs/prompts.md)."""
        user = params.get("user")
        return apply_prompt(params, self.prompts, header=header, caller=user if isinstance(user, str) else None)

    async def _ask_router(self, model: str, prompt: str) -> str:
        """A cascade's judge question (keel.routing), as a guardrail's: logged and priced on its own."""
        return await self._ask(model, prompt, feature="keel.router")

    async def _ask(self, model: str, prompt: str, feature: str = "keel.guardrail") -> str:
        """A guardrail's question to a model of this keel.yaml, through the pipeline (logged, priced,
        within budgets) but not guarded again."""
        request = ChatRequest.model_validate(
            {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": 4, "temperature": 0}
        )
        reply = await self.handle(request, Context(feature=feature, internal=True))
        assert isinstance(reply, Completion)
        return str(reply.body["choices"][0]["message"].get("content") or "")

    # ------------------------------------------------------------------ library API

    @overload
    async def chat(
        self, *, response_model: type[Model], stream: Literal[False] | None = None, **params: Any
    ) -> Model: ...

    @overload
    async def chat(self, *, stream: Literal[True], **params: Any) -> AsyncIterator[ChatCompletionChunk]: ...

    @overload
    async def chat(self, *, stream: Literal[False] | None = None, **params: Any) -> ChatCompletion: ...

    async def chat(
        self, *, stream: bool | None = None, response_model: type[BaseModel] | None = None, **params: Any
    ) -> ChatCompletion | AsyncIterator[ChatCompletionChunk] | BaseModel:
        """Create a chat completion; with `stream=True`, an async iterator of chunks; with
        `response_model=Person` (a pydantic model class), a validated `Person` (docs/structured-outputs.md).
        `prompt="summarise", variables={...}` renders a prompt template first (docs/prompts.md)."""
        prompt = self.render_prompt(params)
        if response_model is not None:
            async def ask(request: ChatRequest) -> dict[str, Any]:
                reply = await self.handle(request, Context(prompt=prompt))
                assert isinstance(reply, Completion)  # chat_request refuses stream=True
                return reply.body

            return await answer_as(response_model, chat_request(response_model, params, stream=stream), ask)
        if stream is not None:
            params["stream"] = stream
        reply = await self.handle(parse_request(ChatRequest, params, strict=False), Context(prompt=prompt))
        if isinstance(reply, Completion):
            return ChatCompletion.model_validate(reply.body)
        return _typed_chunks(reply)

    async def embeddings(self, **params: Any) -> EmbeddingResponse:
        """Create embeddings: `await keel.embeddings(model="local-embed", input=["a", "b"])`."""
        reply = await self.handle(parse_request(EmbeddingRequest, params, strict=False))
        assert isinstance(reply, Completion)
        return EmbeddingResponse.model_validate(reply.body)

    async def gather(
        self, calls: Iterable[parallel.CallSpec[T]], *, concurrency: int = 8, fail_fast: bool = False,
        progress: bool | str = False, name: str = "keel.gather",
    ) -> list[T | Exception]:
        """Run `calls` (`lambda: keel.chat(...)`, or coroutines) at most `concurrency` at a time, under one
        trace span `name`: results in input order, each error in its place, not raised (docs/parallel.md)."""
        with self.trace(name, **{"keel.parallel.concurrency": concurrency}) as span:
            results = await parallel.gather(calls, concurrency=concurrency, fail_fast=fail_fast, progress=progress)
            parallel.describe(span, results)
        return results

    async def map(
        self, fn: Callable[[Item], Awaitable[T]], items: Iterable[Item], *, concurrency: int = 8,
        fail_fast: bool = False, progress: bool | str = False, name: str = "keel.map",
    ) -> list[T | Exception]:
        """`await fn(item)` for each item, at most `concurrency` at a time, under one trace span: as `gather`."""
        with self.trace(name, **{"keel.parallel.concurrency": concurrency}) as span:
            results = await parallel.map(fn, items, concurrency=concurrency, fail_fast=fail_fast, progress=progress)
            parallel.describe(span, results)
        return results

    @overload
    def chat_sync(
        self, *, response_model: type[Model], stream: Literal[False] | None = None, **params: Any
    ) -> Model: ...

    @overload
    def chat_sync(self, *, stream: Literal[True], **params: Any) -> Iterator[ChatCompletionChunk]: ...

    @overload
    def chat_sync(self, *, stream: Literal[False] | None = None, **params: Any) -> ChatCompletion: ...

    def chat_sync(
        self, *, stream: bool | None = None, response_model: type[BaseModel] | None = None, **params: Any
    ) -> ChatCompletion | Iterator[ChatCompletionChunk] | BaseModel:
        """`chat` for code without an event loop; a stream becomes a plain iterator."""
        runner = _runner()
        if response_model is not None:
            check_response_model(response_model, params, stream=stream)  # refused here, not on the loop
            instance: BaseModel = runner.run(self.chat(response_model=response_model, **params))
            return instance
        if not stream:
            completion: ChatCompletion = runner.run(self.chat(stream=stream, **params))  # typed: params are Any
            return completion
        return _sync_chunks(runner, self.chat(stream=True, **params))

    def embeddings_sync(self, **params: Any) -> EmbeddingResponse:
        """`embeddings` for code without an event loop."""
        return _runner().run(self.embeddings(**params))

    def gather_sync(
        self, calls: Iterable[parallel.CallSpec[T]], *, concurrency: int = 8, fail_fast: bool = False,
        progress: bool | str = False, name: str = "keel.gather",
    ) -> list[T | Exception]:
        """`gather` for code without an event loop: the calls run on the library's background loop."""
        return _runner().run(self.gather(calls, concurrency=concurrency, fail_fast=fail_fast, progress=progress,
                                         name=name))

    def map_sync(
        self, fn: Callable[[Item], Awaitable[T]], items: Iterable[Item], *, concurrency: int = 8,
        fail_fast: bool = False, progress: bool | str = False, name: str = "keel.map",
    ) -> list[T | Exception]:
        """`map` for code without an event loop (`fn` is still async: `lambda q: keel.chat(...)`)."""
        return _runner().run(self.map(fn, items, concurrency=concurrency, fail_fast=fail_fast, progress=progress,
                                      name=name))

    def close_sync(self) -> None:
        _runner().run(self.close())


S = TypeVar("S")


def _prompts(config: KeelConfig) -> PromptRegistry | None:
    if config.prompts.dir is None:
        return None
    try:
        return PromptRegistry.load(config.prompts.dir, config.prompts.splits)
    except PromptFileInvalid as exc:
        raise ConfigError(f"prompts: {exc}") from None


def _take(stages: list[Stage], kind: type[S]) -> S | None:
    """Remove and return the first stage of `kind` in `stages`."""
    for i, stage in enumerate(stages):
        if isinstance(stage, kind):
            del stages[i]
            return stage
    return None


def _auth(config: KeelConfig, keys: KeyStore) -> Auth | None:
    """The auth stage when virtual keys are on; off, the gateway checks the master key alone."""
    if not config.auth.virtual_keys:
        return None
    lookup = KeyLookup(keys, ttl_s=config.auth.cache_ttl_s, negative_size=config.auth.negative_cache_size)
    return Auth(lookup, os.environ.get(config.server.master_key_env) or None)


def _guardrails(
    config: KeelConfig, ask: Any, deployments: dict[str, list[Deployment]], embedder: Callable[[], SharedEmbedder],
) -> GuardrailStages:
    """The guardrail stages, when some model has guardrails; their modules (Presidio, the embedder)
    are imported only then."""
    if not config.guardrails.input and not config.guardrails.output and not any(m.guardrails for m in config.models):
        return GuardrailStages(None, None)
    from keel.guardrails.build import build_guardrails

    return build_guardrails(config, ask, embedder, {
        name: counter for name, deps in deployments.items() if (counter := _token_counter(deps)) is not None
    })


def _token_counter(deployments: list[Deployment]) -> Callable[[ChatRequest], int | None] | None:
    """A model's prompt-token counter when every deployment of it has its own tokenizer (the embedded
    model): the highest of their counts, so the limit holds whichever one answers."""
    from keel.providers.local import LocalProvider

    local = [d.provider for d in deployments if isinstance(d.provider, LocalProvider)]
    if not local or len(local) < len(deployments):
        return None

    def count(request: ChatRequest) -> int | None:
        highest = 0
        for provider in local:
            if (counted := provider.count_prompt_tokens(request)) is None:
                return None
            highest = max(highest, counted)
        return highest

    return count


def _rate_limit_stage(config: KeelConfig) -> RateLimitStage | None:
    """The rate-limit stage when some limit is configured, or virtual keys (which may carry their
    own) are on; otherwise none, and calls do no rate-limit work at all."""
    if RateRules.from_config(config).any or config.auth.virtual_keys:
        return RateLimitStage(RateLimiter.from_config(config))
    return None


def _deployment(
    model: ModelConfig, config: Any, gates: dict[str, ConcurrencyLimit], settings: ConcurrencyConfig, slo: SLOConfig,
) -> Deployment:
    name = deployment_name(config)
    gate = None
    if config.max_concurrency is not None:  # shared by every model that names this deployment
        gate = gates.get(name) or gates.setdefault(
            name, ConcurrencyLimit(config.max_concurrency, settings, scope="deployment", name=name))
    return Deployment(
        name=name,
        config=config,
        provider=make_provider(config, name),
        breaker=CircuitBreaker(model.breaker.failure_threshold, model.breaker.cooldown_s),
        concurrency=gate,
        slo=SLOGuard(name, model.slo_guard, slo) if model.slo_guard.action != "off" else None,
    )


async def _typed_chunks(stream: ChunkStream) -> AsyncIterator[ChatCompletionChunk]:
    try:
        async for chunk in stream:
            yield ChatCompletionChunk.model_validate(chunk)
    finally:
        await stream.settle()


class _LoopRunner:
    """One event loop in a daemon thread, so pools and the model outlive a single sync call."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, name="keel-sync", daemon=True).start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()


_RUNNER: _LoopRunner | None = None
_RUNNER_LOCK = threading.Lock()


def _runner() -> _LoopRunner:
    global _RUNNER
    with _RUNNER_LOCK:
        if _RUNNER is None:
            _RUNNER = _LoopRunner()
        return _RUNNER


def _sync_chunks(
    runner: _LoopRunner, started: Coroutine[Any, Any, ChatCompletion | AsyncIterator[ChatCompletionChunk]]
) -> Iterator[ChatCompletionChunk]:
    chunks = runner.run(started)
    assert not isinstance(chunks, ChatCompletion)

    async def pull() -> ChatCompletionChunk | None:
        try:
            return await chunks.__anext__()
        except StopAsyncIteration:
            return None

    while (chunk := runner.run(pull())) is not None:
        yield chunk
