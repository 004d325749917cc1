"""The `local` provider with the real embedded model (SmolLM2-135M-Instruct on llama.cpp):
real answers and token counts, seeded determinism, token-by-token streams that stop when
closed, grammar-enforced JSON, an immediate 429 when the queue is full, and clear errors
for prompts that do not fit and for missing files. Ends with the official `openai` SDK
against `keel serve` serving the embedded model.

The model is small and the machine may be busy: answers are capped at a few tokens, and no
test asserts on speed except where the alternative would take many times longer.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
from conftest import GatewayProcess, require_service
from openai import AsyncOpenAI, OpenAI
from spec import CHAT_CHUNK, CHAT_COMPLETION, validate

from keel.config import LocalDeployment, ModelConfig
from keel.cost.tokens import prompt_tokens
from keel.errors import ContextLengthExceeded, ModelNotLoaded, NotSupported, Overloaded
from keel.pipeline import Call, ChunkStream, Completion
from keel.providers.local import LocalProvider, model_file
from keel.types import ChatRequest

pytestmark = pytest.mark.local_model

Factory = Callable[..., Awaitable[LocalProvider]]

COLOURS = [{"role": "user", "content": "Name three colours."}]
STORY = [{"role": "user", "content": "Write a very long story about a dragon, at least 3000 words."}]
MODEL_CONFIG = ModelConfig.model_validate({"name": "local", "deployments": [{"provider": "local"}]})
BOUNDED_SCHEMA = {
    "type": "object",
    "properties": {
        "colour": {"type": "string", "maxLength": 10},
        "count": {"type": "integer", "minimum": 0, "maximum": 9},
    },
    "required": ["colour", "count"],
    "additionalProperties": False,
}


def embedded_model_missing() -> str | None:
    """Why the embedded model cannot run here, or None when it can."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return "llama-cpp-python is not installed (pip install 'keel[local]')"
    try:
        model_file(LocalDeployment(provider="local"))
    except ModelNotLoaded as exc:
        return exc.message
    return None


@pytest.fixture
def needs_model() -> None:
    if (reason := embedded_model_missing()) is not None:
        require_service("the embedded model", reason)


@pytest.fixture
async def local(needs_model: None) -> AsyncIterator[Factory]:
    """Start a provider on the embedded model: `provider = await local(queue_size=1)`."""
    started: list[LocalProvider] = []

    async def start(**config: Any) -> LocalProvider:
        provider = LocalProvider(LocalDeployment(provider="local", **config), "local-test")
        await provider.start()
        started.append(provider)
        return provider

    yield start
    for provider in started:
        await provider.close()


def chat_request(messages: list[dict[str, Any]] = COLOURS, **params: Any) -> ChatRequest:
    return ChatRequest.model_validate({"model": "local", "messages": messages, **params})


def call_for(request: ChatRequest) -> Call:
    return Call(request=request, model=MODEL_CONFIG, deployments=[])


async def plain(provider: LocalProvider, **params: Any) -> dict[str, Any]:
    request = chat_request(**params)
    reply = await provider.chat(request, call_for(request))
    assert isinstance(reply, Completion)
    validate(CHAT_COMPLETION, reply.body)
    return reply.body


async def stream(provider: LocalProvider, **params: Any) -> ChunkStream:
    request = chat_request(stream=True, **params)
    reply = await provider.chat(request, call_for(request))
    assert isinstance(reply, ChunkStream)
    return reply


async def wait_idle(provider: LocalProvider, within_s: float) -> float:
    """Seconds until no call holds or waits for the model; fails after `within_s`."""
    started = time.monotonic()
    while provider.depth:
        assert time.monotonic() - started < within_s, f"the model is still busy after {within_s} s"
        await asyncio.sleep(0.01)
    return time.monotonic() - started


# ---------------------------------------------------------------------------- answers


async def test_plain_answer_has_text_and_real_token_counts(local: Factory) -> None:
    provider = await local()
    body = await plain(provider, max_tokens=16, seed=1, temperature=0)
    message = body["choices"][0]["message"]
    assert message["content"].strip()
    assert message["refusal"] is None
    assert body["id"].startswith("chatcmpl-local-")
    assert body["model"] == "SmolLM2-135M-Instruct"
    usage = body["usage"]
    assert usage["prompt_tokens"] > 5
    assert 1 <= usage["completion_tokens"] <= 16
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


async def test_same_seed_gives_same_answer(local: Factory) -> None:
    provider = await local()
    greedy = [await plain(provider, max_tokens=12, seed=7, temperature=0) for _ in range(2)]
    assert greedy[0]["choices"][0]["message"]["content"] == greedy[1]["choices"][0]["message"]["content"]
    sampled = [await plain(provider, max_tokens=12, seed=42, temperature=1.0) for _ in range(2)]
    assert sampled[0]["choices"][0]["message"]["content"] == sampled[1]["choices"][0]["message"]["content"]


