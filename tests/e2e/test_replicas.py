"""Two `keel serve` replicas on different ports, sharing the real Redis and PostgreSQL, behind a
round-robin proxy (`keel.testing.round_robin`), called through the official openai SDK.

Limits and budgets hold across both as for one; the request log holds every call exactly once; an
answer one replica cached is a hit on the other; a key revoked through one replica's admin API is
refused by the other; and a replica SIGKILLed with calls in flight loses no answered call's record
(its write-ahead file is replayed when it is restarted) while the other keeps serving.

Each call opens a connection of its own (`Connection: close`), so the proxy sends the calls of one
client to the replicas in turn; `proxy.connections` tells which replica took a call.
"""

from __future__ import annotations

import os
import signal
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
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
    expected_nanos,
    fake_prompt_tokens,
    read_records,
    start_all,
    stop_and_flush,
    store_section,
    wait_until_counted,
)
from test_shutdown import InFlight

from keel.observability.store import StoreUnavailable
from keel.testing.fake_openai import FakeBehaviour, FakeOpenAIServer
from keel.testing.round_robin import RoundRobinProxy

MASTER = "sk-keel-replicas-master-5e1f"
HELLO = "hello"
# A budget of three calls and a half: the fake answers "echo: hello" in two tokens, as max_tokens allows,
# so a call's worst case is its cost.
CALL_NANOS = expected_nanos("gpt-4o-mini", fake_prompt_tokens([{"role": "user", "content": HELLO}]), 2)
METERED = "metered-user"
SLOW_MS = 2000  # long enough for the kill to land while these calls wait on the upstream


@dataclass
class Answer:
    status: int
    request_id: str
    headers: httpx.Headers
    body: dict[str, Any]
    replica: int | None  # which replica took the call (0 or 1), when it was the only call under way


@dataclass
class Replicas:
    gateways: list[GatewayProcess]
    proxy: RoundRobinProxy
    url: str  # the request log's database
    spool: Path
    upstream: FakeOpenAIServer
    slow: FakeOpenAIServer

    def client(self, key: str = MASTER, **options: Any) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"http://127.0.0.1:{self.proxy.port}/v1", api_key=key,
                             default_headers={"connection": "close"}, **{"max_retries": 0, "timeout": 30, **options})

    def took(self) -> list[int]:
        """The connections each replica has taken from the proxy."""
        return [self.proxy.connections[("127.0.0.1", gw.port)] for gw in self.gateways]

    def ask(self, api: openai.OpenAI, model: str, text: str = HELLO, **extra: Any) -> Answer:
        """One chat call, alone under way (so the replica that took it is known)."""
        before = self.took()
        answer = ask(api, model, text, **extra)
        (answer.replica,) = [i for i, (now, then) in enumerate(zip(self.took(), before, strict=True)) if now > then]
        return answer


def ask(api: openai.OpenAI, model: str, text: str = HELLO, **extra: Any) -> Answer:
    try:
        raw = api.chat.completions.with_raw_response.create(
            model=model, messages=[{"role": "user", "content": text}], **extra)
    except openai.APIStatusError as exc:
        return Answer(exc.status_code, exc.response.headers[REQUEST_ID], exc.response.headers,
                      exc.response.json(), None)
    return Answer(raw.status_code, raw.headers[REQUEST_ID], raw.headers, orjson.loads(raw.content), None)


def logged_ids(url: str) -> Counter[str]:
    """The request ids of the log's chat records, each with how often it is there."""
    try:
        return Counter(r["request_id"] for r in read_records(url) if r["endpoint"] == "chat")
    except StoreUnavailable:  # the tables are not made yet
        return Counter()


def write_ahead_ids(spool: Path, pid: int) -> set[str]:
    """The request ids in the write-ahead files of process `pid` (a line still being written is skipped)."""
    found = set()
    for path in spool.parent.glob(f"{spool.name}.wal-{pid}.*"):
        for line in path.read_bytes().split(b"\0", 1)[0].splitlines():
            try:
                entry = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            if entry["kind"] == "request":
                found.add(entry["row"]["request_id"])
    return found


def config(upstream: FakeOpenAIServer, slow: FakeOpenAIServer, url: str, redis_prefix: str, tmp: Path,
           **store: Any) -> dict[str, Any]:
    deployment = {"provider": "openai", "base_url": upstream.url, "model": "gpt-4o-mini"}
    return {
        "server": {"graceful_timeout_s": 5},
        "models": [
            {"name": "free", "deployments": [deployment]},
            {"name": "limited", "deployments": [deployment], "limits": {"per_model": {"requests_per_minute": 5}}},
            {"name": "cached", "deployments": [deployment], "cache": {"backend": "redis", "exact": {"enabled": True}}},
            {"name": "slow", "retry": {"max_attempts": 1},
             "deployments": [{"provider": "openai", "base_url": slow.url, "model": "gpt-4o-mini"}]},
        ],
        "pricing": PRICING,
        "limits": {"backend": "redis"},
        "budgets": [{"scope": "user", "match": METERED, "window": "total", "limit_usd": 3.5 * CALL_NANOS / 1e9}],
        "state": {"redis_url": REDIS_URL, "key_prefix": redis_prefix},
        "auth": {"virtual_keys": True},
        "store": store_section(url, tmp, **store),
    }


