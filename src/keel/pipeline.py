"""The one pipeline every call flows through, from the gateway or the library.

A `Stage` sees the `Call` on the way in and the `Reply` on the way out; it may answer
without calling `next`, call it several times, or wrap what comes back. A `Reply` is a
`Completion` (one chat.completion or embeddings object) or a `ChunkStream`.

Delivery: stages register bookkeeping on a reply (`on_finish`); whoever delivers the reply
settles it once it has been delivered (`await reply.settle()`), which runs that bookkeeping once.
In-process, `Keel.handle` settles a Completion before it returns and a stream settles itself at
its end; the gateway settles each reply after its last byte has been written.

Wire objects stay plain dicts on this path: they are parsed once and serialised once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol, Self

from keel.cost.money import Nanos, to_usd
from keel.errors import KeelError
from keel.ids import random_hex
from keel.types import ChatRequest, EmbeddingRequest

log = logging.getLogger("keel.pipeline")

if TYPE_CHECKING:
    from keel.auth.keys import Credential, VirtualKey
    from keel.config import ModelConfig
    from keel.guardrails.verdicts import Verdict
    from keel.limits.headers import RateLimitState
    from keel.observability.tracing import StageTracer
    from keel.prompts import PromptRef
    from keel.providers.base import Deployment
    from keel.routing.route import Route


# The API a client spoke to the gateway (docs/dialects.md): each is translated at the edge to the one
# internal call. None in-process (the library).
Dialect = Literal["chat.completions", "embeddings", "responses", "messages", "completions"]


@dataclass(slots=True)
class NativeRequest:
    """A client's own request body in a dialect some deployments speak natively (Anthropic's Messages
    API): such a deployment is sent this body, not a translation of the call's request, as long as the
    stages left the request as the edge translated it (`fingerprint`: what `fingerprint_of` gave then)."""

    dialect: Dialect
    body: dict[str, Any]
    fingerprint: bytes
    # The first field of `body` only such a deployment can carry (a `thinking` config, a document block):
    # once the stages changed the request, it cannot fall back to the translation. None: it can.
    needs_native: str | None = None


def fingerprint_of(request: ChatRequest) -> bytes:
    """What a request says, its model aside (a native deployment is sent its own model): the request as
    JSON from pydantic's serialiser in one native call (about 11 µs for eleven 500-character messages),
    compared whole, so any edit a stage makes (a redaction in place, an appended re-ask) shows."""
    return request.__pydantic_serializer__.to_json(request, exclude={"model"}, exclude_none=True)


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
class BilledUsage:
    """An answer billed by the upstream that the client will not see (a validation re-ask, a
    cascade's first tier, an answer an output guardrail blocked): charged with the call."""

    deployment: str  # the deployment's name, as in `Deployment.name`
    usage: dict[str, Any]
    model: str | None = None  # the model the upstream said answered, when it differs from the configured one


@dataclass(slots=True)
class CallCost:
    """What a call cost: set once when the call is settled, by the cost stage (`keel.cost.stage`);
    read by the budget stage, the request log and the metrics."""

    nanos: Nanos = 0  # exact, in nano-dollars: sum these, not `usd`, to match budget counters
    usage: dict[str, Any] | None = None  # the usage charged, with what the upstream left out estimated
    estimated: bool = False  # some token counts were estimated by Keel
    unpriced: bool = False  # a deployment that answered has no known price (charged 0)
    billed: list[BilledUsage] | None = None  # stages inside the cost stage add to it with `bill`

    @property
    def usd(self) -> float:
        return to_usd(self.nanos)

    def bill(self, billed: BilledUsage) -> None:
        if self.billed is None:
            self.billed = []
        self.billed.append(billed)


@dataclass(slots=True)
class Context:
    """What Keel knows about a call besides the request itself."""

    request_id: str = field(default_factory=new_request_id)
    started: float = field(default_factory=time.monotonic)
    deadline: float | None = None  # time.monotonic() value; set by the reliability stage
    user: str | None = None
    feature: str | None = None
    key_id: str | None = None  # the virtual key's id when keys are on (keel.auth)
    # What the caller presented (a digest, never the key itself); None in-process: trusted.
    credential: Credential | None = None
    key: VirtualKey | None = None  # the caller's virtual key, set by the auth stage
    tenant: str | None = None  # its tenant: scopes logs, budgets and admin views
    attempts: list[Attempt] = field(default_factory=list)
    deployment: str | None = None  # the one that answered
    first_chunk_at: float | None = None
    # The caller's W3C trace headers, {"traceparent": ..., "tracestate": ...} (lower-case names):
    # only these two, never the API key. The call's span is their child.
    trace_headers: dict[str, str] | None = None
    trace_id: str | None = None  # W3C trace id (32 hex) of the call's span
    span_id: str | None = None
    tracer: StageTracer | None = None  # set by the observe stage, for `stage_span`
    cost: CallCost = field(default_factory=CallCost)
    # The tightest rate limits the call was counted against (keel.limits): the gateway's
    # x-ratelimit-* headers. None: no limit applies, and the answer carries none.
    rate_limit: RateLimitState | None = None
    guardrails: list[Verdict] = field(default_factory=list)  # what guardrail checks found (keel.guardrails)
    # The caches (keel.cache): the caller's Cache-Control header, what they did (none | miss | bypass |
    # hit_exact | hit_semantic: the request log's cache_status and the gateway's x-keel-cache) and, on a
    # hit, what the answer cost when it was stored.
    cache_control: str | None = None
    cache_status: str = "none"
    cache_saved_nanos: Nanos = 0
    internal: bool = False  # a call Keel makes for itself (a guardrail's model check): not guarded again
    # A virtual model's route (keel.routing): the tier that answers and why; x-keel-route, the log, the span.
    route: Route | None = None
    dialect: Dialect | None = None  # the API the client spoke; the request log records it
    native: NativeRequest | None = None  # the client's body, for a deployment that speaks its dialect
    prompt: PromptRef | None = None  # the prompt template and version the request was rendered from (keel.prompts)

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


class Delivery:
    """A reply's bookkeeping (the request log, cost, budget settlement): finalisers that stages
    register with `on_finish` and that run once, when whoever delivered the reply calls `settle()`.

    The deliverer is Keel in-process (a Completion before `Keel.handle` returns, a stream at its
    end) and the gateway after the reply's last byte has been written, so the client never waits
    for the bookkeeping. Finalisers run in the order they were registered: the innermost stage's first.
    """

    __slots__ = ("_finalisers", "_settled")

    def __init__(self) -> None:
        self._finalisers: list[Callable[[Any], Awaitable[None] | None]] = []
        self._settled = False

    def on_finish(self, finaliser: Callable[[Self], Awaitable[None] | None]) -> None:
        self._finalisers.append(finaliser)

    async def settle(self) -> None:
        """Run the finalisers, once; one that fails is logged and the rest still run (a bug in one
        stage's bookkeeping must not skip another's record or budget settlement)."""
        if self._settled:
            return
        self._settled = True
        for finaliser in self._finalisers:
            try:
                result = finaliser(self)
                if result is not None:  # an async finaliser's coroutine
                    await result
            except Exception:
                log.exception("a finaliser of %s failed: %r", type(self).__name__, finaliser)


class Completion(Delivery):
    """A whole answer: an OpenAI chat.completion (or embeddings list) object as a plain dict."""

    __slots__ = ("body",)
    error: ClassVar[None] = None  # as a ChunkStream's: a whole answer did not fail

    def __init__(self, body: dict[str, Any]) -> None:
        super().__init__()
        self.body = body

    def completion(self) -> dict[str, Any]:
        """The answer, as a ChunkStream's `completion()` gives it: a finaliser reads either alike."""
        return self.body


class ChunkStream(Delivery):
    """An async iterator of chat.completion.chunk dicts that remembers what passed.

    Stages that need the whole answer register a finaliser instead of buffering. In-process the
    stream settles itself when it ends or fails (`settles_at_end`); `settle()` (or `aclose()`)
    before the end closes the source first, and the finalisers see a `StreamClosed` error.
    Stages that change chunks replace the source with `wrap`, keeping one accumulator.
    """

    __slots__ = (
        "_buffered", "_done", "_source", "content", "error", "finish_reason", "first", "hide_usage", "id", "model",
        "refusal", "settles_at_end", "system_fingerprint", "tool_calls", "usage",
    )

    def __init__(self, source: AsyncIterator[dict[str, Any]]) -> None:
        super().__init__()
        self._source = source
        self._buffered: list[dict[str, Any]] = []
        # Providers always produce the trailing usage chunk (cost needs it); a client that did
        # not ask for it (stream_options.include_usage) does not see it.
        self.hide_usage = False
        self._done = False  # the source ended, failed or was closed: `error` says which
        # False when the consumer delivers the stream elsewhere and settles it after (the gateway).
        self.settles_at_end = True
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
        """Pass every chunk still to come through `transform`, the prefetched one included: a stage that
        wraps after an inner one prefetched (reliability does) must see the whole stream (OpenAI puts a
        tool call's id and name in the first chunk)."""
        source, buffered = self._source, self._buffered
        if buffered:
            self._buffered = []
            source = _prepended(buffered, source)
        self._source = transform(source)

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
                except BaseException as exc:
                    self._done = True
                    if not isinstance(exc, StopAsyncIteration):
                        self.error = exc
                    if self.settles_at_end:
                        await self.settle()
                    raise
            self._accumulate(chunk)
            if not (self.hide_usage and chunk.get("usage") and not chunk.get("choices")):
                return chunk

    async def settle(self) -> None:
        """Run the finalisers, once. A stream that has not ended is closed first (its consumer went
        away): its source is closed and `error` is a `StreamClosed`."""
        try:
            if not self._done:
                self._done = True
                self.error = StreamClosed("the client closed the stream before it ended")
                closer = getattr(self._source, "aclose", None)
                if closer is not None:
                    await closer()
        finally:
            await super().settle()

    async def aclose(self) -> None:
        """`settle()`, under the name async iterators are closed by."""
        await self.settle()

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

    def __call__(self, call: Call) -> Awaitable[Reply]:
        """The reply, not yet settled: whoever delivers it settles it."""
        return self._handler(call)


def _bind(stage: Stage, next: Next) -> Next:
    return lambda call: stage(call, next)  # no coroutine of its own: one frame per stage, not two


async def _prepended(
    first: list[dict[str, Any]], rest: AsyncIterator[dict[str, Any]]
) -> AsyncIterator[dict[str, Any]]:
    """`first`, then `rest`; closing it closes `rest` (the upstream), as closing the stream must."""
    try:
        for chunk in first:
            yield chunk
        async for chunk in rest:
            yield chunk
    finally:
        closer = getattr(rest, "aclose", None)
        if closer is not None:
            await closer()
