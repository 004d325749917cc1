"""Acceptance: the dashboard's pages in real headless Chromium (Debian's, driven by Playwright) over a
real `keel serve`, after traffic of known outcomes. Each page's figures equal those the request log
gives through keel.observability.queries (the queries `keel report` uses); a filter, a trace and a
review label are clicked through; screenshots are saved under the test's output directory."""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterator
from typing import Any

import pytest
from dashboard_helpers import MASTER, TRACE_ID, Site, browser, first_contentful_paint, ready, signed_in, site

from keel.evals.results import EvalStore
from keel.observability.record import RequestRecord

__all__ = ["browser", "site"]  # the fixtures, used by name


@pytest.fixture(scope="module")
def page(browser: Any, site: Site) -> Iterator[Any]:
    signed = signed_in(browser, site)
    yield signed
    signed.context.close()


def value(page: Any, selector: str) -> float | None:
    """The exact figure behind a shown one (its data-value); None for an empty one (n/a)."""
    raw = page.get_attribute(selector, "data-value")
    assert raw is not None, f"no figure at {selector}"
    return float(raw) if raw != "" else None


def close(shown: float | None, expected: float | None) -> bool:
    if shown is None or expected is None:
        return shown is expected
    return math.isclose(shown, expected, rel_tol=1e-9, abs_tol=1e-12)


def shot(page: Any, site: Site, name: str) -> None:
    page.screenshot(path=str(site.shots / f"{name}.png"), full_page=True)


def test_the_overview_shows_the_logs_slo_figures_totals_and_charts(page: Any, site: Site) -> None:
    expected = site.figures()
    assert expected.requests == 16 and expected.count("n_blocked") == 1 and expected.errors == 1
    for name, figure in (("p50_ms", expected.p50_ms), ("p99_ms", expected.p99_ms),
                         ("error_rate", expected.error_rate),
                         ("cost_per_request_usd", expected.cost_usd / expected.requests)):
        assert close(value(page, f"#slo tr[data-slo={name}] [data-col=value] [data-value]"), figure), name
    totals = expected.totals_json()
    for name in ("requests", "errors", "cost_usd", "prompt_tokens", "completion_tokens", "guardrail_blocks",
                 "saved_usd"):
        assert close(value(page, f"[data-total={name}] .figure"), totals[name]), name
    assert page.inner_text("[data-total=requests] .figure") == "16"
    assert close(value(page, "[data-total=cache_hit_rate] .figure"), expected.cache_hit_rate)
    for chart in ("requests", "latency", "cost", "tokens"):
        page.wait_for_selector(f"[data-chart={chart}] canvas")
    shot(page, site, "overview")


def test_a_feature_filter_narrows_the_overview_to_its_calls(page: Any, site: Site) -> None:
    page.goto(f"{site.url}/dashboard/overview?{site.window_query()}")
    ready(page)
    page.wait_for_selector("#controls[data-filters-loaded=true]")
    page.select_option("select[name=feature]", "search")
    ready(page, 2)
    expected = site.figures(feature="search")
    assert expected.requests == 5
    assert page.inner_text("[data-total=requests] .figure") == "5"
    assert close(value(page, "[data-total=cost_usd] .figure"), expected.cost_usd)
    assert "feature=search" in page.url
    page.select_option("select[name=tenant]", "team-b")
    ready(page, 3)
    team_b = site.figures(feature="search", tenant="team-b")
    assert team_b.requests == 3 and page.inner_text("[data-total=requests] .figure") == "3"
    page.select_option("select[name=tenant]", "")
    ready(page, 4)
    page.click("button[data-range='24h']")  # the last 24 hours hold all the traffic
    ready(page, 5)
    assert "range=24h" in page.url and "since=" not in page.url
    assert page.get_attribute("button[data-range='24h']", "aria-pressed") == "true"
    assert page.inner_text("[data-total=requests] .figure") == "5"
    page.goto(f"{site.url}/dashboard/overview?{site.window_query()}&feature=search")
    ready(page)
    page.click("[data-nav=cost]")  # the filter travels with the page
    page.wait_for_url("**/dashboard/cost?**feature=search**")
    ready(page)
    assert close(value(page, "[data-total=total_usd] .figure"), expected.cost_usd)
    shot(page, site, "cost-search")


