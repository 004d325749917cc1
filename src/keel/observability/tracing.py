"""Spans for every call: one span per call, a child per upstream attempt, and `trace("step")`
spans that tie an application's chain of calls into one trace.

Spans follow OpenTelemetry's data model and W3C Trace Context, but on the request path they are
plain data (`KeelSpan`): an OpenTelemetry SDK span costs a call far more than Keel's whole share
of it (locks, attribute validation, processors). A finished span becomes a `SpanRecord` for the
request log store (the dashboard draws them), and, when an OTLP endpoint is configured, it is
queued for a background thread that turns batches of them into SDK spans for the OTLP exporter.

Parents: an explicit one (the caller's `traceparent`), else the innermost of Keel's current span
(`trace(...)`, or the call whose stages are running) and the application's own current
OpenTelemetry span, so Keel's spans join the application's trace. When the application has an
OpenTelemetry SDK of its own, Keel's current span is also made OpenTelemetry's current span, so
spans the application (or its instrumented libraries) opens inside are Keel's children.

Attribute names follow the GenAI semantic conventions (`gen_ai.*`); Keel's own are `keel.*`.
"""

from __future__ import annotations

import atexit
import functools
import inspect
import json
import logging
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from contextvars import ContextVar, Token
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, Protocol, TypeVar, cast

from opentelemetry import context as otel_context
from opentelemetry import trace as otel_trace
from opentelemetry.context import Context as TraceContext

from keel.config import TracingConfig
from keel.ids import random_hex
from keel.observability.record import RequestRecord, SpanRecord
from keel.pipeline import Call
from keel.types import ChatRequest
from keel.wording import counted

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import ReadableSpan
    from opentelemetry.sdk.trace.export import SpanExporter

F = TypeVar("F", bound=Callable[..., Any])
SpanStatus = Literal["ok", "error", "unset"]
SpanKind = Literal["internal", "server", "client"]

log = logging.getLogger("keel.tracing")

# The store has no column for span events: they are kept in the attributes under this name.
EVENTS_ATTRIBUTE = "keel.events"


class SpanSink(Protocol):
    """Where finished spans go: the request log writer (non-blocking)."""

    def submit_span(self, span: SpanRecord) -> None: ...


@dataclass(slots=True)
class SpanEvent:
    name: str
    timestamp: float  # unix seconds
    attributes: dict[str, Any]


@dataclass(slots=True, eq=False)
class KeelSpan:
    """One span as plain data (OpenTelemetry's model): ids in hex, times in unix seconds."""

    trace_id: str  # 32 hex
    span_id: str  # 16 hex
    parent_id: str | None
    name: str
    started_at: float
    attributes: dict[str, Any]
    ended_at: float = 0.0
    status: SpanStatus = "unset"
    status_message: str | None = None
    kind: SpanKind = "internal"
    sampled: bool = True  # False: a parent that is not sampled; nothing is kept or exported
    parent_remote: bool = False
    tracestate: str | None = None  # the caller's W3C tracestate, passed along the trace
    events: list[SpanEvent] | None = None
    # The OpenTelemetry span that was current when this one started (or the one this span made
    # current): a different one found current later was opened inside this span.
    otel_seen: object = None

    def set_attribute(self, key: str, value: Any) -> None:
        self.attributes[key] = value

    def set_attributes(self, attributes: Mapping[str, Any]) -> None:
        self.attributes.update(attributes)

    def add_event(self, name: str, attributes: Mapping[str, Any] | None = None, timestamp: float | None = None) -> None:
        if self.events is None:
            self.events = []
        self.events.append(SpanEvent(name, time.time() if timestamp is None else timestamp, dict(attributes or {})))

    def set_status(self, status: SpanStatus, description: str | None = None) -> None:
        self.status = status
        self.status_message = description if status == "error" else None

    def record_exception(self, error: BaseException) -> None:
        """An `exception` event (OpenTelemetry's names) and the error status."""
        kind = type(error).__qualname__
        self.add_event("exception", {"exception.type": kind, "exception.message": str(error)})
        self.set_status("error", f"{kind}: {error}")

    def is_recording(self) -> bool:
        return self.sampled and not self.ended_at


