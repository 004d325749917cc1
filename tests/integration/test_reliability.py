"""The reliability stage in-process (`keel.engine.Keel`) against fake OpenAI upstreams over HTTP:
retries, fallbacks, deadlines, per-attempt timeouts, streams and breakers, counted on the fakes.

Nothing here asserts how fast a busy machine is. A limit is shown to work by a lower bound (a
timer never fires early) and by what could only have ended the call: the upstream hangs for an
hour, or retries would go on for a minute, so finishing within `within`'s safety net at all means
the limit cut it. Breaker cooldowns pass on a clock the test moves (`Clock`).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, TypeVar

import pytest

from keel.engine import Keel
from keel.errors import (
    CircuitOpen,
    Overloaded,
    StreamStalled,
    UpstreamBadRequest,
    UpstreamConnectionError,
    UpstreamRateLimited,
    UpstreamServerError,
    UpstreamTimeout,
)
from keel.pipeline import ChunkStream, Completion, Context
from keel.reliability.breaker import BreakerState, CircuitBreaker
from keel.server.responses import error_parts
from keel.testing.fake_openai import FakeBehaviour, FakeOpenAIServer
from keel.types import ChatCompletionChunk, ChatRequest

MESSAGES = [{"role": "user", "content": "hello there"}]
FAST_RETRY = {"initial_backoff_ms": 1, "max_backoff_ms": 5}

FakeFactory = Callable[..., FakeOpenAIServer]


@pytest.fixture
def fakes() -> Iterator[FakeFactory]:
    """Start fake upstreams in threads: `fake = fakes(fail_rate=1.0)`."""
    started: list[FakeOpenAIServer] = []

    def start(**behaviour: Any) -> FakeOpenAIServer:
        server = FakeOpenAIServer(FakeBehaviour(**behaviour)).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def deployment(fake: FakeOpenAIServer, name: str) -> dict[str, Any]:
    return {"provider": "openai", "name": name, "base_url": fake.url, "model": "gpt-4o-mini"}


async def call(keel: Keel, *, stream: bool = False, ctx: Context | None = None) -> Completion | ChunkStream:
    request = ChatRequest.model_validate({"model": "m", "messages": MESSAGES, "stream": stream})
    return await keel.handle(request, ctx or Context())


def requests_seen(fake: FakeOpenAIServer) -> int:
    return fake.fake.stats.requests


SAFETY_NET_S = 5.0  # far above any limit under test, far below what its absence would take


T = TypeVar("T")


async def within(awaitable: Awaitable[T]) -> T:
    return await asyncio.wait_for(awaitable, SAFETY_NET_S)


class Clock:
    """A breaker's clock that moves only when the test moves it."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def breaker_on_clock(keel: Keel, clock: Clock, **settings: Any) -> CircuitBreaker:
    """Give model m's first deployment a breaker timed by `clock`."""
    breaker = CircuitBreaker(clock=clock, **settings)
    keel.deployments["m"][0].breaker = breaker
    return breaker


def retry_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "keel.reliability" and "retrying in" in r.getMessage()]


# ---------------------------------------------------------------------------- what is retried, how often


async def test_a_bad_request_is_attempted_exactly_once_and_never_falls_back(
    fakes: FakeFactory, keel_for: Callable[..., Keel]
) -> None:
    primary, fallback = fakes(fail_rate=1.0, fail_status=400), fakes()
    keel = keel_for(deployment(primary, "a"), deployment(fallback, "b"), retry={"max_attempts": 5, **FAST_RETRY})
    with pytest.raises(UpstreamBadRequest) as caught:
        await keel.chat(model="m", messages=MESSAGES)
    assert caught.value.status == 400
    assert caught.value.deployment == "a"
    assert requests_seen(primary) == 1
    assert requests_seen(fallback) == 0
    assert keel.deployments["m"][0].breaker.failures == 0  # the upstream answered; the request was wrong


