"""What the gateway adds: the same load sent direct to an upstream and through `keel serve`.

    .venv/bin/python bench/overhead.py [--requests 2000] [--rate-requests 200]

A fake OpenAI-compatible upstream with zero added latency runs in its own process; the
gateway runs in another (`keel serve`, one worker). Direct and gateway runs are interleaved
in one process so a noisy machine hurts both alike. Reported:
- requests/s at concurrency 1, 16, 64, plain and streamed (20 chunks);
- added latency p50/p99 and added time to first token at a fixed 10 requests/s;
- the gateway's CPU time per request, from the process's own CPU counters;
- the gateway's RSS after start (no embedded model loaded).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import orjson
import psutil
import yaml

ROOT = Path(__file__).resolve().parents[1]
BODY = {"model": "chat", "messages": [{"role": "user", "content": "Say something about benchmarks, please."}]}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"process exited early: {proc.args}")
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"{url} not ready after {timeout} s")


@dataclass
class Servers:
    upstream: subprocess.Popen[bytes]
    floor: subprocess.Popen[bytes]
    gateway: subprocess.Popen[bytes]
    urls: dict[str, str]  # direct, floor, keel

    def stop(self) -> None:
        for proc in (self.gateway, self.floor, self.upstream):
            proc.terminate()
            proc.wait(10)


def start_servers(tmp: Path) -> Servers:
    up_port, gw_port, floor_port = free_port(), free_port(), free_port()
    upstream = subprocess.Popen(
        [sys.executable, "-m", "keel.testing.fake_openai", "--port", str(up_port), "--chunks", "20"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    config = {"models": [{"name": "chat", "deployments": [
        {"provider": "openai", "base_url": f"http://127.0.0.1:{up_port}/v1", "model": "gpt-4o-mini"}]}]}
    path = tmp / "bench.yaml"
    path.write_text(yaml.safe_dump(config))
    gateway = subprocess.Popen(
        [sys.executable, "-m", "keel.cli", "serve", "--config", str(path), "--port", str(gw_port),
         "--log-level", "warning"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "KEEL_MASTER_KEY": ""},
        cwd=tmp,  # its request log (keel.db) starts empty, beside the config
    )
    floor = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "bench.passthrough_floor:app", "--port", str(floor_port),
         "--loop", "uvloop", "--http", "httptools", "--log-level", "warning", "--no-access-log"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={**os.environ, "UPSTREAM": f"http://127.0.0.1:{up_port}/v1"},
    )
    wait_ready(f"http://127.0.0.1:{up_port}/v1/models", upstream)
    wait_ready(f"http://127.0.0.1:{gw_port}/readyz", gateway)
    wait_ready(f"http://127.0.0.1:{floor_port}/readyz", floor)
    urls = {"direct": f"http://127.0.0.1:{up_port}/v1", "floor": f"http://127.0.0.1:{floor_port}/v1",
            "keel": f"http://127.0.0.1:{gw_port}/v1"}
    return Servers(upstream, floor, gateway, urls)


async def one(session: aiohttp.ClientSession, base: str, stream: bool) -> tuple[float, float]:
    """(total latency, time to first content chunk) in seconds."""
    body = {**BODY, "stream": stream}
    started = time.perf_counter()
    first = 0.0
    async with session.post(base + "/chat/completions", data=orjson.dumps(body),
                            headers={"content-type": "application/json"}) as response:
        if response.status != 200:
            raise RuntimeError(f"{base}: {response.status} {await response.text()}")
        if not stream:
            orjson.loads(await response.read())
            first = time.perf_counter() - started
        else:
            async for line in response.content:
                if not first and line.startswith(b"data: {") and b'"content":"' in line and b'"content":""' not in line:
                    first = time.perf_counter() - started
    return time.perf_counter() - started, first


async def closed_loop(session: aiohttp.ClientSession, base: str, stream: bool, concurrency: int, total: int) -> float:
    """Requests/s with `concurrency` clients each sending back to back."""
    remaining = total

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            await one(session, base, stream)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return total / (time.perf_counter() - started)


async def fixed_rate(
    session: aiohttp.ClientSession, servers: Servers, stream: bool, count: int, rate: float
) -> dict[str, list[float]]:
    """Rotate direct, floor and keel requests at `rate` per second (open loop)."""
    results: dict[str, list[float]] = {f"{k}{t}": [] for k in servers.urls for t in ("", "_ttft")}
    tasks = []
    targets = list(servers.urls.items())

    async def record(base: str, key: str) -> None:
        total, first = await one(session, base, stream)
        results[key].append(total * 1000)
        results[key + "_ttft"].append(first * 1000)

    for i in range(count):
        key, base = targets[i % len(targets)]
        tasks.append(asyncio.create_task(record(base, key)))
        await asyncio.sleep(1 / rate)
    await asyncio.gather(*tasks)
    return results


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def cpu_seconds(proc: psutil.Process) -> float:
    times = proc.cpu_times()
    return times.user + times.system


async def run(args: argparse.Namespace) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="keel-bench-"))
    servers = start_servers(tmp)
    procs = {"floor": psutil.Process(servers.floor.pid), "keel": psutil.Process(servers.gateway.pid)}
    rss_start = procs["keel"].memory_info().rss / 2**20
    # Idle connections are dropped before the servers drop them (uvicorn: 5 s), so none is reused closed.
    connector = aiohttp.TCPConnector(limit=512, keepalive_timeout=3)
    urls = servers.urls
    try:
        async with aiohttp.ClientSession(connector=connector) as session:
            for stream in (False, True):  # warm every path
                for _ in range(50):
                    for base in urls.values():
                        await one(session, base, stream)
            print(f"keel RSS after start (no embedded model): {rss_start:.1f} MiB\n")
            print("throughput (requests/s, median of interleaved rounds) and CPU per request (ms)")
            print(f"{'mode':<7} {'conc':>4} {'direct':>7} {'floor':>7} {'keel':>7} {'keel/floor':>10} "
                  f"{'floor CPU':>9} {'keel CPU':>9}")
            cpu_rows: dict[tuple[str, bool], list[float]] = {}
            for stream in (False, True):
                for concurrency in (1, 16, 64):
                    rps: dict[str, list[float]] = {k: [] for k in urls}
                    cpu: dict[str, list[float]] = {k: [] for k in procs}
                    for _ in range(args.rounds):
                        for key, base in urls.items():
                            before = cpu_seconds(procs[key]) if key in procs else 0.0
                            rps[key].append(await closed_loop(session, base, stream, concurrency, args.requests))
                            if key in procs:
                                cpu[key].append((cpu_seconds(procs[key]) - before) / args.requests * 1000)
                    r = {k: statistics.median(v) for k, v in rps.items()}
                    c = {k: statistics.median(v) for k, v in cpu.items()}
                    for key in procs:
                        cpu_rows.setdefault((key, stream), []).append(c[key])
                    mode = "stream" if stream else "plain"
                    print(f"{mode:<7} {concurrency:>4} {r['direct']:>7.0f} {r['floor']:>7.0f} {r['keel']:>7.0f} "
                          f"{r['keel'] / r['floor']:>10.2f} {c['floor']:>9.3f} {c['keel']:>9.3f}")
            print()
            for key in procs:
                plain, stream_cpu = min(cpu_rows[(key, False)]), min(cpu_rows[(key, True)])
                print(f"{key:<5} CPU per plain request {plain:.3f} ms, per 20-chunk stream {stream_cpu:.3f} ms "
                      f"({(stream_cpu - plain) / 20:.4f} ms per chunk beyond a plain request)")
            print(f"\nfixed rate {args.rate:g} requests/s, {args.rate_requests} requests per target, rotating")
            print(f"{'mode':<7} {'target':<6} {'p50':>8} {'p99':>8} {'added p50':>10} {'added p99':>10} "
                  f"{'TTFT p50':>9} {'added TTFT':>11}")
            for stream in (False, True):
                r = await fixed_rate(session, servers, stream, args.rate_requests * len(urls), args.rate)
                base50, base99, base_ttft = pct(r["direct"], 0.5), pct(r["direct"], 0.99), pct(r["direct_ttft"], 0.5)
                for key in urls:
                    p50, p99, ttft = pct(r[key], 0.5), pct(r[key], 0.99), pct(r[key + "_ttft"], 0.5)
                    mode = "stream" if stream else "plain"
                    print(f"{mode:<7} {key:<6} {p50:>6.2f}ms {p99:>6.2f}ms {p50 - base50:>+8.2f}ms "
                          f"{p99 - base99:>+8.2f}ms {ttft:>7.2f}ms {ttft - base_ttft:>+9.2f}ms")
        if args.wrk_seconds:
            wrk_cpu(servers, args.wrk_seconds, 16)
    finally:
        servers.stop()


WRK_SCRIPT = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '%s'
"""


