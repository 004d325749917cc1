"""SIGTERM drains the gateway: calls in flight finish (plain and streamed), new connections are
refused at once, and `keel serve` exits 0, as process managers expect of a clean stop."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from conftest import GatewayProcess
from wire import stream_chunks

from keel.testing.fake_openai import FakeBehaviour, FakeOpenAIServer

SLOW_MS = 1500
NO_KEY = {"KEEL_MASTER_KEY": ""}  # these calls carry no key, whatever the environment says


@pytest.fixture
def slow_upstream() -> Iterator[FakeOpenAIServer]:
    with FakeOpenAIServer(FakeBehaviour(latency_ms=SLOW_MS)) as server:
        yield server


class InFlight:
    """One request sent from a thread, so the test can stop the gateway while it waits."""

    def __init__(self, send: Callable[[], Any]) -> None:
        self.result: Any = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(send,), daemon=True)
        self.thread.start()

    def _run(self, send: Callable[[], Any]) -> None:
        try:
            self.result = send()
        except BaseException as exc:
            self.error = exc

    def wait(self, timeout: float) -> Any:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the in-flight request never finished"
        if self.error is not None:
            raise AssertionError(f"the in-flight request failed: {self.error!r}") from self.error
        return self.result


def wait_until(condition: Callable[[], bool], timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.02)


def terminate_and_check_drain(gw: GatewayProcess, in_flight: InFlight) -> Any:
    """SIGTERM now; new connections are refused while the call drains; the process exits 0."""
    assert gw.proc is not None
    gw.proc.send_signal(signal.SIGTERM)
    wait_until(lambda: refused(gw), timeout=2)
    assert in_flight.thread.is_alive(), "the slow call should still be draining when the listener closes"
    result = in_flight.wait(timeout=15)
    assert gw.proc.wait(timeout=15) == 0, f"keel serve exited {gw.proc.returncode}:\n{gw.log()}"
    assert refused(gw)
    return result


def refused(gw: GatewayProcess) -> bool:
    try:
        httpx.get(gw.url + "/healthz", timeout=1)
    except httpx.ConnectError:
        return True
    except httpx.TransportError:
        return False  # accepted just before the listener closed, then dropped or left unanswered: ask again
    return False


def test_sigterm_lets_a_call_in_flight_finish(
    slow_upstream: FakeOpenAIServer, gateway: Callable[..., GatewayProcess],
) -> None:
    gw = gateway({"models": [
        {"name": "gpt", "deployments": [{"provider": "openai", "base_url": slow_upstream.url, "model": "m"}]},
    ]}, NO_KEY)
    body = {"model": "gpt", "messages": [{"role": "user", "content": "still here?"}]}
    in_flight = InFlight(lambda: httpx.post(gw.url + "/v1/chat/completions", json=body, timeout=20))
    wait_until(lambda: slow_upstream.fake.stats.requests == 1)  # the call reached the upstream

    response: httpx.Response = terminate_and_check_drain(gw, in_flight)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == "echo: still here?"
    assert "Finished server process" in gw.log()


def test_sigterm_lets_a_stream_in_flight_finish(gateway: Callable[..., GatewayProcess]) -> None:
    gw = gateway({"models": [{"name": "sim", "deployments": [
        {"provider": "simulated", "ttft_ms": 300, "token_delay_ms": 250}]}]}, NO_KEY)
    body = {"model": "sim", "stream": True, "messages": [{"role": "user", "content": "one two three four five"}]}
    started = threading.Event()

    def read_stream() -> tuple[int, bytes]:
        with httpx.stream("POST", gw.url + "/v1/chat/completions", json=body, timeout=20) as response:
            started.set()
            return response.status_code, response.read()

    in_flight = InFlight(read_stream)
    assert started.wait(5), "the stream never started"

    status, raw = terminate_and_check_drain(gw, in_flight)
    assert status == 200
    chunks = stream_chunks(raw)  # ends with [DONE]: the stream was not cut
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == "echo: one two three four five"
