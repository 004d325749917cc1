"""Answers checked like untrusted input, each problem naming its JSON path (keel.validation.answer)."""

from __future__ import annotations

import json
from typing import Any

from keel.types import ChatRequest
from keel.validation.answer import Expectations, expectations, needs_validation, problems
from keel.validation.schema import SchemaCache

ITEMS = {"type": "object", "required": ["items"], "properties": {"items": {"type": "array", "items": {
    "type": "object", "required": ["price"], "properties": {"price": {"type": "number"}}}}}}
WEATHER = {"type": "object", "required": ["city"], "properties": {"city": {"type": "string"}},
           "additionalProperties": False}


def request(**fields: Any) -> ChatRequest:
    return ChatRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields})


def schema_request(schema: dict[str, Any]) -> ChatRequest:
    return request(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}})


def tools_request(**fields: Any) -> ChatRequest:
    return request(tools=[{"type": "function", "function": {"name": "weather", "parameters": WEATHER}}], **fields)


def expect(req: ChatRequest) -> Expectations:
    return expectations(req, SchemaCache())


def body(content: str | None = None, *, tool_calls: list[dict[str, Any]] | None = None,
         finish: str = "stop", refusal: str | None = None) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": content, "refusal": refusal}
    if tool_calls is not None:
        message["tool_calls"] = tool_calls
    return {"choices": [{"index": 0, "message": message, "finish_reason": finish}]}


def call_of(name: str, arguments: str) -> dict[str, Any]:
    return {"id": "call_1", "type": "function", "function": {"name": name, "arguments": arguments}}


def test_a_wrong_type_deep_in_the_answer_is_named_by_its_path() -> None:
    answer = json.dumps({"items": [{"price": 1}, {"price": 2.5}, {"price": "abc"}]})
    assert problems(expect(schema_request(ITEMS)), body(answer)) == ["$.items[2].price: 'abc' is not of type 'number'"]


def test_a_valid_answer_has_no_problems() -> None:
    assert problems(expect(schema_request(ITEMS)), body('{"items": [{"price": 3}]}')) == []


def test_an_answer_that_is_not_json_says_where_it_broke() -> None:
    found = problems(expect(schema_request(ITEMS)), body('{"items": [{"price": 3}'))
    assert len(found) == 1 and found[0].startswith("$: not valid JSON")


def test_json_object_mode_wants_an_object() -> None:
    json_mode = expect(request(response_format={"type": "json_object"}))
    assert problems(json_mode, body("[1, 2]")) == ["$: a JSON object was expected, got an array"]
    assert problems(json_mode, body('{"any": "thing"}')) == []


def test_a_truncated_answer_is_invalid_even_when_it_parses() -> None:
    found = problems(expect(request(response_format={"type": "json_object"})), body("{}", finish="length"))
    assert any("finish_reason 'length'" in p for p in found)


def test_a_refusal_is_passed_on_as_the_models_answer() -> None:
    assert problems(expect(schema_request(ITEMS)), body(None, refusal="I can't help with that.")) == []


def test_tool_arguments_are_checked_against_the_tools_parameters() -> None:
    found = problems(expect(tools_request()), body(None, tool_calls=[call_of("weather", '{"city": 7}')]))
    assert found == ["tool_calls[0] ('weather') arguments $.city: 7 is not of type 'string'"]


def test_a_call_of_a_tool_that_was_not_offered_is_invalid() -> None:
    found = problems(expect(tools_request()), body(None, tool_calls=[call_of("delete_all", "{}")]))
    assert found == ["tool_calls[0] ('delete_all'): calls a tool that was not offered (offered: 'weather')"]


def test_tool_arguments_that_are_not_json_are_invalid() -> None:
    found = problems(expect(tools_request()), body(None, tool_calls=[call_of("weather", '{"city": "Par')]))
    assert found and found[0].startswith("tool_calls[0] ('weather') arguments $: not valid JSON")


def test_a_required_tool_call_that_is_missing_is_invalid_and_a_text_answer_is_fine_otherwise() -> None:
    assert problems(expect(tools_request()), body("It is sunny.")) == []
    found = problems(expect(tools_request(tool_choice="required")), body("It is sunny."))
    assert found == ["$: tool_choice requires a call of a tool, and the answer calls none"]


def test_many_problems_are_capped_and_sorted_by_path() -> None:
    schema = {"type": "object", "properties": {k: {"type": "number"} for k in "abcdefgh"}}
    found = problems(expect(schema_request(schema)), body(json.dumps({k: "x" for k in "hgfedcba"})))
    assert [p.split(":")[0] for p in found] == ["$.a", "$.b", "$.c", "$.d", "$.e"]


def test_only_json_and_tool_requests_are_validated() -> None:
    assert not needs_validation(request())
    assert not needs_validation(request(response_format={"type": "text"}))
    assert needs_validation(request(response_format={"type": "json_object"}))
    assert needs_validation(tools_request())
