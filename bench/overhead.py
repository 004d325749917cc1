"""What the gateway adds: the same load sent direct to an upstream and through `keel serve`.

    .venv/bin/python bench/overhead.py [--requests 2000] [--rate-requests 200] [--limits memory|redis]

A fake OpenAI-compatible upstream with zero added latency runs in its own process; the
gateway runs in another (`keel serve`, one worker). Direct and gateway runs are interleaved
in one process so a noisy machine hurts both alike. Reported:
- requests/s at concurrency 1, 16, 64, plain and streamed (20 chunks);
- added latency p50/p99 and added time to first token at a fixed 10 requests/s;
- the gateway's CPU time per request, from the process's own CPU counters;
- the gateway's RSS after start (no embedded model loaded);
- the tail at saturation: p50, p99 and p99/p50 under wrk at 16 connections, and the longest single
  request at one connection, plain and streamed (medians of 3 interleaved rounds; the direct run is
  the baseline: what the machine and the load generator cost on their own).

`--limits memory` (or `redis`) serves the gateway with rate limits on: global requests and tokens
per minute and a per-model requests limit, set so high that nothing is refused (three counters
charged per call, tokens corrected after it); run it beside a run without to read their cost.
`--redis-url` names the Redis (default: $KEEL_TEST_REDIS_URL or redis://127.0.0.1:6379/0).

`--dialects` (on by default; `--only-dialects` for it alone) sends the same question to each API the
gateway speaks, plain and streamed, one call at a time, interleaved call by call: chat completions, the
Responses API (`/v1/responses`), Anthropic's Messages API (`/v1/messages`, `x-api-key`) and legacy
completions (`/v1/completions`); the Responses API twice, as clients call it (each response stored,
OpenAI's default) and with `store: false` (`resp.nostore`: its translation alone). Each call's CPU in
the gateway is read from the kernel's per-thread run time (`/proc/<pid>/task/*/schedstat`, nanoseconds;
psutil's counters tick every 10 ms), up to when the gateway has gone quiet after the answer, so a call's
bookkeeping after delivery counts as its own; reported per route: mean, p50 and p99 of CPU per call, latency
p50/p99, and each against chat in the same run (the issue's target: translation adds <= 0.1 ms of CPU
per call). A route the gateway does not serve yet is said and left out.

`--dialects-in-process` measures the same without the network: the gateway's ASGI app driven in this
process over the simulated model, each call's CPU from `time.thread_time_ns` of the event loop's thread
(where a request is parsed, translated, run through the pipeline and answered), interleaved call by
call. No sockets, no HTTP server, no other process: what is left between two routes is their
translation. The request-log writer's thread is left out on purpose: a call's record is written after
it, and with the whole process's CPU (`process_time_ns`) that write lands on whichever call comes next.
The stored Responses route showed it most: the call after it was charged for storing its response.

`--protect` adds a second gateway, `keel+`, measured beside the plain one in the same rounds: virtual
keys on (a key created with `keel keys create`), rate limits in Redis, and guardrails (input length,
injection by normalisation and patterns, PII and secrets redacted; output PII and a deny pattern).
`--protect-classifier` adds the injection classifier (the local embedder) to its guardrails.
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
from typing import Any

import aiohttp
import orjson
import psutil
import yaml

ROOT = Path(__file__).resolve().parents[1]
HEADERS: dict[str, dict[str, str]] = {}  # extra request headers by target (keel+: its virtual key)
BODY = {"model": "chat", "messages": [{"role": "user", "content": "Say something about benchmarks, please."}]}


# The same question in each API the gateway speaks: (path under /v1, body, extra headers).
QUESTION = "Say something about benchmarks, please."
ANSWER_TOKENS = 64
DIALECTS: dict[str, tuple[str, dict[str, object], dict[str, str]]] = {
    "chat": ("/chat/completions", {"model": "chat", "max_tokens": ANSWER_TOKENS,
                                   "messages": [{"role": "user", "content": QUESTION}]}, {}),
    "responses": ("/responses", {"model": "chat", "input": QUESTION, "max_output_tokens": ANSWER_TOKENS}, {}),
    # The Responses API stores each response unless told not to (OpenAI's default): storing is not translation.
    "resp.nostore": ("/responses", {"model": "chat", "input": QUESTION, "max_output_tokens": ANSWER_TOKENS,
                                    "store": False}, {}),
    "messages": ("/messages", {"model": "chat", "max_tokens": ANSWER_TOKENS,
                               "messages": [{"role": "user", "content": QUESTION}]},
                 {"x-api-key": "sk-bench", "anthropic-version": "2023-06-01"}),
    "completions": ("/completions", {"model": "chat", "prompt": QUESTION, "max_tokens": ANSWER_TOKENS}, {}),
}


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
    urls: dict[str, str]  # direct, floor, keel (and untuned, keel+, when asked for)
    untuned: subprocess.Popen[bytes] | None = None
    protected: subprocess.Popen[bytes] | None = None

    def stop(self) -> None:
        for proc in (self.protected, self.untuned, self.gateway, self.floor, self.upstream):
            if proc is not None:
                proc.terminate()
                proc.wait(10)


def start_gateway(tmp: Path, config: Path, port: int, launcher: list[str]) -> subprocess.Popen[bytes]:
    """`keel serve` in a directory of its own, so its request log (keel.db) starts empty."""
    tmp.mkdir(exist_ok=True)
    return subprocess.Popen(
        [sys.executable, *launcher, "serve", "--config", str(config), "--port", str(port), "--log-level", "warning"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "KEEL_MASTER_KEY": ""}, cwd=tmp,
    )


def rate_limits(backend: str, redis_url: str) -> dict[str, object]:
    """keel.yaml's `limits:` for --limits: three counters per call, none ever refusing."""
    limits: dict[str, object] = {
        "backend": backend, "global": {"requests_per_minute": 10**9, "tokens_per_minute": 10**12},
        "per_model": {"requests_per_minute": 10**9},
    }
    if backend == "redis":
        limits["redis_url"] = redis_url
    return limits


