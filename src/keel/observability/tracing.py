"""OpenTelemetry spans for every call: one span per call, a child per upstream attempt, and
`trace("step")` spans that tie an application's chain of calls into one trace.

Keel owns its `TracerProvider` (several Keel instances and tests must not share one), but it
reads and writes the ordinary OpenTelemetry context, so a call made inside the application's
own span, or inside `keel.trace(...)`, becomes its child. Finished spans go to the request log
store (the dashboard draws them) and, when an endpoint is configured, to OTLP.

Attribute names follow the GenAI semantic conventions (`gen_ai.*`); Keel's own are `keel.*`.
"""

from __future__ import annotations

import functools
import inspect
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from types import TracebackType
from typing import Any, Literal, Protocol, TypeVar, cast

from opentelemetry import context as otel_context
from opentelemetry import trace as otel_trace
from opentelemetry.context import Context as TraceContext
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from keel.config import TracingConfig
from keel.observability.record import RequestRecord, SpanRecord
from keel.pipeline import Call
from keel.types import ChatRequest

F = TypeVar("F", bound=Callable[..., Any])

_PROPAGATOR = TraceContextTextMapPropagator()
# Where the call's tracer waits for stages that want a span of their own (see `stage_span`).
TRACER_KEY = "keel.tracer"


class SpanSink(Protocol):
    """Where finished spans go: the request log writer (non-blocking)."""

    def submit_span(self, span: SpanRecord) -> None: ...


class Tracing:
    """Keel's tracer: spans to the store and/or OTLP; nothing at all when both are off."""

    def __init__(self, config: TracingConfig, sink: SpanSink | None = None) -> None:
        to_store = config.to_store and sink is not None
        self.enabled = to_store or config.otlp_endpoint is not None
        self.provider: TracerProvider | None = None
        self.tracer: otel_trace.Tracer | None = None
        if not self.enabled:
            return
        # Flushed at exit only when spans leave the process in batches; tests make many of these.
        self.provider = TracerProvider(
            resource=Resource.create({"service.name": config.service_name}),
            shutdown_on_exit=config.otlp_endpoint is not None,
        )
        if to_store and sink is not None:
            self.provider.add_span_processor(StoreSpans(sink))
        if config.otlp_endpoint is not None:
            self.provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=config.otlp_endpoint)))
        self.tracer = self.provider.get_tracer("keel")

    def shutdown(self) -> None:
        """Flush and stop the exporters (on close)."""
        if self.provider is not None:
            self.provider.shutdown()

    # ------------------------------------------------------------------ library API

    def trace(self, name: str, **attributes: Any) -> TraceScope:
        """A span around a step of the application: `with keel.trace("answer"):` or `@keel.trace("answer")`.
        Calls made inside it (and spans the application opens) are its children."""
        return TraceScope(self.tracer, name, attributes)

    # ------------------------------------------------------------------ the call span

    def start_call_span(self, call: Call, parent: TraceContext | None = None) -> Span | None:
        """The call's span, child of `parent` (an extracted traceparent) or of the current span;
        sets ctx.trace_id and ctx.span_id. None when tracing is off."""
        ctx = call.ctx
        if self.tracer is None:  # no span, but the log still joins the caller's (or the app's) trace
            ctx.trace_id = trace_id_of(parent if parent is not None else otel_context.get_current()) or ctx.trace_id
            return None
        request = call.request
        operation = "chat" if isinstance(request, ChatRequest) else "embeddings"
        attributes: dict[str, Any] = {
            "gen_ai.operation.name": operation,
            "gen_ai.request.model": request.model,
            "keel.request_id": ctx.request_id,
        }
        if isinstance(request, ChatRequest):
            for key, value in (
                ("gen_ai.request.max_tokens", request.output_limit),
                ("gen_ai.request.temperature", request.temperature),
                ("gen_ai.request.top_p", request.top_p),
            ):
                if value is not None:
                    attributes[key] = value
        started_ns = time.time_ns() - int((time.monotonic() - ctx.started) * 1e9)
        span = self.tracer.start_span(
            f"{operation} {request.model}", context=parent, attributes=attributes, start_time=started_ns
        )
        span_context = span.get_span_context()
        ctx.trace_id = format(span_context.trace_id, "032x")
        ctx.span_id = format(span_context.span_id, "016x")
        ctx.extras[TRACER_KEY] = (self.tracer, span)
        return span

    def end_call_span(
        self, span: Span | None, call: Call, record: RequestRecord, answer: Mapping[str, Any] | None
    ) -> None:
        """Attempt children from ctx.attempts, the call's outcome as attributes, then the end."""
        if span is None:
            return
        if span.is_recording():
            self._attempt_spans(span, call)
            span.set_attributes(_outcome_attributes(call, record, answer))
            for verdict in call.ctx.guardrails:
                span.add_event("guardrail", _scalars(verdict))
            if record.error_type is not None:
                span.set_status(Status(StatusCode.ERROR, record.error_type))
        span.end()

    def _attempt_spans(self, parent: Span, call: Call) -> None:
        """One child span per upstream attempt, timed by the reliability stage's records."""
        assert self.tracer is not None
        attempts = call.ctx.attempts
        if not attempts:
            return
        parent_context = otel_trace.set_span_in_context(parent)
        now = time.monotonic()
        to_wall_ns = time.time_ns() - int(now * 1e9)
        system = {d.name: d.config.provider for d in call.deployments}
        operation = "chat" if isinstance(call.request, ChatRequest) else "embeddings"
        for number, attempt in enumerate(attempts, 1):
            attributes: dict[str, Any] = {
                "gen_ai.operation.name": operation,
                "keel.deployment": attempt.deployment,
                "keel.attempt": number,
                "keel.request_id": call.ctx.request_id,
            }
            if provider := system.get(attempt.deployment):
                attributes["gen_ai.system"] = provider
            if attempt.error is not None:
                attributes["error.type"] = attempt.error
            child = self.tracer.start_span(
                f"attempt {attempt.deployment}", context=parent_context, kind=SpanKind.CLIENT,
                attributes=attributes, start_time=to_wall_ns + int(attempt.started * 1e9),
            )
            if attempt.error is not None:
                child.set_status(Status(StatusCode.ERROR, attempt.error))
            child.end(end_time=to_wall_ns + int((attempt.ended or now) * 1e9))


