"""Drift: has a model started answering differently? A window of the request log (the last hour, say)
against a baseline window (the week before it), per model (and per deployment when a model has several).

What is measured, over answered live calls (not Keel's own `keel.*` calls nor eval runs `eval:*`):
- output length (completion tokens), latency and cost per call: distributions, compared with PSI
  (population stability index over the baseline's deciles) for the size of the change and a two-sample
  Kolmogorov-Smirnov test for whether it is chance; drift needs both (PSI > 0.2 and p < 0.01), so a
  tiny shift on a huge sample or a noisy PSI on a small one does not fire, and the median or the 90th
  percentile must have moved by 10% (a busy machine's few ms are not drift); "watch" is PSI > 0.1 with
  p < 0.05, or p < 0.01 alone;
- error rate (errors over answered and failed calls) and refusal rate (answers whose text refuses, from
  the logged output; skipped when content logging is off): a two-proportion z-test, p < 0.01 and a change
  of at least one percentage point;
- the upstream's `model` and `system_fingerprint` (over every call of the model, canaries included):
  a value seen in the window that the baseline never had;
- the embedding centroid of the answers: cosine distance between the mean embeddings (the local
  embedder) of the window's and the baseline's answers;
- canary answers (feature `keel.canary`, keel.evals.canaries): the share of the window's canary answers
  that the baseline never gave to the same prompt;
- judge score: the online judge's scores (`review.judge_sample_rate`, keel.evals.online_scores) of the
  calls in each window, by the judged model: a pass/fail judge's pass rate with the z-test, a graded
  judge's scores (0..1) with PSI and KS like the distributions above (shown as means).
Under `min_samples` calls on either side a metric says "not enough data" instead of firing.

Alerts go through the budget alerts' channel (`alerts:` in keel.yaml: the log, then the webhook with its
retries), once per onset: `OnsetTracker` remembers what is drifting, and a metric alerts again only after
it has been seen back to normal.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import orjson
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text
from sqlalchemy import select

from keel.budgets.alerts import AlertSender
from keel.evals.online_scores import OnlineScore, OnlineScores
from keel.observability.store import RecordStore, StoreError, requests

log = logging.getLogger("keel.evals.drift")

Verdict = Literal["drift", "watch", "ok", "not enough data", "skipped"]
CANARY_FEATURE = "keel.canary"
OWN_FEATURES = ("keel.", "eval:")  # Keel's own calls and eval runs: not live traffic
ALL_DEPLOYMENTS = "*"
# Embedding every answer of a busy week is not needed for a mean: a seeded sample of each side is.
MAX_EMBEDDED = 500
MAX_EMBEDDED_CHARS = 2000
Embed = Callable[[list[str]], npt.NDArray[np.float32]]  # unit vectors, one row per text


@dataclass(frozen=True, slots=True)
class Thresholds:
    psi_drift: float = 0.2
    psi_watch: float = 0.1
    ks_p: float = 0.01
    rate_p: float = 0.01
    min_rate_change: float = 0.01  # a significant change smaller than this (absolute) is not drift
    min_relative_change: float = 0.1  # nor a distribution whose median and P90 both moved less than this
    min_samples: int = 30
    min_canaries: int = 3
    canary_change: float = 0.5  # share of changed canary answers that is drift (any change is "watch")
    centroid_drift: float = 0.1  # cosine distance of the answer centroids
    centroid_watch: float = 0.05
    bins: int = 10


# ---------------------------------------------------------------------------- statistics


def psi(baseline: Sequence[float], window: Sequence[float], bins: int = 10) -> float:
    """Population stability index of `window` against `baseline`: the sum over the baseline's quantile
    bins of (w - b) * ln(w / b), bin shares floored at 1e-4 so an empty bin stays finite. Ties (token
    counts) merge bins, so a constant baseline has two: at or under its value, and above."""
    base, new = np.asarray(baseline, dtype=float), np.asarray(window, dtype=float)
    edges = np.unique(np.quantile(base, np.linspace(0, 1, bins + 1)[1:-1]))
    if edges.size == 0 or edges[-1] < base.max():
        edges = np.append(edges, base.max())
    b = np.bincount(np.searchsorted(edges, base, side="left"), minlength=edges.size + 1) / base.size
    w = np.bincount(np.searchsorted(edges, new, side="left"), minlength=edges.size + 1) / new.size
    b, w = np.maximum(b, 1e-4), np.maximum(w, 1e-4)
    return float(np.sum((w - b) * np.log(w / b)))


def ks_2samp(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """Two-sample Kolmogorov-Smirnov: the largest gap D between the two empirical CDFs, and its
    asymptotic p-value (Kolmogorov's distribution at (√n + 0.12 + 0.11/√n)·D, n = n₁n₂/(n₁+n₂);
    Numerical Recipes' form, close to exact from a few dozen samples a side)."""
    x, y = np.sort(np.asarray(a, dtype=float)), np.sort(np.asarray(b, dtype=float))
    points = np.concatenate([x, y])
    gap = np.abs(np.searchsorted(x, points, side="right") / x.size - np.searchsorted(y, points, side="right") / y.size)
    d = float(gap.max())
    n = x.size * y.size / (x.size + y.size)
    return d, kolmogorov_q((math.sqrt(n) + 0.12 + 0.11 / math.sqrt(n)) * d)


def kolmogorov_q(lam: float) -> float:
    """P(K > lam) for Kolmogorov's distribution: 2 Σ (-1)^(j-1) exp(-2 j² lam²)."""
    if lam < 1e-3:
        return 1.0
    total = 0.0
    for j in range(1, 101):
        term = 2 * (-1) ** (j - 1) * math.exp(-2 * j * j * lam * lam)
        total += term
        if abs(term) < 1e-12:
            break
    return min(1.0, max(0.0, total))


def two_proportions(hits_a: int, n_a: int, hits_b: int, n_b: int) -> float:
    """Two-sided p-value of a pooled two-proportion z-test (rates a and b equal?)."""
    pooled = (hits_a + hits_b) / (n_a + n_b)
    spread = math.sqrt(pooled * (1 - pooled) * (1 / n_a + 1 / n_b))
    if spread == 0:
        return 1.0
    z = abs(hits_a / n_a - hits_b / n_b) / spread
    return math.erfc(z / math.sqrt(2))


def cosine_distance(a: npt.NDArray[np.float32], b: npt.NDArray[np.float32]) -> float:
    """1 - cos of the two row means (centroids)."""
    ca, cb = a.mean(axis=0), b.mean(axis=0)
    norms = float(np.linalg.norm(ca) * np.linalg.norm(cb))
    return 1.0 - float(ca @ cb) / norms if norms else 0.0


# ---------------------------------------------------------------------------- refusals

# Openings that refuse, in the first sentences of an answer: cheap, English only, and meant for a rate
# that moves, not for judging one answer.
_REFUSAL = re.compile(
    r"\b(?:i(?:'m| am)\s+(?:sorry|afraid)\b.{0,40}\b(?:can(?:not|'t)|unable|won't)"
    r"|i\s+(?:can(?:not|'t)|won't|will not|am unable to|'m unable to|must decline to)\s+"
    r"(?:help|assist|provide|comply|do that|fulfil|fulfill|answer|support|share|create|write|generate)"
    r"|as an ai(?: language model)?,? i (?:can(?:not|'t)|don't|do not|am not able))",
    re.IGNORECASE,
)


def answer_text(output: Any) -> str | None:
    """The text of a logged answer message (None: nothing logged, or no text: a tool call)."""
    if not isinstance(output, dict):
        return None
    content = output.get("content")
    if isinstance(content, list):
        content = "".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
    return content if isinstance(content, str) else None


def is_refusal(output: Any) -> bool:
    """An answer that refuses: the message's own `refusal`, or refusing words near its start."""
    if isinstance(output, dict) and output.get("refusal"):
        return True
    text = answer_text(output)
    return text is not None and _REFUSAL.search(text[:300]) is not None


# ---------------------------------------------------------------------------- the report


@dataclass(frozen=True, slots=True)
class MetricDrift:
    """One row: a metric of one model (and deployment) in the window against the baseline."""

    model: str
    deployment: str  # ALL_DEPLOYMENTS: the model's calls on every deployment
    metric: str
    window: float | str | None
    baseline: float | str | None
    statistic: str  # e.g. "PSI 0.31, KS p=0.0002"
    verdict: Verdict
    window_n: int = 0
    baseline_n: int = 0
    note: str = ""

    @property
    def key(self) -> str:
        return f"{self.model}|{self.deployment}|{self.metric}"

    def as_json(self) -> dict[str, Any]:
        return {"model": self.model, "deployment": self.deployment, "metric": self.metric, "window": self.window,
                "baseline": self.baseline, "statistic": self.statistic, "verdict": self.verdict,
                "window_n": self.window_n, "baseline_n": self.baseline_n, "note": self.note}


@dataclass(slots=True)
class DriftReport:
    window: tuple[float, float]
    baseline: tuple[float, float]
    rows: list[MetricDrift] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    label: str | None = None  # how the windows were asked for: "1h against the 7d before"

    @property
    def drifted(self) -> list[MetricDrift]:
        return [row for row in self.rows if row.verdict == "drift"]

    def as_json(self) -> dict[str, Any]:
        return {
            "window": {"since": _iso(self.window[0]), "until": _iso(self.window[1])},
            "baseline": {"since": _iso(self.baseline[0]), "until": _iso(self.baseline[1])},
            "drift": bool(self.drifted),
            "rows": [row.as_json() for row in self.rows],
            "notes": self.notes,
        }


COLUMNS = ("started_at", "model", "deployment", "feature", "outcome", "completion_tokens", "latency_ms", "cost_usd",
           "upstream_model", "system_fingerprint", "output", "metadata")


def load_calls(store: RecordStore, since: float, until: float, model: str | None = None) -> list[dict[str, Any]]:
    """The chat calls that started in [since, until), with only the columns drift reads."""
    wanted = [requests.c[name] for name in COLUMNS]
    query = select(*wanted).where(
        requests.c.started_at >= since, requests.c.started_at < until, requests.c.endpoint == "chat",
    )
    if model is not None:
        query = query.where(requests.c.model == model)
    with store.connection() as conn:
        return [dict(row) for row in conn.execute(query).mappings()]


def build_drift(
    store: RecordStore, *, window: tuple[float, float], baseline: tuple[float, float], model: str | None = None,
    thresholds: Thresholds | None = None, embed: Embed | None = None, label: str | None = None,
) -> DriftReport:
    """Compare the calls of `window` with those of `baseline` (each [since, until), unix seconds), and the
    online judge's scores of those calls."""
    scores = OnlineScores(store)
    notes = []
    try:
        judged: tuple[list[OnlineScore], list[OnlineScore]] | None = (
            scores.load(*baseline, model), scores.load(*window, model))
    except StoreError as exc:
        judged, notes = None, [f"judge scores not read: {exc}"]
    report = compare_calls(
        load_calls(store, *baseline, model), load_calls(store, *window, model),
        window=window, baseline=baseline, thresholds=thresholds, embed=embed, label=label, judged=judged,
    )
    report.notes += notes
    return report


def compare_calls(
    baseline_calls: list[dict[str, Any]], window_calls: list[dict[str, Any]], *, window: tuple[float, float],
    baseline: tuple[float, float], thresholds: Thresholds | None = None, embed: Embed | None = None,
    label: str | None = None, judged: tuple[Sequence[OnlineScore], Sequence[OnlineScore]] | None = None,
) -> DriftReport:
    """The report of two sets of request-log rows (dicts keyed by column), and of the online judge's scores
    of the baseline's and the window's calls (`judged`)."""
    limits = thresholds or Thresholds()
    report = DriftReport(window, baseline, label=label)
    content = any(row.get("output") is not None for row in (*baseline_calls, *window_calls))
    if not content and (baseline_calls or window_calls):
        report.notes.append("no answer text in the log (store.log_content is off): refusal rate, answer "
                            "centroid and canary answers are skipped")
    if content and embed is None:
        report.notes.append("answer centroid skipped: no local embedder (install keel[local])")
    scored = _groups(*(_score_rows(side) for side in judged)) if judged else {}
    groups = _groups(baseline_calls, window_calls)
    for key in sorted(groups.keys() | scored.keys()):
        name, deployment = key
        base, new = groups.get(key, ([], []))
        if base or new:
            report.rows += _compare(name, deployment, base, new, limits, embed if content else None, content)
        if key in scored:
            base_scores, new_scores = scored[key]
            report.rows.append(_RowMaker(name, deployment, limits).judge_score(
                [r["value"] for r in base_scores], [r["value"] for r in new_scores]))
    return report


# The metrics a drift chart draws: a number per window (medians of distributions, rates).
CHARTED = ("output tokens", "latency ms", "cost per call", "error rate", "refusal rate")
RATES = ("error rate", "refusal rate")
MAX_CHART_BUCKETS = 24  # each bucket is a comparison with the whole baseline


@dataclass(frozen=True, slots=True)
class DriftLine:
    """One metric of one model over time: each bucket's value against the baseline's, with the
    band outside which a move is big enough to be drift (`Thresholds.min_relative_change` of the
    baseline median for a distribution, `min_rate_change` for a rate; none of them goes below 0)
    and each bucket's verdict
    (an alert where it is "drift"; a move must also be significant to be one)."""

    model: str
    metric: str
    baseline: float | None
    low: float | None
    high: float | None
    values: list[float | None]
    verdicts: list[Verdict]
    n: list[int]

    def as_json(self) -> dict[str, Any]:
        return {"model": self.model, "metric": self.metric, "baseline": self.baseline, "low": self.low,
                "high": self.high, "values": self.values, "verdicts": self.verdicts, "n": self.n,
                "alerts": [v == "drift" for v in self.verdicts]}


@dataclass(slots=True)
class DriftSeries:
    window: tuple[float, float]
    baseline: tuple[float, float]
    step_s: int
    starts: list[int]
    lines: list[DriftLine]

    def as_json(self) -> dict[str, Any]:
        return {"window": {"since": self.window[0], "until": self.window[1]},
                "baseline": {"since": self.baseline[0], "until": self.baseline[1]}, "step_s": self.step_s,
                "t": self.starts, "lines": [line.as_json() for line in self.lines]}


def chart_step(since: float, until: float, steps: Sequence[int]) -> int:
    """The first of `steps` (seconds, ascending) whose buckets (aligned to multiples of the step, the
    partial ones at the ends included) cover [since, until) in at most MAX_CHART_BUCKETS."""
    for step in steps:
        if math.ceil(until / step) - math.floor(since / step) <= MAX_CHART_BUCKETS:
            return step
    return steps[-1]


def drift_series(
    store: RecordStore, *, window: tuple[float, float], baseline: tuple[float, float], step_s: int,
    model: str | None = None, thresholds: Thresholds | None = None,
) -> DriftSeries:
    """Drift over time: the window cut into buckets of `step_s`, each compared with the baseline
    as `keel drift` compares a window (`compare_calls`, without the embedder and judge scores);
    the charted metrics of each model over all its deployments."""
    limits = thresholds or Thresholds()
    base, new = load_calls(store, *baseline, model), load_calls(store, *window, model)
    first = int(window[0] // step_s * step_s)
    starts = list(range(first, math.ceil(window[1]), step_s))
    by_bucket: dict[int, list[dict[str, Any]]] = {start: [] for start in starts}
    for call in new:
        by_bucket[int(float(call["started_at"]) // step_s * step_s)].append(call)
    cells: dict[tuple[str, str], list[MetricDrift | None]] = {}
    for i, start in enumerate(starts):
        part = (max(float(start), window[0]), min(float(start + step_s), window[1]))
        report = compare_calls(base, by_bucket[start], window=part, baseline=baseline, thresholds=limits)
        for row in report.rows:
            if row.deployment == ALL_DEPLOYMENTS and row.metric in CHARTED:
                cells.setdefault((row.model, row.metric), [None] * len(starts))[i] = row
    overall = {(row.model, row.metric): row for row in compare_calls(
        base, new, window=window, baseline=baseline, thresholds=limits).rows if row.deployment == ALL_DEPLOYMENTS}
    lines = []
    for (name, metric), found in sorted(cells.items(), key=lambda item: (item[0][0], CHARTED.index(item[0][1]))):
        whole = overall.get((name, metric))
        was = whole.baseline if whole is not None and isinstance(whole.baseline, float) else None
        if was is None:
            was = next((c.baseline for c in found if c is not None and isinstance(c.baseline, float)), None)
        band = limits.min_rate_change if metric in RATES else abs(was or 0.0) * limits.min_relative_change
        lines.append(DriftLine(
            name, metric, was, None if was is None else max(0.0, was - band), None if was is None else was + band,
            [c.window if c is not None and isinstance(c.window, float) else None for c in found],
            [c.verdict if c is not None else "not enough data" for c in found],
            [c.window_n if c is not None else 0 for c in found],
        ))
    return DriftSeries(window, baseline, step_s, starts, lines)


def _score_rows(scores: Sequence[OnlineScore]) -> list[dict[str, Any]]:
    """The scored verdicts as rows `_groups` reads (a verdict without a value, unscored, is left out)."""
    return [{"model": s.model, "deployment": s.deployment, "value": s.value} for s in scores if s.value is not None]


def _groups(
    baseline_calls: list[dict[str, Any]], window_calls: list[dict[str, Any]],
) -> dict[tuple[str, str], tuple[list[dict[str, Any]], list[dict[str, Any]]]]:
    """Rows by (model, "*"), and by (model, deployment) for a model whose calls went to several."""
    groups: dict[tuple[str, str], tuple[list[dict[str, Any]], list[dict[str, Any]]]] = {}
    deployments: dict[str, set[str]] = {}
    for side, calls in enumerate((baseline_calls, window_calls)):
        for row in calls:
            name = row.get("model") or "(no model)"
            groups.setdefault((name, ALL_DEPLOYMENTS), ([], []))[side].append(row)
            if row.get("deployment"):
                deployments.setdefault(name, set()).add(row["deployment"])
    for name, used in deployments.items():
        if len(used) < 2:
            continue
        for side, calls in enumerate((baseline_calls, window_calls)):
            for row in calls:
                if (row.get("model") or "(no model)") == name and row.get("deployment"):
                    groups.setdefault((name, row["deployment"]), ([], []))[side].append(row)
    return dict(sorted(groups.items()))


def _live(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [row for row in rows if not (row.get("feature") or "").startswith(OWN_FEATURES)]


def _compare(
    model: str, deployment: str, base: list[dict[str, Any]], new: list[dict[str, Any]], limits: Thresholds,
    embed: Embed | None, content: bool,
) -> list[MetricDrift]:
    row = _RowMaker(model, deployment, limits)
    live_base, live_new = _live(base), _live(new)
    ok_base = [r for r in live_base if r["outcome"] == "ok"]
    ok_new = [r for r in live_new if r["outcome"] == "ok"]
    rows = [
        row.distribution("output tokens", [r["completion_tokens"] for r in ok_base],
                         [r["completion_tokens"] for r in ok_new]),
        row.distribution("latency ms", [r["latency_ms"] for r in ok_base], [r["latency_ms"] for r in ok_new]),
        row.distribution("cost per call", [r["cost_usd"] for r in ok_base], [r["cost_usd"] for r in ok_new]),
        row.rate("error rate", [r["outcome"] == "error" for r in live_base if r["outcome"] in ("ok", "error")],
                 [r["outcome"] == "error" for r in live_new if r["outcome"] in ("ok", "error")]),
    ]
    if content:
        rows.append(row.rate("refusal rate", [is_refusal(r.get("output")) for r in ok_base],
                             [is_refusal(r.get("output")) for r in ok_new]))
        if embed is not None:
            rows.append(row.centroid(ok_base, ok_new, embed))
    answered_base = [r for r in base if r["outcome"] == "ok"]
    answered_new = [r for r in new if r["outcome"] == "ok"]
    rows += [row.new_values(name, answered_base, answered_new) for name in ("upstream_model", "system_fingerprint")]
    canary_base = [r for r in answered_base if r.get("feature") == CANARY_FEATURE]
    canary_new = [r for r in answered_new if r.get("feature") == CANARY_FEATURE]
    if content and (canary_base or canary_new):
        rows.append(row.canaries(canary_base, canary_new))
    return rows


@dataclass(frozen=True, slots=True)
class _RowMaker:
    model: str
    deployment: str
    limits: Thresholds

    def _row(self, metric: str, window: float | str | None, baseline: float | str | None, statistic: str,
             verdict: Verdict, n: tuple[int, int], note: str = "") -> MetricDrift:
        return MetricDrift(self.model, self.deployment, metric, window, baseline, statistic, verdict,
                           window_n=n[1], baseline_n=n[0], note=note)

    def _too_few(self, metric: str, base: Sequence[object], new: Sequence[object], least: int) -> MetricDrift | None:
        if len(base) >= least and len(new) >= least:
            return None
        return self._row(metric, None, None, "", "not enough data", (len(base), len(new)),
                         f"needs {least} a side, has {len(new)} in the window and {len(base)} in the baseline")

    def distribution(self, metric: str, base: list[float], new: list[float]) -> MetricDrift:
        if (few := self._too_few(metric, base, new, self.limits.min_samples)) is not None:
            return few
        # PSI's own noise grows with bins over samples (about (bins-1)(1/n1+1/n2) between two samples of one
        # distribution): about 10 calls a bin at least, so a small sample does not look shifted.
        index = psi(base, new, max(2, min(self.limits.bins, min(len(base), len(new)) // 10)))
        d, p = ks_2samp(base, new)
        limits = self.limits
        effect = _relative_change(base, new)
        verdict: Verdict = (
            "drift" if index > limits.psi_drift and p < limits.ks_p and effect >= limits.min_relative_change
            else "watch" if (index > limits.psi_watch and p < 0.05) or p < limits.ks_p else "ok"
        )
        return self._row(metric, float(np.median(new)), float(np.median(base)),
                         f"PSI {index:.3f}, KS D={d:.3f} p={_p(p)}", verdict, (len(base), len(new)), "medians")

    def rate(self, metric: str, base: list[bool], new: list[bool]) -> MetricDrift:
        if (few := self._too_few(metric, base, new, self.limits.min_samples)) is not None:
            return few
        hits_b, hits_n = sum(base), sum(new)
        rate_b, rate_n = hits_b / len(base), hits_n / len(new)
        p = two_proportions(hits_b, len(base), hits_n, len(new))
        big = abs(rate_n - rate_b) >= self.limits.min_rate_change
        verdict: Verdict = "drift" if p < self.limits.rate_p and big else "watch" if p < 0.05 and big else "ok"
        return self._row(metric, rate_n, rate_b, f"z-test p={_p(p)}", verdict, (len(base), len(new)))

    def centroid(self, base: list[dict[str, Any]], new: list[dict[str, Any]], embed: Embed) -> MetricDrift:
        texts_b, texts_n = _texts(base), _texts(new)
        metric = "answer centroid"
        if (few := self._too_few(metric, texts_b, texts_n, self.limits.min_samples)) is not None:
            return few
        try:
            distance = cosine_distance(embed(_sample(texts_b)), embed(_sample(texts_n)))
        except Exception as exc:  # an embedder failure skips this one metric, not the report
            log.warning("drift: the answers could not be embedded (%r); the centroid is skipped", exc)
            return self._row(metric, None, None, "", "skipped", (len(texts_b), len(texts_n)), f"embedder failed: {exc}")
        limits = self.limits
        verdict: Verdict = (
            "drift" if distance > limits.centroid_drift else "watch" if distance > limits.centroid_watch else "ok"
        )
        return self._row(metric, None, None, f"cosine distance {distance:.3f}", verdict, (len(texts_b), len(texts_n)))

    def judge_score(self, base: list[float], new: list[float]) -> MetricDrift:
        """A pass/fail judge (every score 0 or 1): its pass rate; a graded one: its scores' distribution."""
        metric = "judge score"
        if set(base) | set(new) <= {0.0, 1.0}:
            return replace(self.rate(metric, [v == 1.0 for v in base], [v == 1.0 for v in new]), note="pass rate")
        row = self.distribution(metric, base, new)
        if row.verdict == "not enough data":
            return row
        return replace(row, window=float(np.mean(new)), baseline=float(np.mean(base)), note="means")

    def new_values(self, column: str, base: list[dict[str, Any]], new: list[dict[str, Any]]) -> MetricDrift:
        seen_b = {r[column] for r in base if r.get(column)}
        seen_n = {r[column] for r in new if r.get(column)}
        n = (len(base), len(new))
        if not seen_b or not seen_n:
            verdict: Verdict = "not enough data" if not (base and new) or seen_b or seen_n else "ok"
            note = "" if verdict == "ok" else "no value on one side"
            return self._row(column, _listed(seen_n), _listed(seen_b), "", verdict, n, note)
        fresh = sorted(seen_n - seen_b)
        return self._row(column, _listed(seen_n), _listed(seen_b), f"new: {', '.join(fresh)}" if fresh else "",
                         "drift" if fresh else "ok", n)

    def canaries(self, base: list[dict[str, Any]], new: list[dict[str, Any]]) -> MetricDrift:
        metric = "canary answers"
        known: dict[str, set[str]] = {}
        for r in base:
            if (text := answer_text(r.get("output"))) is not None:
                known.setdefault(_canary_id(r), set()).add(text)
        compared = [(r, text) for r in new if (text := answer_text(r.get("output"))) is not None
                    and _canary_id(r) in known]
        if (few := self._too_few(metric, list(known), compared, self.limits.min_canaries)) is not None:
            return replace(few, note=few.note.replace("a side", "canary answers a side"))
        changed = sum(text not in known[_canary_id(r)] for r, text in compared)
        share = changed / len(compared)
        verdict: Verdict = "drift" if share >= self.limits.canary_change else "watch" if changed else "ok"
        return self._row(metric, share, 0.0, f"{changed}/{len(compared)} answers never given before", verdict,
                         (len(base), len(compared)), "share changed")


def canary_id(prompt: str) -> str:
    """The stable id of a canary prompt (kept in the call's metadata, logged even without content)."""
    return hashlib.sha256(prompt.encode()).hexdigest()[:12]


def _canary_id(row: dict[str, Any]) -> str:
    return str((row.get("metadata") or {}).get("canary", ""))


def _texts(rows: list[dict[str, Any]]) -> list[str]:
    return [text[:MAX_EMBEDDED_CHARS] for r in rows if (text := answer_text(r.get("output")))]


def _sample(texts: list[str]) -> list[str]:
    if len(texts) <= MAX_EMBEDDED:
        return texts
    chosen = np.random.default_rng(0).choice(len(texts), MAX_EMBEDDED, replace=False)
    return [texts[i] for i in sorted(chosen)]


def _relative_change(base: list[float], new: list[float]) -> float:
    """The larger relative move of the median and of the 90th percentile (0 when both are 0 before)."""
    moves = []
    for q in (50, 90):
        before, after = float(np.percentile(base, q)), float(np.percentile(new, q))
        moves.append(abs(after - before) / abs(before) if before else (0.0 if after == before else math.inf))
    return max(moves)


def _listed(values: Iterable[str]) -> str | None:
    ordered = sorted(values)
    if not ordered:
        return None
    return ", ".join(ordered[:3]) + (f" (+{len(ordered) - 3})" if len(ordered) > 3 else "")


def _p(p: float) -> str:
    return f"{p:.2g}" if p >= 1e-4 else "<1e-4"


def _iso(unix: float) -> str:
    return datetime.fromtimestamp(unix, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


# ---------------------------------------------------------------------------- output

HEADERS = ("model", "metric", "window", "baseline", "statistic", "verdict")
_STYLE = {"drift": "bold red", "watch": "yellow", "ok": "green", "not enough data": "dim", "skipped": "dim"}


def _cells(row: MetricDrift) -> list[str]:
    where = row.model if row.deployment == ALL_DEPLOYMENTS else f"{row.model} / {row.deployment}"
    statistic = row.statistic or row.note
    return [where, row.metric, _value(row.metric, row.window), _value(row.metric, row.baseline), statistic, row.verdict]


def _value(metric: str, value: float | str | None) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, str):
        return value
    if metric.endswith("rate") or metric == "canary answers":
        return f"{value * 100:.1f}%"
    if metric == "judge score":
        return f"{value:.2f}"
    if metric == "cost per call":
        return f"${value:.6f}".rstrip("0").rstrip(".") if value else "$0"
    return f"{value:,.1f}" if metric == "latency ms" else f"{value:,.0f}"


def _title(report: DriftReport) -> str:
    span = report.label or f"{_iso(report.window[0])} - {_iso(report.window[1])}"
    verdict = f"DRIFT ({len(report.drifted)})" if report.drifted else "no drift"
    return f"Keel drift: {span} ({verdict})"


def render_table(report: DriftReport) -> RenderableType:
    table = Table(title=_title(report), title_justify="left")
    for header in HEADERS:
        table.add_column(header, justify="right" if header in ("window", "baseline") else "left")
    for row in report.rows:
        *cells, verdict = _cells(row)
        table.add_row(*cells, Text(verdict, style=_STYLE[row.verdict]))
    if not report.rows:
        return Group(table, Text("no calls in either window", style="dim"))
    return Group(table, *(Text(note, style="dim") for note in report.notes))


def render_markdown(report: DriftReport) -> str:
    lines = [f"## {_title(report)}", "", "| " + " | ".join(HEADERS) + " |", "|---|---|---:|---:|---|:---:|"]
    for row in report.rows:
        cells = [cell.replace("|", "\\|") for cell in _cells(row)]
        cells[-1] = f"**{cells[-1]}**" if row.verdict == "drift" else cells[-1]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines + [""] + [f"_{note}_" for note in report.notes])


def render_json(report: DriftReport) -> str:
    return orjson.dumps(report.as_json(), option=orjson.OPT_INDENT_2).decode()


# ---------------------------------------------------------------------------- onsets and alerts


class OnsetTracker:
    """What is drifting now, so each onset alerts once: a metric alerts when it turns to drift, and again
    only after a check has seen it back (ok or watch). "Not enough data" changes nothing, so a quiet hour
    does not re-arm it. `path`: a JSON file that keeps the state between runs of `keel drift`."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self.drifting: dict[str, float] = {}  # row key → onset time
        if path is not None and path.exists():
            with contextlib.suppress(ValueError, OSError):
                self.drifting = {str(k): float(v) for k, v in orjson.loads(path.read_bytes()).items()}

    def onsets(self, report: DriftReport, now: float | None = None) -> list[MetricDrift]:
        """The rows that began to drift since the last check; remembers them."""
        now = time.time() if now is None else now
        started = []
        for row in report.rows:
            if row.verdict == "drift" and row.key not in self.drifting:
                self.drifting[row.key] = now
                started.append(row)
            elif row.verdict in ("ok", "watch"):
                self.drifting.pop(row.key, None)
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_bytes(orjson.dumps(self.drifting))
        return started


@dataclass(frozen=True, slots=True)
class DriftAlert:
    row: MetricDrift
    at: float  # the onset, unix seconds

    def payload(self) -> dict[str, Any]:
        """The webhook's JSON body: `kind` tells it from a budget alert; `id` is the same for every try."""
        row = self.row
        return {"id": f"drift:{row.key}:{int(self.at)}", "kind": "drift", "model": row.model,
                "deployment": row.deployment, "metric": row.metric, "window": row.window, "baseline": row.baseline,
                "statistic": row.statistic, "verdict": row.verdict, "at": _iso(self.at)}


class DriftAlertSender(AlertSender):
    """The budget alerts' channel (`alerts:`: logged at WARNING, then POSTed with its retries, and logged
    at ERROR if lost) carrying drift alerts, through `AlertSender.deliver`."""

    def send_drift(self, alert: DriftAlert) -> None:
        row = alert.row
        where = row.model if row.deployment == ALL_DEPLOYMENTS else f"{row.model} / {row.deployment}"
        log.warning("drift alert: %s %s drifted: window %s against baseline %s (%s)", where, row.metric,
                    _value(row.metric, row.window), _value(row.metric, row.baseline), row.statistic)
        label = ("drift", row.model, row.metric)
        self.raised[label] = self.raised.get(label, 0) + 1
        self.deliver(alert)


async def send_onsets(sender: DriftAlertSender, onsets: Sequence[MetricDrift], at: float | None = None,
                      timeout_s: float = 30.0) -> None:
    """Send one alert per onset and wait (up to `timeout_s`) for the webhook to take them."""
    at = time.time() if at is None else at
    await sender.start()
    try:
        for row in onsets:
            sender.send_drift(DriftAlert(row, at))
    finally:
        await sender.stop(timeout_s)


def windows(
    since_s: float, baseline_s: float, now: float | None = None,
) -> tuple[tuple[float, float], tuple[float, float]]:
    """The window (the last `since_s`) and the baseline (the `baseline_s` before it)."""
    now = time.time() if now is None else now
    return (now - since_s, now), (now - since_s - baseline_s, now - since_s)
