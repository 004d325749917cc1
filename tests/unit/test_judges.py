"""The rubric judge: structured, validated judge answers (re-asked once, never guessed), the 0..1 scale,
the key, self-preference warnings, the suite factory, and the ask adapter through a real Keel."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson
import pytest
from conftest import RecordingSink

from keel.config import TracingConfig, parse_config
from keel.engine import Keel
from keel.errors import InvalidOutput
from keel.evals.dataset import Case
from keel.evals.judges import JUDGE_FEATURE, RubricJudge, judge_ask
from keel.evals.scoring import Answered
from keel.evals.suite import Suite, SuiteInvalid, build_metrics
from keel.observability.metrics import Metrics
from keel.observability.stage import Observe
from keel.observability.tracing import Tracing

CASE = Case(id="sum", messages=({"role": "user", "content": "What is 2 + 2?"},), reference="4",
            criteria="gives the number")


def body(content: str | None, model: str = "judge-1") -> dict[str, Any]:
    return {"id": "x", "object": "chat.completion", "model": model, "choices": [
        {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": content}}]}


class Scripted:
    """A fake judge model: answers from a script, in order, and keeps every request it was sent."""

    def __init__(self, answers: Sequence[Any], model: str = "judge-1") -> None:
        self.answers = [a if isinstance(a, str) else orjson.dumps(a).decode() for a in answers]
        self.model = model
        self.requests: list[dict[str, Any]] = []

    async def __call__(self, params: dict[str, Any]) -> dict[str, Any]:
        self.requests.append(params)
        return body(self.answers[len(self.requests) - 1], self.model)


def answered(output: str | None = "4", model: str | None = "target-1") -> Answered:
    return Answered(CASE, output, model=model, error=None if output is not None else "upstream_error: 503")


async def test_a_1_to_5_score_is_normalised_to_0_1_and_keeps_the_raw_score_and_reason() -> None:
    for raw, value, passed in ((1, 0.0, False), (3, 0.5, False), (4, 0.75, True), (5, 1.0, True)):
        ask = Scripted([{"score": raw, "reason": "because"}])
        score = await RubricJudge(model="judge", ask=ask).score(answered())
        assert (score.value, score.passed, score.reason) == (value, passed, "because")
        assert score.details["raw_score"] == raw and score.details["asks"] == 1


async def test_the_judge_is_asked_for_schema_bound_json_and_shown_question_reference_criteria_answer() -> None:
    ask = Scripted([{"verdict": "pass", "reason": "right"}])
    score = await RubricJudge(model="judge", ask=ask, scale="pass_fail", max_tokens=64).score(answered("four (4)"))
    assert (score.value, score.passed, score.details["verdict"]) == (1.0, True, "pass")
    sent = ask.requests[0]
    assert sent["model"] == "judge" and sent["max_tokens"] == 64 and sent["temperature"] == 0
    fmt = sent["response_format"]
    assert fmt["type"] == "json_schema" and fmt["json_schema"]["strict"] is True
    assert fmt["json_schema"]["schema"]["properties"]["verdict"]["enum"] == ["pass", "fail"]
    shown = sent["messages"][-1]["content"]
    for part in ("What is 2 + 2?", "[Reference answer]\n4", "[Criteria]\ngives the number", "four (4)"):
        assert part in shown


async def test_an_invalid_judge_answer_is_re_asked_once_with_what_was_wrong() -> None:
    ask = Scripted(['{"score": 9, "reason": "x"}', {"score": 2, "reason": "fixed"}])
    score = await RubricJudge(model="judge", ask=ask).score(answered())
    assert (score.value, score.reason, score.details["asks"]) == (0.25, "fixed", 2)
    again = ask.requests[1]["messages"]
    assert again[-2] == {"role": "assistant", "content": '{"score": 9, "reason": "x"}'}
    assert "$.score: 9 is not one of [1, 2, 3, 4, 5]" in again[-1]["content"]


@pytest.mark.parametrize("answers", [
    ["not json", "still not json"],
    ['{"score": "five", "reason": "x"}', '{"score": 6, "reason": "x"}'],
    ['{"reason": "no score"}', '{"score": 3}'],
])
async def test_a_judge_answer_still_invalid_after_the_re_ask_leaves_the_case_unscored(answers: list[str]) -> None:
    ask = Scripted(answers)
    score = await RubricJudge(model="judge", ask=ask).score(answered())
    assert score.value is None and score.passed is None
    assert score.reason is not None and score.reason.startswith("judge answer invalid: $")
    assert len(ask.requests) == 2


async def test_a_failed_call_is_unscored_without_asking_the_judge() -> None:
    ask = Scripted([])
    score = await RubricJudge(model="judge", ask=ask).score(answered(None))
    assert score.value is None and "503" in (score.reason or "") and ask.requests == []


def test_the_key_names_scale_model_and_rubric_hash_so_a_changed_rubric_is_a_new_metric() -> None:
    a = RubricJudge(model="gpt-4o")
    b = RubricJudge(model="gpt-4o", rubric="Be strict.")
    assert a.key == f"judge:1-5:gpt-4o:{a.rubric_hash}" and len(a.rubric_hash) == 8
    assert a.key != b.key and a.key != RubricJudge(model="claude").key
    assert RubricJudge(model="gpt-4o", scale="pass_fail").key != a.key
    with pytest.raises(ValueError, match="1-5"):
        RubricJudge(model="m", scale="1-10")  # type: ignore[arg-type]


async def test_self_preference_is_warned_on_the_judge_and_in_each_score() -> None:
    judge = RubricJudge(model="gpt-4o", target_model="openai/GPT-4o")  # the suite's target: same model
    assert len(judge.warnings) == 1 and "self-preference" in judge.warnings[0]
    other = RubricJudge(model="judge", ask=Scripted([{"score": 5, "reason": "ok"}] * 2, model="smollm2"))
    assert other.warnings == []
    score = await other.score(answered(model="target-1"))
    assert "warnings" not in score.details
    score = await other.score(answered(model="smollm2"))  # the judge's reply names the judged model
    assert other.warnings and "self-preference" in score.details["warnings"][0]


async def test_an_unbound_judge_says_how_to_bind_it() -> None:
    with pytest.raises(RuntimeError, match="bind"):
        await RubricJudge(model="judge").score(answered())


def test_a_suite_judge_metric_is_built_with_its_rubric_threshold_and_the_suite_judge_model() -> None:
    suite = Suite.model_validate({
        "name": "s", "dataset": "d.jsonl", "target": {"model": "local"}, "judge": {"model": "local"},
        "metrics": [{"type": "judge", "rubric": "Is it polite?", "scale": "pass_fail", "threshold": 0.8}]})
    [judge] = build_metrics(suite)
    assert isinstance(judge, RubricJudge)
    assert (judge.model, judge.rubric, judge.scale, judge.threshold) == ("local", "Is it polite?", "pass_fail", 0.8)
    assert judge.warnings  # the target is the judge
    bad = suite.model_copy(update={"metrics": [suite.metrics[0].model_copy(update={"scale": "stars"})]})
    with pytest.raises(SuiteInvalid, match="scale"):
        build_metrics(bad)


async def test_judge_ask_goes_through_the_pipeline_logged_under_keel_judge() -> None:
    config = parse_config({"models": [{"name": "sim", "deployments": [{"provider": "simulated"}]}]})
    sink = RecordingSink()
    keel = Keel(config, stages=[Observe(sink, Tracing(TracingConfig(to_store=False)), Metrics())])
    try:
        judge = RubricJudge(model="sim", ask=judge_ask(keel))
        score = await judge.score(answered())
        # The simulator answers a json_schema request with the smallest valid instance: score 1.
        assert (score.value, score.details["raw_score"], score.details["asks"]) == (0.0, 1, 1)
        record = sink.only()
        assert (record.feature, record.model) == (JUDGE_FEATURE, "sim")
    finally:
        await keel.close()


async def test_the_pipelines_own_invalid_output_is_an_invalid_judge_answer_not_asked_again() -> None:
    calls = 0

    async def validation_stage_gave_up(params: dict[str, Any]) -> dict[str, Any]:
        nonlocal calls
        calls += 1
        raise InvalidOutput("The model's answer did not match after 3 tries (local): $: cut off")

    score = await RubricJudge(model="judge", ask=validation_stage_gave_up).score(answered())
    assert score.value is None and calls == 1
    assert score.reason == "judge answer invalid: The model's answer did not match after 3 tries (local): $: cut off"
