"""The semantic cache's threshold, chosen on MRPC's train split (plus hand-made pairs) and measured on held-out pairs.

    .venv/bin/python bench/semantic_calibration.py [--target 0.99] [--source ../shared/data/paraphrase]
                                                   [--no-quantize]

End to end, as `keel cache calibrate` does it: the pairs of bench/calibration_data.py (train: MRPC train
plus half the hand-made near misses and half the chat prompt pairs of tests/data/cache-query-pairs.jsonl;
val: MRPC validation plus the other halves) are embedded with the local
all-MiniLM-L6-v2, the guards run on each pair, the lowest threshold whose precision with the guards
reaches --target on train is chosen, and precision and recall at that threshold are then measured on val,
with and without the guards; likewise the threshold the cosine alone needs. The held-out near misses are
counted on their own: how many a threshold would serve (each a wrong answer). So are the held-out chat
prompt pairs, the closest here to what a cache in front of a chatbot sees: precision and recall with and
without the guards, and per kind the share a threshold serves (of a duplicate kind: recall; of any other
kind: wrong answers), with the wrong answers the guards let through listed.

How representative: MRPC is pairs of news sentences (15-40 words, names, figures and dates everywhere),
labelled paraphrase or not by annotators; a chat cache sees short questions and commands. MRPC's
non-paraphrases are close by construction (the corpus was mined for overlap), which makes it a hard test of
precision; its paraphrases often add or drop a date or a figure, which the guards refuse by design, so
recall with the guards here is lower than on typical prompts. Use the figures as an order of magnitude and
calibrate on your own traffic's pairs for the setting you ship.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

from calibration_data import SHARED, build

from keel.cache.calibrate import LabelledPair, OperatingPoint, ScoredPair, choose, point_at, score_pairs
from keel.embedding.model import load_embedder


def wilson_lower(right: int, served: int, z: float = 1.96) -> float:
    """The lower end of the 95% Wilson interval of a precision: how little `right` of `served` proves."""
    if not served:
        return 0.0
    p = right / served
    centre = p + z * z / (2 * served)
    margin = z * math.sqrt(p * (1 - p) / served + z * z / (4 * served * served))
    return (centre - margin) / (1 + z * z / served)


def line(name: str, point: OperatingPoint) -> str:
    precision = "-" if point.precision is None else f"{point.precision:.1%}"
    low = wilson_lower(point.served_true, point.served)
    return (f"  {name:<28} threshold {point.threshold:.3f}  precision {precision:>6} (95% lower {low:.0%})"
            f"  recall {point.recall:6.1%}  served {point.served_true:,} right, {point.served_false:,} wrong")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", type=float, default=0.99, help="precision with the guards to reach on train")
    parser.add_argument("--source", type=Path, default=SHARED, help="folder holding mrpc-train.tsv, mrpc-val.tsv")
    parser.add_argument("--no-quantize", action="store_true",
                        help="the exact (float) embedder, as keel.yaml's embedder.quantize: false")
    args = parser.parse_args()

    embedder = load_embedder(quantize=not args.no_quantize)
    print(f"embedder: {'exact (float)' if args.no_quantize else 'quantized (the default)'}")
    scored = {}
    for split in ("train", "val"):
        records = build(split, args.source)
        pairs = [LabelledPair(r["query"], r["cached"], r["duplicate"]) for r in records]
        started = time.perf_counter()
        scores = score_pairs(pairs, embedder)
        print(f"{split}: {len(pairs):,} pairs ({sum(p.duplicate for p in pairs):,} duplicates) scored in "
              f"{time.perf_counter() - started:.0f} s")
        scored[split] = (scores, records)

    train, _ = scored["train"]
    result = choose(train, args.target)
    val_all, val_records = scored["val"]
    val = [s for s, r in zip(val_all, val_records, strict=True) if r["source"].startswith("mrpc")]
    near_misses = [s for s, r in zip(val_all, val_records, strict=True) if r["source"].startswith("near-miss")]
    val_near = val + near_misses
    queries = [(s, r) for s, r in zip(val_all, val_records, strict=True) if r["source"].startswith("query:")]

    print(f"\nTarget precision with the guards: {args.target:g}")
    if result.threshold is None:
        best = result.best_guarded
        print(f"Not reached on train; best {best.precision} at {best.threshold:.3f}")
        return
    t = result.threshold
    print(f"Chosen on train: {t:.3f}")
    print(line("train, guards", result.guarded))
    print(line("train, cosine alone", result.unguarded))
    print("Measured on held-out MRPC val:")
    print(line("val, guards", point_at(val, t, guarded=True)))
    print(line("val, cosine alone", point_at(val, t, guarded=False)))
    print(line("val + near misses, guards", point_at(val_near, t, guarded=True)))
    print(line("val + near misses, alone", point_at(val_near, t, guarded=False)))
    if result.threshold_alone is not None:
        alone = result.threshold_alone.threshold
        print(f"The cosine alone reaches the target on train at {alone:.3f}; on val there:")
        print(line("val, cosine alone", point_at(val, alone, guarded=False)))
    served = sum(s.cosine >= t for s in near_misses)
    served_guarded = sum(s.cosine >= t and s.refused_by is None for s in near_misses)
    at_080 = sum(s.cosine >= 0.80 for s in near_misses)
    at_080_guarded = sum(s.cosine >= 0.80 and s.refused_by is None for s in near_misses)
    print(f"Held-out near misses ({len(near_misses)}, all wrong to serve): served at {t:.3f}: {served} alone, "
          f"{served_guarded} with guards; at 0.800: {at_080} alone, {at_080_guarded} with guards")
    print("Lower targets (chosen on train with the guards, measured on MRPC val):")
    for target in (0.98, 0.95, 0.90):
        other = choose(train, target)
        if other.threshold is not None:
            print(line(f"target {target:g}, guards", point_at(val, other.threshold, guarded=True)))
            print(line(f"target {target:g}, alone", point_at(val, other.threshold, guarded=False)))
    print_queries(queries, val_all, t, train)


def print_queries(queries: list[tuple[ScoredPair, dict]], val_all: list[ScoredPair], t: float,
                  train: list[ScoredPair]) -> None:
    """The held-out chat prompt pairs: overall, per kind, and the wrong answers the guards let through."""
    scores = [s for s, _ in queries]
    print(f"Held-out chat prompt pairs ({len(scores)}, {sum(s.duplicate for s in scores)} duplicates) at {t:.3f}:")
    print(line("queries, guards", point_at(scores, t, guarded=True)))
    print(line("queries, cosine alone", point_at(scores, t, guarded=False)))
    print(line("all val (MRPC+near+queries)", point_at(val_all, t, guarded=True)))
    print(line("all val, cosine alone", point_at(val_all, t, guarded=False)))
    for target in (0.98, 0.95, 0.90):
        other = choose(train, target)
        if other.threshold is not None:
            print(line(f"queries, target {target:g}, guards", point_at(scores, other.threshold, guarded=True)))
            print(line(f"queries, target {target:g}, alone", point_at(scores, other.threshold, guarded=False)))
    print(f"Per kind at {t:.3f}, share served (duplicate kinds: recall; others: wrong answers), alone / guards:")
    kinds: dict[str, list[ScoredPair]] = {}
    for s, r in queries:
        kinds.setdefault(r["source"].removeprefix("query:"), []).append(s)
    for kind, group in sorted(kinds.items(), key=lambda item: (not item[1][0].duplicate, item[0])):
        alone = sum(s.cosine >= t for s in group)
        guarded = sum(s.cosine >= t and s.refused_by is None for s in group)
        label = "duplicate" if group[0].duplicate else "not"
        print(f"  {kind:<12} {label:<9} {len(group):>3} pairs  alone {alone / len(group):6.1%}"
              f"  guards {guarded / len(group):6.1%}")
    leaks = [(s, r) for s, r in queries if not s.duplicate and s.cosine >= t and s.refused_by is None]
    print(f"Wrong answers the guards let through at {t:.3f}: {len(leaks)}")
    for s, r in sorted(leaks, key=lambda item: -item[0].cosine):
        print(f"  {s.cosine:.3f} {r['source']}: {r['query']!r} / {r['cached']!r}")


if __name__ == "__main__":
    main()
