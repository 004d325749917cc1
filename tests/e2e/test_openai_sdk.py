"""The official `openai` SDK, sync and async, against a real `keel serve`: every answer is
what OpenAI's spec says, on the wire, for an upstream deployment and for the simulator.

Each SDK client runs over a recording transport, so the raw body of every response (and
every chunk of every stream) is validated against openai/openai-openapi, not just the
SDK's lenient parse of it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import httpx2
import openai
import pytest
from conftest import GatewayProcess
from openai import AsyncOpenAI, OpenAI
from spec import CHAT_CHUNK, CHAT_COMPLETION, ERROR, MODELS, validate
from wire import (
    REQUEST_ID,
    AsyncRecordingTransport,
    Exchange,
    RecordingTransport,
    check_all,
    decode_base64_embedding,
    stream_chunks,
)

from keel.testing.fake_openai import FakeBehaviour, FakeOpenAIServer

KEY = "sk-keel-e2e-0123456789"
MODEL = {"openai": "gpt", "simulated": "sim"}
PROVIDERS = list(MODEL)
MODES = ["plain", "stream", "stream_usage"]


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeOpenAIServer]:
    with FakeOpenAIServer(FakeBehaviour(chunks=6)) as server:
        yield server


def start_gateway(config: dict[str, Any], tmp: Path) -> GatewayProcess:
    return GatewayProcess(config, tmp, env={"KEEL_MASTER_KEY": KEY}).start()


@pytest.fixture(scope="module")
def openai_gateway(upstream: FakeOpenAIServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    gw = start_gateway({"models": [
        {"name": "gpt", "deployments": [{"provider": "openai", "base_url": upstream.url, "model": "gpt-4o-mini"}]},
        {"name": "embed", "deployments": [
            {"provider": "openai", "base_url": upstream.url, "model": "text-embedding-3-small"}]},
    ]}, tmp_path_factory.mktemp("openai-gw"))
    yield gw
    gw.stop()


@pytest.fixture(scope="module")
def simulated_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    gw = start_gateway(
        {"models": [{"name": "sim", "deployments": [{"provider": "simulated"}]}]}, tmp_path_factory.mktemp("sim-gw"),
    )
    yield gw
    gw.stop()


def gateway_for(request: pytest.FixtureRequest, provider: str) -> GatewayProcess:
    gw: GatewayProcess = request.getfixturevalue(f"{provider}_gateway")
    return gw


def sync_client(gw: GatewayProcess, api_key: str = KEY) -> tuple[OpenAI, RecordingTransport]:
    transport = RecordingTransport()
    client = OpenAI(
        base_url=gw.url + "/v1", api_key=api_key, max_retries=0,
        http_client=httpx2.Client(transport=transport, timeout=30),
    )
    return client, transport


def async_client(gw: GatewayProcess, api_key: str = KEY) -> tuple[AsyncOpenAI, AsyncRecordingTransport]:
    transport = AsyncRecordingTransport()
    client = AsyncOpenAI(
        base_url=gw.url + "/v1", api_key=api_key, max_retries=0,
        http_client=httpx2.AsyncClient(transport=transport, timeout=30),
    )
    return client, transport


def fake_bodies(upstream: FakeOpenAIServer) -> list[dict[str, Any]]:
    """What the fake upstream received, read through its own control API."""
    stats = httpx.get(upstream.url.removesuffix("/v1") + "/_fake/stats").json()
    bodies: list[dict[str, Any]] = stats["bodies"]
    return bodies


def reset_fake(upstream: FakeOpenAIServer) -> None:
    httpx.post(upstream.url.removesuffix("/v1") + "/_fake/config", json={"reset_stats": True}).raise_for_status()


# ---------------------------------------------------------------------------- what an answer must be


def stream_kwargs(mode: str) -> dict[str, Any]:
    if mode == "plain":
        return {}
    if mode == "stream":
        return {"stream": True}
    return {"stream": True, "stream_options": {"include_usage": True}}


def assert_wire_answer(exchange: Exchange, mode: str, text: str) -> None:
    """The raw body says `echo: <text>` in full OpenAI shape, nulls included."""
    if mode == "plain":
        body = exchange.json()
        choice = body["choices"][0]
        assert choice["message"]["content"] == f"echo: {text}"
        assert "refusal" in choice["message"] and choice["message"]["refusal"] is None
        assert "logprobs" in choice and choice["logprobs"] is None
        assert choice["finish_reason"] == "stop"
        assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]
        return
    assert exchange.is_stream
    chunks = stream_chunks(bytes(exchange.body))
    assert len({c["id"] for c in chunks}) == 1, "every chunk of one stream has the same id"
    content = "".join(
        choice["delta"].get("content") or "" for chunk in chunks for choice in chunk["choices"]
    )
    assert content == f"echo: {text}"
    for chunk in chunks:
        for choice in chunk["choices"]:
            assert "logprobs" in choice and choice["logprobs"] is None
    finishes = [choice["finish_reason"] for chunk in chunks for choice in chunk["choices"] if choice["finish_reason"]]
    assert finishes == ["stop"]
    with_usage = [chunk for chunk in chunks if chunk.get("usage")]
    if mode == "stream_usage":
        assert with_usage == [chunks[-1]], "usage comes once, in the last chunk"
        assert chunks[-1]["choices"] == []
        assert chunks[-1]["usage"]["completion_tokens"] > 0
    else:
        assert with_usage == [], "no usage without stream_options.include_usage"


def assert_sdk_stream(chunks: list[Any], mode: str, text: str) -> None:
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == f"echo: {text}"
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    if mode == "stream_usage":
        assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens > 0
    else:
        assert all(c.usage is None for c in chunks)


def chat_exchange(exchanges: list[Exchange]) -> Exchange:
    found = [e for e in exchanges if e.path.endswith("/chat/completions")]
    assert len(found) == 1
    return found[0]


# ---------------------------------------------------------------------------- chat


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_sync_sdk_chat_matches_the_openai_spec(request: pytest.FixtureRequest, provider: str, mode: str) -> None:
    client, transport = sync_client(gateway_for(request, provider))
    text = f"hello from sync {provider} {mode}"
    messages: Any = [{"role": "system", "content": "be brief"}, {"role": "user", "content": text}]
    with client:
        if mode == "plain":
            completion = client.chat.completions.create(model=MODEL[provider], messages=messages)
            assert completion.object == "chat.completion"
            assert completion.choices[0].message.content == f"echo: {text}"
            assert completion.choices[0].message.refusal is None
            assert completion.usage is not None and completion.usage.total_tokens > 0
        else:
            stream = client.chat.completions.create(model=MODEL[provider], messages=messages, **stream_kwargs(mode))
            assert_sdk_stream(list(stream), mode, text)
        assert_wire_answer(chat_exchange(transport.exchanges), mode, text)
    check_all(transport.exchanges)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
async def test_async_sdk_chat_matches_the_openai_spec(request: pytest.FixtureRequest, provider: str, mode: str) -> None:
    client, transport = async_client(gateway_for(request, provider))
    text = f"hello from async {provider} {mode}"
    messages: Any = [{"role": "user", "content": [{"type": "text", "text": text}]}]
    async with client:
        if mode == "plain":
            completion = await client.chat.completions.create(model=MODEL[provider], messages=messages)
            assert completion.choices[0].message.content == f"echo: {text}"
            assert completion.choices[0].logprobs is None
        else:
            stream = await client.chat.completions.create(
                model=MODEL[provider], messages=messages, **stream_kwargs(mode),
            )
            assert_sdk_stream([chunk async for chunk in stream], mode, text)
        assert_wire_answer(chat_exchange(transport.exchanges), mode, text)
    check_all(transport.exchanges)


@pytest.mark.parametrize("provider", PROVIDERS)
def test_raw_http_chat_and_stream_match_the_spec(request: pytest.FixtureRequest, provider: str) -> None:
    gw = gateway_for(request, provider)
    headers = {"authorization": f"Bearer {KEY}"}
    body = {"model": MODEL[provider], "messages": [{"role": "user", "content": "raw"}]}
    with httpx.Client(base_url=gw.url, headers=headers, timeout=30) as http:
        plain = http.post("/v1/chat/completions", json=body)
        assert plain.status_code == 200, plain.text
        assert plain.headers["content-type"] == "application/json"
        assert plain.headers[REQUEST_ID].startswith("req_")
        validate(CHAT_COMPLETION, plain.json())
        assert plain.json()["choices"][0]["message"]["content"] == "echo: raw"

        with http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as streamed:
            assert streamed.status_code == 200
            assert streamed.headers["content-type"].startswith("text/event-stream")
            assert streamed.headers["cache-control"] == "no-cache"
            assert streamed.headers[REQUEST_ID].startswith("req_")
            raw = streamed.read()
    assert raw.endswith(b"data: [DONE]\n\n")
    chunks = stream_chunks(raw)
    for chunk in chunks:
        validate(CHAT_CHUNK, chunk)
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]) == "echo: raw"


def test_unknown_request_fields_reach_the_upstream(openai_gateway: GatewayProcess, upstream: FakeOpenAIServer) -> None:
    reset_fake(upstream)
    client, transport = sync_client(openai_gateway)
    extra = {"x_custom": {"nested": [1, 2]}, "reasoning_effort": "low", "store": False}
    messages: Any = [{"role": "user", "content": "extra", "x_part_flag": True}]
    with client:
        client.chat.completions.create(
            model="gpt", messages=messages, extra_body=extra, seed=7,
        )
        client.embeddings.create(model="embed", input="x", extra_body={"x_embed_option": "kept"})
    check_all(transport.exchanges)
    chat_body, embed_body = fake_bodies(upstream)
    for key, value in extra.items():
        assert chat_body[key] == value
    assert chat_body["seed"] == 7
    assert chat_body["messages"] == [{"role": "user", "content": "extra", "x_part_flag": True}]
    assert chat_body["model"] == "gpt-4o-mini", "the deployment's model goes upstream, not the virtual name"
    assert embed_body["x_embed_option"] == "kept"
    assert embed_body["model"] == "text-embedding-3-small"


# ---------------------------------------------------------------------------- models


def test_models_list_names_every_configured_model(openai_gateway: GatewayProcess) -> None:
    client, transport = sync_client(openai_gateway)
    with client:
        assert [m.id for m in client.models.list()] == ["gpt", "embed"]
    check_all(transport.exchanges)


async def test_async_models_list(simulated_gateway: GatewayProcess) -> None:
    client, transport = async_client(simulated_gateway)
    async with client:
        page = await client.models.list()
        assert [m.id for m in page.data] == ["sim"]
    check_all(transport.exchanges)
    async with httpx.AsyncClient() as http:
        raw = await http.get(simulated_gateway.url + "/v1/models", headers={"authorization": f"Bearer {KEY}"})
    validate(MODELS, raw.json())


# ---------------------------------------------------------------------------- embeddings

INPUTS: list[Any] = ["one string", ["two", "strings"], [1212, 318, 257], [[1212, 318], [257, 1332, 13]]]


def vectors_of(value: Any) -> int:
    return 1 if isinstance(value, str) or isinstance(value[0], int) else len(value)


@pytest.mark.parametrize("value", INPUTS, ids=["str", "list-str", "tokens", "list-tokens"])
def test_embeddings_every_input_form_and_encoding(
    openai_gateway: GatewayProcess, upstream: FakeOpenAIServer, value: Any,
) -> None:
    reset_fake(upstream)
    client, transport = sync_client(openai_gateway)
    with client:
        default = client.embeddings.create(model="embed", input=value)
        floats = client.embeddings.create(model="embed", input=value, encoding_format="float")
        encoded = client.embeddings.create(model="embed", input=value, encoding_format="base64")
    check_all(transport.exchanges)
    count = vectors_of(value)
    assert [d.index for d in floats.data] == list(range(count))
    for plain, via_default, via_base64 in zip(floats.data, default.data, encoded.data, strict=True):
        assert isinstance(plain.embedding, list) and all(isinstance(x, float) for x in plain.embedding)
        # The SDK asks for base64 unless told otherwise and hands back floats: the gateway
        # must pass the base64 through so that decoding gives the float answer back.
        assert isinstance(via_default.embedding, list)
        assert via_default.embedding == pytest.approx(plain.embedding, abs=1e-6)
        raw_base64: Any = via_base64.embedding
        assert isinstance(raw_base64, str)
        assert decode_base64_embedding(raw_base64) == pytest.approx(plain.embedding, abs=1e-6)
    sent = fake_bodies(upstream)
    assert [b["input"] for b in sent] == [value, value, value]
    assert [b["encoding_format"] for b in sent] == ["base64", "float", "base64"]


async def test_async_embeddings_default_to_floats(openai_gateway: GatewayProcess) -> None:
    client, transport = async_client(openai_gateway)
    async with client:
        response = await client.embeddings.create(model="embed", input=["a", "b", "c"])
    check_all(transport.exchanges)
    assert len(response.data) == 3
    assert all(len(d.embedding) == 8 and isinstance(d.embedding[0], float) for d in response.data)
    assert response.usage.total_tokens > 0


# ---------------------------------------------------------------------------- keys and health


def test_missing_key_is_refused_in_openai_shape(openai_gateway: GatewayProcess) -> None:
    body = {"model": "gpt", "messages": [{"role": "user", "content": "hi"}]}
    for headers in ({}, {"authorization": "Bearer wrong-key"}, {"authorization": KEY}, {"authorization": "Basic x"}):
        response = httpx.post(openai_gateway.url + "/v1/chat/completions", json=body, headers=headers)
        assert response.status_code == 401, headers
        assert response.headers[REQUEST_ID].startswith("req_")
        validate(ERROR, response.json())
        error = response.json()["error"]
        assert error["type"] == "authentication_error" and error["code"] == "invalid_api_key"
        assert "Authorization: Bearer" in error["message"], "the message says how to send the key"
        assert KEY not in response.text and "wrong-key" not in response.text
    models = httpx.get(openai_gateway.url + "/v1/models")
    assert models.status_code == 401
    validate(ERROR, models.json())


@pytest.mark.parametrize("provider", PROVIDERS)
def test_sdk_with_a_bad_key_gets_an_authentication_error(request: pytest.FixtureRequest, provider: str) -> None:
    client, transport = sync_client(gateway_for(request, provider), api_key="sk-not-the-key")
    with client:
        with pytest.raises(openai.AuthenticationError) as info:
            client.chat.completions.create(model=MODEL[provider], messages=[{"role": "user", "content": "hi"}])
        assert info.value.status_code == 401
        with pytest.raises(openai.AuthenticationError):
            client.chat.completions.create(
                model=MODEL[provider], messages=[{"role": "user", "content": "hi"}], stream=True,
            )
        with pytest.raises(openai.AuthenticationError):
            client.models.list()
    check_all(transport.exchanges)


def test_health_and_readiness_need_no_key(openai_gateway: GatewayProcess) -> None:
    health = httpx.get(openai_gateway.url + "/healthz")
    assert health.status_code == 200 and health.json() == {"status": "ok"}
    ready = httpx.get(openai_gateway.url + "/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    assert health.headers[REQUEST_ID] != ready.headers[REQUEST_ID]

