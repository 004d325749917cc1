"""POST /v1/messages through `keel serve`, with the official anthropic SDK unchanged but for its base URL:
plain answers, streams (`messages.stream` and `stream=True`) and a tool round trip against each kind of
deployment (simulated, the embedded model, an OpenAI-compatible upstream, an Anthropic upstream), errors
as the SDK's exception classes, and the passthrough to Anthropic deployments: the client's own body goes
upstream (Anthropic-only fields survive) unless a stage changed the request (a redacted email is sent
redacted, never as the client wrote it).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import anthropic
import httpx
import orjson
import pytest
from conftest import GatewayProcess
from observability_helpers import openai_deployment

from keel.testing.fake_anthropic import FakeAnthropicBehaviour, FakeAnthropicServer
from keel.testing.fake_openai import FakeBehaviour, FakeOpenAIServer

KEY = "sk-keel-messages-e2e-5c1d"
UPSTREAM_KEY_ENV = "KEEL_TEST_MESSAGES_ANTHROPIC_KEY"
UPSTREAM_KEY = "sk-ant-upstream-77"
EMAIL = "ann.lee@example.com"
WEATHER = {"name": "get_weather", "description": "Current weather in a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
MODELS = ["sim", "openai", "claude", "local"]


@dataclass
class Setup:
    gw: GatewayProcess
    openai_upstream: FakeOpenAIServer
    anthropic_upstream: FakeAnthropicServer

    def client(self, **options: Any) -> anthropic.Anthropic:
        return anthropic.Anthropic(**{"base_url": self.gw.url, "api_key": KEY, "max_retries": 0, "timeout": 60,
                                      **options})

    def anthropic_bodies(self) -> list[dict[str, Any]]:
        return list(self.anthropic_upstream.fake.stats.bodies)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    tmp = tmp_path_factory.mktemp("messages")
    claude = {"provider": "anthropic", "model": "claude-upstream-1", "api_key_env": UPSTREAM_KEY_ENV}
    with FakeOpenAIServer(FakeBehaviour(chunks=3)) as oai, \
            FakeAnthropicServer(FakeAnthropicBehaviour(api_key=UPSTREAM_KEY)) as ant:
        gw = GatewayProcess({"models": [
            {"name": "sim", "deployments": [{"provider": "simulated"}]},
            {"name": "openai", "deployments": [openai_deployment("oai", oai.url)]},
            {"name": "claude", "deployments": [{**claude, "base_url": ant.url}]},
            {"name": "claude-guarded", "deployments": [{**claude, "base_url": ant.url}],
             "guardrails": {"input": {"pii": {"action": "redact"}}}},
            {"name": "local", "deployments": [{"provider": "local", "default_max_tokens": 8}]},
        ]}, tmp, env={"KEEL_MASTER_KEY": KEY, UPSTREAM_KEY_ENV: UPSTREAM_KEY}).start(timeout=180)
        try:
            yield Setup(gw, oai, ant)
        finally:
            gw.stop()


def ask(model: str, text: str = "Say hello.") -> dict[str, Any]:
    return {"model": model, "max_tokens": 8, "messages": [{"role": "user", "content": text}]}


@pytest.mark.parametrize("model", MODELS)
def test_messages_create_answers_a_message(setup: Setup, model: str) -> None:
    raw = setup.client().messages.with_raw_response.create(**ask(model, "hello there"))
    message = raw.parse()
    assert message.type == "message" and message.role == "assistant" and message.id.startswith("msg_")
    text = "".join(b.text for b in message.content if b.type == "text")
    assert text
    if model != "local":
        assert text.startswith("echo:") and "hello there" in text
    assert message.stop_reason in ("end_turn", "max_tokens")
    assert message.usage.input_tokens > 0 and message.usage.output_tokens > 0
    assert raw.headers.get("x-keel-request-id")
    # Anthropic's SDK reads the id from its own header: the same id, so a support ticket finds the record.
    assert message._request_id == raw.headers["x-keel-request-id"]


@pytest.mark.parametrize("model", MODELS)
def test_messages_stream_adds_up_to_the_message(setup: Setup, model: str) -> None:
    with setup.client().messages.stream(**ask(model, "stream this")) as stream:
        pieces = list(stream.text_stream)
        final = stream.get_final_message()
    assert "".join(pieces) == "".join(b.text for b in final.content if b.type == "text") != ""
    if model != "local":
        assert len(pieces) > 1  # streamed, not one piece
    assert final.stop_reason in ("end_turn", "max_tokens") and final.usage.output_tokens > 0


@pytest.mark.parametrize("model", ["sim", "openai", "claude"])
def test_stream_true_gives_anthropic_s_raw_events(setup: Setup, model: str) -> None:
    events = list(setup.client().messages.create(**ask(model), stream=True))
    kinds = [e.type for e in events]
    assert kinds[0] == "message_start" and kinds[-2:] == ["message_delta", "message_stop"]
    assert "content_block_start" in kinds and "content_block_delta" in kinds and "content_block_stop" in kinds


def tool_round_trip(setup: Setup, model: str, **forced: Any) -> tuple[anthropic.types.Message, anthropic.types.Message]:
    client = setup.client()
    first_turn = [{"role": "user", "content": "call get_weather for Paris"}]
    called = client.messages.create(model=model, max_tokens=64, tools=[WEATHER], messages=first_turn, **forced)
    assert called.stop_reason == "tool_use"
    (use,) = [b for b in called.content if b.type == "tool_use"]
    assert use.name == "get_weather" and isinstance(use.input, dict)
    answered = client.messages.create(
        model=model, max_tokens=64, tools=[WEATHER], tool_choice={"type": "none"}, messages=[
            *first_turn,
            {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in called.content]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "sunny, 21 C"}]},
        ])
    return called, answered


@pytest.mark.parametrize("model", ["sim", "openai"])
def test_a_tool_round_trip_through_a_translated_deployment(setup: Setup, model: str) -> None:
    # The fake OpenAI upstream calls a tool when tool_choice forces one.
    forced = {"tool_choice": {"type": "any"}} if model == "openai" else {}
    before = len(setup.openai_upstream.fake.stats.bodies)
    called, answered = tool_round_trip(setup, model, **forced)
    assert answered.stop_reason == "end_turn" and answered.content[0].type == "text"
    if model == "openai":
        sent = setup.openai_upstream.fake.stats.bodies[before + 1]
        tool_message = sent["messages"][-1]
        assert tool_message == {"role": "tool", "tool_call_id": called.content[0].id, "content": "sunny, 21 C"}
        assert sent["messages"][-2]["tool_calls"][0]["function"]["name"] == "get_weather"


def test_a_tool_round_trip_through_an_anthropic_deployment_is_passed_through(setup: Setup) -> None:
    setup.anthropic_upstream.fake.behaviour.tool_uses = [{"name": "get_weather", "input": {"city": "Paris"}}]
    try:
        before = len(setup.anthropic_bodies())
        called, _ = tool_round_trip(setup, "claude")
    finally:
        setup.anthropic_upstream.fake.behaviour.tool_uses = []
    assert called.content[-1].input == {"city": "Paris"}
    sent = setup.anthropic_bodies()[before + 1]
    assert sent["messages"][-1]["content"] == [
        {"type": "tool_result", "tool_use_id": called.content[-1].id, "content": "sunny, 21 C"}]


def test_anthropic_only_fields_reach_an_anthropic_deployment_in_the_client_s_own_body(setup: Setup) -> None:
    before = len(setup.anthropic_bodies())
    system = [{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}]
    setup.client().messages.create(**ask("claude"), extra_body={"top_k": 3}, system=system, metadata={"user_id": "u-7"})
    (sent,) = setup.anthropic_bodies()[before:]
    assert sent["model"] == "claude-upstream-1"  # the deployment's model
    assert sent["top_k"] == 3 and sent["system"] == system and sent["metadata"] == {"user_id": "u-7"}
    assert sent["messages"] == [{"role": "user", "content": "Say hello."}]


def test_a_redacted_email_is_sent_redacted_not_as_the_client_wrote_it(setup: Setup) -> None:
    before = len(setup.anthropic_bodies())
    message = setup.client().messages.create(**ask("claude-guarded", f"Write to {EMAIL} today"),
                                             extra_body={"top_k": 3})
    (sent,) = setup.anthropic_bodies()[before:]
    assert EMAIL not in orjson.dumps(sent).decode()
    assert "top_k" not in sent  # the translation of what the guardrail made, not the client's body
    # The upstream echoed a placeholder; the guardrail put the email back for the caller (pii.restore).
    assert f"Write to {EMAIL} today" in "".join(b.text for b in message.content if b.type == "text")


def test_thinking_is_refused_for_a_model_anthropic_does_not_serve(setup: Setup) -> None:
    with pytest.raises(anthropic.BadRequestError) as refused:
        setup.client().messages.create(**ask("sim"), thinking={"type": "enabled", "budget_tokens": 1024})
    assert refused.value.body["error"]["type"] == "invalid_request_error"
    assert "'thinking'" in refused.value.body["error"]["message"]


def test_a_bad_body_is_a_bad_request_error_naming_the_field(setup: Setup) -> None:
    response = httpx.post(setup.gw.url + "/v1/messages", headers={"x-api-key": KEY},
                          json={"model": "sim", "messages": [{"role": "user", "content": "hi"}]})
    assert response.status_code == 400
    body = response.json()
    assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
    assert "'max_tokens'" in body["error"]["message"]
    with pytest.raises(anthropic.BadRequestError):
        setup.client().messages.create(model="sim", max_tokens=8, messages=[{"role": "system", "content": "x"}])  # type: ignore[list-item]


def test_a_bad_key_and_an_unknown_model_are_the_sdk_s_exceptions(setup: Setup) -> None:
    with pytest.raises(anthropic.AuthenticationError) as refused:
        setup.client(api_key="sk-wrong").messages.create(**ask("sim"))
    assert refused.value.body["error"]["type"] == "authentication_error"
    assert refused.value.request_id == refused.value.response.headers["x-keel-request-id"]
    with pytest.raises(anthropic.NotFoundError) as missing:
        setup.client().messages.create(**ask("no-such-model"))
    assert missing.value.body["error"]["type"] == "not_found_error"


def test_an_upstream_rate_limit_is_a_rate_limit_error(setup: Setup) -> None:
    fake = setup.anthropic_upstream.fake
    fake.behaviour.fail_status, fake.behaviour.retry_after = 429, 7
    try:
        with pytest.raises(anthropic.RateLimitError) as limited:
            setup.client().messages.create(**ask("claude"))
    finally:
        fake.behaviour.fail_status, fake.behaviour.retry_after = None, None
    assert limited.value.body["error"]["type"] == "rate_limit_error"
    assert limited.value.response.headers.get("x-should-retry") == "false"
