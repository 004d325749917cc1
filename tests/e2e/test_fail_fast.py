"""A dead upstream fails the official openai SDK fast at its default settings (max_retries=2):
Keel has already retried by its own policy, and its answer says so (`x-should-retry: false`),
so the SDK neither retries nor sleeps on a Retry-After. Counted on the gateway's own metrics."""

from __future__ import annotations

import time
from collections.abc import Callable

import openai
import pytest
from conftest import GatewayProcess, free_port
from observability_helpers import wait_until_counted

FAST_RETRY = {"max_attempts": 2, "initial_backoff_ms": 1, "max_backoff_ms": 5}


def test_a_dead_upstream_fails_the_sdk_at_its_defaults_with_one_request_per_call(
    gateway: Callable[..., GatewayProcess],
) -> None:
    dead = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    gw = gateway({"models": [{
        "name": "chat", "retry": FAST_RETRY, "breaker": {"failure_threshold": 2, "cooldown_s": 60},
        "deployments": [{"provider": "openai", "name": "dead", "base_url": dead, "model": "gpt-4o-mini"}],
    }]})
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key="unused")  # the SDK's defaults: max_retries=2
    assert client.max_retries == 2
    messages: list[openai.types.chat.ChatCompletionMessageParam] = [{"role": "user", "content": "hello"}]
    started = time.monotonic()

    # Keel's own two attempts fail and open the breaker: 502, and the SDK does not try again.
    with pytest.raises(openai.APIStatusError) as failed:
        client.chat.completions.create(model="chat", messages=messages)
    assert failed.value.status_code == 502
    assert failed.value.response.headers["x-should-retry"] == "false"
    assert failed.value.code == "upstream_connection_error"
    assert wait_until_counted([gw], 1) == 1

    # Now the breaker is open: 503 circuit_open, with no Retry-After for the SDK to sleep on.
    for stream in (False, True):
        with pytest.raises(openai.APIStatusError) as paused:
            client.chat.completions.create(model="chat", messages=messages, stream=stream)
        assert paused.value.status_code == 503 and paused.value.code == "circuit_open"
        assert paused.value.response.headers["x-should-retry"] == "false"
        assert "retry-after" not in paused.value.response.headers
    assert wait_until_counted([gw], 3) == 3

    # A second guard, generous: one SDK retry sleeping on the old 60 s Retry-After would pass it.
    assert time.monotonic() - started < 30
