"""How long to wait before the next attempt: exponential backoff with full jitter, or the
upstream's Retry-After when it gave one (capped, so a hostile header cannot park a call)."""

from __future__ import annotations

import random

from tenacity import RetryCallState

from keel.config import RetryConfig

_RNG = random.Random()  # one per process: seeding a new one per call costs an os.urandom read


class BackoffWithRetryAfter:
    """A tenacity wait strategy: full jitter (AWS architecture blog's "Full Jitter") between
    0 and min(max, initial * 2**(n-1)), raised to the upstream's Retry-After when it asked."""

    def __init__(self, config: RetryConfig, rng: random.Random | None = None) -> None:
        self.initial = config.initial_backoff_ms / 1000
        self.maximum = config.max_backoff_ms / 1000
        self.retry_after_cap = config.max_retry_after_s
        self.rng = rng if rng is not None else _RNG

    def __call__(self, state: RetryCallState) -> float:
        # Bound the exponent: 2**n overflows a float long before max_attempts could get there.
        ceiling = min(self.maximum, self.initial * 2.0 ** min(state.attempt_number - 1, 64))
        wait = self.rng.uniform(0, ceiling)
        error = state.outcome.exception() if state.outcome is not None else None
        retry_after = getattr(error, "retry_after", None)
        if retry_after:
            wait = max(wait, min(float(retry_after), self.retry_after_cap))
        return wait
