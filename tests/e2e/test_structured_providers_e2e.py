"""Structured outputs on every provider kind, through `keel serve` with the official openai SDK: the fake
OpenAI and Anthropic upstreams answer broken JSON on purpose (`invalid_json_first`), and the answer the
client gets is repaired, or a 422 `invalid_output`; tool calls are validated and streamed; the embedded
model answers a json_schema request validly under its grammar."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import jsonschema
import openai
import pytest
from conftest import GatewayProcess, require_service
from openai import OpenAI

from keel.config import LocalDeployment
from keel.errors import ModelNotLoaded
from keel.providers.local import model_file
from keel.testing.fake_anthropic import FakeAnthropicServer
from keel.testing.fake_openai import FakeOpenAIServer

SCHEMA = {"type": "object", "required": ["name", "age"], "additionalProperties": False,
          "properties": {"name": {"type": "string"}, "age": {"type": "integer"}}}
FORMAT: Any = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}}
MESSAGES: Any = [{"role": "user", "content": "Who wrote Dune?"}]
TOOL: Any = {"type": "function", "function": {"name": "lookup", "parameters": SCHEMA}}
REQUIRED: Any = {"type": "function", "function": {"name": "lookup"}}


class Upstream:
    """One fake upstream behind a gateway: its kind, a switch for broken JSON, and what it was asked."""

    def __init__(self, kind: str, server: FakeOpenAIServer | FakeAnthropicServer) -> None:
        self.kind = kind
        self.server = server

    def deployment(self) -> dict[str, Any]:
        if isinstance(self.server, FakeAnthropicServer):
            return {"provider": "anthropic", "base_url": self.server.url, "model": "claude-test"}
        return {"provider": "openai", "base_url": self.server.url, "model": "gpt-4o-mini"}

    def break_next(self, calls: int, how: str = "wrong_type") -> None:
        changes: dict[str, Any] = {"invalid_json_first": calls}
        if isinstance(self.server, FakeOpenAIServer):
            changes["invalid_json_how"] = how
        fake = self.server.fake
        self.server.call(lambda: fake.configure_from(changes))

    @property
    def requests(self) -> int:
        return int(self.server.fake.stats.requests)


@pytest.fixture(params=["openai", "anthropic"])
def upstream(request: pytest.FixtureRequest) -> Iterator[Upstream]:
    server: FakeOpenAIServer | FakeAnthropicServer = (
        FakeOpenAIServer() if request.param == "openai" else FakeAnthropicServer()
    )
    with server:
        yield Upstream(request.param, server)


@pytest.fixture
def client(upstream: Upstream, gateway: Callable[..., GatewayProcess]) -> OpenAI:
    model = {"name": "m", "validation": {"max_repairs": 2}, "retry": {"max_attempts": 1},
             "deployments": [upstream.deployment()]}
    gw = gateway({"models": [model], "store": {"log_content": False}}, env={"KEEL_MASTER_KEY": ""})
    return OpenAI(base_url=gw.url + "/v1", api_key="unused", max_retries=0)


def test_a_broken_first_answer_is_repaired(upstream: Upstream, client: OpenAI) -> None:
    upstream.break_next(1)
    answer = client.chat.completions.create(model="m", messages=MESSAGES, response_format=FORMAT)
    jsonschema.validate(json.loads(answer.choices[0].message.content or ""), SCHEMA)
    assert answer.choices[0].finish_reason == "stop" and not answer.choices[0].message.tool_calls
    assert upstream.requests == 2  # the broken answer, then the repaired one


def test_an_answer_that_stays_broken_is_a_422_invalid_output(upstream: Upstream, client: OpenAI) -> None:
    upstream.break_next(100)
    with pytest.raises(openai.UnprocessableEntityError) as caught:
        client.chat.completions.create(model="m", messages=MESSAGES, response_format=FORMAT)
    error = caught.value.body
    assert isinstance(error, dict) and error["code"] == "invalid_output"
    assert "after 3 tries" in error["message"] and "$.name" in error["message"]
    assert upstream.requests == 3


def test_tool_calls_are_validated_and_repaired(upstream: Upstream, client: OpenAI) -> None:
    if upstream.kind == "openai":  # Anthropic's input is JSON the upstream parsed: only schema-invalid
        upstream.break_next(1, "truncated")
        called = client.chat.completions.create(model="m", messages=MESSAGES, tools=[TOOL], tool_choice=REQUIRED)
        [call] = called.choices[0].message.tool_calls or []
        assert call.type == "function"
        jsonschema.validate(json.loads(call.function.arguments), SCHEMA)
        assert upstream.requests == 2
    else:
        upstream.break_next(1)
        called = client.chat.completions.create(model="m", messages=MESSAGES, tools=[TOOL], tool_choice=REQUIRED)
        [call] = called.choices[0].message.tool_calls or []
        jsonschema.validate(json.loads(call.function.arguments), SCHEMA)
        assert upstream.requests == 2


def test_tool_calls_are_streamed_as_openai_deltas(upstream: Upstream, client: OpenAI) -> None:
    # OpenAI sends the role and the call's id and name in the first chunk, which the reliability stage
    # prefetches before the validation stage wraps the stream: the wrap must still see it.
    if upstream.kind != "openai":
        upstream.server.configure(text="", tool_uses=[{"name": "lookup", "input": {"name": "Frank", "age": 59}}])
    stream = client.chat.completions.create(model="m", messages=MESSAGES, tools=[TOOL], tool_choice=REQUIRED,
                                            stream=True)
    deltas = [c.choices[0].delta.tool_calls[0] for c in stream if c.choices and c.choices[0].delta.tool_calls]
    assert deltas[0].index == 0 and deltas[0].id and deltas[0].function and deltas[0].function.name == "lookup"
    assert len(deltas) > 2  # the call first, then its arguments in fragments
    jsonschema.validate(json.loads("".join(d.function.arguments or "" for d in deltas if d.function)), SCHEMA)


def test_a_streamed_json_answer_arrives_as_content(upstream: Upstream, client: OpenAI) -> None:
    stream = client.chat.completions.create(model="m", messages=MESSAGES, response_format=FORMAT, stream=True)
    chunks = [c for c in stream if c.choices]
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    jsonschema.validate(json.loads(text), SCHEMA)
    assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == ["stop"]


@pytest.mark.local_model
def test_the_embedded_model_answers_json_schema_validly(gateway: Callable[..., GatewayProcess]) -> None:
    pytest.importorskip("llama_cpp")
    try:
        model_file(LocalDeployment(provider="local"))
    except ModelNotLoaded as exc:
        require_service("the embedded model", exc.message)
    small = {"type": "object", "required": ["colour"], "additionalProperties": False,
             "properties": {"colour": {"type": "string", "maxLength": 12}}}
    gw = gateway({"models": [{"name": "local", "validation": {"max_repairs": 0},
                              "deployments": [{"provider": "local"}]}]}, env={"KEEL_MASTER_KEY": ""})
    client = OpenAI(base_url=gw.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    answer = client.chat.completions.create(
        model="local", messages=[{"role": "user", "content": "Name a colour."}], max_tokens=40, seed=1,
        temperature=0, response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": small}},
    )
    jsonschema.validate(json.loads(answer.choices[0].message.content or ""), small)  # no repair allowed
