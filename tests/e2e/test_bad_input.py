"""Bad input gets a clear 4xx in OpenAI's error shape, never a 500 or a stack trace: with the
request id in a header, the offending parameter named, and a log line under that id."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import openai
import pytest
from conftest import GatewayProcess
from spec import ERROR, validate
from wire import REQUEST_ID

KEY = "sk-keel-bad-input"
LIMIT = 2048  # server.max_body_bytes for these tests
USER = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    config = {
        "server": {"max_body_bytes": LIMIT},
        "models": [{"name": "sim", "deployments": [{"provider": "simulated"}]}],
    }
    process = GatewayProcess(config, tmp_path_factory.mktemp("bad-input-gw"), env={"KEEL_MASTER_KEY": KEY}).start()
    yield process
    process.stop()


def logged(gw: GatewayProcess, request_id: str) -> bool:
    """The gateway's log names the request (it is written by another process: wait a little)."""
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        if request_id in gw.log():
            return True
        time.sleep(0.05)
    return False


def assert_openai_error(gw: GatewayProcess, response: httpx.Response, status: int, code: str | None = None,
                        param: str | None = None, sentence: bool = True) -> dict[str, Any]:
    """The answer is `status` with OpenAI's error body, an id, a log line, and nothing internal;
    `sentence`: the message starts with a capital."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    request_id = response.headers.get(REQUEST_ID, "")
    assert request_id.startswith("req_"), f"no {REQUEST_ID} header"
    body = response.json()
    validate(ERROR, body)
    error: dict[str, Any] = body["error"]
    if code is not None:
        assert error["code"] == code, error
    if param is not None:
        assert error["param"] == param, error
    assert error["message"] and (error["message"][0].isupper() or not sentence), "the message is a sentence"
    for internal in ("Traceback", 'File "', "pydantic", "https://errors.pydantic.dev", "keel/", KEY):
        assert internal not in response.text, f"{internal!r} leaked into the error body: {response.text}"
    assert logged(gw, request_id), f"request {request_id} ({status}) is not in the gateway log"
    return error


def post(gw: GatewayProcess, path: str, **kwargs: Any) -> httpx.Response:
    headers = {"authorization": f"Bearer {KEY}", **kwargs.pop("headers", {})}
    return httpx.post(gw.url + path, headers=headers, timeout=10, **kwargs)


@dataclass
class Case:
    id: str
    body: Any  # bytes are sent as they are, anything else as JSON
    status: int = 400
    code: str | None = "invalid_request"
    param: str | None = None
    path: str = "/v1/chat/completions"
    says: list[str] = field(default_factory=list)  # words the message must contain


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": "sim", "messages": USER, **fields}


CASES = [
    Case("not-json", b"{model: sim", code="invalid_json", says=["not valid JSON"]),
    Case("empty-body", b"", code="invalid_json"),
    Case("json-array", b"[1, 2]", says=["JSON object", "an array"]),
    Case("json-string", b'"hello"', says=["JSON object", "a string"]),
    Case("json-null", b"null", says=["JSON object", "null"]),
    Case("missing-messages", {"model": "sim"}, param="messages", says=["Missing required parameter"]),
    Case("missing-model", {"messages": USER}, param="model", says=["Missing required parameter"]),
    Case("messages-a-string", chat(messages="hi"), param="messages", says=["expected an array", '"hi"']),
    Case("messages-of-strings", chat(messages=["hi"]), param="messages[0]", says=["expected an object"]),
    Case("temperature-a-string", chat(temperature="0.5"), param="temperature", says=["expected a number"]),
    Case("temperature-too-high", chat(temperature=3), param="temperature", says=["less than or equal to 2"]),
    Case("stream-a-string", chat(stream="yes"), param="stream", says=["expected a boolean"]),
    Case("content-an-int", chat(messages=[{"role": "user", "content": 5}]), param="messages[0].content",
         says=["expected a string or an array", "got 5"]),
    Case("text-part-without-text", chat(messages=[{"role": "user", "content": [{"type": "text"}]}]),
         param="messages[0].content[0].text", says=["Missing required parameter"]),
    Case("negative-max-tokens", chat(max_tokens=-5), param="max_tokens", says=["greater than or equal to 1", "-5"]),
    Case("zero-max-tokens", chat(max_tokens=0), param="max_tokens"),
    Case("zero-max-completion-tokens", chat(max_completion_tokens=0), param="max_completion_tokens"),
    Case("n-2", chat(n=2), param="n", says=["one choice per request", "leave 'n' out or send 1"]),
    Case("empty-messages", chat(messages=[]), param="messages", says=["at least 1"]),
    Case("unknown-role", chat(messages=[{"role": "robot", "content": "beep"}]), param="messages[0].role",
         says=['"robot"', "'user'", "'assistant'"]),
    Case("message-without-role", chat(messages=[{"content": "hi"}]), param="messages[0].role",
         says=["Missing required parameter"]),
    Case("tool-message-without-call-id", chat(messages=[{"role": "tool", "content": "sunny"}]),
         param="messages[0].tool_call_id"),
    Case("unknown-response-format", chat(response_format={"type": "yaml"}), param="response_format.type",
         says=['"yaml"', "'json_schema'"]),
    Case("unknown-model", {"model": "gpt-9", "messages": USER}, status=404, code="model_not_found", param="model",
         says=["gpt-9", "sim"]),
    Case("embeddings-input-an-int", {"model": "sim", "input": 5}, path="/v1/embeddings", param="input",
         says=["expected a string or an array"]),
    Case("embeddings-input-an-object", {"model": "sim", "input": {"text": "x"}}, path="/v1/embeddings",
         param="input"),
    Case("embeddings-input-floats", {"model": "sim", "input": [1.5, 2.5]}, path="/v1/embeddings",
         param="input[0]"),
    Case("embeddings-input-empty", {"model": "sim", "input": []}, path="/v1/embeddings", param="input"),
    Case("embeddings-input-empty-string", {"model": "sim", "input": ""}, path="/v1/embeddings", param="input"),
    Case("embeddings-missing-input", {"model": "sim"}, path="/v1/embeddings", param="input"),
    Case("embeddings-bad-encoding", {"model": "sim", "input": "x", "encoding_format": "hex"},
         path="/v1/embeddings", param="encoding_format", says=["'float'", "'base64'"]),
    Case("embeddings-unknown-model", {"model": "nope", "input": "x"}, path="/v1/embeddings", status=404,
         code="model_not_found"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_request_is_answered_in_openai_shape(gw: GatewayProcess, case: Case) -> None:
    if isinstance(case.body, bytes):
        response = post(gw, case.path, content=case.body, headers={"content-type": "application/json"})
    else:
        response = post(gw, case.path, json=case.body)
    error = assert_openai_error(gw, response, case.status, case.code, case.param)
    for words in case.says:
        assert words in error["message"], f"{words!r} not in {error['message']!r}"


def test_several_problems_are_counted_in_the_message(gw: GatewayProcess) -> None:
    response = post(gw, "/v1/chat/completions", json=chat(temperature="hot", max_tokens=0, top_p="x"))
    error = assert_openai_error(gw, response, 400, "invalid_request")
    assert "2 more invalid parameters" in error["message"]


# ---------------------------------------------------------------------------- size


def big_chat() -> bytes:
    return httpx.Request("POST", "/", json=chat(messages=[{"role": "user", "content": "x" * (LIMIT * 2)}])).read()


def test_oversized_body_is_refused_with_413(gw: GatewayProcess) -> None:
    response = post(gw, "/v1/chat/completions", content=big_chat(), headers={"content-type": "application/json"})
    error = assert_openai_error(gw, response, 413, "request_too_large")
    assert str(LIMIT) in error["message"] and "max_body_bytes" in error["message"]


def test_oversized_chunked_body_without_length_is_refused_with_413(gw: GatewayProcess) -> None:
    body = big_chat()

    def pieces() -> Iterator[bytes]:
        for start in range(0, len(body), 512):
            yield body[start:start + 512]

    response = post(gw, "/v1/chat/completions", content=pieces(), headers={"content-type": "application/json"})
    assert "content-length" not in response.request.headers
    assert response.request.headers["transfer-encoding"] == "chunked"
    assert_openai_error(gw, response, 413, "request_too_large")


def test_chunked_body_under_the_limit_is_served(gw: GatewayProcess) -> None:
    body = httpx.Request("POST", "/", json=chat()).read()
    response = post(gw, "/v1/chat/completions", content=iter([body[:10], body[10:]]),
                    headers={"content-type": "application/json"})
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == "echo: hi"


def test_oversized_embeddings_body_is_refused_with_413(gw: GatewayProcess) -> None:
    response = post(gw, "/v1/embeddings", json={"model": "sim", "input": ["y" * 100] * 40})
    assert_openai_error(gw, response, 413, "request_too_large")


# ---------------------------------------------------------------------------- keys and routes


@pytest.mark.parametrize("authorization", [None, "Bearer sk-wrong", KEY, "Basic c2s6"], ids=[
    "missing", "wrong", "no-scheme", "basic"])
def test_bad_key_is_refused_with_401(gw: GatewayProcess, authorization: str | None) -> None:
    headers = {"authorization": authorization} if authorization else {}
    response = httpx.post(gw.url + "/v1/chat/completions", json=chat(), headers=headers)
    error = assert_openai_error(gw, response, 401, "invalid_api_key")
    assert error["type"] == "authentication_error"
    assert "Authorization: Bearer" in error["message"]


def test_bad_key_is_checked_before_the_body_is_read(gw: GatewayProcess) -> None:
    response = httpx.post(gw.url + "/v1/chat/completions", content=b"{not json")
    assert_openai_error(gw, response, 401, "invalid_api_key")


@pytest.mark.parametrize(("method", "path"), [("GET", "/v1/nope"), ("POST", "/v2/chat/completions"),
                                              ("POST", "/chat/completions"), ("GET", "/")])
def test_unknown_route_is_a_404_in_openai_shape(gw: GatewayProcess, method: str, path: str) -> None:
    response = httpx.request(method, gw.url + path, headers={"authorization": f"Bearer {KEY}"})
    error = assert_openai_error(gw, response, 404, "not_found")
    assert path in error["message"] and "/v1/chat/completions" in error["message"]


@pytest.mark.parametrize(("method", "path", "allowed"), [
    ("GET", "/v1/chat/completions", "POST"), ("PUT", "/v1/embeddings", "POST"), ("POST", "/v1/models", "GET"),
])
def test_wrong_method_is_a_405_in_openai_shape(gw: GatewayProcess, method: str, path: str, allowed: str) -> None:
    response = httpx.request(method, gw.url + path, headers={"authorization": f"Bearer {KEY}"})
    error = assert_openai_error(gw, response, 405, "method_not_allowed")
    assert f"use {allowed}" in error["message"]
    assert allowed in response.headers.get("allow", ""), "405 says which methods the URL takes"


# ---------------------------------------------------------------------------- as the SDK sees it


def test_sdk_raises_the_matching_openai_exceptions(gw: GatewayProcess) -> None:
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key=KEY, max_retries=0)
    with client:
        with pytest.raises(openai.BadRequestError) as bad:
            client.chat.completions.create(model="sim", messages=USER, n=2)  # type: ignore[arg-type]
        assert bad.value.code == "invalid_request" and bad.value.param == "n"
        with pytest.raises(openai.NotFoundError) as missing:
            client.chat.completions.create(model="nope", messages=USER, stream=True)  # type: ignore[arg-type]
        assert missing.value.code == "model_not_found"
        with pytest.raises(openai.BadRequestError):
            client.embeddings.create(model="sim", input=[])
        assert bad.value.response.headers[REQUEST_ID].startswith("req_")
