"""The one pipeline every call flows through, from the gateway or the library.

A `Stage` sees the `Call` on the way in and the `Reply` on the way out; it may answer
without calling `next`, call it several times, or wrap what comes back. A `Reply` is a
`Completion` (one chat.completion or embeddings object) or a `ChunkStream`.

Wire objects stay plain dicts on this path: they are parsed once and serialised once.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, TypeVar

from keel.errors import KeelError
from keel.ids import random_hex
from keel.types import ChatRequest, EmbeddingRequest

log = logging.getLogger("keel.pipeline")

if TYPE_CHECKING:
    from keel.config import ModelConfig
    from keel.providers.base import Deployment


def new_request_id() -> str:
    return "req_" + random_hex(12)


@dataclass(slots=True)
class Attempt:
    """One try of one deployment, as the reliability stage saw it."""

    deployment: str
    started: float
    ended: float = 0.0
    error: str | None = None  # the error code, None when it answered


@dataclass(slots=True)
class Context:
    """What Keel knows about a call besides the request itself."""

    request_id: str = field(default_factory=new_request_id)
    started: float = field(default_factory=time.monotonic)
    deadline: float | None = None  # time.monotonic() value; set by the reliability stage
    user: str | None = None
    feature: str | None = None
    key_id: str | None = None
    attempts: list[Attempt] = field(default_factory=list)
    deployment: str | None = None  # the one that answered
    first_chunk_at: float | None = None
    trace_id: str | None = None  # W3C trace id (32 hex) of the call's span
    span_id: str | None = None
    cache_status: str = "none"
    guardrails: list[dict[str, Any]] = field(default_factory=list)
    # Set once by the cost accounting (keel.cost), read by budgets, the log and metrics.
    usage: dict[str, Any] | None = None
    cost_usd: float | None = None
    cost_estimated: bool = False
    deliver_first: bool = False  # a Completion's finalisers are left to whoever delivers it
    extras: dict[str, Any] = field(default_factory=dict)

    def remaining(self) -> float | None:
        return None if self.deadline is None else self.deadline - time.monotonic()


@dataclass(slots=True)
class Call:
    request: ChatRequest | EmbeddingRequest
    model: ModelConfig
    deployments: Sequence[Deployment]
    ctx: Context = field(default_factory=Context)
    target: Deployment | None = None  # the deployment the next attempt goes to

    @property
    def stream(self) -> bool:
        return isinstance(self.request, ChatRequest) and bool(self.request.stream)


@dataclass(slots=True)
class Completion:
    """A whole answer: an OpenAI chat.completion (or embeddings list) object.

    Stages put their bookkeeping (log, cost, budget) in finalisers, which run once the answer
    is delivered: by the pipeline before it returns, or, when `ctx.deliver_first` is set (the
    gateway), by the caller after the answer has left, so that the client does not wait for it.
    """

    body: dict[str, Any]
    _finalisers: list[Callable[[Completion], Awaitable[None] | None]] = field(default_factory=list, repr=False)
    _finished: bool = field(default=False, repr=False)
    error: ClassVar[None] = None  # as a ChunkStream's: a whole answer did not fail

    def completion(self) -> dict[str, Any]:
        """The answer, as a ChunkStream's `completion()` gives it: a finaliser reads either alike."""
        return self.body

    def on_finish(self, finaliser: Callable[[Completion], Awaitable[None] | None]) -> None:
        self._finalisers.append(finaliser)

    async def finish(self) -> None:
        """Run the finalisers, once, in the order they were registered (the innermost stage's first)."""
        if self._finished:
            return
        self._finished = True
        await run_finalisers(self._finalisers, self)


Finaliser = Callable[["ChunkStream"], Awaitable[None] | None]
R = TypeVar("R", "Completion", "ChunkStream")


async def run_finalisers(finalisers: Sequence[Callable[[R], Awaitable[None] | None]], reply: R) -> None:
    """Each finaliser in turn; one that fails is logged and the rest still run (a bug in one
    stage's bookkeeping must not skip another's record or budget settlement)."""
    for finaliser in finalisers:
        try:
            result = finaliser(reply)
            if inspect.isawaitable(result):
                await result
        except Exception:
            log.exception("a finaliser of %s failed: %r", type(reply).__name__, finaliser)


