"""`Keel`: the configured pipeline, shared by the gateway and by in-process use.

    keel = Keel.from_config("keel.yaml")
    reply = await keel.chat(model="chat", messages=[{"role": "user", "content": "hi"}])

The gateway calls `handle` with the request it parsed; `chat` builds the same `Call` from
keyword arguments. Both run the one pipeline.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

from keel.config import KeelConfig, ModelConfig, load_config
from keel.errors import ModelNotFound
from keel.pipeline import Call, ChunkStream, Completion, Context, Pipeline, Reply, Stage
from keel.providers.base import Deployment, deployment_name, make_provider
from keel.reliability.breaker import CircuitBreaker
from keel.reliability.stage import Reliability
from keel.request_errors import parse_request
from keel.types import ChatCompletion, ChatCompletionChunk, ChatRequest, EmbeddingRequest, EmbeddingResponse

T = TypeVar("T")


class Keel:
    def __init__(self, config: KeelConfig, stages: list[Stage] | None = None) -> None:
        self.config = config
        self.deployments: dict[str, list[Deployment]] = {
            model.name: [_deployment(model, dep) for dep in model.deployments] for model in config.models
        }
        self.pipeline = Pipeline([*(stages or []), Reliability()])
        self._started = False
        self._start_lock = asyncio.Lock()

    @classmethod
    def from_config(cls, path: str | Path) -> Keel:
        return cls(load_config(path))

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Open pools and load models; called for you on the first call."""
        async with self._start_lock:
            if self._started:
                return
            for deployments in self.deployments.values():
                for dep in deployments:
                    await dep.provider.start()
            self._started = True

    async def close(self) -> None:
        for deployments in self.deployments.values():
            for dep in deployments:
                await dep.provider.close()
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

    async def handle(self, request: ChatRequest | EmbeddingRequest, ctx: Context | None = None) -> Reply:
        """Run one validated request through the pipeline."""
        if not self._started:
            await self.start()
        model, deployments = self.resolve(request.model)
        ctx = ctx or Context()
        if isinstance(request, ChatRequest):
            ctx.user = ctx.user or request.user
            if ctx.feature is None and request.metadata:
                ctx.feature = request.metadata.get("feature")
        reply = await self.pipeline(Call(request=request, model=model, deployments=deployments, ctx=ctx))
        if isinstance(reply, ChunkStream) and isinstance(request, ChatRequest):
            reply.hide_usage = not (request.stream_options and request.stream_options.include_usage)
        return reply

    # ------------------------------------------------------------------ library API

    async def chat(self, **params: Any) -> ChatCompletion | AsyncIterator[ChatCompletionChunk]:
        """Create a chat completion; with `stream=True`, an async iterator of chunks."""
        reply = await self.handle(parse_request(ChatRequest, params, strict=False))
        if isinstance(reply, Completion):
            return ChatCompletion.model_validate(reply.body)
        return _typed_chunks(reply)

    async def embeddings(self, **params: Any) -> EmbeddingResponse:
        reply = await self.handle(parse_request(EmbeddingRequest, params, strict=False))
        assert isinstance(reply, Completion)
        return EmbeddingResponse.model_validate(reply.body)

    def chat_sync(self, **params: Any) -> ChatCompletion | Iterator[ChatCompletionChunk]:
        """`chat` for code without an event loop; a stream becomes a plain iterator."""
        runner = _runner()
        if not params.get("stream"):
            result = runner.run(self.chat(**params))
            assert isinstance(result, ChatCompletion)
            return result
        return _sync_chunks(runner, self.chat(**params))

    def close_sync(self) -> None:
        _runner().run(self.close())


def _deployment(model: ModelConfig, config: Any) -> Deployment:
    name = deployment_name(config)
    return Deployment(
        name=name,
        config=config,
        provider=make_provider(config, name),
        breaker=CircuitBreaker(model.breaker.failure_threshold, model.breaker.cooldown_s),
    )


async def _typed_chunks(stream: ChunkStream) -> AsyncIterator[ChatCompletionChunk]:
    try:
        async for chunk in stream:
            yield ChatCompletionChunk.model_validate(chunk)
    finally:
        await stream.aclose()


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
