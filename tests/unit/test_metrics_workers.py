"""One `/metrics` over several worker processes (prometheus-client's multiprocess mode): counters add
up over live and dead workers, each worker's calls are counted by pid, scrape-time gauges merge by
their mode and a dead worker's go."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from keel.observability.multiprocess import SharedMetrics

WORKER = """
import sys
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from keel.observability.metrics import Metrics
from keel.observability.record import RequestRecord

queue, up, errors, calls = (float(v) for v in sys.argv[1:5])
metrics = Metrics()
metrics.watch_queue("request_log", lambda: queue)

class Health:  # state read at scrape time, as a cache store's health is
    def collect(self):
        gauge = GaugeMetricFamily("keel_cache_backend_up", "up", labels=["backend"])
        gauge.add_metric(["redis"], up)
        counter = CounterMetricFamily("keel_cache_backend_errors", "errors", labels=["backend"])
        counter.add_metric(["redis"], errors)
        return [gauge, counter]

metrics.register(Health())
for i in range(int(calls)):
    metrics.observe(RequestRecord(request_id=f"r{i}", started_at=0, ended_at=0.1, model="m"))
metrics.shared.mirror()
print("mirrored", flush=True)
sys.stdin.read()  # a worker still running, until the test closes its stdin
"""


def worker(directory: Path, queue: int, up: int, errors: int, calls: int) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", WORKER, str(queue), str(up), str(errors), str(calls)],
        env={**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(directory)},
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    assert proc.stdout is not None and proc.stdout.readline() == "mirrored\n"
    return proc


def scrape(directory: Path) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = SharedMetrics(directory, []).render().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_a_scrape_sums_the_workers_and_drops_a_dead_workers_gauges_but_not_its_counts(tmp_path: Path) -> None:
    first = worker(tmp_path, queue=3, up=1, errors=2, calls=5)
    second = worker(tmp_path, queue=4, up=0, errors=5, calls=7)
    try:
        both = scrape(tmp_path)
        calls = ("keel_requests_total", (("feature", ""), ("model", "m"), ("outcome", "ok"), ("status", "200")))
        assert both[calls] == 12
        assert both[("keel_worker_requests_total", (("pid", str(first.pid)),))] == 5
        assert both[("keel_worker_requests_total", (("pid", str(second.pid)),))] == 7
        assert both[("keel_cache_backend_errors_total", (("backend", "redis"),))] == 7  # summed
        assert both[("keel_queue_depth", (("queue", "request_log"),))] == 7  # livesum
        assert both[("keel_cache_backend_up", (("backend", "redis"),))] == 0  # livemin: one worker cannot reach it

        second.communicate("")  # the second worker exits
        after = scrape(tmp_path)
        assert after[calls] == 12  # a counter never goes back
        assert after[("keel_cache_backend_errors_total", (("backend", "redis"),))] == 7
        assert after[("keel_queue_depth", (("queue", "request_log"),))] == 3
        assert after[("keel_cache_backend_up", (("backend", "redis"),))] == 1
    finally:
        for proc in (first, second):
            if proc.poll() is None:
                proc.communicate("")
