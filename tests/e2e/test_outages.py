"""Acceptance: the services behind a running `keel serve` fail mid-run (issue 16), and Keel keeps serving
as its fail-open and fail-closed settings say, and loses nothing it acknowledged.

Each outage is a `TcpProxy` (keel.testing.tcp_proxy) between the gateway and the machine's own
PostgreSQL or Redis, stopped: every connection through it is cut and new ones are refused, while the
server goes on serving everyone else. Clients are the official openai SDK (its retries off), the
upstream a fake one; every call's id is the `x-keel-request-id` of its answer, error or not.

- PostgreSQL (the request log, virtual keys, the exact cache) goes away: calls with the master key are
  answered, a cached question is a miss, a virtual key is refused with 503 `keys_unavailable`, the
  records go to the spool on disk; once it is back, keys and cache work again and every call is in
  the log exactly once, with the status its client saw.
- Redis goes away: with `limits.on_backend_error: fail_open`, calls are answered uncounted and the
  cache is a miss; with `fail_closed` they are refused with 503 `rate_limit_store_unavailable`;
  budgets in Redis refuse calls with 503 `budget_store_unavailable`; either refusal makes `/readyz`
  not ready, naming the store. Once it is back, counting, caching and budgets resume.
- The spool's disk fills up while the database is down: calls are still answered, the records that
  cannot be kept are counted, logged and reported by `/readyz`, the spool keeps only whole records,
  and what it took before (and after space is freed) reaches the log once the database is back.
"""

from __future__ import annotations

import errno
import os
import subprocess
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest
from conftest import REDIS_URL, GatewayProcess, fresh_pg_database
from observability_helpers import (
    PRICING,
    REQUEST_ID,
    assert_openai_error,
    eventually,
    metric_total,
    openai_deployment,
    read_records,
    stop_and_flush,
    store_section,
    wait_until_counted,
)
from sqlalchemy.engine import make_url

from keel.observability.store import StoreUnavailable
from keel.testing.fake_openai import FakeOpenAIServer
from keel.testing.tcp_proxy import TcpProxy

MASTER = "sk-master-outages-e2e"


# ---------------------------------------------------------------------------- helpers


@dataclass(frozen=True)
class Answer:
    """One call as its client saw it end."""

    status: int
    request_id: str
    headers: httpx.Headers
    body: dict[str, Any]

    @property
    def cache(self) -> str | None:
        return self.headers.get("x-keel-cache")


class Caller:
    """An openai client (its retries off) that keeps every answer it got in `answers`, shared by callers."""

    def __init__(self, gw: GatewayProcess, key: str, answers: list[Answer]) -> None:
        self.api = openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0, timeout=20)
        self.answers = answers

    def ask(self, content: str) -> Answer:
        messages: list[Any] = [{"role": "user", "content": content}]
        try:
            raw = self.api.chat.completions.with_raw_response.create(model="chat", messages=messages, temperature=0)
        except openai.APIStatusError as exc:
            answer = Answer(exc.status_code, exc.response.headers[REQUEST_ID], exc.response.headers,
                            exc.response.json())
        else:
            completion = raw.parse()
            assert completion.choices[0].message.content == f"echo: {content}"
            answer = Answer(raw.status_code, raw.headers[REQUEST_ID], raw.headers, completion.model_dump())
        self.answers.append(answer)
        return answer


def chat_config(upstream: FakeOpenAIServer, store: dict[str, Any], **more: Any) -> dict[str, Any]:
    return {"models": [{"name": "chat", "deployments": [openai_deployment("up", upstream.url)]}],
            "store": store, **more}


def readiness(gw: GatewayProcess) -> tuple[int, dict[str, Any]]:
    response = httpx.get(gw.url + "/readyz", timeout=10)
    return response.status_code, response.json()


def assert_not_ready(gw: GatewayProcess, check: str, code: str) -> None:
    """/readyz turns the gateway away (within its 1 s probe cache), naming the check and what calls meet."""
    eventually(lambda: readiness(gw)[0] == 503, f"/readyz not ready for want of its {check}")
    body = readiness(gw)[1]
    assert body["status"] == "not_ready" and body["checks"][check]["ok"] is False, body
    assert code in body["checks"][check]["detail"]
    assert [name for name, each in body["checks"].items() if not each["ok"]] == [check]


