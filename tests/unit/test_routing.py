"""Each routing strategy's decision on fixed inputs, the config's rules, and the router and cascade
stages in-process with simulated tiers (no network)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import pytest
from conftest import RecordingSink

from keel.config import ConfigError, RouteRuleConfig, TracingConfig, parse_config
from keel.engine import Keel
from keel.errors import KeelError
from keel.observability.metrics import Metrics
from keel.observability.stage import Observe
from keel.observability.tracing import Tracing
from keel.pipeline import Attempt, Call, Completion, Context, Reply
from keel.reliability.breaker import CircuitBreaker
from keel.routing.balance import LoadBalance
from keel.routing.cascade import CascadeRoute, JudgeCheck, LowConfidence, mean_logprob
from keel.routing.complexity import ComplexityRoute, feature_score
from keel.routing.rules import RuleRoute
from keel.types import ChatRequest

FAST = {"name": "fast", "deployments": [{"provider": "simulated", "name": "fast-sim",
                                         "template": "fast: {last_user_message}", "price": {"input": 1, "output": 1}}]}
SMART = {"name": "smart", "deployments": [{"provider": "simulated", "name": "smart-sim",
                                           "template": "smart: {last_user_message}",
                                           "price": {"input": 30, "output": 30}}]}


def call_of(content: str = "hi", **request: Any) -> Call:
    config = parse_config({"models": [FAST, SMART]}, warn_unset_keys=False)
    chat = ChatRequest.model_validate({"model": "auto", "messages": [{"role": "user", "content": content}], **request})
    model = config.model("fast")
    assert model is not None
    return Call(request=chat, model=model, deployments=[])


# ---------------------------------------------------------------------------- config


def test_the_issue_example_parses_as_written() -> None:
    config = parse_config({"models": [
        {"name": "auto", "router": {"strategy": "cascade", "tiers": ["fast", "smart"],
                                    "escalate_on": ["invalid_output", "low_confidence"]}},
        {"name": "fast", "validation": {"max_repairs": 2}, "deployments": [{"provider": "local"}]},
        {"name": "smart", "deployments": [{"provider": "simulated"}]},
    ]}, warn_unset_keys=False)
    auto = config.model("auto")
    assert auto is not None and auto.router is not None and auto.deployments == []
    assert auto.router.escalate_on == ["invalid_output", "low_confidence"]


@pytest.mark.parametrize(("models", "says"), [
    ([{"name": "auto", "router": {"strategy": "rules", "tiers": ["fast"]}, "deployments": [{"provider": "local"}]},
      FAST], "models[0].deployments: a virtual model (with a router section) has no deployments"),
    ([{"name": "auto", "router": {"strategy": "rules", "tiers": ["nope"]}}, FAST],
     "models[0].router.tiers names 'nope', which is not a model of this file"),
    ([{"name": "auto", "router": {"strategy": "rules", "tiers": ["fast"]}},
      {"name": "auto2", "router": {"strategy": "rules", "tiers": ["auto"]}}, FAST],
     "models[1].router.tiers names 'auto', another virtual model"),
    ([{"name": "auto", "router": {"strategy": "cascade", "tiers": ["fast"], "escalate_on": ["judge"]}}, FAST],
     "escalate_on has judge but no judge_model"),
    ([{"name": "auto", "router": {"strategy": "rules", "tiers": ["fast", "smart"],
                                  "rules": [{"tier": "huge"}]}}, FAST, SMART], "rule tier 'huge' is not one of"),
    ([{"name": "auto", "router": {"strategy": "complexity", "tiers": ["fast", "smart"],
                                  "complexity": {"thresholds": [0.3, 0.6]}}}, FAST, SMART],
     "needs one threshold per tier after the first (1), got 2"),
    ([{"name": "auto", "router": {"strategy": "rules", "tiers": ["a", "b"]}},
      {"name": "a", "deployments": [{"provider": "simulated"}]},
      {"name": "b", "deployments": [{"provider": "simulated"}]}],
     "both have a deployment named 'simulated/simulated'"),
    ([{"name": "auto", "router": {"strategy": "guess", "tiers": ["fast"]}}, FAST], "models[0].router.strategy"),
])
def test_bad_router_config_names_the_key_and_the_fix(models: list[Any], says: str) -> None:
    with pytest.raises(ConfigError) as raised:
        parse_config({"models": models}, warn_unset_keys=False)
    assert says in str(raised.value)


# ---------------------------------------------------------------------------- strategies


async def test_rules_pick_the_first_matching_rule_else_the_default() -> None:
    rules = [RouteRuleConfig(tier="smart", tools=True), RouteRuleConfig(tier="smart", features=["code-review"]),
             RouteRuleConfig(tier="smart", min_input_tokens=500), RouteRuleConfig(tier="fast", tenants=["acme"])]
    route = RuleRoute(rules, ["fast", "smart"], default="smart")
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    assert (await route.decide(call_of(tools=[tool]), [])).tier == 1
    tagged = call_of(metadata={"feature": "code-review"})
    assert (await route.decide(tagged, [])).reason == "rule[1]"
    assert (await route.decide(call_of("word " * 800), [])).reason == "rule[2]"
    acme = call_of()
    acme.ctx.tenant = "acme"
    assert (await route.decide(acme, [])).reason == "rule[3]"
    plain = await route.decide(call_of(), [])
    assert (plain.tier, plain.reason) == (1, "default")


async def test_rules_match_json_answers_and_the_feature_from_the_context() -> None:
    route = RuleRoute([RouteRuleConfig(tier="smart", response_format=True, features=["extract"])], ["fast", "smart"])
    asking = call_of(response_format={"type": "json_object"})
    asking.ctx.feature = "extract"
    assert (await route.decide(asking, [])).tier == 1
    assert (await route.decide(call_of(response_format={"type": "text"}), [])).tier == 0


def test_complexity_features_rank_hard_requests_above_easy_ones() -> None:
    easy = feature_score("What is the capital of France?")
    hard = feature_score("Prove that the algorithm below runs in O(n log n) and explain why:\n```\ndef f(x):\n"
                         "    return sorted(x)\n```\nWhat is the worst case? What changes if x is sorted?")
    assert easy < 0.3 < 0.6 < hard <= 1.0


async def test_complexity_picks_the_tier_whose_threshold_the_score_reaches() -> None:
    route = ComplexityRoute([0.5])
    easy = await route.decide(call_of("hello there"), [None, None])  # type: ignore[list-item]
    hard = await route.decide(call_of("Derive and prove the closed form of sum k^2, step by step, and analyze "
                                      "its complexity. ```x = 1```"), [None, None])  # type: ignore[list-item]
    assert (easy.tier, hard.tier) == (0, 1)
    assert easy.reason.startswith("complexity=0.") and float(hard.reason.split("=")[1]) >= 0.5


class FixedEmbedder:
    """Texts containing 'tax' point one way, others the other: the nearest examples are known."""

    async def embed(self, texts: list[str]) -> Any:
        import numpy as np

        class Vectors:
            array = np.array([[1.0, 0.0] if "tax" in t else [0.0, 1.0] for t in texts])

        return Vectors()


async def test_complexity_counts_the_nearest_labelled_examples() -> None:
    from keel.config import RouteExampleConfig
    from keel.routing.complexity import ExampleVote

    examples = [RouteExampleConfig(text="tax on a trust", hard=True),
                RouteExampleConfig(text="tax of gifts", hard=True),
                RouteExampleConfig(text="say hi", hard=False), RouteExampleConfig(text="thanks", hard=False)]
    route = ComplexityRoute([0.4], ExampleVote(examples, FixedEmbedder(), k=2), vote_weight=0.5)
    assert (await route.decide(call_of("my tax"), [None, None])).tier == 1  # type: ignore[list-item]
    assert (await route.decide(call_of("my cat"), [None, None])).tier == 0  # type: ignore[list-item]


async def test_cascade_starts_cheap_and_may_reach_the_top_but_streams_go_top() -> None:
    tiers: list[Any] = [None, None, None]
    plain = await CascadeRoute().decide(call_of(), tiers)
    streamed = await CascadeRoute().decide(call_of(stream=True), tiers)
    assert (plain.tier, plain.highest, streamed.tier, streamed.highest) == (0, 2, 2, 2)


def answer(content: str, logprobs: list[float] | None = None) -> dict[str, Any]:
    lp = {"content": [{"token": "x", "logprob": v} for v in logprobs]} if logprobs is not None else None
    return {"choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "logprobs": lp}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 5}, "model": "m"}


async def test_low_confidence_reads_the_mean_logprob_only_where_given() -> None:
    check = LowConfidence(min_logprob=-1.0)
    assert mean_logprob(answer("x", [-0.5, -2.5])) == pytest.approx(-1.5)
    assert await check(call_of(), answer("x", [-0.5, -2.5])) == "low_confidence"
    assert await check(call_of(), answer("x", [-0.1, -0.3])) is None
    assert await check(call_of(), answer("x")) is None


async def test_the_judge_escalates_on_no_and_keeps_the_answer_when_it_fails() -> None:
    asked: list[tuple[str, str]] = []

    def judge(says: str | Exception) -> Any:
        async def ask(model: str, prompt: str) -> str:
            asked.append((model, prompt))
            if isinstance(says, Exception):
                raise says
            return says
        return ask

    assert await JudgeCheck(judge("No."), "critic")(call_of("2+2?"), answer("5")) == "judge"
    assert await JudgeCheck(judge("yes"), "critic")(call_of("2+2?"), answer("4")) is None
    assert await JudgeCheck(judge(KeelError("down")), "critic")(call_of("2+2?"), answer("4")) is None
    assert asked[0][0] == "critic" and "2+2?" in asked[0][1] and "5" in asked[0][1]


class FakeDeployment:
    def __init__(self, name: str, breaker: CircuitBreaker | None = None) -> None:
        self.name = name
        self.breaker = breaker or CircuitBreaker()


def test_balance_prefers_idle_fast_weighted_deployments_and_skips_open_breakers() -> None:
    now = [0.0]
    opened = CircuitBreaker(failure_threshold=1, cooldown_s=30, clock=lambda: now[0])
    permit = opened.acquire()
    assert permit is not None
    permit.failure()
    a, b, c = FakeDeployment("a"), FakeDeployment("b"), FakeDeployment("c", opened)
    balance = LoadBalance(halflife=1)
    balance.finished("a", [Attempt("a", started=0.0, ended=0.2)])
    balance.finished("b", [Attempt("b", started=0.0, ended=0.1)])
    order = balance.order([a, b, c])  # type: ignore[list-item]
    assert [d.name for d in order] == ["b", "a", "c"]
    balance.started("b")
    balance.started("b")  # b: 3 x 0.1 s expected against a: 1 x 0.2 s
    assert [d.name for d in balance.order([a, b, c])][:2] == ["a", "b"]  # type: ignore[list-item]
    weighted = LoadBalance(weights={"a": 4.0}, halflife=1)
    weighted.finished("a", [Attempt("a", started=0.0, ended=0.2)])
    weighted.finished("b", [Attempt("b", started=0.0, ended=0.1)])
    assert weighted.order([a, b])[0].name == "a"  # type: ignore[list-item]


def test_balance_latency_is_a_moving_average() -> None:
    balance = LoadBalance(halflife=1)  # each new sample counts half
    for ms in (100, 300):
        balance.finished("a", [Attempt("a", started=0.0, ended=ms / 1000)])
    assert balance.loads["a"].latency_s == pytest.approx(0.2)
    assert balance.loads["a"].in_flight == 0


# ---------------------------------------------------------------------------- the stages, in-process


def keel_with(router: Mapping[str, Any], *more: dict[str, Any], **top: Any) -> tuple[Keel, RecordingSink]:
    config = parse_config({"models": [{"name": "auto", "router": dict(router)}, FAST, SMART, *more], **top},
                          warn_unset_keys=False)
    sink = RecordingSink()
    observe = Observe(sink, Tracing(TracingConfig(to_store=False)), Metrics())
    return Keel(config, stages=[observe]), sink


async def test_a_routed_call_answers_from_the_tier_and_records_the_route() -> None:
    keel, sink = keel_with({"strategy": "complexity", "tiers": ["fast", "smart"], "complexity": {"thresholds": [0.5]}})
    async with keel:
        easy = await keel.chat(model="auto", messages=[{"role": "user", "content": "hi"}])
        plain = await keel.chat(model="smart", messages=[{"role": "user", "content": "hi"}])
    assert easy.choices[0].message.content == "fast: hi" and plain.choices[0].message.content == "smart: hi"
    routed, direct = sink.records
    assert routed.model == "auto" and routed.deployment == "fast-sim"
    assert routed.metadata is not None and routed.metadata["keel.route"]["model"] == "fast"
    assert routed.metadata["keel.route"]["reason"].startswith("complexity=")
    assert direct.metadata is None or "keel.route" not in direct.metadata


async def test_a_cascade_escalation_is_an_attempt_and_is_priced() -> None:
    judge = {"name": "critic", "deployments": [{"provider": "simulated", "name": "critic-sim", "template": "no"}]}
    keel, sink = keel_with({"strategy": "cascade", "tiers": ["fast", "smart"], "escalate_on": ["judge"],
                            "judge_model": "critic"}, judge)
    async with keel:
        reply = await keel.chat(model="auto", messages=[{"role": "user", "content": "hard one"}])
        direct = await keel.chat(model="smart", messages=[{"role": "user", "content": "hard one"}])
    assert reply.choices[0].message.content == "smart: hard one"
    routed = next(r for r in sink.records if r.model == "auto")
    smart_only = next(r for r in sink.records if r.model == "smart")
    assert [a["deployment"] for a in routed.attempt_log] == ["fast-sim", "smart-sim"]
    assert routed.metadata is not None and routed.metadata["keel.route"]["escalations"] == 1
    assert routed.metadata["keel.route"]["reason"] == "cascade,fast:judge"
    assert routed.cost_nanousd > smart_only.cost_nanousd > 0  # the fast answer is billed too
    assert direct.choices[0].message.content == "smart: hard one"
    assert any(r.feature == "keel.router" and r.model == "critic" for r in sink.records)


async def test_an_invalid_output_from_the_cheap_tier_escalates() -> None:
    failing = {"fast": True}

    class InvalidFromFast:
        async def __call__(self, call: Call, next: Any) -> Reply:
            if call.model.name == "fast" and failing["fast"]:
                error = KeelError("the answer does not match the schema at $.name")
                error.code = "invalid_output"
                raise error
            return await next(call)

    config = parse_config({"models": [{"name": "auto", "router": {"strategy": "cascade", "tiers": ["fast", "smart"]}},
                                      FAST, SMART]}, warn_unset_keys=False)
    keel = Keel(config, stages=[InvalidFromFast()])
    async with keel:
        reply = await keel.handle(ChatRequest.model_validate(
            {"model": "auto", "messages": [{"role": "user", "content": "x"}]}), ctx := Context())
    assert isinstance(reply, Completion) and reply.body["choices"][0]["message"]["content"] == "smart: x"
    assert ctx.route is not None and ctx.route.reason == "cascade,fast:invalid_output"
    assert ctx.route.tried == ["fast", "smart"]


async def test_budget_downgrade_routes_a_tier_down_past_an_alert_threshold() -> None:
    keel, sink = keel_with({"strategy": "rules", "tiers": ["fast", "smart"], "default_tier": "smart",
                            "budget_downgrade": True},
                           budgets=[{"scope": "global", "limit_usd": 0.01, "alert_at": [0.3, 1.0]}])
    async with keel:
        replies = [await keel.chat(model="auto", messages=[{"role": "user", "content": "word " * 20}], max_tokens=5)
                   for _ in range(5)]
    routes = [r.metadata["keel.route"]["reason"] for r in sink.records if r.metadata]
    assert routes[0] == "default" and replies[0].choices[0].message.content.startswith("smart")
    assert routes[-1] == "default,budget" and replies[-1].choices[0].message.content.startswith("fast")


async def test_embeddings_to_a_virtual_model_are_refused_with_its_tiers() -> None:
    keel, _ = keel_with({"strategy": "rules", "tiers": ["fast", "smart"]})
    async with keel:
        with pytest.raises(KeelError, match=r"virtual model for chat completions.*fast, smart"):
            await keel.embeddings(model="auto", input=["x"])


async def test_the_validation_stage_giving_up_on_the_cheap_tier_escalates_and_both_are_billed() -> None:
    broken = {"name": "fast", "validation": {"max_repairs": 1}, "deployments": [
        {"provider": "simulated", "name": "fast-sim", "invalid_json_rate": 1.0, "seed": 1,
         "template": '{{"answer": "fast"}}', "price": {"input": 1, "output": 1}}]}
    sound = {"name": "smart", "deployments": [{"provider": "simulated", "name": "smart-sim",
                                               "template": '{{"answer": "smart"}}',
                                               "price": {"input": 30, "output": 30}}]}
    config = parse_config({"models": [{"name": "auto", "router": {"strategy": "cascade", "tiers": ["fast", "smart"],
                                                                  "escalate_on": ["invalid_output"]}},
                                      broken, sound]}, warn_unset_keys=False)
    sink = RecordingSink()
    keel = Keel(config, stages=[Observe(sink, Tracing(TracingConfig(to_store=False)), Metrics())])
    async with keel:
        reply = await keel.chat(model="auto", messages=[{"role": "user", "content": "json please"}],
                                response_format={"type": "json_object"})
        await keel.chat(model="smart", messages=[{"role": "user", "content": "json please"}],
                        response_format={"type": "json_object"})
    content = reply.choices[0].message.content or ""
    assert isinstance(json.loads(content), dict) and "smart" in content and "fast" not in content
    record, smart_only = sink.records
    assert [a["deployment"] for a in record.attempt_log] == ["fast-sim", "fast-sim", "smart-sim"]
    assert record.metadata is not None and record.metadata["keel.route"]["reason"] == "cascade,fast:invalid_output"
    assert record.outcome == "ok" and record.cost_nanousd > smart_only.cost_nanousd > 0  # the broken answers too