async def test_retries_stop_at_max_attempts(fakes: FakeFactory, keel_for: Callable[..., Keel]) -> None:
    fake = fakes(fail_rate=1.0, fail_status=503)
    keel = keel_for(deployment(fake, "a"), retry={"max_attempts": 4, **FAST_RETRY}, breaker={"failure_threshold": 20})
    ctx = Context()
    with pytest.raises(UpstreamServerError) as caught:
        await call(keel, ctx=ctx)
    assert caught.value.upstream_status == 503
    assert requests_seen(fake) == 4
    assert [a.error for a in ctx.attempts] == ["upstream_server_error"] * 4


async def test_a_flaky_upstream_is_retried_until_it_answers(fakes: FakeFactory, keel_for: Callable[..., Keel]) -> None:
    fake = fakes(fail_first=3, fail_status=503)
    keel = keel_for(deployment(fake, "a"), retry={"max_attempts": 4, **FAST_RETRY})
    reply = await keel.chat(model="m", messages=MESSAGES)
    assert reply.choices[0].message.content == "echo: hello there"  # type: ignore[union-attr]
    assert requests_seen(fake) == 4


async def test_fallback_follows_the_configured_order(fakes: FakeFactory, keel_for: Callable[..., Keel]) -> None:
    first, second, third = fakes(fail_rate=1.0), fakes(fail_rate=1.0, fail_status=500), fakes(model="third")
    keel = keel_for(
        deployment(first, "first"), deployment(second, "second"), deployment(third, "third"),
        retry={"max_attempts": 1},
    )
    ctx = Context()
    reply = await call(keel, ctx=ctx)
    assert isinstance(reply, Completion)
    assert reply.body["model"] == "third"
    assert [(a.deployment, a.error) for a in ctx.attempts] == [
        ("first", "upstream_server_error"), ("second", "upstream_server_error"), ("third", None),
    ]
    assert ctx.deployment == "third"


async def test_each_retry_pass_walks_the_deployments_in_order(
    fakes: FakeFactory, keel_for: Callable[..., Keel]
) -> None:
    first, second = fakes(fail_rate=1.0), fakes(fail_rate=1.0)
    keel = keel_for(
        deployment(first, "first"), deployment(second, "second"),
        retry={"max_attempts": 3, **FAST_RETRY}, breaker={"failure_threshold": 20},
    )
    ctx = Context()
    with pytest.raises(UpstreamServerError) as caught:
        await call(keel, ctx=ctx)
    assert caught.value.deployment == "second"  # the last failure is the one reported
    assert [a.deployment for a in ctx.attempts] == ["first", "second"] * 3
    assert (requests_seen(first), requests_seen(second)) == (3, 3)


async def test_rate_limit_retry_after_is_waited_out(
    fakes: FakeFactory, keel_for: Callable[..., Keel], caplog: pytest.LogCaptureFixture
) -> None:
    fake = fakes(fail_first=1, fail_status=429, retry_after=0.5)
    keel = keel_for(deployment(fake, "a"), retry={"max_attempts": 2, **FAST_RETRY})
    ctx = Context()
    with caplog.at_level(logging.INFO, logger="keel.reliability"):
        await call(keel, ctx=ctx)
    [line] = retry_lines(caplog)
    assert line.endswith("retrying in 0.50 s")  # the Retry-After itself, not the 1-5 ms backoff
    assert ctx.attempts[1].started - (ctx.attempts[0].ended or 0) >= 0.5
    assert requests_seen(fake) == 2


# ---------------------------------------------------------------------------- deadlines and timeouts


