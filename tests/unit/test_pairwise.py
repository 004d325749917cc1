"""Pairwise judging in both orders (position bias cancels), the combined verdicts, and verbosity control:
score-length correlations and the length-controlled win rate on synthetic data."""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson
import pytest
from conftest import RecordingSink

from keel.config import TracingConfig, parse_config
from keel.engine import Keel
from keel.evals.dataset import Case
from keel.evals.judges import JUDGE_FEATURE, judge_ask
from keel.evals.pairwise import PairwiseJudge, Verdict, combine
from keel.evals.verbosity import length_controlled_win_rate, pearson, ranks, score_length_correlation, spearman
from keel.observability.metrics import Metrics
from keel.observability.stage import Observe
from keel.observability.tracing import Tracing

CASES = [Case(id=f"c{i}", messages=({"role": "user", "content": f"question {i}"},)) for i in range(6)]


def body(content: str) -> dict[str, Any]:
    return {"model": "judge", "choices": [{"index": 0, "finish_reason": "stop",
                                           "message": {"role": "assistant", "content": content}}]}


def shown_answers(params: dict[str, Any]) -> tuple[str, str]:
    text = params["messages"][1]["content"]  # the judged pair (a re-ask appends after it)
    first = text.split("[The Start of Assistant A's Answer]\n")[1].split("\n[The End")[0]
    second = text.split("[The Start of Assistant B's Answer]\n")[1].split("\n[The End")[0]
    return first, second


async def always_first(params: dict[str, Any]) -> dict[str, Any]:
    """A judge with pure position bias: whatever it is shown, the first answer wins."""
    return body('{"verdict": "A", "reason": "the first one"}')


async def prefers_correct(params: dict[str, Any]) -> dict[str, Any]:
    first, second = shown_answers(params)
    verdict = {(True, False): "A", (False, True): "B"}.get(("correct" in first, "correct" in second), "tie")
    return body(orjson.dumps({"verdict": verdict, "reason": "by content"}).decode())


async def test_a_judge_that_always_prefers_the_first_answer_gives_all_ties_and_zero_consistency() -> None:
    judge = PairwiseJudge(model="judge", ask=always_first)
    result = await judge.compare([(case, f"answer a{i}", f"a much longer answer b{i}") for i, case in
                                  enumerate(CASES)])
    assert [v.combined for v in result.verdicts] == ["tie"] * len(CASES)
    assert all((v.first, v.second) == ("A", "B") for v in result.verdicts)  # both raw verdicts kept
    assert (result.wins_a, result.wins_b, result.ties, result.unjudged) == (0, 0, len(CASES), 0)
    assert result.win_rate_b == 0.5 and result.consistency == 0.0


async def test_a_judge_of_content_is_consistent_across_orders_and_b_wins_where_it_is_better() -> None:
    judge = PairwiseJudge(model="judge", ask=prefers_correct)
    pairs = [(CASES[0], "wrong", "correct"), (CASES[1], "correct", "wrong"), (CASES[2], "correct", "correct too"),
             (CASES[3], "meh", "correct")]
    result = await judge.compare(pairs, concurrency=2)
    assert [v.combined for v in result.verdicts] == ["B", "A", "tie", "B"]
    assert result.consistency == 1.0 and result.win_rate_b == 0.625
    assert result.verdicts[0].reasons == ("by content", "by content")


@pytest.mark.parametrize(("first", "second", "combined"), [
    ("A", "A", "A"), ("B", "B", "B"), ("tie", "tie", "tie"),
    ("A", "tie", "A"), ("tie", "A", "A"), ("B", "tie", "B"), ("tie", "B", "B"),
    ("A", "B", "tie"), ("B", "A", "tie"),
])
def test_combining_the_two_orders(first: Verdict, second: Verdict, combined: Verdict) -> None:
    assert combine(first, second) == combined


