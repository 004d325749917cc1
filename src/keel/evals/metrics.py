"""The metrics that need no judge: exact match, contains, regex, JSON-schema valid, numeric tolerance,
semantic similarity (the local embedder), latency and cost per case.

Checks (exact match, contains, regex, JSON valid, numeric) score 1.0 or 0.0 and say why a case failed;
measures (similarity, latency, cost) score the measured number and pass against their limit. A case
whose call failed scores None (not 0): its failure is counted by the run's error rate, not twice.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import jsonschema
import orjson

from keel.evals.scoring import Answered, Score

Embed = Callable[[list[str]], Awaitable[Sequence[Sequence[float]]]]


def normalised(text: str) -> str:
    """Case-folded, Unicode-normalised (NFKC), whitespace collapsed, trailing punctuation dropped."""
    text = " ".join(unicodedata.normalize("NFKC", text).casefold().split())
    return text.rstrip(".!?;:,").strip()


def _failed(answered: Answered) -> Score | None:
    if answered.output is None:
        return Score(None, None, f"the call failed: {answered.error or 'no answer'}")
    return None


def _no_reference(answered: Answered) -> Score | None:
    if not answered.case.references:
        return Score(None, None, f"case {answered.case.id} has no reference")
    return None


@dataclass
class ExactMatch:
    """The answer equals a reference; with `field`, that field of the JSON answer does (structured outputs)."""

    normalise: bool = True
    field: str | None = None
    threshold: float | None = None
    key: str = "exact_match"

    async def score(self, answered: Answered) -> Score:
        if (skip := _failed(answered) or _no_reference(answered)) is not None:
            return skip
        assert answered.output is not None
        output = answered.output
        if self.field is not None:
            try:
                data = orjson.loads(_unfenced(output))
            except orjson.JSONDecodeError:
                return Score(0.0, False, f"the answer is not JSON, so it has no field {self.field!r}")
            if not isinstance(data, dict) or self.field not in data:
                return Score(0.0, False, f"the answer has no field {self.field!r}")
            output = str(data[self.field])
        said = normalised(output) if self.normalise else output
        for reference in answered.case.references:
            expected = normalised(str(reference)) if self.normalise else str(reference)
            if said == expected:
                return Score(1.0, True)
        return Score(0.0, False, f"expected {_shown(answered.case.references)}, got {output[:200]!r}")


@dataclass
class Contains:
    """The answer contains the reference (or `text`, when given), case-insensitively unless told."""

    text: str | None = None
    case_sensitive: bool = False
    threshold: float | None = None
    key: str = "contains"

    async def score(self, answered: Answered) -> Score:
        if (skip := _failed(answered) or (None if self.text else _no_reference(answered))) is not None:
            return skip
        assert answered.output is not None
        wanted = [self.text] if self.text else [str(r) for r in answered.case.references]
        said = answered.output if self.case_sensitive else normalised(answered.output)
        for text in wanted:
            if (text if self.case_sensitive else normalised(text)) in said:
                return Score(1.0, True)
        return Score(0.0, False, f"{_shown(wanted)} not found in the answer")


@dataclass
class Regex:
    pattern: str
    threshold: float | None = None
    key: str = ""

    def __post_init__(self) -> None:
        self.compiled = re.compile(self.pattern)  # a bad pattern fails when the suite loads
        self.key = self.key or f"regex:{self.pattern}"

    async def score(self, answered: Answered) -> Score:
        if (skip := _failed(answered)) is not None:
            return skip
        assert answered.output is not None
        if self.compiled.search(answered.output):
            return Score(1.0, True)
        return Score(0.0, False, f"no match for /{self.pattern}/")


@dataclass
class JsonValid:
    """The answer is JSON and, when a schema is given, valid against it (the path that fails is named)."""

    schema: dict[str, Any] | None = None
    threshold: float | None = None
    key: str = "json_valid"

    def __post_init__(self) -> None:
        if self.schema is not None:
            jsonschema.Draft202012Validator.check_schema(self.schema)  # a bad schema fails when the suite loads
            self.validator = jsonschema.Draft202012Validator(self.schema)

    async def score(self, answered: Answered) -> Score:
        if (skip := _failed(answered)) is not None:
            return skip
        assert answered.output is not None
        try:
            value = orjson.loads(_unfenced(answered.output))
        except orjson.JSONDecodeError as exc:
            return Score(0.0, False, f"not JSON: {exc}")
        if self.schema is not None:
            error = jsonschema.exceptions.best_match(self.validator.iter_errors(value))
            if error is not None:
                where = "/".join(str(part) for part in error.absolute_path) or "(the top level)"
                return Score(0.0, False, f"at {where}: {error.message}")
        return Score(1.0, True)


_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?")


@dataclass
class Numeric:
    """The first number in the answer is within `tolerance` of the reference (absolute, or relative to
    the reference with `relative: true`)."""

    tolerance: float = 0.0
    relative: bool = False
    threshold: float | None = None
    key: str = "numeric"

    async def score(self, answered: Answered) -> Score:
        if (skip := _failed(answered) or _no_reference(answered)) is not None:
            return skip
        assert answered.output is not None
        found = _NUMBER.search(answered.output)
        if found is None:
            return Score(0.0, False, "no number in the answer")
        said = float(found.group().replace(",", ""))
        for reference in answered.case.references:
            try:
                expected = float(str(reference).replace(",", ""))
            except ValueError:
                return Score(None, None, f"the reference {reference!r} is not a number")
            allowed = self.tolerance * abs(expected) if self.relative else self.tolerance
            if abs(said - expected) <= allowed + 1e-12:
                return Score(1.0, True, details={"found": said})
        return Score(0.0, False, f"found {said:g}, expected {_shown(answered.case.references)} ± "
                     f"{self.tolerance:g}{' (relative)' if self.relative else ''}", {"found": said})


@dataclass
class Semantic:
    """Cosine similarity of the answer's and the reference's embeddings (the local embedder): the best
    over the references; passes at `min_similarity`."""

    embed: Embed
    min_similarity: float = 0.8
    threshold: float | None = None
    key: str = "semantic"

    async def score(self, answered: Answered) -> Score:
        if (skip := _failed(answered) or _no_reference(answered)) is not None:
            return skip
        assert answered.output is not None
        texts = [answered.output, *(str(r) for r in answered.case.references)]
        vectors = await self.embed(texts)
        best = max(_cosine(vectors[0], other) for other in vectors[1:])
        return Score(best, best >= self.min_similarity,
                     None if best >= self.min_similarity else f"similarity {best:.3f} < {self.min_similarity}")


@dataclass
class Latency:
    lower_is_better: ClassVar[bool] = True  # a threshold on it is a ceiling, not a floor

    max_ms: float | None = None
    threshold: float | None = None
    key: str = "latency_ms"

    async def score(self, answered: Answered) -> Score:
        if answered.output is None:
            return Score(None, None, "the call failed")
        passed = None if self.max_ms is None else answered.latency_ms <= self.max_ms
        return Score(answered.latency_ms, passed, None if passed is not False else f"over {self.max_ms:g} ms")


@dataclass
class Cost:
    lower_is_better: ClassVar[bool] = True

    max_usd: float | None = None
    threshold: float | None = None
    key: str = "cost_usd"

    async def score(self, answered: Answered) -> Score:
        if answered.output is None:
            return Score(None, None, "the call failed")
        passed = None if self.max_usd is None else answered.cost_usd <= self.max_usd
        return Score(answered.cost_usd, passed, None if passed is not False else f"over ${self.max_usd:g}")


def _cosine(a: Sequence[float], b: Sequence[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    norm = math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b))
    return dot / norm if norm else 0.0


def _unfenced(text: str) -> str:
    """JSON inside a Markdown code fence, as models often write it, without the fence."""
    stripped = text.strip()
    if stripped.startswith("```"):
        stripped = stripped.split("\n", 1)[1] if "\n" in stripped else ""
        stripped = stripped.rsplit("```", 1)[0]
    return stripped


def _shown(values: Sequence[Any]) -> str:
    return " or ".join(repr(v) for v in values[:3]) + (" …" if len(values) > 3 else "")
