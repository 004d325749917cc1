"""Acceptance: two identical streamed calls through `keel serve`, with the official openai SDK, the
second sent while the first is being streamed: one upstream call, and the second joins the stream under
way (a hit) and reads the same text."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
from conftest import GatewayProcess

from keel.testing.fake_openai import FakeOpenAIServer

ASKED = {"model": "gpt", "messages": [{"role": "user", "content": "Tell me a story"}], "temperature": 0}


def test_a_streamed_call_joins_an_identical_stream_under_way(
    gateway: Callable[..., GatewayProcess], fake_upstream: FakeOpenAIServer, tmp_path: Path,
) -> None:
    control = fake_upstream.url.removesuffix("/v1")
    # A slow stream (20 chunks, 150 ms apart): the second call is sent once the first has read its first
    # chunk, well before the upstream's stream ends.
    httpx.post(control + "/_fake/config", json={"chunk_delay_ms": 150, "reset_stats": True}).raise_for_status()
    gw = gateway({
        "models": [{"name": "gpt", "deployments": [{"provider": "openai", "base_url": fake_upstream.url,
                                                    "model": "gpt-4o-mini"}]}],
        "store": {"url": f"sqlite:///{tmp_path}/log.db"},
        "cache": {"backend": "memory", "exact": {"enabled": True}},
    })
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key="unused", max_retries=0, timeout=30)
    first_read = threading.Event()

    def call(first: bool) -> tuple[str, str]:
        if not first:
            assert first_read.wait(timeout=30)
        raw = client.chat.completions.with_raw_response.create(**ASKED, stream=True)  # type: ignore[call-overload]
        parts = []
        for chunk in raw.parse():
            if chunk.choices:
                parts.append(chunk.choices[0].delta.content or "")
            first_read.set()
        return raw.headers["x-keel-cache"], "".join(parts)

    with ThreadPoolExecutor(2) as pool:
        leader, joiner = pool.map(call, (True, False))
    assert leader[0] == "miss" and joiner[0] == "hit"
    assert leader[1] == joiner[1] and leader[1].startswith("echo")
    stats = httpx.get(control + "/_fake/stats").json()
    assert stats["requests"] == 1
