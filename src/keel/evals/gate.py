"""The CI gate: `--fail-under METRIC=VALUE` (this run's mean must reach VALUE; for latency and cost, stay
under it) and `--max-regression METRIC=DELTA` (against the baseline run, the mean may not get worse
by more than DELTA). The suite's own thresholds count too. Any failed check makes the exit code 1."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from keel.evals.compare import MetricDelta
from keel.evals.runner import MetricSummary


class GateInvalid(Exception):
    """A gate option cannot be used; the message says which and what is accepted."""


@dataclass(frozen=True)
class GateCheck:
    label: str  # e.g. "exact_match >= 0.9" or "exact_match regression <= 0.05"
    value: float | None
    passed: bool


def parse_limits(items: Sequence[str], option: str) -> dict[str, float]:
    limits = {}
    for item in items:
        key, sep, number = item.partition("=")
        try:
            if not sep or not key.strip():
                raise ValueError
            limits[key.strip()] = float(number)
        except ValueError:
            raise GateInvalid(f"{option} takes METRIC=NUMBER (e.g. {option} exact_match=0.9), got {item!r}") from None
    return limits


def gate(metrics: Sequence[MetricSummary], *, fail_under: dict[str, float], max_regression: dict[str, float],
         deltas: Sequence[MetricDelta] | None) -> list[GateCheck]:
    known = {m.key: m for m in metrics}
    lower_is_better = {m.key for m in metrics if m.lower_is_better}
    for key in [*fail_under, *max_regression]:
        if key not in known:
            raise GateInvalid(f"the gate names the metric {key!r}, which this suite does not have; its metrics: "
                              f"{', '.join(known)}")
    if max_regression and deltas is None:
        raise GateInvalid("--max-regression needs a baseline run: give --baseline RUN_ID, or run the suite once first")
    checks = []
    for metric in metrics:
        if metric.threshold is not None:
            sign = "<=" if metric.key in lower_is_better else ">="
            checks.append(GateCheck(f"{metric.key} {sign} {metric.threshold:g} (suite)", metric.mean,
                                    bool(metric.passed)))
    for key, limit in fail_under.items():
        mean = known[key].mean
        lower = key in lower_is_better
        ok = mean is not None and (mean <= limit if lower else mean >= limit)
        checks.append(GateCheck(f"{key} {'<=' if lower else '>='} {limit:g}", mean, ok))
    by_key = {d.key: d for d in deltas or ()}
    for key, allowed in max_regression.items():
        delta = by_key.get(key)
        change = None if delta is None else delta.delta
        worse = None if change is None else (change if key in lower_is_better else -change)
        checks.append(GateCheck(f"{key} regression <= {allowed:g}", change, worse is not None and worse <= allowed))
    return checks