class StageTracer(NamedTuple):
    """What the observe stage leaves on the call (`ctx.tracer`) for stages that want a span of
    their own (`stage_span`): the tracer and the call's span."""

    tracing: Tracing
    span: KeelSpan


@dataclass(slots=True)
class SpanParent:
    """A parent known only by its ids: the caller's span (from `traceparent`) or the application's
    OpenTelemetry span."""

    trace_id: str  # 32 hex
    span_id: str  # 16 hex
    sampled: bool = True
    remote: bool = True
    tracestate: str | None = None


Parent = KeelSpan | SpanParent

_CURRENT: ContextVar[KeelSpan | None] = ContextVar("keel_current_span", default=None)
_ZERO_TRACE = "0" * 32
_ZERO_SPAN = "0" * 16
_HEX = frozenset("0123456789abcdef")
_NULL_SCOPE: AbstractContextManager[None] = nullcontext()
_UNKNOWN = object()


def _trace_id() -> str:
    value = random_hex(16)
    return value if value != _ZERO_TRACE else _trace_id()


def _span_id() -> str:
    value = random_hex(8)
    return value if value != _ZERO_SPAN else _span_id()


class Tracing:
    """Keel's tracer: spans to the store and/or OTLP; nothing at all when both are off."""

    def __init__(self, config: TracingConfig, sink: SpanSink | None = None) -> None:
        self.sink = sink if config.to_store else None
        self.exporter = OtlpExport(config.otlp_endpoint, config.service_name) if config.otlp_endpoint else None
        self.enabled = self.sink is not None or self.exporter is not None

    def shutdown(self) -> None:
        """Send what is queued for OTLP and stop the exporter (on close)."""
        if self.exporter is not None:
            self.exporter.shutdown()

    # ------------------------------------------------------------------ library API

    def trace(self, name: str, **attributes: Any) -> TraceScope:
        """A span around a step of the application: `with keel.trace("answer"):` or `@keel.trace("answer")`.
        Calls made inside it (and spans the application opens) are its children."""
        return TraceScope(self if self.enabled else None, name, attributes)

    # ------------------------------------------------------------------ the call span

    def start_call_span(self, call: Call, parent: Parent | None = None) -> KeelSpan | None:
        """The call's span, child of `parent` (an extracted traceparent) or of the current span;
        sets ctx.trace_id and ctx.span_id (none when the parent is not sampled). None when tracing is off."""
        ctx = call.ctx
        if not self.enabled:  # no span, but the log still joins the caller's (or the app's) trace
            found = parent if parent is not None else _otel_parent(otel_trace.get_current_span())
            ctx.trace_id = (found.trace_id if found is not None else None) or ctx.trace_id
            return None
        request = call.request
        if isinstance(request, ChatRequest):
            operation = "chat"
            attributes: dict[str, Any] = {
                "gen_ai.operation.name": "chat",
                "gen_ai.request.model": request.model,
                "keel.request_id": ctx.request_id,
            }
            if request.output_limit is not None:
                attributes["gen_ai.request.max_tokens"] = request.output_limit
            if request.temperature is not None:
                attributes["gen_ai.request.temperature"] = request.temperature
            if request.top_p is not None:
                attributes["gen_ai.request.top_p"] = request.top_p
        else:
            operation = "embeddings"
            attributes = {
                "gen_ai.operation.name": "embeddings",
                "gen_ai.request.model": request.model,
                "keel.request_id": ctx.request_id,
            }
        started_at = time.time() - (time.monotonic() - ctx.started)
        span = self._start(f"{operation} {request.model}", attributes, parent, started_at)
        ctx.trace_id = span.trace_id
        ctx.span_id = span.span_id if span.sampled else None
        ctx.tracer = StageTracer(self, span)
        return span

    def end_call_span(
        self, span: KeelSpan | None, call: Call, record: RequestRecord, answer: Mapping[str, Any] | None
    ) -> None:
        """Attempt children from ctx.attempts, the call's outcome as attributes, then the end."""
        if span is None or span.ended_at:
            return
        span.ended_at = ended_at = record.ended_at  # the call ends when its record says it did
        if not span.sampled:
            return
        self._attempt_spans(span, call, ended_at, record)
        span.attributes.update(_outcome_attributes(call, record, answer))
        for verdict in record.guardrails:  # what each guardrail check found and did
            span.add_event("keel.guardrail", {
                f"keel.guardrail.{name}": value if isinstance(value, str | int | float | bool) else json.dumps(value)
                for name, value in verdict.items()
            }, timestamp=ended_at)
        if record.error_type is not None:
            span.set_status("error", record.error_type)
        self._emit(span, record)

    # ------------------------------------------------------------------ spans

    def _start(
        self, name: str, attributes: dict[str, Any], parent: Parent | None, started_at: float,
        kind: SpanKind = "internal",
    ) -> KeelSpan:
        """A span, child of `parent` or of the current one (Keel's or the application's)."""
        app = otel_trace.get_current_span()
        if parent is None:
            ours = _CURRENT.get()
            if ours is not None and (app is ours.otel_seen or not app.get_span_context().is_valid):
                parent = ours
            else:  # the application's span, opened inside ours (or there is none of ours)
                parent = _otel_parent(app) or ours
        if parent is None:
            ids = random_hex(24)  # a new trace: its id and the span's in one read
            trace_id, span_id = ids[:32], ids[32:]
            if trace_id == _ZERO_TRACE or span_id == _ZERO_SPAN:
                trace_id, span_id = _trace_id(), _span_id()
            return KeelSpan(trace_id, span_id, None, name, started_at, attributes, kind=kind, otel_seen=app)
        return KeelSpan(
            parent.trace_id, _span_id(), parent.span_id, name, started_at, attributes, kind=kind,
            sampled=parent.sampled, parent_remote=isinstance(parent, SpanParent) and parent.remote,
            tracestate=parent.tracestate, otel_seen=app,
        )

    def _emit(self, span: KeelSpan, record: RequestRecord | None = None) -> None:
        """A finished span to the store (inside its call's record when it has one: one row per
        call) and the OTLP queue; neither blocks."""
        if not span.sampled:
            return
        if self.sink is not None:
            if record is not None:
                record.spans.append(span_record(span).as_dict())
            else:
                self.sink.submit_span(span_record(span))
        if self.exporter is not None:
            self.exporter.submit(span)

    def _attempt_spans(self, parent: KeelSpan, call: Call, ended_at: float, record: RequestRecord) -> None:
        """One child span per upstream attempt, timed by the reliability stage's records (one
        still running when the call ended, as when the client went away, ends with it)."""
        attempts = call.ctx.attempts
        if not attempts:
            return
        to_wall = time.time() - time.monotonic()
        operation = "chat" if isinstance(call.request, ChatRequest) else "embeddings"
        request_id = call.ctx.request_id
        trace_id, parent_id, tracestate = parent.trace_id, parent.span_id, parent.tracestate
        for number, attempt in enumerate(attempts, 1):
            deployment = attempt.deployment
            attributes: dict[str, Any] = {
                "gen_ai.operation.name": operation,
                "keel.deployment": deployment,
                "keel.attempt": number,
                "keel.request_id": request_id,
            }
            for candidate in call.deployments:
                if candidate.name == deployment:
                    attributes["gen_ai.system"] = candidate.config.provider
                    break
            child = KeelSpan(
                trace_id, _span_id(), parent_id, f"attempt {deployment}", to_wall + attempt.started, attributes,
                to_wall + attempt.ended if attempt.ended else ended_at, kind="client", tracestate=tracestate,
            )
            if attempt.error is not None:
                attributes["error.type"] = attempt.error
                child.status, child.status_message = "error", attempt.error
            self._emit(child, record)


