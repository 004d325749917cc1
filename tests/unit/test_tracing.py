"""Tracing: GenAI attributes on the call span, a child per upstream attempt, the caller's
traceparent honoured, `trace(...)` chains, spans in the store and over OTLP."""

from __future__ import annotations

import asyncio
import http.server
import threading
from collections.abc import Iterator, Mapping
from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider
from starlette.datastructures import Headers

from keel.config import KeelConfig, TracingConfig
from keel.engine import Keel
from keel.errors import UpstreamServerError
from keel.observability.metrics import Metrics
from keel.observability.record import RequestRecord, SpanRecord
from keel.observability.stage import Observe
from keel.observability.tracing import Tracing, extract_parent, stage_span
from keel.pipeline import Call, ChunkStream, Context, Next, Reply
from keel.types import ChatRequest, EmbeddingRequest

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"


class Sink:
    def __init__(self) -> None:
        self.records: list[RequestRecord] = []
        self.spans: list[SpanRecord] = []

    def submit(self, record: RequestRecord) -> None:
        self.records.append(record)

    def submit_span(self, span: SpanRecord) -> None:
        self.spans.append(span)

    def span(self, name: str) -> SpanRecord:
        found = [s for s in self.spans if s.name == name]
        assert len(found) == 1, [s.name for s in self.spans]
        return found[0]


class Charger:
    def charge(self, call: Call, answer: Mapping[str, Any] | None) -> None:
        call.ctx.usage = (answer or {}).get("usage")
        call.ctx.cost_usd = 0.25 if answer is not None else 0.0


def setup(*deployments: dict[str, Any], tracing: TracingConfig | None = None, inner: list[Any] | None = None,
          max_attempts: int = 1) -> tuple[Keel, Tracing, Sink]:
    sink = Sink()
    traced = Tracing(tracing or TracingConfig(), sink)
    config = KeelConfig.model_validate({"models": [{
        "name": "chat", "retry": {"max_attempts": max_attempts, "initial_backoff_ms": 0},
        "deployments": list(deployments) or [{"provider": "simulated", "name": "primary", "model": "sim-1"}],
    }]})
    observe = Observe(sink, traced, Metrics(), Charger())
    return Keel(config, stages=[observe, *(inner or [])]), traced, sink


def request(**fields: Any) -> ChatRequest:
    return ChatRequest.model_validate({"model": "chat", "messages": [{"role": "user", "content": "hi"}], **fields})


# ---------------------------------------------------------------------------- the call span


async def test_the_call_span_carries_the_genai_attributes_and_keels_own() -> None:
    keel, _, sink = setup()
    await keel.handle(request(max_tokens=50, temperature=0.3, top_p=0.9), Context(feature="search"))
    record = sink.records[0]
    span = sink.span("chat chat")
    a = span.attributes
    assert a["gen_ai.operation.name"] == "chat"
    assert a["gen_ai.system"] == a["gen_ai.provider.name"] == "simulated"
    assert (a["gen_ai.request.model"], a["gen_ai.response.model"]) == ("chat", "sim-1")
    assert a["gen_ai.request.max_tokens"] == 50
    assert (a["gen_ai.request.temperature"], a["gen_ai.request.top_p"]) == (0.3, 0.9)
    assert a["gen_ai.response.id"].startswith("chatcmpl-sim-")
    assert a["gen_ai.response.finish_reasons"] == ["stop"]
    assert (a["gen_ai.usage.input_tokens"], a["gen_ai.usage.output_tokens"]) == (
        record.prompt_tokens, record.completion_tokens
    )
    assert record.prompt_tokens > 0 and record.completion_tokens > 0
    assert (a["keel.cost_usd"], a["keel.cache_status"], a["keel.deployment"], a["keel.feature"]) == (
        0.25, "none", "primary", "search"
    )
    assert a["keel.request_id"] == record.request_id == span.request_id
    assert (span.trace_id, span.span_id) == (record.trace_id, record.span_id)
    assert span.parent_id is None and span.status == "unset"
    assert record.started_at <= span.started_at + 1e-3 and span.ended_at <= record.ended_at + 1e-3


async def test_embeddings_spans_are_named_for_the_operation() -> None:
    keel, _, sink = setup()
    await keel.handle(EmbeddingRequest.model_validate({"model": "chat", "input": "hello"}))
    assert sink.span("embeddings chat").attributes["gen_ai.operation.name"] == "embeddings"


