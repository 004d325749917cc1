"""Legacy completions as the one internal call and back (keel.dialects.completions): what a request
becomes, what is refused and how the refusal names the field, and the answers and stream chunks
checked against OpenAI's own description of a `text_completion`."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from spec import COMPLETION, validate

from keel.chunks import replay_chunks
from keel.dialects.completions import (
    DEFAULT_MAX_TOKENS,
    MAX_PROMPTS,
    error_event,
    text_completion,
    text_completion_events,
    translated,
)
from keel.errors import InvalidRequest, UpstreamServerError
from keel.pipeline import ChunkStream
from keel.types import UserMessage

CHAT_COMPLETION: dict[str, Any] = {
    "id": "chatcmpl-abc123", "object": "chat.completion", "created": 1_700_000_000, "model": "gpt-4o-mini",
    "system_fingerprint": "fp_1",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello there, friend."},
                 "finish_reason": "stop", "logprobs": None}],
    "usage": {"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9},
}


def refused(body: Any) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as caught:
        translated(body)
    return caught.value


def check_chunk(chunk: dict[str, Any]) -> None:
    """OpenAI's description requires a finish reason in every choice, but its streams (and every
    OpenAI-compatible server's) send null until the last text chunk: the rest is checked as written."""
    validate(COMPLETION, {**chunk, "choices": [{**c, "finish_reason": c["finish_reason"] or "stop"}
                                               for c in chunk["choices"]]})


def events_of(completion: dict[str, Any], *, include_usage: bool, echo: str | None = None) -> list[bytes]:
    async def source() -> AsyncIterator[dict[str, Any]]:
        for chunk in replay_chunks(completion):
            yield chunk

    async def collect() -> list[bytes]:
        stream = ChunkStream(source())
        stream.hide_usage = not include_usage
        return [event async for event in text_completion_events(stream, None if echo is None else [echo])]

    return asyncio.run(collect())


def decoded(events: list[bytes]) -> list[dict[str, Any]]:
    assert events[-1] == b"data: [DONE]\n\n"
    assert all(event.startswith(b"data: ") and event.endswith(b"\n\n") for event in events)
    return [orjson.loads(event[6:]) for event in events[:-1]]


# ------------------------------------------------------------------ requests


def test_a_prompt_becomes_the_one_user_message_of_a_chat_request() -> None:
    call = translated({"model": "m", "prompt": "Once upon a time"})
    assert len(call.requests[0].messages) == 1
    message = call.requests[0].messages[0]
    assert isinstance(message, UserMessage) and message.content == "Once upon a time"
    assert call.echoes is None


def test_max_tokens_defaults_to_16_as_openai_and_is_kept_when_sent() -> None:
    assert translated({"model": "m", "prompt": "x"}).requests[0].max_tokens == DEFAULT_MAX_TOKENS == 16
    assert translated({"model": "m", "prompt": "x", "max_tokens": None}).requests[0].max_tokens == 16
    assert translated({"model": "m", "prompt": "x", "max_tokens": 300}).requests[0].max_tokens == 300


def test_the_sampling_and_tracking_fields_reach_the_chat_request() -> None:
    request = translated({
        "model": "m", "prompt": "x", "temperature": 0.2, "top_p": 0.9, "n": 1, "stop": ["\n"], "stream": True,
        "stream_options": {"include_usage": True}, "user": "u-1", "seed": 7, "presence_penalty": 0.5,
        "frequency_penalty": -0.5, "logit_bias": {"50256": -100}, "metadata": {"team": "search"}, "best_of": 1,
    }).requests[0]
    assert (request.temperature, request.top_p, request.n, request.stop, request.stream) == (0.2, 0.9, 1, ["\n"], True)
    assert request.stream_options is not None and request.stream_options.include_usage is True
    assert (request.user, request.seed, request.presence_penalty, request.frequency_penalty) == ("u-1", 7, 0.5, -0.5)
    assert request.metadata == {"team": "search"}
    sent = request.model_dump(exclude_none=True)
    assert sent["logit_bias"] == {"50256": -100}  # passed on to the upstream as chat's own field
    for own in ("prompt", "best_of", "echo", "suffix", "logprobs"):
        assert own not in sent


def test_a_list_of_one_prompt_is_that_prompt() -> None:
    message = translated({"model": "m", "prompt": ["only one"]}).requests[0].messages[0]
    assert isinstance(message, UserMessage) and message.content == "only one"


def test_several_prompts_are_one_chat_request_each_in_order() -> None:
    call = translated({"model": "m", "prompt": ["one", "two", "three"], "max_tokens": 5, "echo": True})
    assert [r.messages[0].content for r in call.requests] == ["one", "two", "three"]  # type: ignore[union-attr]
    assert all(r.max_tokens == 5 and r.model == "m" for r in call.requests)
    assert call.echoes == ("one", "two", "three")


@pytest.mark.parametrize(("prompt", "says"), [
    (["x"] * (MAX_PROMPTS + 1), f"at most {MAX_PROMPTS} prompts per request"),
    (["x", 1], "a list of prompts must hold strings only"),
], ids=["too-many", "mixed"])
def test_a_bad_list_of_prompts_is_refused_naming_the_limit(prompt: list[Any], says: str) -> None:
    error = refused({"model": "m", "prompt": prompt})
    assert error.param == "prompt" and error.status == 400 and says in error.message


@pytest.mark.parametrize("prompt", [[1, 2, 3], [[1, 2], [3]]], ids=["token-ids", "lists-of-token-ids"])
def test_token_id_prompts_are_refused_asking_for_a_string(prompt: Any) -> None:
    error = refused({"model": "m", "prompt": prompt})
    assert error.param == "prompt"
    assert "token ids are not accepted" in error.message and "Send the prompt as a string" in error.message


