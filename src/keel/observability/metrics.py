"""Prometheus metrics for `/metrics`, counted from the same request records the log keeps.

Keel keeps its own `CollectorRegistry` (not the process-wide default), so several Keel
instances and tests never collide. Labels that come from clients (feature tags, model names
asked for) are bounded: cut to a length and capped in number, later values count as "other",
so a client cannot grow the series without limit. State that lives elsewhere (breakers, queue
depths, records the writer dropped) is read by callbacks at scrape time, never pushed.

Under `keel serve --workers N` the series live in prometheus-client's multiprocess files and a scrape
sums every worker's (keel.observability.multiprocess); `keel_worker_requests_total{pid}` then counts
each worker's calls, so an uneven spread shows.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Generic, TypeVar

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from keel.observability.multiprocess import SharedMetrics, multiprocess_dir
from keel.observability.record import RequestRecord

if TYPE_CHECKING:
    from keel.providers.base import Deployment

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
BREAKER_VALUES = {"closed": 0, "half_open": 1, "open": 2}
OTHER = "other"

BreakerStates = Callable[[], Iterable[tuple[str, str]]]
SLOStates = Callable[[], Iterable[tuple[str, bool, int]]]  # (deployment, set aside now, calls diverted so far)
M = TypeVar("M", Counter, Histogram)


class BoundedLabel:
    """A client-given label value, cut to `max_chars`; past `max_values` distinct values, "other"."""

    def __init__(self, max_chars: int = 64, max_values: int = 100) -> None:
        self.max_chars = max_chars
        self.max_values = max_values
        self.seen: set[str] = set()

    def __call__(self, value: str | None) -> str:
        if not value:
            return ""
        value = value[: self.max_chars]
        if value in self.seen:
            return value
        if len(self.seen) >= self.max_values:
            return OTHER
        self.seen.add(value)
        return value


class Labelled(Generic[M]):
    """A metric's children by label values, each looked up once: prometheus-client's `labels()`
    checks and locks on every call, and the label sets are few (the client-given ones are capped)."""

    def __init__(self, metric: M) -> None:
        self.metric: M = metric
        self.children: dict[tuple[str, ...], M] = {}

    def __call__(self, *values: str) -> M:
        child = self.children.get(values)
        if child is None:
            child = self.children[values] = self.metric.labels(*values)
        return child


class Metrics:
    """Keel's series in its own registry: `observe(record)` per call, `watch_*` for state read at
    scrape time, `render()` for the `/metrics` response."""

    def __init__(self, max_label_chars: int = 64, max_features: int = 100, max_models: int = 100) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.feature = BoundedLabel(max_label_chars, max_features)
        self.model = BoundedLabel(max_label_chars, max_models)
        r = self.registry
        self.requests = Labelled(Counter(
            "keel_requests", "Calls that reached Keel, by outcome", ["model", "feature", "status", "outcome"],
            registry=r,
        ))
        self.latency = Labelled(Histogram(
            "keel_request_latency_seconds", "Whole-call latency", ["model"], buckets=LATENCY_BUCKETS, registry=r
        ))
        self.ttft = Labelled(Histogram(
            "keel_time_to_first_token_seconds", "Streams: time to the first chunk", ["model"],
            buckets=TTFT_BUCKETS, registry=r,
        ))
        self.tokens = Labelled(Counter("keel_tokens", "Tokens by kind", ["model", "kind"], registry=r))
        self.cost = Labelled(Counter("keel_cost_usd", "Spend in USD", ["model", "feature"], registry=r))
        self.retries = Labelled(Counter(
            "keel_retries", "Upstream attempts after a call's first", ["model", "deployment"], registry=r
        ))
        self.guardrails = Labelled(Counter(
            "keel_guardrail_verdicts", "Guardrail checks that found something, by what they did",
            ["model", "direction", "check", "action"], registry=r,
        ))
        self.cache_requests = Labelled(Counter(
            "keel_cache_requests",
            "Calls to a model with the cache on, by cache status (hit_exact, hit_semantic, miss, bypass)",
            ["model", "status"], registry=r,
        ))
        self.cache_saved = Labelled(Counter(
            "keel_cache_saved_usd", "What cache hits saved in USD (their answers' cost when stored)", ["model"],
            registry=r,
        ))
        self._callbacks = _Callbacks()
        self._scraped: list[Collector] = []  # read at scrape time: copied to the shared files by each worker
        self.register(self._callbacks)
        self.worker: Counter | None = None
        self.shared: SharedMetrics | None = None
        if (directory := multiprocess_dir()) is not None:  # one of several workers
            self.worker = Counter(
                "keel_worker_requests", "Calls each worker process answered", ["pid"], registry=r,
            ).labels(str(os.getpid()))
            self.shared = SharedMetrics(directory, self._scraped)

    def register(self, collector: Collector) -> None:
        """A collector whose values are read at scrape time (the rate limiter's, the cache stores')."""
        self.registry.register(collector)
        self._scraped.append(collector)

    # ------------------------------------------------------------------ counted per call

    def observe(self, record: RequestRecord) -> None:
        """Count one finished call from its request record."""
        model, feature = self.model(record.model), self.feature(record.feature)
        self.requests(model, feature, str(record.status), record.outcome).inc()
        if self.worker is not None:
            self.worker.inc()
        self.latency(model).observe(record.latency_ms / 1000)
        if record.ttft_ms is not None:
            self.ttft(model).observe(record.ttft_ms / 1000)
        for kind, count in (
            ("prompt", record.prompt_tokens), ("completion", record.completion_tokens), ("cached", record.cached_tokens)
        ):
            if count:
                self.tokens(model, kind).inc(count)
        if record.cost_usd:
            self.cost(model, feature).inc(record.cost_usd)
        if record.cache_status != "none":  # Keel's own values, not a client's: no bound needed
            self.cache_requests(model, record.cache_status).inc()
            if record.cost_saved_usd:
                self.cache_saved(model).inc(record.cost_saved_usd)
        for attempt in record.attempt_log[1:]:
            self.retries(model, str(attempt.get("deployment", ""))).inc()
        for verdict in record.guardrails:
            self.guardrails(model, str(verdict.get("direction")), str(verdict.get("check")),
                            str(verdict.get("action"))).inc()

    # ------------------------------------------------------------------ read at scrape time

    def watch_breakers(self, states: BreakerStates) -> None:
        """`states()` yields (deployment, "closed" | "half_open" | "open"); see `breaker_states`."""
        self._callbacks.breakers = states

    def watch_slo(self, states: SLOStates) -> None:
        """The SLO guards' verdicts and diversions (keel.reliability.slo_guard); see `slo_states`."""
        self._callbacks.slo = states

    def watch_queue(self, name: str, depth: Callable[[], float]) -> None:
        """A queue whose depth `keel_queue_depth{queue=name}` reports (the log writer's, the local model's)."""
        self._callbacks.queues[name] = depth

    def watch_dropped(self, dropped: Callable[[], float]) -> None:
        """The writer's count of request records it had to drop (a counter: it only grows)."""
        self._callbacks.dropped = dropped

    def render(self) -> tuple[bytes, str]:
        """The body and content type of a `/metrics` response: with several workers, all of theirs."""
        if self.shared is not None:
            return self.shared.render(), CONTENT_TYPE_LATEST
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def slo_states(deployments: Mapping[str, Sequence[Deployment]]) -> SLOStates:
    """The SLO guards of `Keel.deployments` (those of models with `slo_guard` on), for `watch_slo`."""

    def states() -> Iterator[tuple[str, bool, int]]:
        for group in deployments.values():
            for deployment in group:
                if deployment.slo is not None:
                    yield deployment.name, deployment.slo.degraded() is not None, deployment.slo.diversions

    return states


