"""A circuit breaker per deployment: stop calling what keeps failing, probe it again later.

Every call to a deployment first takes a `Permit` and settles it exactly once: success,
failure, or release (no verdict: the call was cancelled or the client went away). Permits
carry the breaker's generation, which moves on at every state change, so the verdict of a
call that started before a change cannot undo it: ten calls in flight when the breaker
opens do not stretch its cooldown, and a slow call from before does not close it behind
the probe's back.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from enum import StrEnum


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    """Opens after `failure_threshold` consecutive failures; after `cooldown_s` one probe goes
    through (half-open): its success closes the breaker, its failure opens it for another cooldown."""

    def __init__(
        self, failure_threshold: int = 5, cooldown_s: float = 30.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.failure_threshold = failure_threshold
        self.cooldown_s = cooldown_s
        self._clock = clock
        self.state = BreakerState.CLOSED
        self.failures = 0  # consecutive, while closed
        self.opened_at = 0.0
        self._generation = 0
        self._probe_out = False

    def acquire(self) -> Permit | None:
        """Leave for one call now, or None while open (and while half-open with its probe out)."""
        if self.state is BreakerState.OPEN:
            if self._clock() - self.opened_at < self.cooldown_s:
                return None
            self._move(BreakerState.HALF_OPEN)
        if self.state is BreakerState.HALF_OPEN:
            if self._probe_out:
                return None
            self._probe_out = True
            return Permit(self, self._generation, probe=True)
        return Permit(self, self._generation, probe=False)

    def retry_in(self) -> float:
        """Seconds until a probe may go through (0 when calls may go now)."""
        if self.state is not BreakerState.OPEN:
            return 0.0
        return max(0.0, self.opened_at + self.cooldown_s - self._clock())

    def _settle(self, permit: Permit, ok: bool | None) -> None:
        if permit.generation != self._generation:
            return  # started before the last state change: old news
        if permit.probe:
            self._probe_out = False
            if ok is not None:
                self._move(BreakerState.CLOSED if ok else BreakerState.OPEN)
        elif ok:
            self.failures = 0
        elif ok is not None:
            self.failures += 1
            if self.failures >= self.failure_threshold:
                self._move(BreakerState.OPEN)

    def _move(self, state: BreakerState) -> None:
        self.state = state
        self._generation += 1
        self._probe_out = False
        self.failures = 0
        if state is BreakerState.OPEN:
            self.opened_at = self._clock()


class Permit:
    """One call's leave to use a deployment; the first verdict counts, later ones are ignored."""

    __slots__ = ("breaker", "generation", "probe", "settled")

    def __init__(self, breaker: CircuitBreaker, generation: int, *, probe: bool) -> None:
        self.breaker = breaker
        self.generation = generation
        self.probe = probe
        self.settled = False

    def success(self) -> None:
        self._settle(True)

    def failure(self) -> None:
        self._settle(False)

    def release(self) -> None:
        """No verdict (cancelled, abandoned): a probe's slot is freed for the next call."""
        self._settle(None)

    def _settle(self, ok: bool | None) -> None:
        if not self.settled:
            self.settled = True
            self.breaker._settle(self, ok)
