"""One `/metrics` over every worker of `keel serve --workers N`: prometheus-client's multiprocess mode.

`keel serve` sets `PROMETHEUS_MULTIPROC_DIR` to a fresh directory of its own before it starts the
workers (and deletes it on exit). Each worker's counters and histograms then live in memory-mapped
files there, and a scrape, whichever worker answers it, sums them over every worker, those that
died since included (a counter must not go back when a worker is restarted).

What Keel reads at scrape time from state held elsewhere (breakers, queue depths, refusals counted by
the rate limiter, the cache stores' health) exists only in the worker that holds it, so each worker
copies those samples into its own files: on each scrape it answers, and every `MIRROR_INTERVAL_S`
in the background. Their values in `/metrics` are at most that old. Counters add up over the workers;
gauges merge as `GAUGE_MODES` says (a backend is up only if every worker reaches it, say), and a
dead worker's gauges are dropped at the next scrape.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from prometheus_client import CollectorRegistry, values
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.registry import Collector

from keel.observability.writer import process_alive

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
MIRROR_INTERVAL_S = 1.0

# How a gauge read at scrape time merges over the workers ("live": only running workers count).
GAUGE_MODES = {
    "keel_queue_depth": "livesum",  # items waiting, in all
    "keel_breaker_state": "livemax",  # a deployment's worst breaker
    "keel_rate_limit_backend_up": "livemin",  # up only if every worker reaches it
    "keel_cache_backend_up": "livemin",
    "keel_slo_degraded": "livemax",  # set aside by any worker's SLO guard (each judges its own calls)
    "keel_concurrency_in_flight": "livesum",  # per process: the workers' slots in use, in all
    "keel_concurrency_waiting": "livesum",
}
DEFAULT_GAUGE_MODE = "liveall"  # any other gauge: one series per worker, labelled pid


def multiprocess_dir() -> Path | None:
    """The directory of the workers' metric files, when this process is one of several workers."""
    named = os.environ.get(MULTIPROC_ENV)
    return Path(named) if named else None


class SharedMetrics:
    """The scrape of every worker: `mirror()` copies this worker's scrape-time samples to its files,
    `render()` merges all the workers' files."""

    def __init__(self, directory: Path, collectors: Iterable[Collector]) -> None:
        self.directory = directory
        self.collectors = collectors
        self._values: dict[tuple[str, str, tuple[str, ...]], values.MutexValue] = {}
        self.registry = CollectorRegistry()
        MultiProcessCollector(self.registry, path=str(directory))  # type: ignore[no-untyped-call]

    def mirror(self) -> None:
        """This worker's scrape-time samples, written to its own files."""
        for collector in self.collectors:
            for metric in collector.collect():
                if metric.type not in ("counter", "gauge"):
                    continue
                mode = GAUGE_MODES.get(metric.name, DEFAULT_GAUGE_MODE) if metric.type == "gauge" else ""
                for sample in metric.samples:
                    if sample.name.endswith("_created"):
                        continue
                    labels = tuple(sample.labels)
                    key = (metric.name, sample.name, tuple(sample.labels[name] for name in labels))
                    value = self._values.get(key)
                    if value is None:
                        value = self._values[key] = values.ValueClass(
                            metric.type, metric.name, sample.name, labels, key[2], metric.documentation,
                            multiprocess_mode=mode,
                        )
                    value.set(sample.value)

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        self.mirror()
        self.forget_dead()
        return generate_latest(self.registry)

    def forget_dead(self) -> None:
        """Drop the live gauges of workers that are gone (killed, say): their counters stay."""
        for path in self.directory.glob("gauge_live*_*.db"):
            pid = path.stem.rsplit("_", 1)[-1]
            if pid.isdigit() and not process_alive(int(pid)):
                mark_process_dead(int(pid), str(self.directory))  # type: ignore[no-untyped-call]

    def close(self) -> None:
        """At this worker's exit: its live gauges go (its counters stay, summed into the others')."""
        mark_process_dead(os.getpid(), str(self.directory))  # type: ignore[no-untyped-call]

