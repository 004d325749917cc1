"""Calibrating the semantic cache's threshold on labelled pairs: `keel cache calibrate`.

The cache serves a stored answer when the cosine of the two prompts' vectors is at least the threshold
AND `keel.cache.guards.guard` lets the pair through. Which threshold is safe depends on the embedder and
on the traffic, so it is chosen on pairs labelled by hand: duplicate (the cached answer is right) or not.
For each candidate threshold, "served" is a prediction of "duplicate"; its precision is the share of
served pairs that are duplicates (1 - precision is the rate of wrong answers served), its recall the
share of duplicates served (the hit rate the threshold leaves). The threshold chosen is the lowest one
whose precision with the guards reaches the target: recall only falls as the threshold rises, so the
lowest one keeps the most hits.

Candidates are the thresholds 0.000 to 1.000 in steps of 0.001, the precision a config file holds. The
search (`sweep`, `point_at`, `choose`) is pure and takes scored pairs, so it is tested without a model;
`score_pairs` embeds and runs the guards, `read_pairs` reads the labelled file.

A precision measured on the pairs the threshold was chosen on flatters it: measure it again on pairs
held out (`bench/semantic_calibration.py` does, on MRPC).
"""

from __future__ import annotations

import json
from bisect import bisect_left
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from keel.cache.guards import guard

if TYPE_CHECKING:
    from keel.embedding.model import SentenceEmbedder

__all__ = [
    "THRESHOLDS",
    "Calibration",
    "LabelledPair",
    "OperatingPoint",
    "PairsFileError",
    "ScoredPair",
    "calibrate",
    "choose",
    "point_at",
    "read_pairs",
    "score_pairs",
    "sweep",
]

THRESHOLDS: tuple[float, ...] = tuple(i / 1000 for i in range(1001))
BATCH_SIZE = 64
# Accepted spellings of each field, first the documented one.
_QUERY_KEYS = ("query", "a")
_CACHED_KEYS = ("cached", "b")
_LABEL_KEYS = ("duplicate", "label")
_SHAPE = '{"query": "...", "cached": "...", "duplicate": true|false}'


class PairsFileError(ValueError):
    """A labelled-pairs file that cannot be read; the message names the file, the line and the fix."""


@dataclass(frozen=True, slots=True)
class LabelledPair:
    """A new prompt, a stored prompt, and whether the stored prompt's answer is right for the new one."""

    query: str
    cached: str
    duplicate: bool


@dataclass(frozen=True, slots=True)
class ScoredPair:
    """A labelled pair's cosine and the guard that refuses it (None: the guards let it through)."""

    cosine: float
    duplicate: bool
    refused_by: str | None = None


@dataclass(frozen=True, slots=True)
class OperatingPoint:
    """What a threshold serves: `served_true` duplicates and `served_false` non-duplicates, out of
    `duplicates` duplicates in the set. Precision is None when nothing is served."""

    threshold: float
    served_true: int
    served_false: int
    duplicates: int

    @property
    def served(self) -> int:
        return self.served_true + self.served_false

    @property
    def precision(self) -> float | None:
        return self.served_true / self.served if self.served else None

    @property
    def recall(self) -> float:
        return self.served_true / self.duplicates if self.duplicates else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "threshold": self.threshold, "precision": self.precision, "recall": self.recall,
            "served_true": self.served_true, "served_false": self.served_false, "duplicates": self.duplicates,
        }


