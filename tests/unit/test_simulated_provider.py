"""The simulated provider: answers like a model, fails on purpose at the configured rates,
reproducibly, with the errors a real upstream produces; and the pipeline copes with it."""

from __future__ import annotations

import asyncio
import base64
import json
import math
import random
import struct
import time
from collections.abc import AsyncIterator
from typing import Any

import jsonschema
import pytest

from keel.config import ConfigError, LatencyDistribution, ModelConfig, SimulatedDeployment, parse_config
from keel.engine import Keel
from keel.errors import (
    InvalidOutput,
    KeelError,
    NotSupported,
    UpstreamBadRequest,
    UpstreamConnectionError,
    UpstreamError,
    UpstreamMalformed,
    UpstreamRateLimited,
    UpstreamServerError,
    UpstreamTimeout,
)
from keel.pipeline import Call, ChunkStream, Completion
from keel.providers.simulated import (
    HANG_S,
    MAX_DIMENSIONS,
    MAX_INSTANCE_CHARS,
    InstanceTooLarge,
    SimulatedProvider,
    draw_latency_ms,
    minimal_instance,
)
from keel.types import ChatCompletion, ChatRequest, EmbeddingRequest

# ---------------------------------------------------------------------------- helpers


SAFETY_NET_S = 5.0  # what a broken test waits at most: far above any wait under test


class Sleeps:
    """The provider's waits (`sleep=`), recorded in seconds: each returns at once, or, with `hold`,
    when the test sets `released`, so a test sees what waits and on what without a clock."""

    def __init__(self, hold: bool = False) -> None:
        self.seconds: list[float] = []
        self.requested = asyncio.Event()
        self.released = asyncio.Event()
        if not hold:
            self.released.set()

    async def __call__(self, seconds: float) -> None:
        self.seconds.append(seconds)
        self.requested.set()
        await self.released.wait()


def provider(sleep: Sleeps | None = None, **config: Any) -> SimulatedProvider:
    deployment = SimulatedDeployment.model_validate({"provider": "simulated", **config})
    return SimulatedProvider(deployment, "sim", sleep=sleep or asyncio.sleep)


def unvalidated_provider(template: str) -> SimulatedProvider:
    """A config that skipped validation (built in code): the provider must still refuse the template."""
    return SimulatedProvider(SimulatedDeployment.model_construct(provider="simulated", template=template), "sim")


def chat_request(text: str = "hello there", **fields: Any) -> ChatRequest:
    body: dict[str, Any] = {"model": "sim", "messages": [{"role": "user", "content": text}], **fields}
    return ChatRequest.model_validate(body)


def call_for(request: ChatRequest | EmbeddingRequest) -> Call:
    model = ModelConfig.model_validate({"name": "sim", "deployments": [{"provider": "simulated"}]})
    return Call(request=request, model=model, deployments=[])


async def complete(sim: SimulatedProvider, request: ChatRequest) -> dict[str, Any]:
    reply = await sim.chat(request, call_for(request))
    assert isinstance(reply, Completion)
    return reply.body


async def stream(sim: SimulatedProvider, request: ChatRequest) -> tuple[ChunkStream, list[dict[str, Any]]]:
    reply = await sim.chat(request, call_for(request))
    assert isinstance(reply, ChunkStream)
    return reply, [chunk async for chunk in reply]


async def outcome(sim: SimulatedProvider, request: ChatRequest) -> str:
    try:
        await sim.chat(request, call_for(request))
    except KeelError as exc:
        return f"{type(exc).__name__}{getattr(exc, 'upstream_status', '')}"
    return "ok"


async def embed(sim: SimulatedProvider, **fields: Any) -> dict[str, Any]:
    request = EmbeddingRequest.model_validate({"model": "sim", **fields})
    reply = await sim.embed(request, call_for(request))
    return reply.body


def content_of(body: dict[str, Any]) -> Any:
    return body["choices"][0]["message"]["content"]


# ---------------------------------------------------------------------------- the answer's text


