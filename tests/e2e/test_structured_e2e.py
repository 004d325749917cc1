"""Structured outputs through `keel serve` with the official openai SDK: broken JSON from the simulated
provider repaired, or refused with 422 `invalid_output`; bad schemas refused with 400 naming them."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import openai
import pytest
from conftest import GatewayProcess
from openai import OpenAI

SCHEMA = {"type": "object", "required": ["name", "age"], "additionalProperties": False,
          "properties": {"name": {"type": "string"}, "age": {"type": "integer"}}}
FORMAT: Any = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}}
MESSAGES: Any = [{"role": "user", "content": "Who wrote Dune?"}]


def sim(rate: float, seed: int, **model: Any) -> dict[str, Any]:
    return {"name": "sim", **model, "deployments": [
        {"provider": "simulated", "invalid_json_rate": rate, "seed": seed}]}


@pytest.fixture
def client(gateway: Callable[..., GatewayProcess]) -> Callable[..., OpenAI]:
    def start(*models: dict[str, Any]) -> OpenAI:
        gw = gateway({"models": list(models), "store": {"log_content": False}})
        return OpenAI(base_url=gw.url + "/v1", api_key="unused", max_retries=0)
    return start


def test_broken_answers_are_repaired_and_every_answer_received_is_valid(client: Callable[..., OpenAI]) -> None:
    api = client(sim(0.3, seed=5, validation={"max_repairs": 4}))
    for _ in range(12):
        answer = api.chat.completions.create(model="sim", messages=MESSAGES, response_format=FORMAT)
        person = json.loads(answer.choices[0].message.content or "")
        assert isinstance(person["name"], str) and isinstance(person["age"], int)
    tool = {"type": "function", "function": {"name": "lookup", "parameters": SCHEMA}}
    called = api.chat.completions.create(model="sim", messages=MESSAGES, tools=[tool], tool_choice="required")
    arguments = json.loads(called.choices[0].message.tool_calls[0].function.arguments)  # type: ignore[index,union-attr]
    assert set(arguments) == {"name", "age"}


def test_an_answer_that_stays_broken_is_a_422_naming_the_path(client: Callable[..., OpenAI]) -> None:
    api = client(sim(1.0, seed=1, validation={"max_repairs": 2}))
    with pytest.raises(openai.UnprocessableEntityError) as caught:
        api.chat.completions.create(model="sim", messages=MESSAGES, response_format=FORMAT)
    error = caught.value.body
    assert isinstance(error, dict) and error["code"] == "invalid_output" and error["param"] == "response_format"
    assert "after 3 tries" in error["message"] and "$" in error["message"]
    assert caught.value.response.headers["x-should-retry"] == "false"


def test_a_broken_stream_ends_with_an_error_event(client: Callable[..., OpenAI]) -> None:
    api = client(sim(1.0, seed=2))
    stream = api.chat.completions.create(model="sim", messages=MESSAGES, response_format=FORMAT, stream=True)
    with pytest.raises(openai.APIError) as caught:
        for _ in stream:
            pass
    assert "invalid_output" in str(caught.value.body) or "did not match" in caught.value.message


def test_a_buffered_stream_arrives_repaired(client: Callable[..., OpenAI]) -> None:
    api = client(sim(0.3, seed=9, validation={"max_repairs": 4, "repair_streams": "buffer"}))
    for _ in range(5):
        stream = api.chat.completions.create(model="sim", messages=MESSAGES, response_format=FORMAT, stream=True)
        text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
        assert set(json.loads(text)) == {"name", "age"}


@pytest.mark.parametrize(("schema", "said"), [
    ({"type": "object", "properties": {"age": {"type": "integr"}}}, "$.properties.age.type"),
    ({"type": "object", "description": "x" * (1024 * 1024)}, "at most 256 KB"),
    ({"$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"}, "refers back to itself"),
])
def test_a_bad_schema_is_a_400_naming_it(client: Callable[..., OpenAI], schema: dict[str, Any], said: str) -> None:
    api = client(sim(0.0, seed=1))
    bad: Any = {"type": "json_schema", "json_schema": {"name": "bad", "schema": schema}}
    with pytest.raises(openai.BadRequestError) as caught:
        api.chat.completions.create(model="sim", messages=MESSAGES, response_format=bad)
    error = caught.value.body
    assert isinstance(error, dict) and error["param"] == "response_format.json_schema.schema"
    assert said in error["message"]


def test_a_recursive_schema_through_properties_is_answered(client: Callable[..., OpenAI]) -> None:
    api = client(sim(0.0, seed=1))
    tree: Any = {"type": "json_schema", "json_schema": {"name": "tree", "schema": {
        "$defs": {"node": {"type": "object", "required": ["label"], "properties": {
            "label": {"type": "string"}, "children": {"type": "array", "items": {"$ref": "#/$defs/node"}}}}},
        "$ref": "#/$defs/node"}}}
    answer = api.chat.completions.create(model="sim", messages=MESSAGES, response_format=tree)
    assert "label" in json.loads(answer.choices[0].message.content or "")


def test_a_tool_without_parameters_is_accepted(client: Callable[..., OpenAI]) -> None:
    api = client(sim(0.0, seed=1))
    tool: Any = {"type": "function", "function": {"name": "now"}}
    answer = api.chat.completions.create(model="sim", messages=MESSAGES, tools=[tool], tool_choice="required")
    assert answer.choices[0].message.tool_calls[0].function.arguments == "{}"  # type: ignore[index]