def wrk_cpu(servers: Servers, seconds: int, connections: int) -> None:
    """CPU per request with wrk (C, one thread) as the load: it takes far less of the two cores
    than a Python client, so the servers' own CPU figures are less inflated by contention."""
    import shutil

    if shutil.which("wrk") is None:
        print("\nwrk not installed (apt-get install wrk): CPU per request under wrk skipped")
        return
    procs = {"floor": psutil.Process(servers.floor.pid), "keel": psutil.Process(servers.gateway.pid)}
    print(f"\nwith wrk ({connections} connections, {seconds} s per run, interleaved, median of 3)")
    print(f"{'mode':<7} {'target':<6} {'requests/s':>11} {'CPU ms/req':>11}")
    for stream in (False, True):
        script = Path(tempfile.mkstemp(suffix=".lua")[1])
        script.write_text(WRK_SCRIPT % orjson.dumps({**BODY, "stream": stream}).decode())
        rows: dict[str, list[tuple[float, float]]] = {"floor": [], "keel": []}
        for _ in range(3):
            for key, proc in procs.items():
                before = cpu_seconds(proc)
                out = subprocess.run(
                    ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "-s", str(script),
                     servers.urls[key] + "/chat/completions"], capture_output=True, text=True, check=True,
                ).stdout
                spent = cpu_seconds(proc) - before
                total = int(next(line for line in out.splitlines() if "requests in" in line).split()[0])
                rows[key].append((total / seconds, spent / total * 1000))
        for key, values in rows.items():
            rps = statistics.median(v[0] for v in values)
            cpu = statistics.median(v[1] for v in values)
            print(f"{'stream' if stream else 'plain':<7} {key:<6} {rps:>11.0f} {cpu:>11.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=1000, help="requests per throughput run")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per row (median reported)")
    parser.add_argument("--rate", type=float, default=10.0)
    parser.add_argument("--rate-requests", type=int, default=300)
    parser.add_argument("--wrk-seconds", type=int, default=8, help="0: skip the wrk runs")
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