@contextmanager
def current_span(span: Span | None) -> Iterator[None]:
    """Make `span` the current one while the inner stages run, so their spans are its children."""
    if span is None:
        yield
        return
    token = otel_context.attach(otel_trace.set_span_in_context(span))
    try:
        yield
    finally:
        otel_context.detach(token)


@contextmanager
def stage_span(call: Call, name: str, **attributes: Any) -> Iterator[Span | None]:
    """A span for one stage's own work (a guardrail check, a cache lookup), child of the call's
    span. Stages need no tracer of their own: the observe stage left one on the call."""
    found = call.ctx.extras.get(TRACER_KEY)
    if found is None:
        yield None
        return
    tracer, parent = cast(tuple[otel_trace.Tracer, Span], found)
    with tracer.start_as_current_span(
        name, context=otel_trace.set_span_in_context(parent), attributes=attributes
    ) as span:
        yield span


def extract_parent(headers: Mapping[str, str] | None) -> TraceContext | None:
    """The caller's span from W3C `traceparent`/`tracestate` headers (names in lower case, as ASGI
    gives them, or a case-insensitive mapping such as Starlette's `Headers`); None when there is none."""
    if not headers:
        return None
    traceparent = headers.get("traceparent")
    if not traceparent:
        return None
    carrier = {"traceparent": traceparent}
    if tracestate := headers.get("tracestate"):
        carrier["tracestate"] = tracestate
    parent = _PROPAGATOR.extract(carrier)
    return parent if otel_trace.get_current_span(parent).get_span_context().is_valid else None


def trace_id_of(parent: TraceContext | None) -> str | None:
    """The trace id (32 hex) of a context's span, None when it has none."""
    if parent is None:
        return None
    span_context = otel_trace.get_current_span(parent).get_span_context()
    return format(span_context.trace_id, "032x") if span_context.is_valid else None


