"""The dashboard's JSON API over a SQLite request log of known calls: each document's figures equal
the query layer's (the one `keel report` uses), tenant scoping, bad parameters in the OpenAI error
shape, the search, a record and a trace."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient

from keel.config import SLOConfig
from keel.dashboard.api import cost_json, dashboard_api_router
from keel.errors import KeelError
from keel.evals.drift import build_drift
from keel.observability.queries import Filters, Window
from keel.observability.record import RequestRecord, SpanRecord
from keel.observability.report import build_report
from keel.observability.store import RecordStore
from keel.server.app import keel_error

NOW = 1_790_000_000.0


def rec(n: int, **fields: Any) -> RequestRecord:
    values: dict[str, Any] = {
        "request_id": f"req_{n:03d}", "started_at": NOW - 3000 + n * 10, "tenant": "a", "model": "m1",
        "feature": "f1", "user": "ann", "latency_ms": 100.0 + n, "prompt_tokens": 10, "completion_tokens": 5,
        "cost_usd": 0.001, "cost_nanousd": 1_000_000, "outcome": "ok",
        "input": [{"role": "user", "content": f"question {n}"}], "output": {"role": "assistant", "content": "ok"},
    }
    values.update(fields)
    values.setdefault("ended_at", values["started_at"] + values["latency_ms"] / 1000)
    return RequestRecord(**values)


RECORDS = [
    *(rec(i) for i in range(20)),
    *(rec(20 + i, tenant="b", model="m2", input=[{"role": "user", "content": f"secret of b {i}"}])
      for i in range(10)),
    rec(40, outcome="error", status=502),
    rec(41, outcome="blocked", status=400,
        guardrails=[{"direction": "input", "check": "injection", "action": "block"}]),
    rec(42, outcome="rate_limited", status=429),
    rec(43, outcome="cached", cache_status="hit_exact", cost_usd=0.0, cost_nanousd=0, cost_saved_usd=0.002,
        trace_id="t" * 32, span_id="s" * 16),
    rec(44, cache_status="miss"),
]


@pytest.fixture
def store(tmp_path: Path) -> Iterator[RecordStore]:
    opened = RecordStore(f"sqlite:///{tmp_path}/log.db")
    opened.migrate()
    opened.write(RECORDS, [SpanRecord("t" * 32, "c" * 16, None, "chain", NOW - 2580, NOW - 2500, "ok", {}, None)])
    yield opened
    opened.close()


@pytest.fixture
def client(store: RecordStore) -> TestClient:
    async def auth(request: Request) -> None:  # what admin_key leaves: the caller's tenant, None for the master key
        request.state.tenant = request.headers.get("x-tenant")

    app = FastAPI()
    app.include_router(dashboard_api_router(lambda request: store, auth,
                                            lambda request: SLOConfig(p50_ms=110, p99_ms=1000, error_rate=0.01)))
    app.add_exception_handler(KeelError, keel_error)  # type: ignore[arg-type]
    return TestClient(app)


WINDOW = {"since": str(NOW - 3600), "until": str(NOW)}


def test_the_overview_shows_the_figures_keel_report_computes(client: TestClient, store: RecordStore) -> None:
    body = client.get("/dashboard/api/overview", params=WINDOW).json()
    report = build_report(store, since=NOW - 3600, until=NOW)
    totals = body["totals"]
    assert totals["requests"] == report.requests == len(RECORDS)
    assert totals["errors"] == report.errors == 1 and totals["attempted"] == report.attempted
    assert totals["cost_usd"] == pytest.approx(report.cost_usd)
    assert (totals["guardrail_blocks"], totals["rate_limited"]) == (1, 1)
    assert (totals["cache_hits"], totals["cache_lookups"], totals["saved_usd"]) == (1, 2, pytest.approx(0.002))
    slo = {row["name"]: row for row in body["slo"]}
    assert slo["p50_ms"]["value"] == pytest.approx(report.p50_ms)
    assert slo["p99_ms"]["value"] == pytest.approx(report.p99_ms)
    assert slo["error_rate"]["value"] == pytest.approx(report.error_rate)
    assert slo["error_rate"]["passed"] is False and slo["error_rate"]["target"] == 0.01
    assert slo["error_rate"]["error_budget_left"] == pytest.approx(1 - report.error_rate / 0.01)
    assert slo["p99_ms"]["error_budget_left"] == 1.0  # no call over 1 s
    series = body["series"]
    assert body["window"]["step_s"] == 60 and len(series["t"]) == len(series["requests"]) <= 240
    assert sum(series["requests"]) == len(RECORDS) and sum(series["errors"]) == 1


def test_a_tenant_admin_sees_its_tenant_only(client: TestClient) -> None:
    own = client.get("/dashboard/api/overview", params=WINDOW, headers={"x-tenant": "b"}).json()
    assert own["totals"]["requests"] == 10
    refused = client.get("/dashboard/api/overview", params={**WINDOW, "tenant": "a"}, headers={"x-tenant": "b"})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "tenant"
    found = client.get("/dashboard/api/requests", params={**WINDOW, "q": "secret"}, headers={"x-tenant": "a"}).json()
    assert found["data"] == []
    assert client.get("/dashboard/api/requests/req_020", headers={"x-tenant": "a"}).status_code == 404
    assert client.get("/dashboard/api/requests/req_020", headers={"x-tenant": "b"}).status_code == 200
    assert client.get(f"/dashboard/api/traces/{'t' * 32}", headers={"x-tenant": "b"}).status_code == 404
    assert "tenants" not in client.get("/dashboard/api/filters", params=WINDOW, headers={"x-tenant": "b"}).json()
    assert client.get("/dashboard/api/filters", params=WINDOW).json()["tenants"] == ["a", "b"]


def test_bad_parameters_are_refused_naming_them(client: TestClient) -> None:
    for params, name in (({"since": "yesterday"}, "since"), ({"since": str(NOW), "until": str(NOW - 1)}, "since"),
                         ({"limit": "0"}, "limit"), ({"guardrail": "maybe"}, "guardrail"),
                         ({"before": "x:y"}, "before")):
        response = client.get("/dashboard/api/requests", params=params)
        assert response.status_code == 400, params
        assert response.json()["error"]["param"] == name and response.json()["error"]["type"] == "invalid_request_error"


def test_the_search_filters_pages_and_previews(client: TestClient) -> None:
    first = client.get("/dashboard/api/requests", params={**WINDOW, "limit": "20"}).json()
    assert [row["request_id"] for row in first["data"]][:2] == ["req_044", "req_043"]
    second = client.get("/dashboard/api/requests", params={**WINDOW, "limit": "20", "before": first["next"]}).json()
    assert len(first["data"]) + len(second["data"]) == len(RECORDS) and second["next"] is None
    blocked = client.get("/dashboard/api/requests", params={**WINDOW, "guardrail": "block"}).json()["data"]
    assert [(row["request_id"], row["guardrail"]) for row in blocked] == [("req_041", "injection:block")]
    assert [r["request_id"] for r in client.get("/dashboard/api/requests",
                                                params={**WINDOW, "cache": "hit"}).json()["data"]] == ["req_043"]
    texts = client.get("/dashboard/api/requests", params={**WINDOW, "q": "QUESTION 1"}).json()["data"]
    assert {row["request_id"] for row in texts} == {f"req_{n:03d}" for n in (1, *range(10, 20))}
    assert texts[0]["preview"].startswith("question 1")


def test_a_record_and_its_trace(client: TestClient) -> None:
    record = client.get("/dashboard/api/requests/req_043").json()
    assert record["cache_status"] == "hit_exact" and record["input"][0]["content"] == "question 43"
    missing = client.get("/dashboard/api/requests/nope")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    spans = client.get(f"/dashboard/api/traces/{'t' * 32}").json()["spans"]
    assert [span["name"] for span in spans] == ["chain"]


def test_cost_by_dimension_and_the_forecast(client: TestClient) -> None:
    body = client.get("/dashboard/api/cost", params={"since": str(NOW - 3600), "until": str(NOW + 3600)}).json()
    by_model = {row["name"]: row for row in body["by"]["model"]}
    assert by_model["m2"]["requests"] == 10 and by_model["m2"]["cost_usd"] == pytest.approx(0.010)
    assert {row["name"] for row in body["by"]["key"]} == {None}
    assert body["forecast"]["projected_usd"] == pytest.approx(body["total_usd"])  # the window is over


def test_the_forecast_extends_the_spend_so_far_at_its_rate_to_the_window_end(store: RecordStore) -> None:
    window = Window(NOW - 3600, NOW + 3600)  # half of it gone at NOW
    body = cost_json(store, window, Filters(), now=NOW)
    assert body["total_usd"] == pytest.approx(0.034)
    assert body["forecast"] == {"window_end": NOW + 3600, "projected_usd": pytest.approx(0.068)}


def test_quality_lists_no_run_on_an_empty_log(client: TestClient) -> None:
    body = client.get("/dashboard/api/quality", params=WINDOW).json()
    assert body == {"runs": [], "agreement": [], "drift": body["drift"]}


def test_drift_charts_are_keel_drifts_comparison_bucket_by_bucket(client: TestClient, store: RecordStore) -> None:
    """Each point of a drift chart is what `keel drift` (build_drift) reports for that bucket against the
    same baseline; the slow half of the window is marked as alerts; a tenant admin gets no chart."""
    since = NOW - 3800  # whole five-minute buckets
    before = [rec(500 + i, model="m9", started_at=since - 86_400 + i * 200, latency_ms=100.0 + i % 9,
                  completion_tokens=40 + i % 5) for i in range(120)]
    during = [rec(700 + i, model="m9", started_at=since + i * 8, latency_ms=(100.0 if i < 225 else 250.0) + i % 9,
                  completion_tokens=40 + i % 5) for i in range(450)]
    store.write(before + during)
    window = {"since": str(since), "until": str(since + 3600)}
    body = client.get("/dashboard/api/drift", params=window).json()
    assert body["step_s"] == 300 and body["t"] == [since + i * 300 for i in range(12)]
    lines = {(line["model"], line["metric"]): line for line in body["lines"]}
    latency = lines[("m9", "latency ms")]
    baseline = (body["baseline"]["since"], body["baseline"]["until"])
    assert baseline == (since - 7 * 86_400, since)
    for i, start in enumerate(body["t"]):
        report = build_drift(store, window=(start, start + 300), baseline=baseline, model="m9")
        row = next(r for r in report.rows if r.metric == "latency ms" and r.deployment == "*")
        shown = (latency["values"][i], latency["verdicts"][i], latency["n"][i])
        assert shown == (row.window, row.verdict, row.window_n)
        assert latency["baseline"] == row.baseline == pytest.approx(104.0)  # the baseline's median
    assert latency["alerts"] == [False] * 6 + [True] * 6
    assert latency["low"] == pytest.approx(latency["baseline"] * 0.9)
    assert latency["high"] == pytest.approx(latency["baseline"] * 1.1)
    assert lines[("m9", "error rate")]["high"] == pytest.approx(0.01)  # a rate's band: one percentage point
    assert client.get("/dashboard/api/drift", params=window, headers={"x-tenant": "a"}).json() == {"lines": None}
    ragged = client.get("/dashboard/api/drift", params=WINDOW).json()  # a window of no whole bucket edge
    assert len(ragged["t"]) <= 24 and ragged["t"][0] <= NOW - 3600 < ragged["t"][0] + ragged["step_s"]
    assert ragged["t"][-1] < NOW <= ragged["t"][-1] + ragged["step_s"]
