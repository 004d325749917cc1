"""Two runs side by side: per metric, the change of its mean with a bootstrap confidence interval, and
the cases that flipped (passed before and fail now: regressions; the other way: fixes).

The interval is a paired bootstrap over the cases both runs scored (resampled with a fixed seed, so a
comparison prints the same figures every time): the noise of a small golden set shows as a wide
interval instead of a confident-looking delta.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from keel.evals.results import CaseResult


@dataclass
class MetricDelta:
    key: str
    cases: int  # scored in both runs
    mean_a: float | None
    mean_b: float | None
    delta: float | None  # mean_b - mean_a over the shared cases
    low: float | None  # the confidence interval of the delta
    high: float | None
    regressed: list[str] = field(default_factory=list)  # passed in A, fail in B
    fixed: list[str] = field(default_factory=list)  # failed in A, pass in B

    @property
    def significant(self) -> bool:
        """The interval excludes zero."""
        return self.low is not None and self.high is not None and (self.low > 0 or self.high < 0)

    def as_dict(self) -> dict[str, Any]:
        return {"key": self.key, "cases": self.cases, "mean_a": self.mean_a, "mean_b": self.mean_b,
                "delta": self.delta, "ci": [self.low, self.high], "significant": self.significant,
                "regressed": self.regressed, "fixed": self.fixed}


def compare(a: Sequence[CaseResult], b: Sequence[CaseResult], *, confidence: float = 0.95, resamples: int = 2000,
            seed: int = 0) -> list[MetricDelta]:
    """Per metric both runs have, the paired comparison of run `b` against run `a`."""
    by_case_a = {r.case_id: r for r in a}
    by_case_b = {r.case_id: r for r in b}
    shared = sorted(by_case_a.keys() & by_case_b.keys())
    keys = [k for k in _keys(a) if k in _keys(b)]
    rng = np.random.default_rng(seed)
    deltas = []
    for key in keys:
        pairs = [(by_case_a[c].scores.get(key) or {}, by_case_b[c].scores.get(key) or {}, c) for c in shared]
        values = [(x["value"], y["value"]) for x, y, _ in pairs if x.get("value") is not None
                  and y.get("value") is not None]
        regressed = [c for x, y, c in pairs if x.get("passed") is True and y.get("passed") is False]
        fixed = [c for x, y, c in pairs if x.get("passed") is False and y.get("passed") is True]
        if not values:
            deltas.append(MetricDelta(key, 0, None, None, None, None, None, regressed, fixed))
            continue
        before = np.array([v[0] for v in values], dtype=float)
        after = np.array([v[1] for v in values], dtype=float)
        differences = after - before
        low, high = bootstrap_interval(differences, confidence, resamples, rng)
        deltas.append(MetricDelta(key, len(values), float(before.mean()), float(after.mean()),
                                  float(differences.mean()), low, high, regressed, fixed))
    return deltas


def bootstrap_interval(differences: np.ndarray[Any, np.dtype[np.float64]], confidence: float, resamples: int,
                       rng: np.random.Generator) -> tuple[float, float]:
    """The percentile bootstrap interval of the mean of `differences`."""
    if len(differences) == 1:
        return float(differences[0]), float(differences[0])
    picks = rng.integers(0, len(differences), size=(resamples, len(differences)))
    means = differences[picks].mean(axis=1)
    tail = (1 - confidence) / 2
    return float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail))


def _keys(results: Sequence[CaseResult]) -> list[str]:
    seen: dict[str, None] = {}
    for result in results:
        seen.update(dict.fromkeys(result.scores))
    return list(seen)
