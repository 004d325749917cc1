"""The Anthropic provider against a fake Anthropic upstream speaking the real wire format:
requests translated exactly, answers and streams translated back into OpenAI objects that
the OpenAI spec accepts, and every upstream failure turned into its precise Keel error."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import openai
import pytest
from conftest import GatewayProcess, free_port
from spec import CHAT_CHUNK, CHAT_COMPLETION, validate

from keel.config import AnthropicDeployment, ModelConfig, parse_config
from keel.engine import Keel
from keel.errors import (
    ContextLengthExceeded,
    InvalidRequest,
    KeelError,
    NotSupported,
    UpstreamAuthFailed,
    UpstreamBadRequest,
    UpstreamConnectionError,
    UpstreamRateLimited,
    UpstreamServerError,
)
from keel.pipeline import Call, ChunkStream, Completion
from keel.providers.anthropic import AnthropicProvider
from keel.server.app import spec_nulls_dropped
from keel.testing.fake_anthropic import FakeAnthropicBehaviour, FakeAnthropicServer
from keel.types import ChatCompletion, ChatRequest

KEY_ENV = "KEEL_TEST_ANTHROPIC_KEY"
KEY = "sk-ant-test-0123456789"
UPSTREAM_MODEL = "claude-test-model"
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
ANTHROPIC_WEATHER_TOOL = {
    "name": "get_weather",
    "description": "Current weather in a city",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
HI = [{"role": "user", "content": "hello there"}]


@pytest.fixture
def fake() -> Iterator[FakeAnthropicServer]:
    with FakeAnthropicServer(FakeAnthropicBehaviour(api_key=KEY)) as server:
        yield server


def deployment(fake: FakeAnthropicServer, **overrides: Any) -> AnthropicDeployment:
    fields = {"provider": "anthropic", "base_url": fake.url, "model": UPSTREAM_MODEL, "api_key_env": KEY_ENV}
    return AnthropicDeployment.model_validate({**fields, **overrides})


@pytest.fixture
async def provider(fake: FakeAnthropicServer, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[AnthropicProvider]:
    monkeypatch.setenv(KEY_ENV, KEY)
    p = AnthropicProvider(deployment(fake), "anthropic/test")
    await p.start()
    yield p
    await p.close()


def call_for(params: dict[str, Any]) -> tuple[ChatRequest, Call]:
    request = ChatRequest.model_validate({"model": "claude", **params})
    model = ModelConfig.model_validate({"name": "claude", "deployments": [{"provider": "simulated"}]})
    return request, Call(request=request, model=model, deployments=[])


async def complete(provider: AnthropicProvider, **params: Any) -> dict[str, Any]:
    reply = await provider.chat(*call_for(params))
    assert isinstance(reply, Completion)
    validate(CHAT_COMPLETION, spec_nulls_dropped(dict(reply.body), completion=True))  # as the gateway sends it
    return reply.body


async def stream(provider: AnthropicProvider, **params: Any) -> tuple[list[dict[str, Any]], ChunkStream]:
    reply = await provider.chat(*call_for({**params, "stream": True}))
    assert isinstance(reply, ChunkStream)
    chunks = [chunk async for chunk in reply]
    for chunk in chunks:
        validate(CHAT_CHUNK, spec_nulls_dropped(dict(chunk)))
    return chunks, reply


def without_ids(completion: dict[str, Any]) -> dict[str, Any]:
    """A completion minus what differs between two calls (ids, timestamps, tool call ids)."""
    body = {k: v for k, v in completion.items() if k not in ("id", "created")}
    message = dict(body["choices"][0]["message"])
    if "tool_calls" in message:
        message["tool_calls"] = [{**tc, "id": None} for tc in message["tool_calls"]]
    body["choices"] = [{**body["choices"][0], "message": message}]
    return body


# ---------------------------------------------------------------------------- requests


async def test_plain_text_answer_is_an_openai_completion(
    provider: AnthropicProvider, fake: FakeAnthropicServer
) -> None:
    fake.configure(model="claude-3-5-haiku-20241022")
    body = await complete(provider, messages=HI)
    assert body["id"].startswith("chatcmpl-msg_")
    assert body["object"] == "chat.completion"
    assert body["model"] == "claude-3-5-haiku-20241022"  # what Anthropic says answered
    choice = body["choices"][0]
    assert choice == {
        "index": 0,
        "message": {"role": "assistant", "content": "echo: hello there", "refusal": None},
        "finish_reason": "stop",
        "logprobs": None,
    }
    assert fake.bodies == [
        {"model": UPSTREAM_MODEL, "max_tokens": 1024, "messages": [{"role": "user", "content": "hello there"}]}
    ]


async def test_sends_the_api_key_and_configured_anthropic_version(
    fake: FakeAnthropicServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(KEY_ENV, KEY)
    p = AnthropicProvider(deployment(fake, anthropic_version="2099-01-01"), "anthropic/test")
    try:
        await complete(p, messages=HI)  # the fake refuses a wrong or missing x-api-key
    finally:
        await p.close()
    assert fake.fake.stats.headers == [{"anthropic-version": "2099-01-01"}]


async def test_system_and_developer_messages_become_the_top_level_system(
    provider: AnthropicProvider, fake: FakeAnthropicServer
) -> None:
    await complete(provider, messages=[
        {"role": "system", "content": "You are terse."},
        {"role": "developer", "content": [{"type": "text", "text": "Answer in French."}]},
        {"role": "user", "content": "hello"},
    ])
    sent = fake.bodies[-1]
    assert sent["system"] == "You are terse.\n\nAnswer in French."
    assert sent["messages"] == [{"role": "user", "content": "hello"}]


async def test_sampling_parameters_are_translated(provider: AnthropicProvider, fake: FakeAnthropicServer) -> None:
    await complete(
        provider, messages=HI, max_completion_tokens=77, max_tokens=5, temperature=0.3, top_p=0.9,
        stop="END", user="user-42", seed=7, presence_penalty=0.5,
    )
    assert fake.bodies[-1] == {
        "model": UPSTREAM_MODEL,
        "max_tokens": 77,  # max_completion_tokens wins over the legacy max_tokens
        "messages": [{"role": "user", "content": "hello there"}],
        "temperature": 0.3,
        "top_p": 0.9,
        "stop_sequences": ["END"],
        "metadata": {"user_id": "user-42"},
    }
    await complete(provider, messages=HI, max_tokens=9, stop=["a", "b"])
    assert fake.bodies[-1]["max_tokens"] == 9
    assert fake.bodies[-1]["stop_sequences"] == ["a", "b"]


async def test_default_max_tokens_comes_from_the_deployment(
    fake: FakeAnthropicServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(KEY_ENV, KEY)
    p = AnthropicProvider(deployment(fake, default_max_tokens=321), "anthropic/test")
    try:
        await complete(p, messages=HI)
    finally:
        await p.close()
    assert fake.bodies[-1]["max_tokens"] == 321


async def test_tool_call_round_trip_sends_the_exact_body_anthropic_expects(
    provider: AnthropicProvider, fake: FakeAnthropicServer
) -> None:
    messages = [
        {"role": "system", "content": "Use the tools."},
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {"role": "assistant", "content": "Checking both.", "tool_calls": [
            {"id": "toolu_01", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}},
            {"id": "toolu_02", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city":"Rome"}'}},
        ]},
        {"role": "tool", "tool_call_id": "toolu_01", "content": "18C, sunny"},
        {"role": "tool", "tool_call_id": "toolu_02", "content": [{"type": "text", "text": "24C, clear"}]},
        {"role": "user", "content": "Which is warmer?"},
    ]
    body = await complete(provider, messages=messages, tools=[WEATHER_TOOL])
    assert body["choices"][0]["message"]["content"] == "echo: Which is warmer?"
    assert fake.bodies[-1] == {
        "model": UPSTREAM_MODEL,
        "max_tokens": 1024,
        "system": "Use the tools.",
        "messages": [
            {"role": "user", "content": "Weather in Paris and Rome?"},
            {"role": "assistant", "content": [
                {"type": "text", "text": "Checking both."},
                {"type": "tool_use", "id": "toolu_01", "name": "get_weather", "input": {"city": "Paris"}},
                {"type": "tool_use", "id": "toolu_02", "name": "get_weather", "input": {"city": "Rome"}},
            ]},
            # both results and the next user message make one user turn, results first
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_01", "content": "18C, sunny"},
                {"type": "tool_result", "tool_use_id": "toolu_02", "content": "24C, clear"},
                {"type": "text", "text": "Which is warmer?"},
            ]},
        ],
        "tools": [ANTHROPIC_WEATHER_TOOL],
        "tool_choice": {"type": "auto"},
    }


async def test_consecutive_same_role_messages_merge_and_empty_ones_drop(
    provider: AnthropicProvider, fake: FakeAnthropicServer
) -> None:
    await complete(provider, messages=[
        {"role": "user", "content": "one"},
        {"role": "user", "content": [{"type": "text", "text": "two"}]},
        {"role": "assistant", "content": ""},
        {"role": "user", "content": "three"},
        {"role": "assistant", "content": [{"type": "text", "text": "Sure"}]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "t1", "type": "function", "function": {"name": "noop", "arguments": ""}}]},
        {"role": "tool", "tool_call_id": "t1", "content": ""},
    ])
    assert fake.bodies[-1]["messages"] == [
        {"role": "user", "content": [
            {"type": "text", "text": "one"}, {"type": "text", "text": "two"}, {"type": "text", "text": "three"},
        ]},
        {"role": "assistant", "content": [
            {"type": "text", "text": "Sure"}, {"type": "tool_use", "id": "t1", "name": "noop", "input": {}},
        ]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1"}]},
    ]


async def test_images_become_base64_or_url_sources(provider: AnthropicProvider, fake: FakeAnthropicServer) -> None:
    await complete(provider, messages=[{"role": "user", "content": [
        {"type": "text", "text": "Compare", "cache_control": {"type": "ephemeral"}},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg", "detail": "high"}},
    ]}])
    assert fake.bodies[-1]["messages"][0]["content"] == [
        {"type": "text", "text": "Compare", "cache_control": {"type": "ephemeral"}},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}},
        {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}},
    ]


@pytest.mark.parametrize(
    ("messages", "error", "param"),
    [
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png,rawbytes"}}]}],
         InvalidRequest, "messages[0].content[0]"),
        ([{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "x", "format": "wav"}}]}],
         NotSupported, "messages[0].content[0]"),
        ([{"role": "user", "content": "hi"}, {"role": "assistant", "tool_calls": [
            {"id": "t", "type": "function", "function": {"name": "f", "arguments": "[1, 2]"}}]}],
         InvalidRequest, "messages[1].tool_calls[0].function.arguments"),
        ([{"role": "user", "content": "hi"}, {"role": "function", "name": "f", "content": "x"}],
         NotSupported, "messages[1]"),
    ],
    ids=["data-url-not-base64", "audio-part", "arguments-not-an-object", "legacy-function-message"],
)
async def test_untranslatable_requests_are_refused_before_sending(
    provider: AnthropicProvider, fake: FakeAnthropicServer, messages: list[Any], error: type[KeelError], param: str,
) -> None:
    with pytest.raises(error) as caught:
        await complete(provider, messages=messages)
    assert caught.value.param == param
    assert caught.value.status == 400
    assert fake.bodies == []


@pytest.mark.parametrize(
    ("tool_choice", "parallel", "expected"),
    [
        (None, None, {"type": "auto"}),
        ("auto", None, {"type": "auto"}),
        ("required", None, {"type": "any"}),
        ("none", None, {"type": "none"}),
        ({"type": "function", "function": {"name": "get_weather"}}, None, {"type": "tool", "name": "get_weather"}),
        ("required", False, {"type": "any", "disable_parallel_tool_use": True}),
        (None, False, {"type": "auto", "disable_parallel_tool_use": True}),
    ],
    ids=["default", "auto", "required", "none", "named", "required-serial", "serial"],
)
async def test_tools_and_tool_choice_are_mapped(
    provider: AnthropicProvider, fake: FakeAnthropicServer, tool_choice: Any, parallel: bool | None, expected: Any,
) -> None:
    bare_tool = {"type": "function", "function": {"name": "ping"}}
    params: dict[str, Any] = {"messages": HI, "tools": [WEATHER_TOOL, bare_tool]}
    if tool_choice is not None:
        params["tool_choice"] = tool_choice
    if parallel is not None:
        params["parallel_tool_calls"] = parallel
    await complete(provider, **params)
    sent = fake.bodies[-1]
    bare_schema = {"type": "object", "properties": {}}
    assert sent["tools"] == [ANTHROPIC_WEATHER_TOOL, {"name": "ping", "input_schema": bare_schema}]
    assert sent["tool_choice"] == expected


async def test_json_schema_is_a_forced_answer_tool_and_comes_back_as_content(
    provider: AnthropicProvider, fake: FakeAnthropicServer
) -> None:
    schema = {"type": "object", "properties": {"answer": {"type": "integer"}}, "required": ["answer"]}
    body = await complete(provider, messages=[{"role": "system", "content": "Be exact."}, *HI], response_format={
        "type": "json_schema", "json_schema": {"name": "result", "schema": schema},
    })
    sent = fake.bodies[-1]
    assert sent["system"] == "Be exact."  # no instruction: the tool constrains the answer
    assert [(t["name"], t["input_schema"]) for t in sent["tools"]] == [("result", schema)]
    assert sent["tool_choice"] == {"type": "tool", "name": "result", "disable_parallel_tool_use": True}
    choice = body["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert "tool_calls" not in choice["message"]
    assert choice["message"]["content"] == '{"answer":0}'
    body = await complete(provider, messages=HI, response_format={"type": "json_object"})
    assert fake.bodies[-1]["tools"][0]["name"] == "json_answer"
    assert fake.bodies[-1]["tools"][0]["input_schema"] == {"type": "object"}
    assert body["choices"][0]["message"]["content"] == "{}"
    await complete(provider, messages=HI, response_format={"type": "text"})
    assert "tools" not in fake.bodies[-1] and "system" not in fake.bodies[-1]


async def test_a_schema_that_is_not_an_object_is_wrapped_and_unwrapped(
    provider: AnthropicProvider, fake: FakeAnthropicServer
) -> None:
    schema = {"type": "array", "items": {"$ref": "#/$defs/n"}, "minItems": 1, "$defs": {"n": {"type": "integer"}}}
    fmt = {"type": "json_schema", "json_schema": {"name": "numbers list", "schema": schema}}
    body = await complete(provider, messages=HI, response_format=fmt)
    [tool] = fake.bodies[-1]["tools"]
    assert tool["name"] == "numbers_list"
    assert tool["input_schema"]["$defs"] == {"n": {"type": "integer"}}
    assert tool["input_schema"]["properties"]["value"] == {"type": "array", "items": {"$ref": "#/$defs/n"},
                                                           "minItems": 1}
    assert body["choices"][0]["message"]["content"] == "[0]"
    _, reply = await stream(provider, messages=HI, response_format=fmt)
    assert reply.completion()["choices"][0]["message"]["content"] == "[0]"
    assert reply.finish_reason == "stop"


async def test_streamed_json_answer_arrives_as_content_deltas(
    provider: AnthropicProvider, fake: FakeAnthropicServer
) -> None:
    schema = {"type": "object", "required": ["city", "days"],
              "properties": {"city": {"type": "string", "minLength": 3}, "days": {"type": "integer"}}}
    fmt = {"type": "json_schema", "json_schema": {"name": "w", "schema": schema}}
    plain = await complete(provider, messages=HI, response_format=fmt)
    chunks, reply = await stream(provider, messages=HI, response_format=fmt)
    contents = [c["choices"][0]["delta"].get("content") for c in chunks if c["choices"]]
    assert len([t for t in contents if t]) > 1  # streamed in pieces, not held
    assert not any(c["choices"] and "tool_calls" in c["choices"][0]["delta"] for c in chunks)
    assert reply.finish_reason == "stop"
    assert without_ids(reply.completion()) == without_ids(plain)
    assert plain["choices"][0]["message"]["content"] == '{"city":"aaa","days":0}'


@pytest.mark.parametrize(("tool_choice", "expected_choice", "answer_tool_sent"), [
    ("auto", {"type": "any"}, True),
    ("none", {"type": "tool", "name": "result", "disable_parallel_tool_use": True}, True),
    ("required", {"type": "any"}, False),
    ({"type": "function", "function": {"name": "get_weather"}}, {"type": "tool", "name": "get_weather"}, False),
])
async def test_json_answer_beside_caller_tools_follows_tool_choice(
    provider: AnthropicProvider, fake: FakeAnthropicServer, tool_choice: Any, expected_choice: Any,
    answer_tool_sent: bool,
) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "result", "schema": {"type": "object"}}}
    await complete(provider, messages=HI, tools=[WEATHER_TOOL], tool_choice=tool_choice, response_format=fmt)
    sent = fake.bodies[-1]
    assert [t["name"] for t in sent["tools"]] == ["get_weather", *(["result"] if answer_tool_sent else [])]
    assert sent["tool_choice"] == expected_choice


async def test_answer_tool_name_never_clashes_with_a_caller_tool(
    provider: AnthropicProvider, fake: FakeAnthropicServer
) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "get_weather", "schema": {"type": "object"}}}
    fake.configure(tool_uses=[{"name": "get_weather", "input": {"city": "Oslo"}}], text="")
    body = await complete(provider, messages=HI, tools=[WEATHER_TOOL], response_format=fmt)
    assert [t["name"] for t in fake.bodies[-1]["tools"]] == ["get_weather", "get_weather_answer"]
    [call] = body["choices"][0]["message"]["tool_calls"]  # the caller's tool stays a tool call
    assert call["function"]["name"] == "get_weather" and body["choices"][0]["finish_reason"] == "tool_calls"


async def test_json_answers_are_repaired_through_the_pipeline(
    fake: FakeAnthropicServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    schema = {"type": "object", "required": ["name"], "properties": {"name": {"type": "string"}}}
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": schema}}
    monkeypatch.setenv(KEY_ENV, KEY)
    fake.configure(invalid_json_first=1)
    async with Keel(parse_config(keel_config(fake))) as keel:
        reply = await keel.chat(model="claude", messages=HI, response_format=fmt)
    assert isinstance(reply, ChatCompletion)
    assert reply.choices[0].message.content == '{"name":""}'
    assert fake.fake.stats.requests == 2
    repair = fake.bodies[-1]["messages"]
    assert repair[1] == {"role": "assistant", "content": '{"name":12345}'}  # the broken answer, as text
    assert "$.name" in repair[2]["content"]


# ---------------------------------------------------------------------------- answers


async def test_tool_use_answer_becomes_tool_calls(provider: AnthropicProvider, fake: FakeAnthropicServer) -> None:
    fake.configure(text="", tool_uses=[{"name": "get_weather", "input": {"city": "Paris", "days": [1, 2]}}])
    body = await complete(provider, messages=HI, tools=[WEATHER_TOOL])
    choice = body["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    message = choice["message"]
    assert message["content"] is None
    assert message["refusal"] is None
    [tool_call] = message["tool_calls"]
    assert tool_call["id"].startswith("toolu_")
    assert tool_call["type"] == "function"
    assert tool_call["function"] == {"name": "get_weather", "arguments": '{"city":"Paris","days":[1,2]}'}


@pytest.mark.parametrize(
    ("params", "finish_reason", "content"),
    [
        ({"max_tokens": 2}, "length", "echo: one"),
        ({"stop": ["three"]}, "stop", "echo: one two "),
        ({}, "stop", "echo: one two three"),
    ],
    ids=["max_tokens", "stop_sequence", "end_turn"],
)
async def test_stop_reasons_become_finish_reasons(
    provider: AnthropicProvider, params: dict[str, Any], finish_reason: str, content: str
) -> None:
    body = await complete(provider, messages=[{"role": "user", "content": "one two three"}], **params)
    assert body["choices"][0]["finish_reason"] == finish_reason
    assert body["choices"][0]["message"]["content"] == content


async def test_usage_counts_cache_reads_and_writes_as_prompt_tokens(
    provider: AnthropicProvider, fake: FakeAnthropicServer
) -> None:
    fake.configure(cache_read_input_tokens=100, cache_creation_input_tokens=20)
    usage = (await complete(provider, messages=HI))["usage"]
    # The fake counts input tokens as len(json(prompt)) // 4 and output tokens as words.
    input_tokens = len(b'[null,[{"role":"user","content":"hello there"}],null]') // 4
    assert usage == {
        "prompt_tokens": input_tokens + 120,
        "completion_tokens": 3,
        "total_tokens": input_tokens + 123,
        "prompt_tokens_details": {"cached_tokens": 100},
    }


# ---------------------------------------------------------------------------- streams


async def test_streamed_text_adds_up_to_the_plain_answer(
    provider: AnthropicProvider, fake: FakeAnthropicServer
) -> None:
    fake.configure(model="claude-3-5-haiku-20241022", cache_read_input_tokens=10)
    plain = await complete(provider, messages=HI)
    chunks, reply = await stream(provider, messages=HI, stream_options={"include_usage": True})
    assert fake.bodies[-1]["stream"] is True
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": "", "refusal": None}
    texts = [c["choices"][0]["delta"].get("content") for c in chunks[1:-2]]
    assert len(texts) > 1
    assert "".join(texts) == "echo: hello there"
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == plain["usage"]
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["id"].startswith("chatcmpl-msg_")
    assert {c["model"] for c in chunks} == {"claude-3-5-haiku-20241022"}
    assert without_ids(reply.completion()) == without_ids(plain)


async def test_stream_always_ends_with_usage_for_cost_accounting(provider: AnthropicProvider) -> None:
    chunks, reply = await stream(provider, messages=HI)
    assert all(c["usage"] is None and c["choices"] for c in chunks[:-1])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["prompt_tokens"] > 0
    assert reply.finish_reason == "stop"
    assert reply.usage == chunks[-1]["usage"]


async def test_streamed_tool_calls_add_up_to_the_plain_answer(
    provider: AnthropicProvider, fake: FakeAnthropicServer
) -> None:
    fake.configure(text="Let me check.", tool_uses=[
        {"name": "get_weather", "input": {"city": "Paris"}},
        {"name": "get_weather", "input": {"city": "Rome", "unit": "celsius"}},
    ])
    plain = await complete(provider, messages=HI, tools=[WEATHER_TOOL])
    chunks, reply = await stream(provider, messages=HI, tools=[WEATHER_TOOL], stream_options={"include_usage": True})
    starts = [c["choices"][0]["delta"]["tool_calls"][0] for c in chunks
              if c["choices"] and "id" in (c["choices"][0]["delta"].get("tool_calls") or [{}])[0]]
    assert [(s["index"], s["type"], s["function"]) for s in starts] == [
        (0, "function", {"name": "get_weather", "arguments": ""}),
        (1, "function", {"name": "get_weather", "arguments": ""}),
    ]
    assert all(s["id"].startswith("toolu_") for s in starts)
    argument_deltas = [c for c in chunks if c["choices"] and "tool_calls" in c["choices"][0]["delta"]]
    assert len(argument_deltas) > len(starts)  # arguments arrive in pieces
    assert reply.finish_reason == "tool_calls"
    assert without_ids(reply.completion()) == without_ids(plain)
    assert reply.completion()["choices"][0]["message"]["content"] == "Let me check."


@pytest.mark.parametrize(
    ("error_type", "error"),
    [("overloaded_error", UpstreamRateLimited), ("api_error", UpstreamServerError)],
)
async def test_error_event_mid_stream_raises_after_the_chunks_before_it(
    provider: AnthropicProvider, fake: FakeAnthropicServer, error_type: str, error: type[KeelError]
) -> None:
    fake.configure(stream_error_after=2, stream_error_type=error_type)
    reply = await provider.chat(*call_for({"messages": HI, "stream": True}))
    assert isinstance(reply, ChunkStream)
    received: list[dict[str, Any]] = []
    with pytest.raises(error, match=error_type) as caught:
        async for chunk in reply:
            received.append(chunk)
    assert len(received) == 3  # the role chunk and two text deltas
    assert reply.error is caught.value
    assert caught.value.deployment == "anthropic/test"


async def test_stream_ending_without_message_stop_is_a_connection_error(
    provider: AnthropicProvider, fake: FakeAnthropicServer
) -> None:
    fake.configure(omit_message_stop=True)
    reply = await provider.chat(*call_for({"messages": HI, "stream": True}))
    assert isinstance(reply, ChunkStream)
    with pytest.raises(UpstreamConnectionError, match="message_stop"):
        async for _ in reply:
            pass
    assert reply.finish_reason == "stop"  # message_delta came; only the end was missing


async def test_stream_cut_mid_way_is_a_connection_error(provider: AnthropicProvider, fake: FakeAnthropicServer) -> None:
    fake.configure(cut_after=1)
    reply = await provider.chat(*call_for({"messages": HI, "stream": True}))
    assert isinstance(reply, ChunkStream)
    with pytest.raises(UpstreamConnectionError):
        async for _ in reply:
            pass


# ---------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("status", "retry_after", "error", "expected_retry_after"),
    [
        (429, 7, UpstreamRateLimited, 7.0),
        (529, 3, UpstreamRateLimited, 3.0),
        (529, None, UpstreamRateLimited, None),
        (500, None, UpstreamServerError, None),
        (503, None, UpstreamServerError, None),
        (400, None, UpstreamBadRequest, None),
        (404, None, UpstreamBadRequest, None),
        (401, None, UpstreamAuthFailed, None),
        (403, None, UpstreamAuthFailed, None),
    ],
)
async def test_http_errors_map_to_precise_errors(
    provider: AnthropicProvider, fake: FakeAnthropicServer, status: int, retry_after: float | None,
    error: type[KeelError], expected_retry_after: float | None,
) -> None:
    fake.configure(fail_status=status, retry_after=retry_after)
    with pytest.raises(error) as caught:
        await complete(provider, messages=HI)
    assert type(caught.value) is error
    assert caught.value.deployment == "anthropic/test"
    assert KEY not in caught.value.message
    if isinstance(caught.value, UpstreamRateLimited):
        assert caught.value.retry_after == expected_retry_after
    if isinstance(caught.value, UpstreamServerError):
        assert caught.value.upstream_status == status
    if error is not UpstreamAuthFailed:
        assert f"simulated failure {status}" in caught.value.message


async def test_overloaded_error_type_is_rate_limited_whatever_the_status(
    provider: AnthropicProvider, fake: FakeAnthropicServer
) -> None:
    fake.configure(fail_status=503, fail_type="overloaded_error", retry_after=2)
    with pytest.raises(UpstreamRateLimited) as caught:
        await complete(provider, messages=HI)
    assert caught.value.retry_after == 2.0


async def test_prompt_too_long_is_context_length_exceeded(
    provider: AnthropicProvider, fake: FakeAnthropicServer
) -> None:
    fake.configure(max_input_tokens=5)
    with pytest.raises(ContextLengthExceeded, match="prompt is too long") as caught:
        await complete(provider, messages=HI)
    assert caught.value.fallback  # a deployment with a larger window may take it


async def test_refused_key_is_upstream_auth_failed(fake: FakeAnthropicServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, "sk-ant-wrong")
    p = AnthropicProvider(deployment(fake), "anthropic/test")
    try:
        with pytest.raises(UpstreamAuthFailed) as caught:
            await complete(p, messages=HI)
    finally:
        await p.close()
    assert "sk-ant-wrong" not in caught.value.message


async def test_unreachable_upstream_is_a_connection_error() -> None:
    config = AnthropicDeployment(provider="anthropic", base_url=f"http://127.0.0.1:{free_port()}", model="m")
    p = AnthropicProvider(config, "anthropic/down")
    try:
        with pytest.raises(UpstreamConnectionError, match="cannot reach"):
            await complete(p, messages=HI)
    finally:
        await p.close()


# ---------------------------------------------------------------------------- the whole pipeline


def keel_config(fake: FakeAnthropicServer) -> dict[str, Any]:
    return {"models": [{
        "name": "claude",
        "retry": {"max_attempts": 3, "initial_backoff_ms": 1, "max_backoff_ms": 5},
        "deployments": [{"provider": "anthropic", "base_url": fake.url, "model": UPSTREAM_MODEL,
                         "api_key_env": KEY_ENV}],
    }]}


async def test_keel_chat_answers_through_the_pipeline(
    fake: FakeAnthropicServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(KEY_ENV, KEY)
    fake.configure(fail_status=529, fail_first=1, retry_after=0)  # overloaded once, then it answers
    async with Keel(parse_config(keel_config(fake))) as keel:
        reply = await keel.chat(model="claude", messages=[{"role": "system", "content": "Be brief."}, *HI])
        assert isinstance(reply, ChatCompletion)
        assert reply.choices[0].message.content == "echo: hello there"
        assert reply.choices[0].finish_reason == "stop"
        assert reply.usage is not None and reply.usage.completion_tokens == 3
        chunks = await keel.chat(model="claude", messages=HI, stream=True)
        assert not isinstance(chunks, ChatCompletion)
        text = "".join([c.choices[0].delta.content or "" async for c in chunks if c.choices])
        assert text == "echo: hello there"
    assert fake.fake.stats.requests == 3
    assert [b["system"] for b in fake.bodies[:2]] == ["Be brief.", "Be brief."]


def test_openai_sdk_works_through_the_gateway(
    fake: FakeAnthropicServer, gateway: Callable[..., GatewayProcess]
) -> None:
    gw = gateway(keel_config(fake), env={KEY_ENV: KEY, "KEEL_MASTER_KEY": ""})
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0)
    plain = client.chat.completions.create(model="claude", messages=[{"role": "user", "content": "hello there"}])
    assert plain.choices[0].message.content == "echo: hello there"
    assert plain.choices[0].finish_reason == "stop"
    assert plain.model == UPSTREAM_MODEL
    assert plain.id.startswith("chatcmpl-msg_")
    fake.configure(text="", tool_uses=[{"name": "get_weather", "input": {"city": "Paris"}}])
    tools: Any = [WEATHER_TOOL]
    streamed = client.chat.completions.create(
        model="claude", messages=[{"role": "user", "content": "weather?"}], tools=tools,
        stream=True, stream_options={"include_usage": True},
    )
    chunks = list(streamed)
    arguments = "".join(
        c.choices[0].delta.tool_calls[0].function.arguments or ""
        for c in chunks if c.choices and c.choices[0].delta.tool_calls and c.choices[0].delta.tool_calls[0].function
    )
    assert arguments == '{"city":"Paris"}'
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]
    assert chunks[-1].usage is not None and chunks[-1].usage.prompt_tokens > 0
    fake.configure(text=None, tool_uses=[], stream_error_after=1)
    with pytest.raises(openai.APIError, match="overloaded_error"):
        for _ in client.chat.completions.create(
            model="claude", messages=[{"role": "user", "content": "hi"}], stream=True
        ):
            pass
    fake.configure(stream_error_after=None, fail_status=529, retry_after=0)
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model="claude", messages=[{"role": "user", "content": "hi"}])
