"""A huge prompt for the embedded model (`local`, what `keel serve` serves without a config),
with no input guardrails: under the default 4 MiB body cap, a 1 MB prompt and 10,000 messages
reach the model, which refuses them as longer than its context window: a 400
`context_length_exceeded` (OpenAI's code and status for a prompt over the window), never a 500.
Null bytes in content reach its tokenizer and are answered. One record each, and the model
answers the next call."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from observability_helpers import calls_counted
from test_bad_input import assert_openai_error
from test_bad_input_bodies import DEFAULT_MAX_BODY, LoggedGateway, post, then_one_record_and_still_serving

MASTER = "sk-master-bad-local"


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoggedGateway]:
    # "sim" is the embedded model under the name the shared helpers send their good call to.
    config = {"models": [{"name": "sim", "deployments": [{"provider": "local", "default_max_tokens": 4}]}]}
    process = LoggedGateway(config, tmp_path_factory.mktemp("bad-local-gw"), MASTER)
    process.start(timeout=120)
    yield process
    process.stop()


def chat(messages: list[dict[str, Any]]) -> bytes:
    return orjson.dumps({"model": "sim", "messages": messages, "max_tokens": 4})


@pytest.mark.parametrize("messages", [
    [{"role": "user", "content": "word " * 200_000}],
    [{"role": "user", "content": f"m{i}"} for i in range(10_000)],
], ids=["1MB-prompt", "10000-messages"])
def test_a_prompt_over_the_context_window_is_a_400_context_length_exceeded(
    gw: LoggedGateway, messages: list[dict[str, Any]],
) -> None:
    body = chat(messages)
    assert len(body) < DEFAULT_MAX_BODY
    before = calls_counted(gw, key=MASTER)
    response = post(gw, body)
    error = assert_openai_error(gw, response, 400, "context_length_exceeded", sentence=False)
    tokens = int(error["message"].split(" tokens")[0].rsplit(" ", 1)[1])
    assert tokens > 2048 and "context window is 2048 tokens" in error["message"]
    assert "Shorten the messages" in error["message"]
    row = then_one_record_and_still_serving(gw, response, before)
    assert row["error_type"] == "context_length_exceeded"


def test_the_context_length_message_is_a_sentence(gw: LoggedGateway) -> None:
    response = post(gw, chat([{"role": "user", "content": "word " * 5000}]))
    assert response.status_code == 400
    assert response.json()["error"]["message"][0].isupper()


def test_null_bytes_in_content_reach_the_embedded_model_and_are_answered(gw: LoggedGateway) -> None:
    before = calls_counted(gw, key=MASTER)
    response = post(gw, chat([{"role": "user", "content": "say a\x00b"}]))
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["role"] == "assistant"
    then_one_record_and_still_serving(gw, response, before)
