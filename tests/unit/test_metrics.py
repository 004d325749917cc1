"""Metrics: what /metrics shows equals what the request records say; client-given labels are
bounded; breakers, queues and dropped records are read at scrape time."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest

from keel.config import KeelConfig, TracingConfig
from keel.engine import Keel
from keel.errors import KeelError
from keel.observability.metrics import OTHER, BoundedLabel, Metrics, breaker_states
from keel.observability.record import RequestRecord, SpanRecord
from keel.observability.stage import Observe
from keel.observability.tracing import Tracing
from keel.pipeline import Call, ChunkStream, Completion, Context, Next, Reply
from keel.reliability.breaker import BreakerState
from keel.types import ChatRequest


class Sink:
    def __init__(self) -> None:
        self.records: list[RequestRecord] = []

    def submit(self, record: RequestRecord) -> None:
        self.records.append(record)

    def submit_span(self, span: SpanRecord) -> None:
        pass


class CachedTokens:
    """An upstream that reports two of the prompt's tokens as cached (plain answers)."""

    async def __call__(self, call: Call, next: Next) -> Reply:
        reply = await next(call)
        if isinstance(reply, Completion):
            reply.body["usage"]["prompt_tokens_details"] = {"cached_tokens": 2}
        return reply


def keel_for(metrics: Metrics, sink: Sink) -> Keel:
    config = KeelConfig.model_validate({"models": [
        {"name": "good", "deployments": [{"provider": "simulated", "name": "sim-a",
                                          "price": {"input": 1000, "output": 2000}}]},
        {"name": "flaky", "retry": {"max_attempts": 3, "initial_backoff_ms": 0},
         "deployments": [{"provider": "simulated", "name": "sim-bad", "errors": {"500": 1.0}}]},
    ]})
    observe = Observe(sink, Tracing(TracingConfig(to_store=False)), metrics)
    return Keel(config, stages=[observe, CachedTokens()])


def chat(model: str, **fields: Any) -> ChatRequest:
    return ChatRequest.model_validate({"model": model, "messages": [{"role": "user", "content": "a b c"}], **fields})


