"""Layer 3: the classifier. A logistic-regression head (384 weights and a bias) on the local embedder's
unit vectors (all-MiniLM-L6-v2), scored over overlapping word windows of each text; a text's score is its
highest window's. The head is trained by tools/train_injection_head.py and shipped as head.json here
(see HEAD.md: data sources, licences, the training command, the figures).

Windows: the embedder reads 256 tokens at most, and attacks hide a payload after filler, so a text is cut
into windows of WINDOW_WORDS words that overlap by half; a text under MIN_WORDS words has none.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import numpy as np

from keel.errors import ModelNotLoaded

if TYPE_CHECKING:
    import numpy.typing as npt

FORMAT: Final = "keel-injection-head/1"
WINDOW_WORDS: Final = 96  # ~130 word pieces: well inside the embedder's 256 tokens
STRIDE_WORDS: Final = 48
MAX_WINDOWS: Final = 64  # per text; a longer text gets MAX_WINDOWS windows spread evenly over it
MAX_WORD_CHARS: Final = 64  # a "word" longer than this (a base64 blob, a URL) is cut into pieces
# Shorter texts are not judged by the head (no windows): it scored "ok", "hi", "thanks" and "continue"
# above its threshold, having learnt from S-Labs that a short command ("Bypass now") is an attack.
# Normalisation and the patterns still read them. A stage policy only: the head is trained on every text
# (tools/train_injection_head.py cuts windows with min_words=1), as the shipped head was.
MIN_WORDS: Final = 8


class HeadNotLoaded(ModelNotLoaded):
    """The injection classifier's weights file is missing or unreadable."""

    code = "injection_head_not_loaded"


def default_weights() -> Path:
    return Path(str(files("keel.guardrails.injection") / "head.json"))


@dataclass(frozen=True, slots=True)
class Head:
    weights: npt.NDArray[np.float32]  # (dimensions,)
    bias: float
    threshold: float
    meta: dict[str, Any]

    def score(self, vectors: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """P(injection) for each row of `vectors` (n, dimensions)."""
        logits = np.asarray(vectors, dtype=np.float32) @ self.weights + np.float32(self.bias)
        scores: npt.NDArray[np.float32] = (1.0 / (1.0 + np.exp(-np.clip(logits, -40.0, 40.0)))).astype(np.float32)
        return scores


def load_head(path: Path | None = None) -> Head:
    """Read a head.json; a missing, truncated or foreign file raises HeadNotLoaded saying which and why."""
    path = path or default_weights()
    fix = "rebuild it with `python tools/train_injection_head.py` (or reinstall Keel)"
    try:
        raw = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise HeadNotLoaded(f"the injection classifier's weights file {path} does not exist; {fix}") from None
    except OSError as exc:
        raise HeadNotLoaded(
            f"the injection classifier's weights file {path} could not be read ({exc.strerror}); {fix}"
        ) from None
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise HeadNotLoaded(
            f"the injection classifier's weights file {path} is not valid JSON ({exc}); {fix}"
        ) from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise HeadNotLoaded(f"{path} is not a Keel injection head (expected format {FORMAT!r}); {fix}")
    try:
        weights = np.asarray(data["weights"], dtype=np.float32)
        bias, threshold = float(data["bias"]), float(data["threshold"])
        dimensions = int(data["dimensions"])
    except (KeyError, TypeError, ValueError) as exc:
        raise HeadNotLoaded(f"{path} is missing or has a malformed field ({exc}); {fix}") from None
    if weights.shape != (dimensions,) or not np.all(np.isfinite(weights)) or not math.isfinite(bias):
        raise HeadNotLoaded(
            f"{path} holds {weights.shape} weights for {dimensions} dimensions, or non-finite values; {fix}"
        )
    if not 0.0 < threshold < 1.0:
        raise HeadNotLoaded(f"{path} has threshold {threshold}, outside (0, 1); {fix}")
    meta = {k: v for k, v in data.items() if k not in ("weights", "bias", "threshold")}
    return Head(weights, bias, threshold, meta)


def windows(text: str, *, min_words: int = MIN_WORDS) -> list[str]:
    """Overlapping windows of `text` (WINDOW_WORDS words, half overlapping), at most MAX_WINDOWS; none for a
    text under `min_words` words. The stage uses MIN_WORDS; training and the in-distribution figures use 1,
    as the head was fitted on every text, the shortest commands included (HEAD.md)."""
    words: list[str] = []
    for word in text.split():
        if len(word) > MAX_WORD_CHARS:
            words.extend(word[i:i + MAX_WORD_CHARS] for i in range(0, len(word), MAX_WORD_CHARS))
        else:
            words.append(word)
    if len(words) < max(1, min_words):
        return []
    if len(words) <= WINDOW_WORDS:
        return [" ".join(words)]
    starts = list(range(0, len(words) - WINDOW_WORDS + STRIDE_WORDS, STRIDE_WORDS))
    last = len(words) - WINDOW_WORDS
    starts = sorted({min(s, last) for s in starts})
    if len(starts) > MAX_WINDOWS:
        step = (len(starts) - 1) / (MAX_WINDOWS - 1)
        starts = sorted({starts[round(i * step)] for i in range(MAX_WINDOWS)})
    return [" ".join(words[s:s + WINDOW_WORDS]) for s in starts]
