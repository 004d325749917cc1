"""SLO-aware control (keel.reliability.slo_guard): a deployment whose recent calls break the `slo` targets is
set aside — its calls go to the next deployment, or are shed with a 503 and Retry-After — until its
window empties; shown in the attempt log and in /metrics. Clocks are injected: no test waits."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from keel.config import SLOConfig, SLOGuardConfig, parse_config
from keel.engine import Keel
from keel.errors import SLOShed, UpstreamServerError
from keel.pipeline import Context
from keel.reliability.slo_guard import SLOGuard
from keel.types import ChatRequest


class Clock:
    def __init__(self) -> None:
        self.now = 5000.0

    def __call__(self) -> float:
        return self.now


def guard(**settings: Any) -> tuple[SLOGuard, Clock]:
    clock = Clock()
    slo = SLOConfig(p99_ms=1000, error_rate=0.05)
    return SLOGuard("d", SLOGuardConfig(action="fallback", **{"window_s": 60, "min_calls": 10, **settings}), slo,
                    clock), clock


def test_too_few_calls_are_not_judged_however_bad() -> None:
    slo, _ = guard()
    for _ in range(9):
        slo.observe(50_000, failed=True)
    assert slo.degraded() is None


def test_an_error_rate_over_the_target_sets_it_aside_and_says_why() -> None:
    slo, clock = guard()
    for i in range(20):
        slo.observe(100, failed=i == 0)  # 1 of 20: 5%, not over the 5% target
    assert slo.degraded() is None
    slo.observe(100, failed=True)  # 2 of 21: 9.5%
    clock.now += 1  # the verdict is cached a quarter of a second
    why = slo.degraded()
    assert why is not None and "2 of its last 21 calls failed" in why and "5.0%" in why


def test_a_p99_over_the_target_sets_it_aside_and_the_median_does_not_matter() -> None:
    slo, clock = guard()
    for _ in range(99):
        slo.observe(100, failed=False)
    slo.observe(900, failed=False)
    assert slo.degraded() is None  # P99 of 100 calls: the 99th, 100 ms
    slo.observe(1500, failed=False)
    slo.observe(1500, failed=False)
    clock.now += 1
    why = slo.degraded()
    assert why is not None and "P99" in why and "1500 ms" in why and "1000 ms" in why


def test_it_recovers_once_its_bad_calls_leave_the_window() -> None:
    slo, clock = guard(window_s=60)
    for _ in range(10):
        slo.observe(100, failed=True)
    assert slo.degraded() is not None
    assert slo.retry_after() == pytest.approx(60)
    clock.now += 30
    assert slo.retry_after() == pytest.approx(30)
    clock.now += 30.5
    assert slo.degraded() is None and len(slo.samples) == 0


# ------------------------------------------------------------------ through the reliability stage


def request() -> ChatRequest:
    return ChatRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "hi"}]})


@pytest.fixture
async def keel_of() -> AsyncIterator[Any]:
    made: list[Keel] = []

    def make(action: str, fallback: bool) -> tuple[Keel, Clock]:
        deployments: list[dict[str, Any]] = [{"provider": "simulated", "name": "flaky", "error_rate": 1.0}]
        if fallback:
            deployments.append({"provider": "simulated", "name": "steady"})
        keel = Keel(parse_config({
            "slo": {"error_rate": 0.01},
            "models": [{"name": "m", "retry": {"max_attempts": 1}, "breaker": {"failure_threshold": 1000},
                        "slo_guard": {"action": action, "window_s": 60, "min_calls": 3},
                        "deployments": deployments}],
        }))
        clock = Clock()
        for deployment in keel.deployments["m"]:
            assert deployment.slo is not None
            deployment.slo.clock = clock
        made.append(keel)
        return keel, clock

    yield make
    for keel in made:
        await keel.close()


async def test_a_deployment_breaking_the_slo_is_skipped_for_its_fallback_until_it_recovers(keel_of: Any) -> None:
    keel, clock = keel_of("fallback", True)
    for _ in range(3):  # each call fails on 'flaky', then 'steady' answers
        ctx = Context()
        await keel.handle(request(), ctx)
        assert [(a.deployment, a.error) for a in ctx.attempts] == [("flaky", "upstream_server_error"), ("steady", None)]
    clock.now += 1
    ctx = Context()
    await keel.handle(request(), ctx)
    # 'flaky' is not called at all: the attempt says why, and took no time.
    assert [(a.deployment, a.error) for a in ctx.attempts] == [("flaky", "slo_degraded"), ("steady", None)]
    assert ctx.attempts[0].ended == ctx.attempts[0].started
    metrics = keel.metrics.render()[0].decode()
    assert 'keel_slo_degraded{deployment="flaky"} 1.0' in metrics
    assert 'keel_slo_degraded{deployment="steady"} 0.0' in metrics
    assert 'keel_slo_diversions_total{deployment="flaky"} 1.0' in metrics
    clock.now += 61  # its failures have left the window: it is called again
    ctx = Context()
    await keel.handle(request(), ctx)
    assert [a.deployment for a in ctx.attempts] == ["flaky", "steady"]
    assert 'keel_slo_degraded{deployment="flaky"} 0.0' in keel.metrics.render()[0].decode()


async def test_shed_refuses_with_a_503_and_retry_after_when_no_deployment_is_healthy(keel_of: Any) -> None:
    keel, clock = keel_of("shed", False)
    await fail_three_calls(keel, clock)
    ctx = Context()
    with pytest.raises(SLOShed) as shed:
        await keel.handle(request(), ctx)
    error = shed.value
    assert error.status == 503 and error.code == "overloaded"
    assert "'flaky'" in error.message and "3 of its last 3 calls failed" in error.message
    assert error.headers() == {"retry-after": "59"}
    assert [(a.deployment, a.error) for a in ctx.attempts] == [("flaky", "slo_degraded")]


async def test_fallback_with_no_healthy_deployment_left_still_serves_from_the_degraded_one(keel_of: Any) -> None:
    keel, clock = keel_of("fallback", False)
    await fail_three_calls(keel, clock)
    ctx = Context()
    with pytest.raises(UpstreamServerError):  # tried, not refused: a last resort beats no answer
        await keel.handle(request(), ctx)
    assert [(a.deployment, a.error) for a in ctx.attempts] == [("flaky", "upstream_server_error")]


async def fail_three_calls(keel: Keel, clock: Clock) -> None:
    """Three calls that the only deployment fails: min_calls reached, every one failed."""
    for _ in range(3):
        with pytest.raises(UpstreamServerError):
            await keel.handle(request(), Context())
    clock.now += 1  # past the verdict's quarter-second cache


def test_off_is_the_default_and_builds_no_guard() -> None:
    keel = Keel(parse_config({"models": [{"name": "m", "deployments": [{"provider": "simulated"}]}]}))
    assert all(d.slo is None for group in keel.deployments.values() for d in group)
