"""Soak: Keel when things go wrong and when one process is not enough (`make soak`).

    .venv/bin/python bench/soak.py            # the full run (a few minutes)
    .venv/bin/python bench/soak.py --quick    # a few seconds of each part, to check it works

Three parts, each printing its figures (median and p99 of the client's whole-call latency):

- faults: one `keel serve` in front of fake upstreams (`python -m keel.testing.fake_openai`), one per
  fault (500, 503, 429 with Retry-After at 30% of calls; hang, reset, malformed body, stream cut after
  3 chunks, stream stalled after 3 chunks, slow drip of a chunk a second on every call), each as a
  model alone and as a model with a healthy fallback: client-visible error rate, p50/p99 against the
  model's deadline (`timeout_s`).
- replicas: two `keel serve` on two ports sharing the real Redis (limits, budgets) and PostgreSQL (the
  request log) behind a round-robin (nginx when installed, else keel.testing.round_robin), at a fixed
  rate (200/s for 60 s): throughput, p50/p99, errors, RSS of each replica at start and end, and the
  request log against the calls answered (each exactly once); then the same with 30% upstream
  failures and a fallback.
- workers: `keel serve --workers 2` against `--workers 1`, calls per second with the load closed-loop.

Needs Redis on 127.0.0.1:6379 and PostgreSQL on 127.0.0.1:5432 (KEEL_TEST_REDIS_URL and
KEEL_TEST_POSTGRES_URL override them, as for the tests).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import psycopg
import yaml
from overhead import free_port, wait_ready  # bench/ is on the path when a script here runs
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.engine import make_url

from keel.observability.store import RecordStore
from keel.testing.round_robin import RoundRobinProxy

REDIS_URL = os.environ.get("KEEL_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
PG_ADMIN_URL = os.environ.get("KEEL_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
DEADLINE_S = 5.0
NGINX = "/usr/sbin/nginx"

# name -> (fake_openai flags, streamed calls)
FAULTS: dict[str, tuple[list[str], bool]] = {
    "500 (30%)": (["--fail-rate", "0.3", "--fail-status", "500"], False),
    "503 (30%)": (["--fail-rate", "0.3", "--fail-status", "503"], False),
    "429+Retry-After 1 (30%)": (["--fail-rate", "0.3", "--fail-status", "429", "--retry-after", "1"], False),
    "hang": (["--hang"], False),
    "reset": (["--reset"], False),
    "malformed": (["--malformed"], False),
    "cut after 3 chunks": (["--cut-after", "3"], True),
    "stall after 3 chunks": (["--stall-after", "3"], True),
    "drip 1 chunk/s": (["--chunk-delay-ms", "1000", "--chunks", "5"], True),
}
MODEL_SETTINGS: dict[str, Any] = {
    "timeout_s": DEADLINE_S, "attempt_timeout_s": 1.5, "first_chunk_timeout_s": 1.5, "chunk_gap_timeout_s": 0.5,
    "retry": {"max_attempts": 2, "initial_backoff_ms": 10, "max_backoff_ms": 50},
}


# ------------------------------------------------------------------ processes


class Processes:
    """Child processes, stopped (SIGTERM, then SIGKILL) in reverse order on exit."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.started: list[subprocess.Popen[bytes]] = []

    def fake(self, *flags: str) -> str:
        port = free_port()
        proc = self._spawn([sys.executable, "-m", "keel.testing.fake_openai", "--port", str(port), *flags], "fake")
        wait_ready(f"http://127.0.0.1:{port}/v1/models", proc)
        return f"http://127.0.0.1:{port}/v1"

    def keel(self, config: dict[str, Any], *args: str, port: int | None = None) -> tuple[str, subprocess.Popen[bytes]]:
        port = port or free_port()
        path = self.tmp / f"keel-{port}.yaml"
        path.write_text(yaml.safe_dump(config))
        proc = self._spawn([sys.executable, "-m", "keel.cli", "serve", "--config", str(path), "--port", str(port),
                            "--log-level", "warning", *args], f"keel-{port}")
        url = f"http://127.0.0.1:{port}"
        wait_ready(url + "/readyz", proc)
        return url, proc

    def nginx(self, upstreams: list[str]) -> str:
        port = free_port()
        prefix = self.tmp / f"nginx-{port}"
        prefix.mkdir()
        servers = "".join(f"        server {u.removeprefix('http://')} max_fails=1 fail_timeout=2s;\n"
                          for u in upstreams)
        (prefix / "nginx.conf").write_text(f"""
worker_processes 1;
pid {prefix}/nginx.pid;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    upstream keel {{
{servers}        keepalive 64;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://keel;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_read_timeout 60s;
            proxy_next_upstream error;
        }}
    }}
}}
""")
        self._spawn([NGINX, "-p", str(prefix), "-e", str(prefix / "error.log"), "-c", str(prefix / "nginx.conf"),
                     "-g", "daemon off;"], "nginx")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                return f"http://127.0.0.1:{port}"
            time.sleep(0.05)
        raise SystemExit("nginx did not listen")

    def _spawn(self, command: list[str], name: str) -> subprocess.Popen[bytes]:
        log = (self.tmp / f"{name}.log").open("wb")
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=self.tmp,
                                env={**os.environ, "KEEL_MASTER_KEY": ""})
        self.started.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGQUIT if proc.args[0] == NGINX else signal.SIGTERM)  # type: ignore[index]
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def stop_all(self) -> None:
        for proc in reversed(self.started):
            self.stop(proc)