def breaker_states(deployments: Mapping[str, Sequence[Deployment]]) -> BreakerStates:
    """The breakers of `Keel.deployments` (model → deployments), for `watch_breakers`."""

    def states() -> Iterator[tuple[str, str]]:
        for group in deployments.values():
            for deployment in group:
                yield deployment.name, str(deployment.breaker.state)

    return states


class _Callbacks:
    """The gauges and counter whose values live elsewhere, read on each scrape."""

    def __init__(self) -> None:
        self.breakers: BreakerStates | None = None
        self.slo: SLOStates | None = None
        self.queues: dict[str, Callable[[], float]] = {}
        self.dropped: Callable[[], float] | None = None

    def collect(self) -> Iterable[Metric]:
        breakers = GaugeMetricFamily(
            "keel_breaker_state", "Circuit breaker per deployment: 0 closed, 1 half-open, 2 open", labels=["deployment"]
        )
        if self.breakers is not None:
            worst: dict[str, int] = {}  # a deployment name may serve several models: show its worst breaker
            for name, state in self.breakers():
                worst[name] = max(worst.get(name, 0), BREAKER_VALUES.get(state, 0))
            for name, value in worst.items():
                breakers.add_metric([name], value)
        queues = GaugeMetricFamily("keel_queue_depth", "Items waiting in a queue", labels=["queue"])
        for name, depth in self.queues.items():
            queues.add_metric([name], depth())
        dropped = CounterMetricFamily(
            "keel_log_records_dropped", "Request records the log writer could not keep",
            value=self.dropped() if self.dropped is not None else 0,
        )
        degraded = GaugeMetricFamily(
            "keel_slo_degraded", "1 while a deployment is set aside for breaking the SLO targets", labels=["deployment"]
        )
        diversions = CounterMetricFamily(
            "keel_slo_diversions", "Calls sent elsewhere or shed because their deployment broke the SLO targets",
            labels=["deployment"],
        )
        if self.slo is not None:
            totals: dict[str, tuple[int, int]] = {}  # a deployment name may serve several models: worst, and sum
            for name, aside, diverted in self.slo():
                was, count = totals.get(name, (0, 0))
                totals[name] = (max(was, int(aside)), count + diverted)
            for name, (aside_now, diverted_total) in totals.items():
                degraded.add_metric([name], aside_now)
                diversions.add_metric([name], diverted_total)
        return [breakers, queues, dropped, degraded, diversions]
