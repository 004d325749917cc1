"""Anthropic's Messages API at the edge: a Messages body becomes the chat request every stage reads
(parsed by the same strict parser as chat), a chat.completion becomes Anthropic's `message` (checked
against the anthropic SDK's own types, strictly), and every Keel error becomes Anthropic's error body."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from anthropic.types import ErrorResponse, Message
from test_messages_oracle import strictly

from keel.dialects.messages import chat_params, error_body, message_of
from keel.errors import (
    AuthenticationFailed,
    BudgetExceeded,
    GuardrailViolation,
    InvalidRequest,
    KeelError,
    ModelNotAllowed,
    ModelNotFound,
    NotSupported,
    RateLimited,
    RequestTooLarge,
    UpstreamServerError,
    UpstreamTimeout,
)
from keel.pipeline import fingerprint_of
from keel.request_errors import parse_request
from keel.types import AssistantMessage, ChatRequest, ImagePart, OtherPart, ToolMessage, UserMessage

WEATHER = {"name": "get_weather", "description": "Weather in a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


def body(**fields: Any) -> dict[str, Any]:
    return {"model": "claude", "max_tokens": 64, "messages": [{"role": "user", "content": "hi"}], **fields}


def chat(native: bool = False, **fields: Any) -> ChatRequest:
    return parse_request(ChatRequest, chat_params(body(**fields), native=native).params, strict=True)


# ---------------------------------------------------------------------------- request


def test_a_plain_body_is_the_chat_request_it_means() -> None:
    request = chat(system="Be brief.", stop_sequences=["END"], temperature=0.2, top_p=0.9,
                   metadata={"user_id": "u-1"})
    assert request.model == "claude" and request.max_tokens == 64
    assert [m.role for m in request.messages] == ["system", "user"]
    assert request.messages[0].content == "Be brief." and request.messages[1].content == "hi"
    assert (request.stop, request.temperature, request.top_p, request.user) == (["END"], 0.2, 0.9, "u-1")
    assert request.stream is None and request.stream_options is None


def test_system_text_blocks_keep_their_text_and_drop_anthropic_cache_markers() -> None:
    request = chat(system=[{"type": "text", "text": "A", "cache_control": {"type": "ephemeral"}},
                           {"type": "text", "text": "B"}])
    system = request.messages[0]
    assert isinstance(system.content, list) and [p.text for p in system.content] == ["A", "B"]
    assert all("cache_control" not in (p.model_extra or {}) for p in system.content)


def test_a_stream_asks_the_pipeline_for_usage() -> None:
    request = chat(stream=True)
    assert request.stream is True and request.stream_options is not None
    assert request.stream_options.include_usage is True


def test_images_become_image_url_parts() -> None:
    blocks = [{"type": "text", "text": "what is this?"},
              {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBOR"}},
              {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}}]
    request = chat(messages=[{"role": "user", "content": blocks}])
    user = request.messages[0]
    assert isinstance(user, UserMessage) and isinstance(user.content, list)
    images = [p for p in user.content if isinstance(p, ImagePart)]
    assert [p.image_url.url for p in images] == ["data:image/png;base64,iVBOR", "https://example.com/cat.jpg"]


def test_a_tool_round_trip_becomes_tool_calls_and_tool_messages() -> None:
    turns = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": [
            {"type": "text", "text": "Looking."},
            {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}},
            {"type": "tool_use", "id": "toolu_2", "name": "get_weather", "input": {"city": "Lyon"}},
        ]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny"},
            {"type": "tool_result", "tool_use_id": "toolu_2", "is_error": True,
             "content": [{"type": "text", "text": "no station"}]},
            {"type": "text", "text": "And tomorrow?"},
        ]},
    ]
    request = chat(messages=turns, tools=[WEATHER], tool_choice={"type": "auto", "disable_parallel_tool_use": True})
    roles = [m.role for m in request.messages]
    assert roles == ["user", "assistant", "tool", "tool", "user"]  # tool results straight after the calls
    assistant = request.messages[1]
    assert isinstance(assistant, AssistantMessage) and assistant.content == "Looking."
    assert assistant.tool_calls is not None
    assert [orjson.loads(c.function.arguments) for c in assistant.tool_calls] == [{"city": "Paris"}, {"city": "Lyon"}]
    first, second = request.messages[2], request.messages[3]
    assert isinstance(first, ToolMessage) and (first.tool_call_id, first.content) == ("toolu_1", "sunny")
    assert isinstance(second, ToolMessage) and second.content == "Error: no station"
    assert request.messages[4].content == "And tomorrow?"
    assert request.tools is not None and request.tools[0].function.parameters == WEATHER["input_schema"]
    assert request.tools[0].function.description == "Weather in a city"
    assert request.tool_choice == "auto" and request.parallel_tool_calls is False


@pytest.mark.parametrize(("choice", "expected"), [
    ({"type": "auto"}, "auto"),
    ({"type": "any"}, "required"),
    ({"type": "none"}, "none"),
    ({"type": "tool", "name": "get_weather"}, {"type": "function", "function": {"name": "get_weather"}}),
])
def test_tool_choice_maps_to_chat(choice: dict[str, Any], expected: Any) -> None:
    params = chat_params(body(tools=[WEATHER], tool_choice=choice), native=False).params
    assert params["tool_choice"] == expected


def test_assistant_thinking_blocks_from_earlier_turns_are_left_out_of_the_translation() -> None:
    turns = [{"role": "user", "content": "hi"},
             {"role": "assistant", "content": [{"type": "thinking", "thinking": "hmm", "signature": "s"},
                                               {"type": "text", "text": "hello"}]},
             {"role": "user", "content": "again"}]
    assert chat(messages=turns).messages[1].content == "hello"


def test_sampling_hints_without_a_chat_counterpart_are_left_out_of_the_translation() -> None:
    params = chat_params(body(top_k=5, service_tier="auto"), native=False).params
    assert "top_k" not in params and "service_tier" not in params


@pytest.mark.parametrize(("fields", "param"), [
    ({"thinking": {"type": "enabled", "budget_tokens": 2048}}, "thinking"),
    ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "tools[0].type"),
    ({"messages": [{"role": "user", "content": [
        {"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBER"}}]}]},
     "messages[0].content[0]"),
    ({"mcp_servers": [{"type": "url", "url": "https://mcp.example.com", "name": "x"}]}, "mcp_servers"),
])
def test_anthropic_only_fields_are_a_400_naming_them_unless_anthropic_answers(
    fields: dict[str, Any], param: str
) -> None:
    with pytest.raises(NotSupported) as refused:
        chat_params(body(**fields), native=False)
    assert refused.value.status == 400 and refused.value.param == param
    assert f"'{param}'" in refused.value.message
    # Answered by Anthropic deployments only: allowed, and named as what the passthrough must carry.
    translation = chat_params(body(**fields), native=True)
    assert translation.needs_native == param
    parse_request(ChatRequest, translation.params, strict=True)  # still one valid chat request


def test_a_document_for_anthropic_stays_in_the_request_as_an_opaque_part() -> None:
    document = {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "notes"}}
    request = chat(native=True, messages=[{"role": "user", "content": [document, {"type": "text", "text": "sum up"}]}])
    user = request.messages[0]
    assert isinstance(user.content, list) and isinstance(user.content[0], OtherPart)
    assert user.content[0].type == "document"


@pytest.mark.parametrize(("fields", "param", "words"), [
    ({"max_tokens": None}, "max_tokens", "Missing required parameter 'max_tokens'"),
    ({"max_tokens": 0}, "max_tokens", "at least 1"),
    ({"model": ""}, "model", "Missing required parameter 'model'"),
    ({"messages": []}, "messages", "non-empty"),
    ({"messages": [{"role": "system", "content": "x"}]}, "messages[0].role", "top-level 'system'"),
    ({"messages": [{"role": "user", "content": [{"type": "text"}]}]}, "messages[0].content[0].text", "string"),
    ({"messages": [{"role": "user", "content": [{"type": "tool_result"}]}]},
     "messages[0].content[0].tool_use_id", "Missing"),
    ({"temperature": 1.5}, "temperature", "0 to 1"),
    ({"stop_sequences": "END"}, "stop_sequences", "array of strings"),
    ({"tools": [{"name": "x"}]}, "tools[0].input_schema", "Missing"),
    ({"tools": [WEATHER], "tool_choice": {"type": "sometimes"}}, "tool_choice.type", "'auto', 'any'"),
    ({"stream": "yes"}, "stream", "boolean"),
])
def test_a_bad_body_is_a_400_naming_the_anthropic_field(fields: dict[str, Any], param: str, words: str) -> None:
    with pytest.raises(InvalidRequest) as refused:
        chat_params({k: v for k, v in body(**fields).items() if v is not None}, native=False)
    assert refused.value.param == param and words in refused.value.message


def test_the_fingerprint_sees_a_redaction_in_place_and_an_appended_message_but_not_the_model() -> None:
    request = chat(messages=[{"role": "user", "content": "mail me at ann@example.com"}])
    taken = fingerprint_of(request)
    assert fingerprint_of(request.model_copy(update={"model": "claude-tier-2"})) == taken
    request.messages[0].content = "mail me at [EMAIL]"
    assert fingerprint_of(request) != taken
    appended = request.model_copy(update={"messages": [*request.messages, UserMessage(role="user", content="x")]})
    assert fingerprint_of(appended) != fingerprint_of(request)


# ---------------------------------------------------------------------------- answer


def completion(message: dict[str, Any], finish: str, usage: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"id": "chatcmpl-abc", "object": "chat.completion", "created": 1, "model": "gpt-x",
            "choices": [{"index": 0, "message": {"role": "assistant", **message}, "finish_reason": finish}],
            "usage": usage or {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15}}


def test_a_text_answer_is_an_anthropic_message() -> None:
    message = strictly(Message, message_of(completion({"content": "Hello."}, "stop"), "claude"))
    assert message.id == "msg_abc" and message.model == "gpt-x" and message.role == "assistant"
    assert [(b.type, getattr(b, "text", None)) for b in message.content] == [("text", "Hello.")]
    assert (message.stop_reason, message.stop_sequence) == ("end_turn", None)
    assert (message.usage.input_tokens, message.usage.output_tokens) == (12, 3)


def test_tool_calls_are_tool_use_blocks_with_parsed_input() -> None:
    calls = [{"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}]
    message = strictly(Message, message_of(completion({"content": None, "tool_calls": calls}, "tool_calls"), "c"))
    assert message.stop_reason == "tool_use"
    block = message.content[0]
    assert block.type == "tool_use" and (block.id, block.name, block.input) == ("call_1", "get_weather",
                                                                                 {"city": "Paris"})


@pytest.mark.parametrize(("finish", "reason"), [
    ("stop", "end_turn"), ("length", "max_tokens"), ("tool_calls", "tool_use"), ("content_filter", "refusal"),
])
def test_finish_reasons_map_to_stop_reasons(finish: str, reason: str) -> None:
    assert strictly(Message, message_of(completion({"content": "x"}, finish), "c")).stop_reason == reason


def test_cached_prompt_tokens_are_anthropic_cache_reads_outside_input_tokens() -> None:
    usage = {"prompt_tokens": 100, "completion_tokens": 5, "total_tokens": 105,
             "prompt_tokens_details": {"cached_tokens": 80}}
    message = strictly(Message, message_of(completion({"content": "x"}, "stop", usage), "c"))
    assert (message.usage.input_tokens, message.usage.cache_read_input_tokens) == (20, 80)


# ---------------------------------------------------------------------------- errors


@pytest.mark.parametrize(("error", "status", "kind"), [
    (InvalidRequest("bad"), 400, "invalid_request_error"),
    (GuardrailViolation("blocked", check="injection", direction="input"), 400, "invalid_request_error"),
    (AuthenticationFailed("who?"), 401, "authentication_error"),
    (ModelNotAllowed("no"), 403, "permission_error"),
    (ModelNotFound("nope", ["sim"]), 404, "not_found_error"),
    (RequestTooLarge("big"), 413, "request_too_large"),
    (RateLimited("slow down", scope="user", kind="requests", retry_after=3), 429, "rate_limit_error"),
    (BudgetExceeded("spent", scope="user", window="day", limit_usd=1, resets_in=60), 429, "rate_limit_error"),
    (UpstreamServerError("down"), 502, "api_error"),
    (UpstreamTimeout("late"), 504, "timeout_error"),
    (KeelError("oops"), 500, "api_error"),
])
def test_each_error_is_anthropic_s_error_body(error: KeelError, status: int, kind: str) -> None:
    assert error.status == status
    shown = error_body(error)
    assert shown == {"type": "error", "error": {"type": kind, "message": error.message}}
    if kind != "request_too_large":  # Anthropic documents 413 request_too_large; the SDK's union lacks it
        strictly(ErrorResponse, shown)
