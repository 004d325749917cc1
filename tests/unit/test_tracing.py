"""Tracing: GenAI attributes on the call span, a child per upstream attempt, the caller's
traceparent honoured, `trace(...)` chains, spans in the store and over OTLP."""

from __future__ import annotations

import asyncio
import http.server
import logging
import os
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import pytest
from conftest import RecordingSink as Sink
from conftest import free_port
from opentelemetry import context as otel_context
from opentelemetry import trace as otel_trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span as PBSpan
from opentelemetry.proto.trace.v1.trace_pb2 import Status
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from starlette.datastructures import Headers

from keel.config import KeelConfig, TracingConfig
from keel.engine import Keel
from keel.errors import UpstreamServerError
from keel.observability.metrics import Metrics
from keel.observability.stage import Observe
from keel.observability.tracing import (
    EVENTS_ATTRIBUTE,
    KeelSpan,
    OtlpExport,
    Tracing,
    extract_parent,
    parse_traceparent,
    stage_span,
    trace_id_of,
)
from keel.pipeline import Call, ChunkStream, Context, Next, Reply
from keel.types import ChatRequest, EmbeddingRequest

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"


def setup(*deployments: dict[str, Any], tracing: TracingConfig | None = None, inner: list[Any] | None = None,
          max_attempts: int = 1) -> tuple[Keel, Tracing, Sink]:
    sink = Sink()
    traced = Tracing(tracing or TracingConfig(), sink)
    config = KeelConfig.model_validate({"models": [{
        "name": "chat", "retry": {"max_attempts": max_attempts, "initial_backoff_ms": 0},
        "deployments": list(deployments) or [{"provider": "simulated", "name": "primary", "model": "sim-1",
                                              "price": {"input": 1000, "output": 2000}}],
    }]})
    observe = Observe(sink, traced, Metrics())
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
    assert (a["keel.cost_usd"], a["keel.deployment"], a["keel.feature"]) == (record.cost_usd, "primary", "search")
    assert record.cost_usd > 0
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
                pass
            return await next(call)

    keel, _, sink = setup(inner=[CacheLookup()])
    await keel.handle(request())
    call, lookup = sink.span("chat chat"), sink.span("cache lookup")
    assert lookup.parent_id == call.span_id and lookup.attributes == {"keel.cache.kind": "exact"}


async def test_a_stage_span_that_fails_is_marked_and_the_error_goes_on() -> None:
    class Check:
        async def __call__(self, call: Call, next: Next) -> Reply:
            with stage_span(call, "guardrail pii") as span:
                assert isinstance(span, KeelSpan) and span.is_recording()
                raise ValueError("scanner broke")

    keel, _, sink = setup(inner=[Check()])
    with pytest.raises(ValueError, match="scanner broke"):
        await keel.handle(request())
    check, call = sink.span("guardrail pii"), sink.span("chat chat")
    assert check.status == "error" and check.parent_id == call.span_id
    [event] = check.attributes[EVENTS_ATTRIBUTE]
    assert event["name"] == "exception"
    assert event["attributes"] == {"exception.type": "ValueError", "exception.message": "scanner broke"}


# ---------------------------------------------------------------------------- traceparent and chains


async def test_an_incoming_traceparent_becomes_the_parent_of_the_call_span() -> None:
    keel, _, sink = setup()
    headers = {"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01", "tracestate": "vendor=1", "authorization": "Bearer s"}
    await keel.handle(request(), Context(trace_headers=headers))
    span = sink.span("chat chat")
    assert (span.trace_id, span.parent_id, sink.records[0].trace_id) == (TRACE_ID, PARENT_ID, TRACE_ID)


def test_bad_or_missing_traceparents_give_no_parent() -> None:
    assert extract_parent(None) is None
    assert extract_parent({}) is None
    assert extract_parent({"traceparent": "garbage"}) is None
    assert extract_parent({"traceparent": f"00-{'0' * 32}-{PARENT_ID}-01"}) is None
    assert extract_parent(Headers({"TraceParent": f"00-{TRACE_ID}-{PARENT_ID}-01"})) is not None


