"""The observe stage, outermost: every call that reaches Keel leaves one request record, one
span (with a child per upstream attempt) and its metrics, whatever happened to it.

It must stay cheap: it builds the record from what the context already holds and hands it
to the writer, whose thread does the heavy work (redaction, cutting content, JSON, I/O).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Awaitable, Mapping
from typing import Any, Literal, Protocol, cast, get_args

from keel.errors import AuthenticationFailed, InvalidRequest, KeelError, ModelNotFound, UpstreamBadRequest
from keel.observability.metrics import Metrics
from keel.observability.record import (
    MAX_METADATA_CHARS,
    MAX_TAG_CHARS,
    Outcome,
    RequestRecord,
    SpanRecord,
    bounded,
)
from keel.observability.tracing import KeelSpan, Tracing, current_span, extract_parent, trace_id_of
from keel.pipeline import Call, Context, Next, Reply, StreamClosed
from keel.types import ChatRequest

log = logging.getLogger("keel.observe")

# ctx.extras key: the caller's W3C trace headers, {"traceparent": ..., "tracestate": ...} (lower-case
# names, or a case-insensitive mapping). Pass only these two: extras must not carry the API key.
TRACEPARENT_HEADERS = "traceparent_headers"


class RecordSink(Protocol):
    """The request log writer: both calls return at once (records are written off the path)."""

    def submit(self, record: RequestRecord) -> None: ...

    def submit_span(self, span: SpanRecord) -> None: ...


class Charger(Protocol):
    """Cost accounting (`keel.cost.CostMeter`): sets ctx.usage, ctx.cost_usd and ctx.cost_estimated
    from the answer (None when the call failed); a second charge of the same call changes nothing."""

    def charge(self, call: Call, answer: Mapping[str, Any] | None) -> Awaitable[None] | None: ...


class Observe:
    """One record, one span tree and the metrics per call: answered, failed, blocked, limited,
    cached or closed early by the client."""

    def __init__(
        self, sink: RecordSink, tracing: Tracing, metrics: Metrics, charger: Charger | None = None,
        log_content: bool = True,
    ) -> None:
        self.sink = sink
        self.tracing = tracing
        self.metrics = metrics
        self.charger = charger
        self.log_content = log_content

    async def __call__(self, call: Call, next: Next) -> Reply:
        span = self.tracing.start_call_span(call, extract_parent(call.ctx.extras.get(TRACEPARENT_HEADERS)))
        try:
            with current_span(span):
                reply = await next(call)
        except (Exception, asyncio.CancelledError) as error:
            await self._end(call, span, None, error)  # usage billed on the way (a blocked answer) is still charged
            raise

        async def ended(answered: Reply) -> None:  # once: delivered, or a stream's end, error or early close
            await self._end(call, span, answered.completion(), answered.error)

        reply.on_finish(ended)
        return reply

    def rejected(
        self, ctx: Context, error: BaseException, endpoint: Literal["chat", "embeddings"] = "chat",
        model: str | None = None, stream: bool = False,
    ) -> RequestRecord:
        """Log a call the gateway refused before the pipeline (bad JSON, bad key, unknown model)."""
        return record_rejected(ctx, error, endpoint, sink=self.sink, metrics=self.metrics, model=model, stream=stream)

    async def _end(
        self, call: Call, span: KeelSpan | None, answer: dict[str, Any] | None, error: BaseException | None
    ) -> None:
        await self._charge(call, answer)
        self._finish(call, span, answer, error)

    async def _charge(self, call: Call, answer: dict[str, Any] | None) -> None:
        if self.charger is None:
            return
        try:
            result = self.charger.charge(call, answer)
            if inspect.isawaitable(result):
                await result
        except Exception:  # a pricing bug must not fail an answered call, nor lose its record
            log.exception("cost accounting failed for request %s", call.ctx.request_id)

    def _finish(
        self, call: Call, span: KeelSpan | None, answer: dict[str, Any] | None, error: BaseException | None
    ) -> None:
        try:
            record = build_record(call, answer, error, self.log_content)
            self.tracing.end_call_span(span, call, record, answer)
            self.sink.submit(record)
            self.metrics.observe(record)
        except Exception:  # observing must never change what the client gets
            log.exception("could not record request %s", call.ctx.request_id)


def build_record(
    call: Call, answer: dict[str, Any] | None, error: BaseException | None, log_content: bool
) -> RequestRecord:
    """The request record of a finished call, from its context and answer (None when it failed)."""
    ctx, request = call.ctx, call.request
    now, ended_at = time.monotonic(), time.time()
    status, outcome, error_type, message = outcome_of(ctx, error)
    usage = ctx.usage or (answer or {}).get("usage") or {}
    first = call.deployments[0].name if call.deployments else None
    metadata = request.metadata if isinstance(request, ChatRequest) else None
    attempts = ctx.attempts
    return RequestRecord(
        request_id=ctx.request_id,
        started_at=ended_at - (now - ctx.started),
        ended_at=ended_at,
        endpoint="chat" if isinstance(request, ChatRequest) else "embeddings",
        trace_id=ctx.trace_id,
        span_id=ctx.span_id,
        key_id=ctx.key_id,
        user=bounded(ctx.user or request.user),
        feature=bounded(ctx.feature or (metadata or {}).get("feature")),
        model=request.model,
        deployment=ctx.deployment or (attempts[-1].deployment if attempts else None),
        upstream_model=(answer or {}).get("model") or None,
        system_fingerprint=(answer or {}).get("system_fingerprint"),
        stream=call.stream,
        attempts=len(attempts),
        fallbacks=sum(a.deployment != first for a in attempts),
        attempt_log=[
            {"deployment": a.deployment, "started_at": ended_at - (now - a.started),
             "ms": ((a.ended or now) - a.started) * 1000, "error": a.error}
            for a in attempts
        ],
        cache_status=ctx.cache_status,
        guardrails=list(ctx.guardrails),
        input=_input(call) if log_content else None,
        output=_output(answer) if log_content else None,
        metadata=bounded_metadata(metadata),
        prompt_tokens=usage.get("prompt_tokens") or 0,
        completion_tokens=usage.get("completion_tokens") or 0,
        cached_tokens=(usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0,
        cost_usd=ctx.cost_usd or 0.0,
        cost_nanousd=int(ctx.extras.get("cost_nanousd", 0)),
        cost_estimated=ctx.cost_estimated,
        latency_ms=(now - ctx.started) * 1000,
        ttft_ms=None if ctx.first_chunk_at is None else (ctx.first_chunk_at - ctx.started) * 1000,
        upstream_ms=sum(((a.ended or now) - a.started) for a in attempts) * 1000 if attempts else None,
        status=status,
        outcome=outcome,
        error_type=error_type,
        error_message=message,
    )


def record_rejected(
    ctx: Context, error: BaseException, endpoint: Literal["chat", "embeddings"] = "chat", *,
    sink: RecordSink, metrics: Metrics, model: str | None = None, stream: bool = False,
) -> RequestRecord:
    """Log and count a call refused before the pipeline (bad JSON, bad key, unknown model):
    no span, but the caller's trace id when it sent a traceparent."""
    if ctx.trace_id is None:
        ctx.trace_id = trace_id_of(extract_parent(ctx.extras.get(TRACEPARENT_HEADERS)))
    now, ended_at = time.monotonic(), time.time()
    status, outcome, error_type, message = outcome_of(ctx, error)
    record = RequestRecord(
        request_id=ctx.request_id, started_at=ended_at - (now - ctx.started), ended_at=ended_at,
        endpoint=endpoint, trace_id=ctx.trace_id, span_id=ctx.span_id, key_id=ctx.key_id,
        user=bounded(ctx.user), feature=bounded(ctx.feature), model=bounded(model), stream=stream,
        latency_ms=(now - ctx.started) * 1000, status=status, outcome=outcome, error_type=error_type,
        error_message=message,
    )
    sink.submit(record)
    metrics.observe(record)
    return record