async def test_default_template_echoes_the_last_user_message() -> None:
    request = ChatRequest.model_validate({"model": "sim", "messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": [{"type": "text", "text": "second "}, {"type": "text", "text": "question"}]},
    ]})
    body = await complete(provider(), request)
    assert content_of(body) == "echo: second question"
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["object"] == "chat.completion"
    assert body["id"].startswith("chatcmpl-sim-")


async def test_template_fills_model_and_message_count() -> None:
    sim = provider(model="fake-4", template="{model} saw {message_count} messages, last: {last_user_message}")
    body = await complete(sim, chat_request("hi"))
    assert content_of(body) == "fake-4 saw 1 messages, last: hi"
    assert body["model"] == "fake-4"


async def test_braces_in_the_user_message_are_echoed_not_interpreted() -> None:
    body = await complete(provider(), chat_request("{model} {0} {{x}}"))
    assert content_of(body) == "echo: {model} {0} {{x}}"


@pytest.mark.parametrize("template, named", [
    ("hello {name}", "{name}"),
    ("{last_user_message} {}", "{}"),
    ("{model.__class__}", "{model.__class__}"),
])
def test_unknown_placeholder_fails_at_construction_naming_it(template: str, named: str) -> None:
    with pytest.raises(ValueError, match="unknown placeholder") as info:
        unvalidated_provider(template)
    assert named in str(info.value)
    assert "{last_user_message}" in str(info.value)  # says what is allowed


def test_broken_template_fails_at_construction() -> None:
    with pytest.raises(ValueError, match="not a valid template"):
        unvalidated_provider("echo: {last_user_message")
    with pytest.raises(ValueError, match="cannot be filled in"):
        unvalidated_provider("{message_count:q}")


def test_unknown_placeholder_stops_the_engine_at_start_up() -> None:
    config = {"models": [{"name": "m", "deployments": [{"provider": "simulated", "template": "hi {colour}"}]}]}
    with pytest.raises((ConfigError, ValueError), match=r"\{colour\}"):
        Keel(parse_config(config))


async def test_usage_counts_prompt_words_and_answer_words() -> None:
    request = ChatRequest.model_validate({"model": "sim", "messages": [
        {"role": "system", "content": "you are terse"},
        {"role": "user", "content": "one two three"},
    ]})
    body = await complete(provider(), request)
    assert content_of(body) == "echo: one two three"
    assert body["usage"] == {"prompt_tokens": 6, "completion_tokens": 4, "total_tokens": 10}


async def test_prompt_tokens_are_at_least_one() -> None:
    body = await complete(provider(), chat_request(""))
    assert body["usage"]["prompt_tokens"] == 1


# ---------------------------------------------------------------------------- faults


async def test_same_seed_gives_the_same_outcomes_over_200_calls() -> None:
    errors = {"500": 0.1, "503": 0.15, "429": 0.1, "reset": 0.05, "malformed": 0.05, "cut": 0.05}
    first, second = provider(seed=1234, errors=errors), provider(seed=1234, errors=errors)
    request = chat_request()
    a = [await outcome(first, request) for _ in range(200)]
    b = [await outcome(second, request) for _ in range(200)]
    assert a == b
    assert len(set(a)) == 6  # ok and every error class showed up: the sequence is not trivial
    other = provider(seed=4321, errors=errors)
    assert [await outcome(other, request) for _ in range(200)] != a


async def test_overlapping_calls_get_outcomes_in_call_order() -> None:
    errors = {"503": 0.5}
    sequential = provider(seed=7, errors=errors, latency_ms=0)
    expected = [await outcome(sequential, chat_request()) for _ in range(50)]
    # Latency varies per call, so calls finish out of order; outcomes still follow call order.
    concurrent = provider(seed=7, errors=errors, latency_ms={"kind": "uniform", "min_ms": 0, "max_ms": 20})
    got = await asyncio.gather(*(outcome(concurrent, chat_request()) for _ in range(50)))
    assert list(got) == expected


async def test_observed_503_share_is_close_to_the_configured_rate() -> None:
    sim = provider(seed=99, errors={"503": 0.3})
    outcomes = [await outcome(sim, chat_request()) for _ in range(2000)]
    share = outcomes.count("UpstreamServerError503") / len(outcomes)
    assert abs(share - 0.3) < 0.04
    assert set(outcomes) == {"ok", "UpstreamServerError503"}


