"""Acceptance: what a real `keel serve` reports on GET /metrics agrees with its request log.

A scripted load through the official `openai` SDK (7 answered calls, 3 upstream errors, 2
streams, 1 budget refusal, 1 body that is not JSON); then /metrics is scraped (it needs the
gateway's key) and parsed with prometheus_client's own parser, the gateway is stopped with
SIGTERM, and every counter is compared with the records it flushed: calls by outcome and status,
tokens, cost, latency and time-to-first-token histogram counts. Each deployment has its breaker
state, the broken one open.
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from conftest import GatewayProcess
from observability_helpers import (
    PRICING,
    assert_openai_error,
    openai_deployment,
    read_records,
    stop_and_flush,
    store_section,
)
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from keel.testing.fake_openai import FakeBehaviour, FakeOpenAIServer

KEY = "sk-keel-metrics-e2e-90ab"


@dataclass
class Scrape:
    samples: list[Sample]
    records: list[dict[str, Any]]

    def values(self, name: str, *labels: str) -> dict[tuple[str, ...], float]:
        """The samples called `name`, summed by the given labels."""
        summed: defaultdict[tuple[str, ...], float] = defaultdict(float)
        for sample in self.samples:
            if sample.name == name:
                summed[tuple(sample.labels.get(label, "") for label in labels)] += sample.value
        return dict(summed)

    def total(self, name: str) -> float:
        return sum(s.value for s in self.samples if s.name == name)


@pytest.fixture(scope="module")
def upstreams() -> Iterator[dict[str, FakeOpenAIServer]]:
    servers = {
        "ok": FakeOpenAIServer(FakeBehaviour(chunks=4)).start(),
        "broken": FakeOpenAIServer(FakeBehaviour(fail_rate=1.0, fail_status=500)).start(),
    }
    yield servers
    for server in servers.values():
        server.stop()


@pytest.fixture(scope="module")
def scrape(upstreams: dict[str, FakeOpenAIServer], tmp_path_factory: pytest.TempPathFactory) -> Scrape:
    tmp: Path = tmp_path_factory.mktemp("metrics")
    url = f"sqlite:///{tmp}/log.db"
    config = {
        "server": {"graceful_timeout_s": 5},
        "models": [
            {"name": "gpt", "deployments": [openai_deployment("gpt-main", upstreams["ok"].url)]},
            {"name": "broken", "retry": {"max_attempts": 1}, "breaker": {"failure_threshold": 3, "cooldown_s": 600},
             "deployments": [openai_deployment("broken-main", upstreams["broken"].url)]},
        ],
        "pricing": PRICING,
        "budgets": [{"scope": "feature", "match": "capped", "window": "total", "limit_usd": 0.000001}],
        "store": store_section(url, tmp),
    }
    started = time.time()
    gw = GatewayProcess(config, tmp, env={"KEEL_MASTER_KEY": KEY}).start()
    try:
        scripted_load(gw)
        unauthorised = httpx.get(gw.url + "/metrics", timeout=10)
        assert unauthorised.status_code == 401
        assert_openai_error(unauthorised.json(), "invalid_api_key")
        response = httpx.get(gw.url + "/metrics", headers={"authorization": f"Bearer {KEY}"}, timeout=10)
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/plain")
    finally:
        exits = stop_and_flush(gw)
    assert exits == [0], gw.log()[-3000:]
    samples = [s for family in text_string_to_metric_families(response.text) for s in family.samples]
    return Scrape(samples, read_records(url, since=started - 1))


def scripted_load(gw: GatewayProcess) -> None:
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key=KEY, max_retries=0, timeout=20)
    chat = client.chat.completions
    for i in range(7):  # answered: four tagged by header, three by metadata
        tag: dict[str, Any] = (
            {"extra_headers": {"x-keel-feature": "alpha"}} if i < 4 else {"metadata": {"feature": "beta"}}
        )
        chat.create(model="gpt", messages=[{"role": "user", "content": f"question number {i}"}], **tag)
    for i in range(3):
        with pytest.raises(openai.APIStatusError) as failed:
            chat.create(model="broken", messages=[{"role": "user", "content": f"doomed {i}"}],
                        extra_headers={"x-keel-feature": "alpha"})
        assert failed.value.status_code == 502
    for include_usage in (True, False):
        stream = chat.create(model="gpt", messages=[{"role": "user", "content": "stream it"}], stream=True,
                             stream_options={"include_usage": include_usage})
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == "echo: stream it"
    with pytest.raises(openai.RateLimitError) as refused:
        chat.create(model="gpt", messages=[{"role": "user", "content": "too dear"}],
                    extra_headers={"x-keel-feature": "capped"})
    assert refused.value.code == "budget_exceeded"
    bad = httpx.post(gw.url + "/v1/chat/completions", content=b'{"model": "gpt",',
                     headers={"authorization": f"Bearer {KEY}", "content-type": "application/json"}, timeout=10)
    assert bad.status_code == 400
    client.close()


# ---------------------------------------------------------------------------- calls


def test_the_log_holds_the_scripted_load(scrape: Scrape) -> None:
    outcomes = Counter((r["outcome"], r["status"]) for r in scrape.records)
    assert outcomes == {("ok", 200): 9, ("error", 502): 3, ("budget_exceeded", 429): 1, ("invalid", 400): 1}


def test_requests_total_by_outcome_and_status_equals_the_record_counts(scrape: Scrape) -> None:
    metric = scrape.values("keel_requests_total", "outcome", "status")
    logged = Counter((r["outcome"], str(r["status"])) for r in scrape.records)
    assert metric == {key: float(count) for key, count in logged.items()}


def test_requests_total_by_model_and_feature_equals_the_record_counts(scrape: Scrape) -> None:
    metric = scrape.values("keel_requests_total", "model", "feature", "status", "outcome")
    logged = Counter(
        (r["model"] or "", r["feature"] or "", str(r["status"]), r["outcome"]) for r in scrape.records
    )
    assert metric == {key: float(count) for key, count in logged.items()}
    assert metric[("gpt", "beta", "200", "ok")] == 3


def test_token_counters_equal_the_logged_token_sums(scrape: Scrape) -> None:
    tokens = scrape.values("keel_tokens_total", "kind")
    prompt = sum(r["prompt_tokens"] for r in scrape.records)
    completion = sum(r["completion_tokens"] for r in scrape.records)
    assert prompt > 0 and completion > 0
    assert tokens[("prompt",)] == prompt
    assert tokens[("completion",)] == completion
    assert tokens.get(("cached",), 0) == sum(r["cached_tokens"] for r in scrape.records) == 0


def test_the_cost_counter_equals_the_logged_cost(scrape: Scrape) -> None:
    logged_nanos = sum(r["cost_nanousd"] for r in scrape.records)
    assert logged_nanos > 0
    assert scrape.total("keel_cost_usd_total") == pytest.approx(logged_nanos / 1e9, rel=1e-9)
    by_feature = scrape.values("keel_cost_usd_total", "feature")
    for feature in ("alpha", "beta"):
        spent = sum(r["cost_nanousd"] for r in scrape.records if r["feature"] == feature)
        assert by_feature[(feature,)] == pytest.approx(spent / 1e9, rel=1e-9)


def test_the_latency_histogram_counts_every_logged_call(scrape: Scrape) -> None:
    with_latency = [r for r in scrape.records if r["latency_ms"] is not None]
    assert len(with_latency) == len(scrape.records)
    assert scrape.total("keel_request_latency_seconds_count") == len(with_latency)
    assert scrape.total("keel_request_latency_seconds_sum") == pytest.approx(
        sum(r["latency_ms"] for r in with_latency) / 1000, rel=1e-6
    )
    buckets = scrape.values("keel_request_latency_seconds_bucket", "le")
    assert buckets[("+Inf",)] == len(with_latency)


def test_the_time_to_first_token_histogram_counts_the_streams(scrape: Scrape) -> None:
    streams = [r for r in scrape.records if r["ttft_ms"] is not None]
    assert len(streams) == 2 and all(r["stream"] for r in streams)
    assert scrape.total("keel_time_to_first_token_seconds_count") == 2


# ---------------------------------------------------------------------------- state read at scrape time


def test_each_deployment_has_its_breaker_state_the_broken_one_open(scrape: Scrape) -> None:
    states = scrape.values("keel_breaker_state", "deployment")
    assert states == {("gpt-main",): 0.0, ("broken-main",): 2.0}


def test_no_record_was_dropped_and_the_log_queue_is_reported(scrape: Scrape) -> None:
    assert scrape.total("keel_log_records_dropped_total") == 0
    assert ("request_log",) in scrape.values("keel_queue_depth", "queue")