async def test_stream_is_the_plain_answer_token_by_token_with_usage(local: Factory) -> None:
    provider = await local()
    expected = await plain(provider, max_tokens=16, seed=3, temperature=0)
    reply = await stream(provider, max_tokens=16, seed=3, temperature=0, stream_options={"include_usage": True})
    chunks = [chunk async for chunk in reply]
    for chunk in chunks:
        validate(CHAT_CHUNK, chunk)
    assert {chunk["id"] for chunk in chunks} == {chunks[0]["id"]}
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    pieces = [c["choices"][0]["delta"]["content"] for c in chunks[1:] if c["choices"] and c["choices"][0]["delta"]]
    assert len(pieces) > 3, "the answer came in one piece, not token by token"
    assert "".join(pieces) == expected["choices"][0]["message"]["content"]
    assert chunks[-2]["choices"][0]["finish_reason"] == expected["choices"][0]["finish_reason"]
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == expected["usage"]


async def test_stream_always_ends_with_real_usage_for_cost_accounting(local: Factory) -> None:
    provider = await local()
    chunks = [chunk async for chunk in await stream(provider, max_tokens=4, seed=1, temperature=0)]
    assert all(chunk["choices"] for chunk in chunks[:-1])
    assert all(chunk.get("usage") is None for chunk in chunks[:-1])
    assert chunks[-2]["choices"][0]["finish_reason"] in ("stop", "length")
    usage = chunks[-1]["usage"]
    assert chunks[-1]["choices"] == [] and usage["prompt_tokens"] > 5 and 1 <= usage["completion_tokens"] <= 4


async def test_json_schema_is_enforced_by_grammar(local: Factory) -> None:
    provider = await local()
    body = await plain(
        provider, max_tokens=24, seed=1, temperature=0,
        messages=[{"role": "user", "content": "Give a colour and a count as JSON."}],
        response_format={"type": "json_schema", "json_schema": {"name": "pick", "schema": BOUNDED_SCHEMA}},
    )
    assert body["choices"][0]["finish_reason"] == "stop"
    jsonschema.validate(json.loads(body["choices"][0]["message"]["content"]), BOUNDED_SCHEMA)


async def test_json_cut_by_the_token_limit_keeps_finish_reason_length(local: Factory) -> None:
    provider = await local()
    body = await plain(
        provider, max_tokens=4, seed=1, temperature=0,
        messages=[{"role": "user", "content": "Describe a dragon as JSON."}],
        response_format={"type": "json_object"},
    )
    assert body["choices"][0]["finish_reason"] == "length"
    with pytest.raises(json.JSONDecodeError):
        json.loads(body["choices"][0]["message"]["content"])


async def test_tools_are_ignored_and_tool_history_is_read_as_text(local: Factory) -> None:
    provider = await local()
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
    history = [
        {"role": "user", "content": [{"type": "text", "text": "Weather in Paris?"}]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}
        ]},
        {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 21 C"},
    ]
    body = await plain(provider, messages=history, tools=[tool], tool_choice="auto", max_tokens=8, temperature=0)
    assert body["choices"][0]["message"]["content"]
    assert "tool_calls" not in body["choices"][0]["message"]


async def test_what_the_model_cannot_do_is_refused_before_queueing(local: Factory) -> None:
    provider = await local()
    tool = {"type": "function", "function": {"name": "get_weather"}}
    refused: list[dict[str, Any]] = [
        {"functions": [tool["function"]], "function_call": {"name": "get_weather"}},
        {"logprobs": True},
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]},
    ]
    for params in refused:
        with pytest.raises(NotSupported) as caught:
            await plain(provider, **params)
        assert caught.value.status == 400
    assert provider.depth == 0


WEATHER_PARAMETERS = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}},
                      "required": ["city"], "additionalProperties": False}
FORCED_TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER_PARAMETERS}},
                {"type": "function", "function": {"name": "now"}}]


