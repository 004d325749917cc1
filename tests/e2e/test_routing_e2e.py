"""Acceptance: tiered routing through `keel serve` with the official openai SDK.

Simulated tiers: `fast` (cheap) and `smart` (dear). The answer names its tier in `x-keel-route`,
the request log keeps the route, the span carries `keel.route`; a cascade whose judge says no
escalates once, with both answers billed; a plain model is not routed; a bad router config
stops start-up with a message naming the key. `balance` spreads calls over a tier's two
deployments (least in flight, weights) and skips one whose breaker is open; `budget_downgrade`
routes a tier down once a budget's alert threshold is passed (its webhook alert is the signal).
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import openai
import pytest
import yaml
from conftest import GatewayProcess, free_port

from keel.observability.store import RecordStore

MASTER = "sk-master-routing-e2e"


def tiers(judge_says: str) -> list[dict[str, Any]]:
    return [
        {"name": "fast", "deployments": [{"provider": "simulated", "name": "fast-sim",
                                          "template": "fast: {last_user_message}",
                                          "price": {"input": 1, "output": 1}}]},
        {"name": "smart", "deployments": [{"provider": "simulated", "name": "smart-sim",
                                           "template": "smart: {last_user_message}",
                                           "price": {"input": 40, "output": 40}}]},
        {"name": "critic", "deployments": [{"provider": "simulated", "name": "critic-sim", "template": judge_says}]},
    ]


def serving(tmp_path: Path, judge_says: str = "no") -> dict[str, Any]:
    return {"models": [
        {"name": "auto", "router": {"strategy": "complexity", "tiers": ["fast", "smart"],
                                    "complexity": {"thresholds": [0.5]}}},
        {"name": "careful", "router": {"strategy": "cascade", "tiers": ["fast", "smart"],
                                       "escalate_on": ["invalid_output", "judge"], "judge_model": "critic"}},
        *tiers(judge_says)],
        "store": {"url": f"sqlite:///{tmp_path}/log.db"}}


def sdk(gw: GatewayProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key=MASTER, max_retries=0, timeout=10)


HARD = ("Prove step by step that the algorithm below is correct and analyze its complexity:\n"
        "```\ndef f(xs):\n    return sorted(xs)\n```\nWhy is it optimal? What if xs is sorted?")


def test_the_route_is_in_the_header_the_log_and_the_span(
    gateway: Callable[..., GatewayProcess], tmp_path: Path,
) -> None:
    config = serving(tmp_path)
    gw = gateway(config, env={"KEEL_MASTER_KEY": MASTER})
    client = sdk(gw)
    ask = client.chat.completions.with_raw_response.create
    easy = ask(model="auto", messages=[{"role": "user", "content": "hi"}])
    hard = ask(model="auto", messages=[{"role": "user", "content": HARD}])
    plain = ask(model="smart", messages=[{"role": "user", "content": "hi"}])
    assert easy.headers["x-keel-route"].startswith("fast; reason=complexity=0.")
    assert hard.headers["x-keel-route"].startswith("smart; reason=complexity=")
    assert easy.parse().choices[0].message.content == "fast: hi"
    assert hard.parse().choices[0].message.content.startswith("smart: ")
    assert "x-keel-route" not in plain.headers
    streamed = client.chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": "hi"}], stream=True)
    assert streamed.headers["x-keel-route"].startswith("fast; reason=complexity=")
    assert "".join(c.choices[0].delta.content or "" for c in streamed.parse() if c.choices) == "fast: hi"
    gw.stop()  # flushes the request log

    rows = RecordStore(config["store"]["url"]).records(since=0)
    routed = [r for r in rows if r["model"] == "auto"]
    assert [(r["deployment"], r["metadata"]["keel.route"]["model"]) for r in routed] == [
        ("fast-sim", "fast"), ("smart-sim", "smart"), ("fast-sim", "fast")]
    spans = RecordStore(config["store"]["url"]).spans(routed[1]["trace_id"])
    call_span = next(s for s in spans if s["attributes"].get("keel.route"))
    assert call_span["attributes"]["keel.route"] == "smart"
    assert call_span["attributes"]["keel.route_reason"].startswith("complexity=")


def test_a_cascade_escalation_is_counted_and_priced(gateway: Callable[..., GatewayProcess], tmp_path: Path) -> None:
    config = serving(tmp_path, judge_says="no")
    gw = gateway(config, env={"KEEL_MASTER_KEY": MASTER})
    client = sdk(gw)
    asked = [{"role": "user", "content": "what is 17 * 23?"}]
    escalated = client.chat.completions.with_raw_response.create(model="careful", messages=asked)
    direct = client.chat.completions.with_raw_response.create(model="smart", messages=asked)
    assert escalated.headers["x-keel-route"] == "smart; reason=cascade,fast:judge"
    assert escalated.parse().choices[0].message.content == "smart: what is 17 * 23?"
    gw.stop()

    rows = {r["model"]: r for r in RecordStore(config["store"]["url"]).records(since=0)}
    careful, smart = rows["careful"], rows["smart"]
    assert [a["deployment"] for a in careful["attempt_log"]] == ["fast-sim", "smart-sim"]
    assert careful["metadata"]["keel.route"]["escalations"] == 1
    assert careful["metadata"]["keel.route"]["tried"] == ["fast", "smart"]
    # The discarded fast answer is billed with the call: more than the smart answer alone.
    assert careful["cost_nanousd"] > smart["cost_nanousd"] > 0
    assert rows["critic"]["feature"] == "keel.router"
    assert direct.parse().choices[0].message.content == "smart: what is 17 * 23?"


def test_a_cascade_keeps_the_cheap_answer_the_judge_accepts(
    gateway: Callable[..., GatewayProcess], tmp_path: Path,
) -> None:
    gw = gateway(serving(tmp_path, judge_says="yes"), env={"KEEL_MASTER_KEY": MASTER})
    kept = sdk(gw).chat.completions.with_raw_response.create(
        model="careful", messages=[{"role": "user", "content": "hello"}])
    assert kept.headers["x-keel-route"] == "fast; reason=cascade"
    assert kept.parse().choices[0].message.content == "fast: hello"


def test_a_bad_router_config_stops_start_up_naming_the_key(tmp_path: Path) -> None:
    config = {"models": [{"name": "auto", "router": {"strategy": "cascade", "tiers": ["fast", "ghost"]}},
                         *tiers("yes")]}
    path = tmp_path / "keel.yaml"
    path.write_text(yaml.safe_dump(config))
    serve = [sys.executable, "-m", "keel.cli", "serve", "--config", str(path), "--port", str(free_port())]
    done = subprocess.run(serve, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "models[0].router.tiers names 'ghost', which is not a model of this file" in done.stdout + done.stderr


# ---------------------------------------------------------------------------- balance


def pool(name: str, *deployments: dict[str, Any], **model: Any) -> dict[str, Any]:
    """A plain model whose simulated deployments answer with their own name (`pool-a: hi`)."""
    return {"name": name, **model, "deployments": [
        {"provider": "simulated", "template": "{model}: {last_user_message}", **d} for d in deployments]}


def balanced(tmp_path: Path, **router: Any) -> dict[str, Any]:
    # Streams hold their second chunk for a minute: a stream read to its first chunk stays in flight.
    held = {"token_delay_ms": 60_000}
    return {"models": [
        {"name": "spread", "router": {"strategy": "balance", "tiers": ["pool"], **router}},
        pool("pool", {"name": "pool-a", "model": "pool-a", **held}, {"name": "pool-b", "model": "pool-b", **held}),
    ], "store": {"url": f"sqlite:///{tmp_path}/log.db"}}


def answered_by(client: openai.OpenAI, model: str) -> str:
    raw = client.chat.completions.with_raw_response.create(model=model, messages=[{"role": "user", "content": "hi"}])
    assert raw.headers["x-keel-route"] == "pool; reason=balance"
    return raw.parse().model


def test_balance_sends_calls_to_the_deployment_with_fewer_in_flight(
    gateway: Callable[..., GatewayProcess], tmp_path: Path,
) -> None:
    client = sdk(gateway(balanced(tmp_path), env={"KEEL_MASTER_KEY": MASTER}))
    held = client.chat.completions.create(model="spread", messages=[{"role": "user", "content": "stay"}],
                                          stream=True)
    try:
        first = next(iter(held))  # answered: the stream is in flight on its deployment until closed
        assert first.model == "pool-a"  # nothing measured, nothing in flight: the configured order
        # pool-a has one call in flight, pool-b none: both calls go to pool-b (the second one
        # with pool-b's latency measured, which an unmeasured pool-a is assumed to match).
        assert [answered_by(client, "spread") for _ in range(2)] == ["pool-b", "pool-b"]
    finally:
        held.close()


def test_balance_weights_draw_calls_to_the_heavier_deployment(
    gateway: Callable[..., GatewayProcess], tmp_path: Path,
) -> None:
    even = sdk(gateway(balanced(tmp_path), env={"KEEL_MASTER_KEY": MASTER}))
    weighted = sdk(gateway(balanced(tmp_path, weights={"pool-b": 4}), env={"KEEL_MASTER_KEY": MASTER}))
    # One at a time, nothing in flight: unweighted, the configured order keeps the first deployment;
    # weighted 4:1, every call goes to pool-b, listed second.
    assert [answered_by(even, "spread") for _ in range(3)] == ["pool-a"] * 3
    assert [answered_by(weighted, "spread") for _ in range(3)] == ["pool-b"] * 3


def test_balance_skips_a_deployment_whose_breaker_is_open(
    gateway: Callable[..., GatewayProcess], tmp_path: Path,
) -> None:
    config: dict[str, Any] = {"models": [
        {"name": "spread", "router": {"strategy": "balance", "tiers": ["pool"]}},
        pool("pool", {"name": "pool-a", "model": "pool-a", "error_rate": 1.0, "seed": 1},
             {"name": "pool-b", "model": "pool-b", "seed": 2},
             retry={"max_attempts": 1}, breaker={"failure_threshold": 1, "cooldown_s": 600}),
    ], "store": {"url": f"sqlite:///{tmp_path}/log.db"}}
    gw = gateway(config, env={"KEEL_MASTER_KEY": MASTER})
    client = sdk(gw)
    # pool-a, first in order, fails (500) and its breaker opens; the call falls back to pool-b.
    # Afterwards pool-a (unmeasured, so as fast as pool-b) would tie and go first: it is skipped.
    assert [answered_by(client, "spread") for _ in range(3)] == ["pool-b"] * 3
    gw.stop()  # flushes the request log

    rows = RecordStore(config["store"]["url"]).records(since=0)
    assert [[a["deployment"] for a in r["attempt_log"]] for r in rows] == [
        ["pool-a", "pool-b"], ["pool-b"], ["pool-b"]]
    assert rows[0]["attempt_log"][0]["error"]


# ---------------------------------------------------------------------------- budget_downgrade


class AlertWebhook:
    """Takes budget alerts; `passed` is set by the first one (the spend behind it is settled)."""

    def __init__(self) -> None:
        self.alerts: list[dict[str, Any]] = []
        self.passed = threading.Event()
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                hook.alerts.append(json.loads(self.rfile.read(int(self.headers["content-length"]))))
                self.send_response(200)
                self.send_header("content-length", "0")
                self.end_headers()
                hook.passed.set()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/alerts"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def alert_webhook() -> Iterator[AlertWebhook]:
    hook = AlertWebhook()
    yield hook
    hook.server.shutdown()
    hook.server.server_close()


def test_budget_downgrade_routes_a_tier_down_once_an_alert_threshold_is_passed(
    gateway: Callable[..., GatewayProcess], tmp_path: Path, alert_webhook: AlertWebhook,
) -> None:
    rules = {"strategy": "rules", "tiers": ["fast", "smart"], "default_tier": "smart"}
    config: dict[str, Any] = {"models": [
        {"name": "thrifty", "router": {**rules, "budget_downgrade": True}},
        {"name": "steady", "router": rules},
        *tiers("yes")],
        # One smart call (a dozen tokens at $40 per 1M) passes the 1% alert of $0.01.
        "budgets": [{"scope": "global", "window": "total", "limit_usd": 0.01, "alert_at": [0.01, 1.0]}],
        "alerts": {"webhook_url": alert_webhook.url},
        "store": {"url": f"sqlite:///{tmp_path}/log.db"}}
    gw = gateway(config, env={"KEEL_MASTER_KEY": MASTER})
    ask = sdk(gw).chat.completions.with_raw_response.create
    asked: list[Any] = [{"role": "user", "content": "hi"}]

    before = ask(model="thrifty", messages=asked, max_tokens=5)
    assert before.headers["x-keel-route"] == "smart; reason=default"
    assert alert_webhook.passed.wait(timeout=30), "no budget alert came"
    assert alert_webhook.alerts[0]["threshold"] == 0.01 and alert_webhook.alerts[0]["reason"] == "spent"

    after = ask(model="thrifty", messages=asked, max_tokens=5)
    assert after.headers["x-keel-route"] == "fast; reason=default,budget"
    assert after.parse().choices[0].message.content == "fast: hi"
    # Without budget_downgrade the same rules keep spending on the dearer tier.
    assert ask(model="steady", messages=asked, max_tokens=5).headers["x-keel-route"] == "smart; reason=default"
    gw.stop()

    rows = RecordStore(config["store"]["url"]).records(since=0)
    assert [(r["model"], r["deployment"], r["metadata"]["keel.route"]["reason"]) for r in rows] == [
        ("thrifty", "smart-sim", "default"), ("thrifty", "fast-sim", "default,budget"),
        ("steady", "smart-sim", "default")]
