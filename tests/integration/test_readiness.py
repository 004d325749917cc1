"""`/readyz` reflects every backend a call needs, names the one that fails, and stays cheap
under a storm of probes."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import REDIS_URL, free_port
from starlette.testclient import TestClient

from keel.config import parse_config
from keel.engine import Keel
from keel.server import create_app
from keel.server.readiness import Readiness, RedisPing

MODELS = [{"name": "sim", "deployments": [{"provider": "simulated"}]}]
CHAT = {"model": "sim", "messages": [{"role": "user", "content": "hello"}]}


def gateway(monkeypatch: pytest.MonkeyPatch, **config: Any) -> tuple[TestClient, Keel]:
    monkeypatch.delenv("KEEL_MASTER_KEY", raising=False)
    keel = Keel(parse_config({"models": MODELS, **config}))
    return TestClient(create_app(keel)), keel


@pytest.fixture
def redis_down(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[TestClient, int]]:
    port = free_port()  # nothing listens there
    client, _ = gateway(monkeypatch, state={"redis_url": f"redis://127.0.0.1:{port}/0"})
    with client:
        yield client, port


def test_redis_down_makes_the_gateway_not_ready_and_names_it(redis_down: tuple[TestClient, int]) -> None:
    client, port = redis_down
    response = client.get("/readyz")
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "not_ready"
    budget_store = body["checks"]["budget_store"]
    assert budget_store["ok"] is False
    assert f"redis://127.0.0.1:{port}/0" in budget_store["detail"]
    assert "budget_store_unavailable" in budget_store["detail"]
    assert all(check["ok"] for name, check in body["checks"].items() if name != "budget_store")
    # What the probe says is what a call meets.
    call = client.post("/v1/chat/completions", json=CHAT)
    assert call.status_code == 503 and call.json()["error"]["code"] == "budget_store_unavailable"


@pytest.mark.parametrize("on_backend_error", ["fail_open", "fail_closed"])
def test_redis_down_under_rate_limits_makes_the_gateway_not_ready_only_when_they_fail_closed(
    monkeypatch: pytest.MonkeyPatch, on_backend_error: str,
) -> None:
    port = free_port()  # nothing listens there
    client, _ = gateway(monkeypatch, limits={
        "backend": "redis", "redis_url": f"redis://127.0.0.1:{port}/0", "on_backend_error": on_backend_error,
        "global": {"requests_per_minute": 100}})
    with client:
        response = client.get("/readyz")
        call = client.post("/v1/chat/completions", json=CHAT)
    checks = response.json()["checks"]
    if on_backend_error == "fail_open":  # calls go on uncounted: nothing to turn away for
        assert response.status_code == 200 and "rate_limit_store" not in checks
        assert call.status_code == 200
        return
    assert response.status_code == 503 and checks["rate_limit_store"]["ok"] is False
    assert f"redis://127.0.0.1:{port}/0" in checks["rate_limit_store"]["detail"]
    assert "calls are refused (rate_limit_store_unavailable)" in checks["rate_limit_store"]["detail"]
    # What the probe says is what a call meets.
    assert call.status_code == 503 and call.json()["error"]["code"] == "rate_limit_store_unavailable"


def test_a_running_redis_makes_the_gateway_ready(monkeypatch: pytest.MonkeyPatch, redis_prefix: str) -> None:
    client, _ = gateway(monkeypatch, state={"redis_url": REDIS_URL, "key_prefix": redis_prefix})
    with client:
        response = client.get("/readyz")
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["status"] == "ready"
        assert body["checks"]["budget_store"] == {"ok": True, "detail": f"Redis at {REDIS_URL} answered PING"}
        assert client.post("/v1/chat/completions", json=CHAT).status_code == 200


def test_without_redis_the_checks_are_started_and_the_request_log(monkeypatch: pytest.MonkeyPatch) -> None:
    client, keel = gateway(monkeypatch)
    with client:
        assert keel.writer.flush()  # the writer thread has reached the store
        response = client.get("/readyz")
    assert response.status_code == 200
    assert response.json() == {"status": "ready", "checks": {
        "started": {"ok": True, "detail": "providers started"},
        "request_log": {"ok": True, "detail": "writing to sqlite:///keel.db"},
    }}


def test_a_spooling_request_log_is_degraded_but_ready(monkeypatch: pytest.MonkeyPatch) -> None:
    port = free_port()  # no PostgreSQL there: records go to the spool
    client, keel = gateway(monkeypatch, store={"url": f"postgresql://keel:secret@127.0.0.1:{port}/keel"})
    with client:
        assert client.post("/v1/chat/completions", json=CHAT).status_code == 200
        assert keel.writer.flush()  # the record is in the spool
        response = client.get("/readyz")
    assert response.status_code == 200
    detail = response.json()["checks"]["request_log"]
    assert detail["ok"] is True and detail["detail"].startswith("degraded: ") and "spooled" in detail["detail"]
    assert "secret" not in response.text


async def test_an_embedded_model_not_loaded_makes_the_gateway_not_ready() -> None:
    keel = Keel(parse_config({"models": MODELS}))
    deployment = keel.deployments["sim"][0]

    class Unloaded:
        loaded = False

    deployment.provider = Unloaded()  # type: ignore[assignment]
    readiness = Readiness(keel)
    readiness.started = True
    ready, body = await readiness.report()
    assert not ready
    assert body["checks"][f"model:{deployment.name}"] == {"ok": False, "detail": "the embedded model is not loaded"}


# ---------------------------------------------------------------------------- cheap under a probe storm


class CountingRedis:
    def __init__(self, hang: bool = False) -> None:
        self.pings = 0
        self.hang = hang

    async def ping(self) -> bool:
        self.pings += 1
        if self.hang:
            await asyncio.Event().wait()
        return True


async def test_a_probe_storm_sends_one_ping_per_ttl() -> None:
    now = [100.0]
    redis = CountingRedis()
    ping = RedisPing(redis, "redis://user:pw@redis.internal:6379/0", ttl_s=1.0, clock=lambda: now[0])
    checks = await asyncio.gather(*(ping() for _ in range(50)))
    assert redis.pings == 1 and all(c.ok for c in checks)
    assert checks[0].detail == "Redis at redis://redis.internal:6379/0 answered PING"  # no password
    now[0] += 0.5
    await ping()
    assert redis.pings == 1
    now[0] += 0.6
    await ping()
    assert redis.pings == 2


async def test_a_redis_that_never_answers_fails_the_check_within_its_timeout() -> None:
    ping = RedisPing(CountingRedis(hang=True), "redis://10.0.0.5:6379/0", timeout_s=0.05)
    check = await asyncio.wait_for(ping(), 5)
    assert not check.ok and "did not answer PING within 0.05 s" in check.detail