async def test_a_required_tool_call_is_a_grammar_constrained_tool_call(local: Factory) -> None:
    provider = await local()
    weather = [{"role": "user", "content": "What is the weather in Paris?"}]
    body = await plain(provider, messages=weather, tools=FORCED_TOOLS, tool_choice="required", max_tokens=60,
                       temperature=0, seed=1)
    choice = body["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    [call] = choice["message"]["tool_calls"]
    assert call["id"].startswith("call_") and call["type"] == "function"
    assert call["function"]["name"] in ("get_weather", "now")
    arguments = json.loads(call["function"]["arguments"])
    if call["function"]["name"] == "get_weather":
        jsonschema.validate(arguments, WEATHER_PARAMETERS)
    named = {"type": "function", "function": {"name": "get_weather"}}
    reply = await stream(provider, messages=weather, tools=FORCED_TOOLS, tool_choice=named, max_tokens=60,
                         temperature=0, seed=1)
    chunks = [chunk async for chunk in reply]
    for chunk in chunks:
        validate(CHAT_CHUNK, chunk)
    deltas = [c["choices"][0]["delta"]["tool_calls"][0] for c in chunks
              if c["choices"] and c["choices"][0]["delta"].get("tool_calls")]
    assert deltas[0]["index"] == 0 and deltas[0]["id"].startswith("call_")
    assert deltas[0]["function"] == {"name": "get_weather", "arguments": ""}
    jsonschema.validate(json.loads("".join(d["function"]["arguments"] for d in deltas)), WEATHER_PARAMETERS)
    assert reply.finish_reason == "tool_calls"


# ---------------------------------------------------------------------------- the queue


async def test_full_queue_answers_429_at_once(local: Factory) -> None:
    # Each story would hold the model for 20 s at its best speed: a call that queued behind them
    # could not finish within the 5 s safety net, so an answer in time is an answer at once.
    provider = await local(queue_size=1)
    running = await stream(provider, messages=STORY, max_tokens=1500, temperature=0)
    waiting = await stream(provider, messages=STORY, max_tokens=1500, temperature=0)
    with pytest.raises(Overloaded) as caught:
        await asyncio.wait_for(plain(provider, max_tokens=4), 5)
    assert provider.depth == 2  # the refused call took no place in the queue
    assert caught.value.status == 429
    assert caught.value.retry_after > 0
    assert int(caught.value.headers()["retry-after"]) >= 1
    await running.aclose()
    await waiting.aclose()
    await wait_idle(provider, within_s=10)
    assert (await plain(provider, max_tokens=4))["choices"][0]["message"]["content"]


async def test_closing_a_stream_early_frees_the_model(local: Factory) -> None:
    # Run to its end, the story would take 1500 tokens: 20 s at this model's best speed.
    provider = await local()
    reply = await stream(provider, messages=STORY, max_tokens=1500, temperature=0)
    pieces = 0
    async for chunk in reply:
        pieces += bool(chunk["choices"][0]["delta"].get("content"))
        if pieces == 3:
            break
    await reply.aclose()
    assert await wait_idle(provider, within_s=10) < 10
    body = await plain(provider, max_tokens=4)
    assert body["usage"]["completion_tokens"] <= 4


async def test_cancelling_the_consumer_frees_the_model(local: Factory) -> None:
    provider = await local()
    reply = await stream(provider, messages=STORY, max_tokens=1500, temperature=0)
    await reply.prefetch()

    reading = asyncio.Event()

    async def read_all() -> None:
        async for chunk in reply:
            if chunk["choices"][0]["delta"].get("content"):
                reading.set()  # past the prefetched first chunk: chunks come from the model now

    reader = asyncio.create_task(read_all())
    await asyncio.wait_for(reading.wait(), 10)
    reader.cancel()  # it is waiting for its next chunk, or about to: the cancellation lands there
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(reader, 10)
    await wait_idle(provider, within_s=10)  # the story's 1500 tokens would take 20 s


# ---------------------------------------------------------------------------- errors


async def test_prompt_longer_than_the_window_is_context_length_exceeded(local: Factory) -> None:
    provider = await local(n_ctx=256)
    long = [{"role": "user", "content": "Summarise this: " + "the quick brown fox jumps " * 80}]
    with pytest.raises(ContextLengthExceeded) as caught:
        await plain(provider, messages=long, max_tokens=8)
    assert "256" in caught.value.message and caught.value.param == "messages"
    reply = await stream(provider, messages=long, max_tokens=8)
    with pytest.raises(ContextLengthExceeded):
        await reply.prefetch()
    with pytest.raises(ContextLengthExceeded) as caught:
        await plain(provider, max_tokens=250)  # a short prompt, but no room for the answer asked for
    assert caught.value.param == "max_tokens"
    await wait_idle(provider, within_s=5)


async def test_missing_model_file_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "model.gguf"
    provider = LocalProvider(LocalDeployment(provider="local", model_path=str(missing)), "local-test")
    with pytest.raises(ModelNotLoaded) as caught:
        await provider.start()
    assert str(missing) in caught.value.message
    assert caught.value.status == 503


async def test_missing_llama_cpp_says_what_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    weights = tmp_path / "model.gguf"
    weights.write_bytes(b"GGUF")
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # makes `import llama_cpp` fail
    provider = LocalProvider(LocalDeployment(provider="local", model_path=str(weights)), "local-test")
    with pytest.raises(ModelNotLoaded) as caught:
        await provider.start()
    assert "pip install 'keel[local]'" in caught.value.message


# ---------------------------------------------------------------------------- through the gateway


def test_openai_sdk_gets_answers_from_the_embedded_model(
    needs_model: None, gateway: Callable[..., GatewayProcess]
) -> None:
    gw = gateway({"models": [{"name": "local", "deployments": [{"provider": "local"}]}]})
    client = OpenAI(base_url=gw.url + "/v1", api_key="unused", max_retries=0)
    answer = client.chat.completions.create(model="local", messages=COLOURS, max_tokens=8, seed=1, temperature=0)
    assert answer.choices[0].message.content
    assert answer.usage is not None and 1 <= answer.usage.completion_tokens <= 8
    chunks = list(client.chat.completions.create(
        model="local", messages=COLOURS, max_tokens=8, seed=1, temperature=0, stream=True,
        stream_options={"include_usage": True},
    ))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == answer.choices[0].message.content
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == answer.usage.completion_tokens
    asyncio.run(async_sdk_round(gw.url, answer.choices[0].message.content))


def test_client_leaving_a_gateway_stream_frees_the_model(
    needs_model: None, gateway: Callable[..., GatewayProcess]
) -> None:
    # Run to its end, the story would take 1500 tokens: 20 s at this model's best speed.
    gw = gateway({"models": [{"name": "local", "deployments": [{"provider": "local"}]}]})
    body = {"model": "local", "messages": STORY, "max_tokens": 1500, "temperature": 0, "stream": True}
    with httpx.Client(base_url=gw.url, timeout=30) as client:
        with client.stream("POST", "/v1/chat/completions", json=body) as response:
            lines = response.iter_lines()
            assert sum(1 for _, line in zip(range(5), lines, strict=False) if line.startswith("data: ")) >= 2
        started = time.monotonic()
        answer = client.post("/v1/chat/completions", json={"model": "local", "messages": COLOURS, "max_tokens": 4})
        assert answer.status_code == 200
        assert time.monotonic() - started < 10


async def async_sdk_round(url: str, expected: str) -> None:
    async with AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0) as client:
        answer = await client.chat.completions.create(
            model="local", messages=COLOURS, max_tokens=8, seed=1, temperature=0
        )
        assert answer.choices[0].message.content == expected
        pieces = [
            chunk.choices[0].delta.content or ""
            async for chunk in await client.chat.completions.create(
                model="local", messages=COLOURS, max_tokens=8, seed=1, temperature=0, stream=True,
            )
            if chunk.choices
        ]
        assert "".join(pieces) == expected


