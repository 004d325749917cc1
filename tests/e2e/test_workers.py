"""`keel serve --workers 2`: two processes behind one port, as replicas of each other. Limits, caches
and the request log are shared through the real Redis and PostgreSQL; `/metrics` sums the workers;
in-process state is refused at start-up; SIGTERM drains every worker; a SIGKILLed worker is replaced
and what it spooled reaches the log."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import psycopg
import pytest
from conftest import PG_ADMIN_URL, REDIS_URL, GatewayProcess, fresh_pg_database, require_service
from observability_helpers import eventually, read_records, store_section
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.engine import make_url
from test_shutdown import InFlight, refused, wait_until
from wire import stream_chunks

from keel.observability.store import StoreUnavailable
from keel.testing.fake_openai import FakeBehaviour, FakeOpenAIServer

WORKERS = ["--workers", "2"]
NO_KEY = {"KEEL_MASTER_KEY": ""}
SIM = {"provider": "simulated", "ttft_ms": 1, "token_delay_ms": 0}


# ------------------------------------------------------------------ helpers


def workers_of(gw: GatewayProcess) -> list[int]:
    """The worker processes of a `keel serve --workers` parent (uvicorn spawns them)."""
    assert gw.proc is not None
    pid = gw.proc.pid
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except FileNotFoundError:
        return []
    found = []
    for child in map(int, children):
        try:
            if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes():
                found.append(child)
        except FileNotFoundError:
            continue
    return found


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (dead, not yet reaped by its parent) counts as gone.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


@pytest.fixture
def served(gateway: Callable[..., GatewayProcess]) -> Iterator[Callable[..., GatewayProcess]]:
    """`gateway`, with workers that outlive a parent killed by the fixture's timeout killed too."""
    started: list[GatewayProcess] = []
    seen: set[int] = set()

    def start(config: dict[str, Any], env: dict[str, str] | None = None) -> GatewayProcess:
        gw = gateway(config, {**NO_KEY, **(env or {})}, WORKERS)
        started.append(gw)
        wait_until(lambda: gw.log().count("Application startup complete") == 2, timeout=30)  # both serve
        return gw

    yield start
    for gw in started:
        seen.update(workers_of(gw))
        gw.stop()
    for pid in seen:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)


def metrics(gw: GatewayProcess) -> list[Any]:
    text = httpx.get(gw.url + "/metrics", timeout=10).raise_for_status().text
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def per_worker(gw: GatewayProcess) -> dict[str, float]:
    """`keel_worker_requests_total` by pid: the calls each worker answered."""
    return {s.labels["pid"]: s.value for s in metrics(gw) if s.name == "keel_worker_requests_total"}


def total(gw: GatewayProcess, name: str, **labels: str) -> float:
    return sum(s.value for s in metrics(gw) if s.name == name and labels.items() <= s.labels.items())


def client(gw: GatewayProcess, **options: Any) -> openai.OpenAI:
    # A connection per call ("connection: close"): each call is accepted by whichever worker is first.
    return openai.OpenAI(base_url=gw.url + "/v1", api_key="none", default_headers={"connection": "close"},
                         **{"max_retries": 0, **options})


def ask(api: openai.OpenAI, model: str, text: str) -> tuple[int, str]:
    """(status, request id) of one chat call through the openai client."""
    try:
        raw = api.chat.completions.with_raw_response.create(
            model=model, messages=[{"role": "user", "content": text}], temperature=0)
    except openai.APIStatusError as exc:
        return exc.status_code, exc.response.headers["x-keel-request-id"]
    raw.parse()
    return raw.status_code, raw.headers["x-keel-request-id"]


def logged_ids(url: str) -> Counter[str]:
    try:
        return Counter(r["request_id"] for r in read_records(url) if r["endpoint"] == "chat")
    except StoreUnavailable:  # the tables are not made yet
        return Counter()


def wait_for_log(url: str, ids: list[str], timeout: float = 20) -> Counter[str]:
    """The log's request ids once it holds every one of `ids` (polled, with a bound)."""
    seen: list[Counter[str]] = [Counter()]

    def complete() -> bool:
        seen[0] = logged_ids(url)
        return set(ids) <= set(seen[0])

    eventually(complete, f"the records of all {len(ids)} calls", timeout)
    return seen[0]


# ------------------------------------------------------------------ shared state across the workers