async def test_error_rate_means_500s() -> None:
    sim = provider(seed=3, error_rate=1.0)
    with pytest.raises(UpstreamServerError) as info:
        await complete(sim, chat_request())
    assert info.value.upstream_status == 500
    assert info.value.retryable and info.value.fallback


async def test_no_faults_configured_means_every_call_answers() -> None:
    sim = provider(seed=5)
    assert {await outcome(sim, chat_request()) for _ in range(100)} == {"ok"}


@pytest.mark.parametrize("fault, error", [
    ("500", UpstreamServerError),
    ("503", UpstreamServerError),
    ("429", UpstreamRateLimited),
    ("reset", UpstreamConnectionError),
    ("malformed", UpstreamMalformed),
    ("cut", UpstreamConnectionError),
])
async def test_each_fault_raises_its_error_class(fault: str, error: type[UpstreamError]) -> None:
    sim = provider(errors={fault: 1.0}, retry_after_s=2.5)
    with pytest.raises(error) as info:
        await complete(sim, chat_request())
    assert info.value.deployment == "sim"
    if fault in ("500", "503"):
        assert getattr(info.value, "upstream_status", None) == int(fault)
    if fault == "429":
        assert getattr(info.value, "retry_after", None) == 2.5


async def test_embeddings_fail_like_chat() -> None:
    with pytest.raises(UpstreamRateLimited):
        await embed(provider(errors={"429": 1.0}), input="x")


async def test_hang_never_answers_and_ends_when_cancelled() -> None:
    sim = provider(errors={"hang": 1.0})
    with pytest.raises(TimeoutError):  # a deadline's cancellation ends the day-long wait at once
        await asyncio.wait_for(sim.chat(chat_request(), call_for(chat_request())), timeout=0.1)


@pytest.mark.parametrize("streamed", [False, True])
async def test_hang_waits_a_day_before_any_answer_or_first_chunk(streamed: bool) -> None:
    sleeps = Sleeps(hold=True)
    sim = provider(sleeps, errors={"hang": 1.0})
    task = asyncio.ensure_future(stream(sim, chat_request(stream=True)) if streamed else complete(sim, chat_request()))
    await asyncio.wait_for(sleeps.requested.wait(), SAFETY_NET_S)
    assert sleeps.seconds == [HANG_S]  # the only wait: no latency configured, and no chunk came before it
    assert not task.done()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):  # nothing in the provider holds on to a cancelled call
        await asyncio.wait_for(task, SAFETY_NET_S)


async def test_stream_cut_yields_about_half_then_drops_the_connection() -> None:
    sim = provider(errors={"cut": 1.0})
    request = chat_request("a b c d e f g h", stream=True)
    reply = await sim.chat(request, call_for(request))
    assert isinstance(reply, ChunkStream)
    received: list[dict[str, Any]] = []
    with pytest.raises(UpstreamConnectionError):
        async for chunk in reply:
            received.append(chunk)
    # the role chunk, then half of the 9 words; never the finish chunk
    assert len(received) == 1 + 4
    assert all(chunk["choices"][0]["finish_reason"] is None for chunk in received)
    assert "".join(reply.content) == "echo: a b c "
    assert isinstance(reply.error, UpstreamConnectionError)


async def test_stream_malformed_fails_before_the_first_chunk() -> None:
    sim = provider(errors={"malformed": 1.0})
    request = chat_request(stream=True)
    reply = await sim.chat(request, call_for(request))
    assert isinstance(reply, ChunkStream)
    with pytest.raises(UpstreamMalformed):
        await reply.prefetch()


async def test_stream_status_faults_fail_before_the_stream_starts() -> None:
    sim = provider(errors={"503": 1.0})
    with pytest.raises(UpstreamServerError):
        await sim.chat(chat_request(stream=True), call_for(chat_request(stream=True)))


# ---------------------------------------------------------------------------- latency


async def test_fixed_latency_delays_the_answer() -> None:
    sleeps = Sleeps(hold=True)
    task = asyncio.ensure_future(complete(provider(sleeps, latency_ms=150), chat_request()))
    await asyncio.wait_for(sleeps.requested.wait(), SAFETY_NET_S)
    assert sleeps.seconds == [0.15]
    assert not task.done()  # the answer waits for the latency
    sleeps.released.set()
    assert content_of(await asyncio.wait_for(task, SAFETY_NET_S)) == "echo: hello there"


