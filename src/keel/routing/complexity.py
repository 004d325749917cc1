"""The complexity strategy: score how hard a request looks (0 easy, 1 hard), then pick the tier
whose threshold the score reaches.

The score comes from cheap text features (length, code blocks, questions, reasoning and maths
words), computed in microseconds on the request path; optionally blended with a vote of the
nearest labelled examples by embedding (the shared local embedder), which catches hard requests
that are short and plainly worded.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from keel.config import RouteExampleConfig
from keel.pipeline import Call
from keel.routing.route import Choice, Tier
from keel.types import ChatRequest

if TYPE_CHECKING:
    from keel.embedding.shared import Embedder

_CODE = re.compile(r"```|^\s{4}\S|\bdef |\bclass |\bfunction\b|;\s*$|[{}]", re.MULTILINE)
_REASONING = re.compile(
    r"\b(why|prove|proof|derive|explain|analy[sz]e|compare|trade-?offs?|step by step|reason|evaluate|design|"
    r"optimi[sz]e|algorithm|complexity|theorem|integral|derivative|equation|probability|calculate|debug|"
    r"refactor|architecture|implement)\b",
    re.IGNORECASE,
)
_MATH = re.compile(r"[=^√∑∫≤≥±]|\d+\s*[*/^]\s*\d+|\b(sum|product|matrix|solve)\b", re.IGNORECASE)


def request_text(call: Call) -> str:
    """The text of the call's user turns (what the score reads)."""
    request = call.request
    if not isinstance(request, ChatRequest):
        return ""
    parts: list[str] = []
    for message in request.messages:
        if message.role != "user":
            continue
        content: Any = message.content
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list):
            parts.extend(str(getattr(p, "text", None) or (p.get("text") if isinstance(p, dict) else "") or "")
                         for p in content)
    return "\n".join(parts)


def feature_score(text: str) -> float:
    """Cheap features, each saturating, summed into 0..1: length (up to 0.3), code (0.25), questions
    beyond the first (0.15), reasoning words (0.2), maths (0.1)."""
    words = len(text.split())
    length = 0.3 * min(1.0, math.log1p(words) / math.log1p(400))
    code = 0.25 if _CODE.search(text) else 0.0
    questions = 0.15 * min(1.0, max(0, text.count("?") - 1) / 3)
    reasoning = 0.2 * min(1.0, len(_REASONING.findall(text)) / 2)
    maths = 0.1 if _MATH.search(text) else 0.0
    return min(1.0, length + code + questions + reasoning + maths)


class ExampleVote:
    """The share of `k` nearest labelled examples (cosine, by embedding) that are hard."""

    def __init__(self, examples: Sequence[RouteExampleConfig], embedder: Embedder, k: int = 3) -> None:
        self.examples = list(examples)
        self.embedder = embedder
        self.k = min(k, len(self.examples))
        self._matrix: Any = None

    async def __call__(self, text: str) -> float:
        import numpy as np  # the local extra, as the embedder

        if self._matrix is None:
            self._matrix = _unit(np.asarray((await self.embedder.embed([e.text for e in self.examples])).array))
        query = _unit(np.asarray((await self.embedder.embed([text])).array))[0]
        nearest = np.argsort(-(self._matrix @ query))[: self.k]
        return float(sum(self.examples[int(i)].hard for i in nearest)) / self.k


def _unit(matrix: Any) -> Any:
    import numpy as np

    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    return matrix / np.maximum(norms, 1e-12)


def thresholds_for(count: int, given: Sequence[float] | None) -> list[float]:
    """One threshold per tier after the first: the configured ones, else evenly spaced in 0..1."""
    if given is not None:
        return list(given)
    return [i / count for i in range(1, count)]


class ComplexityRoute:
    """Tier i+1 when the score reaches thresholds[i] (`reason=complexity=0.42`)."""

    def __init__(self, thresholds: Sequence[float], vote: ExampleVote | None = None, vote_weight: float = 0.5) -> None:
        self.thresholds = list(thresholds)
        self.vote = vote
        self.vote_weight = vote_weight if vote is not None else 0.0

    async def score(self, text: str) -> float:
        score = feature_score(text)
        if self.vote is not None and self.vote.k > 0:
            score = (1 - self.vote_weight) * score + self.vote_weight * await self.vote(text)
        return score

    async def decide(self, call: Call, tiers: Sequence[Tier]) -> Choice:
        score = await self.score(request_text(call))
        tier = min(sum(score >= t for t in self.thresholds), len(tiers) - 1)
        return Choice(tier, f"complexity={score:.2f}")
