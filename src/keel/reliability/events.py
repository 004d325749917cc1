"""Log lines for what the reliability stage does behind a call's back: fallbacks, retries and
circuit breaker changes, each naming the request id, the deployment and the error, so an
operator reading the gateway's log sees why a call was slow or answered by a fallback.

Lines start with `request <id>:` like the gateway's own, so one grep finds a call's story.
"""

from __future__ import annotations

import logging

from tenacity import RetryCallState

from keel.errors import KeelError
from keel.pipeline import Call
from keel.providers.base import Deployment
from keel.reliability.breaker import BreakerState

log = logging.getLogger("keel.reliability")


def fallback(call: Call, failed: KeelError, to: Deployment) -> None:
    log.warning(
        "request %s: falling back to deployment '%s' after '%s' failed: %s: %s",
        call.ctx.request_id, to.name, failed.deployment, failed.code, failed.message,
    )


def retrying(call: Call, state: RetryCallState) -> None:
    """tenacity's `before_sleep`: a pass over the deployments failed and another follows."""
    error = state.outcome.exception() if state.outcome is not None else None
    wait = state.next_action.sleep if state.next_action is not None else 0.0
    what = f"{error.code}: {error.message}" if isinstance(error, KeelError) else repr(error)
    log.warning(
        "request %s: model '%s': attempt %d of %d failed (deployment '%s': %s); retrying in %.2f s",
        call.ctx.request_id, call.model.name, state.attempt_number, call.model.retry.max_attempts,
        getattr(error, "deployment", None), what, wait,
    )


def breaker_moved(call: Call, deployment: Deployment, before: BreakerState, outcome: BaseException | None) -> None:
    """Say so when the breaker of `deployment` changed state during this call's step."""
    breaker = deployment.breaker
    after = breaker.state
    if after is before:
        return
    rid, name = call.ctx.request_id, deployment.name
    if after is BreakerState.OPEN:
        why = "its probe failed" if before is BreakerState.HALF_OPEN else (
            f"{breaker.failure_threshold} consecutive failures")
        last = f"{outcome.code}: {outcome.message}" if isinstance(outcome, KeelError) else repr(outcome)
        log.warning(
            "request %s: circuit breaker of deployment '%s' opened: %s (last: %s); it is skipped for %g s",
            rid, name, why, last, breaker.cooldown_s,
        )
    elif after is BreakerState.HALF_OPEN:
        log.info("request %s: circuit breaker of deployment '%s' half-open: this call is its probe", rid, name)
    else:
        log.info("request %s: circuit breaker of deployment '%s' closed: its probe succeeded", rid, name)

