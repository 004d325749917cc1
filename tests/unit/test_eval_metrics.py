"""Each metric that needs no judge, on hand-made edge cases: empty answers, invalid JSON, unicode,
fenced JSON, numbers with separators, failed calls (unscored, not failed), several references."""

from __future__ import annotations

from typing import Any

import pytest

from keel.evals.dataset import Case
from keel.evals.metrics import Contains, Cost, ExactMatch, JsonValid, Latency, Numeric, Regex, Semantic, normalised
from keel.evals.scoring import Answered, Metric


def answered(output: str | None, reference: Any = None, **fields: Any) -> Answered:
    return Answered(Case("c1", ({"role": "user", "content": "q"},), reference=reference), output, **fields)


async def score(metric: Metric, output: str | None, reference: Any = None, **fields: Any) -> tuple[Any, Any, str]:
    s = await metric.score(answered(output, reference, **fields))
    return s.value, s.passed, s.reason or ""


async def test_exact_match_normalises_case_space_unicode_and_final_punctuation() -> None:
    fullwidth_paris = "\uff30\uff41\uff52\uff49\uff53"  # NFKC makes it "Paris"
    assert normalised(f"  {fullwidth_paris}\u00a0 is\tthe  CAPITAL. ") == "paris is the capital"
    assert (await score(ExactMatch(), "Paris.", "paris"))[:2] == (1.0, True)
    assert (await score(ExactMatch(), "Straße", "STRASSE"))[:2] == (1.0, True)  # casefold, not lower
    value, passed, why = await score(ExactMatch(), "Rome", ["Paris", "paris, France"])
    assert (value, passed) == (0.0, False) and "'Paris'" in why and "'Rome'" in why
    assert (await score(ExactMatch(normalise=False), "paris", "Paris"))[:2] == (0.0, False)
    assert (await score(ExactMatch(), "", "Paris"))[:2] == (0.0, False)  # an empty answer is wrong, not unscored


async def test_exact_match_on_a_field_of_a_json_answer() -> None:
    metric = ExactMatch(field="answer")
    assert (await score(metric, '{"answer": "N", "why": "x"}', "n"))[:2] == (1.0, True)
    assert (await score(metric, '{"answer": 4}', "4"))[:2] == (1.0, True)
    value, passed, why = await score(metric, '{"other": "N"}', "N")
    assert (value, passed) == (0.0, False) and "no field 'answer'" in why
    value, passed, why = await score(metric, "N", "N")
    assert (value, passed) == (0.0, False) and "not JSON" in why


async def test_a_failed_call_or_a_missing_reference_is_unscored_not_failed() -> None:
    for metric in (ExactMatch(), Contains(), Regex("x"), JsonValid(), Numeric(), Latency(), Cost()):
        value, passed, why = await score(metric, None, "x", error="timeout: the deadline passed")
        assert (value, passed) == (None, None) and "failed" in why, metric
    value, passed, why = await score(ExactMatch(), "Paris", None)
    assert (value, passed) == (None, None) and "no reference" in why


async def test_contains_and_regex() -> None:
    assert (await score(Contains(), "The capital is PARIS.", "paris"))[:2] == (1.0, True)
    assert (await score(Contains(text="Paris", case_sensitive=True), "paris", None))[:2] == (0.0, False)
    assert (await score(Regex(r"^\d{4}-\d{2}-\d{2}$"), "2024-06-01", None))[:2] == (1.0, True)
    assert (await score(Regex(r"^\d+$"), "١٢٣", None))[:2] == (1.0, True)  # \d is Unicode digits in Python
    assert Regex("a+").key == "regex:a+"
    with pytest.raises(Exception, match="unterminated"):
        Regex("(")


async def test_json_valid_reads_fenced_json_and_names_the_failing_path() -> None:
    schema = {"type": "object", "required": ["name", "tags"],
              "properties": {"name": {"type": "string"}, "tags": {"type": "array", "items": {"type": "string"}}}}
    metric = JsonValid(schema)
    assert (await score(metric, '```json\n{"name": "é", "tags": ["a"]}\n```'))[:2] == (1.0, True)
    value, passed, why = await score(metric, '{"name": "x", "tags": ["a", 3]}')
    assert (value, passed) == (0.0, False) and why.startswith("at tags/1:")
    value, passed, why = await score(JsonValid(), '{"name": ')
    assert (value, passed) == (0.0, False) and why.startswith("not JSON")
    assert (await score(JsonValid(), ""))[:2] == (0.0, False)
    with pytest.raises(Exception, match=r"is not valid under any of the given schemas|is not of type"):
        JsonValid({"type": "objekt"})


async def test_numeric_tolerance_absolute_and_relative() -> None:
    assert (await score(Numeric(), "It is 1,234.", "1234"))[:2] == (1.0, True)
    assert (await score(Numeric(tolerance=0.5), "about 3.4 km", 3))[:2] == (1.0, True)
    value, passed, why = await score(Numeric(tolerance=0.5), "about 3.6 km", 3)
    assert (value, passed) == (0.0, False) and "found 3.6" in why
    assert (await score(Numeric(tolerance=0.01, relative=True), "1005", 1000))[:2] == (1.0, True)
    assert (await score(Numeric(tolerance=0.01, relative=True), "1011", 1000))[:2] == (0.0, False)
    assert (await score(Numeric(), "no digits here", 4))[:2] == (0.0, False)
    assert (await score(Numeric(), "-2.5e3", -2500))[:2] == (1.0, True)
    value, passed, why = await score(Numeric(), "4", "four")
    assert (value, passed) == (None, None) and "not a number" in why


async def test_semantic_similarity_takes_the_best_reference() -> None:
    table = {"a cat": [1.0, 0.0], "a kitten": [0.9, 0.1], "a car": [0.0, 1.0]}

    async def embed(texts: list[str]) -> list[list[float]]:
        return [table[t] for t in texts]

    value, passed, _ = await score(Semantic(embed, min_similarity=0.9), "a cat", ["a car", "a kitten"])
    assert value == pytest.approx(0.9 / (0.81 + 0.01) ** 0.5) and passed is True
    value, passed, why = await score(Semantic(embed, min_similarity=0.9), "a cat", "a car")
    assert value == pytest.approx(0.0) and passed is False and "< 0.9" in why


async def test_latency_and_cost_measure_and_pass_against_their_limit() -> None:
    assert (await score(Latency(max_ms=100), "ok", latency_ms=80.0))[:2] == (80.0, True)
    assert (await score(Latency(max_ms=100), "ok", latency_ms=120.0))[:2] == (120.0, False)
    assert (await score(Latency(), "ok", latency_ms=120.0))[:2] == (120.0, None)
    assert (await score(Cost(max_usd=0.01), "ok", cost_usd=0.02))[:2] == (0.02, False)
    assert Latency.lower_is_better and Cost.lower_is_better and not getattr(ExactMatch(), "lower_is_better", False)
