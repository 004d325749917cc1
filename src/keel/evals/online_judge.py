"""A rubric judge for live calls: the online judge (`review.judge_sample_rate`, keel.evals.review_feed) as
one line, `keel.review.judge = online_judge(keel, "gpt-4o-mini")`.

Each sampled call's last user message is the question and its answer the judged text; there is no
reference, so the rubric judges helpfulness, accuracy and relevance (or what `rubric` says). The judge
asks through `keel` under the feature `keel.judge`, so a budget on that feature caps its spend. Its
verdict (`Score.as_dict()`, with the judge's name under `details.judge_model`) lands on the call's review
item, when the call was sampled for review too, and in the online scores the drift monitor reads.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from keel.evals.dataset import Case
from keel.evals.drift import answer_text
from keel.evals.judges import DEFAULT_RUBRIC, RubricJudge, Scale, judge_ask
from keel.evals.review_feed import JudgeHook
from keel.evals.scoring import Answered
from keel.observability.record import RequestRecord

if TYPE_CHECKING:
    from keel.engine import Keel


def online_judge(keel: Keel, model: str, *, rubric: str = DEFAULT_RUBRIC, scale: Scale = "1-5", pass_at: int = 4,
                 temperature: float = 0.0, max_tokens: int = 256) -> JudgeHook:
    """A JudgeHook scoring each sampled call with a RubricJudge of `model` (a model of keel.yaml)."""
    judge = RubricJudge(model=model, ask=judge_ask(keel), rubric=rubric, scale=scale, pass_at=pass_at,
                        temperature=temperature, max_tokens=max_tokens)

    async def hook(record: RequestRecord) -> Mapping[str, Any] | None:
        messages = [m for m in record.input if isinstance(m, dict)] if isinstance(record.input, list) else []
        output = answer_text(record.output)
        if not messages or output is None:  # no content logged, or a tool call: nothing to judge
            return None
        case = Case(id=record.request_id, messages=tuple(messages))
        score = await judge.score(Answered(case, output, model=record.upstream_model or record.model))
        return score.as_dict()

    return hook
