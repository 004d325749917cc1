"""The observe stage: exactly one request record per call, whatever its outcome, with the
fields the dashboard reads; cost charged once; client-given tags cut."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest
from conftest import RecordingSink as Sink

from keel.config import KeelConfig, TracingConfig
from keel.engine import Keel
from keel.errors import BudgetExceeded, InvalidJSON, KeelError, UpstreamConnectionError, UpstreamServerError
from keel.observability.metrics import Metrics
from keel.observability.record import MAX_METADATA_CHARS, MAX_TAG_CHARS, RequestRecord
from keel.observability.stage import Observe, outcome_of
from keel.observability.tracing import Tracing
from keel.pipeline import Call, ChunkStream, Completion, Context, Next, Reply, StreamClosed
from keel.types import ChatRequest, EmbeddingRequest

# ---------------------------------------------------------------------------- fakes


# Errors stages not written yet will raise: each class declares its outcome.
class RateLimited(KeelError):
    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"
    outcome = "rate_limited"


class GuardrailViolation(KeelError):
    status = 400
    type = "invalid_request_error"
    code = "content_blocked"
    outcome = "blocked"


class Raise:
    """An inner stage that refuses every call."""

    def __init__(self, error: BaseException) -> None:
        self.error = error

    async def __call__(self, call: Call, next: Next) -> Reply:
        raise self.error


class Canned:
    """An inner stage that answers itself (as a cache will)."""

    async def __call__(self, call: Call, next: Next) -> Reply:
        return Completion({
            "id": "chatcmpl-cached", "object": "chat.completion", "created": 1, "model": "sim-model",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "from cache"},
                         "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6},
        })


def config(*deployments: dict[str, Any], max_attempts: int = 1) -> KeelConfig:
    # USD 1 per 1M prompt tokens, 2 per 1M completion tokens: the engine's cost stage charges this.
    deployments = deployments or ({"provider": "simulated", "name": "primary", "model": "sim-model",
                                   "price": {"input": 1, "output": 2}},)
    return KeelConfig.model_validate({"models": [{
        "name": "chat", "retry": {"max_attempts": max_attempts, "initial_backoff_ms": 0},
        "deployments": list(deployments),
    }]})


class Harness:
    def __init__(self, *deployments: dict[str, Any], inner: list[Any] | None = None, max_attempts: int = 1,
                 log_content: bool = True) -> None:
        self.sink = Sink()
        self.metrics = Metrics()
        self.tracing = Tracing(TracingConfig(), self.sink)
        self.observe = Observe(self.sink, self.tracing, self.metrics, log_content=log_content)
        self.keel = Keel(config(*deployments, max_attempts=max_attempts), stages=[self.observe, *(inner or [])])

    async def chat(self, ctx: Context | None = None, **fields: Any) -> Reply:
        body = {"model": "chat", "messages": [{"role": "user", "content": "hello there"}], **fields}
        return await self.keel.handle(ChatRequest.model_validate(body), ctx)


async def drain(stream: ChunkStream) -> list[dict[str, Any]]:
    return [chunk async for chunk in stream]


# ---------------------------------------------------------------------------- one record per outcome


async def test_an_answered_call_leaves_one_record_with_its_answer_tokens_and_cost() -> None:
    h = Harness()
    reply = await h.chat(Context(feature="search", user="u1", key_id="key_1"), temperature=0.2,
                         metadata={"ticket": "T-1"})
    assert isinstance(reply, Completion)
    r = h.sink.only()
    assert (r.status, r.outcome, r.error_type, r.endpoint, r.stream) == (200, "ok", None, "chat", False)
    assert (r.model, r.deployment, r.upstream_model) == ("chat", "primary", "sim-model")
    assert (r.feature, r.user, r.key_id, r.metadata) == ("search", "u1", "key_1", {"ticket": "T-1"})
    assert r.input == [{"role": "user", "content": "hello there"}]
    assert r.output == reply.body["choices"][0]["message"]
    usage = reply.body["usage"]
    assert (r.prompt_tokens, r.completion_tokens) == (usage["prompt_tokens"], usage["completion_tokens"])
    assert r.cost_usd == pytest.approx((usage["prompt_tokens"] + 2 * usage["completion_tokens"]) / 1e6)
    assert r.attempts == 1 and r.fallbacks == 0 and r.attempt_log[0]["error"] is None
    assert r.upstream_ms is not None and 0 <= r.upstream_ms <= r.latency_ms
    assert r.ttft_ms is None
    assert r.started_at <= r.ended_at and r.ended_at - r.started_at == pytest.approx(r.latency_ms / 1000, abs=1e-3)
    assert r.trace_id is not None and len(r.trace_id) == 32 and r.span_id is not None and len(r.span_id) == 16


async def test_a_fallback_answer_records_both_attempts_and_counts_the_fallback() -> None:
    h = Harness(
        {"provider": "simulated", "name": "primary", "errors": {"500": 1.0}},
        {"provider": "simulated", "name": "backup", "model": "backup-model"},
    )
    await h.chat()
    r = h.sink.only()
    assert (r.outcome, r.deployment, r.upstream_model, r.attempts, r.fallbacks) == (
        "ok", "backup", "backup-model", 2, 1
    )
    assert [(a["deployment"], a["error"]) for a in r.attempt_log] == [
        ("primary", "upstream_server_error"), ("backup", None)
    ]


async def test_an_upstream_failure_is_recorded_with_its_status_and_code_then_raised() -> None:
    h = Harness({"provider": "simulated", "name": "primary", "errors": {"500": 1.0}}, max_attempts=2)
    with pytest.raises(UpstreamServerError):
        await h.chat()
    r = h.sink.only()
    assert (r.status, r.outcome, r.error_type, r.deployment, r.attempts) == (
        502, "error", "upstream_server_error", "primary", 2
    )
    assert r.error_message and "simulated server error" in r.error_message
    assert r.output is None and r.input == [{"role": "user", "content": "hello there"}]
    assert r.cost_usd == 0.0 and r.cost_nanousd == 0


@pytest.mark.parametrize(("error", "outcome", "status"), [
    (BudgetExceeded("monthly budget of key_1 is spent", scope="key", window="month", limit_usd=5.0, resets_in=60),
     "budget_exceeded", 429),
    (RateLimited("10 requests per minute"), "rate_limited", 429),
    (GuardrailViolation("the prompt contains a card number"), "blocked", 400),
])
async def test_a_call_refused_by_an_inner_stage_is_recorded_with_its_outcome(
    error: KeelError, outcome: str, status: int
) -> None:
    h = Harness(inner=[Raise(error)])
    with pytest.raises(type(error)):
        await h.chat()
    r = h.sink.only()
    assert (r.status, r.outcome, r.error_type, r.error_message) == (status, outcome, error.code, error.message)
    assert r.attempts == 0 and r.deployment is None and r.upstream_ms is None


async def test_a_bug_in_an_inner_stage_is_recorded_as_an_internal_error() -> None:
    h = Harness(inner=[Raise(ZeroDivisionError("oops"))])
    with pytest.raises(ZeroDivisionError):
        await h.chat()
    r = h.sink.only()
    assert (r.status, r.outcome, r.error_type) == (500, "error", "internal_error")


async def test_an_answer_from_an_inner_stage_is_recorded_with_no_attempt_and_no_cost() -> None:
    h = Harness(inner=[Canned()])
    await h.chat()
    r = h.sink.only()
    assert (r.outcome, r.attempts, r.deployment, r.prompt_tokens, r.cost_nanousd) == ("ok", 0, None, 4, 0)


async def test_a_stream_is_recorded_once_when_it_ends_with_ttft_and_the_whole_message() -> None:
    h = Harness()
    stream = await h.chat(stream=True, stream_options={"include_usage": True})
    assert isinstance(stream, ChunkStream)
    assert h.sink.records == []  # not before its end
    chunks = await drain(stream)
    r = h.sink.only()
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert (r.status, r.outcome, r.stream) == (200, "ok", True)
    assert r.output["content"] == text == "echo: hello there"
    assert r.completion_tokens == chunks[-1]["usage"]["completion_tokens"]
    assert r.ttft_ms is not None and 0 <= r.ttft_ms <= r.latency_ms
    assert r.cost_nanousd > 0 and not r.cost_estimated
    await stream.aclose()  # closing after the end changes nothing
    assert len(h.sink.records) == 1


async def test_a_stream_that_fails_midway_is_recorded_as_an_error_with_what_came_before() -> None:
    h = Harness({"provider": "simulated", "name": "primary", "errors": {"cut": 1.0},
                 "template": "one two three four five six"})
    stream = await h.chat(stream=True)
    assert isinstance(stream, ChunkStream)
    received = []
    with pytest.raises(UpstreamConnectionError):
        async for chunk in stream:
            received.append(chunk)
    r = h.sink.only()
    assert (r.status, r.outcome, r.error_type, r.stream) == (502, "error", "upstream_connection_error", True)
    sent = "".join(c["choices"][0]["delta"].get("content") or "" for c in received)
    assert r.output["content"] == sent == "one two three "  # the half that reached the client
    assert r.cost_estimated  # no usage came: Keel counted what was sent
    assert r.attempt_log[0]["error"] == "upstream_connection_error"


async def closed_after_one_chunk() -> Harness:
    """A stream the consumer closes (twice) after its first chunk."""
    h = Harness({"provider": "simulated", "name": "primary", "template": "one two three four"})
    stream = await h.chat(stream=True)
    assert isinstance(stream, ChunkStream)
    await stream.__anext__()
    await stream.aclose()
    await stream.aclose()
    return h


async def test_a_stream_closed_early_by_the_consumer_is_recorded_as_client_closed() -> None:
    h = await closed_after_one_chunk()
    r = h.sink.only()
    assert (r.status, r.outcome, r.error_type) == (499, "client_closed", "client_closed")
    assert r.attempt_log[0]["error"] == "cancelled"


async def test_a_stream_closed_early_leaves_one_call_span_that_matches_its_record() -> None:
    h = await closed_after_one_chunk()
    r = h.sink.only()
    [call] = [s for s in h.sink.spans if s.name == "chat chat"]
    assert (call.trace_id, call.span_id, call.request_id) == (r.trace_id, r.span_id, r.request_id)
    assert call.attributes["keel.outcome"] == "client_closed" and call.status == "error"
    assert call.ended_at == r.ended_at
    [attempt] = [s for s in h.sink.spans if s.name == "attempt primary"]
    assert attempt.parent_id == call.span_id and attempt.ended_at <= call.ended_at


async def test_embeddings_are_recorded_without_their_vectors() -> None:
    h = Harness()
    reply = await h.keel.handle(EmbeddingRequest.model_validate({"model": "chat", "input": ["a b", "c"]}))
    assert isinstance(reply, Completion)
    r = h.sink.only()
    assert (r.endpoint, r.outcome, r.input, r.output) == ("embeddings", "ok", ["a b", "c"], None)
    assert r.prompt_tokens == reply.body["usage"]["prompt_tokens"]


# ---------------------------------------------------------------------------- bounded, and content off


async def test_an_over_long_feature_tag_user_and_metadata_are_cut() -> None:
    h = Harness()
    metadata = {f"k{i}": "v" * 500 for i in range(16)}
    await h.chat(Context(feature="f" * 1000, user="u" * 1000), metadata=metadata)
    r = h.sink.only()
    assert r.feature == "f" * MAX_TAG_CHARS and r.user == "u" * MAX_TAG_CHARS
    assert r.metadata is not None
    assert sum(len(k) + len(v) for k, v in r.metadata.items()) <= MAX_METADATA_CHARS
    assert r.metadata["k0"] == "v" * 500


async def test_the_feature_tag_comes_from_metadata_when_no_header_gave_one() -> None:
    h = Harness()
    await h.chat(metadata={"feature": "summarise"})
    assert h.sink.only().feature == "summarise"


async def test_with_content_logging_off_no_input_or_output_is_kept() -> None:
    h = Harness(log_content=False)
    await h.chat()
    r = h.sink.only()
    assert r.input is None and r.output is None and r.prompt_tokens > 0


# ---------------------------------------------------------------------------- robustness and refusals


async def test_a_failing_sink_does_not_change_the_answer() -> None:
    class Broken(Sink):
        def submit(self, record: RequestRecord) -> None:
            raise RuntimeError("store is down")

    keel = Keel(config(), stages=[Observe(Broken(), Tracing(TracingConfig(to_store=False)), Metrics())])
    reply = await keel.handle(ChatRequest.model_validate({"model": "chat", "messages": [{"role": "user",
                                                                                         "content": "x"}]}))
    assert isinstance(reply, Completion)


async def test_a_failing_cost_meter_is_logged_and_the_call_recorded_at_no_cost(
    caplog: pytest.LogCaptureFixture
) -> None:
    h = Harness()

    def broken(call: Call, answer: Mapping[str, Any] | None) -> None:
        raise KeyError("no price")

    h.keel.meter.charge = broken  # type: ignore[method-assign]
    reply = await h.chat()
    assert isinstance(reply, Completion)
    assert (h.sink.only().outcome, h.sink.only().cost_nanousd) == ("ok", 0)
    assert "cost accounting failed" in caplog.text


def test_a_call_refused_before_the_pipeline_is_recorded_and_counted() -> None:
    sink, metrics = Sink(), Metrics()
    observe = Observe(sink, Tracing(TracingConfig(), sink), metrics)
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    headers = {"traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"}
    ctx = Context(feature="search", trace_headers=headers)
    record = observe.rejected(ctx, InvalidJSON("The request body is not valid JSON"), "chat", model="m" * 500)
    assert sink.only() is record
    assert (record.status, record.outcome, record.error_type) == (400, "invalid", "invalid_json")
    assert record.trace_id == trace_id
    assert record.model == "m" * MAX_TAG_CHARS
    assert metrics.registry.get_sample_value(
        "keel_requests_total", {"model": "m" * 64, "feature": "search", "status": "400", "outcome": "invalid"}
    ) == 1


def test_outcomes_of_errors_the_stage_did_not_see_coming() -> None:
    class Declared(KeelError):
        outcome = "blocked"

    ctx = Context()
    assert outcome_of(ctx, StreamClosed("gone"))[:2] == (499, "client_closed")
    assert outcome_of(ctx, Declared("no"))[1] == "blocked"
    assert outcome_of(ctx, None)[:2] == (200, "ok")
