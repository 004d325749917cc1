"""What prometheus-client's multiprocess mode (`keel serve --workers N`) costs a call: `Metrics.observe`
on one request record, in a process with and one without `PROMETHEUS_MULTIPROC_DIR`, and one scrape
of what several workers wrote.

    .venv/bin/python bench/metrics_workers.py

Each mode runs in a child process of its own (the mode is chosen when prometheus-client is imported).
Figures: microseconds per `observe` (median of 5 runs of 20,000 calls), and milliseconds per scrape.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

CALLS = 20_000
RUNS = 5

CHILD = """
import statistics, sys, time
from keel.observability.metrics import Metrics
from keel.observability.record import RequestRecord

metrics = Metrics()
record = RequestRecord(request_id="req_1", started_at=0.0, ended_at=0.2, model="m", feature="f", ttft_ms=50,
                       prompt_tokens=20, completion_tokens=40, cost_usd=0.0001)
runs = []
for _ in range({runs}):
    start = time.perf_counter()
    for _ in range({calls}):
        metrics.observe(record)
    runs.append((time.perf_counter() - start) / {calls} * 1e6)
scrapes = []
for _ in range(20):
    start = time.perf_counter()
    metrics.render()
    scrapes.append((time.perf_counter() - start) * 1e3)
print(statistics.median(runs), statistics.median(scrapes))
"""


def measure(env: dict[str, str]) -> tuple[float, float]:
    out = subprocess.run([sys.executable, "-c", CHILD.format(runs=RUNS, calls=CALLS)], env=env,
                         capture_output=True, text=True, check=True).stdout.split()
    return float(out[0]), float(out[1])


def main() -> None:
    base = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    one_us, one_ms = measure(base)
    with tempfile.TemporaryDirectory(prefix="keel-metrics-bench-") as directory:
        workers = {**base, "PROMETHEUS_MULTIPROC_DIR": directory}
        measure(workers)  # a second worker's files, so the scrape merges two
        many_us, many_ms = measure(workers)
    print(f"observe per call: one process {one_us:.2f} us, multiprocess {many_us:.2f} us "
          f"(+{many_us - one_us:.2f} us); scrape: {one_ms:.2f} ms, of two workers' files {many_ms:.2f} ms")


if __name__ == "__main__":
    main()