def test_the_cost_page_shows_spend_by_each_dimension_and_the_budgets(page: Any, site: Site) -> None:
    page.goto(f"{site.url}/dashboard/cost?{site.window_query()}")
    ready(page)
    assert close(value(page, "[data-total=total_usd] .figure"), site.figures().cost_usd)
    for dimension in ("feature", "model", "user", "key", "prompt"):
        for row in site.usage(dimension):
            cell = f"[data-by={dimension}] tr[data-name='{row.name or ''}'] [data-col=cost_usd]"
            assert close(value(page, cell), row.cost_usd), (dimension, row.name)
            assert value(page, f"[data-by={dimension}] tr[data-name='{row.name or ''}'] [data-col=requests]") \
                == row.requests
    budgets = site.admin().get("/admin/budgets").json()["data"]
    (support,) = [b for b in budgets if b["rule"]["scope"] == "feature"]
    (counter,) = support["counters"]
    assert close(value(page, "#budgets tr[data-budget='feature:support'] [data-col=spent_usd]"), counter["spent_usd"])
    assert counter["spent_usd"] > 0
    page.wait_for_selector("[data-chart^=burn-] canvas")
    shot(page, site, "cost")


def test_the_request_log_is_searched_and_a_call_and_its_trace_are_opened(page: Any, site: Site) -> None:
    page.goto(f"{site.url}/dashboard/requests?{site.window_query()}")
    ready(page)
    assert page.get_attribute("#request-list", "data-count") == str(len(site.records()))
    page.fill("input[name=q]", "zanzibar")
    page.click("#request-filters button[type=submit]")
    page.wait_for_selector("#request-list[data-count='1']")
    (row,) = page.query_selector_all("#requests tbody tr")
    assert row.get_attribute("data-request") == site.request_ids["search-zanzibar"]
    page.fill("input[name=q]", "")
    page.select_option("select[name=outcome]", "blocked")
    page.click("#request-filters button[type=submit]")
    page.wait_for_selector("#request-list[data-count='1']")
    page.click("#requests tbody tr")
    page.wait_for_selector(f"#request-detail[data-request='{site.request_ids['blocked']}']")
    assert "injection" in page.inner_text("#detail-guardrails")
    shot(page, site, "request-blocked")

    record = next(r for r in site.records() if r["request_id"] == site.request_ids["trace-2"])
    page.goto(f"{site.url}/dashboard/requests?{site.window_query()}&id={record['request_id']}")
    ready(page)
    page.wait_for_selector(f"#request-detail[data-request='{record['request_id']}']")
    assert close(value(page, "#detail-cost"), record["cost_usd"])
    assert "Second step of the chain" in page.inner_text("#detail-input")
    assert len(page.query_selector_all("#detail-attempts tbody tr")) == len(record["attempt_log"]) == 2
    page.click("#trace-link")
    page.wait_for_url(f"**/dashboard/traces?trace={TRACE_ID}")
    page.wait_for_selector("#waterfall")
    spans = site.spans(TRACE_ID)
    assert len(page.query_selector_all("#waterfall .row")) == len(spans) >= 2 + 3  # two calls, three attempts
    page.click("#waterfall .row:last-child")
    page.wait_for_selector("#span-detail:not([hidden])")
    shot(page, site, "trace")


def eval_run(site: Site, mean: float) -> str:
    """An eval run of the suite `support-answers` with one metric, stored as `keel eval run` stores it."""
    with site.store() as store:
        runs = EvalStore(store)
        run_id = runs.start("support-answers", "support.jsonl", "v1", {"model": "chat"}, {})
        metric = {"key": "exact_match", "scored": 4, "mean": mean, "pass_rate": mean, "threshold": 0.6,
                  "passed": mean >= 0.6, "lower_is_better": False}
        runs.finish(run_id, {"cases": 4, "errors": 0, "reused": 0, "cost_usd": 0.001, "metrics": [metric],
                             "passed": mean >= 0.6, "warnings": [], "judges": []})
        return run_id


def test_a_review_item_is_labelled_from_the_quality_page(page: Any, site: Site) -> None:
    first, second = eval_run(site, 0.5), eval_run(site, 0.75)
    added = site.admin().post("/admin/review", json={"request_id": site.request_ids["support-1"]})
    assert added.status_code in (200, 201), added.text
    item = added.json()["id"]
    page.goto(f"{site.url}/dashboard/quality")
    ready(page)
    page.fill("input[name=reviewer]", "dana@example.com")
    box = f"#review [data-item='{item}']"
    page.fill(f"{box} input[name=comment]", "right answer")
    page.click(f"{box} button[data-label=pass]")
    page.wait_for_selector(f"{box}[data-labelled=pass]")
    runs = [row.get_attribute("data-run") for row in page.query_selector_all("#runs tbody tr")]
    assert runs[:2] == [second, first]  # newest first
    assert value(page, f"#runs tr[data-run={second}] [data-metric=exact_match] .mean") == 0.75
    assert value(page, f"#runs tr[data-run={second}] [data-metric=exact_match] .delta") == pytest.approx(0.25)
    assert page.query_selector(f"#runs tr[data-run={first}] .delta") is None  # no run of the suite before it
    labels = site.admin().get(f"/admin/review/{item}").json()["labels"]
    assert [(x["reviewer"], x["label"], x["comment"]) for x in labels] == [("dana@example.com", "pass", "right answer")]
    shot(page, site, "quality")


