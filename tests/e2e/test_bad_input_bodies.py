"""The issue's list of hostile bodies and headers, through a real `keel serve` (simulated model,
SQLite request log, no input guardrails): invalid UTF-8 and lone surrogates, null bytes, a 1 MB
prompt, 10,000 messages, deep nesting, huge metadata, CR/LF in headers.

Each bad call gets a 4xx in OpenAI's error shape whose message says what to fix, leaves exactly
one request-log record (counted two ways: /metrics, and the rows under its id), and the gateway
serves a good call right after. Statuses: 400 for a body that is not UTF-8 JSON or does not
validate (OpenAI's `invalid_request_error`), 413 over the body cap; what the simulated model
answers (no context window) is a 200, recorded once.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from conftest import GatewayProcess
from observability_helpers import calls_counted, read_records, store_section, wait_until_counted
from test_bad_input import assert_openai_error

from keel.providers.simulated import MAX_DIMENSIONS
from keel.request_errors import MAX_NESTING
from keel.types import METADATA_KEY_CHARS, METADATA_PAIRS, METADATA_VALUE_CHARS

KEY = "sk-keel-bad-bodies"
CHAT = "/v1/chat/completions"
GOOD = b'{"model": "sim", "messages": [{"role": "user", "content": "still here?"}]}'
DEFAULT_MAX_BODY = 4 * 1024 * 1024  # server.max_body_bytes when keel.yaml leaves it out


class LoggedGateway(GatewayProcess):
    """`keel serve` with a master key, whose request log (SQLite) the test reads."""

    def __init__(self, config: dict[str, Any], tmp: Path, master_key: str) -> None:
        self.key = master_key
        self.store_url = f"sqlite:///{tmp / 'keel.db'}"
        self.config = {**config, "store": store_section(self.store_url, tmp)}
        super().__init__(self.config, tmp, {"KEEL_MASTER_KEY": master_key})


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoggedGateway]:
    config = {"models": [{"name": "sim", "deployments": [{"provider": "simulated"}]}]}
    process = LoggedGateway(config, tmp_path_factory.mktemp("bad-bodies-gw"), KEY)
    process.start()
    yield process
    process.stop()


def post(gw: LoggedGateway, body: bytes, path: str = CHAT, headers: dict[str, str] | None = None) -> httpx.Response:
    headers = {"authorization": f"Bearer {gw.key}", "content-type": "application/json", **(headers or {})}
    return httpx.post(gw.url + path, content=body, headers=headers, timeout=60)


def records_of(gw: LoggedGateway, request_id: str) -> list[dict[str, Any]]:
    return [row for row in read_records(gw.store_url, since=time.time() - 3600) if row["request_id"] == request_id]


def then_one_record_and_still_serving(gw: LoggedGateway, bad: httpx.Response, before: int) -> dict[str, Any]:
    """A good call right after is answered; the bad call and it were counted once each since
    `before` (/metrics' count then), nothing else was, and the bad call has exactly one row under
    its id. Returns that row."""
    good = post(gw, GOOD)
    assert good.status_code == 200, good.text
    answer = good.json()["choices"][0]["message"]["content"]
    assert answer and isinstance(answer, str)  # the simulated model's "echo: ...", or the embedded model's own
    assert wait_until_counted([gw], before + 2, key=gw.key) == before + 2
    deadline = time.monotonic() + 10  # the writer's thread writes in batches: poll with a bound
    while not records_of(gw, good.headers["x-keel-request-id"]):
        assert time.monotonic() < deadline, "the good call's record was never written"
        time.sleep(0.05)
    rows = records_of(gw, bad.headers["x-keel-request-id"])  # written before the good call's
    assert len(rows) == 1, f"{len(rows)} records for one call"
    assert rows[0]["status"] == bad.status_code
    return rows[0]


@dataclass
class Case:
    id: str
    body: bytes
    status: int = 400
    code: str = "invalid_request"
    param: str | None = None
    path: str = CHAT
    says: list[str] = field(default_factory=list)  # words the message must contain


def chat(**fields: Any) -> bytes:
    return orjson.dumps({"model": "sim", "messages": [{"role": "user", "content": "hi"}], **fields})


def nested(depth: int, leaf: bytes = b'"x"') -> bytes:
    """`depth` objects inside one another around `leaf`."""
    return b'{"a": ' * depth + leaf + b"}" * depth


def user_says(raw_content: bytes) -> bytes:
    return b'{"model": "sim", "messages": [{"role": "user", "content": "' + raw_content + b'"}]}'


TOO_DEEP = MAX_NESTING  # objects in a field's value: with the body's own level, one more than accepted
LATIN1 = user_says(b"caf\xe9 \xff")
CASES = [
    Case("invalid-utf8", LATIN1, code="invalid_json",
         says=["not valid UTF-8", f"byte {LATIN1.index(0xE9)} is 0xe9", "encoded as UTF-8"]),
    Case("utf8-encoded-surrogate", user_says(b"\xed\xa0\x80"), code="invalid_json",
         says=["not valid UTF-8", "0xed", "surrogate"]),
    Case("lone-high-surrogate-escape", user_says(rb"a\ud800b"), code="invalid_json",
         says=["not valid JSON", "surrogate", "column"]),
    Case("lone-low-surrogate-escape", user_says(rb"\udc00"), code="invalid_json", says=["surrogate"]),
    Case("raw-null-byte", user_says(b"a\x00b"), code="invalid_json", says=["control character", "column"]),
    Case("null-byte-in-model", orjson.dumps({"model": "s\x00im", "messages": [{"role": "user", "content": "hi"}]}),
         param="model", says=["control characters", "character 1", "\\x00"]),
    Case("null-byte-in-user", chat(user="ann\x00"), param="user", says=["control characters", "character 3"]),
    Case("crlf-in-user", chat(user="ann\r\nx-admin: 1"), param="user", says=["control characters", "\\r"]),
    Case("null-byte-in-embeddings-model", orjson.dumps({"model": "sim\x00", "input": "x"}), param="model",
         path="/v1/embeddings"),
    Case("json-nested-10000-deep", b'{"model": "sim", "messages": ' + b"[" * 10_000 + b"]" * 10_000 + b"}",
         code="invalid_json", says=["depth limit exceeded"]),
    Case("content-parts-nested-deep", user_says(b"").replace(
        b'"content": ""', b'"content": [{"type": "future", "part": ' + nested(TOO_DEEP) + b"}]"),
         param="messages", says=[f"more than {MAX_NESTING} levels", "Flatten 'messages'"]),
    Case("content-arrays-nested-deep", user_says(b"").replace(b'""', b"[" * 600 + b'"x"' + b"]" * 600),
         param="messages", says=[f"more than {MAX_NESTING} levels"]),
    Case("metadata-nested-deep", chat().replace(b'"model"', b'"metadata": ' + nested(900) + b', "model"'),
         param="metadata", says=["Flatten 'metadata'"]),
    Case("unknown-field-nested-deep", chat().replace(b'"model"', b'"extra_body": ' + nested(TOO_DEEP) + b', "model"'),
         param="extra_body"),
    Case("metadata-too-many-pairs", chat(metadata={f"k{i}": "v" for i in range(1000)}), param="metadata",
         says=["1000 pairs", f"at most {METADATA_PAIRS}"]),
    Case("metadata-key-too-long", chat(metadata={"k" * 5000: "v"}), param="metadata",
         says=["Invalid key", "5000 characters", f"at most {METADATA_KEY_CHARS}"]),
    Case("metadata-value-too-long", chat(metadata={"blob": "x" * 100_000}), param="metadata.blob",
         says=["100000 characters", f"at most {METADATA_VALUE_CHARS}"]),
    Case("metadata-value-not-a-string", chat(metadata={"n": {"deep": 1}}), param="metadata.n",
         says=["expected a string"]),
    # What Schemathesis found: a few bytes asking the simulated model for gigabytes (a vector of 2.7 * 10^12
    # floats; a 200 KB constant 9,000 times) grew the gateway to 7 GB, then a 500 on a MemoryError.
    Case("embeddings-dimensions-past-the-models", orjson.dumps({"model": "sim", "input": "x",
                                                               "dimensions": 2_704_429_735_294}),
         path="/v1/embeddings", code="unsupported", param="dimensions",
         says=["2704429735294", f"at most {MAX_DIMENSIONS} dimensions"]),
    Case("json-schema-answer-of-gigabytes", chat(response_format={"type": "json_schema", "json_schema": {
        "name": "big", "schema": {"type": "array", "minItems": 9000, "items": {"const": "y" * 200_000}}}}),
         status=422, code="invalid_output", param="response_format", says=["did not match"]),
    Case("body-over-the-default-cap", chat(messages=[{"role": "user", "content": "y" * DEFAULT_MAX_BODY}]),
         status=413, code="request_too_large", says=[str(DEFAULT_MAX_BODY), "max_body_bytes"]),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_a_hostile_body_gets_a_clear_4xx_one_record_and_the_gateway_goes_on(gw: LoggedGateway, case: Case) -> None:
    before = calls_counted(gw, key=KEY)
    response = post(gw, case.body, case.path)
    error = assert_openai_error(gw, response, case.status, case.code, case.param)
    for words in case.says:
        assert words in error["message"], f"{words!r} not in {error['message']!r}"
    row = then_one_record_and_still_serving(gw, response, before)
    assert row["error_type"] == case.code  # the record says what the client was told


def test_the_deepest_nesting_accepted_is_served(gw: LoggedGateway) -> None:
    # An unknown field is passed on as it came: the body's level plus its value's MAX_NESTING - 1.
    before = calls_counted(gw, key=KEY)
    body = chat().replace(b'"model"', b'"extra_body": ' + nested(MAX_NESTING - 1) + b', "model"')
    response = post(gw, body)
    assert response.status_code == 200, response.text
    then_one_record_and_still_serving(gw, response, before)


def test_metadata_at_openai_limits_is_served_and_logged(gw: LoggedGateway) -> None:
    before = calls_counted(gw, key=KEY)
    metadata = {f"{i:02d}" + "k" * (METADATA_KEY_CHARS - 2): "v" * METADATA_VALUE_CHARS for i in range(METADATA_PAIRS)}
    response = post(gw, chat(metadata=metadata))
    assert response.status_code == 200, response.text
    row = then_one_record_and_still_serving(gw, response, before)
    assert row["metadata"] and set(row["metadata"]) <= set(metadata)


def test_null_bytes_in_content_are_passed_on_and_the_record_writer_survives(gw: LoggedGateway) -> None:
    # OpenAI takes \u0000 in content: it is JSON text like any other. Keel passes it on; the
    # request log stores it as U+FFFD (PostgreSQL refuses NUL in text), and drops nothing.
    before = calls_counted(gw, key=KEY)
    response = post(gw, chat(messages=[{"role": "user", "content": "a\x00b"}]))
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == "echo: a\x00b"
    row = then_one_record_and_still_serving(gw, response, before)
    assert row["input"] == [{"role": "user", "content": "a\ufffdb"}]
    assert "dropped" not in gw.log()


@pytest.mark.parametrize(("what", "messages"), [
    ("a 1 MB prompt", [{"role": "user", "content": "word " * 200_000}]),
    ("10,000 messages", [{"role": "user", "content": f"m{i}"} for i in range(10_000)]),
], ids=["1MB-prompt", "10000-messages"])
def test_a_huge_prompt_under_the_body_cap_is_answered_once_by_a_model_without_a_context_window(
    gw: LoggedGateway, what: str, messages: list[dict[str, Any]],
) -> None:
    # Under the default 4 MiB cap, with no input guardrails, the call reaches the model: the
    # simulated one has no context window and answers; test_bad_input_local covers the embedded one.
    body = chat(messages=messages)
    assert len(body) < DEFAULT_MAX_BODY, what
    before = calls_counted(gw, key=KEY)
    response = post(gw, body)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == "echo: " + messages[-1]["content"]
    row = then_one_record_and_still_serving(gw, response, before)
    assert row["prompt_tokens"] == response.json()["usage"]["prompt_tokens"] > 0
    assert "dropped" not in gw.log()


# ---------------------------------------------------------------------------- CR/LF in headers


def raw_request(gw: LoggedGateway, header_lines: bytes) -> bytes:
    """A request written to the socket as it is (no client would send it); the whole answer."""
    body = GOOD
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode() + b"\r\n"
            + header_lines + b"Connection: close\r\nContent-Type: application/json\r\n"
            + b"Content-Length: %d\r\n\r\n" % len(body))
    answer = b""
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as conn:
        conn.sendall(head + body)
        while chunk := conn.recv(65536):  # the gateway closes the connection after a 400
            answer += chunk
    return answer


@pytest.mark.parametrize("header_lines", [
    b"X-Keel-Feature: a\rb\r\n", b"X-Keel-Feature: a\nb\r\n", b"X-Keel-Feature: a\x00b\r\n",
    b"X-Keel\r-Feature: a\r\n", b"X-Keel-Feature: a\r\n folded\r\n",
], ids=["bare-CR", "bare-LF", "NUL", "CR-in-name", "obs-fold"])
def test_a_header_with_cr_lf_or_nul_is_a_400_before_any_call_and_the_gateway_goes_on(
    gw: LoggedGateway, header_lines: bytes,
) -> None:
    # The HTTP parser (httptools) refuses the request before Keel sees it: no call, so no
    # record (nothing to log under: no request id was made), and the connection is closed.
    before = calls_counted(gw, key=KEY)
    answer = raw_request(gw, header_lines)
    assert answer.startswith(b"HTTP/1.1 400 "), answer[:200]
    assert b"connection: close" in answer.lower()
    assert b"x-keel-request-id" not in answer.lower()
    good = post(gw, GOOD)
    assert good.status_code == 200, good.text
    assert wait_until_counted([gw], before + 1, key=KEY) == before + 1, "the refused request was counted"


def test_a_header_injected_with_crlf_is_only_a_header_of_its_own(gw: LoggedGateway) -> None:
    # CR LF ends a header line: "a\r\nX-Other: 1" is two well-formed headers, served as such.
    answer = raw_request(gw, b"X-Keel-Feature: a\r\nX-Other: 1\r\n")
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]
