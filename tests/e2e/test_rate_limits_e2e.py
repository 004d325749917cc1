"""Acceptance: rate limits through `keel serve`, as clients and operators see them.

- Two replicas sharing the real Redis (a key prefix of the test's own) enforce one global limit as
  one replica would: 300 concurrent calls split across both against 100 requests/minute, and
  against a tokens-per-minute limit that fits 100 calls, let 100 through (±1); every other call is
  a 429 `rate_limit_exceeded` with Retry-After, and every answer carries the x-ratelimit-* headers.
- A Redis of the test's own, stopped mid-run: with `fail_open` calls go on uncounted, with
  `fail_closed` they get 503; either way the outage is logged once, counted in /metrics, and
  counting resumes when Redis is back. (The machine's Redis on 6379 is never stopped.)

The simulated provider answers, so no upstream is needed; the client is httpx, over real HTTP.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from conftest import REDIS_URL, GatewayProcess, free_port, require_service
from observability_helpers import start_all, stop_and_flush, wait_until_counted

from keel.cost.tokens import prompt_tokens
from keel.types import ChatRequest

KEY = "sk-keel-rate-limits-e2e-5d0e"
CALLS = 300
MESSAGES: list[dict[str, Any]] = [{"role": "user", "content": "hello"}]
MAX_TOKENS = 20
# What the gateway charges each call up front: the estimated prompt plus max_tokens.
CALL_TOKENS = prompt_tokens(ChatRequest.model_validate({"model": "sim", "messages": MESSAGES})) + MAX_TOKENS


def serving(limits: dict[str, Any], latency_ms: float = 0) -> dict[str, Any]:
    return {
        "models": [{"name": "sim", "deployments": [{"provider": "simulated", "latency_ms": latency_ms}]}],
        "store": {"url": "sqlite:///keel.db"},
        "limits": limits,
    }


async def burst(urls: list[str], calls: int) -> list[httpx.Response]:
    """`calls` chat calls at once, alternating between the gateways."""
    limits = httpx.Limits(max_connections=calls, max_keepalive_connections=calls)
    async with httpx.AsyncClient(limits=limits, timeout=60, headers={"authorization": f"Bearer {KEY}"}) as client:
        body = {"model": "sim", "messages": MESSAGES, "max_tokens": MAX_TOKENS}
        return list(await asyncio.gather(*(
            client.post(f"{urls[i % len(urls)]}/v1/chat/completions", json=body) for i in range(calls))))


def two_replicas(tmp_path: Any, config: dict[str, Any]) -> list[GatewayProcess]:
    gateways = [GatewayProcess(config, tmp_path, {"KEEL_MASTER_KEY": KEY}) for _ in range(2)]
    start_all(*gateways)
    return gateways


def check_refusals(responses: list[httpx.Response]) -> None:
    for response in responses:
        assert response.headers["x-keel-request-id"].startswith("req_")
        if response.status_code == 200:
            continue
        assert response.status_code == 429, response.text
        error = response.json()["error"]
        assert error["code"] == "rate_limit_exceeded" and error["type"] == "rate_limit_error"
        assert int(response.headers["retry-after"]) >= 1 and response.headers["x-should-retry"] == "true"


@pytest.fixture
def shared_redis(redis_prefix: str) -> dict[str, Any]:
    return {"backend": "redis", "redis_url": REDIS_URL}


async def test_two_replicas_let_exactly_100_of_300_calls_through_a_global_limit_of_100_rpm(
    tmp_path: Any, redis_prefix: str, shared_redis: dict[str, Any],
) -> None:
    config = {**serving({**shared_redis, "global": {"requests_per_minute": 100}}),
              "state": {"key_prefix": redis_prefix}}
    gateways = two_replicas(tmp_path, config)
    try:
        responses = await burst([gw.url for gw in gateways], CALLS)
    finally:
        stop_and_flush(*gateways)
    statuses = Counter(response.status_code for response in responses)
    assert abs(statuses[200] - 100) <= 1 and statuses[200] + statuses[429] == CALLS, statuses
    check_refusals(responses)
    # Every answer, not only refusals, says where the caller stands.
    for response in responses:
        assert response.headers["x-ratelimit-limit-requests"] == "100"
        assert 0 <= int(response.headers["x-ratelimit-remaining-requests"]) < 100
        assert response.headers["x-ratelimit-reset-requests"].endswith("s")
    # Remaining is read just after a call's hit, so concurrent calls may read the same value; the
    # refusals all read none left.
    assert {r.headers["x-ratelimit-remaining-requests"] for r in responses if r.status_code == 429} == {"0"}


async def test_two_replicas_let_exactly_100_of_300_calls_through_a_tokens_limit_that_fits_100(
    tmp_path: Any, redis_prefix: str, shared_redis: dict[str, Any],
) -> None:
    limit = 100 * CALL_TOKENS
    # Answers take 3 s, so every call is admitted or refused on its up-front charge, before any
    # correction hands tokens back.
    config = {**serving({**shared_redis, "global": {"tokens_per_minute": limit}}, latency_ms=3000),
              "state": {"key_prefix": redis_prefix}}
    gateways = two_replicas(tmp_path, config)
    try:
        responses = await burst([gw.url for gw in gateways], CALLS)
        statuses = Counter(response.status_code for response in responses)
        assert abs(statuses[200] - 100) <= 1 and statuses[200] + statuses[429] == CALLS, statuses
        check_refusals(responses)
        assert all(r.headers["x-ratelimit-limit-tokens"] == str(limit) for r in responses)
        # Once they are settled, each answered call counts what it used, not its estimate: room again.
        used = sum(r.json()["usage"]["total_tokens"] for r in responses if r.status_code == 200)
        assert used < statuses[200] * CALL_TOKENS
        # The corrections run after the answers have left: wait until every call's bookkeeping is done.
        await asyncio.to_thread(wait_until_counted, gateways, CALLS, key=KEY)
        async with httpx.AsyncClient(timeout=30, headers={"authorization": f"Bearer {KEY}"}) as client:
            again = await client.post(f"{gateways[0].url}/v1/chat/completions",
                                      json={"model": "sim", "messages": MESSAGES, "max_tokens": MAX_TOKENS})
    finally:
        stop_and_flush(*gateways)
    assert again.status_code == 200, again.text
    remaining = int(again.headers["x-ratelimit-remaining-tokens"])
    assert abs(remaining - (limit - used - CALL_TOKENS)) <= 2  # the sliding weight of a previous window rounds


# ---------------------------------------------------------------------------- Redis stopped mid-run


class OwnRedis:
    """A redis-server of the test's own on a free port, without persistence, that the test may stop."""

    def __init__(self) -> None:
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        server = shutil.which("redis-server")
        if server is None:
            require_service("redis-server", "the redis-server binary is not installed")
        # It logs to stdout; "Ready to accept connections" is the moment it listens (--loglevel notice).
        self.proc = subprocess.Popen(
            [str(server), "--port", str(self.port), "--save", "", "--appendonly", "no", "--bind", "127.0.0.1",
             "--loglevel", "notice"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )
        assert self.proc.stdout is not None
        seen = []
        for line in self.proc.stdout:  # ends when the server exits
            seen.append(line)
            if b"Ready to accept connections" in line:
                self.proc.stdout.close()  # nothing more is read: the server writes little, and EPIPE is ignored
                return
        raise RuntimeError(f"redis-server did not start: {b''.join(seen).decode(errors='replace')}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def own_redis() -> Iterator[OwnRedis]:
    server = OwnRedis()
    server.start()
    yield server
    server.stop()


async def test_a_redis_outage_fails_open_or_closed_is_logged_once_and_counted(
    tmp_path: Any, own_redis: OwnRedis,
) -> None:
    limits = {"backend": "redis", "redis_url": own_redis.url, "global": {"requests_per_minute": 1000},
              "backend_retry_s": 0.2}
    open_gw = GatewayProcess(serving({**limits, "on_backend_error": "fail_open"}), tmp_path, {"KEEL_MASTER_KEY": KEY})
    closed_gw = GatewayProcess(serving({**limits, "on_backend_error": "fail_closed"}), tmp_path,
                               {"KEEL_MASTER_KEY": KEY})
    start_all(open_gw, closed_gw)
    try:
        async with httpx.AsyncClient(timeout=30, headers={"authorization": f"Bearer {KEY}"}) as client:

            async def calls(gw: GatewayProcess, n: int) -> list[httpx.Response]:
                out = []
                for _ in range(n):
                    out.append(await client.post(f"{gw.url}/v1/chat/completions",
                                                 json={"model": "sim", "messages": MESSAGES}))
                return out

            async def counted_again(gw: GatewayProcess) -> httpx.Response:
                """The first call that Redis counts again, once backend_retry_s has passed."""
                deadline = time.monotonic() + 10
                while "x-ratelimit-remaining-requests" not in (answer := (await calls(gw, 1))[0]).headers:
                    assert time.monotonic() < deadline, "Redis was not used again within 10 s of its return"
                return answer

            before = await calls(open_gw, 3) + await calls(closed_gw, 3)
            assert all(r.status_code == 200 and "x-ratelimit-remaining-requests" in r.headers for r in before)

            own_redis.stop()  # mid-run
            during_open = await calls(open_gw, 10)
            during_closed = await calls(closed_gw, 10)
            assert all(r.status_code == 200 for r in during_open)  # uncounted, so no x-ratelimit-* headers
            assert not any("x-ratelimit-remaining-requests" in r.headers for r in during_open)
            assert all(r.status_code == 503 for r in during_closed)
            assert {r.json()["error"]["code"] for r in during_closed} == {"rate_limit_store_unavailable"}
            assert all(int(r.headers["retry-after"]) >= 1 for r in during_closed)
            metrics = {gw: (await client.get(f"{gw.url}/metrics")).text for gw in (open_gw, closed_gw)}

            own_redis.start()  # back, on the same port
            after = [await counted_again(open_gw), await counted_again(closed_gw)]
            after += await calls(open_gw, 1) + await calls(closed_gw, 1)
            assert all(r.status_code == 200 and "x-ratelimit-remaining-requests" in r.headers for r in after)
    finally:
        stop_and_flush(open_gw, closed_gw)

    assert 'keel_rate_limit_backend_errors_total{action="fail_open"} 10.0' in metrics[open_gw]
    assert 'keel_rate_limit_backend_errors_total{action="fail_closed"} 10.0' in metrics[closed_gw]
    assert "keel_rate_limit_backend_up 0.0" in metrics[open_gw]
    for gw, action in ((open_gw, "let through uncounted"), (closed_gw, "refused with 503")):
        log = gw.log()
        assert log.count("the rate-limit store (Redis) cannot be reached") == 1, log  # once per outage, not per call
        assert action in log
        assert log.count("the rate-limit store (Redis) answers again") == 1
        assert "Traceback" not in log
