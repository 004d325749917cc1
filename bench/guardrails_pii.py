"""The PII and secrets scanner (keel.guardrails.pii): recall and false positives per entity type on
labelled sentences, and latency per KB of the whole scan and of each recognizer.

    .venv/bin/python bench/guardrails_pii.py [--data PATH] [--rounds 5] [--no-compare]

Data: Presidio's synthetic labelled set `presidio-synth-v2.json` (1,500 sentences, from
presidio-research, MIT) in ../shared/data/pii/, else the 329-sentence sample in tests/data.
Its DOMAIN_NAME spans are whole URLs: they count as URL.

Per type:
- recall: labelled spans overlapped by a found entity of the same type;
- covered: labelled spans whose every non-space character is inside some found entity, of any type
  (what redaction needs: nothing of the value goes upstream);
- false positives: found entities of that type overlapping no labelled span of that type, and the
  share of all that type's found entities they are (false discovery rate); the set labels no secrets,
  so a secret found in it is a false positive.
Then what it finds in unlabelled news sentences (MRPC, ../shared/data/paraphrase, else the sample in
tests/data), full of figures, dates and prices: text the patterns were not tuned on; each hit is
printed with an example, to be read (the phone numbers and emails there are reporters' and police
contact lines: real ones).
Types that need an NER model (names, places, organisations...) are listed as not covered.

Latency: the sentences are joined into ~1 KB documents (a prompt-sized text); each document is
scanned `--rounds` times; p50 and p99 of milliseconds per KB, for the whole scan and for each
recognizer alone (its prefilter included). `--no-compare` skips the reference rows: Presidio's
AnalyzerEngine with every recognizer, and its phone and card recognizers.

A figure, not a test: the machine's load moves the latencies; compare within one run.
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from keel.guardrails.pii import NER_ENTITIES, OPTIONAL_ENTITIES, PATTERN_ENTITIES, Entity, PiiScanner
from keel.guardrails.secrets import SECRET_TYPES

ROOT = Path(__file__).resolve().parent.parent
FULL = ROOT.parent / "shared" / "data" / "pii" / "presidio-synth-v2.json"
SAMPLE = ROOT / "tests" / "data" / "pii-sample.jsonl"
NEGATIVES = [ROOT.parent / "shared" / "data" / "paraphrase" / "mrpc-train.tsv",
             ROOT / "tests" / "data" / "paraphrase-sample.tsv"]
GOLD_NAMES = {"DOMAIN_NAME": "URL"}
NER_LABELS = {"PERSON", "STREET_ADDRESS", "GPE", "ORGANIZATION", "DATE_TIME", "TITLE", "AGE", "NRP", "ZIP_CODE"}

Span = tuple[str, int, int]


def load(path: Path) -> list[tuple[str, list[Span]]]:
    if path.suffix == ".jsonl":
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        return [(r["text"], [(GOLD_NAMES.get(s["type"], s["type"]), s["start"], s["end"]) for s in r["spans"]])
                for r in rows]
    rows = json.loads(path.read_text(encoding="utf-8"))
    return [(r["full_text"], [(GOLD_NAMES.get(s["entity_type"], s["entity_type"]), s["start_position"],
                               s["end_position"]) for s in r["spans"]]) for r in rows]


def negatives(paths: list[Path]) -> tuple[Path, list[str]]:
    """News sentences (MRPC): figures, dates and prices, unlabelled, text the patterns were not tuned on."""
    path = next(p for p in paths if p.is_file())
    with path.open(encoding="utf-8-sig") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[1:]
    return path, sorted({text for row in rows if len(row) >= 5 for text in (row[3], row[4])})


def overlaps(a0: int, a1: int, b0: int, b1: int) -> bool:
    return a0 < b1 and b0 < a1


def quality(data: list[tuple[str, list[Span]]], scan: Callable[[str], list[Entity]]) -> dict[str, Counter[str]]:
    stats: dict[str, Counter[str]] = {}
    for text, gold in data:
        found = scan(text)
        for type_, start, end in gold:
            c = stats.setdefault(type_, Counter())
            c["labelled"] += 1
            c["recalled"] += any(e.type == type_ and overlaps(e.start, e.end, start, end) for e in found)
            c["covered"] += all(
                text[i].isspace() or any(e.start <= i < e.end for e in found) for i in range(start, end))
        for e in found:
            c = stats.setdefault(e.type, Counter())
            c["found"] += 1
            c["false"] += not any(t == e.type and overlaps(e.start, e.end, s, t_end) for t, s, t_end in gold)
    return stats


def documents(data: list[tuple[str, list[Span]]], size: int = 1024) -> list[str]:
    docs, current = [], ""
    for text, _ in data:
        current += text + "\n"
        if len(current) >= size:
            docs.append(current)
            current = ""
    return docs


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def latency(docs: list[str], fn: Callable[[str], object], rounds: int) -> tuple[float, float]:
    per_kb = []
    for _ in range(rounds):
        for doc in docs:
            t0 = time.perf_counter()
            fn(doc)
            per_kb.append((time.perf_counter() - t0) * 1000 / (len(doc) / 1024))
    return percentile(per_kb, 0.5), percentile(per_kb, 0.99)


def presidio_references() -> dict[str, Callable[[str], list[Entity]]]:
    """Presidio as documented: the AnalyzerEngine with every pattern recognizer, and its phone and card
    recognizers alone (what Keel's own patterns replace)."""
    import tldextract
    from presidio_analyzer import AnalyzerEngine
    from presidio_analyzer.nlp_engine import NoOpNlpEngine
    from presidio_analyzer.predefined_recognizers import CreditCardRecognizer, PhoneRecognizer

    tldextract.tldextract.TLD_EXTRACTOR = tldextract.TLDExtract(suffix_list_urls=(), cache_dir=None)
    engine = AnalyzerEngine(nlp_engine=NoOpNlpEngine(models=[{"lang_code": "en", "model_name": "none"}]),
                            supported_languages=["en"])
    phone, card = PhoneRecognizer(), CreditCardRecognizer()

    def wrap(results: list[Any]) -> list[Entity]:
        return [Entity(r.entity_type, r.start, r.end, r.score) for r in results if r.score >= 0.4]

    return {
        "Presidio AnalyzerEngine (all pattern recognizers)": lambda t: wrap(engine.analyze(t, language="en")),
        "Presidio PhoneRecognizer": lambda t: wrap(phone.analyze(t, ["PHONE_NUMBER"], None)),
        "Presidio CreditCardRecognizer": lambda t: wrap(card.analyze(t, ["CREDIT_CARD"], None)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=FULL if FULL.is_file() else SAMPLE)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-compare", action="store_true")
    args = parser.parse_args()
    console = Console(width=None if Console().is_terminal else 140)
    data = load(args.data)
    docs = documents(data)
    scanner = PiiScanner()
    console.print(f"{args.data}: {len(data)} sentences, {len(docs)} documents of ~1 KB; "
                  f"scanner types: {', '.join(sorted(scanner.entity_types))}")

    stats = quality(data, scanner.scan)
    table = Table(title="Detection per entity type (Keel's PiiScanner, defaults, threshold 0.4)")
    for column in ("type", "kind", "labelled", "recall", "covered", "found", "false pos.", "FP share"):
        table.add_column(column, justify="left" if column in ("type", "kind") else "right")
    total = Counter[str]()
    for type_ in sorted(PATTERN_ENTITIES) + sorted(SECRET_TYPES):
        c = stats.get(type_, Counter())
        if type_ in PATTERN_ENTITIES:
            total.update({k: c[k] for k in ("labelled", "recalled", "covered")})
        table.add_row(
            type_, "secret" if type_ in SECRET_TYPES else "pattern", str(c["labelled"]),
            f"{c['recalled'] / c['labelled']:.1%}" if c["labelled"] else "-",
            f"{c['covered'] / c['labelled']:.1%}" if c["labelled"] else "-",
            str(c["found"]), str(c["false"]), f"{c['false'] / c['found']:.1%}" if c["found"] else "-",
        )
    table.add_row("all pattern types", "", str(total["labelled"]), f"{total['recalled'] / total['labelled']:.1%}",
                  f"{total['covered'] / total['labelled']:.1%}", "", "", "", style="bold")
    for type_ in sorted(set(stats) - PATTERN_ENTITIES - SECRET_TYPES):
        c = stats[type_]
        kind = "optional (off)" if type_ in OPTIONAL_ENTITIES else (
            "NER: not covered" if type_ in NER_LABELS | NER_ENTITIES else "not covered")
        table.add_row(type_, kind, str(c["labelled"]), "-", f"{c['covered'] / c['labelled']:.1%}", "", "", "")
    console.print(table)

    path, news = negatives(NEGATIVES)
    hits: Counter[str] = Counter()
    examples: dict[str, str] = {}
    for text in news:
        for e in scanner.scan(text):
            hits[e.type] += 1
            examples.setdefault(e.type, text[e.start:e.end])
    console.print(f"Found in {len(news)} unlabelled news sentences ({path.name}; read them: every "
                  "phone and email found was a real contact line, each URL a site name): "
                  + (", ".join(f"{t} {n} (e.g. {examples[t]!r})" for t, n in hits.most_common()) or "none"))

    timing = Table(title=f"Latency, ms per KB (~1 KB documents x {args.rounds} rounds)")
    for column in ("what", "p50", "p99"):
        timing.add_column(column, justify="left" if column == "what" else "right")
    p50, p99 = latency(docs, scanner.scan, args.rounds)
    timing.add_row("PiiScanner.scan (all checks)", f"{p50:.3f}", f"{p99:.3f}", style="bold")
    for check in scanner.checks:
        p50, p99 = latency(docs, check.run, args.rounds)
        timing.add_row(f"  {check.name}", f"{p50:.3f}", f"{p99:.3f}")
    clean = "The weather is mild today and the meeting moved to the afternoon. " * 16
    p50, p99 = latency([clean], scanner.scan, args.rounds * 40)
    timing.add_row("PiiScanner.scan on clean prose", f"{p50:.3f}", f"{p99:.3f}")

    if not args.no_compare:
        for name, fn in presidio_references().items():
            ref = quality(data, fn)
            p50, p99 = latency(docs, fn, max(1, args.rounds // 2))
            recall = {t: f"{ref[t]['recalled'] / ref[t]['labelled']:.0%}" for t in
                      ("PHONE_NUMBER", "CREDIT_CARD") if ref.get(t, Counter())["labelled"]}
            timing.add_row(f"{name} (reference; recall {recall})", f"{p50:.3f}", f"{p99:.3f}", style="dim")
    console.print(timing)


if __name__ == "__main__":
    main()