def logged(url: str) -> Counter[str]:
    """The request ids in the log, each with how many rows it has."""
    try:
        return Counter(row["request_id"] for row in read_records(url))
    except StoreUnavailable:  # no tables yet
        return Counter()


def assert_logged_exactly(url: str, answers: list[Answer]) -> None:
    """Every call is in the log once, with the status its client saw, and nothing else is."""
    rows = read_records(url)
    assert Counter(row["request_id"] for row in rows) == Counter(a.request_id for a in answers)
    assert {row["request_id"]: row["status"] for row in rows} == {a.request_id: a.status for a in answers}


def spool_lines(spool: Path) -> list[bytes]:
    """The lines of a spool file that are finished (a line being appended right now is not yet)."""
    return spool.read_bytes().split(b"\n")[:-1] if spool.exists() else []


def spooled_ids(spool: Path) -> list[str]:
    """The request ids in a spool file, in order; every finished line must be a whole record."""
    return [orjson.loads(line)["row"]["request_id"] for line in spool_lines(spool)]


@pytest.fixture
def upstream() -> Iterator[FakeOpenAIServer]:
    with FakeOpenAIServer() as server:
        yield server


@pytest.fixture
def postgres() -> Iterator[tuple[str, TcpProxy]]:
    """A fresh database on the machine's PostgreSQL (its URL) and a proxy in front of the server."""
    with fresh_pg_database("keel_outage") as url:
        target = make_url(url)
        proxy = TcpProxy((target.host or "127.0.0.1", target.port or 5432)).start()
        try:
            yield url, proxy
        finally:
            proxy.stop()


@pytest.fixture
def redis_proxy(redis_prefix: str) -> Iterator[Callable[[], TcpProxy]]:
    """Proxies in front of the machine's Redis (skipped when it is not running), stopped afterwards."""
    target = make_url(REDIS_URL)
    started: list[TcpProxy] = []

    def start() -> TcpProxy:
        started.append(TcpProxy((target.host or "127.0.0.1", target.port or 6379)).start())
        return started[-1]

    yield start
    for proxy in started:
        proxy.stop()


# ---------------------------------------------------------------------------- PostgreSQL


