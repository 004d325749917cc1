"""A run's judge metrics in its report: the score-length correlation (verbosity), run-to-run stability with
the judge asked k times, and agreement with reviewers' labels from the review queue; and a suite's judge
metrics asking through the run's own Keel (SQLite request log, the simulated provider)."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from keel.config import parse_config
from keel.engine import Keel
from keel.evals.judge_report import judge_figures
from keel.evals.judges import RubricJudge
from keel.evals.metrics import ExactMatch
from keel.evals.report import EvalReport, render_html, render_json, render_markdown
from keel.evals.results import CaseResult, EvalStore
from keel.evals.review import ReviewQueue
from keel.evals.review_feed import enqueue_eval_results
from keel.evals.runner import EvalRunner
from keel.evals.suite import build_metrics, load_suite
from keel.observability.store import RecordStore

CASES = [{"id": f"c{i}", "input": "x" * (i + 1), "reference": "r"} for i in range(8)]


@pytest.fixture
def store(tmp_path: Path) -> Iterator[tuple[str, EvalStore]]:
    url = f"sqlite:///{tmp_path}/log.db"
    opened = RecordStore(url)
    opened.migrate()
    yield url, EvalStore(opened)
    opened.close()


def suite_file(tmp_path: Path, **fields: Any) -> Path:
    (tmp_path / "cases.jsonl").write_bytes(b"\n".join(orjson.dumps(case) for case in CASES))
    path = tmp_path / "judged.yaml"
    path.write_text(yaml.safe_dump({"name": "judged", "dataset": "cases.jsonl", "target": {"model": "sim"},
                                    "metrics": [{"type": "judge", "scale": "pass_fail", "name": "verdict"}],
                                    **fields}))
    return path


def keel_on(url: str) -> Keel:
    return Keel(parse_config({"models": [{"name": "sim", "deployments": [{"provider": "simulated"}]},
                                         {"name": "judge", "deployments": [{"provider": "simulated"}]}],
                              "store": {"url": url}}))


def verdict(content: str) -> dict[str, Any]:
    return {"model": "judge", "choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]}


def test_the_length_correlation_covers_the_judged_answers_and_stability_the_cases_judged_k_times() -> None:
    judge = RubricJudge(model="judge", key="quality")
    results = [CaseResult(f"c{i}", "h", "y" * (10 * (i + 1)), scores={"quality": {
        "value": i / 4, "passed": i > 1, "details": {"raw_score": i + 1, "runs": [i + 1, i + 1, (i + 1) % 3]}}})
        for i in range(5)]
    results.append(CaseResult("failed", "h", None, scores={"quality": {"value": None}}, error="boom"))
    (found,) = judge_figures([judge, ExactMatch()], results)  # a check is not a judge: no figures
    assert found.key == "quality" and found.length.n == 5
    assert found.length.spearman == pytest.approx(1.0) and found.length.pearson == pytest.approx(1.0)
    # cases c0..c4: runs [1,1,1], [2,2,2], [3,3,0], [4,4,1], [5,5,2]: two of five judged the same every time.
    assert found.stability.k == 3 and found.stability.identical == pytest.approx(2 / 5)
    assert found.stability.pairwise == pytest.approx((1 + 1 + 1 / 3 + 1 / 3 + 1 / 3) / 5)
    assert found.humans is None


async def test_k_judge_runs_measure_stability_and_reviewers_labels_give_agreement(
        tmp_path: Path, store: tuple[str, EvalStore]) -> None:
    url, results = store
    suite = load_suite(suite_file(tmp_path, judge={"model": "judge", "runs": 3}))
    flips = itertools.cycle(["pass", "pass", "fail"])  # every third verdict differs: not a stable judge

    async def unsteady(params: dict[str, Any]) -> dict[str, Any]:
        return verdict(orjson.dumps({"verdict": next(flips), "reason": "coin"}).decode())

    async with keel_on(url) as keel:
        metrics = build_metrics(suite)
        metrics[0].bind(unsteady)  # type: ignore[attr-defined]
        first = await EvalRunner(keel, suite, metrics, results).run()
        (figures,) = first.judges
        assert figures.stability.k == 3 and figures.stability.cases == len(CASES)
        assert figures.stability.identical is not None and figures.stability.identical < 1.0
        assert figures.humans is None
        queue = ReviewQueue(results.store)
        assert first.run_id is not None
        assert enqueue_eval_results(queue, first.run_id, first.results, every=True) == len(CASES)
        # The reviewer agrees with the judge's verdict on six cases and not on two.
        items = queue.list_items(source="eval", limit=50).items
        for n, item in enumerate(items):
            said = (item.judge or {})["verdict"]["passed"]
            queue.label(item.id, "ann", label=("pass" if said else "fail") if n < 6 else ("fail" if said else "pass"))
        again = await EvalRunner(keel, suite, build_metrics(suite), results).run()  # answers and scores reused
    (figures,) = again.judges
    assert figures.humans is not None and figures.humans.n == len(CASES)
    assert figures.humans.accuracy == pytest.approx(6 / 8)
    assert figures.stability.k == 3  # the stored runs came with the reused scores
    report = EvalReport(again)
    body = json.loads(render_json(report))
    assert body["judges"][0]["key"] == "verdict" and body["judges"][0]["humans"]["n"] == len(CASES)
    assert body["judges"][0]["stability"]["k"] == 3 and "length_correlation" in body["judges"][0]
    row = [line for line in render_markdown(report).splitlines() if line.startswith("| verdict |")][-1]
    assert "3x: " in row and "| 8 | 0.750 |" in row
    assert "agreement with reviewers" in render_html(report)


async def test_a_suites_judge_asks_through_the_runs_keel_and_more_runs_rejudge_stored_answers(
        tmp_path: Path, store: tuple[str, EvalStore]) -> None:
    url, results = store
    suite = load_suite(suite_file(tmp_path, judge={"model": "judge"}))
    async with keel_on(url) as keel:
        once = await EvalRunner(keel, suite, build_metrics(suite), results).run()
        thrice = await EvalRunner(keel, suite, build_metrics(suite), results, judge_runs=3).run()
    # The simulated judge answers the schema's first value, "pass", every time.
    assert once.metrics[0].mean == 1.0 and once.judges[0].stability.k == 0
    assert all(r.reused for r in thrice.results)
    assert thrice.judges[0].stability.k == 3 and thrice.judges[0].stability.identical == 1.0
    assert all(r.scores["verdict"]["details"]["runs"] == ["pass"] * 3 for r in thrice.results)


async def test_the_shipped_judge_suite_loads_and_runs_with_the_simulated_provider_standing_in(
        store: tuple[str, EvalStore]) -> None:
    url, results = store
    suite = load_suite(Path(__file__).parents[2] / "examples/evals/eval_mt_bench.yaml")
    dataset = suite.load_dataset()
    assert len(dataset) == 6 and all(case.references for case in dataset.cases)
    assert suite.judge is not None and suite.judge.model == "local"
    on_sim = suite.model_copy(update={"target": suite.target.model_copy(update={"model": "sim"}),
                                      "judge": suite.judge.model_copy(update={"model": "judge"})})
    async with keel_on(url) as keel:
        outcome = await EvalRunner(keel, on_sim, build_metrics(on_sim), results).run()
    judge = next(m for m in outcome.metrics if m.key == "mt_bench_judge")
    assert judge.scored == 6 and judge.mean == 0.0  # the simulator's smallest valid score: 1 of 5
    assert [j.key for j in outcome.judges] == ["mt_bench_judge"] and outcome.judges[0].length.n == 6