async def test_a_stream_span_ends_when_the_stream_does() -> None:
    keel, _, sink = setup()
    stream = await keel.handle(request(stream=True))
    assert isinstance(stream, ChunkStream)
    assert sink.spans == []
    async for _ in stream:
        pass
    span = sink.span("chat chat")
    assert span.attributes["gen_ai.response.finish_reasons"] == ["stop"]
    assert span.attributes["gen_ai.usage.output_tokens"] == sink.records[0].completion_tokens == 2  # "echo: hi"


async def test_every_upstream_attempt_is_a_child_span_the_failed_one_marked_as_an_error() -> None:
    keel, _, sink = setup(
        {"provider": "simulated", "name": "primary", "errors": {"500": 1.0}},
        {"provider": "simulated", "name": "backup"},
    )
    await keel.handle(request())
    call = sink.span("chat chat")
    first, second = sink.span("attempt primary"), sink.span("attempt backup")
    for child in (first, second):
        assert (child.trace_id, child.parent_id, child.request_id) == (call.trace_id, call.span_id, call.request_id)
        # (wall times derived from monotonic ones at two moments: equal within a millisecond)
        assert call.started_at - 1e-3 <= child.started_at <= child.ended_at <= call.ended_at + 1e-3
    assert first.status == "error" and first.attributes["error.type"] == "upstream_server_error"
    assert second.status == "unset" and "error.type" not in second.attributes
    assert (first.attributes["keel.attempt"], second.attributes["keel.attempt"]) == (1, 2)
    assert first.ended_at <= second.started_at + 1e-3


async def test_a_failed_call_span_has_an_error_status_and_type() -> None:
    keel, _, sink = setup({"provider": "simulated", "name": "primary", "errors": {"500": 1.0}}, max_attempts=2)
    with pytest.raises(UpstreamServerError):
        await keel.handle(request())
    call = sink.span("chat chat")
    assert call.status == "error" and call.attributes["error.type"] == "upstream_server_error"
    assert call.attributes["keel.outcome"] == "error"
    assert [s.name for s in sink.spans].count("attempt primary") == 2


async def test_an_inner_stage_can_open_a_child_span_of_the_call() -> None:
    class CacheLookup:
        async def __call__(self, call: Call, next: Next) -> Reply:
            with stage_span(call, "cache lookup", **{"keel.cache.kind": "exact"}):
                call.ctx.cache_status = "miss"
            return await next(call)

    keel, _, sink = setup(inner=[CacheLookup()])
    await keel.handle(request())
    call, lookup = sink.span("chat chat"), sink.span("cache lookup")
    assert lookup.parent_id == call.span_id and lookup.attributes == {"keel.cache.kind": "exact"}
    assert call.attributes["keel.cache_status"] == "miss"


# ---------------------------------------------------------------------------- traceparent and chains


async def test_an_incoming_traceparent_becomes_the_parent_of_the_call_span() -> None:
    keel, _, sink = setup()
    headers = {"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01", "tracestate": "vendor=1", "authorization": "Bearer s"}
    await keel.handle(request(), Context(extras={"traceparent_headers": headers}))
    span = sink.span("chat chat")
    assert (span.trace_id, span.parent_id, sink.records[0].trace_id) == (TRACE_ID, PARENT_ID, TRACE_ID)


def test_bad_or_missing_traceparents_give_no_parent() -> None:
    assert extract_parent(None) is None
    assert extract_parent({}) is None
    assert extract_parent({"traceparent": "garbage"}) is None
    assert extract_parent({"traceparent": f"00-{'0' * 32}-{PARENT_ID}-01"}) is None
    assert extract_parent(Headers({"TraceParent": f"00-{TRACE_ID}-{PARENT_ID}-01"})) is not None


async def test_calls_inside_one_trace_block_share_its_trace() -> None:
    keel, tracing, sink = setup()
    with tracing.trace("chain", step_count=2) as chain:
        assert chain is not None
        await keel.handle(request())
        await keel.handle(request())
    chain_span = sink.span("chain")
    calls = [s for s in sink.spans if s.name == "chat chat"]
    assert len(calls) == 2
    assert {s.trace_id for s in calls} == {chain_span.trace_id} == {r.trace_id for r in sink.records}
    assert {s.parent_id for s in calls} == {chain_span.span_id}
    assert chain_span.attributes == {"step_count": 2} and chain_span.parent_id is None


async def test_separate_calls_get_separate_traces() -> None:
    keel, _, sink = setup()
    await keel.handle(request())
    await keel.handle(request())
    assert sink.records[0].trace_id != sink.records[1].trace_id