@dataclass(frozen=True, slots=True)
class Calibration:
    """The outcome of a search for `target` precision.

    `threshold` is the lowest candidate whose precision with the guards reaches the target, None when
    none does; `guarded` and `unguarded` are that threshold's figures with and without the guards (at
    `best_guarded.threshold` when the target is not reached). `best_guarded` is the highest precision with
    the guards over all candidates (lowest threshold among ties); `threshold_alone` is the lowest
    threshold at which the cosine alone reaches the target, None when it never does. `refused` counts,
    per guard, the pairs above the threshold it turned away, as (duplicates, non-duplicates)."""

    target: float
    pairs: int
    duplicates: int
    threshold: float | None
    guarded: OperatingPoint
    unguarded: OperatingPoint
    best_guarded: OperatingPoint
    threshold_alone: OperatingPoint | None
    refused: dict[str, tuple[int, int]] = field(default_factory=dict)

    @property
    def reached(self) -> bool:
        return self.threshold is not None

    def to_dict(self) -> dict[str, Any]:
        return {
            "target_precision": self.target, "reached": self.reached, "threshold": self.threshold,
            "pairs": self.pairs, "duplicates": self.duplicates,
            "with_guards": self.guarded.to_dict(), "without_guards": self.unguarded.to_dict(),
            "best_with_guards": self.best_guarded.to_dict(),
            "threshold_alone": self.threshold_alone.to_dict() if self.threshold_alone else None,
            "refused_by_guard": {
                name: {"duplicates": dup, "non_duplicates": non} for name, (dup, non) in self.refused.items()
            },
        }


# -- reading ------------------------------------------------------------------------------------------


def _field(record: dict[str, Any], keys: tuple[str, ...], where: str) -> Any:
    for key in keys:
        if key in record:
            return record[key]
    spelled = " or ".join(f'"{k}"' for k in keys)
    raise PairsFileError(f"{where}: missing {spelled}; each line is {_SHAPE}")


def _label(value: Any, where: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):  # MRPC's Quality column spells the label 0/1
        return bool(value)
    raise PairsFileError(f"{where}: the label must be true or false (or 1 or 0), not {json.dumps(value)}")


def parse_pair(line: str, where: str) -> LabelledPair:
    """One JSONL line; `where` ("pairs.jsonl line 3") prefixes any error."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise PairsFileError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(record, dict):
        raise PairsFileError(f"{where}: expected a JSON object, got {type(record).__name__}")
    texts = []
    for keys in (_QUERY_KEYS, _CACHED_KEYS):
        text = _field(record, keys, where)
        if not isinstance(text, str) or not text.strip():
            raise PairsFileError(f'{where}: "{keys[0]}" must be a non-empty string, not {json.dumps(text)}')
        texts.append(text)
    return LabelledPair(texts[0], texts[1], _label(_field(record, _LABEL_KEYS, where), where))


def read_pairs(path: Path) -> list[LabelledPair]:
    """The labelled pairs of a JSONL file (blank lines skipped); at least one duplicate is required,
    since precision and recall of "served" mean nothing without one."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise PairsFileError(f"cannot read the pairs file {path}: {exc}") from None
    pairs = [
        parse_pair(line, f"{path} line {number}")
        for number, line in enumerate(text.splitlines(), start=1)
        if line.strip()
    ]
    if not any(p.duplicate for p in pairs):
        raise PairsFileError(
            f"{path} holds no pair labelled duplicate ({len(pairs)} pairs read): recall cannot be measured; "
            "add pairs whose cached answer is right for the query"
        )
    return pairs


# -- scoring ------------------------------------------------------------------------------------------


def score_pairs(
    pairs: Sequence[LabelledPair], embedder: SentenceEmbedder, *, batch_size: int = BATCH_SIZE,
    progress: bool = True,
) -> list[ScoredPair]:
    """Embed every distinct text once, in batches (a progress bar on stderr), and run the guards."""
    import numpy as np
    from rich.console import Console
    from rich.progress import Progress

    texts = list(dict.fromkeys(t for p in pairs for t in (p.query, p.cached)))
    vectors = np.empty((len(texts), embedder.dimensions), dtype=np.float32)
    with Progress(console=Console(stderr=True), transient=True, disable=not progress) as bar:
        task = bar.add_task("embedding", total=len(texts))
        for start in range(0, len(texts), batch_size):
            batch = texts[start : start + batch_size]
            vectors[start : start + len(batch)] = embedder.encode(batch).array
            bar.advance(task, len(batch))
    row = {text: i for i, text in enumerate(texts)}
    scored = []
    for p in pairs:
        cosine = float(np.dot(vectors[row[p.query]], vectors[row[p.cached]]))
        scored.append(ScoredPair(cosine, p.duplicate, guard(p.query, p.cached).reason))
    return scored