def drift_probe(site: Site) -> tuple[float, list[RequestRecord], list[RequestRecord]]:
    """Calls of a model `drift-probe` logged ten days ago: a baseline week, then a two-hour window
    whose second hour is three times slower. The window's start and both sets of calls."""
    since = math.floor((site.since - 10 * 86_400) / 3600) * 3600
    def call(i: int, started: float, latency: float) -> RequestRecord:
        return RequestRecord(request_id=f"drift_{i:05d}", started_at=started, ended_at=started + latency / 1000,
                             model="drift-probe", deployment="sim", feature="probe", outcome="ok",
                             latency_ms=latency, completion_tokens=50 + i % 7, cost_usd=0.001)
    baseline = [call(i, since - 7 * 86_400 + i * 2000.5, 100.0 + i % 11) for i in range(300)]
    window = [call(1000 + i, since + i * 7200 / 960, (100.0 if i < 480 else 300.0) + i % 11) for i in range(960)]
    with site.store() as store:
        store.write(baseline + window)
    return since, baseline, window


def test_the_quality_page_charts_drift_over_time_with_its_alerts(page: Any, site: Site) -> None:
    since, baseline, window = drift_probe(site)
    page.goto(f"{site.url}/dashboard/quality?range=custom&since={since}&until={since + 7200}")
    ready(page)
    chart = "[data-chart='drift:drift-probe:latency ms']"
    page.wait_for_selector(f"{chart} canvas")
    t, values, was, low, high, alerts = page.eval_on_selector(chart, "el => el.plot.data")
    step = 300  # 24 buckets of five minutes
    assert t == [since + i * step for i in range(24)]
    medians = [statistics.median(r.latency_ms for r in window if start <= r.started_at < start + step) for start in t]
    assert values == pytest.approx(medians, rel=1e-12)
    median_before = statistics.median(r.latency_ms for r in baseline)
    assert was == [pytest.approx(median_before)] * 24
    assert low == [pytest.approx(median_before * 0.9)] * 24 and high == [pytest.approx(median_before * 1.1)] * 24
    # The alerts: every bucket of the slow hour, and none of the hour before it.
    assert alerts == [None] * 12 + [pytest.approx(m) for m in medians[12:]]
    shown = [row.get_attribute("data-alert") for row in page.query_selector_all("#drift-alerts tr[data-alert]")]
    assert [a for a in shown if a.startswith("drift-probe:latency ms:")] == [
        f"drift-probe:latency ms:{start}" for start in t[12:]]
    page.wait_for_selector("[data-chart='drift:drift-probe:output tokens'] canvas")
    page.eval_on_selector(chart, "el => el.scrollIntoView()")
    shot(page, site, "quality-drift")


def test_keys_are_made_and_revoked_from_the_keys_page(page: Any, site: Site) -> None:
    page.goto(f"{site.url}/dashboard/keys")
    ready(page)
    page.fill("#new-key input[name=tenant]", "team-c")
    page.fill("#new-key input[name=owner]", "erin")
    page.click("#new-key button[type=submit]")
    secret = page.wait_for_selector("#new-secret").inner_text()
    assert secret.startswith("sk-keel-")
    made = [k for k in site.admin().get("/admin/keys").json()["data"] if k["owner"] == "erin"]
    assert len(made) == 1 and made[0]["tenant"] == "team-c"
    page.on("dialog", lambda dialog: dialog.accept())
    page.click(f"button[data-revoke='{made[0]['id']}']")
    page.wait_for_selector(f"tr[data-key='{made[0]['id']}'] .badge.fail")
    (revoked,) = [k for k in site.admin().get("/admin/keys").json()["data"] if k["id"] == made[0]["id"]]
    assert revoked["revoked_at"] is not None
    shot(page, site, "keys")


def test_the_overview_fits_a_phone_width_screen(browser: Any, site: Site) -> None:
    phone = signed_in(browser, site, viewport={"width": 390, "height": 844}, device_scale_factor=2)
    try:
        page_width = phone.evaluate("document.documentElement.scrollWidth")
        assert page_width <= 390, f"the page is {page_width}px wide on a 390px screen"
        shot(phone, site, "overview-phone")
    finally:
        phone.context.close()


def test_first_contentful_paint_is_measured(browser: Any, site: Site, record_property: Any) -> None:
    paint_ms = first_contentful_paint(browser, f"{site.url}/dashboard/overview", MASTER)
    record_property("first_contentful_paint_ms", paint_ms)
    assert 0 < paint_ms < 60_000
    print(f"first contentful paint of /dashboard/overview: {paint_ms:.0f} ms; screenshots in {site.shots}")