def protections(redis_url: str, classifier: bool) -> dict[str, object]:
    """keel.yaml's keys, limits and guardrails for `keel+`: everything on, nothing refusing."""
    return {
        "auth": {"virtual_keys": True},
        "limits": rate_limits("redis", redis_url),
        "guardrails": {
            "input": {
                "max_input_tokens": 8000,
                "injection": {"action": "block", "layers": ["normalisation", "patterns"] + (
                    ["classifier"] if classifier else [])},
                "pii": {"action": "redact"},
            },
            "output": {"pii": {"action": "redact"}, "deny_patterns": ["(?i)internal use only"]},
        },
    }


def create_key(cwd: Path, config: Path) -> str:
    """A virtual key for `keel+`, made as a user makes one."""
    made = subprocess.run(
        [sys.executable, "-m", "keel.cli", "keys", "create", "--tenant", "bench", "--config", str(config), "--json"],
        cwd=cwd, capture_output=True, check=True, text=True,
    )
    return str(orjson.loads(made.stdout)["key"])


def start_servers(
    tmp: Path, untuned: bool = False, limits: dict[str, object] | None = None,
    protected: dict[str, object] | None = None,
) -> Servers:
    up_port, gw_port, floor_port = free_port(), free_port(), free_port()
    upstream = subprocess.Popen(
        [sys.executable, "-m", "keel.testing.fake_openai", "--port", str(up_port), "--chunks", "20"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    config: dict[str, object] = {"models": [{"name": "chat", "deployments": [
        {"provider": "openai", "base_url": f"http://127.0.0.1:{up_port}/v1", "model": "gpt-4o-mini"}]}]}
    if limits:
        config["limits"] = limits
        config["state"] = {"key_prefix": f"keel-bench-{os.getpid()}"}  # counters of this run's own
    path = tmp / "bench.yaml"
    path.write_text(yaml.safe_dump(config))
    gateway = start_gateway(tmp / "keel", path, gw_port, ["-m", "keel.cli"])
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
    servers = Servers(upstream, floor, gateway, urls)
    if untuned:  # the gateway without keel.server.runtime's settings: the "before" of the tail
        port = free_port()
        servers.untuned = start_gateway(tmp / "untuned", path, port, [str(ROOT / "bench" / "untuned_serve.py")])
        wait_ready(f"http://127.0.0.1:{port}/readyz", servers.untuned)
        urls["untuned"] = f"http://127.0.0.1:{port}/v1"
    if protected:
        port, home = free_port(), tmp / "protected"
        home.mkdir(exist_ok=True)
        path = home / "bench.yaml"
        path.write_text(yaml.safe_dump({**config, **protected,
                                        "state": {"key_prefix": f"keel-bench-plus-{os.getpid()}"}}))
        HEADERS[f"http://127.0.0.1:{port}/v1"] = {"authorization": "Bearer " + create_key(home, path)}
        servers.protected = start_gateway(home, path, port, ["-m", "keel.cli"])
        wait_ready(f"http://127.0.0.1:{port}/readyz", servers.protected)
        urls["keel+"] = f"http://127.0.0.1:{port}/v1"
    return servers


async def one(session: aiohttp.ClientSession, base: str, stream: bool) -> tuple[float, float]:
    """(total latency, time to first content chunk) in seconds."""
    body = {**BODY, "stream": stream}
    started = time.perf_counter()
    first = 0.0
    headers = {"content-type": "application/json", **HEADERS.get(base, {})}
    async with session.post(base + "/chat/completions", data=orjson.dumps(body), headers=headers) as response:
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
    targets = [(key, servers.urls[key]) for key in ("direct", "floor", "keel", "keel+") if key in servers.urls]
    results: dict[str, list[float]] = {f"{k}{t}": [] for k, _ in targets for t in ("", "_ttft")}
    tasks = []

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
    limits = rate_limits(args.limits, args.redis_url) if args.limits != "off" else None
    protected = protections(args.redis_url, args.protect_classifier) if args.protect else None
    servers = start_servers(tmp, untuned=args.untuned, limits=limits, protected=protected)
    print(f"keel rate limits: {args.limits}" + (f" ({args.redis_url})" if args.limits == "redis" else ""))
    rss_start = psutil.Process(servers.gateway.pid).memory_info().rss / 2**20
    # Idle connections are dropped before the servers drop them (uvicorn: 5 s), so none is reused closed.
    connector = aiohttp.TCPConnector(limit=512, keepalive_timeout=3)
    try:
        async with aiohttp.ClientSession(connector=connector) as session:
            for stream in (False, True):  # warm every path
                for _ in range(100):
                    for base in servers.urls.values():
                        await one(session, base, stream)
            print(f"keel RSS after start (no embedded model): {rss_start:.1f} MiB")
            if args.only_dialects:
                await dialect_cpu(session, servers, args)
                return
            if not args.only_saturation:
                await throughput(session, servers, args)
                if args.dialects:
                    await dialect_cpu(session, servers, args)
                await added_latency(session, servers, args)
                if args.wrk_seconds:
                    wrk_cpu(servers, args.wrk_seconds, 16)
            if args.saturation_seconds:
                await saturation(servers, session, args.saturation_seconds, args.rounds)
    finally:
        servers.stop()


async def throughput(session: aiohttp.ClientSession, servers: Servers, args: argparse.Namespace) -> None:
    urls = {key: servers.urls[key] for key in ("direct", "floor", "keel", "keel+") if key in servers.urls}
    procs = {"floor": psutil.Process(servers.floor.pid), "keel": psutil.Process(servers.gateway.pid)}
    if servers.protected is not None:
        procs["keel+"] = psutil.Process(servers.protected.pid)
    print("\nthroughput (requests/s, median of interleaved rounds) and CPU per request (ms)")
    plus = "keel+" in urls
    print(f"{'mode':<7} {'conc':>4} {'direct':>7} {'floor':>7} {'keel':>7} {'keel/floor':>10} "
          f"{'floor CPU':>9} {'keel CPU':>9}" + (f" {'keel+':>7} {'keel+ CPU':>9}" if plus else ""))
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
                  f"{r['keel'] / r['floor']:>10.2f} {c['floor']:>9.3f} {c['keel']:>9.3f}"
                  + (f" {r['keel+']:>7.0f} {c['keel+']:>9.3f}" if plus else ""))
    print()
    for key in procs:
        plain, stream_cpu = min(cpu_rows[(key, False)]), min(cpu_rows[(key, True)])
        print(f"{key:<5} CPU per plain request {plain:.3f} ms, per 20-chunk stream {stream_cpu:.3f} ms "
              f"({(stream_cpu - plain) / 20:.4f} ms per chunk beyond a plain request)")


async def added_latency(session: aiohttp.ClientSession, servers: Servers, args: argparse.Namespace) -> None:
    print(f"\nfixed rate {args.rate:g} requests/s, {args.rate_requests} requests per target, rotating")
    print(f"{'mode':<7} {'target':<6} {'p50':>8} {'p99':>8} {'added p50':>10} {'added p99':>10} "
          f"{'TTFT p50':>9} {'added TTFT':>11}")
    for stream in (False, True):
        r = await fixed_rate(session, servers, stream, args.rate_requests * 3, args.rate)
        base50, base99, base_ttft = pct(r["direct"], 0.5), pct(r["direct"], 0.99), pct(r["direct_ttft"], 0.5)
        for key in [k for k in ("direct", "floor", "keel", "keel+") if k in servers.urls]:
            p50, p99, ttft = pct(r[key], 0.5), pct(r[key], 0.99), pct(r[key + "_ttft"], 0.5)
            mode = "stream" if stream else "plain"
            print(f"{mode:<7} {key:<6} {p50:>6.2f}ms {p99:>6.2f}ms {p50 - base50:>+8.2f}ms "
                  f"{p99 - base99:>+8.2f}ms {ttft:>7.2f}ms {ttft - base_ttft:>+9.2f}ms")
        if "keel+" in r:
            plus50, plus99 = pct(r["keel+"], 0.5) - pct(r["keel"], 0.5), pct(r["keel+"], 0.99) - pct(r["keel"], 0.99)
            print(f"{'':<7} keys, Redis limits and guardrails add p50 {plus50:+.2f} ms, p99 {plus99:+.2f} ms over keel")


def task_cpu_ns(pid: int) -> int:
    """The CPU time of every thread of `pid` so far, in nanoseconds (the first field of each thread's
    schedstat); 0 for a thread that ended between the listing and the read."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat", "rb") as stat:
                total += int(stat.read().split(maxsplit=1)[0])
        except (FileNotFoundError, ProcessLookupError):
            pass
    return total


async def quiet_cpu_ns(pid: int) -> int:
    """`task_cpu_ns` once the gateway has gone quiet: a call's bookkeeping runs after its answer has left
    (log record, cost, a stored response), and is that call's CPU, not the next one's."""
    now = task_cpu_ns(pid)
    for _ in range(100):  # at most ~0.1 s
        await asyncio.sleep(0.001)
        last, now = now, task_cpu_ns(pid)
        if now - last < 20_000:  # under 20 us of CPU in a millisecond: idle (the event loop's own timers)
            break
    return now


def has_schedstat(pid: int) -> bool:
    return Path(f"/proc/{pid}/task").is_dir()


async def dialect_call(session: aiohttp.ClientSession, base: str, dialect: str, stream: bool) -> tuple[int, bytes]:
    path, body, headers = DIALECTS[dialect]
    payload = orjson.dumps({**body, "stream": True} if stream else body)
    async with session.post(base + path, data=payload,
                            headers={"content-type": "application/json", **headers}) as response:
        return response.status, await response.read()


async def dialect_cpu(session: aiohttp.ClientSession, servers: Servers, args: argparse.Namespace) -> None:
    """CPU per call in the gateway for each API it speaks, beside chat, one call at a time, interleaved."""
    if not has_schedstat(servers.gateway.pid):
        print("\nCPU per call by API: needs Linux's /proc (per-thread schedstat); skipped")
        return
    base, pid = servers.urls["keel"], servers.gateway.pid
    served: list[str] = []
    for dialect in DIALECTS:
        status, answer = await dialect_call(session, base, dialect, False)
        if status == 200:
            served.append(dialect)
        else:
            print(f"\n{dialect}: not served by this gateway yet ({status} {answer[:160]!r}): left out")
    print(f"\nCPU per call by API (gateway, one call at a time, {args.dialect_calls} calls per API and mode, "
          "interleaved; CPU from per-thread schedstat)")
    print(f"{'mode':<7} {'API':<12} {'CPU mean':>9} {'CPU p50':>9} {'CPU p99':>9} {'lat p50':>8} {'lat p99':>8} "
          f"{'+mean vs chat':>14} {'+p50 vs chat':>13} {'+p99 vs chat':>13}")
    for stream in (False, True):
        for _ in range(100):  # warm each route in this mode
            for dialect in served:
                await dialect_call(session, base, dialect, stream)
        cpu: dict[str, list[float]] = {d: [] for d in served}
        latency: dict[str, list[float]] = {d: [] for d in served}
        for i in range(args.dialect_calls):
            order = served[i % len(served):] + served[:i % len(served)]  # each API goes first in turn
            for dialect in order:
                before, started = task_cpu_ns(pid), time.perf_counter()
                status, answer = await dialect_call(session, base, dialect, stream)
                latency[dialect].append((time.perf_counter() - started) * 1000)
                cpu[dialect].append((await quiet_cpu_ns(pid) - before) / 1e6)
                if status != 200:
                    raise RuntimeError(f"{dialect}: {status} {answer[:300]!r}")
        report_dialect_cpu(cpu, "stream" if stream else "plain", latency)


async def asgi_call(app: Any, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
    """One POST to an ASGI app, as uvicorn would hand it over; (status, body)."""
    sent: list[dict[str, Any]] = []
    done = asyncio.Event()
    scope = {"type": "http", "method": "POST", "path": path, "raw_path": path.encode(), "query_string": b"",
             "headers": [(k.encode(), v.encode()) for k, v in {"content-type": "application/json", **headers}.items()],
             "http_version": "1.1", "scheme": "http", "server": ("127.0.0.1", 80), "client": ("127.0.0.1", 1),
             "root_path": ""}
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> dict[str, Any]:
        if pending:
            return pending.pop()
        await done.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            done.set()

    await app(scope, receive, send)
    return int(sent[0]["status"]), b"".join(m.get("body", b"") for m in sent[1:])


async def dialects_in_process(args: argparse.Namespace) -> None:
    """CPU per call by API with the gateway's app in this process, over the simulated model."""
    from keel.config import parse_config
    from keel.engine import Keel
    from keel.observability.store import RecordStore
    from keel.server import create_app

    tmp = Path(tempfile.mkdtemp(prefix="keel-bench-dialects-"))
    url = f"sqlite:///{tmp / 'keel.db'}"
    store = RecordStore(url)
    store.migrate()  # as `keel serve` has it before the first call (stored responses need their table)
    store.close()
    os.environ.pop("KEEL_MASTER_KEY", None)
    keel = Keel(parse_config({"models": [{"name": "chat", "deployments": [{"provider": "simulated"}]}],
                              "store": {"url": url}}))
    app = create_app(keel)
    served = [d for d, (path, body, headers) in DIALECTS.items()
              if (await asgi_call(app, "/v1" + path, orjson.dumps(body), headers))[0] == 200]
    print(f"\nCPU per call by API, in process (the gateway's ASGI app over the simulated model, no network; "
          f"{args.dialect_calls} calls per API and mode, interleaved; CPU of the event loop's thread; "
          f"{', '.join(served)})")
    print(f"{'mode':<7} {'API':<12} {'CPU mean':>9} {'CPU p50':>9} {'CPU p99':>9} "
          f"{'+mean vs chat':>14} {'+p50 vs chat':>13} {'+p99 vs chat':>13}")
    for stream in (False, True):
        bodies = {d: ("/v1" + DIALECTS[d][0], orjson.dumps({**DIALECTS[d][1], "stream": True} if stream
                                                           else DIALECTS[d][1]), DIALECTS[d][2]) for d in served}
        for _ in range(200):
            for dialect in served:
                await asgi_call(app, *bodies[dialect])
        cpu: dict[str, list[float]] = {d: [] for d in served}
        for i in range(args.dialect_calls):
            for dialect in served[i % len(served):] + served[:i % len(served)]:
                started = time.thread_time_ns()
                status, answer = await asgi_call(app, *bodies[dialect])
                cpu[dialect].append((time.thread_time_ns() - started) / 1e6)
                if status != 200:
                    raise RuntimeError(f"{dialect}: {status} {answer[:300]!r}")
        report_dialect_cpu(cpu, "stream" if stream else "plain")
    await keel.close()


def report_dialect_cpu(cpu: dict[str, list[float]], mode: str, latency: dict[str, list[float]] | None = None) -> None:
    """One row per API: CPU per call (mean, p50, p99; latency p50, p99 when measured) and each against chat."""
    chat = (statistics.fmean(cpu["chat"]), pct(cpu["chat"], 0.5), pct(cpu["chat"], 0.99))
    for dialect, values in cpu.items():
        mine = (statistics.fmean(values), pct(values, 0.5), pct(values, 0.99))
        row = f"{mode:<7} {dialect:<12} {mine[0]:>7.3f}ms {mine[1]:>7.3f}ms {mine[2]:>7.3f}ms"
        if latency is not None:
            row += f" {pct(latency[dialect], 0.5):>6.2f}ms {pct(latency[dialect], 0.99):>6.2f}ms"
        if dialect != "chat":
            row += "".join(f" {mine[i] - chat[i]:>+{w}.3f}ms" for i, w in ((0, 12), (1, 11), (2, 11)))
        print(row)


WRK_SCRIPT = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '%s'
"""


def wrk_script(stream: bool, extra: str = "") -> Path:
    """A wrk Lua script that POSTs the bench's chat request (streamed or not)."""
    script = Path(tempfile.mkstemp(suffix=".lua")[1])
    script.write_text(WRK_SCRIPT % orjson.dumps({**BODY, "stream": stream}).decode() + extra)
    return script


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
        script = wrk_script(stream)
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


# wrk's own summary, as one JSON line: its --latency table has no max and rounds the percentiles.
WRK_TAIL = """
done = function(summary, latency, requests)
  local errors = summary.errors.connect + summary.errors.read + summary.errors.write
    + summary.errors.status + summary.errors.timeout
  io.write(string.format('TAIL {"p50": %d, "p99": %d, "max": %d, "requests": %d, "errors": %d}\\n',
    latency:percentile(50), latency:percentile(99), latency.max, summary.requests, errors))
end
"""


@dataclass
class Tail:
    """One saturation run's latencies, in milliseconds."""

    p50: float
    p99: float
    max: float

    @staticmethod
    def median(runs: list[Tail]) -> Tail:
        return Tail(*(statistics.median(getattr(run, name) for run in runs) for name in ("p50", "p99", "max")))


def wrk_tail(url: str, script: Path, connections: int, seconds: int) -> Tail:
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "-s", str(script), url + "/chat/completions"],
        capture_output=True, text=True, check=True,
    ).stdout
    found = orjson.loads(next(line for line in out.splitlines() if line.startswith("TAIL "))[5:])
    if found["errors"]:
        raise RuntimeError(f"{url}: {found['errors']} of {found['requests']} requests failed under wrk")
    return Tail(found["p50"] / 1000, found["p99"] / 1000, found["max"] / 1000)  # wrk counts microseconds


