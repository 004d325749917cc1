"""Shared pieces of the observability acceptance tests (request log, budgets, tracing, metrics):
a fresh PostgreSQL database, the gateway's config around fake upstreams, the prices the tests
expect, and readers of what a stopped gateway flushed."""

from __future__ import annotations

import hashlib
import os
import secrets
import subprocess
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import orjson
from conftest import GatewayProcess
from prometheus_client.parser import text_string_to_metric_families

from keel.observability.store import RecordStore

REDIS_BASE_URL = os.environ.get("KEEL_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
REQUEST_ID = "x-keel-request-id"

# USD per 1M tokens, as keel.yaml's `pricing:` gives them: 150 and 600 nano-dollars a token.
PRICING: dict[str, dict[str, float]] = {
    "gpt-4o-mini": {"input": 0.15, "output": 0.6},
    "gpt-4o": {"input": 2.5, "output": 10.0},
}
NANOS_PER_TOKEN = {"gpt-4o-mini": (150, 600), "gpt-4o": (2500, 10_000)}


def expected_nanos(model: str, prompt_tokens: int, completion_tokens: int) -> int:
    """What a call costs at PRICING, in whole nano-dollars (exact: these prices are whole nanos a token)."""
    rate_in, rate_out = NANOS_PER_TOKEN[model]
    return prompt_tokens * rate_in + completion_tokens * rate_out


def fake_prompt_tokens(messages: list[dict[str, Any]]) -> int:
    """The prompt tokens the fake upstream reports for these messages (its own rule)."""
    return max(1, len(orjson.dumps(messages)) // 4)


def key_id_of(key: str) -> str:
    """The non-secret id the gateway logs for a bearer key (sha256, 12 hex digits)."""
    return "key_" + hashlib.sha256(key.encode()).hexdigest()[:12]


def openai_deployment(name: str, base_url: str, model: str = "gpt-4o-mini") -> dict[str, Any]:
    return {"provider": "openai", "name": name, "base_url": base_url, "model": model}


def store_section(url: str, tmp: Path, **settings: Any) -> dict[str, Any]:
    """`store:` with a spool file in `tmp` (never in whatever directory the test runner is in)."""
    return {"url": url, "spool_path": str(tmp / f"spool-{secrets.token_hex(4)}.jsonl"),
            "flush_interval_ms": 50, **settings}


def start_all(*gateways: GatewayProcess) -> None:
    """Start gateways side by side (each takes a second or two to be ready)."""
    with ThreadPoolExecutor(len(gateways)) as pool:
        for started in [pool.submit(gw.start) for gw in gateways]:
            started.result()


def stop_and_flush(*gateways: GatewayProcess) -> list[int | None]:
    """SIGTERM every gateway at once, then wait: shutdown flushes the request log. Returns their
    exit codes (0 is a clean stop; None for one that never started)."""
    running = [gw.proc for gw in gateways if gw.proc is not None and gw.proc.poll() is None]
    for proc in running:
        proc.terminate()  # once: a second SIGTERM during the interpreter's exit would kill it uncleanly
    for proc in running:
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return [gw.proc.returncode if gw.proc is not None else None for gw in gateways]


def read_records(url: str, since: float = 0.0) -> list[dict[str, Any]]:
    store = RecordStore(url)
    try:
        return store.records(since=since)
    finally:
        store.close()


def read_spans(url: str, trace_id: str) -> list[dict[str, Any]]:
    store = RecordStore(url)
    try:
        return store.spans(trace_id)
    finally:
        store.close()


def assert_openai_error(body: Any, code: str) -> None:
    """OpenAI's error shape, exactly: {"error": {"message", "type", "param", "code"}}."""
    assert isinstance(body, dict) and set(body) == {"error"}, body
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert body["error"]["code"] == code, body




def traceparent(trace_id: str, span_id: str) -> str:
    return f"00-{trace_id}-{span_id}-01"


def metric_total(gateway: GatewayProcess, name: str, key: str | None = None, **labels: str) -> float:
    """The sum of a metric's samples named `name` whose labels include `labels`, from the gateway's /metrics."""
    headers = {"authorization": f"Bearer {key}"} if key else {}
    text = httpx.get(gateway.url + "/metrics", headers=headers, timeout=10).raise_for_status().text
    return sum(sample.value for family in text_string_to_metric_families(text) for sample in family.samples
               if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()))


def calls_counted(gateway: GatewayProcess, outcome: str | None = None, key: str | None = None) -> int:
    """Calls the gateway's /metrics counts (`keel_requests_total`, of one outcome or all). A call is
    counted as its record is queued, after every other finaliser of it (cost, budget, rate-limit
    corrections) has run: once the count is reached, the calls' bookkeeping is done."""
    return int(metric_total(gateway, "keel_requests_total", key, **({"outcome": outcome} if outcome else {})))


def eventually(condition: Callable[[], bool], what: str, timeout: float = 20) -> None:
    """Wait for another process's state (its /metrics, its request log) to satisfy `condition`: polled, as
    nothing in this process is told when it changes, and bounded by `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout:g} s waiting for {what}"
        time.sleep(0.02)


def wait_until_counted(gateways: list[GatewayProcess], at_least: int, outcome: str | None = None,
                       key: str | None = None, timeout: float = 10) -> int:
    """The gateways' count once it has reached `at_least` (the counter trails the client by the
    bookkeeping done after an answer has left); fails after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while (seen := sum(calls_counted(gw, outcome, key) for gw in gateways)) < at_least:
        assert time.monotonic() < deadline, f"{seen} of {at_least} calls counted after {timeout:g} s"
        time.sleep(0.02)  # another process's counter: polled, with a bound
    return seen