async def test_latency_applies_before_a_failure_too() -> None:
    sim = provider(latency_ms=100, errors={"503": 1.0})
    started = time.monotonic()
    with pytest.raises(UpstreamServerError):
        await complete(sim, chat_request())
    assert time.monotonic() - started >= 0.09


async def test_stream_waits_for_latency_plus_ttft_then_token_delays() -> None:
    sleeps = Sleeps()
    sim = provider(sleeps, latency_ms=50, ttft_ms=100, token_delay_ms=30)
    request = chat_request("one two three four", stream=True)  # 5 words with "echo:"
    reply = await sim.chat(request, call_for(request))
    assert isinstance(reply, ChunkStream)
    assert sleeps.seconds == [0.05]  # the latency, before the stream starts
    await reply.prefetch()
    assert sleeps.seconds == [0.05, 0.1]  # then the time to the first chunk
    waits_before_each_word: list[int] = []
    async for chunk in reply:
        if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
            waits_before_each_word.append(len(sleeps.seconds))
    assert sleeps.seconds == [0.05, 0.1] + [0.03] * 5
    assert waits_before_each_word == [3, 4, 5, 6, 7]  # a token delay before each word, not all up front


def test_latency_distributions_stay_inside_their_bounds() -> None:
    rng = random.Random(0)
    normal = LatencyDistribution(kind="normal", mean_ms=50, stddev_ms=1000, min_ms=10, max_ms=60)
    samples = [draw_latency_ms(normal, rng) for _ in range(2000)]
    assert min(samples) == 10 and max(samples) == 60
    uniform = LatencyDistribution(kind="uniform", min_ms=20, max_ms=40)
    samples = [draw_latency_ms(uniform, rng) for _ in range(2000)]
    assert 20 <= min(samples) and max(samples) <= 40
    assert abs(sum(samples) / len(samples) - 30) < 1


def test_latency_is_never_negative() -> None:
    rng = random.Random(1)
    wide = LatencyDistribution(kind="normal", mean_ms=1, stddev_ms=100)
    assert min(draw_latency_ms(wide, rng) for _ in range(1000)) == 0.0


def test_lognormal_latency_has_the_configured_mean() -> None:
    rng = random.Random(2)
    spec = LatencyDistribution(kind="lognormal", mean_ms=200, stddev_ms=100)
    samples = [draw_latency_ms(spec, rng) for _ in range(20000)]
    assert abs(sum(samples) / len(samples) - 200) < 10
    assert min(samples) > 0


def test_fixed_distribution_is_its_mean() -> None:
    spec = LatencyDistribution(kind="fixed", mean_ms=42)
    assert draw_latency_ms(spec, random.Random()) == 42


# ---------------------------------------------------------------------------- response_format


async def test_json_object_answer_is_a_json_object_with_the_echo() -> None:
    body = await complete(provider(), chat_request("hi \"you\"", response_format={"type": "json_object"}))
    assert json.loads(content_of(body)) == {"echo": 'echo: hi "you"'}


PERSON_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 3},
        "age": {"type": "integer", "minimum": 18, "maximum": 130},
        "score": {"type": "number", "exclusiveMinimum": 0.5, "exclusiveMaximum": 1},
        "debt": {"type": "number", "maximum": -10},
        "active": {"type": "boolean"},
        "role": {"enum": ["admin", "user"]},
        "kind": {"const": "person"},
        "tags": {"type": "array", "items": {"type": "string"}, "minItems": 2},
        "address": {"$ref": "#/$defs/address"},
        "nickname": {"type": ["string", "null"]},
        "born": {"type": "string", "format": "date"},
        "pet": {"anyOf": [{"type": "null"}, {"$ref": "#/$defs/address"}]},
        "both": {"allOf": [{"$ref": "#/$defs/place"}, {"required": ["zip"], "properties": {"zip": {
            "type": "integer", "multipleOf": 7, "minimum": 10}}}]},
        "optional": {"type": "string"},
    },
    "required": ["name", "age", "score", "debt", "active", "role", "kind", "tags", "address", "nickname", "born",
                 "pet", "both"],
    "additionalProperties": False,
    "$defs": {
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "lines": {"type": "array", "items": {"type": "string"}}},
            "required": ["city", "lines"],
            "additionalProperties": False,
        },
        "place": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


