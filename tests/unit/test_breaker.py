"""The circuit breaker: when it opens, how it probes, and what concurrent calls cannot undo."""

from __future__ import annotations

from keel.reliability.breaker import BreakerState, CircuitBreaker, Permit


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(threshold: int = 3, cooldown: float = 10.0) -> tuple[CircuitBreaker, Clock]:
    clock = Clock()
    return CircuitBreaker(failure_threshold=threshold, cooldown_s=cooldown, clock=clock), clock


def take(breaker: CircuitBreaker) -> Permit:
    permit = breaker.acquire()
    assert permit is not None
    return permit


def fail_times(breaker: CircuitBreaker, n: int) -> None:
    for _ in range(n):
        take(breaker).failure()


def open_breaker(threshold: int = 3, cooldown: float = 10.0) -> tuple[CircuitBreaker, Clock]:
    breaker, clock = make(threshold, cooldown)
    fail_times(breaker, threshold)
    assert breaker.state is BreakerState.OPEN
    return breaker, clock


def test_stays_closed_below_the_threshold() -> None:
    breaker, _ = make(threshold=3)
    fail_times(breaker, 2)
    assert breaker.state is BreakerState.CLOSED
    assert breaker.acquire() is not None


def test_opens_after_threshold_consecutive_failures() -> None:
    breaker, _ = make(threshold=3)
    fail_times(breaker, 3)
    assert breaker.state is BreakerState.OPEN
    assert breaker.acquire() is None


def test_a_success_resets_the_consecutive_count() -> None:
    breaker, _ = make(threshold=3)
    fail_times(breaker, 2)
    take(breaker).success()
    fail_times(breaker, 2)
    assert breaker.state is BreakerState.CLOSED


def test_refuses_calls_until_the_cooldown_has_passed() -> None:
    breaker, clock = open_breaker(cooldown=10.0)
    clock.now += 9.99
    assert breaker.acquire() is None
    assert 0 < breaker.retry_in() <= 0.011
    clock.now += 0.01
    assert breaker.retry_in() == 0.0
    assert breaker.acquire() is not None
    assert breaker.state is BreakerState.HALF_OPEN


def test_half_open_lets_exactly_one_probe_through() -> None:
    breaker, clock = open_breaker()
    clock.now += 10
    probe = breaker.acquire()
    assert probe is not None and probe.probe
    assert [breaker.acquire() for _ in range(5)] == [None] * 5
    assert breaker.state is BreakerState.HALF_OPEN


def test_probe_success_closes_the_breaker() -> None:
    breaker, clock = open_breaker()
    clock.now += 10
    take(breaker).success()
    assert breaker.state is BreakerState.CLOSED
    assert breaker.failures == 0
    permits = [breaker.acquire() for _ in range(5)]
    assert all(p is not None and not p.probe for p in permits)


def test_probe_failure_reopens_for_a_whole_new_cooldown() -> None:
    breaker, clock = open_breaker(cooldown=10.0)
    clock.now += 15
    take(breaker).failure()
    assert breaker.state is BreakerState.OPEN
    assert breaker.opened_at == clock.now
    clock.now += 9.9
    assert breaker.acquire() is None
    clock.now += 0.1
    assert breaker.acquire() is not None


def test_a_released_probe_lets_the_next_call_probe() -> None:
    breaker, clock = open_breaker()
    clock.now += 10
    take(breaker).release()  # the probing call was cancelled: no verdict
    assert breaker.state is BreakerState.HALF_OPEN
    second = breaker.acquire()
    assert second is not None and second.probe
    assert breaker.acquire() is None


def test_only_the_first_verdict_of_a_permit_counts() -> None:
    breaker, _ = make(threshold=2)
    permit = take(breaker)
    permit.failure()
    permit.failure()
    permit.failure()
    assert breaker.state is BreakerState.CLOSED
    assert breaker.failures == 1


def test_failures_of_calls_in_flight_when_it_opened_do_not_stretch_the_cooldown() -> None:
    breaker, clock = make(threshold=3, cooldown=10.0)
    in_flight = [take(breaker) for _ in range(10)]
    for permit in in_flight[:3]:
        permit.failure()
    opened_at = breaker.opened_at
    clock.now += 5
    for permit in in_flight[3:]:
        permit.failure()
    assert breaker.opened_at == opened_at
    clock.now += 5
    assert breaker.acquire() is not None


def test_a_stale_success_does_not_close_the_breaker_behind_the_probe() -> None:
    breaker, clock = make(threshold=3, cooldown=10.0)
    slow = take(breaker)  # started while closed, answers much later
    fail_times(breaker, 3)
    clock.now += 10
    probe = take(breaker)
    slow.success()
    assert breaker.state is BreakerState.HALF_OPEN
    assert breaker.acquire() is None
    probe.failure()
    assert breaker.state is BreakerState.OPEN


def test_a_stale_failure_does_not_reopen_a_closed_breaker() -> None:
    breaker, clock = make(threshold=1, cooldown=10.0)
    slow = take(breaker)
    take(breaker).failure()
    clock.now += 10
    take(breaker).success()
    assert breaker.state is BreakerState.CLOSED
    slow.failure()
    assert breaker.state is BreakerState.CLOSED