async def test_the_whole_call_deadline_includes_retries_and_backoff(
    fakes: FakeFactory, keel_for: Callable[..., Keel]
) -> None:
    fake = fakes(fail_rate=1.0, latency_ms=20)
    keel = keel_for(  # 20 attempts take at least 0.4 s of latency plus ~0.9 s of backoff
        deployment(fake, "a"), timeout_s=0.5,
        retry={"max_attempts": 20, "initial_backoff_ms": 50, "max_backoff_ms": 100},
        breaker={"failure_threshold": 20},
    )
    ctx = Context()
    # Either the next wait would have ended past the deadline (the last 503 is reported), or
    # the last attempt was still running at the deadline and was cut there.
    with pytest.raises((UpstreamServerError, UpstreamTimeout)):
        await within(call(keel, ctx=ctx))
    assert ctx.deadline is not None
    # It stopped only when the next wait (at most 100 ms) would have ended past the deadline.
    assert time.monotonic() >= ctx.deadline - 0.1
    assert 2 < len(ctx.attempts) < 20  # the deadline ended it, not max_attempts
    # The last attempt may have been cut by the deadline before its request reached the fake.
    assert len(ctx.attempts) - 1 <= requests_seen(fake) <= len(ctx.attempts)


async def test_a_retry_after_beyond_the_deadline_fails_now_instead_of_waiting(
    fakes: FakeFactory, keel_for: Callable[..., Keel]
) -> None:
    fake = fakes(fail_rate=1.0, fail_status=429, retry_after=60)
    keel = keel_for(  # waiting out the Retry-After would take a minute, far past the safety net
        deployment(fake, "a"), timeout_s=30, retry={"max_attempts": 3, "max_retry_after_s": 60, **FAST_RETRY}
    )
    with pytest.raises(UpstreamRateLimited) as caught:
        await within(keel.chat(model="m", messages=MESSAGES))
    assert caught.value.retry_after == 60
    assert caught.value.headers() == {"retry-after": "60"}
    assert requests_seen(fake) == 1


async def test_a_hanging_upstream_is_cut_at_the_deadline(fakes: FakeFactory, keel_for: Callable[..., Keel]) -> None:
    fake = fakes(hang=True)  # for an hour: only the deadline can end the call
    keel = keel_for(deployment(fake, "a"), timeout_s=0.6, retry=FAST_RETRY)
    ctx = Context()
    with pytest.raises(UpstreamTimeout) as caught:
        await within(call(keel, ctx=ctx))
    assert time.monotonic() - ctx.started >= 0.6
    assert caught.value.status == 504 and caught.value.code == "timeout"
    assert "timeout_s = 0.6 s" in caught.value.message
    assert len(ctx.attempts) == 1


async def test_per_attempt_timeouts_leave_room_for_retries_within_the_deadline(
    fakes: FakeFactory, keel_for: Callable[..., Keel]
) -> None:
    fake = fakes(hang=True)
    keel = keel_for(  # without the deadline, 20 attempts of 0.2 s
        deployment(fake, "a"), timeout_s=0.7, attempt_timeout_s=0.2,
        retry={"max_attempts": 20, **FAST_RETRY}, breaker={"failure_threshold": 20},
    )
    ctx = Context()
    with pytest.raises(UpstreamTimeout):
        await within(call(keel, ctx=ctx))
    # Each attempt but the last was cut by its own limit, so at most 4 fit: 0.2 + 0.2 + 0.2 + what
    # was left of the 0.7 (fewer only when the machine was late to start them).
    assert 2 <= len(ctx.attempts) <= 4
    assert all(a.error == "timeout" for a in ctx.attempts)
    assert all(a.ended is not None and a.ended - a.started >= 0.19 for a in ctx.attempts[:-1])
    assert ctx.deadline is not None and time.monotonic() >= ctx.deadline - 0.005  # within the last backoff


