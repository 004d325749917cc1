"""POST /v1/completions through a real `keel serve`, with the official openai SDK's
`client.completions.create`, unchanged but for the base URL: plain, streamed, and streamed with usage,
against the simulated provider, an OpenAI-compatible fake upstream and the embedded model (`local`).

Every raw body (each chunk of each stream too) is checked against OpenAI's own description of a
`text_completion`; the upstream is seen to receive one chat call with the prompt as its user message;
each refused field, bad JSON and a bad key come back as the SDK reports them, in OpenAI's error shape,
with exactly one request-log record per call, its dialect `completions`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import httpx2
import openai
import pytest
from observability_helpers import calls_counted, read_records
from spec import COMPLETION, ERROR, validate
from test_bad_input_bodies import LoggedGateway, post, then_one_record_and_still_serving
from wire import REQUEST_ID, Exchange, RecordingTransport, stream_chunks

from keel.testing.fake_openai import FakeBehaviour, FakeOpenAIServer

KEY = "sk-keel-completions-e2e-5c1d"
MODEL = {"simulated": "sim", "openai": "gpt"}
MODES = ["plain", "stream", "stream_usage"]


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeOpenAIServer]:
    with FakeOpenAIServer(FakeBehaviour(chunks=5)) as server:
        yield server


@pytest.fixture(scope="module")
def flaky() -> Iterator[FakeOpenAIServer]:
    with FakeOpenAIServer(FakeBehaviour(chunks=3)) as server:
        yield server


@pytest.fixture(scope="module")
def gw(
    upstream: FakeOpenAIServer, flaky: FakeOpenAIServer, tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[LoggedGateway]:
    # "sim" is the name the shared bad-input helpers send their good call to.
    config = {"models": [
        {"name": "sim", "deployments": [{"provider": "simulated"}]},
        {"name": "gpt", "deployments": [{"provider": "openai", "base_url": upstream.url, "model": "gpt-4o-mini"}]},
        {"name": "local", "deployments": [{"provider": "local", "default_max_tokens": 8}]},
        {"name": "flaky", "deployments": [{"provider": "openai", "base_url": flaky.url, "model": "gpt-4o-mini"}],
         "retry": {"max_attempts": 1}},
    ]}
    process = LoggedGateway(config, tmp_path_factory.mktemp("completions-gw"), KEY)
    process.start(timeout=180)
    yield process
    process.stop()


def client_of(gw: LoggedGateway, api_key: str = KEY) -> tuple[openai.OpenAI, RecordingTransport]:
    transport = RecordingTransport()
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key=api_key, max_retries=0,
                           http_client=httpx2.Client(transport=transport, timeout=120))
    return client, transport


def stream_kwargs(mode: str) -> dict[str, Any]:
    if mode == "plain":
        return {}
    return {"stream": True, **({"stream_options": {"include_usage": True}} if mode == "stream_usage" else {})}


def check_chunk(chunk: dict[str, Any]) -> None:
    """OpenAI's description requires a finish reason in every choice, but its streams (and every
    OpenAI-compatible server's) send null until the last text chunk: the rest is checked as written."""
    validate(COMPLETION, {**chunk, "choices": [{**c, "finish_reason": c["finish_reason"] or "stop"}
                                               for c in chunk["choices"]]})


def wire_text(exchange: Exchange, mode: str) -> str:
    """The answer's text as the gateway sent it, every body and chunk checked against OpenAI's
    description; a stream ends with [DONE], its usage chunk (choices empty) only when asked for."""
    assert exchange.path == "/v1/completions" and exchange.status == 200
    assert exchange.headers.get(REQUEST_ID, "").startswith("req_")
    if mode == "plain":
        body = exchange.json()
        validate(COMPLETION, body)
        assert body["id"].startswith("cmpl-") and body["object"] == "text_completion"
        usage = body["usage"]
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
        return str(body["choices"][0]["text"])
    assert exchange.is_stream
    chunks = stream_chunks(bytes(exchange.body))  # asserts the [DONE] at the end, and only there
    for chunk in chunks:
        assert "error" not in chunk, chunk
        check_chunk(chunk)
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith("cmpl-")
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert finishes[-1] in ("stop", "length") and set(finishes[:-1]) <= {None}
    with_usage = [c for c in chunks if c.get("usage")]
    if mode == "stream_usage":
        assert with_usage == [chunks[-1]] and chunks[-1]["choices"] == []
        assert chunks[-1]["usage"]["completion_tokens"] > 0
    else:
        assert with_usage == []
    return "".join(c["choices"][0]["text"] for c in chunks if c["choices"])