def test_a_postgresql_outage_mid_run_keeps_calls_answered_and_every_one_reaches_the_log_once(
    gateway: Callable[..., GatewayProcess], upstream: FakeOpenAIServer, postgres: tuple[str, TcpProxy], tmp_path: Path,
) -> None:
    url, proxy = postgres
    store = store_section(proxy.url(url), tmp_path)
    spool = Path(store["spool_path"])
    # The request log, the virtual keys and the exact cache (cache.postgres_url: store.url) in one database.
    config = chat_config(upstream, store, auth={"virtual_keys": True, "cache_ttl_s": 0.05},
                         cache={"backend": "postgres", "exact": {"enabled": True}})
    gw = gateway(config, {"KEEL_MASTER_KEY": MASTER})
    answers: list[Answer] = []
    try:
        made = httpx.post(gw.url + "/admin/keys", json={"tenant": "team-a"},
                          headers={"authorization": f"Bearer {MASTER}"}, timeout=10)
        assert made.status_code == 201, made.text
        master, team = Caller(gw, MASTER, answers), Caller(gw, made.json()["key"], answers)

        assert team.ask("before").status == 200
        assert master.ask("cached question").cache == "miss"
        wait_until_counted([gw], len(answers), key=MASTER)  # its answer stored in the cache
        assert master.ask("cached question").cache == "hit"
        upstream_calls = upstream.fake.stats.requests

        wait_until_counted([gw], len(answers), key=MASTER)  # the cut lands between calls, not in one's bookkeeping
        proxy.stop()  # PostgreSQL goes away, with the gateway's open connections
        cut_at = len(answers)
        during = [master.ask(f"during {i}") for i in range(5)]
        assert [a.status for a in during] == [200] * 5
        again = master.ask("cached question")
        assert (again.status, again.cache) == (200, "miss")  # the cache fails open: a miss, not an error
        assert upstream.fake.stats.requests == upstream_calls + 6

        # A virtual key cannot be checked: refused (fail-closed), once its lookup's 50 ms cache has lapsed.
        eventually(lambda: team.ask("a key needs the database").status == 503, "a virtual key refused")
        refused = answers[-1]
        assert_openai_error(refused.body, "keys_unavailable")
        assert refused.body["error"]["type"] == "api_error"
        assert "cannot check API keys" in refused.body["error"]["message"]

        # The records are on disk, in the spool, and /readyz says so without turning the gateway away.
        outage = {a.request_id for a in answers[cut_at:]}
        eventually(lambda: outage <= set(spooled_ids(spool)), "the records of the outage's calls spooled")
        status, body = readiness(gw)
        assert status == 200 and body["status"] == "ready"
        assert body["checks"]["request_log"]["detail"].startswith("degraded:")
        assert str(spool) in body["checks"]["request_log"]["detail"]
        assert metric_total(gw, "keel_cache_backend_up", MASTER, backend="postgresql") == 0

        proxy.start()  # back
        eventually(lambda: team.ask("after").status == 200, "the virtual key accepted again")
        eventually(lambda: master.ask("cached question").cache == "hit", "the cache hit again")
        eventually(lambda: set(logged(url)) >= {a.request_id for a in answers}, "every call in the log", 40)
        assert metric_total(gw, "keel_log_records_dropped_total", MASTER) == 0
        assert metric_total(gw, "keel_cache_backend_up", MASTER, backend="postgresql") == 1
    finally:
        stop_and_flush(gw)
    assert_logged_exactly(url, answers)
    assert not spool.exists()
    # Once per outage, not once per call.
    assert_logged_once_without_traceback(gw, "request log store unavailable, spooling records", "is reachable again")


def refused_while_cut(gw: GatewayProcess, caller: Caller, answers: list[Answer], proxy: TcpProxy,
                      code: str) -> Answer:
    """Cut `proxy` once the calls so far are counted (a budget is settled after the answer has left),
    then a call: refused with 503 `code`, an api_error in OpenAI's shape."""
    wait_until_counted([gw], len(answers), key=MASTER)
    proxy.stop()
    refused = caller.ask(f"while {code}")
    assert refused.status == 503
    assert_openai_error(refused.body, code)
    assert refused.body["error"]["type"] == "api_error"
    return refused


def assert_logged_once_without_traceback(gw: GatewayProcess, *messages: str) -> None:
    """The gateway's log says each of `messages` exactly once, and holds no traceback."""
    log = gw.log()
    for message in messages:
        assert log.count(message) == 1, log
    assert "Traceback" not in log


# ---------------------------------------------------------------------------- Redis


