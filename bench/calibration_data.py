"""Labelled pairs for `keel cache calibrate`: MRPC plus Keel's hand-made near misses and chat prompt pairs.

    .venv/bin/python bench/calibration_data.py train OUT.jsonl   # calibrate on this
    .venv/bin/python bench/calibration_data.py val OUT.jsonl     # measure on this (held out)

`train` is MRPC's train split (`../shared/data/paraphrase/mrpc-train.tsv`, 4,076 pairs with val; label
column `Quality`: 1 paraphrase, 0 not) plus the even-numbered lines of tests/data/cache-near-misses.jsonl;
`val` is MRPC's validation split plus the odd-numbered near misses. The near misses are all
non-duplicates (pairs an embedder calls close that need different answers); they are grouped by kind in
their file, so alternate lines put every kind in both halves. tests/data/paraphrase-sample.tsv is not
used: its 40 pairs are the first paraphrases of MRPC's validation split, already in `val`.

Both splits also take half of tests/data/cache-query-pairs.jsonl: hand-written chat prompt pairs, about
half duplicates (rewordings, typos) and half hard non-duplicates (another entity, number, date, attribute,
language or tool, a negation, swapped arguments), each with a `kind`. Within each kind, in file order,
the even-numbered pairs go to `train` and the odd-numbered to `val`, so every kind is in both halves.

Each output line: {"query": ..., "cached": ..., "duplicate": true|false, "source": "mrpc-train" | ...};
a query pair's source is "query:KIND", a near miss's "near-miss:KIND".
MRPC is news sentences labelled by annotators, not chat prompts: see bench/semantic_calibration.py.
"""

from __future__ import annotations

import argparse
import csv
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data" / "paraphrase"
NEAR_MISSES = ROOT / "tests" / "data" / "cache-near-misses.jsonl"
QUERY_PAIRS = ROOT / "tests" / "data" / "cache-query-pairs.jsonl"
SPLITS = {"train": ("mrpc-train.tsv", 0), "val": ("mrpc-val.tsv", 1)}  # file, parity of the lines taken


def mrpc_pairs(path: Path) -> Iterator[dict[str, Any]]:
    """MRPC's rows as labelled pairs (the file starts with a BOM; its sentences hold bare quotes)."""
    with path.open(encoding="utf-8-sig", newline="") as f:
        for row in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE):
            if row["Quality"] not in ("0", "1"):
                raise ValueError(f"{path}: unexpected Quality {row['Quality']!r} in row {row}")
            yield {
                "query": row["#1 String"], "cached": row["#2 String"], "duplicate": row["Quality"] == "1",
                "source": path.stem,
            }


def near_misses(parity: int) -> Iterator[dict[str, Any]]:
    """Every other hand-made near miss (all non-duplicates), starting at line `parity` (0-based)."""
    lines = [line for line in NEAR_MISSES.read_text(encoding="utf-8").splitlines() if line.strip()]
    for line in lines[parity::2]:
        record = json.loads(line)
        yield {"query": record["query"], "cached": record["cached"], "duplicate": False,
               "source": f"near-miss:{record['kind']}"}


def query_pairs(parity: int, path: Path = QUERY_PAIRS) -> Iterator[dict[str, Any]]:
    """Half the hand-written chat prompt pairs: within each kind, in file order, those at `parity` (0-based)."""
    seen: dict[str, int] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        index = seen[record["kind"]] = seen.get(record["kind"], -1) + 1
        if index % 2 == parity:
            yield {"query": record["query"], "cached": record["cached"], "duplicate": record["duplicate"],
                   "source": f"query:{record['kind']}"}


def build(split: str, source: Path = SHARED) -> list[dict[str, Any]]:
    name, parity = SPLITS[split]
    return [*mrpc_pairs(source / name), *near_misses(parity), *query_pairs(parity)]


def write(records: list[dict[str, Any]], out: Path) -> None:
    with out.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("split", choices=sorted(SPLITS))
    parser.add_argument("out", type=Path)
    parser.add_argument("--source", type=Path, default=SHARED, help="folder holding mrpc-train.tsv, mrpc-val.tsv")
    args = parser.parse_args()
    records = build(args.split, args.source)
    write(records, args.out)
    duplicates = sum(r["duplicate"] for r in records)
    print(f"{args.out}: {len(records):,} pairs, {duplicates:,} duplicates, {len(records) - duplicates:,} not")


if __name__ == "__main__":
    main()
