"""SLO-aware control: a deployment whose recent calls break the `slo` targets is set aside until it recovers.

A breaker (breaker.py) reacts to failures in a row; this reacts to a deployment that still answers but
burns the error budget: its P99 latency over the last `window_s` above `slo.p99_ms`, or its share of
failed calls above `slo.error_rate`, once `min_calls` calls are in the window. While it is degraded,
the reliability stage sends new calls to the next deployment of the model (`action: fallback`), or
refuses them with a 503 `overloaded` and a Retry-After when no healthy deployment is left
(`action: shed`). Nothing is sent to a degraded deployment, so its window empties as it ages: after at
most `window_s` it is tried again with fresh samples (recovery needs no probe of its own), and set
aside again if it is still slow or failing.

State per deployment and per process, like the breakers; `/metrics` shows it (`keel_slo_degraded`,
`keel_slo_diversions_total`), and each call diverted has an attempt in its log record and trace whose
error is `slo_degraded`.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Callable

from keel.config import SLOConfig, SLOGuardConfig

log = logging.getLogger("keel.reliability")

MAX_SAMPLES = 4096  # per deployment: a window beyond this many calls keeps the most recent ones
_REEVALUATE_S = 0.25  # the verdict is cached this long: a P99 over thousands of samples is not per call


class SLOGuard:
    """One deployment's recent calls against the SLO targets. `clock`: seconds, monotonic (tests inject one)."""

    def __init__(
        self, name: str, guard: SLOGuardConfig, slo: SLOConfig, clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self.action = guard.action
        self.window_s = guard.window_s
        self.min_calls = guard.min_calls
        self.p99_ms = slo.p99_ms
        self.error_rate = slo.error_rate
        self.clock = clock
        self.samples: deque[tuple[float, float, bool]] = deque(maxlen=MAX_SAMPLES)  # (at, ms, failed)
        self.diversions = 0  # calls sent elsewhere or shed because of this deployment: a counter for /metrics
        self._verdict: str | None = None
        self._checked_at = -math.inf

    def observe(self, latency_ms: float, failed: bool) -> None:
        """One finished call of the deployment: how long it took, and whether the upstream failed it."""
        self.samples.append((self.clock(), latency_ms, failed))

    def degraded(self) -> str | None:
        """Why the deployment is set aside now (for the log), or None while it meets the targets."""
        now = self.clock()
        if now - self._checked_at >= _REEVALUATE_S:
            self._checked_at = now
            verdict = self._judge(now)
            if (verdict is None) != (self._verdict is None):  # said once per change, not per call
                if verdict is None:
                    log.info("deployment '%s' meets the SLO targets again: it is called again", self.name)
                else:
                    log.warning("deployment '%s' set aside by its SLO guard (%s): %s", self.name, self.action, verdict)
            self._verdict = verdict
        return self._verdict

    def retry_after(self) -> float:
        """Seconds until the oldest sample leaves the window (when the verdict may change)."""
        if not self.samples:
            return 1.0
        return max(1.0, self.samples[0][0] + self.window_s - self.clock())

    def _judge(self, now: float) -> str | None:
        horizon = now - self.window_s
        while self.samples and self.samples[0][0] < horizon:
            self.samples.popleft()
        n = len(self.samples)
        if n < self.min_calls:
            return None
        failed = sum(1 for _, _, bad in self.samples if bad)
        if failed / n > self.error_rate:
            return (f"{failed} of its last {n} calls failed ({failed / n:.1%}, over the SLO's "
                    f"{self.error_rate:.1%})")
        latencies = sorted(ms for _, ms, _ in self.samples)
        p99 = latencies[min(n - 1, math.ceil(0.99 * n) - 1)]
        if p99 > self.p99_ms:
            return f"its P99 over the last {n} calls is {p99:.0f} ms (the SLO's is {self.p99_ms:.0f} ms)"
        return None
