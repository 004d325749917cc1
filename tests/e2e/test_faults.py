"""Acceptance: a real `keel serve` between the official `openai` SDK (its own retries off) and
fake upstreams that fail on purpose. Whatever the upstream does, the client sees either a
correct answer or a clear OpenAI-shaped error, on time, never a silent truncation."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from conftest import GatewayProcess

from keel.testing.fake_openai import FakeBehaviour, FakeOpenAIServer

KEY = "sk-keel-faults"
MESSAGES: list[Any] = [{"role": "user", "content": "hello there"}]
ANSWER = "echo: hello there"
FAST_RETRY = {"initial_backoff_ms": 1, "max_backoff_ms": 20}


@dataclass(frozen=True)
class Scenario:
    """One model of the shared gateway, over its own fakes (FakeBehaviour fields, in order)."""

    model: str
    upstreams: list[dict[str, Any]]
    settings: dict[str, Any] = field(default_factory=dict)  # ModelConfig keys: timeouts, retry, breaker


SCENARIOS: list[Scenario] = []


def scenario(model: str, upstreams: list[dict[str, Any]], **settings: Any) -> Scenario:
    SCENARIOS.append(made := Scenario(model, upstreams, settings))
    return made


@dataclass
class World:
    gateway: GatewayProcess
    fakes: dict[str, list[FakeOpenAIServer]]

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.gateway.url + "/v1", api_key=KEY, max_retries=0, timeout=10)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    """One `keel serve` for every scenario of this module (starting one costs a second or more),
    each scenario a model with its own fakes and breakers, so the tests cannot disturb each other."""
    fakes = {s.model: [FakeOpenAIServer(FakeBehaviour(**b)).start() for b in s.upstreams] for s in SCENARIOS}
    models = [
        {"name": s.model, **s.settings, "deployments": [
            {"provider": "openai", "name": f"{s.model}-{i}", "base_url": fake.url, "model": "gpt-4o-mini"}
            for i, fake in enumerate(fakes[s.model])
        ]}
        for s in SCENARIOS
    ]
    tmp: Path = tmp_path_factory.mktemp("faults")
    gateway = GatewayProcess({"models": models}, tmp, env={"KEEL_MASTER_KEY": KEY}).start()
    try:
        yield World(gateway, fakes)
    finally:
        gateway.stop()
        for servers in fakes.values():
            for server in servers:
                server.stop()


def seen(fake: FakeOpenAIServer) -> int:
    return fake.fake.stats.requests


def assert_openai_error_shape(body: Any, code: str) -> None:
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert body["error"]["code"] == code


# ---------------------------------------------------------------------------- (a) (b) flaky upstreams

# A 30% flaky upstream is not a dead one: the breaker's threshold sits above any failure run this
# seeded sequence has (its longest is 4), so only retries are proven here; breakers are in (e).
FLAKY = scenario(
    "flaky", [{"fail_rate": 0.3, "fail_status": 503, "seed": 0}],
    retry={"max_attempts": 8, **FAST_RETRY}, breaker={"failure_threshold": 8},
)


def test_a_30_percent_failing_upstream_is_invisible_with_retries(world: World) -> None:
    (fake,), sdk = world.fakes[FLAKY.model], world.client()
    # One at a time, so each call's attempts are consecutive draws of the seeded fake: the run
    # is deterministic (a call fails only after 8 failures in a row; concurrency would make
    # that a 1-in-15000 chance per call instead of "never with this seed").
    answers = [sdk.chat.completions.create(model=FLAKY.model, messages=MESSAGES) for _ in range(200)]
    assert all(a.choices[0].message.content == ANSWER for a in answers)
    assert fake.fake.stats.failures > 30
    assert seen(fake) == 200 + fake.fake.stats.failures > 200


FLAKY_PRIMARY = scenario(
    "flaky-primary", [{"fail_rate": 0.3, "fail_status": 503, "seed": 1}, {"model": "fallback"}],
    retry={"max_attempts": 1},
)


def test_a_30_percent_failing_primary_is_invisible_with_a_fallback(world: World) -> None:
    (primary, fallback), sdk = world.fakes[FLAKY_PRIMARY.model], world.client()

    def ask(_: int) -> str | None:
        return sdk.chat.completions.create(model=FLAKY_PRIMARY.model, messages=MESSAGES).choices[0].message.content

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, range(200)))
    assert answers == [ANSWER] * 200
    assert primary.fake.stats.failures > 30
    assert seen(fallback) >= primary.fake.stats.failures  # more if the breaker paused the primary


# ---------------------------------------------------------------------------- (c) Retry-After

RATE_LIMITED = scenario(
    "rate-limited", [{"fail_first": 1, "fail_status": 429, "retry_after": 1}], retry={"max_attempts": 3, **FAST_RETRY},
)


def test_a_429_with_retry_after_is_waited_out(world: World) -> None:
    (fake,), sdk = world.fakes[RATE_LIMITED.model], world.client()
    started = time.monotonic()
    raw = sdk.chat.completions.with_raw_response.create(model=RATE_LIMITED.model, messages=MESSAGES)
    assert time.monotonic() - started >= 1.0  # never sooner than the Retry-After
    assert raw.parse().choices[0].message.content == ANSWER
    assert (seen(fake), fake.fake.stats.failures) == (2, 1)
    # The wait was the Retry-After itself, not a backoff (at most 20 ms) instead of or on top of it.
    rid = raw.headers["x-keel-request-id"]
    assert re.search(rf"request {rid}: model '{RATE_LIMITED.model}': attempt 1 of 3 failed .*; retrying in 1\.00 s",
                     world.gateway.log())


# ---------------------------------------------------------------------------- (d) deadline

HANGING = scenario("hanging", [{"hang": True}], timeout_s=1.0, retry=FAST_RETRY)


def test_a_hanging_upstream_fails_at_the_deadline_with_a_504(world: World) -> None:
    sdk = world.client()
    started = time.monotonic()
    # The upstream hangs for an hour and the SDK gives up after 10 s with no status at all, so a
    # 504 can only have come from the gateway's deadline.
    with pytest.raises(openai.APIStatusError) as caught:
        sdk.chat.completions.create(model=HANGING.model, messages=MESSAGES)
    assert time.monotonic() - started >= 1.0
    error = caught.value
    assert error.status_code == 504
    assert error.code == "timeout"
    body = error.response.json()
    assert_openai_error_shape(body, "timeout")
    assert body["error"]["type"] == "timeout_error"
    assert "timeout_s = 1 s" in body["error"]["message"]
    assert error.response.headers["x-keel-request-id"].startswith("req_")


# ---------------------------------------------------------------------------- (e) circuit breaker

BROKEN_PRIMARY = scenario(
    "broken-primary", [{"fail_rate": 1.0, "fail_status": 503}, {"model": "fallback"}],
    retry=FAST_RETRY, breaker={"failure_threshold": 3, "cooldown_s": 600},
)


def test_an_always_failing_primary_is_cut_off_by_its_breaker(world: World) -> None:
    (primary, fallback), sdk = world.fakes[BROKEN_PRIMARY.model], world.client()
    primary_seen = []
    for _ in range(12):
        answer = sdk.chat.completions.create(model=BROKEN_PRIMARY.model, messages=MESSAGES)
        assert answer.model == "fallback"
        assert answer.choices[0].message.content == ANSWER
        primary_seen.append(seen(primary))
    assert primary_seen[:3] == [1, 2, 3]
    assert primary_seen[3:] == [3] * 9  # open: the primary is not called any more
    assert seen(fallback) == 12


# ---------------------------------------------------------------------------- (f) streams

CUT = scenario("cut", [{"cut_after": 3}], retry=FAST_RETRY)


def test_a_stream_cut_mid_way_reaches_the_sdk_as_an_error(world: World) -> None:
    (fake,), sdk = world.fakes[CUT.model], world.client()
    stream = sdk.chat.completions.create(model=CUT.model, messages=MESSAGES, stream=True)
    received: list[str] = []
    with pytest.raises(openai.APIError) as caught:
        for chunk in stream:
            received.append(chunk.choices[0].delta.content or "" if chunk.choices else "")
    assert len(received) == 4  # the role chunk and three pieces got through
    assert not isinstance(caught.value, openai.APIStatusError)  # raised while iterating a 200
    assert "'cut-0'" in caught.value.message and "stream" in caught.value.message
    assert isinstance(caught.value.body, dict) and caught.value.body["code"] == "upstream_connection_error"
    assert seen(fake) == 1  # after the first chunk there is no retry


def test_a_stream_cut_mid_way_ends_with_an_error_event_and_no_done(world: World) -> None:
    body = {"model": CUT.model, "messages": MESSAGES, "stream": True}
    with httpx.stream("POST", world.gateway.url + "/v1/chat/completions", json=body, timeout=10,
                      headers={"authorization": f"Bearer {KEY}"}) as response:
        assert response.status_code == 200
        raw = response.read().decode()
    events = [block.removeprefix("data: ") for block in raw.split("\n\n") if block]
    assert "[DONE]" not in raw
    assert len(events) == 5
    assert all(json.loads(e)["object"] == "chat.completion.chunk" for e in events[:4])
    assert_openai_error_shape(json.loads(events[-1]), "upstream_connection_error")


FAILS_BEFORE_STREAMING = scenario(
    "fails-before-streaming", [{"fail_first": 2, "fail_status": 503}], retry={"max_attempts": 3, **FAST_RETRY},
)


def test_a_stream_failing_before_its_first_chunk_is_retried_for_the_sdk(world: World) -> None:
    (fake,), sdk = world.fakes[FAILS_BEFORE_STREAMING.model], world.client()
    stream = sdk.chat.completions.create(model=FAILS_BEFORE_STREAMING.model, messages=MESSAGES, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == ANSWER
    assert seen(fake) == 3


STALLING = scenario("stalling", [{"stall_after": 2}], chunk_gap_timeout_s=0.5, retry=FAST_RETRY)


def test_a_stream_stalling_mid_way_reaches_the_sdk_as_an_error_at_the_gap_timeout(world: World) -> None:
    started = time.monotonic()
    stream = world.client().chat.completions.create(model=STALLING.model, messages=MESSAGES, stream=True)
    received = 0
    # The fake is silent for an hour after two pieces, and the SDK's own read timeout (10 s) would
    # raise a timeout, not this error: only the gap timeout can have ended the stream.
    with pytest.raises(openai.APIError) as caught:
        for _ in stream:
            received += 1
    # The gap clock starts after the gateway has the last chunk, which is after `started`: the
    # timer did not fire early. (Timed from the client's last chunk, a busy client eats the margin.)
    assert time.monotonic() - started >= 0.5
    assert received == 3  # the role chunk and two pieces
    assert isinstance(caught.value.body, dict) and caught.value.body["code"] == "stream_stalled"
    assert "silent mid-stream for 0.5 s (chunk_gap_timeout_s)" in caught.value.message