def value(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


async def test_metrics_after_a_scripted_run_equal_what_the_records_say() -> None:
    metrics, sink = Metrics(), Sink()
    keel = keel_for(metrics, sink)
    await keel.handle(chat("good"), Context(feature="search"))
    await keel.handle(chat("good"), Context(feature="search"))
    with pytest.raises(KeelError):
        await keel.handle(chat("flaky"), Context(feature="search"))
    stream = await keel.handle(chat("good", stream=True), Context(feature="summary"))
    assert isinstance(stream, ChunkStream)
    async for _ in stream:
        pass
    closed = await keel.handle(chat("good", stream=True), Context(feature="summary"))
    assert isinstance(closed, ChunkStream)
    await closed.__anext__()
    await closed.aclose()

    records = sink.records
    assert [r.outcome for r in records] == ["ok", "ok", "error", "ok", "client_closed"]
    by_labels = Counter((r.model or "", r.feature or "", str(r.status), r.outcome) for r in records)
    for (model, feature, status, outcome), count in by_labels.items():
        assert value(metrics, "keel_requests_total", model=model, feature=feature, status=status,
                     outcome=outcome) == count
    for model in ("good", "flaky"):
        mine = [r for r in records if r.model == model]
        assert value(metrics, "keel_request_latency_seconds_count", model=model) == len(mine)
        assert value(metrics, "keel_request_latency_seconds_sum", model=model) == pytest.approx(
            sum(r.latency_ms for r in mine) / 1000
        )
        for kind, field in (("prompt", "prompt_tokens"), ("completion", "completion_tokens"),
                            ("cached", "cached_tokens")):
            assert value(metrics, "keel_tokens_total", model=model, kind=kind) == sum(getattr(r, field) for r in mine)
    streams = [r for r in records if r.stream]
    assert value(metrics, "keel_time_to_first_token_seconds_count", model="good") == len(streams) == 2
    assert value(metrics, "keel_time_to_first_token_seconds_sum", model="good") == pytest.approx(
        sum(r.ttft_ms or 0 for r in streams) / 1000
    )
    assert all(r.cost_usd > 0 for r in records if r.model == "good")
    assert sum(r.cached_tokens for r in records) == 4
    for feature in ("search", "summary"):
        assert value(metrics, "keel_cost_usd_total", model="good", feature=feature) == pytest.approx(
            sum(r.cost_usd for r in records if r.feature == feature and r.model == "good")
        )
    flaky = next(r for r in records if r.model == "flaky")
    assert flaky.attempts == 3
    assert value(metrics, "keel_retries_total", model="flaky", deployment="sim-bad") == flaky.attempts - 1 == 2
    assert value(metrics, "keel_retries_total", model="good", deployment="sim-a") == 0

    body, content_type = metrics.render()
    assert content_type.startswith("text/plain") and b'keel_requests_total{feature="search"' in body


def record(**fields: Any) -> RequestRecord:
    return RequestRecord(request_id="req_1", started_at=0.0, ended_at=1.0, model="m", **fields)


def test_feature_labels_are_cut_and_capped_beyond_n_values() -> None:
    metrics = Metrics(max_label_chars=10, max_features=2)
    for feature in ("alpha", "beta", "gamma", "delta", "alpha", "x" * 50, None):
        metrics.observe(record(feature=feature))
    families = {labels["feature"] for labels in _labels(metrics, "keel_requests_total")}
    assert families == {"alpha", "beta", OTHER, ""}
    assert value(metrics, "keel_requests_total", model="m", feature="alpha", status="200", outcome="ok") == 2
    assert value(metrics, "keel_requests_total", model="m", feature=OTHER, status="200", outcome="ok") == 3


def test_a_bounded_label_keeps_what_it_has_seen_and_cuts_long_values() -> None:
    label = BoundedLabel(max_chars=4, max_values=2)
    seen = [label(v) for v in ("abcdef", "abcdxyz", "q", "r", "q", "", None)]
    assert seen == ["abcd", "abcd", "q", OTHER, "q", "", ""]


def test_model_labels_are_capped_too_so_unknown_model_names_cannot_grow_the_series() -> None:
    metrics = Metrics(max_models=3)
    for i in range(20):
        metrics.observe(RequestRecord(request_id="r", started_at=0, ended_at=0, model=f"made-up-{i}", status=404,
                                      outcome="invalid"))
    assert len({labels["model"] for labels in _labels(metrics, "keel_requests_total")}) == 4


async def test_breaker_states_queue_depths_and_dropped_records_are_read_at_scrape_time() -> None:
    metrics = Metrics()
    body, _ = metrics.render()
    assert b"keel_log_records_dropped_total 0.0" in body
    keel = keel_for(Metrics(), Sink())
    metrics.watch_breakers(breaker_states(keel.deployments))
    depth = [3]
    metrics.watch_queue("log_writer", lambda: depth[0])
    dropped = [0]
    metrics.watch_dropped(lambda: dropped[0])
    assert value(metrics, "keel_breaker_state", deployment="sim-a") == 0
    assert value(metrics, "keel_queue_depth", queue="log_writer") == 3
    keel.deployments["flaky"][0].breaker.state = BreakerState.OPEN
    keel.deployments["good"][0].breaker.state = BreakerState.HALF_OPEN
    depth[0] = 0
    dropped[0] = 7
    assert value(metrics, "keel_breaker_state", deployment="sim-bad") == 2
    assert value(metrics, "keel_breaker_state", deployment="sim-a") == 1
    assert value(metrics, "keel_queue_depth", queue="log_writer") == 0
    assert value(metrics, "keel_log_records_dropped_total") == 7


def test_two_instances_do_not_share_series() -> None:
    first, second = Metrics(), Metrics()
    first.observe(record())
    assert value(first, "keel_requests_total", model="m", feature="", status="200", outcome="ok") == 1
    assert value(second, "keel_requests_total", model="m", feature="", status="200", outcome="ok") == 0


def _labels(metrics: Metrics, sample_name: str) -> list[dict[str, str]]:
    return [s.labels for family in metrics.registry.collect() for s in family.samples if s.name == sample_name]
