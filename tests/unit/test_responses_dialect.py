"""The Responses API at the edge: a request body to the one chat call, a chat.completion back to a
Response, and the chunk stream to the Responses event stream, each checked against OpenAI's own API
description (Response, and each ResponseStreamEvent member by its type)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from spec import validate

from keel.chunks import replay_chunks
from keel.dialects.responses import chat_body, in_responses_terms, response_of
from keel.dialects.responses_events import ResponseEvents
from keel.errors import InvalidRequest, UpstreamConnectionError
from keel.pipeline import ChunkStream
from keel.request_errors import parse_request
from keel.types import ChatRequest

TOOL = {"type": "function", "name": "get_weather", "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}, "strict": True}


def completion(content: str | None = "Hello.", calls: list[dict[str, Any]] | None = None,
               finish: str = "stop") -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": content, "refusal": None}
    if calls:
        message["tool_calls"] = calls
    return {"id": "chatcmpl-1", "object": "chat.completion", "created": 1700000000, "model": "gpt-x",
            "choices": [{"index": 0, "message": message, "finish_reason": finish, "logprobs": None}],
            "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10,
                      "prompt_tokens_details": {"cached_tokens": 2}}}


CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}

# ---------------------------------------------------------------------------- requests


def test_a_string_input_and_instructions_become_a_system_and_a_user_message() -> None:
    translated = chat_body({"model": "m", "input": "Hi", "instructions": "Be brief.", "max_output_tokens": 20,
                            "temperature": 0.5, "top_p": 0.9, "user": "u1", "metadata": {"feature": "faq"}})
    assert translated.chat == {
        "model": "m", "temperature": 0.5, "top_p": 0.9, "user": "u1", "metadata": {"feature": "faq"},
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        "max_completion_tokens": 20,
    }
    assert translated.conversation == [{"role": "user", "content": "Hi"}]  # stored without the instructions
    assert translated.store is True
    parse_request(ChatRequest, translated.chat, strict=True)


def test_input_items_become_chat_messages_with_tool_calls_and_results() -> None:
    body = {"model": "m", "input": [
        {"role": "developer", "content": "Use tools."},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Weather "},
                                                          {"type": "input_text", "text": "in Oslo?"}]},
        {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": "{}"},
        {"type": "function_call", "call_id": "call_2", "name": "get_time", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "call_1", "output": "sunny"},
        {"type": "function_call_output", "call_id": "call_2", "output": [{"type": "input_text", "text": "noon"}]},
        {"role": "assistant", "content": [{"type": "output_text", "text": "It is sunny."}]},
    ]}
    messages = chat_body(body).chat["messages"]
    assert messages == [
        {"role": "developer", "content": "Use tools."},
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}},
            {"id": "call_2", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        {"role": "tool", "tool_call_id": "call_2", "content": "noon"},
        {"role": "assistant", "content": "It is sunny."},
    ]
    parse_request(ChatRequest, chat_body(body).chat, strict=True)


def test_a_continuation_puts_the_previous_messages_first_and_not_their_instructions() -> None:
    previous = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    translated = chat_body({"model": "m", "input": "More", "instructions": "New rules.",
                            "previous_response_id": "resp_1"}, previous)
    assert translated.chat["messages"] == [{"role": "system", "content": "New rules."}, *previous,
                                           {"role": "user", "content": "More"}]
    assert translated.previous_response_id == "resp_1"
    assert previous == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]


def test_function_tools_tool_choice_and_text_format_become_their_chat_forms() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    chat = chat_body({"model": "m", "input": "x", "tools": [TOOL], "parallel_tool_calls": False,
                      "tool_choice": {"type": "function", "name": "get_weather"},
                      "text": {"format": {"type": "json_schema", "name": "out", "schema": schema, "strict": True}},
                      "stream": True}).chat
    assert chat["tools"] == [{"type": "function", "function": {
        "name": "get_weather", "description": "Weather in a city", "parameters": TOOL["parameters"], "strict": True}}]
    assert chat["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    assert chat["parallel_tool_calls"] is False
    assert chat["response_format"] == {"type": "json_schema",
                                       "json_schema": {"name": "out", "schema": schema, "strict": True}}
    assert chat["stream_options"] == {"include_usage": True}  # response.completed carries the usage
    request = parse_request(ChatRequest, chat, strict=True)
    assert request.tools is not None and request.response_format is not None
    assert chat_body({"model": "m", "input": "x", "text": {"format": {"type": "json_object"}},
                      "tool_choice": "required"}).chat | {} == {
        "model": "m", "messages": [{"role": "user", "content": "x"}], "tool_choice": "required",
        "response_format": {"type": "json_object"}}


@pytest.mark.parametrize(("body", "param", "words"), [
    ({"tools": [{"type": "web_search"}]}, "tools[0].type", "function tools only"),
    ({"tools": [TOOL, {"type": "file_search", "vector_store_ids": ["v"]}]}, "tools[1].type", "function tools only"),
    ({"tools": [{"type": "computer_use_preview"}]}, "tools[0].type", "run it in your code"),
    ({"tools": [{"type": "code_interpreter"}]}, "tools[0].type", "function tools only"),
    ({"tools": [{"type": "mcp", "server_label": "x"}]}, "tools[0].type", "function tools only"),
    ({"tools": [{"type": "image_generation"}]}, "tools[0].type", "function tools only"),
    ({"background": True}, "background", "stream"),
    ({"reasoning": {"effort": "high"}}, "reasoning", "leave 'reasoning' out"),
    ({"include": ["reasoning.encrypted_content"]}, "include", "leave 'include' out"),
    ({"conversation": "conv_1"}, "conversation", "previous_response_id"),
    ({"prompt": {"id": "pmpt_1"}}, "prompt", "metadata.prompt"),
    ({"truncation": "auto"}, "truncation", "shorten the input"),
    ({"max_tool_calls": 3}, "max_tool_calls", "built-in tools"),
    ({"top_logprobs": 2}, "top_logprobs", "logprobs"),
    ({"service_tier": "flex"}, "service_tier", "routing"),
    ({"frobnicate": 1}, "frobnicate", "Unknown parameter"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "https://x/y.png"}]}]},
     "input[0].content[0].type", "image_url"),
    ({"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "file_1"}]}]},
     "input[0].content[0].type", "input_file"),
    ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0].type", "previous_response_id"),
    ({"input": [{"type": "reasoning", "summary": []}]}, "input[0].type", "'reasoning'"),
    ({"input": [{"role": "tool", "content": "x"}]}, "input[0].role", "'tool'"),
    # found by Schemathesis: an object or array where a role or a part's type goes was a 500 (unhashable)
    ({"input": [{"role": {"a": 1}, "content": "x"}]}, "input[0].role", "got an object"),
    ({"input": [{"role": ["user"], "content": "x"}]}, "input[0].role", "got an array"),
    ({"input": [{"role": "user", "content": [{"type": {"a": 1}, "text": "x"}]}]}, "input[0].content[0].type",
     "got an object"),
    ({"tool_choice": {"type": "web_search_preview"}}, "tool_choice", "web_search_preview"),
    ({"tool_choice": {"type": "allowed_tools", "mode": "auto", "tools": []}}, "tool_choice", "allowed_tools"),
    ({"text": {"format": {"type": "grammar"}}}, "text.format.type", "json_schema"),
    ({"text": {"verbosity": "low"}}, "text.verbosity", "leave it out"),
    ({"input": 3}, "input", "a number"),
    ({"input": [{"type": "function_call", "name": "f", "arguments": "{}"}]}, "input[0].call_id", "a string"),
    ({"store": "yes"}, "store", "a boolean"),
    ({"stream_options": {"include_usage": True}}, "stream_options", "include_obfuscation"),
])
def test_what_the_one_call_cannot_carry_is_a_400_naming_the_field(body: dict[str, Any], param: str,
                                                                    words: str) -> None:
    with pytest.raises(InvalidRequest) as refused:
        chat_body({"model": "m", "input": "x", **body})
    assert refused.value.param == param
    assert param.split("[")[0].split(".")[0] in refused.value.message and words in refused.value.message
    assert refused.value.status == 400


@pytest.mark.parametrize("body", [{"background": False}, {"truncation": "disabled"}, {"include": []},
                                  {"reasoning": None}, {"service_tier": "auto"}, {"prompt_cache_key": "k"},
                                  {"stream_options": {"include_obfuscation": False}}])
def test_defaults_of_unsupported_fields_are_accepted(body: dict[str, Any]) -> None:
    assert chat_body({"model": "m", "input": "x", **body}).chat["messages"] == [{"role": "user", "content": "x"}]


def test_a_refusal_of_the_chat_body_names_the_responses_parameter() -> None:
    translated = chat_body({"model": "m", "instructions": "i", "input": [
        {"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "max_output_tokens": 0})
    with pytest.raises(InvalidRequest) as refused:
        parse_request(ChatRequest, translated.chat, strict=True)
    reworded = in_responses_terms(refused.value, translated.origins)
    assert reworded.param == "max_output_tokens" and "'max_output_tokens'" in reworded.message
    empty = chat_body({"model": "m", "input": []})
    with pytest.raises(InvalidRequest) as refused:
        parse_request(ChatRequest, empty.chat, strict=True)
    assert in_responses_terms(refused.value, empty.origins).param == "input"


# ---------------------------------------------------------------------------- whole answers

ECHO = chat_body({"model": "m", "input": "x", "instructions": "i", "tools": [TOOL], "metadata": {"a": "b"}}).echo


def test_a_completion_becomes_a_response_the_spec_accepts() -> None:
    response = response_of(completion("Hello."), "resp_1", ECHO)
    validate("Response", response)
    assert response["id"] == "resp_1" and response["object"] == "response" and response["status"] == "completed"
    [message] = response["output"]
    assert message["type"] == "message" and message["id"].startswith("msg_")
    assert message["content"] == [{"type": "output_text", "text": "Hello.", "annotations": [], "logprobs": []}]
    assert response["usage"] == {"input_tokens": 7,
                                 "input_tokens_details": {"cached_tokens": 2, "cache_write_tokens": 0},
                                 "output_tokens": 3, "output_tokens_details": {"reasoning_tokens": 0},
                                 "total_tokens": 10}
    assert (response["instructions"], response["tools"], response["metadata"]) == ("i", [TOOL], {"a": "b"})
    assert "output_text" not in response  # an SDK convenience, not on the wire


def test_tool_calls_become_function_call_items() -> None:
    response = response_of(completion(None, [CALL], "tool_calls"), "resp_1", ECHO)
    validate("Response", response)
    [call] = response["output"]
    assert call["type"] == "function_call" and call["id"].startswith("fc_")
    assert (call["call_id"], call["name"], call["arguments"]) == ("call_1", "get_weather", '{"city": "Oslo"}')


def test_an_answer_cut_at_the_output_limit_is_incomplete() -> None:
    response = response_of(completion("Hel", finish="length"), "resp_1", ECHO)
    validate("Response", response)
    assert response["status"] == "incomplete"
    assert response["incomplete_details"] == {"reason": "max_output_tokens"}


# ---------------------------------------------------------------------------- event streams


async def _chunks(chunks: list[dict[str, Any]], fail: Exception | None = None) -> AsyncIterator[dict[str, Any]]:
    for chunk in chunks:
        yield chunk
    if fail is not None:
        raise fail


def stream_events(chunks: list[dict[str, Any]], fail: Exception | None = None) -> tuple[list[dict[str, Any]],
                                                                                      ResponseEvents]:
    events = ResponseEvents("resp_1", "m", ECHO)
    stream = ChunkStream(_chunks(chunks, fail))

    async def run() -> bytes:
        out = b""
        try:
            async for data in events.events(stream):
                out += data
        except UpstreamConnectionError as exc:
            out += events.error(exc)
        return out

    raw = asyncio.run(run())
    parsed = []
    for frame in raw.decode().split("\n\n")[:-1]:
        kind, data = frame.split("\n")
        event = orjson.loads(data.removeprefix("data: "))
        assert kind == "event: " + event["type"]  # SSE framing: the event name is the type
        parsed.append(event)
    assert raw.endswith(b"\n\n") and b"[DONE]" not in raw
    return parsed, events


def check(events: list[dict[str, Any]]) -> None:
    """Each event as OpenAI describes its type, numbered 0, 1, 2... in order."""
    members = {"response.created": "ResponseCreatedEvent", "response.in_progress": "ResponseInProgressEvent",
               "response.output_item.added": "ResponseOutputItemAddedEvent",
               "response.content_part.added": "ResponseContentPartAddedEvent",
               "response.output_text.delta": "ResponseTextDeltaEvent",
               "response.output_text.done": "ResponseTextDoneEvent",
               "response.content_part.done": "ResponseContentPartDoneEvent",
               "response.output_item.done": "ResponseOutputItemDoneEvent",
               "response.function_call_arguments.delta": "ResponseFunctionCallArgumentsDeltaEvent",
               "response.function_call_arguments.done": "ResponseFunctionCallArgumentsDoneEvent",
               "response.refusal.delta": "ResponseRefusalDeltaEvent",
               "response.refusal.done": "ResponseRefusalDoneEvent",
               "response.completed": "ResponseCompletedEvent", "response.incomplete": "ResponseIncompleteEvent",
               "response.failed": "ResponseFailedEvent", "error": "ResponseErrorEvent"}
    for event in events:
        validate(members[event["type"]], event)
        validate("ResponseStreamEvent", event)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))


def test_a_text_stream_is_the_responses_event_sequence() -> None:
    events, made = stream_events(replay_chunks(completion("Hello there.")))
    check(events)
    assert [e["type"] for e in events] == [
        "response.created", "response.in_progress", "response.output_item.added", "response.content_part.added",
        "response.output_text.delta", "response.output_text.done", "response.content_part.done",
        "response.output_item.done", "response.completed"]
    assert events[0]["response"]["status"] == "in_progress" and events[0]["response"]["output"] == []
    final = events[-1]["response"]
    assert final["status"] == "completed" and final["usage"]["total_tokens"] == 10
    assert final["output"][0]["content"][0]["text"] == "Hello there." == events[5]["text"]
    assert made.final == final  # what is stored is what the client saw


def test_text_then_tool_calls_stream_as_a_message_and_function_call_items() -> None:
    chunk = replay_chunks(completion("x"))[0]
    head = {k: chunk[k] for k in ("id", "object", "created", "model")}

    def delta(d: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {**head, "choices": [{"index": 0, "delta": d, "finish_reason": finish}]}

    chunks = [delta({"role": "assistant", "content": "Let me "}), delta({"content": "check."}),
              delta({"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                                     "function": {"name": "get_weather", "arguments": ""}}]}),
              delta({"tool_calls": [{"index": 0, "function": {"arguments": '{"city": '}}]}),
              delta({"tool_calls": [{"index": 0, "function": {"arguments": '"Oslo"}'}}]}),
              delta({"tool_calls": [{"index": 1, "id": "call_2", "type": "function",
                                     "function": {"name": "get_time", "arguments": "{}"}}]}),
              delta({}, "tool_calls")]
    events, _ = stream_events(chunks)
    check(events)
    kinds = [e["type"] for e in events]
    assert kinds == [
        "response.created", "response.in_progress",
        "response.output_item.added", "response.content_part.added", "response.output_text.delta",
        "response.output_text.delta", "response.output_text.done", "response.content_part.done",
        "response.output_item.done",
        "response.output_item.added", "response.function_call_arguments.delta",
        "response.function_call_arguments.delta", "response.function_call_arguments.done",
        "response.output_item.done",
        "response.output_item.added", "response.function_call_arguments.delta",
        "response.function_call_arguments.done", "response.output_item.done", "response.completed"]
    done = events[12]
    assert (done["name"], done["arguments"], done["output_index"]) == ("get_weather", '{"city": "Oslo"}', 1)
    output = events[-1]["response"]["output"]
    assert [(o["type"], o.get("call_id")) for o in output] == [("message", None), ("function_call", "call_1"),
                                                               ("function_call", "call_2")]
    assert "usage" not in events[-1]["response"]  # this stream sent none


def test_a_stream_cut_at_the_output_limit_ends_incomplete() -> None:
    events, _ = stream_events(replay_chunks(completion("Hel", finish="length")))
    check(events)
    assert events[-1]["type"] == "response.incomplete"
    assert events[-1]["response"]["incomplete_details"] == {"reason": "max_output_tokens"}


def test_a_failure_after_the_first_event_is_an_error_event_then_response_failed() -> None:
    chunks = replay_chunks(completion("Hello there."))[:2]
    events, made = stream_events(chunks, UpstreamConnectionError("the upstream dropped the stream"))
    check(events)
    assert [e["type"] for e in events][-2:] == ["error", "response.failed"]
    error, failed = events[-2], events[-1]["response"]
    assert error["code"] == "upstream_connection_error" and "dropped" in error["message"]
    assert failed["status"] == "failed" and failed["error"]["code"] == "server_error"
    assert "dropped" in failed["error"]["message"]
    assert made.final is None  # nothing to store