async def test_json_schema_answer_validates_against_the_schema() -> None:
    response_format = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON_SCHEMA}}
    body = await complete(provider(), chat_request(response_format=response_format))
    answer = json.loads(content_of(body))
    jsonschema.validate(answer, PERSON_SCHEMA, format_checker=jsonschema.FormatChecker())
    assert "optional" not in answer  # minimal: required properties only
    assert answer["kind"] == "person" and answer["age"] == 18 and answer["both"]["zip"] == 14


@pytest.mark.parametrize("schema", [
    {"type": "integer", "exclusiveMinimum": 3},
    {"type": "integer", "exclusiveMaximum": -3},
    {"type": "number", "minimum": 2.5},
    {"type": "number", "minimum": -5, "maximum": -1},
    {"type": "string", "format": "email"},
    {"type": "array", "prefixItems": [{"type": "integer"}, {"type": "string"}], "minItems": 3},
    {"type": "object", "properties": {"a": {"type": "string"}, "b": {"type": "integer"}}, "minProperties": 1},
    {"properties": {"x": {"type": "boolean"}}, "required": ["x"]},
    {"type": "object", "additionalProperties": {"type": "integer"}, "required": ["n"]},
    {"oneOf": [{"type": "string", "minLength": 2}, {"type": "integer"}]},
    {},
])
def test_minimal_instance_is_valid(schema: dict[str, Any]) -> None:
    jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker()).validate(
        minimal_instance(schema)
    )


def test_minimal_instance_understands_draft4_exclusive_flags() -> None:
    schema = {"type": "integer", "minimum": 0, "exclusiveMinimum": True}
    value = minimal_instance(schema)
    jsonschema.Draft4Validator(schema).validate(value)
    assert value == 1


# ---------------------------------------------------------------------------- tools

WEATHER_TOOL: dict[str, Any] = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object",
    "properties": {"city": {"type": "string", "minLength": 1}, "unit": {"enum": ["c", "f"]}},
    "required": ["city", "unit"],
}}}
TIME_TOOL: dict[str, Any] = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"type": "string"}}, "required": ["zone"]}}}


