"""Judge trust: should a team believe its judge? Agreement of the judge's labels with human labels
(accuracy, and Cohen's kappa: agreement beyond what two raters with these label frequencies would reach
by chance), and run-to-run stability (the same case judged k times).

Kappa's confidence interval is a percentile bootstrap over cases (seeded, so a report is reproducible):
the analytic standard error assumes a large sample and symmetric sampling error, neither of which holds
for the few dozen labelled cases a team usually has, near kappa's bounds. Resamples in which kappa is
undefined (every label of one class on both sides) are skipped; the number used is reported.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import combinations
from typing import Any, Protocol

import numpy as np
from numpy.typing import NDArray

Label = Hashable


def cohen_kappa(judge: Sequence[Label], human: Sequence[Label]) -> float | None:
    """Cohen's kappa of two raters' labels of the same cases; None when it is undefined (no cases, or
    both raters give every case one and the same label: chance agreement is then 1)."""
    if len(judge) != len(human):
        raise ValueError(f"cohen_kappa: {len(judge)} judge labels against {len(human)} human labels")
    if not judge:
        return None
    categories = sorted(set(judge) | set(human), key=repr)
    index = {c: i for i, c in enumerate(categories)}
    table = np.zeros((len(categories), len(categories)))
    np.add.at(table, ([index[j] for j in judge], [index[h] for h in human]), 1.0)
    return _kappa(table)


def _kappa(table: NDArray[np.float64]) -> float | None:
    n = table.sum()
    observed = np.trace(table) / n
    chance = float((table.sum(axis=1) * table.sum(axis=0)).sum() / (n * n))
    if chance >= 1.0:
        return None
    return float((observed - chance) / (1.0 - chance))


@dataclass(frozen=True, slots=True)
class Agreement:
    n: int
    accuracy: float | None
    kappa: float | None
    kappa_low: float | None  # the bootstrap interval's bounds (`level`, 95% by default)
    kappa_high: float | None
    level: float
    resamples: int  # bootstrap resamples in which kappa was defined


def agreement(judge: Sequence[Label], human: Sequence[Label], *, level: float = 0.95, resamples: int = 2000,
              seed: int = 0) -> Agreement:
    """Accuracy and Cohen's kappa of the judge against humans, with kappa's bootstrap interval."""
    if len(judge) != len(human):
        raise ValueError(f"agreement: {len(judge)} judge labels against {len(human)} human labels")
    n = len(judge)
    if n == 0:
        return Agreement(0, None, None, None, None, level, 0)
    categories = sorted(set(judge) | set(human), key=repr)
    index = {c: i for i, c in enumerate(categories)}
    j = np.array([index[x] for x in judge])
    h = np.array([index[x] for x in human])
    k = len(categories)
    accuracy = float((j == h).mean())
    kappa = cohen_kappa(judge, human)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n, size=(resamples, n))
    cells = j[draws] * k + h[draws]  # each resample's contingency table, as flat cell counts
    kappas = []
    for row in cells:
        value = _kappa(np.bincount(row, minlength=k * k).reshape(k, k).astype(np.float64))
        if value is not None:
            kappas.append(value)
    if not kappas:
        return Agreement(n, accuracy, kappa, None, None, level, 0)
    tail = (1.0 - level) / 2 * 100
    low, high = np.percentile(kappas, [tail, 100 - tail])
    return Agreement(n, accuracy, kappa, float(low), float(high), level, len(kappas))


@dataclass(frozen=True, slots=True)
class Stability:
    cases: int
    k: int  # the most runs any case was judged
    identical: float | None  # the share of cases whose every run gave the same label
    pairwise: float | None  # the mean, over cases, of the share of run pairs that agree


def stability(runs: Mapping[str, Sequence[Label]]) -> Stability:
    """Run-to-run stability from each case's labels over k runs (cases judged under twice are left out)."""
    judged = {case: labels for case, labels in runs.items() if len(labels) >= 2}
    if not judged:
        return Stability(0, 0, None, None)
    identical = sum(len(set(labels)) == 1 for labels in judged.values()) / len(judged)
    shares = [sum(a == b for a, b in combinations(labels, 2)) / (len(labels) * (len(labels) - 1) / 2)
              for labels in judged.values()]
    return Stability(len(judged), max(len(v) for v in judged.values()), identical, sum(shares) / len(shares))


class HumanLabel(Protocol):
    """What judge trust reads of a reviewer's label (keel.evals.review.Label)."""

    @property
    def label(self) -> str | None: ...  # "pass" or "fail"; None when the reviewer gave only a score


def agreement_by_judge(pairs: Iterable[tuple[Mapping[str, Any], HumanLabel]], *, level: float = 0.95,
                       resamples: int = 2000, seed: int = 0) -> dict[str, Agreement]:
    """Each judge's agreement with the reviewers, from `ReviewQueue.labelled_pairs()`: (the judge's verdict
    in `Score.as_dict()` shape with its name under "judge", a human label). A pair counts when the judge
    passed or failed the item and the reviewer said pass or fail; one item labelled by two reviewers is
    two pairs, as `labelled_pairs` gives them."""
    labels: dict[str, tuple[list[str], list[str]]] = {}
    for verdict, human in pairs:
        passed = verdict.get("passed")
        if passed is None or human.label not in ("pass", "fail"):
            continue
        judged, humans = labels.setdefault(str(verdict.get("judge")), ([], []))
        judged.append("pass" if passed else "fail")
        humans.append(str(human.label))
    return {name: agreement(judged, humans, level=level, resamples=resamples, seed=seed)
            for name, (judged, humans) in sorted(labels.items())}