@pytest.mark.parametrize("value", [
    f"00-{'0' * 32}-{PARENT_ID}-01",  # all-zero trace id
    f"00-{TRACE_ID}-{'0' * 16}-01",  # all-zero parent id
    f"ff-{TRACE_ID}-{PARENT_ID}-01",  # version ff is invalid
    f"00-{TRACE_ID.upper()}-{PARENT_ID}-01",  # hex is lower case
    f"00-{TRACE_ID}-{PARENT_ID}-0g",
    f"0-{TRACE_ID}-{PARENT_ID}-01",
    f"00-{TRACE_ID[:-1]}-{PARENT_ID}-01",
    f"00-{TRACE_ID}-{PARENT_ID}-01-extra",  # version 00 has exactly four fields
    f"01-{TRACE_ID}-{PARENT_ID}-01extra",  # a later version's extra fields follow a dash
    f"00_{TRACE_ID}_{PARENT_ID}_01",
    "",
])
def test_malformed_traceparents_are_ignored(value: str) -> None:
    assert parse_traceparent(value) is None
    assert extract_parent({"traceparent": value}) is None


def test_a_traceparent_gives_ids_the_sampled_flag_and_the_tracestate() -> None:
    parent = extract_parent({"traceparent": f" 00-{TRACE_ID}-{PARENT_ID}-01 ", "tracestate": "congo=t61rcWkgMzE"})
    assert parent is not None
    assert (parent.trace_id, parent.span_id, parent.sampled, parent.remote, parent.tracestate) == (
        TRACE_ID, PARENT_ID, True, True, "congo=t61rcWkgMzE"
    )
    unsampled = parse_traceparent(f"00-{TRACE_ID}-{PARENT_ID}-00")
    assert unsampled is not None and not unsampled.sampled
    later = parse_traceparent(f"cc-{TRACE_ID}-{PARENT_ID}-09-what-comes-next")  # a future version: read the four
    assert later is not None and later.sampled and trace_id_of(later) == TRACE_ID


def test_a_long_tracestate_is_cut_to_whole_entries() -> None:
    entries = [f"v{i:02d}=" + "x" * 40 for i in range(20)]  # 44 characters each
    parent = extract_parent({"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01", "tracestate": ",".join(entries)})
    assert parent is not None and parent.tracestate is not None
    assert parent.tracestate == ",".join(entries[:11]) and len(parent.tracestate) <= 512


async def test_a_caller_that_does_not_sample_gets_no_spans_but_its_trace_id_is_logged() -> None:
    headers = {"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-00"}

    class Lookup:
        async def __call__(self, call: Call, next: Next) -> Reply:
            with stage_span(call, "cache lookup") as span:
                assert span is not None and not span.is_recording()
            return await next(call)

    keel, _, sink = setup(inner=[Lookup()])
    await keel.handle(request(), Context(trace_headers=headers))
    assert sink.spans == []
    assert (sink.records[0].trace_id, sink.records[0].span_id) == (TRACE_ID, None)


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
    assert (chain.trace_id, chain.span_id) == (chain_span.trace_id, chain_span.span_id)
    assert chain_span.started_at <= min(s.started_at for s in calls)
    assert max(s.ended_at for s in calls) <= chain_span.ended_at


async def test_the_library_chat_calls_inside_a_trace_share_it_and_its_span_takes_attributes() -> None:
    keel, tracing, sink = setup()
    async with tracing.trace("chain") as chain:
        assert chain is not None
        chain.set_attribute("app.user", "u1")
        await keel.chat(model="chat", messages=[{"role": "user", "content": "one"}])
        await keel.chat(model="chat", messages=[{"role": "user", "content": "two"}])
    root = sink.span("chain")
    calls = [s for s in sink.spans if s.name == "chat chat"]
    assert [(s.trace_id, s.parent_id) for s in calls] == [(root.trace_id, root.span_id)] * 2
    assert root.attributes == {"app.user": "u1"}


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
    assert sink.span("inner").trace_id == sink.span("outer").trace_id


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


