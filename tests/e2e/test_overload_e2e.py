"""Overload protection through a real `keel serve` and the official `openai` SDK: an upstream that holds
every request until the test lets it go (an event, never a sleep), behind deployments with
`max_concurrency` and a per-key limit.

- the call past a deployment's limit waits, then gets 503 `overloaded` with Retry-After (its deadline ends
  the wait), is logged with error_type `overloaded` (outcome `error`) and counted in /metrics;
- a call waiting for a slot gets it when one frees inside its wait, and is answered;
- the per-key limit holds one key back and lets another through.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import openai
import pytest
from aiohttp import web
from conftest import GatewayProcess
from observability_helpers import (
    REQUEST_ID,
    assert_openai_error,
    eventually,
    metric_total,
    read_records,
    store_section,
)

from keel.testing.fake_server import ThreadedServer


class HeldUpstream:
    """An OpenAI-compatible upstream that answers each chat call only once `release()` lets it."""

    def __init__(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.chat)
        self.server = ThreadedServer(app, "held-upstream")
        self.held: list[asyncio.Future[None]] = []  # on the server's loop
        self.arrived = 0
        self._arrivals = threading.Condition()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.port}/v1"

    async def chat(self, request: web.Request) -> web.Response:
        body = await request.json()
        gate = asyncio.get_running_loop().create_future()
        self.held.append(gate)
        with self._arrivals:
            self.arrived += 1
            self._arrivals.notify_all()
        await gate
        return web.json_response({
            "id": "chatcmpl-held", "object": "chat.completion", "created": int(time.time()), "model": body["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "released"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
        })

    def wait_arrived(self, n: int, timeout: float = 20) -> None:
        with self._arrivals:
            assert self._arrivals.wait_for(lambda: self.arrived >= n, timeout), f"{self.arrived} of {n} arrived"

    def release(self, n: int = 1) -> None:
        def let_go() -> None:
            for gate in [g for g in self.held if not g.done()][:n]:
                gate.set_result(None)

        self.server.call(let_go)

    def release_all(self) -> None:
        self.release(10**6)


@pytest.fixture(scope="module")
def upstream() -> Iterator[HeldUpstream]:
    held = HeldUpstream()
    held.server.start()
    yield held
    held.release_all()
    held.server.stop()


@pytest.fixture(scope="module")
def gateway(upstream: HeldUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    tmp = tmp_path_factory.mktemp("overload")
    held = {"provider": "openai", "name": "held", "base_url": upstream.url, "model": "gpt-4o-mini",
            "max_concurrency": 2}
    keyed = {"provider": "openai", "name": "keyed", "base_url": upstream.url, "model": "gpt-4o-mini"}
    config = {
        "models": [
            # Two models on one deployment share its two slots; "held-quick"'s deadline ends its wait early.
            {"name": "held", "deployments": [held], "retry": {"max_attempts": 1}},
            {"name": "held-quick", "timeout_s": 1, "deployments": [held], "retry": {"max_attempts": 1}},
            {"name": "keyed", "deployments": [keyed], "retry": {"max_attempts": 1}},
            {"name": "keyed-quick", "timeout_s": 1, "deployments": [keyed], "retry": {"max_attempts": 1}},
        ],
        # A long wait: a slot freed while a call waits is taken; the quick models' deadline is shorter.
        "limits": {"concurrency": {"per_key": 1, "max_wait_s": 60, "retry_after_s": 2}},
        "store": store_section(f"sqlite:///{tmp}/log.db", tmp),
    }
    gw = GatewayProcess(config, tmp).start()  # no master key: each bearer token is its own key
    yield gw
    upstream.release_all()
    gw.stop()


def ask(gw: GatewayProcess, key: str, model: str) -> Callable[[], Any]:
    sdk = openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0, timeout=60)
    return lambda: sdk.chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": f"{model} by {key}"}])


def logged(gw: GatewayProcess, request_id: str) -> dict[str, Any]:
    found: list[dict[str, Any]] = []

    def written() -> bool:
        log_url = f"sqlite:///{gw.config_path.parent}/log.db"  # the gateway's store.url
        found[:] = [r for r in read_records(log_url) if r["request_id"] == request_id]
        return bool(found)

    eventually(written, f"the record of {request_id}")
    return found[0]


@pytest.fixture
def pool() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(8) as executor:
        yield executor


def test_the_call_past_a_deployments_limit_waits_then_gets_503_overloaded_with_retry_after(
    gateway: GatewayProcess, upstream: HeldUpstream, pool: ThreadPoolExecutor,
) -> None:
    start = upstream.arrived
    holding = [pool.submit(ask(gateway, f"sk-hold-{i}", "held")) for i in range(2)]
    upstream.wait_arrived(start + 2)
    assert metric_total(gateway, "keel_concurrency_in_flight", scope="deployment", limit="held") == 2

    began = time.monotonic()
    with pytest.raises(openai.APIStatusError) as refused:
        ask(gateway, "sk-hold-2", "held-quick")()
    waited = time.monotonic() - began
    error = refused.value
    assert error.status_code == 503
    assert_openai_error(error.response.json(), "overloaded")
    assert error.response.headers["retry-after"] == "2"
    assert "x-should-retry" not in error.response.headers
    message = error.response.json()["error"]["message"]
    assert "deployment 'held' has 2 calls in flight, its max_concurrency, and no slot freed" in message
    assert waited >= 0.9  # it waited for a slot until its deadline (timeout_s 1), not refused at once
    assert upstream.arrived == start + 2  # the shed call never reached the upstream
    assert metric_total(gateway, "keel_concurrency_shed_total", scope="deployment", limit="held") == 1

    upstream.release(2)
    assert [f.result(30).http_response.status_code for f in holding] == [200, 200]
    record = logged(gateway, error.response.headers[REQUEST_ID])
    # An error in the SLO's sense (the service had no room for a valid call), of its own code.
    assert (record["outcome"], record["status"], record["error_type"]) == ("error", 503, "overloaded")
    assert [a["error"] for a in record["attempt_log"]] == ["overloaded"]
    eventually(lambda: metric_total(gateway, "keel_concurrency_in_flight", scope="deployment", limit="held") == 0,
               "the slots freed")


def test_a_waiting_call_takes_a_slot_freed_inside_its_wait_and_is_answered(
    gateway: GatewayProcess, upstream: HeldUpstream, pool: ThreadPoolExecutor,
) -> None:
    start = upstream.arrived
    holding = [pool.submit(ask(gateway, f"sk-wait-{i}", "held")) for i in range(2)]
    upstream.wait_arrived(start + 2)
    waiting: Future[Any] = pool.submit(ask(gateway, "sk-wait-2", "held"))
    eventually(lambda: metric_total(gateway, "keel_concurrency_waiting", scope="deployment", limit="held") == 1,
               "the third call to wait")
    assert upstream.arrived == start + 2 and not waiting.done()

    upstream.release(1)  # one held call ends: its slot goes to the waiting call
    upstream.wait_arrived(start + 3)
    upstream.release_all()
    answered = waiting.result(30)
    assert answered.http_response.status_code == 200
    assert answered.parse().choices[0].message.content == "released"
    assert [f.result(30).http_response.status_code for f in holding] == [200, 200]


def test_the_per_key_limit_holds_one_key_back_and_lets_another_through(
    gateway: GatewayProcess, upstream: HeldUpstream, pool: ThreadPoolExecutor,
) -> None:
    start = upstream.arrived
    first = pool.submit(ask(gateway, "sk-key-a", "keyed"))  # key a's one slot (per_key: 1)
    upstream.wait_arrived(start + 1)

    with pytest.raises(openai.APIStatusError) as refused:
        ask(gateway, "sk-key-a", "keyed-quick")()  # key a again: waits to its deadline, then 503
    assert refused.value.status_code == 503
    assert "this API key has 1 call in flight" in refused.value.response.json()["error"]["message"]
    assert metric_total(gateway, "keel_concurrency_shed_total", scope="key", limit="per_key") >= 1

    other = pool.submit(ask(gateway, "sk-key-b", "keyed"))  # key b: a slot of its own, at once
    upstream.wait_arrived(start + 2)
    upstream.release_all()
    assert other.result(30).http_response.status_code == 200
    assert first.result(30).http_response.status_code == 200
    record = logged(gateway, refused.value.response.headers[REQUEST_ID])
    assert (record["outcome"], record["status"], record["error_type"]) == ("error", 503, "overloaded")
    assert record["attempt_log"] == []  # refused before any deployment was tried