async def test_an_invalid_judge_answer_leaves_the_case_unjudged_and_out_of_the_rates() -> None:
    calls = 0

    async def broken_once_per_case(params: dict[str, Any]) -> dict[str, Any]:
        nonlocal calls
        calls += 1
        first, _ = shown_answers(params)
        return body("nope" if first == "x" else '{"verdict": "tie", "reason": "same"}')

    judge = PairwiseJudge(model="judge", ask=broken_once_per_case)
    result = await judge.compare([(CASES[0], "x", "y"), (CASES[1], "p", "q")])
    bad, good = result.verdicts
    assert bad.combined is None and bad.problem is not None and "judge answer invalid" in bad.problem
    assert good.combined == "tie" and (result.unjudged, result.ties, result.win_rate_b) == (1, 1, 0.5)
    assert calls == 2 + 2 + 1  # the invalid order was re-asked once, both orders of each case were asked


def test_pearson_and_spearman_on_known_values() -> None:
    assert pearson([1, 2, 3, 4], [2, 4, 6, 8]) == pytest.approx(1.0)
    assert pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 3, 4], [1, 8, 27, 1000]) == pytest.approx(1.0)  # monotone, not linear
    assert pearson([1, 2, 3, 4, 5], [2, 4, 5, 4, 5]) == pytest.approx(6 / 60 ** 0.5)  # cov 6, sums of squares 10, 6
    assert list(ranks([10, 20, 10, 5])) == [2.5, 4.0, 2.5, 1.0]
    assert pearson([1, 2, 3], [5, 5, 5]) is None and spearman([1], [2]) is None


def test_score_length_correlation_skips_unscored_cases() -> None:
    found = score_length_correlation([0.0, None, 0.5, 1.0], [10, 9999, 20, 30])
    assert found.n == 3 and found.pearson == pytest.approx(1.0) and found.spearman == pytest.approx(1.0)


def test_when_the_longer_answer_always_wins_the_length_controlled_win_rate_is_about_a_half() -> None:
    rng = np.random.default_rng(7)
    for shift in (0.0, 150.0):  # with shift 150, B is the longer answer in about 70% of the pairs
        diffs = rng.normal(shift, 300, 400)
        wins_b = (diffs > 0).astype(float)
        found = length_controlled_win_rate(list(wins_b), list(diffs))
        assert found.raw_win_rate == pytest.approx(wins_b.mean())
        assert found.win_rate is not None and abs(found.win_rate - 0.5) < 0.07, (shift, found)
        assert found.slope is not None and found.slope > 1
    assert found.raw_win_rate is not None and found.raw_win_rate > 0.65


def test_when_b_is_better_regardless_of_length_the_length_controlled_win_rate_stays_high() -> None:
    rng = np.random.default_rng(3)
    diffs = rng.normal(0, 300, 400)
    wins_b = (rng.random(400) < 0.8).astype(float)
    found = length_controlled_win_rate(list(wins_b), list(diffs))
    assert found.win_rate is not None and abs(found.win_rate - found.raw_win_rate) < 0.03  # type: ignore[operator]
    assert found.win_rate > 0.75


def test_length_controlled_win_rate_edge_cases() -> None:
    assert length_controlled_win_rate([], []).win_rate is None
    same_length = length_controlled_win_rate([1.0, 0.5, 1.0, 0.0], [0.0] * 4)
    assert same_length.slope is None and same_length.win_rate == pytest.approx(0.625, abs=1e-3)
    all_b = length_controlled_win_rate([1.0] * 5, [10.0, -10.0, 5.0, 0.0, 3.0])
    assert all_b.win_rate is not None and all_b.win_rate > 0.95
    with pytest.raises(ValueError):
        length_controlled_win_rate([1.0], [1.0, 2.0])


async def test_through_a_real_keel_the_simulators_always_a_verdict_cancels_out() -> None:
    # The simulated provider answers a json_schema request with the schema's first enum value, "A":
    # a judge with pure position bias, end to end through the pipeline.
    sink = RecordingSink()
    keel = Keel(parse_config({"models": [{"name": "sim", "deployments": [{"provider": "simulated"}]}]}),
                stages=[Observe(sink, Tracing(TracingConfig(to_store=False)), Metrics())])
    try:
        result = await PairwiseJudge(model="sim", ask=judge_ask(keel)).compare(
            [(case, "short", "a longer answer") for case in CASES[:3]])
        assert [(v.first, v.second, v.combined) for v in result.verdicts] == [("A", "B", "tie")] * 3
        assert (result.win_rate_b, result.consistency) == (0.5, 0.0)
        assert [r.feature for r in sink.records] == [JUDGE_FEATURE] * 6  # both orders of each case, logged
    finally:
        await keel.close()