@pytest.fixture
def replicas(tmp_path: Path, redis_prefix: str) -> Iterator[Callable[..., Replicas]]:
    """`replicas(**store)`: two gateways of one config (a fresh PostgreSQL database of their own, this
    test's Redis prefix) and the proxy in front of them; all stopped, and the database dropped, after."""
    with ExitStack() as stack:

        def start(**store: Any) -> Replicas:
            url = stack.enter_context(fresh_pg_database("keel_replicas"))
            upstream = stack.enter_context(FakeOpenAIServer(FakeBehaviour()))
            slow = stack.enter_context(FakeOpenAIServer(FakeBehaviour(latency_ms=SLOW_MS)))
            shared = config(upstream, slow, url, redis_prefix, tmp_path, **store)
            gateways = [GatewayProcess(shared, tmp_path, env={"KEEL_MASTER_KEY": MASTER}) for _ in range(2)]
            for gw in gateways:
                stack.callback(gw.stop)  # before the database is dropped (callbacks run last first)
            start_all(*gateways)
            proxy = stack.enter_context(RoundRobinProxy([("127.0.0.1", gw.port) for gw in gateways]))
            return Replicas(gateways, proxy, url, Path(shared["store"]["spool_path"]), upstream, slow)

        yield start


# ------------------------------------------------------------------ shared state


def test_a_rate_limit_and_a_budget_hold_across_both_replicas_as_for_one(replicas: Callable[..., Replicas]) -> None:
    shared = replicas()
    api = shared.client()

    # 5 calls a minute to "limited", whichever replica takes them.
    limited = [shared.ask(api, "limited", f"limited {i}") for i in range(12)]
    allowed = sum(a.status == 200 for a in limited)
    assert allowed in (5, 6), [a.status for a in limited]  # 6 only if the calls straddle a minute (sliding window)
    assert [a.status for a in limited] == [200] * allowed + [429] * (12 - allowed)
    for refused in limited[allowed:]:
        assert_openai_error(refused.body, "rate_limit_exceeded")
    # Each replica let some through and refused some: one count, not one per replica (that would let 10 by).
    assert {a.replica for a in limited[:allowed]} == {a.replica for a in limited[allowed:]} == {0, 1}

    # A budget of three calls and a half for one user: three answered, then refused by both replicas.
    metered = [shared.ask(api, "free", HELLO, user=METERED, max_tokens=2) for _ in range(6)]
    assert [a.status for a in metered] == [200] * 3 + [429] * 3
    for refused in metered[3:]:
        assert_openai_error(refused.body, "budget_exceeded")
    assert {a.replica for a in metered[:3]} == {a.replica for a in metered[3:]} == {0, 1}
    assert shared.ask(api, "free", HELLO, max_tokens=2).status == 200  # another user is not on that budget


def test_the_request_log_holds_every_call_of_both_replicas_exactly_once(replicas: Callable[..., Replicas]) -> None:
    shared = replicas()
    api = shared.client()
    answers = [shared.ask(api, "free", f"one by one {i}") for i in range(6)]
    with ThreadPoolExecutor(8) as pool:  # and many at once
        answers += pool.map(lambda i: ask(api, "free", f"at once {i}"), range(24))
    answers.append(ask(api, "no-such-model"))  # refused calls are logged too
    answers.append(ask(shared.client("sk-keel-not-a-key"), "free"))
    assert Counter(a.status for a in answers) == {200: 30, 404: 1, 401: 1}
    assert all(shared.took())  # both replicas served
    ids = [a.request_id for a in answers]
    assert len(set(ids)) == len(ids)

    eventually(lambda: set(ids) <= set(logged_ids(shared.url)), f"the records of all {len(ids)} calls")
    assert logged_ids(shared.url) == Counter(ids)  # each once, and none else


def test_an_answer_cached_by_one_replica_is_a_hit_on_the_other(replicas: Callable[..., Replicas]) -> None:
    shared = replicas()
    api = shared.client()
    first = shared.ask(api, "cached", "what do the replicas share?", temperature=0)
    assert first.status == 200 and first.headers["x-keel-cache"] == "miss"
    assert first.replica is not None
    # Stored after the answer left: the replica counts the call once its bookkeeping (the store too) is done.
    wait_until_counted([shared.gateways[first.replica]], 1, key=MASTER)
    second = shared.ask(api, "cached", "what do the replicas share?", temperature=0)
    assert second.replica != first.replica
    assert second.status == 200 and second.headers["x-keel-cache"] == "hit"
    assert second.body["choices"][0]["message"]["content"] == first.body["choices"][0]["message"]["content"] == (
        "echo: what do the replicas share?")
    assert shared.upstream.fake.stats.requests == 1