def test_redis_unreachable_with_fail_open_answers_calls_uncounted_and_uncached_and_both_resume(
    gateway: Callable[..., GatewayProcess], upstream: FakeOpenAIServer, redis_proxy: Callable[[], TcpProxy],
    redis_prefix: str, tmp_path: Path,
) -> None:
    proxy = redis_proxy()
    log_url = f"sqlite:///{tmp_path}/log.db"
    config = chat_config(
        upstream, store_section(log_url, tmp_path), state={"key_prefix": redis_prefix},
        limits={"backend": "redis", "redis_url": proxy.url(REDIS_URL), "on_backend_error": "fail_open",
                "backend_retry_s": 0.2, "per_key": {"requests_per_minute": 1000}},
        cache={"backend": "redis", "redis_url": proxy.url(REDIS_URL), "exact": {"enabled": True}},
    )
    gw = gateway(config, {"KEEL_MASTER_KEY": MASTER})
    answers: list[Answer] = []
    caller = Caller(gw, MASTER, answers)
    try:
        first = caller.ask("cached question")
        assert (first.cache, first.headers["x-ratelimit-remaining-requests"]) == ("miss", "999")
        wait_until_counted([gw], 1, key=MASTER)  # its answer stored in the cache
        assert caller.ask("cached question").cache == "hit"
        upstream_calls = upstream.fake.stats.requests

        wait_until_counted([gw], len(answers), key=MASTER)
        proxy.stop()  # Redis goes away
        during = [caller.ask("cached question")] + [caller.ask(f"during {i}") for i in range(3)]
        assert [a.status for a in during] == [200] * 4
        assert [a.cache for a in during] == ["miss"] * 4
        assert not any("x-ratelimit-remaining-requests" in a.headers for a in during)  # not counted
        assert upstream.fake.stats.requests == upstream_calls + 4
        assert metric_total(gw, "keel_rate_limit_backend_errors_total", MASTER, action="fail_open") == 4
        assert metric_total(gw, "keel_rate_limit_backend_up", MASTER) == 0
        assert metric_total(gw, "keel_cache_backend_up", MASTER, backend="redis") == 0

        proxy.start()  # back
        eventually(lambda: "x-ratelimit-remaining-requests" in caller.ask("after").headers, "calls counted again")
        eventually(lambda: caller.ask("cached question").cache == "hit", "the entry stored before served again")
        # Counting went on where it stopped: the calls let through meanwhile were never counted.
        counted = [a for a in answers if "x-ratelimit-remaining-requests" in a.headers]
        assert int(answers[-1].headers["x-ratelimit-remaining-requests"]) == 1000 - len(counted)
        assert metric_total(gw, "keel_rate_limit_backend_up", MASTER) == 1
        assert metric_total(gw, "keel_cache_backend_up", MASTER, backend="redis") == 1
    finally:
        stop_and_flush(gw)
    assert_logged_exactly(log_url, answers)
    assert_logged_once_without_traceback(
        gw, "the rate-limit store (Redis) cannot be reached", "the cache store (Redis) cannot be reached")


def test_redis_unreachable_with_fail_closed_limits_and_budgets_refuses_calls_precisely_then_serves_again(
    gateway: Callable[..., GatewayProcess], upstream: FakeOpenAIServer, redis_proxy: Callable[[], TcpProxy],
    redis_prefix: str, tmp_path: Path,
) -> None:
    # Two proxies to the one Redis: the rate limits' and the budgets' (state.redis_url), cut one at a time.
    limits_proxy, budgets_proxy = redis_proxy(), redis_proxy()
    log_url = f"sqlite:///{tmp_path}/log.db"
    config = chat_config(
        upstream, store_section(log_url, tmp_path),
        state={"redis_url": budgets_proxy.url(REDIS_URL), "key_prefix": redis_prefix},
        budgets=[{"scope": "global", "limit_usd": 1000}], pricing=PRICING,  # priced: each call holds some
        limits={"backend": "redis", "redis_url": limits_proxy.url(REDIS_URL), "on_backend_error": "fail_closed",
                "backend_retry_s": 0.2, "per_key": {"requests_per_minute": 1000}},
    )
    gw = gateway(config, {"KEEL_MASTER_KEY": MASTER})
    answers: list[Answer] = []
    caller = Caller(gw, MASTER, answers)
    try:
        assert caller.ask("before").status == 200
        refused = refused_while_cut(gw, caller, answers, limits_proxy, "rate_limit_store_unavailable")
        assert refused.headers["retry-after"] == "1" and "x-should-retry" not in refused.headers
        assert "limits.redis_url" in refused.body["error"]["message"]
        assert_not_ready(gw, "rate_limit_store", "rate_limit_store_unavailable")
        limits_proxy.start()
        eventually(lambda: caller.ask("limits back").status == 200, "calls served once the limits' Redis is back")
        eventually(lambda: readiness(gw)[0] == 200, "/readyz ready again")

        refused = refused_while_cut(gw, caller, answers, budgets_proxy, "budget_store_unavailable")
        assert "retry-after" not in refused.headers and "x-should-retry" not in refused.headers
        assert "state.redis_url" in refused.body["error"]["message"]
        assert_not_ready(gw, "budget_store", "budget_store_unavailable")
        budgets_proxy.start()
        eventually(lambda: readiness(gw)[0] == 200, "/readyz ready again")
        assert caller.ask("budgets back").status == 200
    finally:
        stop_and_flush(gw)
    assert_logged_exactly(log_url, answers)
    assert_logged_once_without_traceback(gw)


