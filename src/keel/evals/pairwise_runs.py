"""Pairwise comparison of two stored runs (`keel eval compare RUN_A RUN_B --judge MODEL`): every case both
runs answered goes to a PairwiseJudge (both orders, ties allowed; keel.evals.pairwise) with the case's
question, reference and criteria read back from the dataset the runs were made on.

The judge sees the two answers as A (RUN_A's, the baseline) and B (RUN_B's); the figures are B's win rate
over A, the position consistency and B's length-controlled win rate. The judge is warned against when it
is one of the models it judges (self-preference): the runs' target models and the models that answered.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from keel.evals.dataset import Case, DatasetInvalid, load_dataset
from keel.evals.judges import Ask, same_model
from keel.evals.pairwise import PairwiseJudge, PairwiseReport
from keel.evals.results import CaseResult, RunRecord


class PairwiseUnavailable(Exception):
    """Two runs cannot be judged pairwise (their dataset is unreadable, or they share no answered case);
    the message says what to do."""


@dataclass
class PairwiseRuns:
    judge: str
    a: str  # run ids
    b: str
    report: PairwiseReport
    missing: list[str] = field(default_factory=list)  # answered by both, but not in the dataset any more
    warnings: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        r, lc = self.report, self.report.length_controlled
        return {
            "judge": self.judge, "a": self.a, "b": self.b, "cases": len(r.verdicts), "wins_a": r.wins_a,
            "wins_b": r.wins_b, "ties": r.ties, "unjudged": r.unjudged, "win_rate_b": r.win_rate_b,
            "consistency": r.consistency,
            "length_controlled": {"win_rate_b": lc.win_rate, "raw_win_rate_b": lc.raw_win_rate, "slope": lc.slope,
                                  "n": lc.n},
            "missing": self.missing, "warnings": self.warnings,
            "verdicts": [{"case": v.case_id, "first": v.first, "second": v.second, "combined": v.combined,
                          "reasons": list(v.reasons), "length_a": v.length_a, "length_b": v.length_b,
                          "problem": v.problem} for v in r.verdicts],
        }


def cases_of(run: RunRecord) -> dict[str, Case]:
    """The cases of the dataset `run` was made on, by id (the path as the run stored it)."""
    try:
        dataset = load_dataset(Path(run.dataset))
    except DatasetInvalid as exc:
        raise PairwiseUnavailable(f"pairwise judging shows the judge each case's question, read from the run's "
                                  f"dataset, and that failed: {exc}. Run the comparison from the directory the "
                                  "runs were made in.") from None
    return {case.id: case for case in dataset.cases}


def answered_pairs(cases: dict[str, Case], a: Sequence[CaseResult], b: Sequence[CaseResult]
                   ) -> tuple[list[tuple[Case, str, str]], list[str]]:
    """(case, A's answer, B's answer) for every case both runs answered, in case order; and the ids of
    such cases the dataset no longer has."""
    answers_a = {r.case_id: r.output for r in a if r.error is None and r.output is not None}
    answers_b = {r.case_id: r.output for r in b if r.error is None and r.output is not None}
    pairs, missing = [], []
    for case_id in sorted(answers_a.keys() & answers_b.keys()):
        if case_id not in cases:
            missing.append(case_id)
            continue
        pairs.append((cases[case_id], answers_a[case_id] or "", answers_b[case_id] or ""))
    return pairs, missing


def judged_models(runs: Sequence[RunRecord], results: Sequence[Sequence[CaseResult]]) -> list[str]:
    """The models the runs' answers came from: each run's target model and each answer's own model name."""
    found: dict[str, None] = {}
    for run in runs:
        if run.target.get("model"):
            found[str(run.target["model"])] = None
    for answered in results:
        for result in answered:
            if result.answer and result.answer.get("model"):
                found[str(result.answer["model"])] = None
    return list(found)


def self_preference(judge: str, models: Sequence[str]) -> list[str]:
    return [f"self-preference: the judge {judge} is one of the judged models ({model}); it may favour its own "
            "answers. Judge with another model." for model in models if same_model(judge, model)][:1]


async def judge_runs(ask: Ask, judge: str, a: RunRecord, b: RunRecord, results_a: Sequence[CaseResult],
                     results_b: Sequence[CaseResult], *, concurrency: int = 8, **settings: Any) -> PairwiseRuns:
    """Judge every case both runs answered, in both orders (`settings`: PairwiseJudge's rubric,
    temperature, max_tokens)."""
    cases = cases_of(b)
    if a.dataset != b.dataset:
        cases = {**cases_of(a), **cases}
    pairs, missing = answered_pairs(cases, results_a, results_b)
    if not pairs:
        raise PairwiseUnavailable(f"runs {a.id} and {b.id} have no answered case in common: nothing to judge")
    report = await PairwiseJudge(model=judge, ask=ask, **settings).compare(pairs, concurrency=concurrency)
    warnings = self_preference(judge, judged_models([a, b], [results_a, results_b]))
    if a.dataset_version != b.dataset_version:
        warnings.append(f"the runs were made on different dataset versions ({a.dataset_version}, "
                        f"{b.dataset_version}); cases are matched by id")
    return PairwiseRuns(judge, a.id, b.id, report, missing, warnings)
