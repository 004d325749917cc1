"""How long to wait before the next attempt: tenacity's exponential backoff with full jitter,
or the upstream's Retry-After when it gave one (capped, so a hostile header cannot park a call)."""

from __future__ import annotations

from tenacity import RetryCallState, wait_random_exponential
from tenacity.wait import wait_base

from keel.config import RetryConfig


class BackoffWithRetryAfter(wait_base):
    """A tenacity wait strategy: full jitter (AWS architecture blog's "Full Jitter") between
    0 and min(max, initial * 2**(n-1)), raised to the upstream's Retry-After when it asked."""

    def __init__(self, config: RetryConfig) -> None:
        self.jitter = wait_random_exponential(
            multiplier=config.initial_backoff_ms / 1000, max=config.max_backoff_ms / 1000
        )
        self.retry_after_cap = config.max_retry_after_s

    def __call__(self, retry_state: RetryCallState) -> float:
        wait = self.jitter(retry_state)
        error = retry_state.outcome.exception() if retry_state.outcome is not None else None
        retry_after = getattr(error, "retry_after", None)
        if retry_after:
            wait = max(wait, min(float(retry_after), self.retry_after_cap))
        return wait
