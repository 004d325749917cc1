"""Acceptance: two `keel serve` replicas sharing one Redis (budget counters) and one PostgreSQL
(request log) enforce one global budget as one replica would.

500 concurrent calls, split across both through the official async `openai` SDK (its retries off),
against a total budget that fits 100 calls at the configured price: refusals are 429s with the
code `budget_exceeded` in OpenAI's error shape, the spend the log shows never passes the cap, the
Redis counter equals the sum of the logged costs to the nano-dollar, and about 100 calls get
through. A negative price stops `keel serve` at start-up with a message naming the key.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import openai
import pytest
import redis
import yaml
from conftest import GatewayProcess, free_port, fresh_pg_database, require_service
from observability_helpers import (
    PRICING,
    REDIS_BASE_URL,
    REQUEST_ID,
    assert_openai_error,
    expected_nanos,
    fake_prompt_tokens,
    openai_deployment,
    read_records,
    start_all,
    stop_and_flush,
    store_section,
)

from keel.testing.fake_openai import FakeBehaviour, FakeOpenAIServer

KEY = "sk-keel-budgets-e2e-77c1"
CALLS = 500
PER_GATEWAY_CONCURRENCY = 50
MESSAGES: list[dict[str, Any]] = [{"role": "user", "content": "hello"}]
MAX_TOKENS = 2  # the fake's answer, "echo: hello", is two tokens: the worst case is close to the actual cost
CALL_NANOS = expected_nanos("gpt-4o-mini", fake_prompt_tokens(MESSAGES), 2)
LIMIT_NANOS = 100 * CALL_NANOS
LIMIT_USD = LIMIT_NANOS / 1e9
# The one counter of a global budget of the total window (keel.budgets.counters.counter_key).
COUNTER_KEY = "keel:budget:global:total:total"


@dataclass
class Outcomes:
    answered: list[str] = field(default_factory=list)  # request ids
    refused: list[str] = field(default_factory=list)
    per_gateway: Counter[str] = field(default_factory=Counter)
    admin: list[dict[str, Any]] = field(default_factory=list)  # GET /admin/budgets of each replica


@dataclass
class SharedRun:
    outcomes: Outcomes
    records: list[dict[str, Any]]
    spent: int  # the Redis counter, nano-dollars
    reserved: int


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    """A Redis database with no budget counters in it: the gateway's key prefix (keel:budget) is
    fixed, so this run takes a whole database of its own and deletes its keys afterwards."""
    base = urlsplit(REDIS_BASE_URL)
    host, port = base.hostname or "127.0.0.1", base.port or 6379
    chosen: redis.Redis | None = None
    try:
        for db in range(15, 0, -1):
            client = redis.Redis(host=host, port=port, db=db, socket_connect_timeout=1)
            if not any(True for _ in client.scan_iter(match="keel:budget*", count=1000)):
                chosen = client
                break
            client.close()
    except redis.RedisError as exc:
        require_service("redis", f"{host}:{port} did not answer ({exc})")
    if chosen is None:
        pytest.fail(f"every Redis database 1-15 at {host}:{port} holds keel:budget keys; none free for this test")
    db = chosen.connection_pool.connection_kwargs["db"]
    yield f"redis://{host}:{port}/{db}"
    keys = list(chosen.scan_iter(match="keel:budget*", count=1000))
    if keys:
        chosen.delete(*keys)
    chosen.close()


@pytest.fixture(scope="module")
def pg_url() -> Iterator[str]:
    with fresh_pg_database("keel_e2e_budgets") as url:
        yield url


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeOpenAIServer]:
    with FakeOpenAIServer(FakeBehaviour(latency_ms=20)) as server:
        yield server


def replica_config(upstream: FakeOpenAIServer, redis_url: str, pg_url: str, tmp: Path) -> dict[str, Any]:
    return {
        "server": {"graceful_timeout_s": 5},
        "models": [{"name": "gpt", "retry": {"max_attempts": 1},
                    "deployments": [openai_deployment("gpt-main", upstream.url)]}],
        "pricing": PRICING,
        "budgets": [{"scope": "global", "window": "total", "limit_usd": LIMIT_USD}],
        "state": {"redis_url": redis_url},
        "store": store_section(pg_url, tmp),
    }


@pytest.fixture(scope="module")
def shared_run(
    upstream: FakeOpenAIServer, redis_url: str, pg_url: str, tmp_path_factory: pytest.TempPathFactory
) -> SharedRun:
    tmp = tmp_path_factory.mktemp("budgets")
    started = time.time()
    gateways = [
        GatewayProcess(replica_config(upstream, redis_url, pg_url, tmp), tmp, env={"KEEL_MASTER_KEY": KEY})
        for _ in range(2)
    ]
    try:
        start_all(*gateways)
        outcomes = asyncio.run(load(gateways))
    finally:
        exits = stop_and_flush(*gateways)
    assert exits == [0, 0], f"keel serve exit codes {exits}:\n{gateways[0].log()[-3000:]}"
    client = redis.Redis.from_url(redis_url)
    spent, reserved = (int(v or 0) for v in client.hmget(COUNTER_KEY, ["spent", "reserved"]))
    client.close()
    return SharedRun(outcomes, read_records(pg_url, since=started - 1), spent, reserved)


async def load(gateways: list[GatewayProcess]) -> Outcomes:
    """CALLS calls at once, alternating between the replicas, each replica's at most 50 in flight."""
    outcomes = Outcomes()
    clients = [openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key=KEY, max_retries=0, timeout=30) for gw in gateways]
    limits = [asyncio.Semaphore(PER_GATEWAY_CONCURRENCY) for _ in gateways]
    unexpected: list[str] = []

    async def one(i: int) -> None:
        n = i % len(gateways)
        async with limits[n]:
            try:
                raw = await clients[n].chat.completions.with_raw_response.create(
                    model="gpt", messages=MESSAGES, max_tokens=MAX_TOKENS,  # type: ignore[arg-type]
                )
            except openai.APIStatusError as error:
                if error.status_code == 429 and error.code == "budget_exceeded":
                    assert_openai_error(error.response.json(), "budget_exceeded")
                    assert error.response.json()["error"]["type"] == "insufficient_quota"
                    # Held by calls in flight: worth a retry in a second; spent: not worth one.
                    headers = error.response.headers
                    assert headers.get("retry-after") == "1" or headers.get("x-should-retry") == "false"
                    outcomes.refused.append(error.response.headers[REQUEST_ID])
                else:
                    unexpected.append(f"{error.status_code} {error.response.text}")
                return
            assert raw.parse().choices[0].message.content == "echo: hello"
            outcomes.answered.append(raw.headers[REQUEST_ID])
            outcomes.per_gateway[gateways[n].url] += 1

    await asyncio.gather(*(one(i) for i in range(CALLS)))
    for client in clients:
        await client.close()
    assert not unexpected, unexpected[:5]
    async with httpx.AsyncClient(timeout=10) as anonymous:
        refused = await anonymous.get(gateways[0].url + "/admin/budgets")
        assert refused.status_code == 401
        assert_openai_error(refused.json(), "invalid_api_key")
    async with httpx.AsyncClient(headers={"authorization": f"Bearer {KEY}"}, timeout=10) as admin:
        for gw in gateways:
            response = await admin.get(gw.url + "/admin/budgets")
            assert response.status_code == 200, response.text
            outcomes.admin.append(response.json())
    return outcomes