def records_of(gw: LoggedGateway, request_id: str) -> list[dict[str, Any]]:
    """The call's request-log records, once written (the writer's thread writes in batches: polled, bounded)."""
    deadline = time.monotonic() + 10
    while not (rows := [r for r in read_records(gw.store_url) if r["request_id"] == request_id]):
        assert time.monotonic() < deadline, f"no record of {request_id}"
        time.sleep(0.05)
    return rows


# ------------------------------------------------------------------ answered


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", list(MODEL))
def test_the_openai_sdk_gets_a_text_completion(gw: LoggedGateway, provider: str, mode: str) -> None:
    client, transport = client_of(gw)
    prompt = f"complete this for {provider} {mode}"
    with client:
        if mode == "plain":
            completion = client.completions.create(model=MODEL[provider], prompt=prompt)
            assert completion.object == "text_completion"
            sdk_text = completion.choices[0].text
            assert completion.choices[0].finish_reason == "stop" and completion.choices[0].index == 0
        else:
            chunks = list(client.completions.create(model=MODEL[provider], prompt=prompt, **stream_kwargs(mode)))
            sdk_text = "".join(c.choices[0].text for c in chunks if c.choices)
            if mode == "stream_usage":
                assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens > 0
            else:
                assert all(c.usage is None for c in chunks)
    # Both answer a chat turn by echoing the user's message: the prompt was that message.
    assert sdk_text == f"echo: {prompt}"
    [exchange] = transport.exchanges
    assert wire_text(exchange, mode) == sdk_text
    [record] = records_of(gw, exchange.headers[REQUEST_ID])
    assert (record["dialect"], record["status"], record["stream"]) == ("completions", 200, mode != "plain")


@pytest.mark.parametrize("mode", ["plain", "stream_usage"])
def test_the_embedded_model_answers_a_prompt(gw: LoggedGateway, mode: str) -> None:
    client, transport = client_of(gw)
    with client:
        reply = client.completions.create(model="local", prompt="The capital of France is", max_tokens=6,
                                          **stream_kwargs(mode))
        if mode != "plain":
            list(reply)
    text = wire_text(transport.exchanges[0], mode)
    assert text.strip(), "the embedded model said nothing"
    if mode == "plain":
        assert transport.exchanges[0].json()["usage"]["completion_tokens"] <= 6


def test_the_upstream_gets_one_chat_call_with_the_prompt_and_the_settings(
    gw: LoggedGateway, upstream: FakeOpenAIServer,
) -> None:
    httpx.post(upstream.url.removesuffix("/v1") + "/_fake/config", json={"reset_stats": True}).raise_for_status()
    client, _ = client_of(gw)
    with client:
        client.completions.create(
            model="gpt", prompt=["Write a haiku"], temperature=0.3, top_p=0.8, stop=["\n\n"], seed=11, user="ann",
            presence_penalty=0.1, frequency_penalty=0.2, logit_bias={"50256": -100}, best_of=1, n=1,
        )
        client.completions.create(model="gpt", prompt="no limit sent")
    bodies = httpx.get(upstream.url.removesuffix("/v1") + "/_fake/stats").json()["bodies"]
    assert len(bodies) == 2
    sent, default = bodies
    assert sent["messages"] == [{"role": "user", "content": "Write a haiku"}]
    assert {k: sent[k] for k in ("temperature", "top_p", "stop", "seed", "user", "presence_penalty",
                                 "frequency_penalty", "logit_bias")} == {
        "temperature": 0.3, "top_p": 0.8, "stop": ["\n\n"], "seed": 11, "user": "ann", "presence_penalty": 0.1,
        "frequency_penalty": 0.2, "logit_bias": {"50256": -100}}
    for own in ("prompt", "best_of", "echo", "suffix", "logprobs"):
        assert own not in sent
    assert default["max_tokens"] == 16  # OpenAI's default for completions