# -- the search ---------------------------------------------------------------------------------------


def sweep(
    scored: Sequence[ScoredPair], *, guarded: bool, thresholds: Sequence[float] = THRESHOLDS
) -> list[OperatingPoint]:
    """Every threshold's operating point: served when cosine >= threshold (and, if `guarded`, the
    guards let the pair through)."""
    kept = [s for s in scored if not (guarded and s.refused_by is not None)]
    true_cos = sorted(s.cosine for s in kept if s.duplicate)
    false_cos = sorted(s.cosine for s in kept if not s.duplicate)
    duplicates = sum(s.duplicate for s in scored)
    return [
        OperatingPoint(
            t, len(true_cos) - bisect_left(true_cos, t), len(false_cos) - bisect_left(false_cos, t), duplicates
        )
        for t in thresholds
    ]


def point_at(scored: Sequence[ScoredPair], threshold: float, *, guarded: bool) -> OperatingPoint:
    """One threshold's operating point (to measure a chosen threshold on held-out pairs)."""
    return sweep(scored, guarded=guarded, thresholds=(threshold,))[0]


def _lowest_reaching(points: list[OperatingPoint], target: float) -> OperatingPoint | None:
    return next((p for p in points if p.precision is not None and p.precision >= target), None)


def choose(
    scored: Sequence[ScoredPair], target: float, *, thresholds: Sequence[float] = THRESHOLDS
) -> Calibration:
    """The lowest threshold whose precision with the guards reaches `target`, and its figures."""
    if not 0 < target <= 1:
        raise ValueError(f"the target precision must be above 0 and at most 1, not {target}")
    if not any(s.duplicate for s in scored):
        raise ValueError("no pair is labelled duplicate: recall cannot be measured")
    ordered = sorted(thresholds)
    with_guards = sweep(scored, guarded=True, thresholds=ordered)
    without = sweep(scored, guarded=False, thresholds=ordered)
    served = [p for p in with_guards if p.precision is not None]
    if served:
        best = max(served, key=lambda p: (p.precision, -p.threshold))
    else:  # the guards refuse every pair at every candidate
        best = with_guards[0]
    chosen = _lowest_reaching(with_guards, target)
    at = chosen or best
    refused: Counter[tuple[str, bool]] = Counter(
        (s.refused_by, s.duplicate) for s in scored if s.refused_by is not None and s.cosine >= at.threshold
    )
    names = sorted({name for name, _ in refused})
    return Calibration(
        target=target,
        pairs=len(scored),
        duplicates=sum(s.duplicate for s in scored),
        threshold=chosen.threshold if chosen else None,
        guarded=at,
        unguarded=without[ordered.index(at.threshold)],
        best_guarded=best,
        threshold_alone=_lowest_reaching(without, target),
        refused={name: (refused[(name, True)], refused[(name, False)]) for name in names},
    )


def calibrate(
    pairs: Sequence[LabelledPair], target: float, embedder: SentenceEmbedder | None = None, *,
    batch_size: int = BATCH_SIZE, progress: bool = True, quantize: bool = True,
) -> Calibration:
    """Score `pairs` with `embedder` (default: the local all-MiniLM-L6-v2, quantized as keel.yaml's
    `embedder.quantize` says) and `choose` a threshold."""
    if embedder is None:
        from keel.embedding.model import load_embedder

        embedder = load_embedder(quantize=quantize)
    return choose(score_pairs(pairs, embedder, batch_size=batch_size, progress=progress), target)
