"""The gateway's error path in-process: a bug is a 500 in OpenAI's shape with the request id
and no trace; validation errors name the parameter as the client wrote it."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from pydantic import ValidationError
from starlette.testclient import TestClient

from keel.config import parse_config
from keel.engine import Keel
from keel.pipeline import Call, Next, Reply
from keel.request_errors import invalid_request
from keel.server import create_app
from keel.server.app import REQUEST_ID, spec_nulls_dropped
from keel.types import ChatRequest, EmbeddingRequest


class Broken:
    """A stage with a bug in it."""

    async def __call__(self, call: Call, next: Next) -> Reply:
        raise RuntimeError("secret internal detail")


@pytest.fixture
def broken_gateway(monkeypatch: pytest.MonkeyPatch) -> Iterator[TestClient]:
    monkeypatch.delenv("KEEL_MASTER_KEY", raising=False)
    config = parse_config({"models": [{"name": "sim", "deployments": [{"provider": "simulated"}]}]})
    with TestClient(create_app(Keel(config, stages=[Broken()])), raise_server_exceptions=False) as client:
        yield client


def test_a_bug_is_a_500_in_openai_shape_without_the_trace(broken_gateway: TestClient) -> None:
    response = broken_gateway.post("/v1/chat/completions", json={"model": "sim", "messages": [
        {"role": "user", "content": "hi"}]})
    assert response.status_code == 500
    request_id = response.headers[REQUEST_ID]
    error = response.json()["error"]
    assert error["type"] == "api_error" and request_id in error["message"]
    assert "secret internal detail" not in response.text and "Traceback" not in response.text


def test_bad_input_never_reaches_the_pipeline(broken_gateway: TestClient) -> None:
    response = broken_gateway.post("/v1/chat/completions", json={"model": "sim", "messages": []})
    assert response.status_code == 400 and response.json()["error"]["param"] == "messages"


def error_for(cls: type[ChatRequest] | type[EmbeddingRequest], body: dict[str, Any]) -> tuple[str | None, str]:
    with pytest.raises(ValidationError) as info:
        cls.model_validate(body, strict=True)
    error = invalid_request(info.value, body)
    return error.param, error.message


def test_param_is_the_path_in_the_body_not_the_union_branch() -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "ok"},
                                       {"role": "assistant", "content": None, "tool_calls": [{"id": "c"}]}]}
    param, message = error_for(ChatRequest, body)
    assert param == "messages[1].tool_calls[0].function"
    assert message == "Missing required parameter 'messages[1].tool_calls[0].function'."


def test_type_errors_across_union_branches_say_every_accepted_type() -> None:
    param, message = error_for(ChatRequest, {"model": "m", "messages": [{"role": "user", "content": 5}]})
    assert param == "messages[0].content"
    assert message == "Invalid type for 'messages[0].content': expected a string or an array, got 5."


def test_value_errors_beat_type_errors_of_other_branches() -> None:
    param, message = error_for(EmbeddingRequest, {"model": "m", "input": []})
    assert (param, message) == ("input", "Invalid value for 'input': it must hold at least 1 item, got [].")


def test_other_invalid_parameters_are_listed() -> None:
    _, message = error_for(ChatRequest, {"model": "m", "messages": "x", "temperature": "hot"})
    assert message.endswith("1 more invalid parameter: temperature.")


def test_long_values_are_shortened_in_messages() -> None:
    _, message = error_for(ChatRequest, {"model": "m", "messages": [{"role": "user", "content": 1}],
                                         "temperature": "x" * 500})
    assert len(message) < 300


def test_spec_nulls_are_dropped_only_where_the_spec_forbids_them() -> None:
    completion: dict[str, Any] = {"id": "c", "usage": None, "system_fingerprint": None, "choices": []}
    assert spec_nulls_dropped(dict(completion), completion=True) == {"id": "c", "choices": []}
    chunk: dict[str, Any] = {"id": "c", "usage": None, "system_fingerprint": None, "choices": []}
    assert spec_nulls_dropped(dict(chunk)) == {"id": "c", "usage": None, "choices": []}
    kept = {"id": "c", "usage": {"total_tokens": 1}, "system_fingerprint": "fp"}
    assert spec_nulls_dropped(dict(kept), completion=True) == kept


@pytest.mark.parametrize(("value", "kind"), [
    (None, "null"), (True, "a boolean"), (3, "a number"), (1.5, "a number"), ("x", "a string"),
    ([1], "an array"), ({"a": 1}, "an object"),
])
def test_json_kind_names_each_json_type(value: object, kind: str) -> None:
    from keel.request_errors import json_kind

    assert json_kind(value) == kind