def test_echo_gives_the_prompt_then_the_answer(gw: LoggedGateway) -> None:
    client, _ = client_of(gw)
    with client:
        plain = client.completions.create(model="sim", prompt="Hi. ", echo=True)
        streamed = list(client.completions.create(model="sim", prompt="Hi. ", echo=True, stream=True))
    assert plain.choices[0].text == "Hi. echo: Hi. "
    assert streamed[0].choices[0].text == "Hi. "
    assert "".join(c.choices[0].text for c in streamed) == "Hi. echo: Hi. "


# ------------------------------------------------------------------ a batch of prompts


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", list(MODEL))
def test_a_list_of_prompts_is_answered_one_choice_per_prompt_each_call_logged(
    gw: LoggedGateway, provider: str, mode: str,
) -> None:
    client, transport = client_of(gw)
    prompts = [f"batch {provider} {mode} #{i}" for i in range(3)]
    with client:
        if mode == "plain":
            completion = client.completions.create(model=MODEL[provider], prompt=prompts)
            texts = {c.index: c.text for c in completion.choices}
            assert [c.finish_reason for c in completion.choices] == ["stop"] * 3
            usage = completion.usage
        else:
            chunks = list(client.completions.create(model=MODEL[provider], prompt=prompts, **stream_kwargs(mode)))
            texts = {}
            for chunk in chunks:
                for choice in chunk.choices:
                    texts[choice.index] = texts.get(choice.index, "") + choice.text
            finishes = [(c.choices[0].index, c.choices[0].finish_reason) for c in chunks
                        if c.choices and c.choices[0].finish_reason]
            assert sorted(finishes) == [(0, "stop"), (1, "stop"), (2, "stop")]  # each prompt ends once
            usage = chunks[-1].usage if mode == "stream_usage" else None
            assert all(c.usage is None for c in chunks[:-1])
    assert texts == {i: f"echo: {prompt}" for i, prompt in enumerate(prompts)}
    [exchange] = transport.exchanges
    if mode != "plain":
        for chunk in stream_chunks(bytes(exchange.body)):
            check_chunk(chunk)
    else:
        validate(COMPLETION, exchange.json())
    request_id = exchange.headers[REQUEST_ID]
    records = [records_of(gw, rid)[0] for rid in (request_id, f"{request_id}-1", f"{request_id}-2")]
    assert {(r["dialect"], r["status"], r["stream"]) for r in records} == {("completions", 200, mode != "plain")}
    if mode != "stream":
        assert usage is not None  # the calls' usage summed: what the three records say they used
        assert usage.prompt_tokens == sum(r["prompt_tokens"] for r in records)
        assert usage.completion_tokens == sum(r["completion_tokens"] for r in records)
        assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


@pytest.mark.parametrize("echo", [False, True])
def test_a_batch_echoes_each_prompt_before_its_own_answer(gw: LoggedGateway, echo: bool) -> None:
    client, _ = client_of(gw)
    with client:
        streamed = list(client.completions.create(model="sim", prompt=["A. ", "B. "], echo=echo, stream=True))
    texts: dict[int, str] = {}
    for chunk in streamed:
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
    first = "A. " if echo else ""
    second = "B. " if echo else ""
    assert texts == {0: f"{first}echo: A. ", 1: f"{second}echo: B. "}