class _Current:
    """Makes a span Keel's current one (and OpenTelemetry's, when the application uses its SDK)."""

    __slots__ = ("_otel", "_span", "_token")

    def __init__(self, span: KeelSpan) -> None:
        self._span = span
        self._token: Token[KeelSpan | None] | None = None
        self._otel: Token[TraceContext] | None = None

    def __enter__(self) -> None:
        self._token = _CURRENT.set(self._span)
        self._otel = _attach_otel(self._span)

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        if self._otel is not None:
            otel_context.detach(self._otel)
        if self._token is not None:
            _CURRENT.reset(self._token)


def current_span(span: KeelSpan | None) -> AbstractContextManager[None]:
    """Make `span` the current one while the inner stages run, so their spans are its children."""
    return _NULL_SCOPE if span is None else _Current(span)


def _app_uses_otel() -> bool:
    """Whether the application installed an OpenTelemetry SDK (a global tracer provider of its own).
    The API's module global is read first: `get_tracer_provider()` reads the environment every time
    while none is set (a microsecond a call)."""
    installed = getattr(otel_trace, "_TRACER_PROVIDER", _UNKNOWN)
    if installed is None:
        return False
    if installed is not _UNKNOWN:
        return not isinstance(installed, otel_trace.ProxyTracerProvider)
    return not isinstance(otel_trace.get_tracer_provider(), otel_trace.ProxyTracerProvider)