# Errors other stages raise, by class name (they need not import this module).
_OUTCOME_BY_CLASS: dict[str, Outcome] = {
    "StreamClosed": "client_closed",
    "BudgetExceeded": "budget_exceeded",
    "RateLimited": "rate_limited",
    "GuardrailViolation": "blocked",
}
_OUTCOMES = frozenset(get_args(Outcome))


def outcome_of(ctx: Context, error: BaseException | None) -> tuple[int, Outcome, str | None, str | None]:
    """(HTTP status, outcome, error type, error message) of how a call ended."""
    if error is None:
        return 200, "cached" if ctx.cache_status.startswith("hit") else "ok", None, None
    if isinstance(error, asyncio.CancelledError):
        return StreamClosed.status, "client_closed", StreamClosed.code, "the client went away before the answer"
    if not isinstance(error, KeelError):
        return 500, "error", "internal_error", f"{type(error).__name__}: {error}"
    return error.status, _keel_outcome(error), error.code or error.type, error.message


def _keel_outcome(error: KeelError) -> Outcome:
    declared = getattr(error, "outcome", None)  # an error class may say it outright
    if declared in _OUTCOMES:
        return cast(Outcome, declared)
    for cls in type(error).__mro__:
        if cls.__name__ in _OUTCOME_BY_CLASS:
            return _OUTCOME_BY_CLASS[cls.__name__]
    if error.code == "budget_exceeded":
        return "budget_exceeded"
    if isinstance(error, InvalidRequest | AuthenticationFailed | ModelNotFound | UpstreamBadRequest):
        return "invalid"  # the caller's mistake, also when the upstream said so (context_length_exceeded)
    return "error"


def bounded_metadata(metadata: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """Client metadata cut to MAX_METADATA_CHARS in all (keys to MAX_TAG_CHARS each)."""
    if not metadata:
        return None
    kept: dict[str, Any] = {}
    room = MAX_METADATA_CHARS
    for key, value in metadata.items():
        key = key[:MAX_TAG_CHARS]
        text = str(value)[: max(0, room - len(key))]
        kept[key] = text
        room -= len(key) + len(text)
        if room <= 0:
            break
    return kept


def _input(call: Call) -> Any:
    request = call.request
    if isinstance(request, ChatRequest):
        return [message.model_dump(exclude_unset=True) for message in request.messages]
    return request.input


def _output(answer: dict[str, Any] | None) -> Any:
    """The answer's message (an embeddings list is not kept: vectors are not content to read)."""
    choices = (answer or {}).get("choices")
    return choices[0].get("message") if choices else None
