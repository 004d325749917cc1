"""Acceptance: tiered routing through `keel serve` with the official openai SDK.

Simulated tiers: `fast` (cheap) and `smart` (dear). The answer names its tier in `x-keel-route`,
the request log keeps the route, the span carries `keel.route`; a cascade whose judge says no
escalates once, with both answers billed; a plain model is not routed; a bad router config
stops start-up with a message naming the key.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import openai
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
