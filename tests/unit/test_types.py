"""The wire types: what a client sends is understood, and nothing it sends is lost."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from keel.types import (
    AssistantMessage,
    ChatRequest,
    EmbeddingRequest,
    OtherPart,
    ResponseFormatJSONObject,
    ResponseFormatJSONSchema,
    ResponseFormatText,
    ToolMessage,
    UserMessage,
    content_text,
)


def chat(**fields: Any) -> ChatRequest:
    body: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}
    return ChatRequest.model_validate(body)


def test_unknown_fields_survive_a_model_dump_round_trip() -> None:
    body: dict[str, Any] = {
        "model": "m",
        "messages": [
            {"role": "user", "content": "hi", "x_message_flag": 1},
            {"role": "assistant", "content": None, "audio": {"id": "a1"}},
        ],
        "reasoning_effort": "low",
        "prediction": {"type": "content", "content": "x"},
        "store": True,
        "web_search_options": {},
        "tools": [{"type": "function", "function": {"name": "f", "x_extra": "kept"}, "x_tool": 2}],
    }
    request = ChatRequest.model_validate(body)
    dumped = request.model_dump(exclude_unset=True, by_alias=True)
    assert dumped == body
    assert ChatRequest.model_validate(dumped).model_dump(exclude_unset=True, by_alias=True) == body


def test_unset_fields_are_not_invented_on_the_way_out() -> None:
    dumped = chat().model_dump(exclude_unset=True, by_alias=True)
    assert dumped == {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def test_multi_part_user_content_keeps_every_part_and_joins_text() -> None:
    parts = [
        {"type": "text", "text": "what is "},
        {"type": "image_url", "image_url": {"url": "https://example.com/a.png", "detail": "low"}},
        {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}},
        {"type": "text", "text": "this?"},
    ]
    request = chat(messages=[{"role": "user", "content": parts}])
    message = request.messages[0]
    assert isinstance(message, UserMessage) and isinstance(message.content, list)
    assert [type(p).__name__ for p in message.content] == ["TextPart", "ImagePart", "OtherPart", "TextPart"]
    assert request.last_user_text() == "what is this?"
    assert request.model_dump(exclude_unset=True)["messages"][0]["content"] == parts


def test_tool_round_trip_messages_parse() -> None:
    request = chat(messages=[
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}},
        ]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "rain"}]},
    ])
    assistant, tool, tool_parts = request.messages[2], request.messages[3], request.messages[4]
    assert isinstance(assistant, AssistantMessage) and assistant.tool_calls is not None
    assert assistant.tool_calls[0].function.name == "get_weather"
    assert isinstance(tool, ToolMessage) and tool.tool_call_id == "call_1" and tool.content == "sunny"
    assert isinstance(tool_parts, ToolMessage) and content_text(tool_parts.content) == "rain"
    assert request.last_user_text() == "weather in Paris?"


def test_tool_message_without_its_call_id_is_refused() -> None:
    with pytest.raises(ValidationError) as info:
        chat(messages=[{"role": "tool", "content": "sunny"}])
    assert any(e["loc"][-1] == "tool_call_id" for e in info.value.errors())


@pytest.mark.parametrize(
    ("response_format", "kind"),
    [
        ({"type": "text"}, ResponseFormatText),
        ({"type": "json_object"}, ResponseFormatJSONObject),
        (
            {"type": "json_schema", "json_schema": {
                "name": "answer", "strict": True,
                "schema": {"type": "object", "properties": {"a": {"type": "integer"}}},
            }},
            ResponseFormatJSONSchema,
        ),
    ],
)
def test_response_format_variants_parse_and_dump_back(response_format: dict[str, Any], kind: type) -> None:
    request = chat(response_format=response_format)
    assert isinstance(request.response_format, kind)
    assert request.model_dump(exclude_unset=True, by_alias=True)["response_format"] == response_format


def test_json_schema_response_format_exposes_the_schema() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    request = chat(response_format={"type": "json_schema", "json_schema": {"name": "n", "schema": schema}})
    assert isinstance(request.response_format, ResponseFormatJSONSchema)
    assert request.response_format.json_schema.schema_ == schema


def test_unknown_response_format_type_is_refused() -> None:
    with pytest.raises(ValidationError):
        chat(response_format={"type": "yaml"})


@pytest.mark.parametrize(
    ("fields", "limit"),
    [
        ({}, None),
        ({"max_tokens": 50}, 50),
        ({"max_completion_tokens": 70}, 70),
        ({"max_tokens": 50, "max_completion_tokens": 70}, 70),
    ],
)
def test_output_limit_is_whichever_cap_the_client_sent(fields: dict[str, Any], limit: int | None) -> None:
    assert chat(**fields).output_limit == limit


@pytest.mark.parametrize("fields", [{"max_tokens": 0}, {"max_tokens": -1}, {"max_completion_tokens": 0}])
def test_output_limit_must_be_positive(fields: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        chat(**fields)


def test_last_user_text_is_the_latest_user_message() -> None:
    request = chat(messages=[
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": [{"type": "text", "text": "second"}]},
        {"role": "assistant", "content": "sure"},
    ])
    assert request.last_user_text() == "second"


def test_last_user_text_without_a_user_message_is_empty() -> None:
    assert chat(messages=[{"role": "system", "content": "sys"}]).last_user_text() == ""


def test_unknown_role_is_refused() -> None:
    with pytest.raises(ValidationError):
        chat(messages=[{"role": "robot", "content": "beep"}])


@pytest.mark.parametrize("value", ["text", ["a", "b"], [1, 2, 3], [[1, 2], [3]]])
def test_embedding_input_accepts_every_openai_form(value: Any) -> None:
    request = EmbeddingRequest.model_validate({"model": "e", "input": value, "encoding_format": "float"})
    assert request.model_dump(exclude_unset=True)["input"] == value


@pytest.mark.parametrize("value", [5, {"text": "x"}, [1.5], [["a"]], None])
def test_embedding_input_of_another_type_is_refused(value: Any) -> None:
    with pytest.raises(ValidationError):
        EmbeddingRequest.model_validate({"model": "e", "input": value})


def test_known_content_part_types_are_held_to_their_schema() -> None:
    with pytest.raises(ValidationError) as info:
        chat(messages=[{"role": "user", "content": [{"type": "text"}]}])
    assert any(e["loc"][-1] == "text" for e in info.value.errors())
    with pytest.raises(ValidationError):
        chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}])


def test_unknown_content_part_types_pass_as_they_came() -> None:
    part = {"type": "input_video", "video": {"url": "x"}}
    request = chat(messages=[{"role": "user", "content": [part]}])
    message = request.messages[0]
    assert isinstance(message, UserMessage) and isinstance(message.content, list)
    assert isinstance(message.content[0], OtherPart)
    assert request.model_dump(exclude_unset=True)["messages"][0]["content"] == [part]


@pytest.mark.parametrize("n", [None, 1])
def test_one_choice_is_served(n: int | None) -> None:
    assert chat(n=n).n == n


@pytest.mark.parametrize("n", [0, 2, 5])
def test_several_choices_are_refused_with_what_to_do_instead(n: int) -> None:
    with pytest.raises(ValidationError) as info:
        chat(n=n)
    assert "send several requests" in str(info.value)


@pytest.mark.parametrize("value", ["", [], [[]], ["x"] * 2049])
def test_empty_or_oversized_embedding_input_is_refused(value: Any) -> None:
    with pytest.raises(ValidationError):
        EmbeddingRequest.model_validate({"model": "e", "input": value})


@pytest.mark.parametrize("fields", [{"temperature": "0.5"}, {"stream": "true"}, {"max_tokens": "5"},
                                    {"max_tokens": True}, {"stream": 1}])
def test_strict_parsing_refuses_what_lax_parsing_would_coerce(fields: dict[str, Any]) -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}
    with pytest.raises(ValidationError):
        ChatRequest.model_validate(body, strict=True)


def test_strict_parsing_accepts_a_full_openai_request() -> None:
    body: dict[str, Any] = {
        "model": "m", "temperature": 1, "top_p": 0.5, "max_completion_tokens": 10, "stream": True,
        "stream_options": {"include_usage": True}, "stop": ["\n"], "seed": 1, "n": 1, "logprobs": True,
        "top_logprobs": 2, "user": "u", "metadata": {"feature": "f"}, "parallel_tool_calls": False,
        "tool_choice": {"type": "function", "function": {"name": "f"}},
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}, "strict": True}}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": {"type": "object"}}},
        "messages": [
            {"role": "developer", "content": [{"type": "text", "text": "rules"}]},
            {"role": "user", "content": [{"type": "text", "text": "hi"},
                                         {"type": "image_url", "image_url": {"url": "data:,"}}]},
            {"role": "assistant", "content": None, "refusal": None,
             "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "c", "content": "done"},
        ],
    }
    request = ChatRequest.model_validate(body, strict=True)
    assert request.model_dump(exclude_unset=True, by_alias=True) == body