class TraceScope:
    """One `trace(name)`: a context manager (sync or async) and a decorator (sync or async functions)."""

    def __init__(self, tracer: otel_trace.Tracer | None, name: str, attributes: Mapping[str, Any]) -> None:
        self.tracer = tracer
        self.name = name
        self.attributes = dict(attributes)
        self._span: Span | None = None
        self._token: object = None

    def __enter__(self) -> Span | None:
        if self.tracer is None:
            return None
        self._span = self.tracer.start_span(self.name, attributes=self.attributes)
        self._token = otel_context.attach(otel_trace.set_span_in_context(self._span))
        return self._span

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        span, self._span = self._span, None
        if span is None:
            return
        otel_context.detach(cast(Any, self._token))
        if error is not None:
            span.record_exception(error)
            span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))
        span.end()

    async def __aenter__(self) -> Span | None:
        return self.__enter__()

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.__exit__(kind, error, traceback)

    def __call__(self, function: F) -> F:
        """Decorate: every run of `function` gets its own span."""
        tracer, name, attributes = self.tracer, self.name, self.attributes
        if inspect.iscoroutinefunction(function):

            @functools.wraps(function)
            async def run_async(*args: Any, **kwargs: Any) -> Any:
                with TraceScope(tracer, name, attributes):
                    return await function(*args, **kwargs)

            return cast(F, run_async)

        @functools.wraps(function)
        def run(*args: Any, **kwargs: Any) -> Any:
            with TraceScope(tracer, name, attributes):
                return function(*args, **kwargs)

        return cast(F, run)


class StoreSpans(SpanProcessor):
    """Hands each finished span to the request log writer as a `SpanRecord` (its submit never blocks)."""

    def __init__(self, sink: SpanSink) -> None:
        self.sink = sink

    def on_end(self, span: ReadableSpan) -> None:
        self.sink.submit_span(span_record(span))


_STATUS: dict[StatusCode, Literal["ok", "error", "unset"]] = {
    StatusCode.OK: "ok", StatusCode.ERROR: "error", StatusCode.UNSET: "unset"
}


def span_record(span: ReadableSpan) -> SpanRecord:
    context = span.get_span_context()
    assert context is not None
    # The SDK keeps attributes in a BoundedAttributes behind a mappingproxy, which copies key by key
    # in Python (~6 us a span); its inner dict copies in C. The public way is the fallback.
    inner = getattr(getattr(span, "_attributes", None), "_dict", None)
    attributes = dict(inner) if type(inner) is dict else dict(span.attributes or {})
    for key, value in attributes.items():
        if type(value) is tuple:  # OTel keeps sequences as tuples; the store keeps JSON lists
            attributes[key] = list(value)
    request_id = attributes.get("keel.request_id")
    return SpanRecord(
        trace_id=format(context.trace_id, "032x"),
        span_id=format(context.span_id, "016x"),
        parent_id=format(span.parent.span_id, "016x") if span.parent is not None else None,
        name=span.name,
        started_at=(span.start_time or 0) / 1e9,
        ended_at=(span.end_time or 0) / 1e9,
        status=_STATUS[span.status.status_code],
        attributes=attributes,
        request_id=request_id if isinstance(request_id, str) else None,
    )


def _outcome_attributes(call: Call, record: RequestRecord, answer: Mapping[str, Any] | None) -> dict[str, Any]:
    """The GenAI response attributes and Keel's own, from the call's record and answer."""
    attributes: dict[str, Any] = {
        "gen_ai.usage.input_tokens": record.prompt_tokens,
        "gen_ai.usage.output_tokens": record.completion_tokens,
        "keel.cost_usd": record.cost_usd,
        "keel.cache_status": record.cache_status,
        "keel.outcome": record.outcome,
        "http.response.status_code": record.status,
    }
    provider = next((d.config.provider for d in call.deployments if d.name == record.deployment), None)
    route = call.ctx.extras.get("route")
    for key, value in (
        ("gen_ai.system", provider),
        ("gen_ai.provider.name", provider),
        ("gen_ai.response.model", record.upstream_model),
        ("keel.deployment", record.deployment),
        ("keel.feature", record.feature),
        ("keel.route", None if route is None else str(route)),
        ("error.type", record.error_type),
    ):
        if value is not None:
            attributes[key] = value
    if answer is not None:
        if answer.get("id"):
            attributes["gen_ai.response.id"] = answer["id"]
        reasons = [c["finish_reason"] for c in answer.get("choices") or () if c.get("finish_reason")]
        if reasons:
            attributes["gen_ai.response.finish_reasons"] = reasons
    return attributes


def _scalars(values: Mapping[str, Any]) -> dict[str, str | bool | int | float]:
    """What an OTel event may carry: scalar values (others are shown as text)."""
    return {k: v if isinstance(v, str | bool | int | float) else str(v) for k, v in values.items() if v is not None}
