"""When the reliability stage makes another pass over a model's deployments, and how long it
waits first: tenacity's strategies, composed.

Another pass follows while the error is worth it (retryable, and not "every breaker is open"),
attempts remain, the wait before it (`backoff.py`) would end before the call's deadline, and at
least one deployment's breaker lets calls through by the end of that wait.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    stop_any,
    stop_before_delay,
)
from tenacity.stop import stop_base

from keel.errors import CircuitOpen, KeelError
from keel.pipeline import Call
from keel.providers.base import Deployment
from keel.reliability import events
from keel.reliability.backoff import BackoffWithRetryAfter


def retrying(call: Call) -> AsyncRetrying:
    """The retry loop of one call, set up after its first pass failed (from now on)."""
    deadline = call.ctx.deadline if call.ctx.deadline is not None else time.monotonic()
    return AsyncRetrying(
        # tenacity runs the wait strategy before the stop check, so both stops see the wait to come.
        stop=stop_any(
            stop_after_attempt(call.model.retry.max_attempts),
            stop_before_delay(deadline - time.monotonic()),
            StopWhenAllPaused(call.deployments),
        ),
        wait=BackoffWithRetryAfter(call.model.retry),
        retry=_WORTH_RETRYING,
        before_sleep=lambda state: events.retrying(call, state),
        reraise=True,
    )


class StopWhenAllPaused(stop_base):
    """Stop when every deployment's breaker stays open past the next wait: the next pass could
    call nobody (the usual case: this call's failures just opened the last one)."""

    def __init__(self, deployments: Sequence[Deployment]) -> None:
        self.deployments = deployments

    def __call__(self, retry_state: RetryCallState) -> bool:
        return all(d.breaker.retry_in() > retry_state.upcoming_sleep for d in self.deployments)


def _worth_retrying(error: BaseException) -> bool:
    return isinstance(error, KeelError) and error.retryable and not isinstance(error, CircuitOpen)


_WORTH_RETRYING = retry_if_exception(_worth_retrying)