@contextlib.contextmanager
def processes() -> Iterator[Processes]:
    with tempfile.TemporaryDirectory(prefix="keel-soak-") as tmp:
        procs = Processes(Path(tmp))
        try:
            yield procs
        finally:
            procs.stop_all()


@contextlib.contextmanager
def pg_database() -> Iterator[str]:
    name = f"keel_soak_{os.getpid()}_{time.monotonic_ns() % 10**6}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# ------------------------------------------------------------------ load


@dataclass
class Results:
    latencies_ms: list[float] = field(default_factory=list)  # answered calls
    errors: Counter[str] = field(default_factory=Counter)
    ids: list[str] = field(default_factory=list)  # x-keel-request-id of every answered call
    sent: int = 0
    elapsed_s: float = 0.0

    @property
    def ok(self) -> int:
        return len(self.latencies_ms)

    def line(self) -> str:
        lat = sorted(self.latencies_ms)
        p50 = statistics.median(lat) if lat else float("nan")
        p99 = lat[min(len(lat) - 1, round(0.99 * (len(lat) - 1)))] if lat else float("nan")
        failed = sum(self.errors.values())
        kinds = ", ".join(f"{k} x{n}" for k, n in self.errors.most_common(3))
        return (f"sent {self.sent:5d}  ok {self.ok:5d}  errors {failed:4d} ({100 * failed / max(1, self.sent):5.1f}%)"
                f"  p50 {p50:7.0f} ms  p99 {p99:7.0f} ms  {self.ok / max(1e-9, self.elapsed_s):6.1f}/s"
                + (f"  [{kinds}]" if kinds else ""))


async def one_call(session: aiohttp.ClientSession, base: str, model: str, text: str, stream: bool,
                   results: Results) -> None:
    body = {"model": model, "stream": stream, "messages": [{"role": "user", "content": text}]}
    started = time.perf_counter()
    try:
        async with session.post(base + "/v1/chat/completions", json=body) as response:
            raw = await response.read()
            if response.status != 200:
                results.errors[str(response.status)] += 1
                return
            if stream and (b"data: [DONE]" not in raw or b'"error"' in raw):
                results.errors["stream cut"] += 1
                return
            results.latencies_ms.append((time.perf_counter() - started) * 1000)
            results.ids.append(response.headers["x-keel-request-id"])
    except (TimeoutError, aiohttp.ClientError) as exc:
        results.errors[type(exc).__name__] += 1


async def fixed_rate(base: str, model: str, rate: float, seconds: float, stream: bool = False,
                     close: bool = False) -> Results:
    """Open loop: call i starts at i/rate s (paced, whatever the answers take)."""
    results = Results()
    connector = aiohttp.TCPConnector(limit=0, force_close=close)
    timeout = aiohttp.ClientTimeout(total=DEADLINE_S * 4)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        tasks = []
        started = time.perf_counter()
        for i in range(int(rate * seconds)):
            delay = started + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)  # pacing, not synchronisation
            tasks.append(asyncio.create_task(one_call(session, base, model, f"soak {i} {time.time_ns()}", stream,
                                                      results)))
            results.sent += 1
        await asyncio.gather(*tasks)
        results.elapsed_s = time.perf_counter() - started
    return results


