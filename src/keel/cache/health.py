"""Whether a shared cache store answers (Redis, PostgreSQL): failed operations counted, an outage logged
once and its end once, and both read by /metrics at scrape time.

A cache is an optimisation: a store that fails answers a lookup as a miss and skips a store. One
`BackendHealth` per server (the exact and semantic stores of one PostgreSQL share theirs); a `Keel`
registers one `BackendsCollector` over all of them, so /metrics has each family once, by `backend`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

log = logging.getLogger("keel.cache")


class BackendHealth:
    def __init__(self, backend: str) -> None:
        self.backend = backend  # "Redis", "PostgreSQL": in the log, and lower-cased the metrics' label
        self.errors = 0
        self.down = False

    def failed(self, exc: BaseException) -> None:
        self.errors += 1
        if not self.down:
            self.down = True
            log.warning("the cache store (%s) cannot be reached (%s); calls are answered as cache misses "
                        "until it answers again", self.backend, reason(exc))

    def answered(self) -> None:
        if self.down:
            self.down = False
            log.info("the cache store (%s) answers again", self.backend)

    def collect(self) -> Iterable[Metric]:
        return BackendsCollector([self]).collect()


class BackendsCollector:
    """`keel_cache_backend_errors_total{backend}` and `keel_cache_backend_up{backend}` over every shared
    store a `Keel` uses (two servers of one kind add up; up is 0 while any of them is down)."""

    def __init__(self, healths: Sequence[BackendHealth]) -> None:
        self.healths = healths

    def collect(self) -> Iterable[Metric]:
        errors = CounterMetricFamily("keel_cache_backend_errors",
                                     "Cache lookups and stores a shared store failed (each lookup answered as a miss)",
                                     labels=["backend"])
        up = GaugeMetricFamily("keel_cache_backend_up", "1 when the cache store answers, 0 in an outage",
                               labels=["backend"])
        for backend in sorted({h.backend for h in self.healths}):
            mine = [h for h in self.healths if h.backend == backend]
            errors.add_metric([backend.lower()], sum(h.errors for h in mine))
            up.add_metric([backend.lower()], 0 if any(h.down for h in mine) else 1)
        return [errors, up]


def reason(exc: BaseException) -> str:
    """An error in a line: its message's first line, or the name of an error without one (a TimeoutError
    from a deadline)."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
