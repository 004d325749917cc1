"""`keel demo` against a real `keel serve`, as a newcomer runs it after `make run`.

With examples/demo.yaml (what `make run` serves; no master key, as `make run` has none), the demo's CLI runs
in a child process and the gateway's request log, read once the stopped gateway has flushed it, holds each
kind of traffic the demo says it sent: answered chats and streams across features, a cache hit, a blocked
injection, an input sent with the email redacted, a budget refusal, answers from a fallback deployment,
and the eval run's calls under its feature, with the run itself stored beside them. With a bare config
(one simulated model) behind a master key, the steps that need what it lacks say "skipped: <what to
configure>" and the demo still succeeds. No gateway, or a wrong key: a one-line error and exit 2.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import GatewayProcess
from observability_helpers import read_records, stop_and_flush, store_section

from keel.demo.eval_step import CASES, FEATURE, SUITE
from keel.demo.steps import BUDGET_FEATURE, EMAIL, FALLBACK_MODEL
from keel.evals.results import EvalStore
from keel.observability.store import RecordStore

ROOT = Path(__file__).resolve().parents[2]
KEY = "sk-keel-demo-e2e-5b21"
CHATS = 12


def demo(base_url: str, config: Path, key: str | None = None) -> subprocess.CompletedProcess[str]:
    """`keel demo` in a child process, with the key only if given (never one inherited)."""
    env = {k: v for k, v in os.environ.items() if k not in ("KEEL_MASTER_KEY", "KEEL_CONFIG")}
    env |= {"KEEL_MASTER_KEY": key} if key else {}
    env["COLUMNS"] = "250"  # the table unfolded: each cell on one line
    return subprocess.run(
        [sys.executable, "-m", "keel.cli", "demo", "--base-url", base_url, "--config", str(config),
         "--chats", str(CHATS)],
        env=env, capture_output=True, text=True, timeout=180,
    )


def start(config: dict[str, Any], tmp: Path, key: str | None = None) -> GatewayProcess:
    env = {"KEEL_MASTER_KEY": key} if key else {}
    gateway = GatewayProcess(config, tmp, env=env)
    if not key:
        gateway.env.pop("KEEL_MASTER_KEY", None)
    return gateway.start()


# ---------------------------------------------------------------------------- examples/demo.yaml


@pytest.fixture(scope="module")
def shipped_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str], str, str]:
    """The demo through a gateway serving examples/demo.yaml (its request log moved to a file of the
    test's own); the demo's output, the log's URL and the gateway's address."""
    tmp = tmp_path_factory.mktemp("demo")
    config = yaml.safe_load((ROOT / "examples" / "demo.yaml").read_text())
    url = f"sqlite:///{tmp / 'demo.db'}"
    config["store"] = {**config.get("store", {}), **store_section(url, tmp)}
    gateway = start(config, tmp)
    try:
        ran = demo(gateway.url, gateway.config_path)
    finally:
        exits = stop_and_flush(gateway)
    assert exits == [0], gateway.log()[-3000:]
    return ran, url, gateway.url


@pytest.fixture(scope="module")
def records(shipped_run: tuple[subprocess.CompletedProcess[str], str, str]) -> list[dict[str, Any]]:
    return read_records(shipped_run[1])


def test_the_demo_succeeds_and_prints_each_step_and_the_dashboard(
    shipped_run: tuple[subprocess.CompletedProcess[str], str, str],
) -> None:
    ran, _, base_url = shipped_run
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert "skipped:" not in ran.stdout and "✗" not in ran.stdout, ran.stdout
    for step in ("chats", "streams", "cache", "injection", "redaction", "budget", "fallback", "eval"):
        assert f"✓ {step}:" in ran.stdout, ran.stdout
    assert f"Dashboard: {base_url}/dashboard" in ran.stdout


def test_chats_and_streams_are_answered_across_features_and_users(records: list[dict[str, Any]]) -> None:
    chats = [r for r in records if r["feature"] in ("support", "search", "summarise") and r["model"] == "demo"
             and r["outcome"] == "ok" and not r["stream"]]
    assert len(chats) >= CHATS
    assert {r["feature"] for r in chats} == {"support", "search", "summarise"}
    assert len({r["user"] for r in chats}) >= 4
    assert all(r["cost_usd"] > 0 for r in chats)  # demo.yaml prices the model: the Cost page has figures
    streams = [r for r in records if r["feature"] == "chat-ui"]
    assert len(streams) == 4 and all(r["stream"] and r["outcome"] == "ok" and r["ttft_ms"] for r in streams)


def test_the_repeated_request_is_a_cache_hit(records: list[dict[str, Any]]) -> None:
    hits = [r for r in records if r["cache_status"] == "hit_exact"]
    assert len(hits) == 1 and hits[0]["outcome"] == "cached" and hits[0]["cost_saved_usd"] > 0


def test_the_injection_is_blocked(records: list[dict[str, Any]]) -> None:
    blocked = [r for r in records if r["outcome"] == "blocked"]
    assert len(blocked) == 1 and blocked[0]["status"] == 400
    assert [(v["check"], v["action"]) for v in blocked[0]["guardrails"]] == [("injection", "block")]


def test_the_email_went_upstream_as_a_placeholder(records: list[dict[str, Any]]) -> None:
    redacted = [r for r in records if any(v["check"] == "pii" and v["action"] == "redact" for v in r["guardrails"])]
    assert len(redacted) == 1 and redacted[0]["outcome"] == "ok"
    logged = redacted[0]["input"][0]["content"]
    assert "<EMAIL_ADDRESS_1>" in logged and EMAIL not in logged


def test_the_budget_refuses_a_call_once_its_feature_has_spent_it(records: list[dict[str, Any]]) -> None:
    calls = [r for r in records if r["feature"] == BUDGET_FEATURE]
    refused = [r for r in calls if r["outcome"] == "budget_exceeded"]
    assert len(refused) == 1 and refused[0]["status"] == 429 and calls[-1] is refused[0]
    answered = [r for r in calls if r["outcome"] == "ok"]
    assert answered and sum(r["cost_usd"] for r in answered) <= 0.001  # the feature's daily limit


def test_the_failing_deployment_falls_back(records: list[dict[str, Any]]) -> None:
    calls = [r for r in records if r["model"] == FALLBACK_MODEL]
    assert len(calls) == 3
    assert all(r["outcome"] == "ok" and r["fallbacks"] == 1 and r["deployment"] == "backup" for r in calls)
    assert any(a["deployment"] == "primary-down" and a.get("error") for a in calls[0]["attempt_log"])


def test_the_eval_run_goes_through_the_gateway_and_is_stored(
    shipped_run: tuple[subprocess.CompletedProcess[str], str, str], records: list[dict[str, Any]],
) -> None:
    calls = [r for r in records if r["feature"] == FEATURE]
    assert len(calls) == len(CASES) and all(r["outcome"] == "ok" and r["model"] == "demo" for r in calls)
    store = RecordStore(shipped_run[1])
    try:
        results = EvalStore(store)
        [run] = results.runs(SUITE)
        assert run.status == "finished" and run.target == {"model": "demo"}
        assert len(results.results(run.id)) == len(CASES)
        assert run.summary is not None and run.summary["passed"] is True
    finally:
        store.close()


# ---------------------------------------------------------------------------- a config without the demo's parts


def test_a_bare_config_skips_what_it_lacks_and_says_what_to_configure(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'bare.db'}"
    config = {"models": [{"name": "plain", "deployments": [{"provider": "simulated"}]}],
              "store": store_section(url, tmp_path)}
    gateway = start(config, tmp_path, key=KEY)
    try:
        ran = demo(gateway.url, gateway.config_path, key=KEY)
    finally:
        stop_and_flush(gateway)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    for step in ("chats", "streams", "eval"):
        assert f"✓ {step}:" in ran.stdout, ran.stdout
    for step in ("cache", "injection", "redaction", "budget", "fallback"):
        assert f"- {step}: skipped" in ran.stdout, ran.stdout
    for hint in ("cache.exact.enabled", "guardrails.input.injection.action: block",
                 "guardrails.input.pii", f"match: {BUDGET_FEATURE}", f"no model {FALLBACK_MODEL}"):
        assert hint in ran.stdout, ran.stdout
    records = read_records(url)
    assert {r["outcome"] for r in records} == {"ok"}
    assert not [r for r in records if r["feature"] == BUDGET_FEATURE]  # the admin API said there is no budget
    assert len([r for r in records if r["feature"] == FEATURE]) == len(CASES)


def test_no_gateway_or_a_wrong_key_is_one_line_and_exit_2(tmp_path: Path) -> None:
    config = {"models": [{"name": "plain", "deployments": [{"provider": "simulated"}]}],
              "store": store_section(f"sqlite:///{tmp_path / 'keys.db'}", tmp_path)}
    gateway = start(config, tmp_path, key=KEY)
    try:
        wrong = demo(gateway.url, gateway.config_path, key="sk-not-the-key")
    finally:
        stop_and_flush(gateway)
    assert wrong.returncode == 2
    assert "refused the key" in wrong.stderr and "--key" in wrong.stderr and "Traceback" not in wrong.stderr
    nothing = demo(gateway.url, gateway.config_path)  # stopped: nothing listens there now
    assert nothing.returncode == 2
    assert f"no gateway answers at {gateway.url}" in nothing.stderr and "Traceback" not in nothing.stderr


# ---------------------------------------------------------------------------- make run serves the demo's config


def make_n(folder: Path, *args: str, env: dict[str, str] | None = None) -> str:
    """The command `make run` would serve with (`make -n`: printed, not run), in a copy of the Makefile."""
    base = {k: v for k, v in os.environ.items() if k not in ("KEEL_CONFIG", "CONFIG", "MAKEFLAGS")}
    printed = subprocess.run(["make", "-n", "run", *args], cwd=folder, env={**base, **(env or {})},
                             capture_output=True, text=True, timeout=30, check=True).stdout
    [serve] = [line for line in printed.splitlines() if "keel serve" in line]
    return serve


def test_make_run_serves_the_demo_config_only_when_no_config_is_named(tmp_path: Path) -> None:
    for name in ("Makefile", "pyproject.toml"):
        (tmp_path / name).write_bytes((ROOT / name).read_bytes())
    assert make_n(tmp_path).endswith("--config examples/demo.yaml")
    assert make_n(tmp_path, "CONFIG=examples/keel.yaml").endswith("--config examples/keel.yaml")
    assert "--config" not in make_n(tmp_path, env={"KEEL_CONFIG": "mine.yaml"})  # keel serve reads it
    (tmp_path / "keel.yaml").write_text("models: []\n")
    assert "--config" not in make_n(tmp_path)  # keel serve finds ./keel.yaml itself