def test_a_key_revoked_through_one_replica_is_refused_by_the_other(replicas: Callable[..., Replicas]) -> None:
    shared = replicas()
    first, second = shared.gateways
    admin = {"authorization": f"Bearer {MASTER}"}
    made = httpx.post(f"{second.url}/admin/keys", headers=admin, json={"tenant": "team-a", "label": "replicas"},
                      timeout=10)
    assert made.status_code == 201, made.text
    key = made.json()
    api = shared.client(key["key"])
    before = [shared.ask(api, "free", f"before {i}") for i in range(2)]
    assert [a.status for a in before] == [200, 200] and {a.replica for a in before} == {0, 1}

    assert httpx.delete(f"{first.url}/admin/keys/{key['id']}", headers=admin, timeout=10).status_code == 200
    on_second = openai.OpenAI(base_url=second.url + "/v1", api_key=key["key"], max_retries=0, timeout=10)
    refusals: list[Answer] = []

    def refused_by_second() -> bool:
        answer = ask(on_second, "free", "after")
        refusals.append(answer)
        return answer.status == 401

    eventually(refused_by_second, "the other replica refusing the revoked key", timeout=10)
    assert_openai_error(refusals[-1].body, "invalid_api_key")
    assert "revoked" in refusals[-1].body["error"]["message"]
    after = [shared.ask(api, "free", f"after {i}") for i in range(2)]  # and by both, through the proxy
    assert [a.status for a in after] == [401, 401] and {a.replica for a in after} == {0, 1}


# ------------------------------------------------------------------ a replica killed


def test_a_replica_killed_under_load_loses_no_answered_call_and_the_other_keeps_serving(
    replicas: Callable[..., Replicas],
) -> None:
    # The writers flush only when stopped: an answered call's record is in the replica's memory and its
    # write-ahead file, nowhere else, until then. Without the write-ahead file the kill would lose them.
    shared = replicas(flush_interval_ms=600_000)
    victim, survivor = shared.gateways
    assert victim.proc is not None
    killed_pid = victim.proc.pid
    api = shared.client(max_retries=3)  # the openai SDK retries a call whose connection was cut

    before = [shared.ask(api, "free", f"before {i}") for i in range(10)]
    assert [a.status for a in before] == [200] * 10
    by_victim = {a.request_id for a in before if a.replica == 0}
    assert len(by_victim) == 5
    # The records are written ahead as the answers leave (the client may read an answer first).
    eventually(lambda: write_ahead_ids(shared.spool, killed_pid) == by_victim, "the victim's records on disk")
    assert logged_ids(shared.url) == Counter()  # and not in the store

    # Calls in flight on both replicas, then the victim is killed.
    took = shared.took()
    in_flight = [InFlight(lambda i=i: ask(api, "slow", f"during {i}")) for i in range(6)]
    eventually(lambda: shared.slow.fake.stats.requests >= 6, "six calls waiting on the upstream")
    assert shared.took()[0] > took[0] and shared.took()[1] > took[1]
    os.kill(killed_pid, signal.SIGKILL)
    assert victim.proc.wait(10) == -signal.SIGKILL

    # The other keeps serving: the cut calls are retried and answered by it, and new calls too.
    during = [call.wait(timeout=60) for call in in_flight]
    assert [a.status for a in during] == [200] * 6
    assert all(a.body["choices"][0]["message"]["content"].startswith("echo: during ") for a in during)
    while_down = [shared.ask(api, "free", f"while down {i}") for i in range(4)]
    assert [(a.status, a.replica) for a in while_down] == [(200, 1)] * 4
    assert write_ahead_ids(shared.spool, killed_pid) == by_victim  # what it had queued is still on disk

    # Restarted, it replays what the killed process had written ahead, then serves again.
    victim.start()
    eventually(lambda: by_victim <= set(logged_ids(shared.url)), "the killed replica's records in the store")
    eventually(lambda: not list(shared.spool.parent.glob(f"{shared.spool.name}.wal-*.claimed-*")),
               "the replayed write-ahead files deleted")
    assert not write_ahead_ids(shared.spool, killed_pid)
    after = [shared.ask(api, "free", f"after {i}") for i in range(4)]
    assert [a.status for a in after] == [200] * 4 and {a.replica for a in after} == {0, 1}

    assert stop_and_flush(victim, survivor) == [0, 0]
    answered = [a.request_id for a in before + during + while_down + after]
    assert logged_ids(shared.url) == Counter(answered)  # every answered call once, and no other