async def test_the_decorator_traces_async_functions_each_run_its_own_span() -> None:
    keel, tracing, sink = setup()

    @tracing.trace("answer")
    async def answer(question: str) -> str:
        await keel.handle(request())
        return question.upper()

    assert answer.__name__ == "answer"
    assert await answer("a") == "A"
    assert await answer("b") == "B"
    roots = [s for s in sink.spans if s.name == "answer"]
    calls = [s for s in sink.spans if s.name == "chat chat"]
    assert len(roots) == 2 and {c.parent_id for c in calls} == {r.span_id for r in roots}
    assert roots[0].trace_id != roots[1].trace_id


async def test_the_decorator_traces_sync_functions_and_nests() -> None:
    _, tracing, sink = setup()

    @tracing.trace("inner")
    def inner() -> int:
        return 1

    @tracing.trace("outer")
    def outer() -> int:
        return inner() + 1

    assert outer() == 2
    assert sink.span("inner").parent_id == sink.span("outer").span_id


async def test_async_with_and_concurrent_tasks_keep_their_own_trace() -> None:
    keel, tracing, sink = setup()

    async def chain(name: str) -> None:
        async with tracing.trace(name):
            await asyncio.sleep(0)
            await keel.handle(request())

    await asyncio.gather(chain("a"), chain("b"))
    for name in ("a", "b"):
        root = sink.span(name)
        assert [s.parent_id for s in sink.spans if s.name == "chat chat" and s.trace_id == root.trace_id] == [
            root.span_id
        ]


async def test_an_error_inside_a_trace_marks_its_span_and_propagates() -> None:
    _, tracing, sink = setup()
    with pytest.raises(ValueError, match="bad step"), tracing.trace("step"):
        raise ValueError("bad step")
    assert sink.span("step").status == "error"


async def test_a_call_inside_the_applications_own_span_joins_its_trace() -> None:
    keel, _, sink = setup()
    app_tracer = TracerProvider(shutdown_on_exit=False).get_tracer("app")
    with app_tracer.start_as_current_span("handle request") as app_span:
        await keel.handle(request())
    context = app_span.get_span_context()
    call = sink.span("chat chat")
    assert (call.trace_id, call.parent_id) == (format(context.trace_id, "032x"), format(context.span_id, "016x"))


# ---------------------------------------------------------------------------- off, and OTLP


async def test_with_tracing_off_no_span_is_made_but_the_callers_trace_id_is_logged() -> None:
    keel, tracing, sink = setup(tracing=TracingConfig(to_store=False))
    assert not tracing.enabled
    headers = {"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"}
    with tracing.trace("chain") as span:
        assert span is None
        await keel.handle(request(), Context(extras={"traceparent_headers": headers}))
        await keel.handle(request())

    @tracing.trace("decorated")
    def step() -> int:
        return 3

    assert step() == 3
    app_tracer = TracerProvider(shutdown_on_exit=False).get_tracer("app")
    with app_tracer.start_as_current_span("app step") as app_span:
        await keel.handle(request())
    assert sink.spans == []
    app_trace_id = format(app_span.get_span_context().trace_id, "032x")
    assert [(r.trace_id, r.span_id) for r in sink.records] == [(TRACE_ID, None), (None, None), (app_trace_id, None)]


@pytest.fixture
def collector() -> Iterator[tuple[str, list[tuple[str, str, bytes]]]]:
    received: list[tuple[str, str, bytes]] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["content-length"]))
            received.append((self.path, self.headers["content-type"], body))
            self.send_response(200)
            self.send_header("content-type", "application/x-protobuf")
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1/traces", received
    server.shutdown()
    server.server_close()


async def test_spans_are_exported_over_otlp_when_an_endpoint_is_set(
    collector: tuple[str, list[tuple[str, str, bytes]]]
) -> None:
    endpoint, received = collector
    keel, tracing, sink = setup(tracing=TracingConfig(otlp_endpoint=endpoint, to_store=False, service_name="svc-x"))
    assert tracing.enabled
    await keel.handle(request())
    await asyncio.to_thread(tracing.shutdown)  # flushes the batch
    assert sink.spans == []
    assert received and received[0][:2] == ("/v1/traces", "application/x-protobuf")
    body = b"".join(r[2] for r in received)
    assert b"chat chat" in body and b"svc-x" in body and b"gen_ai.request.model" in body
