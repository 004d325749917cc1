"""Pairwise comparison of two stored runs: which cases are judged, the self-preference warning, and the
figures (B's win rate, position consistency, length-controlled win rate) in every report format."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import orjson
import pytest

from keel.evals.compare import compare
from keel.evals.compare_report import Comparison, render_html, render_json, render_markdown, render_table
from keel.evals.dataset import Case
from keel.evals.pairwise_runs import (
    PairwiseUnavailable,
    answered_pairs,
    judge_runs,
    judged_models,
    self_preference,
)
from keel.evals.results import CaseResult, RunRecord


def run(run_id: str, dataset: Path, model: str = "small", version: str = "v1") -> RunRecord:
    return RunRecord(run_id, "qa", str(dataset), version, {"model": model}, 0.0, 1.0, "finished", None, None)


def result(case_id: str, output: str | None, model: str = "small", passed: bool = True) -> CaseResult:
    return CaseResult(case_id, "h" + case_id, output, {"model": model} if output else None,
                      {"contains": {"value": float(passed), "passed": passed}},
                      error=None if output is not None else "server_error: down")


def body(content: str) -> dict[str, Any]:
    return {"model": "judge", "choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]}


async def prefers_correct(params: dict[str, Any]) -> dict[str, Any]:
    """A fair judge: the answer that says 'correct' wins, wherever it is shown."""
    text = params["messages"][1]["content"]
    first = text.split("[The Start of Assistant A's Answer]\n")[1].split("\n[The End")[0]
    second = text.split("[The Start of Assistant B's Answer]\n")[1].split("\n[The End")[0]
    verdict = {(True, False): "A", (False, True): "B"}.get(("correct" in first, "correct" in second), "tie")
    return body(orjson.dumps({"verdict": verdict, "reason": "by content"}).decode())


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    path = tmp_path / "qa.jsonl"
    path.write_bytes(b"\n".join(orjson.dumps({"id": f"q{i}", "input": f"question {i}", "reference": "r"})
                                for i in range(5)))
    return path


def test_only_cases_both_runs_answered_are_paired_and_vanished_cases_are_named(dataset: Path) -> None:
    cases = {f"q{i}": Case(id=f"q{i}", messages=({"role": "user", "content": "?"},)) for i in range(3)}
    a = [result("q0", "x"), result("q1", None), result("q2", "y"), result("gone", "z")]
    b = [result("q0", "x2"), result("q1", "w"), result("q2", "y2"), result("gone", "z2")]
    pairs, missing = answered_pairs(cases, a, b)
    assert [(case.id, x, y) for case, x, y in pairs] == [("q0", "x", "x2"), ("q2", "y", "y2")]
    assert missing == ["gone"]


def test_self_preference_is_warned_when_the_judge_answered_in_either_run(dataset: Path) -> None:
    models = judged_models([run("a", dataset, "small"), run("b", dataset, "big")],
                           [[result("q0", "x", "openai/gpt-4o")], []])
    assert models == ["small", "big", "openai/gpt-4o"]
    assert self_preference("GPT-4o", models) and "self-preference" in self_preference("GPT-4o", models)[0]
    assert self_preference("judge", models) == []


async def test_judging_two_runs_gives_b_its_win_rate_and_renders_in_every_format(dataset: Path) -> None:
    a = [result(f"q{i}", "correct" if i < 2 else "wrong", passed=i < 2) for i in range(5)]
    b = [result(f"q{i}", "a much longer correct answer" if i else "wrong again", passed=i > 0) for i in range(5)]
    found = await judge_runs(prefers_correct, "judge", run("run_a", dataset), run("run_b", dataset, "big"), a, b)
    report = found.report
    # q0: A right, B wrong; q1: both right (tie); q2..q4: B right.
    assert [v.combined for v in report.verdicts] == ["A", "tie", "B", "B", "B"]
    assert (report.wins_a, report.ties, report.wins_b) == (1, 1, 3)
    assert report.win_rate_b == pytest.approx(3.5 / 5) and report.consistency == 1.0
    assert report.length_controlled.win_rate is not None and found.warnings == []
    comparison = Comparison("run_a", "run_b", compare(a, b), found)
    as_json = json.loads(render_json(comparison))
    assert as_json["pairwise"]["win_rate_b"] == pytest.approx(0.7) and as_json["pairwise"]["consistency"] == 1.0
    assert as_json["pairwise"]["length_controlled"]["win_rate_b"] == report.length_controlled.win_rate
    assert as_json["metrics"][0]["fixed"] == ["q2", "q3", "q4"]
    markdown = render_markdown(comparison)
    assert "| B's win rate (ties as half) | 70.0% |" in markdown and "| position consistency | 100.0% |" in markdown
    assert "B's length-controlled win rate" in markdown and "| q0 | A / A | A | by content |" in markdown
    page = render_html(comparison)
    assert "<svg" in page and "B wins 3" in page and "length-controlled" in page
    assert render_table(comparison) is not None


async def test_the_judge_of_its_own_answers_is_warned_and_runs_without_shared_answers_are_refused(
        dataset: Path) -> None:
    a, b = [result("q0", "correct")], [result("q0", "correct", model="judge")]
    found = await judge_runs(prefers_correct, "judge", run("run_a", dataset), run("run_b", dataset, "v2"), a, b)
    assert any("self-preference" in w for w in found.warnings)
    with pytest.raises(PairwiseUnavailable, match="no answered case in common"):
        await judge_runs(prefers_correct, "judge", run("run_a", dataset), run("run_b", dataset),
                         [result("q0", None)], b)
    with pytest.raises(PairwiseUnavailable, match="directory the runs were made in"):
        await judge_runs(prefers_correct, "judge", run("run_a", dataset.parent / "nope.jsonl"),
                         run("run_b", dataset.parent / "nope.jsonl"), a, b)