async def test_a_slow_deployment_times_out_per_attempt_and_falls_back(
    fakes: FakeFactory, keel_for: Callable[..., Keel]
) -> None:
    slow, fast = fakes(hang=True), fakes(model="fast")
    keel = keel_for(deployment(slow, "slow"), deployment(fast, "fast"), attempt_timeout_s=0.2)
    ctx = Context()
    reply = await within(call(keel, ctx=ctx))
    assert isinstance(reply, Completion) and reply.body["model"] == "fast"
    assert [(a.deployment, a.error) for a in ctx.attempts] == [("slow", "timeout"), ("fast", None)]
    slow_attempt = ctx.attempts[0]
    assert slow_attempt.ended is not None and slow_attempt.ended - slow_attempt.started >= 0.19


# ---------------------------------------------------------------------------- streams


async def collect(stream: AsyncIterator[ChatCompletionChunk]) -> str:
    return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])


async def test_a_stream_failing_before_its_first_chunk_is_retried_into_a_full_stream(
    fakes: FakeFactory, keel_for: Callable[..., Keel]
) -> None:
    fake = fakes(fail_first=2, fail_status=503)
    keel = keel_for(deployment(fake, "a"), retry={"max_attempts": 3, **FAST_RETRY})
    stream = await keel.chat(model="m", messages=MESSAGES, stream=True)
    assert await collect(stream) == "echo: hello there"  # type: ignore[arg-type]
    assert requests_seen(fake) == 3


async def test_a_stream_slow_to_its_first_chunk_falls_back(fakes: FakeFactory, keel_for: Callable[..., Keel]) -> None:
    slow, fast = fakes(hang=True), fakes()
    keel = keel_for(deployment(slow, "slow"), deployment(fast, "fast"), first_chunk_timeout_s=0.2)
    ctx = Context()
    reply = await within(call(keel, stream=True, ctx=ctx))
    assert isinstance(reply, ChunkStream)
    async for _ in reply:
        pass
    assert "".join(reply.content) == "echo: hello there"
    assert [(a.deployment, a.error) for a in ctx.attempts] == [("slow", "timeout"), ("fast", None)]
    assert ctx.first_chunk_at is not None and ctx.first_chunk_at - ctx.started >= 0.2


async def test_a_stall_after_the_first_chunk_ends_the_stream_at_the_gap_timeout(
    fakes: FakeFactory, keel_for: Callable[..., Keel]
) -> None:
    fake = fakes(stall_after=3)  # silent for an hour after three pieces
    keel = keel_for(deployment(fake, "a"), chunk_gap_timeout_s=0.3, retry={"max_attempts": 3, **FAST_RETRY})
    ctx = Context()
    reply = await call(keel, stream=True, ctx=ctx)
    assert isinstance(reply, ChunkStream)
    received, last_chunk_at = 0, time.monotonic()

    async def read() -> None:
        nonlocal received, last_chunk_at
        async for _ in reply:
            received, last_chunk_at = received + 1, time.monotonic()

    with pytest.raises(StreamStalled) as caught:
        await within(read())
    assert time.monotonic() - last_chunk_at >= 0.3
    assert received == 4  # the role chunk and three pieces
    assert caught.value.code == "stream_stalled" and "chunk_gap_timeout_s" in caught.value.message
    assert requests_seen(fake) == 1  # after the first chunk there is no retry
    assert reply.error is caught.value  # finalisers saw why it ended
    assert [(a.deployment, a.error) for a in ctx.attempts] == [("a", "stream_stalled")]


async def test_a_stream_cut_mid_way_is_an_error_not_a_short_answer(
    fakes: FakeFactory, keel_for: Callable[..., Keel]
) -> None:
    fake = fakes(cut_after=2)
    keel = keel_for(deployment(fake, "a"), retry={"max_attempts": 3, **FAST_RETRY})
    stream = await keel.chat(model="m", messages=MESSAGES, stream=True)
    with pytest.raises(UpstreamConnectionError):
        await collect(stream)  # type: ignore[arg-type]
    assert requests_seen(fake) == 1


