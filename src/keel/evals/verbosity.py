"""Verbosity control: does the judge reward length rather than quality?

Two figures for a report: the correlation between judge score and answer length (Pearson on the values,
Spearman on their ranks, so one very long answer cannot make the figure alone), and, for pairwise
comparisons, a length-controlled win rate: the win rate the judge would give at equal lengths.

The length-controlled win rate is a logistic regression of the outcome (1 when B wins, 0 when A wins,
0.5 for a tie: a fractional outcome under the same likelihood) on the length difference, reported as
sigmoid(intercept), the predicted win rate at zero difference. Chosen over a stratified estimate by
length-difference bins because bins split a few hundred pairs into small noisy groups, and the bin at
zero difference, the one wanted, is often nearly empty; the regression borrows strength from every pair.
The difference enters as tanh(d / s), with s the spread of the differences, so a few huge answers do not
set the slope (AlpacaEval's length-controlled win rate bounds it the same way). A small ridge penalty on
the slope keeps the fit finite when length separates wins perfectly (the longer answer always wins), the
very case it must handle: the slope then takes the wins, and the intercept stays near a half.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

Floats = NDArray[np.float64]


def pearson(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Pearson's r; None under two points or when either side does not vary (r is undefined)."""
    a, b = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"pearson: {a.size} values against {b.size}")
    if a.size < 2:
        return None
    a, b = a - a.mean(), b - b.mean()
    norm = float(np.sqrt((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / norm) if norm > 0 else None


def ranks(values: Sequence[float]) -> Floats:
    """1-based ranks, ties given their average rank (as Spearman's rho needs)."""
    data = np.asarray(values, dtype=np.float64)
    order = np.argsort(data, kind="stable")
    ranked = np.empty(data.size, dtype=np.float64)
    ranked[order] = np.arange(1, data.size + 1, dtype=np.float64)
    _, inverse, counts = np.unique(data, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranked)
    averaged: Floats = sums[inverse] / counts[inverse]
    return averaged


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman's rho: Pearson's r of the ranks."""
    if len(x) != len(y):
        raise ValueError(f"spearman: {len(x)} values against {len(y)}")
    return pearson(list(ranks(x)), list(ranks(y))) if len(x) >= 2 else None


@dataclass(frozen=True, slots=True)
class LengthCorrelation:
    n: int
    pearson: float | None
    spearman: float | None


def score_length_correlation(scores: Sequence[float | None], lengths: Sequence[int]) -> LengthCorrelation:
    """The correlation of judge scores with answer lengths, over the cases the judge scored."""
    pairs = [(s, n) for s, n in zip(scores, lengths, strict=True) if s is not None]
    x, y = [float(s) for s, _ in pairs], [float(n) for _, n in pairs]
    return LengthCorrelation(len(pairs), pearson(x, y), spearman(x, y))


@dataclass(frozen=True, slots=True)
class LengthControlled:
    n: int
    raw_win_rate: float | None  # B's share of wins, ties as half
    win_rate: float | None  # the same at equal lengths: sigmoid(intercept)
    slope: float | None  # the pull of length: > 0 when the longer answer tends to win


def length_controlled_win_rate(outcomes: Sequence[float], length_diffs: Sequence[float], *,
                               ridge: float = 1.0, iterations: int = 100) -> LengthControlled:
    """B's win rate at equal lengths (the module's docstring), from each pair's outcome for B (1, 0.5 or
    0) and its length difference (len B - len A)."""
    y = np.asarray(outcomes, dtype=np.float64)
    d = np.asarray(length_diffs, dtype=np.float64)
    if y.shape != d.shape:
        raise ValueError(f"length_controlled_win_rate: {y.size} outcomes against {d.size} length differences")
    if y.size == 0:
        return LengthControlled(0, None, None, None)
    spread = float(np.std(d))
    z = np.tanh(d / spread) if spread > 0 else np.zeros_like(d)
    design = np.column_stack([np.ones_like(z), z])
    penalty = np.diag([1e-4, ridge])  # a trace on the intercept keeps it finite when one side wins every pair
    beta = np.zeros(2)
    for _ in range(iterations):
        p = _sigmoid(design @ beta)
        gradient = design.T @ (p - y) + penalty @ beta
        hessian = (design * (p * (1 - p))[:, None]).T @ design + penalty
        step = np.linalg.solve(hessian, gradient)
        beta = beta - step
        if float(np.abs(step).max()) < 1e-9:
            break
    return LengthControlled(int(y.size), float(y.mean()), float(_sigmoid(beta[:1])[0]),
                            float(beta[1]) if spread > 0 else None)


def _sigmoid(t: Floats) -> Floats:
    out: Floats = np.exp(-np.logaddexp(0.0, -t))  # 1 / (1 + e^-t) without overflow
    return out

