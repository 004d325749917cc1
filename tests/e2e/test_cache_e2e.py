"""Acceptance: the exact cache through `keel serve` with the official openai SDK.

A repeated deterministic call is a hit (`x-keel-cache`), a streamed answer replayed from the cache
reads like the live one, two tenants asking the same never share an answer, and the request log
records what the cache did. With Redis as the store, Redis stopped mid-run leaves calls answered as
misses, the outage logged once and counted in /metrics.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import yaml
from conftest import REDIS_URL, GatewayProcess
from test_rate_limits_e2e import OwnRedis

from keel.observability.store import RecordStore

MASTER = "sk-master-cache-e2e"
MESSAGES: list[Any] = [{"role": "user", "content": "What is the capital of France?"}]


def serving(tmp_path: Path, **more: Any) -> dict[str, Any]:
    return {"models": [{"name": "sim", "deployments": [{"provider": "simulated", "price": {"input": 1, "output": 2}}]}],
            "store": {"url": f"sqlite:///{tmp_path}/log.db"},
            "cache": {"backend": "memory", "exact": {"enabled": True, "ttl_s": 3600, "max_bytes": 1 << 20}}, **more}


def sdk(gw: GatewayProcess, key: str = MASTER) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0, timeout=10)


def records(config: dict[str, Any]) -> list[dict[str, Any]]:
    return RecordStore(config["store"]["url"]).records(since=0)


def test_a_repeated_call_is_a_hit_and_a_stream_is_replayed_as_it_was_live(
    gateway: Callable[..., GatewayProcess], tmp_path: Path,
) -> None:
    config = serving(tmp_path)
    gw = gateway(config, env={"KEEL_MASTER_KEY": MASTER})
    client = sdk(gw)
    first = client.chat.completions.with_raw_response.create(model="sim", messages=MESSAGES, temperature=0)
    second = client.chat.completions.with_raw_response.create(model="sim", messages=MESSAGES, temperature=0)
    assert (first.headers["x-keel-cache"], second.headers["x-keel-cache"]) == ("miss", "hit")
    assert first.parse().choices[0].message.content == second.parse().choices[0].message.content
    assert first.parse().usage == second.parse().usage and first.parse().id != second.parse().id
    warm = client.chat.completions.with_raw_response.create(model="sim", messages=MESSAGES, temperature=0.9)
    assert warm.headers["x-keel-cache"] == "bypass"
    fresh = client.chat.completions.with_raw_response.create(
        model="sim", messages=MESSAGES, temperature=0, extra_headers={"Cache-Control": "no-cache"})
    assert fresh.headers["x-keel-cache"] == "bypass"

    asked = {"model": "sim", "messages": [{"role": "user", "content": "stream me"}], "seed": 7,
             "stream_options": {"include_usage": True}}
    live_raw = client.chat.completions.with_raw_response.create(stream=True, **asked)
    assert live_raw.headers["x-keel-cache"] == "miss"
    live = list(live_raw.parse())
    replay_raw = client.chat.completions.with_raw_response.create(stream=True, **asked)
    assert replay_raw.headers["x-keel-cache"] == "hit"
    replayed = list(replay_raw.parse())

    def read(chunks: list[Any]) -> tuple[str, list[str | None], Any]:
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        return text, [c.choices[0].finish_reason for c in chunks if c.choices], chunks[-1].usage

    assert read(replayed)[0] == read(live)[0] == "echo: stream me"
    assert read(replayed)[1][-1] == read(live)[1][-1] == "stop"
    assert read(replayed)[2] == read(live)[2] is not None
    gw.stop()  # flushes the request log

    rows = records(config)
    assert [(r["cache_status"], r["outcome"], r["stream"]) for r in rows] == [
        ("miss", "ok", False), ("hit_exact", "cached", False), ("bypass", "ok", False), ("bypass", "ok", False),
        ("miss", "ok", True), ("hit_exact", "cached", True),
    ]
    assert rows[0]["cost_nanousd"] > 0 and rows[1]["cost_nanousd"] == 0


def create_key(config: dict[str, Any], tmp_path: Path, tenant: str) -> str:
    path = tmp_path / "keys.yaml"
    path.write_text(yaml.safe_dump(config))
    done = subprocess.run([sys.executable, "-m", "keel.cli", "keys", "create", "--config", str(path),
                           "--tenant", tenant], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_two_tenants_asking_the_same_never_get_each_others_cached_answer(
    gateway: Callable[..., GatewayProcess], tmp_path: Path,
) -> None:
    config = serving(tmp_path, auth={"virtual_keys": True})
    acme, globex = create_key(config, tmp_path, "acme"), create_key(config, tmp_path, "globex")
    gw = gateway(config, env={"KEEL_MASTER_KEY": MASTER})
    seen = [
        sdk(gw, key).chat.completions.with_raw_response.create(model="sim", messages=MESSAGES, temperature=0)
        .headers["x-keel-cache"]
        for key in (acme, globex, acme, globex)
    ]
    assert seen == ["miss", "miss", "hit", "hit"]
    gw.stop()
    assert [(r["tenant"], r["cache_status"]) for r in records(config)] == [
        ("acme", "miss"), ("globex", "miss"), ("acme", "hit_exact"), ("globex", "hit_exact")]


def test_with_redis_stopped_mid_run_calls_are_answered_as_misses_logged_once_and_counted(
    gateway: Callable[..., GatewayProcess], tmp_path: Path,
) -> None:
    redis = OwnRedis()
    redis.start()
    try:
        config = serving(tmp_path, cache={"backend": "redis", "redis_url": redis.url, "exact": {"enabled": True}})
        gw = gateway(config, env={"KEEL_MASTER_KEY": MASTER})
        client = sdk(gw)

        def status(question: str) -> str:
            messages = [{"role": "user", "content": question}]
            raw = client.chat.completions.with_raw_response.create(model="sim", messages=messages, temperature=0)
            assert raw.parse().choices[0].message.content == f"echo: {question}"
            return raw.headers["x-keel-cache"]

        assert [status("same"), status("same")] == ["miss", "hit"]
        redis.stop()
        # Questions of their own: each call looks up and stores once (no call waits for another).
        assert [status(f"question {i}") for i in range(3)] == ["miss"] * 3
        assert status("same") == "miss"
        metrics = httpx.get(gw.url + "/metrics", headers={"authorization": f"Bearer {MASTER}"}).text
    finally:
        redis.stop()
    # Each of the 4 calls failed a lookup and a store.
    assert 'keel_cache_backend_errors_total{backend="redis"} 8.0' in metrics
    assert 'keel_cache_backend_up{backend="redis"} 0.0' in metrics
    log = gw.log()
    assert log.count("the cache store (Redis) cannot be reached") == 1, log
    assert "Traceback" not in log


def test_the_shared_redis_serves_a_hit_to_a_second_replica(
    tmp_path: Path, redis_prefix: str,
) -> None:
    config = serving(tmp_path, cache={"backend": "redis", "redis_url": REDIS_URL, "exact": {"enabled": True}},
                     state={"key_prefix": redis_prefix})
    replicas = [GatewayProcess(config, tmp_path, {"KEEL_MASTER_KEY": MASTER}) for _ in range(2)]
    try:
        for replica in replicas:
            replica.start()
        seen = [sdk(gw).chat.completions.with_raw_response.create(model="sim", messages=MESSAGES, temperature=0)
                .headers["x-keel-cache"] for gw in replicas]
        assert seen == ["miss", "hit"]
    finally:
        for replica in replicas:
            replica.stop()