# ---------------------------------------------------------------------------- the spool's disk full

PAGE = 4096
# A record of this question (asked, and echoed back) is a spool line of more than two pages, so one
# free page and the rest of the spool's last page can never hold it: each append runs out part-way.
BIG = "x" * 6000


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 256 KiB tmpfs of the test's own, unmounted afterwards; skipped where mounting is not allowed."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(disk)],
                             capture_output=True, text=True, check=False)
    if mounted.returncode != 0:
        pytest.skip(f"a full disk needs a small tmpfs, and mounting one is not permitted here "
                    f"(needs root with CAP_SYS_ADMIN): {mounted.stderr.strip()}")
    try:
        yield disk
    finally:
        if subprocess.run(["umount", str(disk)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(disk)], check=False)


def fill(disk: Path) -> Path:
    """Fill `disk` but for one page, as another program would: the file that holds the rest."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            try:
                os.write(fd, b"\0" * PAGE)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
                break
        os.ftruncate(fd, os.fstat(fd).st_size - PAGE)
    finally:
        os.close(fd)
    return filler


def test_with_the_database_down_and_the_spools_disk_full_calls_are_answered_and_the_loss_counted_not_silent(
    gateway: Callable[..., GatewayProcess], upstream: FakeOpenAIServer, postgres: tuple[str, TcpProxy],
    small_disk: Path, tmp_path: Path,
) -> None:
    url, proxy = postgres
    spool = small_disk / "spool.jsonl"
    config = chat_config(upstream, store_section(proxy.url(url), tmp_path, spool_path=str(spool)))
    gw = gateway(config, {"KEEL_MASTER_KEY": MASTER})
    answers: list[Answer] = []
    caller = Caller(gw, MASTER, answers)
    try:
        written = caller.ask("written")
        eventually(lambda: written.request_id in logged(url), "the first record written")

        proxy.stop()  # the database goes away: records are spooled
        spooled = [caller.ask(f"spooled {i} {BIG}") for i in range(3)]
        eventually(lambda: spooled_ids(spool) == [a.request_id for a in spooled], "three records spooled")
        size = spool.stat().st_size
        assert min(len(line) for line in spool_lines(spool)) > 2 * PAGE

        filler = fill(small_disk)  # and the disk fills up
        lost = [caller.ask(f"lost {i} {BIG}") for i in range(3)]
        assert [a.status for a in lost] == [200] * 3  # still serving
        eventually(lambda: metric_total(gw, "keel_log_records_dropped_total", MASTER) == 3, "3 drops counted")
        # The spool holds whole records only: an append that ran out of room part-way left nothing.
        assert spool.stat().st_size == size and spooled_ids(spool) == [a.request_id for a in spooled]
        log = gw.log()
        assert f"the spool file {spool} cannot be written ([Errno 28] No space left on device)" in log, log
        assert "3 dropped in all" in log
        status, body = readiness(gw)
        assert status == 200  # serving goes on; the loss is reported, not hidden
        detail = body["checks"]["request_log"]["detail"]
        assert detail.startswith("degraded:") and "none is lost" not in detail, detail
        assert "3 records could not be kept since start" in detail, detail

        filler.unlink()  # space again: what comes now is spooled after the whole records already there
        kept = [caller.ask(f"kept {i} {BIG}") for i in range(2)]
        eventually(lambda: spooled_ids(spool) == [a.request_id for a in spooled + kept], "two more spooled")

        proxy.start()  # the database is back: the spool is replayed
        eventually(lambda: set(logged(url)) >= {a.request_id for a in [written, *spooled, *kept]},
                   "the spooled records replayed", 40)
        assert metric_total(gw, "keel_log_records_dropped_total", MASTER) == 3  # nothing else lost
    finally:
        stop_and_flush(gw)
    assert_logged_exactly(url, [written, *spooled, *kept])  # the lost ones are not there, the rest once each
    assert list(small_disk.iterdir()) == []  # the spool replayed and removed