# ---------------------------------------------------------------------------- the shared budget


def test_every_call_is_answered_or_refused_with_budget_exceeded_and_logged_once(shared_run: SharedRun) -> None:
    outcomes, records = shared_run.outcomes, shared_run.records
    assert len(outcomes.answered) + len(outcomes.refused) == CALLS
    assert len(records) == CALLS
    by_id = {row["request_id"]: row for row in records}
    assert {by_id[rid]["outcome"] for rid in outcomes.answered} == {"ok"}
    refused = [by_id[rid] for rid in outcomes.refused]
    assert {(row["outcome"], row["status"], row["error_type"]) for row in refused} == {
        ("budget_exceeded", 429, "budget_exceeded")
    }
    assert all(row["attempts"] == 0 and row["cost_nanousd"] == 0 for row in refused)


def test_both_replicas_answered_calls(shared_run: SharedRun) -> None:
    assert len(shared_run.outcomes.per_gateway) == 2, shared_run.outcomes.per_gateway


def test_the_spend_in_the_log_never_passes_the_cap(shared_run: SharedRun) -> None:
    answered = [row for row in shared_run.records if row["outcome"] == "ok"]
    assert all(row["cost_nanousd"] == CALL_NANOS for row in answered)
    assert sum(row["cost_nanousd"] for row in answered) <= LIMIT_NANOS


