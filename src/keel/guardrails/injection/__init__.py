"""Prompt-injection and jailbreak detection, in layers; each reports a score, the policy decides.

1. normalisation (`normalise.py`): NFKC, invisible and bidi characters, homoglyphs, hidden Unicode
   channels; base64/hex/percent/ROT13 payloads decoded into extra views;
2. patterns (`patterns.py`): named regular expressions over the normalised text and every decoded view;
3. classifier (`classifier.py`): a logistic head on the local embedder's vectors, over overlapping
   windows, max score (async, through an `Embedder`: a `Batcher` or the shared one; off when no embedder is given).

    detector = InjectionDetector(Batcher(load_embedder()))
    scores = detector.screen(text)                         # sync, ~0.1-1 ms per KB
    scores.append(await detector.classify([text]))
    if detector.flagged(scores): ...                       # any layer at/above its threshold

The figures (detection and false-positive rates per layer and source, latency) are in HEAD.md here and
come from bench/guardrails_injection.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final

import numpy as np

from keel.guardrails.injection import patterns as _patterns
from keel.guardrails.injection.classifier import MIN_WORDS, Head, HeadNotLoaded, load_head, windows
from keel.guardrails.injection.normalise import Normalised, noisy_or, normalise

if TYPE_CHECKING:
    import numpy.typing as npt

    from keel.embedding.shared import Embedder

__all__ = [
    "DEFAULT_THRESHOLDS", "HeadNotLoaded", "InjectionDetector", "LayerScore", "Normalised",
    "load_head", "normalise", "windows",
]

# Per layer, the score at/above which the layer says "injection". Patterns: 0.5, so that one strong
# pattern (weight >= 0.5) or two weak ones fire. Normalisation: 0.7, so that only a hidden channel (tag
# characters, variation-selector bytes) or stacked obfuscation (homoglyphs + zero-width) fires on its own;
# an encoded payload alone does not (its decoded text is checked by the patterns instead). The
# classifier's comes from the head file: chosen on training-side validation data (HEAD.md).
DEFAULT_THRESHOLDS: Final[dict[str, float]] = {"normalisation": 0.7, "patterns": 0.5}


@dataclass(frozen=True, slots=True)
class LayerScore:
    layer: str  # "normalisation" | "patterns" | "classifier"
    score: float  # 0..1, higher = more likely an injection
    reasons: tuple[str, ...] = ()  # names of what fired, never the matched text


class InjectionDetector:
    """The three local layers. `embedder=None` turns the classifier off (`screen` still works);
    `weights` is a head.json other than the shipped one (a missing or corrupt file raises HeadNotLoaded)."""

    def __init__(self, embedder: Embedder | None = None, *, weights: Path | None = None) -> None:
        self.embedder = embedder
        self.head: Head | None = load_head(weights) if (embedder is not None or weights is not None) else None
        self.threshold: dict[str, float] = dict(DEFAULT_THRESHOLDS)
        if self.head is not None:
            self.threshold["classifier"] = self.head.threshold

    # -- layers 1 and 2: sync, no model
    def screen(self, text: str) -> list[LayerScore]:
        """Normalisation and patterns on `text`, its normalised form and each decoded payload."""
        norm = normalise(text)
        fired: list[str] = []
        for name in _patterns.match(norm.text):
            fired.append(name)
        for kind, view in norm.views:
            for name in _patterns.match(view):
                label = f"{name} [{kind}]"
                if label not in fired:
                    fired.append(label)
        best: dict[str, float] = {}
        for label in fired:
            base = label.split(" [", 1)[0]
            best[base] = _patterns.weight(base)
        return [
            LayerScore("normalisation", norm.score, norm.reasons),
            LayerScore("patterns", round(noisy_or(list(best.values())), 4), tuple(fired)),
        ]

    # -- layer 3: the embedder and the head
    def classify_vectors(self, vectors: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """The head alone: P(injection) for each row of `vectors` (n, 384)."""
        if self.head is None:
            raise HeadNotLoaded("the injection classifier is off: no embedder or weights were given")
        return self.head.score(vectors)

    def windows_by_text(self, texts: Sequence[str], *, min_words: int = MIN_WORDS) -> tuple[list[str], list[int]]:
        """Every text's windows (as `windows_of` cuts them) and, for each, the index of its text: how the
        bench scores texts and the training script fits them (`min_words=1`: every text)."""
        out: list[str] = []
        owners: list[int] = []
        for i, text in enumerate(texts):
            found, _ = self.windows_of([text], min_words=min_words)
            out += found
            owners += [i] * len(found)
        return out, owners

    def windows_of(self, texts: Sequence[str], *, min_words: int = MIN_WORDS) -> tuple[list[str], list[str]]:
        """The windows `classify` embeds and, for each, what it is a window of ("text" or a payload kind).
        `min_words=1`: every text's windows, the short ones included, as the head was trained on them."""
        out: list[str] = []
        kinds: list[str] = []
        for text in texts:
            norm = normalise(text)
            for window in windows(norm.text, min_words=min_words):
                out.append(window)
                kinds.append("text")
            for kind, view in norm.views:
                for window in windows(view, min_words=min_words):
                    out.append(window)
                    kinds.append(kind)
        return out, kinds

    async def classify(self, texts: Sequence[str], *, system: str | None = None) -> LayerScore:
        """Max head score over the overlapping windows of each text (normalised, decoded views included).

        `system` is accepted so the stage can pass the system prompt, but the head does not use it yet: no
        public labelled data pairs attacks with the system prompts they target (HEAD.md, "misses").
        """
        if self.embedder is None or self.head is None:
            raise HeadNotLoaded("the injection classifier is off: InjectionDetector was built without an embedder")
        chunks, kinds = self.windows_of(texts)
        if not chunks:
            return LayerScore("classifier", 0.0, ())
        vectors = await self.embedder.embed(chunks)
        scores = self.head.score(vectors.array)
        top = int(np.argmax(scores))
        score = float(scores[top])
        reasons: tuple[str, ...] = ()
        if score >= self.threshold["classifier"]:
            reasons = ("injection-like window",) if kinds[top] == "text" else (f"injection-like window [{kinds[top]}]",)
        return LayerScore("classifier", round(score, 4), reasons)

    # -- the default policy
    def flagged(self, scores: Sequence[LayerScore]) -> list[str]:
        """The layers whose score is at/above their threshold (empty: nothing says injection)."""
        return [s.layer for s in scores if s.layer in self.threshold and s.score >= self.threshold[s.layer]]