async def test_the_deadline_ends_a_stream_that_is_still_going(
    fakes: FakeFactory, keel_for: Callable[..., Keel]
) -> None:
    fake = fakes(chunks=5000, chunk_delay_ms=20)  # 100 s of chunks, never a gap of 0.3 s
    keel = keel_for(deployment(fake, "a"), timeout_s=0.4, chunk_gap_timeout_s=0.3)
    ctx = Context()
    reply = await call(keel, stream=True, ctx=ctx)
    assert isinstance(reply, ChunkStream)

    async def read() -> None:
        async for _ in reply:
            pass

    with pytest.raises(UpstreamTimeout) as caught:
        await within(read())
    assert not isinstance(caught.value, StreamStalled)
    assert "timeout_s = 0.4 s" in caught.value.message
    assert time.monotonic() - ctx.started >= 0.4


# ---------------------------------------------------------------------------- the record of attempts


async def test_ctx_attempts_records_every_attempt_in_order_with_its_outcome(
    fakes: FakeFactory, keel_for: Callable[..., Keel]
) -> None:
    first, second = fakes(fail_first=2, fail_status=502), fakes(hang=True)
    keel = keel_for(
        deployment(first, "first"), deployment(second, "second"),
        attempt_timeout_s=0.1, retry={"max_attempts": 3, **FAST_RETRY},
    )
    ctx = Context()
    await call(keel, ctx=ctx)
    assert [(a.deployment, a.error) for a in ctx.attempts] == [
        ("first", "upstream_server_error"), ("second", "timeout"),
        ("first", "upstream_server_error"), ("second", "timeout"),
        ("first", None),
    ]
    assert ctx.deployment == "first"
    for earlier, later in zip(ctx.attempts, ctx.attempts[1:], strict=False):
        assert earlier.started <= earlier.ended <= later.started


# ---------------------------------------------------------------------------- circuit breakers


async def test_an_open_breaker_stops_calls_to_its_deployment(
    fakes: FakeFactory, keel_for: Callable[..., Keel]
) -> None:
    primary, fallback = fakes(fail_rate=1.0), fakes(model="fallback")
    keel = keel_for(
        deployment(primary, "primary"), deployment(fallback, "fallback"),
        breaker={"failure_threshold": 3, "cooldown_s": 60},
    )
    for _ in range(10):
        reply = await keel.chat(model="m", messages=MESSAGES)
        assert reply.model == "fallback"  # type: ignore[union-attr]
    assert requests_seen(primary) == 3
    assert keel.deployments["m"][0].breaker.state is BreakerState.OPEN


async def test_a_single_open_deployment_fails_fast_without_retrying(
    fakes: FakeFactory, keel_for: Callable[..., Keel]
) -> None:
    fake = fakes(fail_rate=1.0)
    keel = keel_for(  # a backoff of a minute: waiting it would overrun the safety net
        deployment(fake, "a"), retry={"max_attempts": 2, "initial_backoff_ms": 60_000, "max_backoff_ms": 60_000},
        timeout_s=600,
    )
    breaker_on_clock(keel, Clock(), failure_threshold=1, cooldown_s=60)
    with pytest.raises(UpstreamServerError):  # its own failure opened the breaker: that is the news
        await within(keel.chat(model="m", messages=MESSAGES))
    with pytest.raises(CircuitOpen) as caught:
        await within(keel.chat(model="m", messages=MESSAGES))
    assert caught.value.status == 503 and "'a' for 60.0 s more" in caught.value.message
    assert requests_seen(fake) == 1