def _attach_otel(span: KeelSpan) -> Token[TraceContext] | None:
    """Make `span` OpenTelemetry's current span too, when the application has an SDK to see it."""
    if not _app_uses_otel():
        return None
    from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

    marker = NonRecordingSpan(SpanContext(
        int(span.trace_id, 16), int(span.span_id, 16), is_remote=False,
        trace_flags=TraceFlags(TraceFlags.SAMPLED if span.sampled else TraceFlags.DEFAULT),
    ))
    span.otel_seen = marker
    return otel_context.attach(otel_trace.set_span_in_context(marker))


def _otel_parent(app: otel_trace.Span) -> SpanParent | None:
    """The application's current OpenTelemetry span as a parent; None when it has none."""
    context = app.get_span_context()
    if not context.is_valid:
        return None
    return SpanParent(
        format(context.trace_id, "032x"), format(context.span_id, "016x"), context.trace_flags.sampled,
        remote=context.is_remote, tracestate=context.trace_state.to_header() or None,
    )


@contextmanager
def stage_span(call: Call, name: str, **attributes: Any) -> Iterator[KeelSpan | None]:
    """A span for one stage's own work (a guardrail check, a cache lookup), child of the call's
    span. Stages need no tracer of their own: the observe stage left one on the call."""
    found = call.ctx.tracer
    if found is None:
        yield None
        return
    tracing, parent = found
    span = tracing._start(name, attributes, parent, time.time())
    token = _CURRENT.set(span)
    try:
        yield span
    except BaseException as error:
        span.record_exception(error)
        raise
    finally:
        _CURRENT.reset(token)
        span.ended_at = time.time()
        tracing._emit(span)


def extract_parent(headers: Mapping[str, str] | None) -> SpanParent | None:
    """The caller's span from W3C `traceparent`/`tracestate` headers (names in lower case, as ASGI
    gives them, or a case-insensitive mapping such as Starlette's `Headers`); None when there is
    none or it is malformed."""
    if not headers:
        return None
    traceparent = headers.get("traceparent")
    if not traceparent:
        return None
    parent = parse_traceparent(traceparent)
    if parent is not None and (tracestate := headers.get("tracestate")):
        parent.tracestate = _bounded_tracestate(tracestate)
    return parent


def _bounded_tracestate(value: str, limit: int = 512) -> str | None:
    """The caller's tracestate as passed on: at most `limit` characters, whole entries only (the
    last ones are dropped, as W3C Trace Context allows)."""
    value = value.strip()
    if len(value) > limit:
        cut = value.rfind(",", 0, limit + 1)
        value = value[:cut].rstrip() if cut > 0 else ""
    return value or None