# ---------------------------------------------------------------------------- the input length guardrail


async def test_the_input_length_limit_counts_with_the_models_own_tokenizer(needs_model: None, tmp_path: Path) -> None:
    """A prompt the (high) estimate puts over the limit is counted exactly before it is refused."""
    pytest.importorskip("presidio_analyzer", reason="the guardrails extra: pip install 'keel[guardrails]'")
    from keel.config import parse_config
    from keel.engine import Keel
    from keel.errors import GuardrailViolation
    from keel.pipeline import Context

    limit = 450
    keel = Keel(parse_config({
        "models": [{"name": "local", "deployments": [{"provider": "local"}],
                    "guardrails": {"input": {"max_input_tokens": limit}}}],
        "store": {"url": f"sqlite:///{tmp_path}/keel.db", "spool_path": str(tmp_path / "spool.jsonl")},
    }))
    await keel.start()
    provider = keel.deployments["local"][0].provider
    assert isinstance(provider, LocalProvider)
    try:
        fits = chat_request([{"role": "user", "content": "hello " * 300}], max_tokens=1)
        exact = provider.count_prompt_tokens(fits)
        assert exact is not None and exact <= limit < prompt_tokens(fits)  # the estimate alone would refuse it
        ctx = Context()
        await keel.handle(fits, ctx)
        (verdict,) = ctx.guardrails
        assert verdict.reasons == [f"{exact} tokens by tokenizer"]

        too_long = chat_request([{"role": "user", "content": "hello " * 600}], max_tokens=1)
        with pytest.raises(GuardrailViolation) as refused:
            await keel.handle(too_long)
        assert f"the prompt has {provider.count_prompt_tokens(too_long)} tokens (counted)" in refused.value.message
    finally:
        await keel.close()