def test_two_workers_share_limits_cache_and_log_sum_their_metrics_and_drain_on_sigterm(
    served: Callable[..., GatewayProcess], fake_upstream: FakeOpenAIServer, redis_prefix: str, tmp_path: Path,
) -> None:
    upstream = {"provider": "openai", "base_url": fake_upstream.url, "model": "gpt-4o-mini"}
    with fresh_pg_database("keel_workers") as url:
        gw = served({
            "models": [
                {"name": "free", "deployments": [upstream]},
                {"name": "limited", "deployments": [upstream], "limits": {"per_model": {"requests_per_minute": 5}}},
                {"name": "cached", "deployments": [upstream],
                 "cache": {"backend": "redis", "exact": {"enabled": True}}},
                {"name": "slow", "deployments": [{"provider": "simulated", "ttft_ms": 300, "token_delay_ms": 250}]},
            ],
            "limits": {"backend": "redis"},
            "state": {"redis_url": REDIS_URL, "key_prefix": redis_prefix},
            "budgets": [{"scope": "global", "limit_usd": 100}],
            "store": store_section(url, tmp_path),
        })
        api = client(gw)
        statuses: list[int] = []
        ids: list[str] = []

        def call(model: str, text: str) -> int:
            status, rid = ask(api, model, text)
            statuses.append(status)
            ids.append(rid)
            return status

        # Calls land on both workers.
        for i in range(200):
            call("free", f"spread {i}")
            if i >= 3 and len(workers := per_worker(gw)) == 2 and all(workers.values()):
                break
        workers = per_worker(gw)
        assert len(workers) == 2 and all(workers.values()), workers

        # A limit of 5 a minute holds across the workers as for one (sent until both took some).
        before = per_worker(gw)
        limited: list[int] = []
        while len(limited) < 12 or not all(n > before[pid] for pid, n in per_worker(gw).items()):
            assert len(limited) < 100, "the limited calls all went to one worker"
            limited.append(call("limited", f"limited {len(limited)}"))
        refusals = limited.count(429)
        # 5, or 6 if the calls straddle a minute (the sliding window's weight of the one before).
        assert limited.count(200) in (5, 6) and limited.count(200) + refusals == len(limited), limited

        # The cache is shared: one question asked eight times reaches the upstream once.
        upstream_before = fake_upstream.fake.stats.requests
        cached = [call("cached", "the same question") for _ in range(8)]
        assert cached == [200] * 8 and fake_upstream.fake.stats.requests == upstream_before + 1

        # /metrics sums both workers: every call counted once, whichever worker answers the scrape.
        wait_until(lambda: total(gw, "keel_requests_total") == len(ids), timeout=10)
        assert sum(per_worker(gw).values()) == len(ids)
        assert total(gw, "keel_requests_total", model="limited", outcome="rate_limited") == refusals
        assert total(gw, "keel_cache_requests_total", model="cached", status="hit_exact") == 7
        # What a worker reads at scrape time (its rate limiter's refusals) is summed too, within a second.
        wait_until(lambda: total(gw, "keel_rate_limited_total") == refusals, timeout=10)

        # SIGTERM to the parent drains streams on both workers; then the log has every call exactly once.
        ids += sigterm_lets_streams_finish_on_every_worker(gw, "slow")
        logged = wait_for_log(url, ids)
        assert len(ids) == len(set(ids)) and set(logged) == set(ids) and set(logged.values()) == {1}


# ------------------------------------------------------------------ refused at start-up