async def test_an_application_span_opened_inside_a_trace_block_is_the_parent_of_calls_inside_it() -> None:
    keel, tracing, sink = setup()
    app_tracer = TracerProvider(shutdown_on_exit=False).get_tracer("app")
    with tracing.trace("outer"), app_tracer.start_as_current_span("app step") as app_span:
        await keel.handle(request())
    with app_tracer.start_as_current_span("app root"), tracing.trace("inner"):
        await keel.handle(request())
    first, second = (s for s in sink.spans if s.name == "chat chat")
    assert first.parent_id == format(app_span.get_span_context().span_id, "016x")
    assert (second.parent_id, second.trace_id) == (sink.span("inner").span_id, sink.span("inner").trace_id)


async def test_with_an_application_sdk_its_spans_inside_keels_are_keels_children(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    exported = InMemorySpanExporter()
    provider = TracerProvider(shutdown_on_exit=False)
    provider.add_span_processor(SimpleSpanProcessor(exported))
    monkeypatch.setattr(otel_trace, "_TRACER_PROVIDER", provider)  # as set_tracer_provider does, once per process

    class Instrumented:  # an instrumented library the application uses (an HTTP client, say)
        async def __call__(self, call: Call, next: Next) -> Reply:
            with otel_trace.get_tracer("httpx").start_as_current_span("GET /moderation"):
                return await next(call)

    keel, tracing, sink = setup(inner=[Instrumented()])
    with tracing.trace("chain"):
        with otel_trace.get_tracer("app").start_as_current_span("app step"):
            pass
        await keel.handle(request())
    assert otel_trace.get_current_span() is otel_trace.INVALID_SPAN  # all detached
    chain, call = sink.span("chain"), sink.span("chat chat")
    app_spans = {s.name: s for s in exported.get_finished_spans()}
    step, moderation = app_spans["app step"], app_spans["GET /moderation"]
    assert step.parent is not None and moderation.parent is not None
    assert (format(step.context.trace_id, "032x"), format(step.parent.span_id, "016x")) == (
        chain.trace_id, chain.span_id
    )
    assert format(moderation.parent.span_id, "016x") == call.span_id and call.parent_id == chain.span_id


# ---------------------------------------------------------------------------- off, and OTLP


async def test_with_tracing_off_no_span_is_made_but_the_callers_trace_id_is_logged() -> None:
    keel, tracing, sink = setup(tracing=TracingConfig(to_store=False))
    assert not tracing.enabled
    headers = {"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"}
    with tracing.trace("chain") as span:
        assert span is None
        await keel.handle(request(), Context(trace_headers=headers))
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


def test_trace_id_of_reads_keels_parents_and_opentelemetry_contexts() -> None:
    assert trace_id_of(None) is None
    assert trace_id_of(extract_parent({"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"})) == TRACE_ID
    assert trace_id_of(otel_context.get_current()) is None
    span = TracerProvider(shutdown_on_exit=False).get_tracer("app").start_span("s")
    assert trace_id_of(otel_trace.set_span_in_context(span)) == format(span.get_span_context().trace_id, "032x")


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
    thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1/traces", received
    server.shutdown()
    server.server_close()


def exported_spans(received: list[tuple[str, str, bytes]]) -> tuple[list[PBSpan], dict[str, Any]]:
    """The spans of every POST, and the resource's attributes."""
    spans: list[PBSpan] = []
    resource: dict[str, Any] = {}
    for path, content_type, body in received:
        assert (path, content_type) == ("/v1/traces", "application/x-protobuf")
        message = ExportTraceServiceRequest()
        message.ParseFromString(body)
        for resource_spans in message.resource_spans:
            resource.update(values(resource_spans.resource.attributes))
            for scope_spans in resource_spans.scope_spans:
                assert scope_spans.scope.name == "keel"
                spans.extend(scope_spans.spans)
    return spans, resource


def values(attributes: Iterable[KeyValue]) -> dict[str, Any]:
    def value(v: AnyValue) -> Any:
        kind = v.WhichOneof("value")
        if kind == "array_value":
            return [value(x) for x in v.array_value.values]
        return getattr(v, kind) if kind else None

    return {a.key: value(a.value) for a in attributes}


async def test_spans_are_exported_over_otlp_when_an_endpoint_is_set(
    collector: tuple[str, list[tuple[str, str, bytes]]]
) -> None:
    endpoint, received = collector
    keel, tracing, sink = setup(
        {"provider": "simulated", "name": "primary", "errors": {"500": 1.0}},
        {"provider": "simulated", "name": "backup", "model": "sim-2"},
        tracing=TracingConfig(otlp_endpoint=endpoint, to_store=False, service_name="svc-x"),
    )
    assert tracing.enabled
    headers = {"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01", "tracestate": "vendor=1"}
    await keel.handle(request(max_tokens=20), Context(trace_headers=headers))
    await asyncio.to_thread(tracing.shutdown)  # flushes the queue
    assert sink.spans == [] and sink.records[0].trace_id == TRACE_ID
    spans, resource = exported_spans(received)
    assert resource["service.name"] == "svc-x"
    by_name = {s.name: s for s in spans}
    assert sorted(by_name) == ["attempt backup", "attempt primary", "chat chat"]
    call, failed, answered = by_name["chat chat"], by_name["attempt primary"], by_name["attempt backup"]
    assert {s.trace_id.hex() for s in spans} == {TRACE_ID}
    assert (call.parent_span_id.hex(), call.span_id.hex()) == (PARENT_ID, sink.records[0].span_id)
    assert call.trace_state == "vendor=1"
    assert failed.parent_span_id == answered.parent_span_id == call.span_id
    assert (call.kind, failed.kind, answered.kind) == (
        PBSpan.SPAN_KIND_INTERNAL, PBSpan.SPAN_KIND_CLIENT, PBSpan.SPAN_KIND_CLIENT
    )
    assert (failed.status.code, failed.status.message) == (Status.STATUS_CODE_ERROR, "upstream_server_error")
    assert answered.status.code == Status.STATUS_CODE_UNSET
    a = values(call.attributes)
    assert (a["gen_ai.operation.name"], a["gen_ai.request.model"], a["gen_ai.response.model"]) == (
        "chat", "chat", "sim-2"
    )
    assert (a["gen_ai.system"], a["gen_ai.request.max_tokens"], a["gen_ai.response.finish_reasons"]) == (
        "simulated", 20, ["stop"]
    )
    assert a["gen_ai.usage.output_tokens"] == sink.records[0].completion_tokens > 0
    assert values(failed.attributes)["error.type"] == "upstream_server_error"
    assert call.start_time_unix_nano <= failed.start_time_unix_nano <= answered.end_time_unix_nano
    assert answered.end_time_unix_nano <= call.end_time_unix_nano


async def test_otlp_export_happens_off_the_call_and_with_the_store_too(
    collector: tuple[str, list[tuple[str, str, bytes]]]
) -> None:
    endpoint, received = collector
    keel, tracing, sink = setup(tracing=TracingConfig(otlp_endpoint=endpoint))
    assert tracing.exporter is not None
    tracing.exporter.delay = 0.01  # the background thread sends without waiting for a full batch
    with tracing.trace("chain", step=1):
        await keel.handle(request())
    # Until all three have come, in however many POSTs the exporter's thread split them into.
    deadline = time.monotonic() + 10
    while len(exported_spans(received)[0]) < len(sink.spans):
        assert time.monotonic() < deadline, f"{len(received)} POSTs after 10 s, not all the spans"
        await asyncio.sleep(0.01)
    spans, _ = exported_spans(received)
    assert sorted(s.name for s in spans) == sorted(s.name for s in sink.spans) == [
        "attempt primary", "chain", "chat chat"
    ]
    assert {s.span_id.hex() for s in spans} == {s.span_id for s in sink.spans}
    await asyncio.to_thread(tracing.shutdown)
    tracing.shutdown()  # twice is harmless
    with tracing.trace("late"):
        pass
    assert tracing.exporter.dropped == 1  # after shutdown nothing is queued


async def test_an_unreachable_collector_loses_spans_not_calls() -> None:
    keel, tracing, sink = setup(tracing=TracingConfig(otlp_endpoint="http://127.0.0.1:9/v1/traces"))
    await keel.handle(request())
    assert [s.name for s in sink.spans] == ["attempt primary", "chat chat"]
    assert tracing.exporter is not None
    tracing.exporter.exporter = OTLPSpanExporter(endpoint="http://127.0.0.1:9/v1/traces", timeout=0.5)  # retry less
    await asyncio.to_thread(tracing.shutdown)
    assert tracing.exporter.dropped == 0  # queued, sent, refused: logged, not raised


class ScriptedExporter(SpanExporter):
    """An OTLP exporter whose batches end as scripted: SUCCESS, FAILURE, or an exception raised."""

    def __init__(self, *outcomes: SpanExportResult | Exception) -> None:
        self.outcomes = list(outcomes)

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        outcome = self.outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome


def finished_span(name: str) -> KeelSpan:
    return KeelSpan(TRACE_ID, PARENT_ID, None, name, started_at=1.0, attributes={}, ended_at=2.0)


def export_batches(export: OtlpExport, count: int) -> None:
    for i in range(count):
        export.submit(finished_span(f"batch {i}"))
        export.flush()  # on this thread: the export thread waits an hour for a batch of 100


def test_a_collector_that_is_down_is_reported_once_and_its_return_once(caplog: pytest.LogCaptureFixture) -> None:
    F, S = SpanExportResult.FAILURE, SpanExportResult.SUCCESS
    exporter = ScriptedExporter(F, ConnectionRefusedError("refused"), F, S, S, F)
    export = OtlpExport("http://collector:4318/v1/traces", "svc", exporter=exporter, batch_size=100, delay=3600)
    caplog.set_level(logging.INFO, logger="keel.tracing")
    export_batches(export, 6)
    export.shutdown()
    lines = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "keel.tracing"]
    assert [level for level, _ in lines] == ["WARNING", "INFO", "WARNING"], lines
    assert "OTLP export to http://collector:4318/v1/traces failed" in lines[0][1]
    assert "works again" in lines[1][1]