@pytest.mark.parametrize(("body", "message"), [
    ({"model": "m"}, "Missing required parameter 'prompt'."),
    ({"model": "m", "prompt": None}, "Missing required parameter 'prompt'."),
    ({"model": "m", "prompt": []}, "Invalid value for 'prompt': it must hold at least one string, got an empty array."),
    ({"model": "m", "prompt": {"text": "x"}}, "Invalid type for 'prompt': expected a string, got an object."),
    ({"model": "m", "prompt": 3}, "Invalid type for 'prompt': expected a string, got a number."),
])
def test_a_missing_or_malformed_prompt_is_named(body: dict[str, Any], message: str) -> None:
    error = refused(body)
    assert (error.param, error.message) == ("prompt", message)


@pytest.mark.parametrize(("field", "value", "says"), [
    ("suffix", "the end", "'suffix' is not supported"),
    ("logprobs", 0, "'logprobs' is not supported"),
    ("logprobs", 5, "'logprobs' is not supported"),
    ("best_of", 3, "'best_of' above 1 is not supported (got 3)"),
    ("messages", [{"role": "user", "content": "x"}], "send the messages to /v1/chat/completions"),
    ("echo", "yes", "Invalid type for 'echo': expected a boolean"),
    ("n", 2, "Keel returns one choice per request"),
    ("temperature", "0.7", "Invalid type for 'temperature'"),  # strict JSON types, as for chat
    ("max_tokens", 0, "'max_tokens'"),
])
def test_a_field_the_one_call_cannot_carry_is_refused_by_name(field: str, value: Any, says: str) -> None:
    error = refused({"model": "m", "prompt": "x", field: value})
    assert error.param == field and error.status == 400
    assert says in error.message


def test_a_body_that_is_not_an_object_is_refused() -> None:
    assert "must be a JSON object" in refused(["prompt"]).message


def test_null_suffix_and_logprobs_are_the_defaults_not_refusals() -> None:
    assert translated({"model": "m", "prompt": "x", "suffix": None, "logprobs": None, "echo": False}).echoes is None


# ------------------------------------------------------------------ answers


def test_a_chat_completion_becomes_a_text_completion_as_openai_describes_it() -> None:
    body = text_completion(CHAT_COMPLETION)
    validate(COMPLETION, body)
    assert body == {
        "id": "cmpl-abc123", "object": "text_completion", "created": 1_700_000_000, "model": "gpt-4o-mini",
        "choices": [{"text": "Hello there, friend.", "index": 0, "logprobs": None, "finish_reason": "stop"}],
        "usage": CHAT_COMPLETION["usage"], "system_fingerprint": "fp_1",
    }


def test_echo_puts_the_prompt_before_the_answer() -> None:
    assert text_completion(CHAT_COMPLETION, ["Say hi. "])["choices"][0]["text"] == "Say hi. Hello there, friend."


@pytest.mark.parametrize(("chat", "legacy"), [("stop", "stop"), ("length", "length"),
                                               ("content_filter", "content_filter"), ("tool_calls", "stop")])
def test_finish_reasons_are_the_three_a_text_completion_has(chat: str, legacy: str) -> None:
    completion = {**CHAT_COMPLETION, "choices": [{**CHAT_COMPLETION["choices"][0], "finish_reason": chat}]}
    body = text_completion(completion)
    validate(COMPLETION, body)
    assert body["choices"][0]["finish_reason"] == legacy


def test_no_fingerprint_or_usage_is_left_out_not_null() -> None:
    completion = {key: value for key, value in CHAT_COMPLETION.items() if key not in ("usage", "system_fingerprint")}
    body = text_completion({**completion, "system_fingerprint": None})
    validate(COMPLETION, body)
    assert "usage" not in body and "system_fingerprint" not in body


# ------------------------------------------------------------------ streams


def test_a_stream_becomes_text_completion_chunks_then_done() -> None:
    chunks = decoded(events_of(CHAT_COMPLETION, include_usage=False))
    for chunk in chunks:
        check_chunk(chunk)
        assert chunk["id"] == "cmpl-abc123" and chunk["object"] == "text_completion"
        assert chunk["system_fingerprint"] == "fp_1"
    assert "".join(c["choices"][0]["text"] for c in chunks) == "Hello there, friend."
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * (len(chunks) - 1) + ["stop"]
    assert all("usage" not in c for c in chunks)


def test_a_stream_with_include_usage_ends_with_the_usage_chunk() -> None:
    chunks = decoded(events_of(CHAT_COMPLETION, include_usage=True))
    for chunk in chunks:
        check_chunk(chunk)
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == CHAT_COMPLETION["usage"]
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"


def test_a_streamed_echo_sends_the_prompt_first() -> None:
    chunks = decoded(events_of(CHAT_COMPLETION, include_usage=False, echo="Say hi. "))
    assert chunks[0]["choices"][0]["text"] == "Say hi. "
    assert "".join(c["choices"][0]["text"] for c in chunks) == "Say hi. Hello there, friend."


def test_a_failure_mid_stream_is_an_openai_error_event() -> None:
    event = error_event(UpstreamServerError("The upstream failed."))
    assert event.startswith(b"data: ") and event.endswith(b"\n\n")
    body = orjson.loads(event[6:])
    assert body == {"error": {"message": "The upstream failed.", "type": UpstreamServerError.type, "param": None,
                              "code": UpstreamServerError.code}}