async def test_concurrent_failures_open_the_breaker_once_and_a_probe_closes_it(
    fakes: FakeFactory, keel_for: Callable[..., Keel]
) -> None:
    primary, fallback = fakes(fail_rate=1.0, latency_ms=50), fakes(model="fallback")
    keel = keel_for(deployment(primary, "primary"), deployment(fallback, "fallback"), retry={"max_attempts": 1})
    clock = Clock()
    breaker = breaker_on_clock(keel, clock, failure_threshold=3, cooldown_s=0.3)
    # All 20 calls take their permits in the loop's first turn, before any answer can come back.
    replies = await asyncio.gather(*(keel.chat(model="m", messages=MESSAGES) for _ in range(20)))
    assert {r.model for r in replies} == {"fallback"}  # type: ignore[union-attr]
    assert requests_seen(primary) == 20  # all were in flight before the first failure came back
    assert breaker.state is BreakerState.OPEN
    opened_at = breaker.opened_at
    await keel.chat(model="m", messages=MESSAGES)
    assert requests_seen(primary) == 20
    assert breaker.opened_at == opened_at  # the 17 late failures did not stretch the cooldown

    primary.fake.configure_from({"fail_rate": 0.0, "latency_ms": 200})
    clock.now += 1  # the cooldown (0.3 s) has passed
    replies = await asyncio.gather(*(keel.chat(model="m", messages=MESSAGES) for _ in range(5)))
    assert requests_seen(primary) == 21  # exactly one probe went through
    assert sorted(r.model for r in replies) == ["fallback"] * 4 + ["gpt-4o-mini-2024-07-18"]  # type: ignore[union-attr]
    assert breaker.state is BreakerState.CLOSED


async def test_a_cancelled_probe_does_not_leave_the_breaker_stuck(
    fakes: FakeFactory, keel_for: Callable[..., Keel]
) -> None:
    fake = fakes(fail_rate=1.0)
    keel = keel_for(deployment(fake, "a"), retry={"max_attempts": 1})
    clock = Clock()
    breaker = breaker_on_clock(keel, clock, failure_threshold=1, cooldown_s=0.1)
    with pytest.raises(UpstreamServerError):
        await keel.chat(model="m", messages=MESSAGES)
    fake.fake.configure_from({"fail_rate": 0.0, "hang": True})
    clock.now += 1  # past the cooldown
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(keel.chat(model="m", messages=MESSAGES), 0.1)  # the probe, abandoned
    assert breaker.state is BreakerState.HALF_OPEN
    fake.fake.configure_from({"hang": False})
    await keel.chat(model="m", messages=MESSAGES)  # the next call may probe, and closes it
    assert breaker.state is BreakerState.CLOSED


async def test_a_stream_abandoned_after_its_first_chunk_frees_the_probe(
    fakes: FakeFactory, keel_for: Callable[..., Keel]
) -> None:
    fake = fakes(fail_rate=1.0)
    keel = keel_for(deployment(fake, "a"), retry={"max_attempts": 1})
    clock = Clock()
    breaker = breaker_on_clock(keel, clock, failure_threshold=1, cooldown_s=0.1)
    with pytest.raises(UpstreamServerError):
        await keel.chat(model="m", messages=MESSAGES)
    fake.fake.configure_from({"fail_rate": 0.0})
    clock.now += 1  # past the cooldown
    stream = await keel.chat(model="m", messages=MESSAGES, stream=True)
    await stream.__anext__()  # type: ignore[union-attr]
    await stream.aclose()  # type: ignore[union-attr]
    assert breaker.state is BreakerState.HALF_OPEN
    stream = await keel.chat(model="m", messages=MESSAGES, stream=True)
    assert await collect(stream) == "echo: hello there"  # type: ignore[arg-type]
    assert breaker.state is BreakerState.CLOSED


async def test_a_stream_failing_mid_way_counts_against_its_breaker(
    fakes: FakeFactory, keel_for: Callable[..., Keel]
) -> None:
    fake = fakes(cut_after=1)
    keel = keel_for(deployment(fake, "a"), breaker={"failure_threshold": 2, "cooldown_s": 60})
    for _ in range(2):
        stream = await keel.chat(model="m", messages=MESSAGES, stream=True)
        with pytest.raises(UpstreamConnectionError):
            await collect(stream)  # type: ignore[arg-type]
    assert keel.deployments["m"][0].breaker.state is BreakerState.OPEN


