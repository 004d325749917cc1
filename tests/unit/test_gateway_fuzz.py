"""Property: whatever a client sends to the hot routes, it gets an answer in OpenAI's shape,
never a 500, and the call leaves exactly one record.

Bodies come from hypothesis: chat requests with every field drawn from plausible and
implausible values, arbitrary JSON, and arbitrary bytes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from conftest import RecordingSink
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keel.config import TracingConfig, parse_config
from keel.engine import Keel
from keel.observability.metrics import Metrics
from keel.observability.stage import Observe
from keel.observability.tracing import Tracing
from keel.server import create_app
from keel.server.gateway import Gateway

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
ROLE = st.sampled_from(["system", "developer", "user", "assistant", "tool", "function", "robot", ""])
CONTENT = (st.text(max_size=30) | st.none() | JSON
           | st.lists(st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url", "nope"])},
                                            optional={"text": st.text(max_size=10) | JSON}), max_size=3))
MESSAGE = st.fixed_dictionaries(
    {"role": ROLE | JSON},
    optional={"content": CONTENT, "name": st.text(max_size=5) | JSON, "tool_call_id": st.text(max_size=5),
              "tool_calls": st.lists(st.fixed_dictionaries(
                  {"id": st.text(max_size=4), "type": st.just("function")},
                  optional={"function": st.fixed_dictionaries({"name": st.text(max_size=5),
                                                               "arguments": st.text(max_size=10) | JSON})}),
                  max_size=2) | JSON},
)
CHAT = st.fixed_dictionaries(
    {},
    optional={
        "model": st.sampled_from(["sim", "sim", "sim", "nope", ""]) | JSON,
        "messages": st.lists(MESSAGE, max_size=4) | JSON,
        "stream": st.booleans() | JSON,
        "temperature": st.floats(min_value=-1, max_value=3, allow_nan=False) | JSON,
        "top_p": st.floats(min_value=-0.5, max_value=1.5, allow_nan=False),
        "max_tokens": st.integers(min_value=-5, max_value=2**40) | JSON,
        "max_completion_tokens": st.integers(min_value=-5, max_value=100),
        "n": st.integers(min_value=-1, max_value=3),
        "stop": st.text(max_size=5) | st.lists(st.text(max_size=3), max_size=5) | JSON,
        "seed": st.integers(min_value=-(2**63), max_value=2**63 - 1) | JSON,
        "user": st.text(max_size=10) | JSON,
        "metadata": st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=3) | JSON,
        "response_format": st.fixed_dictionaries({"type": st.sampled_from(["text", "json_object", "json_schema",
                                                                           "xml"])}) | JSON,
        "tools": st.lists(st.fixed_dictionaries({"type": st.just("function"), "function": st.fixed_dictionaries(
            {"name": st.text(max_size=6)}, optional={"parameters": JSON})}), max_size=2) | JSON,
        "tool_choice": st.sampled_from(["auto", "none", "required", "sometimes"]) | JSON,
        "stream_options": st.fixed_dictionaries({}, optional={"include_usage": st.booleans() | JSON}) | JSON,
        "unknown_new_field": JSON,
    },
)
EMBEDDINGS = st.fixed_dictionaries(
    {}, optional={"model": st.sampled_from(["sim", "nope"]) | JSON,
                  "input": st.text(max_size=10) | st.lists(st.integers(-2, 50_000), max_size=5) | JSON,
                  "encoding_format": st.sampled_from(["float", "base64", "hex"]) | JSON})
_OK = b'{"model": "sim", "messages": [{"role": "user", "content": "x"}]'
ODD = [  # JSON that orjson cannot write, and so hypothesis cannot make
    _OK + b', "max_tokens": 1e999}', _OK + b', "seed": 99999999999999999999999}', _OK + b', "temperature": NaN}',
    b"[" * 10_000 + b"]" * 10_000, b'{"model": "sim", "model": "nope", "messages": []}',
    # The issue's list: bad UTF-8, lone surrogates, NUL, nesting under orjson's parse limit but
    # over its write limit, metadata over OpenAI's limits.
    _OK + b', "user": "caf\xe9"}', _OK + b', "user": "\xed\xa0\x80"}', _OK + b', "user": "\\ud800"}',
    _OK + b', "user": "a\\u0000"}', b'{"model": "s\\u0000im", "input": "x"}',
    _OK + b', "extra": ' + b'{"a": ' * 600 + b"1" + b"}" * 600 + b"}",
    _OK + b', "metadata": {' + b", ".join(b'"k%d": "v"' % i for i in range(17)) + b"}}",
]
BODY = (CHAT.map(orjson.dumps) | EMBEDDINGS.map(orjson.dumps) | JSON.map(orjson.dumps)
        | st.binary(max_size=64) | CHAT.map(lambda body: orjson.dumps(body)[: len(orjson.dumps(body)) // 2])
        | st.sampled_from(ODD))


class Harness:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.sink = RecordingSink()
        config = parse_config({"models": [{"name": "sim", "deployments": [{"provider": "simulated"}]}],
                               "store": {"url": "sqlite:///keel.db"}})
        self.keel = Keel(config, stages=[Observe(self.sink, Tracing(TracingConfig(to_store=False)), Metrics())])
        self.app: Gateway = create_app(self.keel)

    def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        sent: list[dict[str, Any]] = []
        incoming = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive() -> dict[str, Any]:
            if incoming:
                return incoming.pop()
            await asyncio.sleep(3600)  # the client stays until the answer is complete
            raise AssertionError("unreachable")

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        scope = {"type": "http", "method": "POST", "path": path, "headers": [(b"content-type", b"application/json")],
                 "query_string": b""}
        self.loop.run_until_complete(asyncio.wait_for(self.app(scope, receive, send), 10))
        return int(sent[0]["status"]), b"".join(m.get("body", b"") for m in sent[1:])


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("KEEL_MASTER_KEY", raising=False)
        patch.chdir(tmp_path_factory.mktemp("fuzz"))
        h = Harness()
        yield h
        h.loop.run_until_complete(h.keel.close())
        h.loop.close()


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=BODY, path=st.sampled_from(["/v1/chat/completions", "/v1/embeddings"]))
def test_any_body_gets_an_openai_shaped_answer_and_one_record(harness: Harness, body: bytes, path: str) -> None:
    before = len(harness.sink.records)
    status, answer = harness.post(path, body)
    assert status in (200, 400, 404, 413), (status, answer[:300])
    if status == 200 and answer.startswith(b"data: "):
        assert answer.endswith(b"data: [DONE]\n\n") or b'"error"' in answer
    else:
        data = orjson.loads(answer)
        if status == 200:
            assert data["object"] in ("chat.completion", "list")
        else:
            error = data["error"]
            assert isinstance(error["message"], str) and error["message"]
            assert isinstance(error["type"], str) and "param" in error and "code" in error
            assert "Traceback" not in error["message"]
    new = harness.sink.records[before:]
    assert len(new) == 1, f"{len(new)} records for one call"
    assert new[0].status == status


@pytest.mark.parametrize("body", ODD[5:], ids=["latin-1", "utf8-surrogate", "lone-surrogate-escape", "nul-in-user",
                                                "nul-in-model", "nested-600", "metadata-17-pairs"])
def test_each_hostile_body_of_the_issue_is_a_400_with_one_record(harness: Harness, body: bytes) -> None:
    before = len(harness.sink.records)
    status, answer = harness.post("/v1/embeddings" if b'"input"' in body else "/v1/chat/completions", body)
    assert status == 400, answer[:300]
    assert orjson.loads(answer)["error"]["code"] in ("invalid_json", "invalid_request")
    assert [r.status for r in harness.sink.records[before:]] == [400]
