"""Pairwise comparison: which of two variants' answers to the same case is better, asked in both orders.

Judges prefer the answer shown first (or second) more often than quality explains. Every case is
therefore judged twice, as (A, B) and as (B, A), and the two verdicts (mapped back to the variants)
are combined: a variant wins when it wins both orders, or wins one and ties the other; opposite
verdicts mean the judge followed the position, not the answers, and count as a tie. Both raw verdicts
are kept. The aggregate is B's win rate over A (ties as half), the position-consistency rate (the share
of cases whose two verdicts are identical), and B's length-controlled win rate (keel.evals.verbosity).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from keel.evals.dataset import Case
from keel.evals.judges import Ask, ask_json, case_sections
from keel.evals.verbosity import LengthControlled, length_controlled_win_rate

Verdict = Literal["A", "B", "tie"]

PAIRWISE_RUBRIC = (
    "You are an impartial judge. Compare the two AI assistants' answers to the question below and decide "
    "which is better: more correct against the reference answer when one is given, meeting the criteria "
    "when they are given, otherwise more helpful, accurate and relevant. The order in which the answers are "
    "shown does not matter, and neither does their length: a short correct answer beats a long padded one. "
    'Reply with JSON only: {"verdict": "A" | "B" | "tie", "reason": "<one or two sentences>"}.'
)
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["verdict", "reason"],
          "properties": {"verdict": {"type": "string", "enum": ["A", "B", "tie"]}, "reason": {"type": "string"}}}
_SWAPPED: dict[Verdict, Verdict] = {"A": "B", "B": "A", "tie": "tie"}


def combine(first: Verdict, second: Verdict) -> Verdict:
    """The case's verdict from the (A, B) order's and the (B, A) order's (already mapped back to the
    variants): agreement stands, a win and a tie is that win, opposite wins are a tie."""
    if first == second:
        return first
    if "tie" in (first, second):
        return first if second == "tie" else second
    return "tie"


@dataclass(frozen=True, slots=True)
class PairVerdict:
    case_id: str
    first: Verdict | None  # the judge's verdict with A shown first (None: its answer stayed invalid)
    second: Verdict | None  # with B shown first, mapped back to the variants
    combined: Verdict | None
    reasons: tuple[str, str]
    length_a: int
    length_b: int
    problem: str | None = None

    @property
    def consistent(self) -> bool:
        return self.first is not None and self.first == self.second


@dataclass(frozen=True, slots=True)
class PairwiseReport:
    verdicts: list[PairVerdict]
    wins_a: int
    wins_b: int
    ties: int
    unjudged: int
    win_rate_b: float | None  # B's share of the judged cases, ties as half
    consistency: float | None  # the share of judged cases whose two orders gave the same verdict
    length_controlled: LengthControlled = field(default_factory=lambda: LengthControlled(0, None, None, None))


def report(verdicts: Sequence[PairVerdict]) -> PairwiseReport:
    judged = [v for v in verdicts if v.combined is not None]
    wins_a = sum(v.combined == "A" for v in judged)
    wins_b = sum(v.combined == "B" for v in judged)
    ties = len(judged) - wins_a - wins_b
    outcomes = [{"A": 0.0, "B": 1.0, "tie": 0.5}[v.combined] for v in judged if v.combined is not None]
    return PairwiseReport(
        list(verdicts), wins_a, wins_b, ties, len(verdicts) - len(judged),
        (wins_b + ties / 2) / len(judged) if judged else None,
        sum(v.consistent for v in judged) / len(judged) if judged else None,
        length_controlled_win_rate(outcomes, [float(v.length_b - v.length_a) for v in judged]),
    )


@dataclass
class PairwiseJudge:
    """Judges two answers to one case in both orders (the module's docstring)."""

    model: str
    ask: Ask
    rubric: str = PAIRWISE_RUBRIC
    temperature: float = 0.0
    max_tokens: int = 256

    async def judge(self, case: Case, answer_a: str, answer_b: str) -> PairVerdict:
        (first, why_first, bad_first), (shown_b_first, why_second, bad_second) = await asyncio.gather(
            self._one(case, answer_a, answer_b), self._one(case, answer_b, answer_a))
        second = None if shown_b_first is None else _SWAPPED[shown_b_first]
        both = None if first is None or second is None else combine(first, second)
        problem = "; ".join(p for p in (bad_first, bad_second) if p) or None
        return PairVerdict(case.id, first, second, both, (why_first, why_second), len(answer_a), len(answer_b),
                           problem)

    async def compare(self, pairs: Sequence[tuple[Case, str, str]], *, concurrency: int = 8) -> PairwiseReport:
        """Every (case, answer A, answer B) judged in both orders, `concurrency` cases at a time."""
        gate = asyncio.Semaphore(concurrency)

        async def one(case: Case, a: str, b: str) -> PairVerdict:
            async with gate:
                return await self.judge(case, a, b)

        return report(await asyncio.gather(*(one(*pair) for pair in pairs)))

    async def _one(self, case: Case, first: str, second: str) -> tuple[Verdict | None, str, str | None]:
        shown = [*case_sections(case), f"[The Start of Assistant A's Answer]\n{first}\n[The End of Assistant A's "
                 f"Answer]", f"[The Start of Assistant B's Answer]\n{second}\n[The End of Assistant B's Answer]"]
        asked = await ask_json(self.ask, {
            "model": self.model, "temperature": self.temperature, "max_tokens": self.max_tokens,
            "messages": [{"role": "system", "content": self.rubric}, {"role": "user", "content": "\n\n".join(shown)}],
        }, SCHEMA, "pairwise_verdict")
        if asked.value is None:
            return None, "", f"judge answer invalid: {'; '.join(asked.problems)}"
        verdict: Verdict = asked.value["verdict"]
        return verdict, str(asked.value["reason"]), None
