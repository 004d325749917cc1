"""Judge trust: accuracy and Cohen's kappa against human labels (a textbook table, the edge cases), the
bootstrap interval, and run-to-run stability."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from keel.evals.judge_trust import agreement, agreement_by_judge, cohen_kappa, stability


def table(yes_yes: int, yes_no: int, no_yes: int, no_no: int) -> tuple[list[str], list[str]]:
    """Two raters' labels from a 2x2 table (rows: the judge, columns: the human)."""
    judge = ["yes"] * (yes_yes + yes_no) + ["no"] * (no_yes + no_no)
    human = ["yes"] * yes_yes + ["no"] * yes_no + ["yes"] * no_yes + ["no"] * no_no
    return judge, human


def test_kappa_on_a_textbook_table() -> None:
    # 50 proposals, two readers: 20 both yes, 5 yes/no, 10 no/yes, 15 both no. p_o = 0.7, p_e = 0.5 -> 0.4.
    judge, human = table(20, 5, 10, 15)
    assert cohen_kappa(judge, human) == pytest.approx(0.4)
    found = agreement(judge, human, seed=1)
    assert (found.n, found.accuracy, found.kappa) == (50, 0.7, pytest.approx(0.4))
    assert found.kappa_low is not None and found.kappa_high is not None
    assert -1 <= found.kappa_low < 0.4 < found.kappa_high <= 1 and found.resamples == 2000
    assert agreement(judge, human, seed=1) == found  # seeded: the same interval every time


def test_kappa_on_a_three_class_table_matches_the_hand_computation() -> None:
    judge = list("aaabbbccca")
    human = list("aabbbbccaa")
    # agreement 8/10; marginals judge a4 b3 c3, human a4 b4 c2: p_e = (16 + 12 + 6) / 100 = 0.34.
    assert cohen_kappa(judge, human) == pytest.approx((0.8 - 0.34) / (1 - 0.34))


def test_a_wider_interval_for_fewer_cases() -> None:
    small = agreement(*table(4, 1, 2, 3), seed=0)
    large = agreement(*table(40, 10, 20, 30), seed=0)
    assert small.kappa_low is not None and small.kappa_high is not None
    assert large.kappa_low is not None and large.kappa_high is not None
    assert small.kappa_high - small.kappa_low > large.kappa_high - large.kappa_low


def test_perfect_agreement_is_kappa_one_and_opposite_labels_are_below_zero() -> None:
    labels = ["pass", "fail", "pass", "fail", "pass"]
    found = agreement(labels, labels)
    assert (found.accuracy, found.kappa) == (1.0, 1.0)
    flipped = ["fail" if x == "pass" else "pass" for x in labels]
    assert cohen_kappa(flipped, labels) is not None and cohen_kappa(flipped, labels) < 0  # type: ignore[operator]


def test_all_one_class_on_both_sides_leaves_kappa_undefined_but_accuracy_known() -> None:
    found = agreement(["pass"] * 6, ["pass"] * 6)
    assert (found.accuracy, found.kappa, found.kappa_low, found.resamples) == (1.0, None, None, 0)


def test_a_judge_that_always_says_pass_agrees_no_better_than_chance() -> None:
    human = ["pass"] * 8 + ["fail"] * 2
    found = agreement(["pass"] * 10, human)
    assert found.accuracy == 0.8 and found.kappa == pytest.approx(0.0)  # high accuracy, no skill


def test_empty_and_mismatched_inputs() -> None:
    empty = agreement([], [])
    assert (empty.n, empty.accuracy, empty.kappa, empty.kappa_low) == (0, None, None, None)
    assert cohen_kappa([], []) is None
    with pytest.raises(ValueError, match="3 judge labels against 2"):
        agreement([1, 2, 3], [1, 2])


def test_stability_counts_identical_cases_and_mean_pairwise_agreement() -> None:
    found = stability({"a": ["pass"] * 3, "b": ["pass", "pass", "fail"], "c": [5, 4, 3], "once": ["pass"]})
    assert (found.cases, found.k) == (3, 3)
    assert found.identical == pytest.approx(1 / 3)
    assert found.pairwise == pytest.approx((1 + 1 / 3 + 0) / 3)
    assert stability({}).identical is None and stability({"x": ["pass"]}).cases == 0


@dataclass(frozen=True)
class Reviewed:
    label: str | None
    score: float | None = None


def test_agreement_by_judge_reads_review_pairs_and_skips_what_cannot_be_compared() -> None:
    pairs = [
        ({"judge": "polite", "passed": True}, Reviewed("pass")),
        ({"judge": "polite", "passed": False}, Reviewed("fail")),
        ({"judge": "polite", "passed": True}, Reviewed("fail")),
        ({"judge": "polite", "passed": None, "reason": "judge answer invalid"}, Reviewed("pass")),  # unscored
        ({"judge": "polite", "passed": True}, Reviewed(None, 4.0)),  # a score only: no verdict to compare
        ({"judge": "correct", "passed": True}, Reviewed("pass")),
        ({"judge": "correct", "passed": False}, Reviewed("fail")),
    ]
    found = agreement_by_judge(pairs)
    assert list(found) == ["correct", "polite"]
    assert (found["polite"].n, found["polite"].accuracy) == (3, pytest.approx(2 / 3))
    assert (found["correct"].n, found["correct"].kappa) == (2, 1.0)
    assert agreement_by_judge([]) == {}