def parse_traceparent(value: str) -> SpanParent | None:
    """`version-traceid-parentid-flags` (W3C Trace Context, level 1): lower-case hex fields of 2,
    32, 16 and 2 characters; version ff, and all-zero ids, are invalid; version 00 has exactly
    these four fields, a later version may add more after a dash."""
    value = value.strip()
    if len(value) < 55 or value[2] != "-" or value[35] != "-" or value[52] != "-":
        return None
    version, trace_id, span_id, flags = value[:2], value[3:35], value[36:52], value[53:55]
    if version == "ff" or not _HEX.issuperset(version + trace_id + span_id + flags):
        return None
    if len(value) > 55 and (version == "00" or value[55] != "-"):
        return None
    if trace_id == _ZERO_TRACE or span_id == _ZERO_SPAN:
        return None
    return SpanParent(trace_id, span_id, sampled=bool(int(flags, 16) & 1))


def trace_id_of(parent: Parent | TraceContext | None) -> str | None:
    """The trace id (32 hex) of a parent (or of an OpenTelemetry context's span), None when it has none."""
    if parent is None:
        return None
    if isinstance(parent, KeelSpan | SpanParent):
        return parent.trace_id
    found = _otel_parent(otel_trace.get_current_span(parent))
    return None if found is None else found.trace_id


class TraceScope:
    """One `trace(name)`: a context manager (sync or async) and a decorator (sync or async functions)."""

    __slots__ = ("_otel", "_span", "_token", "attributes", "name", "tracing")

    def __init__(self, tracing: Tracing | None, name: str, attributes: Mapping[str, Any]) -> None:
        self.tracing = tracing
        self.name = name
        self.attributes = dict(attributes)
        self._span: KeelSpan | None = None
        self._token: Token[KeelSpan | None] | None = None
        self._otel: Token[TraceContext] | None = None

    def __enter__(self) -> KeelSpan | None:
        if self.tracing is None:
            return None
        self._span = span = self.tracing._start(self.name, dict(self.attributes), None, time.time())
        self._token = _CURRENT.set(span)
        self._otel = _attach_otel(span)
        return span

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        span, self._span = self._span, None
        if span is None or self.tracing is None:
            return
        if self._otel is not None:
            otel_context.detach(self._otel)
            self._otel = None
        if self._token is not None:
            _CURRENT.reset(self._token)
            self._token = None
        if error is not None:
            span.record_exception(error)
        span.ended_at = time.time()
        self.tracing._emit(span)

    async def __aenter__(self) -> KeelSpan | None:
        return self.__enter__()

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.__exit__(kind, error, traceback)

    def __call__(self, function: F) -> F:
        """Decorate: every run of `function` gets its own span."""
        tracing, name, attributes = self.tracing, self.name, self.attributes
        if inspect.iscoroutinefunction(function):

            @functools.wraps(function)
            async def run_async(*args: Any, **kwargs: Any) -> Any:
                with TraceScope(tracing, name, attributes):
                    return await function(*args, **kwargs)

            return cast(F, run_async)

        @functools.wraps(function)
        def run(*args: Any, **kwargs: Any) -> Any:
            with TraceScope(tracing, name, attributes):
                return function(*args, **kwargs)

        return cast(F, run)


def span_record(span: KeelSpan) -> SpanRecord:
    """A finished span as the store keeps it (events, if any, under `keel.events`)."""
    attributes = span.attributes
    if span.events:
        attributes = {**attributes, EVENTS_ATTRIBUTE: [
            {"name": e.name, "time": e.timestamp, "attributes": e.attributes} for e in span.events
        ]}
    request_id = attributes.get("keel.request_id")
    return SpanRecord(
        span.trace_id, span.span_id, span.parent_id, span.name, span.started_at, span.ended_at, span.status,
        attributes, request_id if type(request_id) is str else None,
    )


# ---------------------------------------------------------------------------- OTLP, off the request path


