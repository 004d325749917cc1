"""The observe stage, outermost: every call that reaches Keel leaves one request record, one
span (with a child per upstream attempt) and its metrics, whatever happened to it.

It must stay cheap: it builds the record from what the context already holds and hands it
to the writer, whose thread does the heavy work (redaction, cutting content, JSON, I/O).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from typing import Any, Literal, Protocol, cast, get_args

from keel.cost.money import to_usd
from keel.errors import (
    AuthenticationFailed,
    BudgetExceeded,
    InvalidRequest,
    KeelError,
    ModelNotFound,
    UpstreamBadRequest,
)
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


class RecordSink(Protocol):
    """The request log writer: both calls return at once (records are written off the path)."""

    def submit(self, record: RequestRecord) -> None: ...

    def submit_span(self, span: SpanRecord) -> None: ...


class Observe:
    """One record, one span tree and the metrics per call: answered, failed, blocked, limited,
    cached or closed early by the client. The cost is read from `ctx.cost` (the cost stage,
    inside this one, charged it)."""

    def __init__(self, sink: RecordSink, tracing: Tracing, metrics: Metrics, log_content: bool = True) -> None:
        self.sink = sink
        self.tracing = tracing
        self.metrics = metrics
        self.log_content = log_content

    async def __call__(self, call: Call, next: Next) -> Reply:
        span = self.tracing.start_call_span(call, extract_parent(call.ctx.trace_headers))
        try:
            with current_span(span):
                reply = await next(call)
        except (Exception, asyncio.CancelledError) as error:
            self._end(call, span, None, error)
            raise
        # Once, when the reply is settled: delivered, or a stream's end, failure or early close.
        reply.on_finish(lambda answered: self._end(call, span, answered.completion(), answered.error))
        return reply

    def rejected(
        self, ctx: Context, error: BaseException, endpoint: Literal["chat", "embeddings"] = "chat",
        model: str | None = None, stream: bool = False,
    ) -> RequestRecord:
        """Log a call the gateway refused before the pipeline (bad JSON, bad key, unknown model)."""
        return record_rejected(ctx, error, endpoint, sink=self.sink, metrics=self.metrics, model=model, stream=stream)

    def _end(
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
    hit = ctx.cache_status.startswith("hit")
    if outcome == "ok" and hit:
        outcome = "cached"
    cost = ctx.cost
    usage = cost.usage or (answer or {}).get("usage") or {}
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
        tenant=ctx.tenant,
        user=bounded(ctx.user or request.user),
        feature=bounded(ctx.feature or (metadata or {}).get("feature")),
        model=request.model,
        deployment=ctx.deployment or (attempts[-1].deployment if attempts else None),
        upstream_model=(answer or {}).get("model") or None,
        system_fingerprint=(answer or {}).get("system_fingerprint"),
        stream=call.stream,
        attempts=len(attempts),
        fallbacks=sum(a.deployment != first for a in attempts),
        cache_status=ctx.cache_status,
        guardrails=[verdict.as_record() for verdict in ctx.guardrails],
        attempt_log=[
            {"deployment": a.deployment, "started_at": ended_at - (now - a.started),
             "ms": ((a.ended or now) - a.started) * 1000, "error": a.error}
            for a in attempts
        ],
        input=_input(call) if log_content else None,
        output=_output(answer) if log_content else None,
        metadata=_with_route(bounded_metadata(metadata), ctx),
        prompt_tokens=usage.get("prompt_tokens") or 0,
        completion_tokens=usage.get("completion_tokens") or 0,
        cached_tokens=(usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0,
        cost_usd=cost.usd,
        cost_nanousd=cost.nanos,
        cost_estimated=cost.estimated,
        cost_unpriced=cost.unpriced,
        latency_ms=(now - ctx.started) * 1000,
        ttft_ms=None if ctx.first_chunk_at is None else (ctx.first_chunk_at - ctx.started) * 1000,
        upstream_ms=sum(((a.ended or now) - a.started) for a in attempts) * 1000 if attempts else None,
        status=status,
        outcome=outcome,
        error_type=error_type,
        error_message=message,
        cost_saved_usd=to_usd(ctx.cache_saved_nanos) if hit else None,
        dialect=ctx.dialect,
        prompt=ctx.prompt.name if ctx.prompt else None,
        prompt_version=ctx.prompt.version if ctx.prompt else None,
    )


def record_rejected(
    ctx: Context, error: BaseException, endpoint: Literal["chat", "embeddings"] = "chat", *,
    sink: RecordSink, metrics: Metrics, model: str | None = None, stream: bool = False,
) -> RequestRecord:
    """Log and count a call refused before the pipeline (bad JSON, bad key, unknown model):
    no span, but the caller's trace id when it sent a traceparent."""
    if ctx.trace_id is None:
        ctx.trace_id = trace_id_of(extract_parent(ctx.trace_headers))
    now, ended_at = time.monotonic(), time.time()
    status, outcome, error_type, message = outcome_of(ctx, error)
    record = RequestRecord(
        request_id=ctx.request_id, started_at=ended_at - (now - ctx.started), ended_at=ended_at,
        endpoint=endpoint, trace_id=ctx.trace_id, span_id=ctx.span_id, key_id=ctx.key_id, tenant=ctx.tenant,
        user=bounded(ctx.user), feature=bounded(ctx.feature), model=bounded(model), stream=stream,
        latency_ms=(now - ctx.started) * 1000, status=status, outcome=outcome, error_type=error_type,
        error_message=message, dialect=ctx.dialect, prompt=ctx.prompt.name if ctx.prompt else None,
        prompt_version=ctx.prompt.version if ctx.prompt else None,
    )
    sink.submit(record)
    metrics.observe(record)
    return record


_OUTCOMES = frozenset(get_args(Outcome))


def outcome_of(ctx: Context, error: BaseException | None) -> tuple[int, Outcome, str | None, str | None]:
    """(HTTP status, outcome, error type, error message) of how a call ended."""
    if error is None:
        return 200, "ok", None, None
    if isinstance(error, asyncio.CancelledError):
        return StreamClosed.status, "client_closed", StreamClosed.code, "the client went away before the answer"
    if not isinstance(error, KeelError):
        return 500, "error", "internal_error", f"{type(error).__name__}: {error}"
    return error.status, _keel_outcome(error), error.code or error.type, error.message


def _keel_outcome(error: KeelError) -> Outcome:
    # A stage's own error class says its outcome outright (`outcome = "rate_limited"`), so this
    # module need not know every stage's errors.
    declared = getattr(error, "outcome", None)
    if declared in _OUTCOMES:
        return cast(Outcome, declared)
    if isinstance(error, StreamClosed):
        return "client_closed"
    if isinstance(error, BudgetExceeded):
        return "budget_exceeded"
    if isinstance(error, InvalidRequest | AuthenticationFailed | ModelNotFound | UpstreamBadRequest):
        return "invalid"  # the caller's mistake, also when the upstream said so (context_length_exceeded)
    return "error"


ROUTE_KEY = "keel.route"


def _with_route(metadata: dict[str, Any] | None, ctx: Context) -> dict[str, Any] | None:
    """A virtual model's route (keel.routing) kept in the record's metadata under `keel.route`, over any
    value a client sent under that key: {model, reason, escalations, tried}."""
    if ctx.route is None:
        return metadata
    return {**(metadata or {}), ROUTE_KEY: ctx.route.as_record()}


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