def assert_tool_call(body: dict[str, Any], name: str) -> dict[str, Any]:
    choice = body["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] is None
    [tool_call] = choice["message"]["tool_calls"]
    assert tool_call["id"].startswith("call_") and len(tool_call["id"]) > len("call_")
    int(tool_call["id"].removeprefix("call_"), 16)
    assert tool_call["type"] == "function" and tool_call["function"]["name"] == name
    arguments: dict[str, Any] = json.loads(tool_call["function"]["arguments"])
    return arguments


async def test_tool_choice_required_answers_with_a_valid_tool_call() -> None:
    body = await complete(provider(), chat_request(tools=[WEATHER_TOOL, TIME_TOOL], tool_choice="required"))
    arguments = assert_tool_call(body, "get_weather")
    jsonschema.validate(arguments, WEATHER_TOOL["function"]["parameters"])


async def test_named_tool_choice_calls_that_function() -> None:
    choice = {"type": "function", "function": {"name": "get_time"}}
    body = await complete(provider(), chat_request(tools=[WEATHER_TOOL, TIME_TOOL], tool_choice=choice))
    assert assert_tool_call(body, "get_time") == {"zone": ""}


async def test_call_prefix_picks_the_function_it_names() -> None:
    body = await complete(provider(), chat_request("call get_time please", tools=[WEATHER_TOOL, TIME_TOOL]))
    assert_tool_call(body, "get_time")
    body = await complete(provider(), chat_request("call something", tools=[WEATHER_TOOL, TIME_TOOL]))
    assert_tool_call(body, "get_weather")


async def test_tools_without_a_reason_to_call_answer_with_text() -> None:
    body = await complete(provider(), chat_request("hello", tools=[WEATHER_TOOL]))
    assert content_of(body) == "echo: hello"
    body = await complete(provider(), chat_request("call get_weather", tools=[WEATHER_TOOL], tool_choice="none"))
    assert content_of(body) == "echo: call get_weather"


async def test_naming_a_missing_function_is_refused_as_a_bad_request() -> None:
    choice = {"type": "function", "function": {"name": "nope"}}
    with pytest.raises(UpstreamBadRequest, match="nope"):
        await complete(provider(), chat_request(tools=[WEATHER_TOOL], tool_choice=choice))


async def test_streamed_tool_call_adds_up_to_the_same_call() -> None:
    request = chat_request(tools=[WEATHER_TOOL], tool_choice="required", stream=True)
    reply, chunks = await stream(provider(), request)
    assert chunks[0]["choices"][0]["delta"]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": ""}
    message = reply.message()
    assert message["content"] is None
    [tool_call] = message["tool_calls"]
    assert tool_call["id"].startswith("call_") and tool_call["function"]["name"] == "get_weather"
    jsonschema.validate(json.loads(tool_call["function"]["arguments"]), WEATHER_TOOL["function"]["parameters"])
    assert reply.finish_reason == "tool_calls"


# ---------------------------------------------------------------------------- max_tokens


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
async def test_output_limit_truncates_to_that_many_words(field: str) -> None:
    body = await complete(provider(), chat_request("a b c d e", **{field: 3}))
    assert content_of(body) == "echo: a b "
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 3


async def test_output_limit_above_the_answer_changes_nothing() -> None:
    body = await complete(provider(), chat_request("a b", max_tokens=50))
    assert content_of(body) == "echo: a b"
    assert body["choices"][0]["finish_reason"] == "stop"


async def test_truncated_stream_ends_with_length() -> None:
    reply, chunks = await stream(provider(), chat_request("a b c d e", max_tokens=2, stream=True))
    assert len(chunks) == 1 + 2 + 1 + 1  # role, two words, finish, usage
    assert "".join(reply.content) == "echo: a "
    assert reply.finish_reason == "length"


# ---------------------------------------------------------------------------- streaming


@pytest.mark.parametrize("text", ["hello world", "  spaced   out\ttext \n", "", "one"])
async def test_stream_joins_to_the_non_streamed_text(text: str) -> None:
    sim = provider(template="{last_user_message}")
    body = await complete(sim, chat_request(text))
    reply, _ = await stream(sim, chat_request(text, stream=True))
    assert "".join(reply.content) == content_of(body) == text


async def test_stream_chunks_have_the_openai_shape() -> None:
    sim = provider(model="sim-1")
    _, chunks = await stream(sim, chat_request("x y", stream=True))
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert [c["choices"][0]["delta"].get("content") for c in chunks[1:-2]] == ["echo: ", "x ", "y"]
    assert chunks[-2]["choices"][0] == {"index": 0, "delta": {}, "finish_reason": "stop", "logprobs": None}
    # The usage chunk always ends a provider's stream (cost needs it); the engine hides it from
    # clients that did not ask (test_engine_hides_the_usage_chunk_unless_asked).
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 3
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith("chatcmpl-sim-")
    assert {c["model"] for c in chunks} == {"sim-1"}
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert abs(chunks[0]["created"] - time.time()) < 5
    assert all(c["usage"] is None for c in chunks[:-1])


async def test_include_usage_adds_a_usage_only_last_chunk() -> None:
    request = chat_request("x y z", stream=True, stream_options={"include_usage": True})
    reply, chunks = await stream(provider(), request)
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert reply.usage == chunks[-1]["usage"]


# ---------------------------------------------------------------------------- embeddings


def norm(vector: list[float]) -> float:
    return math.sqrt(sum(x * x for x in vector))


async def test_embeddings_are_deterministic_unit_vectors() -> None:
    body = await embed(provider(seed=None), input=["alpha", "beta", "alpha"])
    vectors = [item["embedding"] for item in body["data"]]
    assert [item["index"] for item in body["data"]] == [0, 1, 2]
    assert all(len(v) == 64 for v in vectors)
    assert all(abs(norm(v) - 1) < 1e-5 for v in vectors)
    assert vectors[0] == vectors[2] != vectors[1]
    again = await embed(provider(), input="alpha")  # another instance, any seed: the same vector
    assert again["data"][0]["embedding"] == vectors[0]
    assert body["object"] == "list" and body["model"] == "simulated"
    assert body["usage"] == {"prompt_tokens": 3, "total_tokens": 3}


async def test_embeddings_honour_dimensions() -> None:
    body = await embed(provider(), input="x", dimensions=5)
    assert len(body["data"][0]["embedding"]) == 5
    widest = await embed(provider(), input=["x", "y"], dimensions=MAX_DIMENSIONS)
    assert [len(item["embedding"]) for item in widest["data"]] == [MAX_DIMENSIONS, MAX_DIMENSIONS]


@pytest.mark.parametrize("dimensions", [MAX_DIMENSIONS + 1, 2_704_429_735_294])
async def test_dimensions_past_the_widest_vector_are_a_400_before_any_vector_is_built(dimensions: int) -> None:
    """Found by Schemathesis: dimensions of 2.7 * 10^12 made the simulated model build the vector in memory
    (the gateway grew to 7 GB, then answered 500 on a MemoryError)."""
    with pytest.raises(NotSupported) as refused:
        await embed(provider(), input="x", dimensions=dimensions)
    assert refused.value.status == 400 and refused.value.param == "dimensions"
    assert f"Invalid value for 'dimensions': {dimensions}." in refused.value.message
    assert f"at most {MAX_DIMENSIONS} dimensions" in refused.value.message


async def test_base64_embeddings_decode_to_the_float_ones() -> None:
    floats = await embed(provider(), input=["some text", "more"])
    packed = await embed(provider(), input=["some text", "more"], encoding_format="base64")
    for plain, encoded in zip(floats["data"], packed["data"], strict=True):
        raw = base64.b64decode(encoded["embedding"])
        assert list(struct.unpack(f"<{len(raw) // 4}f", raw)) == plain["embedding"]


async def test_token_id_inputs_are_embedded() -> None:
    one = await embed(provider(), input=[1, 2, 3])
    assert len(one["data"]) == 1 and one["usage"]["prompt_tokens"] == 3
    many = await embed(provider(), input=[[1, 2, 3], [4]])
    assert len(many["data"]) == 2
    assert many["data"][0]["embedding"] == one["data"][0]["embedding"]


# ---------------------------------------------------------------------------- through the pipeline


def keel_with(deployment: dict[str, Any], **model: Any) -> Keel:
    return Keel(parse_config({"models": [
        {"name": "sim", "deployments": [{"provider": "simulated", **deployment}], **model}]}))


async def test_retries_hide_a_flaky_simulated_upstream() -> None:
    keel = keel_with(
        {"seed": 11, "errors": {"503": 0.3}},
        retry={"max_attempts": 8, "initial_backoff_ms": 1, "max_backoff_ms": 5},
        # 30% failures make five in a row likely somewhere in 100 calls; this test is about retries.
        breaker={"failure_threshold": 50},
    )
    try:
        for i in range(100):
            reply = await keel.chat(model="sim", messages=[{"role": "user", "content": f"n{i}"}])
            assert isinstance(reply, ChatCompletion)
            assert reply.choices[0].message.content == f"echo: n{i}"
    finally:
        await keel.close()
    # The same seed replayed: its 503s really happened, so the answers above needed retries.
    twin, answered, failed = provider(seed=11, errors={"503": 0.3}), 0, 0
    while answered < 100:
        if twin.draw_fault() is None:
            answered += 1
        else:
            failed += 1
    assert failed > 10


async def test_a_stream_through_the_pipeline_arrives_whole() -> None:
    keel = keel_with(
        {"seed": 5, "errors": {"503": 0.3, "reset": 0.1}, "token_delay_ms": 1},
        retry={"max_attempts": 8, "initial_backoff_ms": 1, "max_backoff_ms": 5},
        breaker={"failure_threshold": 50},
    )
    try:
        for _ in range(20):
            chunks = await keel.chat(
                model="sim", messages=[{"role": "user", "content": "stream me please"}], stream=True,
                stream_options={"include_usage": True},
            )
            assert isinstance(chunks, AsyncIterator)
            received = [chunk async for chunk in chunks]
            text = "".join(c.choices[0].delta.content or "" for c in received if c.choices)
            assert text == "echo: stream me please"
            assert received[-1].usage is not None and received[-1].usage.completion_tokens == 4
    finally:
        await keel.close()


async def test_a_hanging_upstream_is_cut_by_the_attempt_deadline() -> None:
    keel = keel_with({"errors": {"hang": 1.0}}, attempt_timeout_s=0.05, retry={"max_attempts": 2,
                                                                                 "initial_backoff_ms": 1})
    started = time.monotonic()
    try:
        with pytest.raises(UpstreamTimeout):  # the hang lasts a day: ending at all is the deadline's doing
            await asyncio.wait_for(keel.chat(model="sim", messages=[{"role": "user", "content": "hi"}]), SAFETY_NET_S)
    finally:
        await keel.close()
    assert time.monotonic() - started >= 2 * 0.05  # two attempts, each cut at its own limit, not before


async def test_a_cut_stream_ends_with_an_error_after_its_first_chunks() -> None:
    keel = keel_with({"errors": {"cut": 1.0}}, retry={"max_attempts": 3, "initial_backoff_ms": 1})
    try:
        chunks = await keel.chat(model="sim", messages=[{"role": "user", "content": "a b c d e f"}], stream=True)
        assert isinstance(chunks, AsyncIterator)
        received = []
        with pytest.raises(UpstreamConnectionError):
            async for chunk in chunks:
                received.append(chunk)
        assert len(received) >= 1  # the stream had started: no silent retry after the first chunk
    finally:
        await keel.close()


LONG = MAX_INSTANCE_CHARS // 10  # characters of one string, ten of which fill the budget


@pytest.mark.parametrize("schema", [
    {"type": "array", "minItems": 10**12},
    {"type": "string", "minLength": 10**9},
    {"type": "array", "minItems": 100, "items": {"type": "array", "minItems": 100, "items": {"type": "array",
                                                                                          "minItems": 100}}},
    {"type": "array", "minItems": 11, "items": {"type": "string", "minLength": LONG}},
    {"type": "array", "minItems": 11, "items": {"const": "y" * LONG}},
    {"type": "array", "minItems": 11, "items": {"enum": [{"text": "y" * LONG}]}},
], ids=["huge-array", "huge-string", "nested-arrays", "many-long-strings", "repeated-constant", "repeated-enum"])
async def test_a_schema_whose_smallest_value_is_huge_ends_in_a_422_not_a_hung_gateway(schema: dict[str, Any]) -> None:
    """Found by Schemathesis: minItems of 10^12 made the simulated model build it (16 GB and counting). The
    text counts too: a constant of 200 KB (under the 256 KB a schema may take) 9,000 times is 1.8 GB of answer."""
    keel = Keel(parse_config({"models": [{"name": "m", "deployments": [{"provider": "simulated"}]}]}))
    request = ChatRequest.model_validate({
        "model": "m", "messages": [{"role": "user", "content": "hi"}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "big", "schema": schema}},
    })
    with pytest.raises(InvalidOutput) as refused:
        await keel.handle(request)
    assert refused.value.status == 422
    await keel.close()


@pytest.mark.parametrize("items", [
    {"type": "string", "minLength": LONG}, {"const": "y" * LONG}, {"enum": ["y" * LONG, "n"]},
], ids=["strings", "constants", "enum-values"])
def test_the_text_budget_is_shared_by_every_string_of_the_instance(items: dict[str, Any]) -> None:
    """Nine long strings fit (under MAX_INSTANCE_CHARS, with room for the array's own values); eleven do not."""
    fits = minimal_instance({"type": "array", "minItems": 9, "items": items})
    assert fits == ["y" * LONG if "minLength" not in items else "a" * LONG] * 9
    with pytest.raises(InstanceTooLarge, match=f"more than {MAX_INSTANCE_CHARS} characters"):
        minimal_instance({"type": "array", "minItems": 11, "items": items})