def test_the_exporters_own_lines_are_held_back_and_its_reason_kept(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real OTLP exporter against a port nothing listens on: one warning for three failed batches."""
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "0.5")  # no retries with backoff
    endpoint = f"http://127.0.0.1:{free_port()}/v1/traces"
    export = OtlpExport(endpoint, "svc", batch_size=100, delay=3600)
    caplog.set_level(logging.DEBUG)
    export_batches(export, 3)
    export.shutdown()
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert [r.name for r in warnings] == ["keel.tracing"], [(r.name, r.getMessage()) for r in warnings]
    assert endpoint in warnings[0].getMessage() and "the exporter reported a failure" not in warnings[0].getMessage()


def test_after_a_fork_the_child_sends_its_own_spans_only(collector: tuple[str, list[tuple[str, str, bytes]]]) -> None:
    endpoint, received = collector
    tracing = Tracing(TracingConfig(otlp_endpoint=endpoint, to_store=False))
    with tracing.trace("before the fork"):
        pass
    pid = os.fork()
    if pid == 0:  # the child: a worker process
        code = 1
        try:
            with tracing.trace("in the child"):
                pass
            tracing.shutdown()
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    tracing.shutdown()
    assert sorted(s.name for s in exported_spans(received)[0]) == ["before the fork", "in the child"]
