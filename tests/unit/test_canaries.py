"""Canary prompts: each prompt to each model at temperature 0 under the keel.canary feature, on a schedule
driven by an injected wait, through the pipeline (logged), started and stopped with the Keel."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from keel.config import CanariesConfig, ConfigError, parse_config
from keel.engine import Keel
from keel.errors import UpstreamServerError
from keel.evals.canaries import CanarySchedule
from keel.evals.drift import canary_id
from keel.observability.store import RecordStore
from keel.pipeline import Completion, Context, Reply
from keel.types import ChatRequest

CANARIES = CanariesConfig(prompts=["What is 2+2?", "Name a colour."], models=["a", "b"], every_s=600, max_tokens=8)


class Ticker:
    """The schedule's wait: records each delay asked for and returns only when the test ticks."""

    def __init__(self) -> None:
        self.asked: list[float] = []
        self.waiting = asyncio.Event()
        self._tick = asyncio.Event()

    async def wait(self, seconds: float) -> None:
        self.asked.append(seconds)
        self.waiting.set()
        await self._tick.wait()
        self._tick.clear()

    async def tick(self) -> None:
        """Let the schedule run one more round, and wait until it waits again."""
        self.waiting.clear()
        self._tick.set()
        await asyncio.wait_for(self.waiting.wait(), 10)


async def test_each_prompt_goes_to_each_model_deterministically_under_the_canary_feature() -> None:
    seen: list[tuple[ChatRequest, Context]] = []

    async def handle(request: ChatRequest, ctx: Context) -> Reply:
        seen.append((request, ctx))
        return Completion({"choices": [{"message": {"role": "assistant", "content": f"to {request.model}"}}]})

    results = await CanarySchedule(handle, CANARIES).run_once()
    assert [(r.model, r.answer) for r in results] == [("a", "to a"), ("a", "to a"), ("b", "to b"), ("b", "to b")]
    request, ctx = seen[0]
    assert request.temperature == 0 and request.max_tokens == 8
    assert request.metadata == {"canary": canary_id("What is 2+2?")}
    assert ctx.feature == "keel.canary" and ctx.cache_control == "no-cache, no-store"


async def test_the_schedule_sends_a_round_at_start_then_one_per_period_and_survives_failures() -> None:
    calls = 0

    async def handle(request: ChatRequest, ctx: Context) -> Reply:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise UpstreamServerError("down", deployment="x")
        return Completion({"choices": [{"message": {"role": "assistant", "content": "4"}}]})

    ticker = Ticker()
    schedule = CanarySchedule(handle, CANARIES, wait=ticker.wait)
    schedule.start()
    await asyncio.wait_for(ticker.waiting.wait(), 10)
    assert (schedule.rounds, calls, ticker.asked) == (1, 4, [600])
    await ticker.tick()
    await ticker.tick()
    assert (schedule.rounds, calls, ticker.asked) == (3, 12, [600, 600, 600])
    await schedule.stop()
    assert schedule._task is None


def test_a_canary_model_must_exist() -> None:
    with pytest.raises(ConfigError, match=r"canaries.models\[0\] is 'nope'"):
        parse_config({"models": [{"name": "m", "deployments": [{"provider": "simulated"}]}],
                      "canaries": {"prompts": ["hi"], "models": ["nope"]}})


async def test_keel_starts_the_canaries_and_they_are_logged(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'log.db'}"
    cfg = parse_config({
        "models": [{"name": "m", "deployments": [{"provider": "simulated", "model": "sim-1"}]}],
        "store": {"url": url, "flush_interval_ms": 10},
        "canaries": {"prompts": ["ping"], "models": ["m"], "every_s": 3600},
    })
    keel = Keel(cfg)
    await keel.start()
    try:
        assert keel.canaries is not None
        await asyncio.wait_for(keel.canaries.round_done.wait(), 10)
    finally:
        await keel.close()
    assert keel.canaries._task is None  # stopped by close
    store = RecordStore(url)
    try:
        rows: list[dict[str, Any]] = store.records(0, feature="keel.canary")
    finally:
        store.close()
    assert len(rows) == 1
    assert rows[0]["output"]["content"] == "echo: ping" and rows[0]["upstream_model"] == "sim-1"
    assert rows[0]["metadata"]["canary"] == canary_id("ping")


async def test_without_canaries_no_schedule_is_made() -> None:
    keel = Keel(parse_config({"models": [{"name": "m", "deployments": [{"provider": "simulated"}]}],
                              "store": {"url": "sqlite:///:memory:"}}))
    async with keel:
        assert keel.canaries is None