async def aiohttp_tail(session: aiohttp.ClientSession, base: str, stream: bool, connections: int, seconds: int) -> Tail:
    """The same measure with this process as the load (when wrk is missing): it takes a core's worth
    of CPU from the servers, so every target's tail, the baseline's too, comes out longer."""
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        while time.perf_counter() < deadline:
            latencies.append((await one(session, base, stream))[0] * 1000)

    await asyncio.gather(*(worker() for _ in range(connections)))
    return Tail(pct(latencies, 0.5), pct(latencies, 0.99), max(latencies))


async def saturation(servers: Servers, session: aiohttp.ClientSession, seconds: int, rounds: int) -> None:
    """p50, p99 and p99/p50 at 16 connections, and the longest request at one connection: a stall
    (a garbage collection, a thread holding the GIL) shows in the tail long before the median."""
    import shutil

    use_wrk = shutil.which("wrk") is not None
    print(f"\ntail at saturation ({'wrk' if use_wrk else 'aiohttp, in this process'}, {seconds} s per run, "
          f"interleaved, median of {rounds} rounds)")
    if not use_wrk:
        print("wrk is not installed (make bench installs it; or apt-get install wrk): this process is the load, "
              "and it shares the cores with the servers, so every tail here is longer than under wrk")
    print(f"{'mode':<7} {'target':<8} {'p50 c=16':>9} {'p99 c=16':>9} {'p99/p50':>8} {'max c=1':>8} "
          f"{'worst c=1':>10}")
    for stream in (False, True):
        script = wrk_script(stream, WRK_TAIL)
        runs: dict[tuple[str, int], list[Tail]] = {}
        for _ in range(rounds):
            for connections in (16, 1):
                for key, base in servers.urls.items():
                    if use_wrk:
                        tail = wrk_tail(base, script, connections, seconds)
                    else:
                        tail = await aiohttp_tail(session, base, stream, connections, seconds)
                    runs.setdefault((key, connections), []).append(tail)
        os.unlink(script)
        for key in servers.urls:
            busy, alone = Tail.median(runs[(key, 16)]), Tail.median(runs[(key, 1)])
            worst = max(run.max for run in runs[(key, 1)])
            print(f"{'stream' if stream else 'plain':<7} {key:<8} {busy.p50:>7.2f}ms {busy.p99:>7.2f}ms "
                  f"{busy.p99 / busy.p50:>8.1f} {alone.max:>6.2f}ms {worst:>8.2f}ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=1000, help="requests per throughput run")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per row (median reported)")
    parser.add_argument("--rate", type=float, default=10.0)
    parser.add_argument("--rate-requests", type=int, default=300)
    parser.add_argument("--wrk-seconds", type=int, default=8, help="0: skip the wrk runs")
    parser.add_argument("--saturation-seconds", type=int, default=5,
                        help="per run of the tail at saturation; 0: skip it")
    parser.add_argument("--only-saturation", action="store_true", help="measure the tail at saturation only")
    parser.add_argument("--dialects", action=argparse.BooleanOptionalAction, default=True,
                        help="CPU per call of /v1/responses, /v1/messages and /v1/completions beside chat")
    parser.add_argument("--only-dialects", action="store_true", help="measure the CPU per call by API only")
    parser.add_argument("--dialects-in-process", action="store_true",
                        help="only the CPU per call by API with the gateway's app in this process (no network)")
    parser.add_argument("--dialect-calls", type=int, default=1000, help="calls per API and mode in --dialects")
    parser.add_argument("--untuned", action="store_true",
                        help="also a gateway without keel.server.runtime's settings, in the tail table only")
    parser.add_argument("--limits", choices=["off", "memory", "redis"], default="off",
                        help="serve the gateway with rate limits on, in this backend")
    parser.add_argument("--protect", action="store_true",
                        help="also measure keel+: virtual keys, Redis rate limits and guardrails on")
    parser.add_argument("--protect-classifier", action="store_true",
                        help="keel+'s injection check includes the classifier (the local embedder)")
    parser.add_argument("--redis-url", default=os.environ.get("KEEL_TEST_REDIS_URL", "redis://127.0.0.1:6379/0"))
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(dialects_in_process(args) if args.dialects_in_process else run(args))


if __name__ == "__main__":
    main()
