"""`keel report`: SLO figures computed from known records, on SQLite and PostgreSQL, and the CLI."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, get_args

import pytest
import yaml
from conftest import fresh_pg_database
from typer.testing import CliRunner

from keel.cli import app
from keel.config import SLOConfig
from keel.errors import (
    AuthenticationFailed,
    BudgetExceeded,
    CircuitOpen,
    ContextLengthExceeded,
    InvalidRequest,
    ModelNotFound,
    ModelNotLoaded,
    Overloaded,
    UpstreamBadRequest,
    UpstreamConnectionError,
    UpstreamRateLimited,
    UpstreamServerError,
    UpstreamTimeout,
)
from keel.observability.record import Outcome, RequestRecord
from keel.observability.report import build_report, parse_window, percentile, render_markdown
from keel.observability.stage import outcome_of
from keel.observability.store import RecordStore
from keel.pipeline import Context

ROOT = Path(__file__).resolve().parents[2]
NOW = time.time()
REQUIRED_KEYS = {"requests", "p50_ms", "p99_ms", "error_rate", "cost_per_request_usd"}


@pytest.fixture(scope="module")
def pg_database() -> Iterator[str]:
    """A database of this module's own on the real PostgreSQL, dropped afterwards."""
    with fresh_pg_database("keel_test") as url:
        yield url


