"""What a run report says about each judge metric, so a team knows whether to believe it:

- verbosity: the correlation of its scores with the answers' lengths (keel.evals.verbosity);
- stability: with the judge asked k times per case (`--judge-runs K`, or `judge: {runs: K}` in the suite),
  the share of cases whose k verdicts were identical, and of agreeing run pairs (keel.evals.judge_trust);
- agreement with people: accuracy and Cohen's kappa with its bootstrap interval against the pass/fail
  labels reviewers gave the judge's verdicts in the review queue (eval cases sent there with
  `keel eval run --review`), over every labelled item of this judge: its key names the judge model and
  the rubric's hash, so the figure is this judge's and this rubric's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from keel.evals.judge_trust import Agreement, Stability, agreement_by_judge, stability
from keel.evals.results import CaseResult
from keel.evals.review import ReviewQueue
from keel.evals.scoring import Metric, Score
from keel.evals.verbosity import LengthCorrelation, score_length_correlation

RUNS = "runs"  # a judge score's details key: the label of each of its k runs, the first being the score's own


def is_judge(metric: Metric) -> bool:
    """A metric whose scores come from a judge model (LLM-as-judge)."""
    return bool(getattr(metric, "judged", False))


def run_label(score: Score) -> Any:
    """What stability compares across runs: the raw 1-5 score, the verdict, or the value."""
    details = score.details
    return details.get("raw_score", details.get("verdict", score.value))


@dataclass(frozen=True, slots=True)
class JudgeFigures:
    key: str
    length: LengthCorrelation
    stability: Stability
    humans: Agreement | None  # None: no reviewer has labelled an item this judge gave a verdict on

    def as_dict(self) -> dict[str, Any]:
        h = self.humans
        return {
            "key": self.key,
            "length_correlation": {"n": self.length.n, "pearson": self.length.pearson,
                                   "spearman": self.length.spearman},
            "stability": {"cases": self.stability.cases, "k": self.stability.k,
                          "identical": self.stability.identical, "pairwise": self.stability.pairwise},
            "humans": None if h is None else {"n": h.n, "accuracy": h.accuracy, "kappa": h.kappa,
                                              "kappa_ci": [h.kappa_low, h.kappa_high], "level": h.level},
        }


def judge_figures(metrics: Sequence[Metric], results: Sequence[CaseResult],
                  humans: Mapping[str, Agreement] | None = None) -> list[JudgeFigures]:
    """The figures of each judge metric over a run's results (`humans`: agreement by judge key)."""
    found = []
    for metric in metrics:
        if not is_judge(metric):
            continue
        scored = [(Score.of(r.scores[metric.key]), r) for r in results if metric.key in r.scores]
        answered = [(s, r) for s, r in scored if r.output is not None]
        length = score_length_correlation([s.value for s, _ in answered], [len(r.output or "") for _, r in answered])
        runs = {r.case_id: s.details.get(RUNS) or [] for s, r in scored}
        found.append(JudgeFigures(metric.key, length, stability(runs), (humans or {}).get(metric.key)))
    return found


def human_agreement(queue: ReviewQueue, keys: Sequence[str]) -> dict[str, Agreement]:
    """Each of these judges' agreement with the reviewers' labels of eval items (blocking)."""
    if not keys:
        return {}
    pairs = [pair for key in keys for pair in queue.labelled_pairs(judge=key, source="eval")]
    return agreement_by_judge(pairs)
