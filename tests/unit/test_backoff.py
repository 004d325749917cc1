"""Backoff between attempts: full jitter within its bounds, Retry-After honoured and capped."""

from __future__ import annotations

import random
from typing import Any

import pytest
from tenacity import AsyncRetrying, RetryCallState, wait_fixed

from keel.config import RetryConfig
from keel.errors import UpstreamRateLimited, UpstreamServerError
from keel.reliability.backoff import BackoffWithRetryAfter


def state(attempt_number: int, error: BaseException | None = None) -> RetryCallState:
    retry_state = RetryCallState(retry_object=None, fn=None, args=(), kwargs={})  # type: ignore[arg-type]
    retry_state.attempt_number = attempt_number
    if error is not None:
        try:
            raise error
        except BaseException as exc:
            retry_state.set_exception((type(exc), exc, exc.__traceback__))
    return retry_state


@pytest.fixture(autouse=True)
def seeded() -> None:
    random.seed(1)  # tenacity's jitter draws from the module's generator: the same draws each run


def backoff(**config: Any) -> BackoffWithRetryAfter:
    return BackoffWithRetryAfter(RetryConfig(**config))


@pytest.mark.parametrize("attempt", [1, 2, 3, 4, 5, 8, 12, 20])
def test_full_jitter_stays_within_zero_and_the_exponential_ceiling(attempt: int) -> None:
    wait = backoff(initial_backoff_ms=100, max_backoff_ms=2000)
    ceiling = min(2.0, 0.1 * 2 ** (attempt - 1))
    waits = [wait(state(attempt, UpstreamServerError("503"))) for _ in range(2000)]
    assert all(0 <= w <= ceiling for w in waits)
    # Full jitter spreads over the whole range, not near its top: both ends are reached.
    assert min(waits) < ceiling * 0.05
    assert max(waits) > ceiling * 0.95


def test_the_ceiling_doubles_per_attempt_until_the_maximum() -> None:
    wait = backoff(initial_backoff_ms=10, max_backoff_ms=50)
    tops = [max(wait(state(n)) for _ in range(3000)) for n in (1, 2, 3, 4, 5)]
    assert tops[0] == pytest.approx(0.010, rel=0.02)
    assert tops[1] == pytest.approx(0.020, rel=0.02)
    assert tops[2] == pytest.approx(0.040, rel=0.02)
    assert tops[3] == pytest.approx(0.050, rel=0.02)
    assert tops[4] == pytest.approx(0.050, rel=0.02)


def test_zero_backoff_means_no_wait() -> None:
    wait = backoff(initial_backoff_ms=0, max_backoff_ms=0)
    assert wait(state(3, UpstreamServerError("503"))) == 0


def test_retry_after_is_honoured_when_longer_than_the_jitter() -> None:
    wait = backoff(initial_backoff_ms=1, max_backoff_ms=20)
    assert wait(state(1, UpstreamRateLimited("429", retry_after=1.5))) == 1.5


def test_retry_after_does_not_shorten_a_longer_backoff() -> None:
    wait = backoff(initial_backoff_ms=5000, max_backoff_ms=5000)
    waits = [wait(state(1, UpstreamRateLimited("429", retry_after=0.001))) for _ in range(200)]
    assert all(w >= 0.001 for w in waits)
    assert max(waits) > 1


def test_retry_after_is_capped_by_max_retry_after_s() -> None:
    wait = backoff(initial_backoff_ms=1, max_backoff_ms=20, max_retry_after_s=2)
    assert wait(state(1, UpstreamRateLimited("429", retry_after=3600))) == 2


def test_an_error_without_retry_after_gets_plain_jitter() -> None:
    wait = backoff(initial_backoff_ms=1, max_backoff_ms=20)
    assert wait(state(1, UpstreamRateLimited("429", retry_after=None))) <= 0.001


def test_a_huge_attempt_number_waits_the_maximum_without_overflowing() -> None:
    wait = backoff(initial_backoff_ms=100, max_backoff_ms=2000)
    assert 0 <= wait(state(10_000)) <= 2.0


async def test_tenacity_computes_the_wait_before_it_asks_the_stop_condition() -> None:
    """The reliability stage's deadline stop reads `upcoming_sleep`; that only means "the wait
    about to happen" if the installed tenacity runs the wait strategy first."""
    seen: list[float] = []

    def stop(retry_state: RetryCallState) -> bool:
        seen.append(retry_state.upcoming_sleep)
        return True

    with pytest.raises(ValueError):
        async for attempt in AsyncRetrying(stop=stop, wait=wait_fixed(7), reraise=True):
            with attempt:
                raise ValueError
    assert seen == [7]