def test_a_prompt_of_a_batch_that_fails_fails_the_request_and_every_call_is_logged(
    gw: LoggedGateway, flaky: FakeOpenAIServer,
) -> None:
    # One of the three calls (whichever comes first) fails; the model has no retry.
    flaky.call(lambda: flaky.fake.configure_from({"fail_first": 1, "fail_status": 503}))
    client, _ = client_of(gw)
    with client, pytest.raises(openai.APIStatusError) as caught:
        client.completions.create(model="flaky", prompt=["p0", "p1", "p2"])
    error = caught.value
    assert error.status_code >= 500 and "503" in error.message
    request_id = error.response.headers[REQUEST_ID]
    records = [records_of(gw, rid)[0] for rid in (request_id, f"{request_id}-1", f"{request_id}-2")]
    failed = [r for r in records if r["status"] == error.status_code]
    assert len(failed) == 1 and all(r["dialect"] == "completions" for r in records)
    # The others were answered (kept: their cost was spent) or stopped when the first failed.
    assert {r["outcome"] for r in records if r is not failed[0]} <= {"ok", "client_closed"}


# ------------------------------------------------------------------ refused


@pytest.mark.parametrize(("arguments", "param", "says"), [
    ({"prompt": [1, 2, 3]}, "prompt", "Send the prompt as a string"),
    ({"prompt": "x", "suffix": "the end"}, "suffix", "'suffix' is not supported"),
    ({"prompt": "x", "logprobs": 2}, "logprobs", "'logprobs' is not supported"),
    ({"prompt": "x", "best_of": 2}, "best_of", "'best_of' above 1 is not supported"),
    ({"prompt": "x", "n": 2}, "n", "one choice per request"),
    ({"prompt": "x", "temperature": 9}, "temperature", "'temperature'"),
], ids=["token-ids", "suffix", "logprobs", "best_of", "n", "temperature"])
def test_a_refused_field_is_a_400_the_sdk_reports_by_name(
    gw: LoggedGateway, arguments: dict[str, Any], param: str, says: str,
) -> None:
    client, transport = client_of(gw)
    with client, pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model="sim", **arguments)
    error = caught.value
    assert error.status_code == 400 and error.param == param, error.body
    assert says in error.message
    validate(ERROR, transport.exchanges[0].json())
    [record] = records_of(gw, error.response.headers[REQUEST_ID])
    assert (record["dialect"], record["status"]) == ("completions", 400)


def test_a_bad_key_is_a_401_the_sdk_reports_and_the_log_records_once(gw: LoggedGateway) -> None:
    client, _ = client_of(gw, api_key="sk-not-the-key")
    with client, pytest.raises(openai.AuthenticationError) as caught:
        client.completions.create(model="sim", prompt="let me in")
    assert caught.value.status_code == 401
    assert "Invalid or missing API key" in caught.value.message
    [record] = records_of(gw, caught.value.response.headers[REQUEST_ID])
    assert (record["dialect"], record["status"]) == ("completions", 401)


@pytest.mark.parametrize("body", [b'{"model": "sim", "prompt": ', b"\xff\xfe", b"[]"], ids=["cut", "not-utf8", "array"])
def test_a_body_that_is_not_a_json_object_is_a_400_logged_once(gw: LoggedGateway, body: bytes) -> None:
    before = calls_counted(gw, key=KEY)
    response = post(gw, body, "/v1/completions")
    assert response.status_code == 400
    validate(ERROR, response.json())
    assert response.json()["error"]["type"] == "invalid_request_error"
    row = then_one_record_and_still_serving(gw, response, before)
    assert row["dialect"] == "completions"


def test_an_unknown_model_is_a_404_the_sdk_reports(gw: LoggedGateway) -> None:
    client, _ = client_of(gw)
    with client, pytest.raises(openai.NotFoundError) as caught:
        client.completions.create(model="no-such-model", prompt="x")
    assert "no-such-model" in caught.value.message
    [record] = records_of(gw, caught.value.response.headers[REQUEST_ID])
    assert record["dialect"] == "completions"