# ---------------------------------------------------------------------------- a full local queue (overloaded)


class QueueFull:
    """A deployment's provider whose queue is full for its first `times` calls (as the embedded
    model's is), after which the wrapped provider answers."""

    def __init__(self, inner: Any, name: str, times: int, retry_after: float) -> None:
        self.inner, self.name, self.times, self.retry_after = inner, name, times, retry_after
        self.refused = 0

    async def start(self) -> None:
        await self.inner.start()

    async def close(self) -> None:
        await self.inner.close()

    async def chat(self, request: ChatRequest, call: Any) -> Any:
        if self.refused < self.times:
            self.refused += 1
            raise Overloaded(f"the queue of '{self.name}' is full", retry_after=self.retry_after, deployment=self.name)
        return await self.inner.chat(request, call)

    async def embed(self, request: Any, call: Any) -> Any:
        return await self.inner.embed(request, call)


def queue_full(keel: Keel, index: int, times: int, retry_after: float) -> QueueFull:
    dep = keel.deployments["m"][index]
    dep.provider = QueueFull(dep.provider, dep.name, times, retry_after)
    return dep.provider


async def test_an_overloaded_deployment_hands_the_call_to_the_next_one_at_once(
    fakes: FakeFactory, keel_for: Callable[..., Keel]
) -> None:
    primary, spare = fakes(), fakes(model="spare")
    keel = keel_for(deployment(primary, "a"), deployment(spare, "b"), retry={"max_attempts": 3, **FAST_RETRY})
    full = queue_full(keel, 0, times=1, retry_after=30)
    ctx = Context()
    reply = await call(keel, ctx=ctx)
    assert isinstance(reply, Completion) and reply.body["model"] == "spare"
    assert [(a.deployment, a.error) for a in ctx.attempts] == [("a", "overloaded"), ("b", None)]
    assert full.refused == 1 and requests_seen(spare) == 1
    assert ctx.attempts[1].started - (ctx.attempts[0].ended or 0) < 5  # its 30 s Retry-After was not waited
    assert keel.deployments["m"][0].breaker.failures == 0  # a full queue is not a broken deployment


async def test_an_overloaded_deployment_is_retried_after_its_retry_after(
    fakes: FakeFactory, keel_for: Callable[..., Keel]
) -> None:
    fake = fakes()
    keel = keel_for(deployment(fake, "a"), timeout_s=10, retry={"max_attempts": 3, **FAST_RETRY})
    queue_full(keel, 0, times=1, retry_after=0.3)
    ctx = Context()
    reply = await call(keel, ctx=ctx)
    assert isinstance(reply, Completion)
    assert [a.error for a in ctx.attempts] == ["overloaded", None]
    assert ctx.attempts[1].started - (ctx.attempts[0].ended or 0) >= 0.3  # waited at least the Retry-After
    assert requests_seen(fake) == 1


async def test_overloaded_past_the_deadline_is_answered_429_at_once_and_clients_are_told_not_to_retry(
    fakes: FakeFactory, keel_for: Callable[..., Keel]
) -> None:
    keel = keel_for(deployment(fakes(), "a"), timeout_s=2, retry={"max_attempts": 3, **FAST_RETRY})
    full = queue_full(keel, 0, times=99, retry_after=5)
    with pytest.raises(Overloaded) as caught:
        await keel.chat(model="m", messages=MESSAGES)
    assert full.refused == 1  # a 5 s wait would end past the 2 s deadline: not started
    status, headers, _ = error_parts(caught.value)
    assert status == 429 and headers == {"retry-after": "5", "x-should-retry": "false"}


# ---------------------------------------------------------------------------- what clients are told