class OtlpExport:
    """Finished spans to an OTLP/HTTP endpoint: queued by `submit` (never blocks), turned into SDK
    spans and sent in batches by a thread of its own; what is queued is sent on `shutdown` (and at
    exit). Spans beyond `max_queue` waiting are dropped and counted."""

    def __init__(
        self, endpoint: str, service_name: str, *, exporter: SpanExporter | None = None, max_queue: int = 2048,
        batch_size: int = 512, delay: float = 5.0,
    ) -> None:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.util.instrumentation import InstrumentationScope

        if exporter is None:
            exporter = OTLPSpanExporter(endpoint=endpoint)
            logging.getLogger(OTLPSpanExporter.__module__).addFilter(_EXPORTER_LOGS)
        self.exporter: SpanExporter = exporter
        self.endpoint = endpoint
        self.failing = False  # the last batch was not accepted: say so once, and once when it is again
        self.resource = Resource.create({"service.name": service_name})
        self.scope = InstrumentationScope("keel", _keel_version())
        self.max_queue, self.batch_size, self.delay = max_queue, batch_size, delay
        self.dropped = 0
        self._queue: deque[KeelSpan] = deque()
        self._wake = threading.Event()
        self._export_lock = threading.Lock()
        self._start_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._closed = False
        atexit.register(self.shutdown)
        ref = weakref.ref(self)
        os.register_at_fork(after_in_child=lambda: _after_fork(ref))

    def submit(self, span: KeelSpan) -> None:
        queue = self._queue
        if len(queue) >= self.max_queue or self._closed:
            self.dropped += 1
            return
        queue.append(span)
        if self._thread is None:
            self._start_thread()
        if len(queue) >= self.batch_size and not self._wake.is_set():
            self._wake.set()

    def flush(self) -> None:
        """Send everything queued now (on the calling thread)."""
        with self._export_lock:
            self._send_queued()

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.shutdown)
        self._wake.set()
        if self._thread is not None:
            self._thread.join(30)
        self.flush()
        self.exporter.shutdown()
        if self.dropped:
            log.warning("%s not exported: the OTLP queue was full", counted(self.dropped, "span"))

    def _forked(self) -> None:
        """In a child process: the parent's thread and queued spans stayed with the parent."""
        self._queue.clear()
        self._wake = threading.Event()
        self._export_lock = threading.Lock()
        self._start_lock = threading.Lock()
        self._thread = None

    def _start_thread(self) -> None:
        with self._start_lock:
            if self._thread is None and not self._closed:
                self._thread = threading.Thread(target=self._run, name="keel-otlp-export", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while True:
            self._wake.wait(self.delay)
            self._wake.clear()
            self.flush()
            if self._closed:
                return

    def _send_queued(self) -> None:
        from opentelemetry.sdk.trace.export import SpanExportResult

        queue = self._queue
        while queue:
            batch: list[KeelSpan] = []
            while queue and len(batch) < self.batch_size:
                batch.append(queue.popleft())
            problem: str | None = None
            _EXPORTER_LOGS.held.first = None
            _EXPORTER_LOGS.held.active = True
            try:
                result = self.exporter.export([readable_span(s, self.resource, self.scope) for s in batch])
                if result is not SpanExportResult.SUCCESS:
                    problem = _EXPORTER_LOGS.held.first or "the exporter reported a failure"
            except Exception as exc:  # a collector that is down must not stop the thread
                problem = f"{type(exc).__name__}: {exc}"
            finally:
                _EXPORTER_LOGS.held.active = False
            self._note(problem)

    def _note(self, problem: str | None) -> None:
        # One line when the collector stops taking spans and one when it takes them again: an
        # error line per batch would bury the gateway's own log while a collector is down.
        if problem is not None and not self.failing:
            log.warning("OTLP export to %s failed (%s); spans are dropped, without further warnings, until "
                        "the collector answers", self.endpoint, problem)
        elif problem is None and self.failing:
            log.info("OTLP export to %s works again", self.endpoint)
        self.failing = problem is not None


class _HeldExporterLogs(logging.Filter):
    """Keeps the OpenTelemetry exporter's own lines (one per failed batch and per retry) out of the
    log while Keel's export thread calls it; the first one becomes the reason in Keel's warning.
    Other threads (an application's own exporter) log as usual."""

    def __init__(self) -> None:
        super().__init__()
        self.held = threading.local()

    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(self.held, "active", False):
            return True
        if self.held.first is None:  # the cause; later lines only say the retries ran out
            self.held.first = record.getMessage()
        return False


_EXPORTER_LOGS = _HeldExporterLogs()


def _after_fork(ref: weakref.ref[OtlpExport]) -> None:
    export = ref()
    if export is not None:
        export._forked()


def readable_span(span: KeelSpan, resource: Any, scope: Any) -> ReadableSpan:
    """A finished `KeelSpan` as the OpenTelemetry SDK's span, for its exporters."""
    from opentelemetry.sdk.trace import Event, ReadableSpan
    from opentelemetry.trace import SpanContext, Status, StatusCode, TraceFlags, TraceState
    from opentelemetry.trace import SpanKind as OtelKind

    trace_id = int(span.trace_id, 16)
    flags = TraceFlags(TraceFlags.SAMPLED)
    state = TraceState.from_header([span.tracestate]) if span.tracestate else None
    context = SpanContext(trace_id, int(span.span_id, 16), is_remote=False, trace_flags=flags, trace_state=state)
    parent = None
    if span.parent_id is not None:
        parent = SpanContext(
            trace_id, int(span.parent_id, 16), is_remote=span.parent_remote, trace_flags=flags, trace_state=state
        )
    events = [
        Event(e.name, _otel_attributes(e.attributes), int(e.timestamp * 1e9)) for e in span.events or ()
    ]
    status = {
        "ok": Status(StatusCode.OK), "unset": Status(StatusCode.UNSET),
    }.get(span.status) or Status(StatusCode.ERROR, span.status_message)
    kind = {"internal": OtelKind.INTERNAL, "server": OtelKind.SERVER, "client": OtelKind.CLIENT}[span.kind]
    return ReadableSpan(
        name=span.name, context=context, parent=parent, resource=resource,
        attributes=_otel_attributes(span.attributes), events=events, kind=kind, status=status,
        start_time=int(span.started_at * 1e9), end_time=int(span.ended_at * 1e9), instrumentation_scope=scope,
    )


def _otel_attributes(attributes: Mapping[str, Any]) -> dict[str, Any]:
    """What OTLP carries: scalars and sequences of them as they are, None left out, others as text."""
    kept: dict[str, Any] = {}
    for key, value in attributes.items():
        if value is None:
            continue
        if isinstance(value, list | tuple):
            value = [v if isinstance(v, str | bool | int | float) else str(v) for v in value]
        elif not isinstance(value, str | bool | int | float):
            value = str(value)
        kept[key] = value
    return kept


def _keel_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("keel")
    except PackageNotFoundError:
        return None


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
    if record.cost_saved_usd is not None:  # a cache hit: what its answer cost when it was stored
        attributes["keel.cost_saved_usd"] = record.cost_saved_usd
    provider = None
    for deployment in call.deployments:
        if deployment.name == record.deployment:
            provider = deployment.config.provider
            break
    if provider is not None:
        attributes["gen_ai.system"] = attributes["gen_ai.provider.name"] = provider
    if record.upstream_model is not None:
        attributes["gen_ai.response.model"] = record.upstream_model
    if record.deployment is not None:
        attributes["keel.deployment"] = record.deployment
    if record.feature is not None:
        attributes["keel.feature"] = record.feature
    if call.ctx.route is not None:  # a virtual model's tier (keel.routing)
        attributes["keel.route"] = call.ctx.route.model
        attributes["keel.route_reason"] = call.ctx.route.reason
        attributes["keel.route_escalations"] = call.ctx.route.escalations
    if record.error_type is not None:
        attributes["error.type"] = record.error_type
    if answer is not None:
        if answer.get("id"):
            attributes["gen_ai.response.id"] = answer["id"]
        reasons = [c["finish_reason"] for c in answer.get("choices") or () if c.get("finish_reason")]
        if reasons:
            attributes["gen_ai.response.finish_reasons"] = reasons
    return attributes