async def closed_loop(base: str, model: str, concurrency: int, seconds: float) -> Results:
    results = Results()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                     timeout=aiohttp.ClientTimeout(total=30)) as session:
        end = time.perf_counter() + seconds
        started = time.perf_counter()

        async def worker(w: int) -> None:
            n = 0
            while time.perf_counter() < end:
                results.sent += 1
                await one_call(session, base, model, f"load {w} {n}", False, results)
                n += 1

        await asyncio.gather(*(worker(w) for w in range(concurrency)))
        results.elapsed_s = time.perf_counter() - started
    return results


def rss_mb(proc: subprocess.Popen[bytes]) -> float:
    return float(psutil.Process(proc.pid).memory_info().rss) / 2**20


# ------------------------------------------------------------------ the parts


async def faults(args: argparse.Namespace) -> None:
    print(f"\n== faults: {args.fault_rate:g} calls/s for {args.fault_seconds:g} s per row; "
          f"deadline timeout_s = {DEADLINE_S:g} s (attempt 1.5 s, 2 attempts)")
    with processes() as procs:
        fallback = procs.fake()
        models = []
        for i, (flags, _) in enumerate(FAULTS.values()):
            primary = {"provider": "openai", "name": f"f{i}-primary", "base_url": procs.fake(*flags),
                       "model": "gpt-4o-mini"}
            backup = {"provider": "openai", "name": f"f{i}-fallback", "base_url": fallback, "model": "gpt-4o-mini"}
            models.append({"name": f"f{i}", **MODEL_SETTINGS, "deployments": [primary]})
            models.append({"name": f"f{i}-fb", **MODEL_SETTINGS, "deployments": [primary, backup]})
        base, _ = procs.keel({"models": models, "store": {"url": f"sqlite:///{procs.tmp / 'faults.db'}"}})
        for i, (name, (_, stream)) in enumerate(FAULTS.items()):
            for suffix, label in (("", "alone"), ("-fb", "+fallback")):
                results = await fixed_rate(base, f"f{i}{suffix}", args.fault_rate, args.fault_seconds, stream)
                print(f"{name:24s} {label:9s} {'stream' if stream else 'plain ':6s} {results.line()}")


def replica_config(url: str, prefix: str, deployments: list[dict[str, Any]], spool: Path) -> dict[str, Any]:
    return {
        "models": [{"name": "m", **MODEL_SETTINGS, "deployments": deployments}],
        "state": {"redis_url": REDIS_URL, "key_prefix": prefix},
        "limits": {"backend": "redis", "global": {"requests_per_minute": 10**7}},
        "budgets": [{"scope": "global", "limit_usd": 10**6}],
        "store": {"url": url, "spool_path": str(spool), "flush_interval_ms": 200},
    }


def logged(url: str, since: float) -> Counter[str]:
    store = RecordStore(url)
    try:
        return Counter(r["request_id"] for r in store.records(since=since))
    finally:
        store.close()


async def replicas(args: argparse.Namespace) -> None:
    proxy_kind = "nginx" if os.access(NGINX, os.X_OK) and not args.no_nginx else "keel.testing.round_robin"
    print(f"\n== replicas: two `keel serve` (Redis limits+budgets, PostgreSQL log) behind {proxy_kind}, "
          f"{args.rate:g} calls/s for {args.seconds:g} s")
    with processes() as procs:
        healthy = procs.fake()
        flaky = procs.fake("--fail-rate", "0.3", "--fail-status", "503")
        for label, deployments in (
            ("healthy upstream", [{"provider": "openai", "base_url": healthy, "model": "gpt-4o-mini"}]),
            ("30% 503 + fallback", [{"provider": "openai", "name": "flaky", "base_url": flaky, "model": "gpt-4o-mini"},
                                    {"provider": "openai", "name": "fallback", "base_url": healthy,
                                     "model": "gpt-4o-mini"}]),
        ):
            with pg_database() as url:  # a log of its own for each run
                await replica_run(procs, proxy_kind, label, deployments, url, args)


