"""The eval runner through a real Keel (the simulated provider) with results in the request-log database
(SQLite and the machine's PostgreSQL): scores, the summary, resuming from stored answers, prompt and
base-URL targets, comparisons with bootstrap intervals, and the gate."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
import yaml
from conftest import fresh_pg_database

from keel.config import parse_config
from keel.engine import Keel
from keel.evals.compare import bootstrap_interval, compare
from keel.evals.gate import GateInvalid, gate, parse_limits
from keel.evals.report import EvalReport, render_html, render_json, render_markdown
from keel.evals.results import CaseResult, EvalStore, RunNotFound
from keel.evals.runner import EvalRunner, config_for
from keel.evals.suite import SuiteInvalid, build_metrics, load_suite
from keel.observability.store import RecordStore
from keel.testing.fake_openai import FakeBehaviour, FakeOpenAIServer

# The simulator answers "echo: <the last user message>": four cases right, one wrong, one unparseable number.
CASES = [
    {"id": "paris", "input": "Paris", "reference": "echo: Paris", "tags": ["geo"]},
    {"id": "rome", "input": "Rome", "reference": "echo: Rome"},
    {"id": "lima", "input": "Lima", "reference": ["echo: lima", "Lima"]},
    {"id": "oslo", "input": "Oslo", "reference": "echo: Oslo"},
    {"id": "wrong", "input": "Bern", "reference": "echo: Zurich"},
    {"id": "number", "input": "42", "reference": "echo: 42"},
]


@pytest.fixture(params=["sqlite", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, EvalStore]]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path}/log.db"
        opened = RecordStore(url)
        opened.migrate()
        yield url, EvalStore(opened)
        opened.close()
        return
    with fresh_pg_database("keel_evals") as url:
        opened = RecordStore(url)
        opened.migrate()
        yield url, EvalStore(opened)
        opened.close()


def suite_file(tmp_path: Path, metrics: list[dict[str, Any]], **fields: Any) -> Path:
    (tmp_path / "cases.jsonl").write_bytes(b"\n".join(orjson.dumps(case) for case in CASES) + b"\n")
    path = tmp_path / "echo.yaml"
    path.write_text(yaml.safe_dump({"name": "echo", "dataset": "cases.jsonl", "target": {"model": "sim"},
                                    "params": {"temperature": 0}, "metrics": metrics, "concurrency": 3, **fields}))
    return path


def keel_on(url: str, **extra: Any) -> Keel:
    return Keel(parse_config({"models": [{"name": "sim", "deployments": [{"provider": "simulated"}]}],
                              "store": {"url": url}, **extra}))


async def test_a_run_scores_every_case_stores_it_and_the_next_run_reuses_the_answers(
    tmp_path: Path, store: tuple[str, EvalStore]
) -> None:
    url, results = store
    suite = load_suite(suite_file(tmp_path, [{"type": "exact_match", "threshold": 0.8},
                                             {"type": "regex", "pattern": "^echo: ", "name": "prefixed"},
                                             {"type": "latency", "max_ms": 60_000}]))
    seen: list[tuple[str, float]] = []
    async with keel_on(url) as keel:
        runner = EvalRunner(keel, suite, build_metrics(suite), results)
        first = await runner.run(on_case=lambda result, spent: seen.append((result.case_id, spent)))
        second = await runner.run()
    assert sorted(case for case, _ in seen) == sorted(c["id"] for c in CASES)
    exact = first.metrics[0]
    assert (exact.key, exact.scored, exact.passed) == ("exact_match", 6, True)
    assert exact.mean == pytest.approx(5 / 6)  # "lima" matches its second reference
    assert first.metrics[1].mean == 1.0 and first.metrics[2].passed is None
    assert first.errors == 0 and not any(r.reused for r in first.results)
    wrong = next(r for r in first.results if r.case_id == "wrong")
    assert wrong.scores["exact_match"]["passed"] is False and "'echo: Zurich'" in wrong.scores["exact_match"]["reason"]
    assert all(r.reused for r in second.results) and second.cost_usd == 0.0
    assert [m.mean for m in second.metrics[:2]] == [m.mean for m in first.metrics[:2]]
    assert first.run_id is not None and second.run_id is not None
    stored = results.run(first.run_id)
    assert stored.status == "finished" and stored.summary is not None and stored.summary["cases"] == 6
    assert stored.dataset_version == suite.load_dataset().version
    assert len(results.results(first.run_id)) == 6
    assert results.previous("echo", second.run_id) is not None
    with pytest.raises(RunNotFound, match="recent runs"):
        results.run("run_missing")


async def test_a_changed_case_or_target_is_asked_again(tmp_path: Path, store: tuple[str, EvalStore]) -> None:
    url, results = store
    path = suite_file(tmp_path, [{"type": "exact_match"}])
    async with keel_on(url) as keel:
        suite = load_suite(path)
        await EvalRunner(keel, suite, build_metrics(suite), results).run()
        CASES_CHANGED = [dict(c) for c in CASES]
        CASES_CHANGED[0]["input"] = "Paris, France"
        (tmp_path / "cases.jsonl").write_bytes(b"\n".join(orjson.dumps(c) for c in CASES_CHANGED))
        again = await EvalRunner(keel, suite, build_metrics(suite), results).run()
        reused = {r.case_id for r in again.results if r.reused}
        assert reused == {c["id"] for c in CASES} - {"paris"}
        other_params = suite.model_copy(update={"params": {"temperature": 0, "max_tokens": 5}})
        fresh = await EvalRunner(keel, other_params, build_metrics(other_params), results).run()
        assert not any(r.reused for r in fresh.results)


async def test_a_prompt_target_renders_each_cases_variables(tmp_path: Path, store: tuple[str, EvalStore]) -> None:
    url, results = store
    (tmp_path / "prompts").mkdir()
    (tmp_path / "prompts" / "ask.yaml").write_text(
        "name: ask\nversion: 3\nmodel: sim\nmessages: [{role: user, content: 'Capital of {{ country }}?'}]\n")
    (tmp_path / "cases.yaml").write_text(yaml.safe_dump([
        {"id": "fr", "variables": {"country": "France"}, "reference": "echo: Capital of France?"},
        {"id": "none", "variables": {}, "reference": "x"}]))
    path = tmp_path / "prompted.yaml"
    path.write_text(yaml.safe_dump({"dataset": "cases.yaml", "target": {"prompt": "ask"},
                                    "metrics": [{"type": "exact_match"}]}))
    suite = load_suite(path)
    async with keel_on(url, prompts={"dir": str(tmp_path / "prompts")}) as keel:
        outcome = await EvalRunner(keel, suite, build_metrics(suite), results).run()
    by_id = {r.case_id: r for r in outcome.results}
    assert by_id["fr"].scores["exact_match"]["passed"] is True
    assert by_id["none"].output is None and by_id["none"].error is not None
    assert by_id["none"].error.startswith("missing_variable")  # a failed case, counted as an error, unscored
    assert by_id["none"].scores["exact_match"]["value"] is None and outcome.errors == 1


async def test_a_base_url_target_is_called_through_the_pipeline(tmp_path: Path, store: tuple[str, EvalStore]) -> None:
    url, results = store
    with FakeOpenAIServer(FakeBehaviour()) as upstream:
        path = tmp_path / "remote.yaml"
        suite_file(tmp_path, [{"type": "contains", "text": "Paris"}])
        path.write_text(yaml.safe_dump({"name": "remote", "dataset": "cases.jsonl",
                                        "target": {"base_url": upstream.url, "model": "gpt-4o-mini"},
                                        "metrics": [{"type": "contains", "text": "Paris"}]}))
        suite = load_suite(path)
        config = config_for(parse_config({"models": [{"name": "sim", "deployments": [{"provider": "simulated"}]}],
                                          "store": {"url": url}}), suite)
        async with Keel(config) as keel:
            outcome = await EvalRunner(keel, suite, build_metrics(suite), results).run()
        assert upstream.fake.stats.requests >= len(CASES)
    assert outcome.errors == 0 and outcome.metrics[0].scored == len(CASES)


def test_bad_suites_are_refused_with_the_file_and_the_problem(tmp_path: Path) -> None:
    with pytest.raises(SuiteInvalid, match="target"):
        load_suite(suite_file(tmp_path, [{"type": "exact_match"}], target={}))
    with pytest.raises(SuiteInvalid, match=r"metrics\.0\.type"):
        load_suite(suite_file(tmp_path, [{"type": "bleu"}]))
    with pytest.raises(SuiteInvalid, match="share a name"):
        load_suite(suite_file(tmp_path, [{"type": "exact_match"}, {"type": "exact_match"}]))
    suite = load_suite(suite_file(tmp_path, [{"type": "regex", "pattern": "("}]))
    with pytest.raises(SuiteInvalid, match="metric regex"):
        build_metrics(suite)
    suite = load_suite(suite_file(tmp_path, [{"type": "semantic"}]))
    with pytest.raises(SuiteInvalid, match="local embedder"):
        build_metrics(suite)


def result(case: str, key: str, value: float, passed: bool | None = None) -> CaseResult:
    return CaseResult(case, case, "x", scores={key: {"value": value, "passed": passed}})


def test_compare_gives_paired_deltas_with_intervals_and_the_flipped_cases() -> None:
    rng = np.random.default_rng(7)
    before = rng.uniform(0.4, 0.6, 200)
    after = before + 0.1 + rng.normal(0, 0.02, 200)
    a = [result(f"c{i}", "score", float(v)) for i, v in enumerate(before)]
    b = [result(f"c{i}", "score", float(v)) for i, v in enumerate(after)]
    a += [result("f1", "exact", 1.0, True), result("f2", "exact", 0.0, False), result("gone", "exact", 1.0, True)]
    b += [result("f1", "exact", 0.0, False), result("f2", "exact", 1.0, True)]
    deltas = {d.key: d for d in compare(a, b)}
    score = deltas["score"]
    assert score.cases == 200 and score.delta == pytest.approx(0.1, abs=0.01)
    assert score.low is not None and score.high is not None and score.low < 0.1 < score.high
    assert score.significant and score.high - score.low < 0.02
    exact = deltas["exact"]
    assert (exact.regressed, exact.fixed, exact.cases) == (["f1"], ["f2"], 2)  # "gone" is in one run only
    assert compare(a, b) == compare(a, b)  # seeded: the same figures every time
    noise = bootstrap_interval(np.array([0.0, 1.0, -1.0, 0.5, -0.5]), 0.95, 2000, np.random.default_rng(0))
    assert noise[0] < 0 < noise[1]


def test_the_gate_checks_thresholds_floors_ceilings_and_regressions() -> None:
    from keel.evals.compare import MetricDelta
    from keel.evals.runner import MetricSummary

    metrics = [MetricSummary("exact", 10, 0.8, 0.8, 0.9, False), MetricSummary("latency_ms", 10, 900.0, None, None,
                                                                              None, lower_is_better=True)]
    deltas = [MetricDelta("exact", 10, 0.85, 0.8, -0.05, -0.1, 0.0), MetricDelta("latency_ms", 10, 800, 900, 100,
                                                                                  50, 150)]
    checks = gate(metrics, fail_under=parse_limits(["exact=0.75", "latency_ms=1000"], "--fail-under"),
                  max_regression=parse_limits(["exact=0.01", "latency_ms=200"], "--max-regression"), deltas=deltas)
    assert [(c.label, c.passed) for c in checks] == [
        ("exact >= 0.9 (suite)", False), ("exact >= 0.75", True), ("latency_ms <= 1000", True),
        ("exact regression <= 0.01", False), ("latency_ms regression <= 200", True)]
    with pytest.raises(GateInvalid, match="METRIC=NUMBER"):
        parse_limits(["exact"], "--fail-under")
    with pytest.raises(GateInvalid, match="its metrics: exact, latency_ms"):
        gate(metrics, fail_under={"bleu": 0.1}, max_regression={}, deltas=None)
    with pytest.raises(GateInvalid, match="needs a baseline"):
        gate(metrics, fail_under={}, max_regression={"exact": 0.1}, deltas=None)


async def test_reports_in_every_format_say_the_same_and_html_stands_alone(
    tmp_path: Path, store: tuple[str, EvalStore]
) -> None:
    url, results = store
    suite = load_suite(suite_file(tmp_path, [{"type": "exact_match", "threshold": 0.9}]))
    async with keel_on(url) as keel:
        outcome = await EvalRunner(keel, suite, build_metrics(suite), results).run()
    report = EvalReport(outcome)
    assert not report.passed  # 5/6 < 0.9
    data = orjson.loads(render_json(report))
    assert data["passed"] is False and data["metrics"][0]["mean"] == pytest.approx(5 / 6)
    assert data["failures"] == [{"case": "wrong", "metric": "exact_match", "why": data["failures"][0]["why"]}]
    markdown = render_markdown(report)
    assert "| exact_match | 6 | 0.833 |" in markdown and "**FAILED**" in markdown and "`wrong`" in markdown
    page = render_html(report)
    assert "<svg" in page and "FAILED" in page and "wrong" in page
    assert "http://" not in page and "https://" not in page and "<script" not in page  # no external resources