@pytest.fixture(params=["sqlite", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[RecordStore]:
    """A store holding KNOWN, in the window of the last hour, plus records outside it."""
    url = f"sqlite:///{tmp_path}/log.db" if request.param == "sqlite" else request.getfixturevalue("pg_database")
    opened = RecordStore(url)
    opened.migrate()
    opened.write(KNOWN + OUTSIDE)
    yield opened
    if request.param == "postgres":
        with opened.engine.begin() as conn:
            conn.exec_driver_sql("DELETE FROM requests")
            conn.exec_driver_sql("DELETE FROM request_minutes")  # its rollups (keel.observability.rollups)
            conn.exec_driver_sql("DELETE FROM usage_hours")  # and keel.observability.usage_rollups
    opened.close()


def rec(n: int, outcome: Outcome, latency: float, cost: float = 0.0, **fields: Any) -> RequestRecord:
    values: dict[str, Any] = {"started_at": NOW - 600 + n, "feature": "search", "model": "chat", "user": "ann"}
    values.update(fields)
    return RequestRecord(
        request_id=f"req_{n:04d}", ended_at=values["started_at"] + latency / 1000, latency_ms=latency,
        cost_usd=cost, outcome=outcome, prompt_tokens=100, completion_tokens=20 if outcome == "ok" else 0, **values,
    )


# 100 answered calls (10..1000 ms, $0.002 each), 2 failures, 5 cache hits, 3 blocked (refusals).
KNOWN: list[RequestRecord] = [
    rec(i, "ok", 10.0 * (i + 1), 0.002, feature="search" if i % 2 else "chat",
        model="chat" if i < 80 else "chat-large", user=f"user{i % 4}")
    for i in range(100)
] + [
    rec(100, "error", 5000.0, feature="chat"),
    rec(101, "error", 7000.0, feature="chat"),
    *(rec(102 + i, "cached", 2.0) for i in range(5)),
    *(rec(107 + i, "blocked", 1.0) for i in range(3)),
]
OUTSIDE = [rec(200 + i, "error", 60_000.0, 1.0, started_at=NOW - 7200) for i in range(10)]

# The latency sample: every call Keel tried to answer (not the blocked ones).
SAMPLE = sorted(r.latency_ms for r in KNOWN if r.outcome != "blocked")


def test_percentiles_interpolate_between_closest_ranks() -> None:
    cuts = statistics.quantiles(SAMPLE, n=100, method="inclusive")
    assert percentile(SAMPLE, 0.50) == pytest.approx(cuts[49]) == pytest.approx(490.0)
    assert percentile(SAMPLE, 0.99) == pytest.approx(cuts[98]) == pytest.approx(4760.0)
    assert percentile([], 0.5) is None and percentile([7.0], 0.99) == 7.0


def test_report_figures_from_known_records(store: RecordStore) -> None:
    report = build_report(store, since=NOW - 3600, until=NOW + 1)
    assert report.requests == 110
    assert report.p50_ms == pytest.approx(490.0)
    assert report.p99_ms == pytest.approx(4760.0)
    # The error rate is over the calls Keel tried to answer: the 3 blocked ones are not its failures.
    assert report.attempted == 107
    assert report.errors == 2 and report.error_rate == pytest.approx(2 / 107)
    assert report.cost_usd == pytest.approx(0.2)
    assert report.cost_per_request_usd == pytest.approx(0.2 / 110)
    assert report.outcomes == {"blocked": 3, "cached": 5, "error": 2, "ok": 100}
    # Default targets: P50 2 s, P99 10 s, errors 1%, cost $0.01: only the error rate misses.
    assert {c.name: c.passed for c in report.checks} == {
        "p50_ms": True, "p99_ms": True, "error_rate": False, "cost_per_request_usd": True,
    }
    assert report.passed is False


def test_targets_from_the_slo_config_decide_pass_and_fail(store: RecordStore) -> None:
    slo = SLOConfig(p50_ms=400, p99_ms=5000, error_rate=0.02, cost_per_request_usd=0.001)
    report = build_report(store, since=NOW - 3600, until=NOW + 1, slo=slo)
    assert {c.name: c.passed for c in report.checks} == {
        "p50_ms": False, "p99_ms": True, "error_rate": True, "cost_per_request_usd": False,
    }
    relaxed = build_report(store, since=NOW - 3600, until=NOW + 1, slo=SLOConfig(error_rate=0.05))
    assert relaxed.passed is True


def test_breakdowns_sum_tokens_and_spend_by_feature_model_and_user(store: RecordStore) -> None:
    report = build_report(store, since=NOW - 3600, until=NOW + 1)
    by_feature = {row.name: row for row in report.breakdowns["feature"]}
    assert by_feature["search"].requests == 50 + 5 + 3  # odd answered calls, cache hits, blocked
    assert by_feature["chat"].requests == 50 + 2
    assert by_feature["search"].cost_usd == pytest.approx(0.1)
    assert by_feature["chat"].prompt_tokens == 52 * 100 and by_feature["chat"].completion_tokens == 50 * 20
    by_model = {row.name: row for row in report.breakdowns["model"]}
    assert by_model["chat-large"].requests == 20 and by_model["chat-large"].cost_usd == pytest.approx(0.04)
    users = report.breakdowns["user"]
    assert [row.name for row in users][:4] == ["user0", "user1", "user2", "user3"]  # most spend first
    assert sum(row.requests for row in users) == 110


def test_the_dialect_breakdown_counts_each_api_and_names_library_calls(tmp_path: Path) -> None:
    opened = RecordStore(f"sqlite:///{tmp_path}/log.db")
    opened.migrate()
    spoken = ["chat.completions"] * 3 + ["responses"] * 2 + ["messages", None]
    opened.write([rec(i, "ok", 10.0, 0.001 * (i + 1), dialect=dialect) for i, dialect in enumerate(spoken)])
    report = build_report(opened, since=NOW - 3600, until=NOW + 1)
    by_dialect = {row.name: (row.requests, round(row.cost_usd, 6)) for row in report.breakdowns["dialect"]}
    assert by_dialect == {"chat.completions": (3, 0.006), "responses": (2, 0.009), "messages": (1, 0.006),
                          None: (1, 0.007)}
    markdown = render_markdown(report)
    assert "(library)" in markdown and "responses" in markdown
    opened.close()


def test_by_prompt_shows_each_versions_tokens_cost_latency_and_error_rate(tmp_path: Path) -> None:
    opened = RecordStore(f"sqlite:///{tmp_path}/log.db")
    opened.migrate()
    v1 = [rec(i, "ok", 100.0, 0.001, prompt="greet", prompt_version="1") for i in range(4)]
    v1.append(rec(4, "error", 500.0, prompt="greet", prompt_version="1"))
    v2 = [rec(10 + i, "ok", 40.0, 0.002, prompt="greet", prompt_version="2") for i in range(3)]
    v2.append(rec(13, "blocked", 1.0, prompt="greet", prompt_version="2"))  # a refusal: not attempted
    opened.write([*v1, *v2, rec(20, "ok", 10.0)])
    report = build_report(opened, since=NOW - 3600, until=NOW + 1)
    rows = {row.name: row for row in report.breakdowns["prompt"]}
    assert set(rows) == {"greet@1", "greet@2", None}
    one, two = rows["greet@1"], rows["greet@2"]
    assert (one.requests, one.attempted, one.errors, one.error_rate) == (5, 5, 1, 0.2)
    assert one.latency_ms == pytest.approx((4 * 100 + 500) / 5) and one.cost_usd == pytest.approx(0.004)
    assert (two.requests, two.attempted, two.errors, two.latency_ms) == (4, 3, 0, 40.0)
    markdown = render_markdown(report)
    assert "| greet@1 | 5 | 500 | 80 | $0.004 | 180 ms | 20.0% |" in markdown
    opened.close()


def test_feature_filter_and_window_choose_the_records(store: RecordStore) -> None:
    chat = build_report(store, since=NOW - 3600, until=NOW + 1, feature="chat")
    assert chat.requests == 52 and chat.errors == 2
    assert chat.p99_ms is not None and chat.p99_ms > 5000
    wider = build_report(store, since=NOW - 3 * 3600, until=NOW + 1)
    assert wider.requests == 120 and wider.errors == 12
    empty = build_report(store, since=NOW + 10, until=NOW + 20)
    assert empty.requests == 0 and empty.p50_ms is None and empty.passed is True
    assert all(check.passed is None for check in empty.checks)


def test_window_text_is_parsed_or_refused_with_the_forms_accepted() -> None:
    assert parse_window("30m") == 1800 and parse_window("24h") == 86_400 and parse_window("7d") == 7 * 86_400
    for bad in ("24", "1y", "-2h", "0h", "h"):
        with pytest.raises(ValueError, match=r"e\.g\. 30m, 24h, 7d"):
            parse_window(bad)


# ---------------------------------------------------------------------------- the command


@pytest.fixture
def configured(tmp_path: Path) -> Path:
    """A keel.yaml whose store holds KNOWN (SQLite) and whose SLO relaxes the error target."""
    url = f"sqlite:///{tmp_path}/log.db"
    log = RecordStore(url)
    log.migrate()
    log.write(KNOWN + OUTSIDE)
    log.close()
    config = {
        "models": [{"name": "sim", "deployments": [{"provider": "simulated"}]}],
        "store": {"url": url},
        "slo": {"p50_ms": 1000, "p99_ms": 8000, "error_rate": 0.05, "cost_per_request_usd": 0.01},
    }
    path = tmp_path / "keel.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_keel_report_prints_json_with_the_required_keys(configured: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "KEEL_CONFIG"}
    done = subprocess.run(
        [sys.executable, "-m", "keel.cli", "report", "--config", str(configured), "--since", "1h", "--format", "json"],
        capture_output=True, text=True, timeout=60, env=env,
    )
    assert done.returncode == 0, done.stderr
    body = json.loads(done.stdout)
    assert REQUIRED_KEYS <= set(body)
    assert body["requests"] == 110
    assert body["p50_ms"] == pytest.approx(490.0) and body["p99_ms"] == pytest.approx(4760.0)
    assert body["error_rate"] == pytest.approx(2 / 107) and body["attempted"] == 107
    assert body["cost_per_request_usd"] == pytest.approx(0.2 / 110)
    assert body["targets"] == {"p50_ms": 1000, "p99_ms": 8000, "error_rate": 0.05, "cost_per_request_usd": 0.01}
    assert body["pass"] is True
    assert {row["feature"] for row in body["by_feature"]} == {"search", "chat"}
    assert {"by_model", "by_user", "outcomes"} <= set(body)


def test_keel_report_feature_option_narrows_the_json(configured: Path) -> None:
    result = CliRunner().invoke(
        app, ["report", "-c", str(configured), "--since", "1h", "--feature", "chat", "--format", "json"]
    )
    assert result.exit_code == 0, result.output
    body = json.loads(result.stdout)
    assert body["requests"] == 52 and body["window"]["feature"] == "chat"


def test_keel_report_table_and_markdown_show_pass_and_fail(configured: Path) -> None:
    table = CliRunner().invoke(app, ["report", "-c", str(configured), "--since", "2d"])
    assert table.exit_code == 0, table.output
    assert "latency P99" in table.stdout and "FAIL" in table.stdout and "PASS" in table.stdout
    assert "By feature" in table.stdout and "By user" in table.stdout
    markdown = CliRunner().invoke(app, ["report", "-c", str(configured), "--since", "1h", "--format", "markdown"])
    assert markdown.exit_code == 0, markdown.output
    assert "| latency P50 | 490 ms | ≤ 1,000 ms | PASS |" in markdown.stdout
    assert "### By model" in markdown.stdout


def test_markdown_keeps_the_top_rows_and_sums_the_rest(store: RecordStore) -> None:
    text = render_markdown(build_report(store, since=NOW - 3600, until=NOW + 1), top=2)
    assert "| (3 more) |" in text  # user0..user3 and "ann": two shown, three summed


def test_keel_report_refuses_a_bad_window(configured: Path) -> None:
    result = CliRunner().invoke(app, ["report", "-c", str(configured), "--since", "yesterday"])
    assert result.exit_code == 2
    assert "--since must be a positive number followed by s, m, h, d or w" in result.output


def test_keel_report_check_exits_1_on_a_missed_target_and_0_when_all_pass(configured: Path, tmp_path: Path) -> None:
    passed = CliRunner().invoke(app, ["report", "-c", str(configured), "--since", "1h", "--check"])
    assert passed.exit_code == 0, passed.output
    strict = yaml.safe_load(configured.read_text())
    strict["slo"]["error_rate"] = 0.01  # 2 errors in 107 calls: 1.9%
    path = tmp_path / "strict.yaml"
    path.write_text(yaml.safe_dump(strict))
    missed = CliRunner().invoke(app, ["report", "-c", str(path), "--since", "1h", "--check"])
    assert missed.exit_code == 1
    assert "error rate" in missed.stdout and "FAIL" in missed.stdout
    without_check = CliRunner().invoke(app, ["report", "-c", str(path), "--since", "1h"])
    assert without_check.exit_code == 0


def test_the_summary_counts_in_the_singular_and_plural(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/log.db"
    log = RecordStore(url)
    log.migrate()
    log.write([rec(1, "ok", 10.0), rec(2, "error", 20.0)])
    report = build_report(log, since=NOW - 3600, until=NOW + 1)
    log.close()
    assert "2 requests (2 attempted), 1 error, spend $0.00" in render_markdown(report)


# ---------------------------------------------------------------------------- what counts as an error


def test_client_errors_and_refusals_are_not_counted_in_the_error_rate(tmp_path: Path) -> None:
    """Only Keel's or the upstream's failures count: not a too-long prompt (the client's mistake),
    nor a call refused by a budget or a limit (Keel doing its job)."""
    log = RecordStore(f"sqlite:///{tmp_path}/log.db")
    log.migrate()
    log.write([
        *(rec(i, "ok", 100.0) for i in range(8)),
        rec(8, "error", 300.0, status=502, error_type="upstream_server_error"),
        rec(9, "invalid", 40.0, status=400, error_type="context_length_exceeded"),
        rec(10, "budget_exceeded", 1.0, status=429, error_type="budget_exceeded"),
        rec(11, "rate_limited", 1.0, status=429, error_type="rate_limited"),
    ])
    report = build_report(log, since=NOW - 3600, until=NOW + 1)
    log.close()
    assert report.requests == 12 and report.attempted == 9
    assert report.errors == 1 and report.error_rate == pytest.approx(1 / 9)


@pytest.mark.parametrize(("error", "outcome"), [
    (ContextLengthExceeded("too long for this model"), "invalid"),
    (UpstreamBadRequest("the upstream refused the request"), "invalid"),
    (InvalidRequest("bad body"), "invalid"),
    (AuthenticationFailed("bad key"), "invalid"),
    (ModelNotFound("nope", ["sim"]), "invalid"),
    (UpstreamServerError("503 from upstream", upstream_status=503), "error"),
    (UpstreamTimeout("no answer"), "error"),
    (UpstreamConnectionError("refused"), "error"),
    (UpstreamRateLimited("upstream 429 after retries"), "error"),
    (CircuitOpen("paused"), "error"),
    (Overloaded("queue full"), "error"),
    (ModelNotLoaded("missing"), "error"),
    (BudgetExceeded("spent", scope="global", window="day", limit_usd=1, resets_in=None), "budget_exceeded"),
    (RuntimeError("a bug"), "error"),
])
def test_each_error_is_classified_as_the_docs_table_says(error: BaseException, outcome: str) -> None:
    assert outcome_of(Context(), error)[1] == outcome


def test_the_outcome_table_lists_every_outcome_and_whether_it_counts() -> None:
    page = (ROOT / "docs" / "observability.md").read_text()
    table = page[page.index("### Outcomes"):page.index("### Where it is kept")]
    rows = {line.split("|")[1].strip(): line for line in table.splitlines() if line.startswith("| `")}
    assert set(rows) == {f"`{outcome}`" for outcome in get_args(Outcome)}
    assert "context_length_exceeded" in rows["`invalid`"] and "client error" in rows["`invalid`"]
    assert "**yes**" in rows["`error`"]
    assert all("**yes**" not in row for name, row in rows.items() if name != "`error`")


def test_keel_report_with_no_config_blames_no_missing_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["report"], env={"KEEL_CONFIG": ""})
    assert result.exit_code == 1
    assert f"no request log at {tmp_path / 'keel.db'}" in result.stderr
    assert "the default store.url: no config file was found" in result.stderr
    assert "in keel.yaml" not in result.stderr


def test_keel_report_does_not_warn_about_unset_upstream_keys(configured: Path, tmp_path: Path) -> None:
    config = yaml.safe_load(configured.read_text())
    config["models"].append({"name": "up", "deployments": [
        {"provider": "openai", "model": "m", "api_key_env": "KEEL_TEST_UNSET_VARIABLE"}]})
    path = tmp_path / "with-key.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {k: v for k, v in os.environ.items() if k not in ("KEEL_CONFIG", "KEEL_TEST_UNSET_VARIABLE")}
    done = subprocess.run([sys.executable, "-m", "keel.cli", "report", "--config", str(path), "--since", "1h"],
                          capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 0, done.stderr
    assert "KEEL_TEST_UNSET_VARIABLE" not in done.stderr and "WARNING" not in done.stderr


def test_keel_report_without_a_log_says_where_it_looked(tmp_path: Path) -> None:
    config = {"models": [{"name": "sim", "deployments": [{"provider": "simulated"}]}],
              "store": {"url": f"sqlite:///{tmp_path}/none.db"}}
    path = tmp_path / "keel.yaml"
    path.write_text(yaml.safe_dump(config))
    result = CliRunner().invoke(app, ["report", "-c", str(path)])
    assert result.exit_code == 1
    assert "no request log at" in result.output and "none.db" in result.output
    assert f"store.url in {path}" in result.output
    assert not (tmp_path / "none.db").exists()  # a report never creates an empty database


# ---------------------------------------------------------------------------- the cache section

# "chat": 1 miss ($0.002), 3 hits (each saved $0.002; one of them semantic), 1 bypass; "chat-large": 1 miss, no hit;
# "plain": no cache (cache_status none), left out of the section.
CACHE_MIX: list[RequestRecord] = [
    rec(300, "ok", 50.0, 0.002, cache_status="miss"),
    *(rec(301 + i, "cached", 1.0, cache_status="hit_exact", cost_saved_usd=0.002) for i in range(2)),
    rec(303, "cached", 1.0, cache_status="hit_semantic", cost_saved_usd=0.002),
    rec(304, "ok", 50.0, 0.002, cache_status="bypass"),
    rec(305, "ok", 50.0, 0.004, model="chat-large", cache_status="miss"),
    rec(306, "ok", 50.0, 0.001, model="plain"),
]
CACHE_JSON = [
    {"model": "chat", "calls": 5, "hits": 3, "semantic_hits": 1, "misses": 1, "bypasses": 1, "hit_rate": 0.75,
     "saved_usd": 0.006},
    {"model": "chat-large", "calls": 1, "hits": 0, "semantic_hits": 0, "misses": 1, "bypasses": 0, "hit_rate": 0.0,
     "saved_usd": 0.0},
]


@pytest.fixture(params=["sqlite", "postgres"])
def cache_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[RecordStore]:
    url = f"sqlite:///{tmp_path}/log.db" if request.param == "sqlite" else request.getfixturevalue("pg_database")
    opened = RecordStore(url)
    opened.migrate()
    opened.write(CACHE_MIX)
    yield opened
    if request.param == "postgres":
        with opened.engine.begin() as conn:
            conn.exec_driver_sql("DELETE FROM requests")
            conn.exec_driver_sql("DELETE FROM request_minutes")  # its rollups (keel.observability.rollups)
            conn.exec_driver_sql("DELETE FROM usage_hours")  # and keel.observability.usage_rollups
    opened.close()


def _approx_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: pytest.approx(v) if isinstance(v, float) else v for k, v in row.items()} for row in rows]


def test_the_cache_section_counts_hits_misses_bypasses_and_saved_per_model(cache_store: RecordStore) -> None:
    report = build_report(cache_store, since=NOW - 3600, until=NOW + 1)
    assert [row.as_json() for row in report.cache] == _approx_rows(CACHE_JSON)
    assert report.as_json()["cache"] == _approx_rows(CACHE_JSON)
    assert build_report(cache_store, since=NOW - 3600, until=NOW + 1, feature="other").cache == []


def test_keel_report_shows_the_cache_hit_rate_and_saved_usd(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/log.db"
    log = RecordStore(url)
    log.migrate()
    log.write(CACHE_MIX)
    log.close()
    path = tmp_path / "keel.yaml"
    path.write_text(yaml.safe_dump({"models": [{"name": "sim", "deployments": [{"provider": "simulated"}]}],
                                    "store": {"url": url}}))
    env = {k: v for k, v in os.environ.items() if k != "KEEL_CONFIG"}
    done = subprocess.run(
        [sys.executable, "-m", "keel.cli", "report", "--config", str(path), "--since", "1h", "--format", "json"],
        capture_output=True, text=True, timeout=60, env=env,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["cache"] == _approx_rows(CACHE_JSON)
    table = CliRunner(env={"COLUMNS": "200"}).invoke(app, ["report", "-c", str(path), "--since", "1h"])
    assert table.exit_code == 0, table.output
    assert "Cache" in table.stdout
    assert "75.0% (3/4)" in table.stdout and "$0.006" in table.stdout
    markdown = CliRunner().invoke(app, ["report", "-c", str(path), "--since", "1h", "--format", "markdown"])
    assert markdown.exit_code == 0, markdown.output
    assert "### Cache" in markdown.stdout
    assert "| chat | 5 | 75.0% (3/4) | 1 | 1 | $0.006 |" in markdown.stdout
    assert "| chat-large | 1 | 0.0% (0/1) | 0 | 0 | $0.00 |" in markdown.stdout


def test_no_cache_section_when_no_call_used_the_cache(configured: Path) -> None:
    body = json.loads(CliRunner().invoke(app, ["report", "-c", str(configured), "--since", "1h",
                                               "--format", "json"]).stdout)
    assert body["cache"] == []
    table = CliRunner(env={"COLUMNS": "200"}).invoke(app, ["report", "-c", str(configured), "--since", "1h"])
    assert table.exit_code == 0 and "By user" in table.stdout and "Cache" not in table.stdout
    markdown = CliRunner().invoke(app, ["report", "-c", str(configured), "--since", "1h", "--format", "markdown"])
    assert markdown.exit_code == 0 and "### By user" in markdown.stdout and "Cache" not in markdown.stdout