def test_the_redis_counter_equals_the_sum_of_logged_costs_exactly(shared_run: SharedRun) -> None:
    logged = sum(row["cost_nanousd"] for row in shared_run.records)
    assert shared_run.spent == logged > 0
    assert shared_run.reserved == 0  # every hold was settled


def test_the_admin_api_of_each_replica_shows_that_counter(shared_run: SharedRun) -> None:
    logged = sum(row["cost_nanousd"] for row in shared_run.records)
    for listing in shared_run.outcomes.admin:
        (rule,) = listing["data"]
        assert rule["rule"]["scope"] == "global" and rule["rule"]["window"] == "total"
        (counter,) = rule["counters"]
        assert counter["key"] == COUNTER_KEY
        assert counter["spent_usd"] == logged / 1e9
        assert counter["reserved_usd"] == 0
        assert counter["remaining_usd"] == (LIMIT_NANOS - logged) / 1e9


def test_about_as_many_calls_as_the_budget_fits_get_through(shared_run: SharedRun) -> None:
    # 100 fit; each held its worst case (9 estimated prompt tokens, not 8) while in flight, so a few
    # of the last ones may have been refused while others still held the rest.
    assert 80 <= len(shared_run.outcomes.answered) <= 100


# ---------------------------------------------------------------------------- bad prices


def test_a_negative_price_stops_keel_serve_with_a_message_naming_the_key(tmp_path: Path) -> None:
    config = {
        "models": [{"name": "gpt", "deployments": [openai_deployment("gpt-main", "http://127.0.0.1:9/v1")]}],
        "pricing": {"gpt-4o-mini": {"input": -0.15, "output": 0.6}},
        "store": store_section(f"sqlite:///{tmp_path}/log.db", tmp_path),
    }
    path = tmp_path / "keel.yaml"
    path.write_text(yaml.safe_dump(config))
    done = subprocess.run(
        [sys.executable, "-m", "keel.cli", "serve", "--config", str(path), "--port", str(free_port())],
        capture_output=True, text=True, timeout=60,
    )
    output = done.stdout + done.stderr
    assert done.returncode != 0, output
    assert "pricing.gpt-4o-mini.input" in output
    assert "Traceback" not in output


# ---------------------------------------------------------------------------- scopes


def test_a_users_budget_limits_their_embeddings_as_well_as_their_chats(
    gateway: Callable[..., GatewayProcess], fake_upstream: FakeOpenAIServer
) -> None:
    gw = gateway({
        "models": [
            {"name": "gpt", "deployments": [openai_deployment("gpt-main", fake_upstream.url)]},
            {"name": "embed", "deployments": [
                openai_deployment("embed-main", fake_upstream.url, "text-embedding-3-small")]},
        ],
        "pricing": PRICING,
        # Spent out: any priced call of this user could pass it.
        "budgets": [{"scope": "user", "match": "alice", "window": "total", "limit_usd": 0.000000001}],
    }, env={"KEEL_MASTER_KEY": KEY})
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key=KEY, max_retries=0, timeout=20)
    with pytest.raises(openai.RateLimitError) as chat_refused:
        client.chat.completions.create(model="gpt", messages=[{"role": "user", "content": "hi"}], user="alice")
    assert chat_refused.value.code == "budget_exceeded"
    assert client.embeddings.create(model="embed", input="hello", user="bob").data  # not her budget
    with pytest.raises(openai.RateLimitError) as embeddings_refused:
        client.embeddings.create(model="embed", input="hello", user="alice")
    assert embeddings_refused.value.code == "budget_exceeded"