async def test_the_library_keeps_circuit_opens_retry_after_while_the_gateway_sends_no_retry_after(
    fakes: FakeFactory, keel_for: Callable[..., Keel]
) -> None:
    fake = fakes(fail_rate=1.0)
    keel = keel_for(deployment(fake, "a"), retry={"max_attempts": 1})
    breaker_on_clock(keel, Clock(), failure_threshold=1, cooldown_s=60)
    with pytest.raises(UpstreamServerError) as failed:
        await keel.chat(model="m", messages=MESSAGES)
    with pytest.raises(CircuitOpen) as paused:
        await keel.chat(model="m", messages=MESSAGES)
    assert paused.value.retry_after == 60
    assert error_parts(paused.value)[1] == {"x-should-retry": "false"}
    assert error_parts(failed.value)[1] == {"x-should-retry": "false"}
    assert requests_seen(fake) == 1


# ---------------------------------------------------------------------------- what the log says


def reliability_lines(caplog: pytest.LogCaptureFixture, request_id: str) -> list[tuple[int, str]]:
    return [(r.levelno, r.getMessage()) for r in caplog.records
            if r.name == "keel.reliability" and r.getMessage().startswith(f"request {request_id}: ")]


async def test_a_fallback_is_logged_with_the_request_id_the_deployment_and_the_error(
    fakes: FakeFactory, keel_for: Callable[..., Keel], caplog: pytest.LogCaptureFixture
) -> None:
    primary, spare = fakes(fail_rate=1.0, fail_status=503), fakes()
    keel = keel_for(deployment(primary, "a"), deployment(spare, "b"), retry={"max_attempts": 1})
    ctx = Context()
    with caplog.at_level(logging.INFO, logger="keel.reliability"):
        await call(keel, ctx=ctx)
    [(level, line)] = reliability_lines(caplog, ctx.request_id)
    assert level == logging.WARNING
    assert "falling back to deployment 'b' after 'a' failed: upstream_server_error:" in line
    assert "answered 503" in line


async def test_a_retry_is_logged_with_the_attempt_the_error_and_the_wait(
    fakes: FakeFactory, keel_for: Callable[..., Keel], caplog: pytest.LogCaptureFixture
) -> None:
    fake = fakes(fail_first=1, fail_status=502)
    keel = keel_for(deployment(fake, "a"), retry={"max_attempts": 3, **FAST_RETRY})
    ctx = Context()
    with caplog.at_level(logging.INFO, logger="keel.reliability"):
        await call(keel, ctx=ctx)
    [(level, line)] = reliability_lines(caplog, ctx.request_id)
    assert level == logging.WARNING
    assert re.search(r"model 'm': attempt 1 of 3 failed \(deployment 'a': upstream_server_error: .*\); "
                     r"retrying in \d+\.\d\d s$", line), line


async def test_breaker_changes_are_logged_with_the_call_that_caused_them(
    fakes: FakeFactory, keel_for: Callable[..., Keel], caplog: pytest.LogCaptureFixture
) -> None:
    fake = fakes(fail_first=1, fail_status=503)
    keel = keel_for(deployment(fake, "a"), retry={"max_attempts": 1})
    clock = Clock()
    breaker_on_clock(keel, clock, failure_threshold=1, cooldown_s=10)
    first, second = Context(), Context()
    with caplog.at_level(logging.INFO, logger="keel.reliability"):
        with pytest.raises(UpstreamServerError):
            await call(keel, ctx=first)
        clock.now += 11  # the cooldown has passed: the next call is the probe
        await call(keel, ctx=second)
    [(level, opened)] = reliability_lines(caplog, first.request_id)
    assert level == logging.WARNING
    assert "circuit breaker of deployment 'a' opened: 1 consecutive failures (last: upstream_server_error:" in opened
    assert opened.endswith("it is skipped for 10 s")
    prefix = f"request {second.request_id}: circuit breaker of deployment 'a'"
    assert reliability_lines(caplog, second.request_id) == [
        (logging.INFO, f"{prefix} half-open: this call is its probe"),
        (logging.INFO, f"{prefix} closed: its probe succeeded"),
    ]