class ChunkStream:
    """An async iterator of chat.completion.chunk dicts that remembers what passed.

    Stages that need the whole answer register a finaliser instead of buffering; it runs
    exactly once, when the stream ends, fails, or is closed early (the client went away).
    Stages that change chunks replace the source with `wrap`, keeping one accumulator.
    """

    __slots__ = (
        "_buffered", "_closed", "_ended", "_finalisers", "_source", "content", "defer_finish", "error",
        "finish_reason", "first", "hide_usage", "id", "model", "refusal", "system_fingerprint", "tool_calls", "usage",
    )

    def __init__(self, source: AsyncIterator[dict[str, Any]]) -> None:
        self._source = source
        self._buffered: list[dict[str, Any]] = []
        self._finalisers: list[Finaliser] = []
        # Providers always produce the trailing usage chunk (cost needs it); a client that did
        # not ask for it (stream_options.include_usage) does not see it.
        self.hide_usage = False
        self._closed = False
        self._ended = False  # the source is exhausted
        # The gateway sets this: a clean end's finalisers wait for `aclose()`, which it calls once
        # the end has been written to the client, so the client does not wait for the bookkeeping.
        self.defer_finish = False
        self.content: list[str] = []
        self.refusal: list[str] = []
        self.tool_calls: dict[int, dict[str, Any]] = {}
        self.finish_reason: str | None = None
        self.usage: dict[str, Any] | None = None
        self.id: str | None = None
        self.model: str | None = None
        self.system_fingerprint: str | None = None
        self.first: dict[str, Any] | None = None
        self.error: BaseException | None = None

    def wrap(self, transform: Callable[[AsyncIterator[dict[str, Any]]], AsyncIterator[dict[str, Any]]]) -> None:
        self._source = transform(self._source)

    def on_finish(self, finaliser: Finaliser) -> None:
        self._finalisers.append(finaliser)

    def __aiter__(self) -> ChunkStream:
        return self

    async def prefetch(self) -> dict[str, Any]:
        """Pull the first chunk from the source without consuming it: iteration still starts
        with it. Failures surface here, before anything reached the client (so retry is safe)."""
        if not self._buffered:
            self._buffered.append(await self._source.__anext__())
        return self._buffered[0]

    async def __anext__(self) -> dict[str, Any]:
        while True:
            if self._buffered:
                chunk = self._buffered.pop(0)
            else:
                try:
                    chunk = await self._source.__anext__()
                except StopAsyncIteration:
                    self._ended = True
                    if not self.defer_finish:
                        await self._finish(None)
                    raise
                except BaseException as exc:
                    await self._finish(exc)
                    raise
            self._accumulate(chunk)
            if not (self.hide_usage and chunk.get("usage") and not chunk.get("choices")):
                return chunk

    async def aclose(self) -> None:
        """Stop early; the source is closed and finalisers see `error` as the cause."""
        if self._closed:
            return
        if self._ended:  # a clean end whose finalisers were deferred
            await self._finish(None)
            return
        closer = getattr(self._source, "aclose", None)
        try:
            if closer is not None:
                await closer()
        finally:
            await self._finish(StreamClosed("the client closed the stream before it ended"))

    async def _finish(self, error: BaseException | None) -> None:
        if self._closed:
            return
        self._closed = True
        self.error = error
        await run_finalisers(self._finalisers, self)

    def _accumulate(self, chunk: dict[str, Any]) -> None:
        if self.first is None:
            self.first = chunk
            self.id = chunk.get("id")
            self.model = chunk.get("model")
        if chunk.get("system_fingerprint"):
            self.system_fingerprint = chunk["system_fingerprint"]
        usage = chunk.get("usage")
        if usage:
            self.usage = usage
        for choice in chunk.get("choices") or ():
            if choice.get("index", 0) != 0:
                continue  # n=1 is what Keel serves; other indexes pass through unrecorded
            delta = choice.get("delta") or {}
            if text := delta.get("content"):
                self.content.append(text)
            if refusal := delta.get("refusal"):
                self.refusal.append(refusal)
            for tc in delta.get("tool_calls") or ():
                self._accumulate_tool_call(tc)
            if choice.get("finish_reason"):
                self.finish_reason = choice["finish_reason"]

    def _accumulate_tool_call(self, delta: dict[str, Any]) -> None:
        slot = self.tool_calls.setdefault(
            delta.get("index", 0), {"id": None, "type": "function", "function": {"name": "", "arguments": ""}}
        )
        if delta.get("id"):
            slot["id"] = delta["id"]
        function = delta.get("function") or {}
        if function.get("name"):
            slot["function"]["name"] += function["name"]
        if function.get("arguments"):
            slot["function"]["arguments"] += function["arguments"]

    def message(self) -> dict[str, Any]:
        """The assistant message the chunks so far add up to."""
        message: dict[str, Any] = {
            "role": "assistant",
            "content": "".join(self.content) if self.content or not self.tool_calls else None,
            "refusal": "".join(self.refusal) or None,
        }
        if self.tool_calls:
            message["tool_calls"] = [self.tool_calls[i] for i in sorted(self.tool_calls)]
        return message

    def completion(self) -> dict[str, Any]:
        """The chat.completion object a non-streamed call would have returned."""
        body: dict[str, Any] = {
            "id": self.id or "",
            "object": "chat.completion",
            "created": (self.first or {}).get("created", int(time.time())),
            "model": self.model or "",
            "choices": [
                {"index": 0, "message": self.message(), "finish_reason": self.finish_reason, "logprobs": None}
            ],
            "usage": self.usage,
        }
        if self.system_fingerprint is not None:
            body["system_fingerprint"] = self.system_fingerprint
        return body


class StreamClosed(KeelError):
    """The consumer stopped reading a stream before its end."""

    status = 499
    code = "client_closed"


Reply = Completion | ChunkStream
Next = Callable[[Call], Awaitable[Reply]]


class Stage(Protocol):
    async def __call__(self, call: Call, next: Next) -> Reply: ...


async def dispatch(call: Call) -> Reply:
    """The innermost step: the chosen deployment's provider answers."""
    target = call.target if call.target is not None else call.deployments[0]
    if isinstance(call.request, EmbeddingRequest):
        return await target.provider.embed(call.request, call)
    return await target.provider.chat(call.request, call)


class Pipeline:
    """Stages in order, outermost first, ending in `dispatch`."""

    def __init__(self, stages: Sequence[Stage]) -> None:
        self.stages = tuple(stages)
        handler: Next = dispatch
        for stage in reversed(self.stages):
            handler = _bind(stage, handler)
        self._handler = handler

    async def __call__(self, call: Call) -> Reply:
        reply = await self._handler(call)
        if isinstance(reply, Completion) and not call.ctx.deliver_first:
            await reply.finish()
        return reply


def _bind(stage: Stage, next: Next) -> Next:
    async def run(call: Call) -> Reply:
        return await stage(call, next)

    return run