def test_two_workers_with_in_process_limits_budgets_and_cache_are_refused_at_start_up(tmp_path: Path) -> None:
    config = tmp_path / "keel.yaml"
    config.write_text(
        "models:\n"
        "  - {name: sim, deployments: [{provider: simulated}], cache: {exact: {enabled: true}}}\n"
        "limits: {per_model: {requests_per_minute: 10}}\n"
        "budgets: [{scope: global, limit_usd: 5}]\n"
    )
    done = subprocess.run([sys.executable, "-m", "keel.cli", "serve", "--config", str(config), "--workers", "2",
                           "--port", "0"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    message = " ".join(done.stderr.split())
    assert "--workers 2" in message
    assert "set limits.backend: redis and limits.redis_url (or state.redis_url)" in message
    assert "budgets are counted in memory (no state.redis_url): set state.redis_url" in message
    assert "models[0].cache.exact is kept in memory (models[0].cache.backend: memory)" in message
    assert "Uvicorn running" not in done.stderr  # refused before anything listens


# ------------------------------------------------------------------ crashing


def sigterm_lets_streams_finish_on_every_worker(gw: GatewayProcess, model: str) -> list[str]:
    """Streams in flight, then SIGTERM to the parent: new connections are refused at once, every
    stream ends whole, the workers exit and the parent exits 0. Returns the streams' request ids."""
    workers = workers_of(gw)
    body = {"model": model, "stream": True, "messages": [{"role": "user", "content": "one two three four five"}]}
    started = threading.Semaphore(0)

    def read_stream() -> tuple[int, bytes, str]:
        with httpx.stream("POST", gw.url + "/v1/chat/completions", json=body, timeout=20,
                          headers={"connection": "close"}) as response:
            started.release()
            return response.status_code, response.read(), response.headers["x-keel-request-id"]

    streams = [InFlight(read_stream) for _ in range(4)]
    for _ in streams:
        assert started.acquire(timeout=10), "a stream never started"
    assert gw.proc is not None
    gw.proc.send_signal(signal.SIGTERM)
    wait_until(lambda: refused(gw), timeout=5)
    assert any(s.thread.is_alive() for s in streams), "the streams should still be draining"
    ids = []
    for stream in streams:
        status, raw, rid = stream.wait(timeout=15)
        assert status == 200
        text = "".join(c["choices"][0]["delta"].get("content") or "" for c in stream_chunks(raw) if c["choices"])
        assert text == "echo: one two three four five"  # ends with [DONE]: not cut
        ids.append(rid)
    assert gw.proc.wait(timeout=20) == 0, gw.log()
    assert not any(alive(pid) for pid in workers)
    assert gw.log().count("Finished server process") == 2
    return ids


def test_a_sigkilled_worker_is_replaced_and_every_answered_call_is_logged_through_the_spool(
    served: Callable[..., GatewayProcess], tmp_path: Path,
) -> None:
    # The log's database does not exist yet: both workers spool what they answer to their own files.
    # One is killed with calls in flight, and the database is made; the other worker keeps serving
    # (the client retries what was cut), the supervisor starts a new worker, and every answered call
    # is in the log exactly once, the dead worker's spooled ones included.
    try:
        admin = psycopg.connect(PG_ADMIN_URL, connect_timeout=3, autocommit=True)
    except psycopg.Error as exc:
        require_service("postgres", f"cannot connect: {exc}")
    name = f"keel_workers_kill_{os.getpid()}_{time.monotonic_ns() % 10**6}"
    url = make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    store = store_section(url, tmp_path)
    spools = Path(store["spool_path"])
    with FakeOpenAIServer(FakeBehaviour(latency_ms=1500)) as slow, FakeOpenAIServer(FakeBehaviour()) as quick:
        gw = served({"models": [
            {"name": "quick", "deployments": [{"provider": "openai", "base_url": quick.url, "model": "m"}]},
            {"name": "slow", "deployments": [{"provider": "openai", "base_url": slow.url, "model": "m"}]},
        ], "store": store})
        try:
            api = client(gw, max_retries=3)
            answered: list[str] = []
            for i in range(20):  # answered, and spooled by whichever worker took them
                status, rid = ask(api, "quick", f"before {i}")
                assert status == 200
                answered.append(rid)

            def spooled() -> int:
                return sum(len(p.read_bytes().splitlines()) for p in spools.parent.glob(spools.name + ".worker-*"))

            # Spooled: on disk, no longer only in a worker's memory (a SIGKILL loses what is only there).
            wait_until(lambda: spooled() == len(answered), timeout=10)
            workers = workers_of(gw)

            # Calls in flight on the workers; the one holding the most connections is killed.
            in_flight = [InFlight(lambda i=i: ask(api, "slow", f"during {i}")) for i in range(6)]
            wait_until(lambda: slow.fake.stats.requests >= 6, timeout=10)
            victim = max(workers, key=lambda pid: len(connections_of(pid, gw.port)))
            assert connections_of(victim, gw.port), "no call in flight on either worker"
            victims_spool = spools.with_name(f"{spools.name}.worker-{victim}")
            assert victims_spool.exists()
            os.kill(victim, signal.SIGKILL)
            # The log's database comes back (early: the writers back off longer the longer it is away).
            admin.execute(f'CREATE DATABASE "{name}"')

            for call in in_flight:  # the cut ones retried by the client, answered by another worker
                status, rid = call.wait(timeout=30)
                assert status == 200
                answered.append(rid)
            wait_until(lambda: len(workers_of(gw)) == 2 and victim not in workers_of(gw), timeout=20)
            (replacement,) = set(workers_of(gw)) - set(workers)
            for i in range(200):  # the replacement serves
                status, rid = ask(api, "quick", f"after {i}")
                assert status == 200
                answered.append(rid)
                if per_worker(gw).get(str(replacement)):
                    break
            assert per_worker(gw).get(str(replacement)), "the new worker never answered"

            logged = wait_for_log(url, answered, timeout=30)
            assert set(logged) == set(answered) and set(logged.values()) == {1}
            assert not victims_spool.exists()  # replayed by the worker that took its place, and removed
        finally:
            gw.stop()
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            admin.close()


def connections_of(pid: int, port: int) -> list[int]:
    """The socket inodes of `pid`'s established connections to `port` (calls it is serving)."""
    ours = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[1].split(":")[1], 16) == port and fields[3] == "01":
            ours.add(fields[9])
    found = []
    try:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:[") and target[8:-1] in ours:
                found.append(int(target[8:-1]))
    except FileNotFoundError:
        return []
    return found
