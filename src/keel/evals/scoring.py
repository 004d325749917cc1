"""What every metric shares: the answer it scores (`Answered`) and the score it gives (`Score`).

A metric is a small object with a `key` (its name and settings: results are cached under it), an
optional `threshold` on its aggregate, and one async method, `score`. Scores are numbers where a
metric measures (a similarity, a latency, a 1 to 5 rubric) and pass/fail where it checks; `passed`
is what pass rates and flipped cases count.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from keel.evals.dataset import Case


@dataclass(slots=True)
class Answered:
    """One case as the target answered it."""

    case: Case
    output: str | None  # the answer's text (tool calls as their JSON); None when the call failed
    answer: dict[str, Any] | None = None  # the whole chat.completion
    latency_ms: float = 0.0
    cost_usd: float = 0.0
    error: str | None = None  # the error code and message when the call failed
    model: str | None = None  # the model that answered (the upstream's own name when it gave one)


@dataclass(slots=True)
class Score:
    value: float | None  # None: the metric could not score this case (the call failed, no reference)
    passed: bool | None = None
    reason: str | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def of(cls, data: dict[str, Any]) -> Score:
        return cls(data.get("value"), data.get("passed"), data.get("reason"), data.get("details") or {})


class Metric(Protocol):
    key: str  # e.g. "exact_match" or "regex:^\\d+$": unique within a suite; results are cached under it
    threshold: float | None  # the aggregate (mean value, or pass rate for checks) the suite must reach

    async def score(self, answered: Answered) -> Score: ...