async def replica_run(procs: Processes, proxy_kind: str, label: str, deployments: list[dict[str, Any]], url: str,
                      args: argparse.Namespace) -> None:
    prefix = f"keel-soak-{os.getpid()}-{time.monotonic_ns()}"
    config = replica_config(url, prefix, deployments, procs.tmp / f"spool-{prefix}.jsonl")
    started_at = time.time()
    pair = [procs.keel(config), procs.keel(config)]
    rss_start = [rss_mb(p) for _, p in pair]
    proxy: RoundRobinProxy | None = None
    if proxy_kind == "nginx":
        front = procs.nginx([u for u, _ in pair])
    else:
        proxy = RoundRobinProxy([("127.0.0.1", int(u.rsplit(":", 1)[1])) for u, _ in pair]).start()
        front = f"http://127.0.0.1:{proxy.port}"
    try:
        results = await fixed_rate(front, "m", args.rate, args.seconds, close=proxy is not None)
    finally:
        if proxy is not None:
            proxy.stop()
    rss_end = [rss_mb(p) for _, p in pair]
    served = [requests_total(u) for u, _ in pair]
    for _, proc in pair:
        procs.stop(proc)  # SIGTERM flushes the log
    counts = logged(url, started_at - 1)
    answered = Counter(results.ids)
    missing = sum(1 for rid in answered if rid not in counts)
    twice = sum(1 for rid in answered if counts[rid] > 1)
    print(f"{label:20s} {results.line()}")
    print(f"{'':20s} RSS MB start {rss_start[0]:.0f}/{rss_start[1]:.0f} end {rss_end[0]:.0f}/{rss_end[1]:.0f}"
          f" (growth {max(100 * (e - s) / s for s, e in zip(rss_start, rss_end, strict=True)):+.1f}%);"
          f" calls per replica {served[0]:.0f}/{served[1]:.0f};"
          f" log: {len(counts)} records for {len(answered)} answered, missing {missing}, twice {twice}")


def requests_total(base: str) -> float:
    """`keel_requests_total` of one replica: the calls it answered."""
    with urllib.request.urlopen(base + "/metrics", timeout=10) as response:
        text = response.read().decode()
    return sum(s.value for family in text_string_to_metric_families(text) for s in family.samples
               if s.name == "keel_requests_total")


async def workers(args: argparse.Namespace) -> None:
    print(f"\n== workers: closed loop, {args.concurrency} at a time for {args.worker_seconds:g} s, simulated model")
    config = {"models": [{"name": "m", "deployments": [{"provider": "simulated", "ttft_ms": 0, "token_delay_ms": 0}]}],
              "store": {"url": "sqlite:///keel.db", "flush_interval_ms": 500}}
    for n in (1, 2):
        with processes() as procs:
            base, _ = procs.keel(config, "--workers", str(n))
            await closed_loop(base, "m", args.concurrency, 1)  # warm up
            results = await closed_loop(base, "m", args.concurrency, args.worker_seconds)
            print(f"--workers {n}  {results.line()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few seconds of each part")
    parser.add_argument("--parts", default="faults,replicas,workers")
    parser.add_argument("--rate", type=float, default=200, help="replicas: calls per second")
    parser.add_argument("--seconds", type=float, default=60, help="replicas: seconds of load")
    parser.add_argument("--fault-rate", type=float, default=50)
    parser.add_argument("--fault-seconds", type=float, default=10)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--worker-seconds", type=float, default=15)
    parser.add_argument("--no-nginx", action="store_true", help="the Python round-robin even when nginx exists")
    args = parser.parse_args()
    if args.quick:
        args.rate, args.seconds, args.fault_rate, args.fault_seconds = 50, 3, 20, 2
        args.concurrency, args.worker_seconds = 16, 3
    parts = {"faults": faults, "replicas": replicas, "workers": workers}
    for name in args.parts.split(","):
        asyncio.run(parts[name](args))


if __name__ == "__main__":
    main()
