"""Acceptance: routing by the key's tier through `keel serve` with the official openai SDK.

Two keys made with `keel keys create --tier`, `free` and `pro`; the virtual model `auto` sends
`key_tiers: [pro]` to `smart` and the rest to `fast`. Each answer names its tier in `x-keel-route`
and comes from that tier's deployment; the request log keeps the route.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import openai
from conftest import GatewayProcess
from test_keys_e2e import create_key

from keel.auth.store import KeyStore
from keel.observability.store import RecordStore

MASTER = "sk-master-key-tier-e2e"
MESSAGES: list[Any] = [{"role": "user", "content": "hello"}]


def keel_config(tmp_path: Path) -> dict[str, Any]:
    return {
        "models": [
            {"name": "auto", "router": {"strategy": "rules", "tiers": ["fast", "smart"], "default_tier": "fast",
                                        "rules": [{"tier": "smart", "key_tiers": ["pro"]}]}},
            {"name": "fast", "deployments": [{"provider": "simulated", "name": "fast-sim",
                                              "template": "fast: {last_user_message}"}]},
            {"name": "smart", "deployments": [{"provider": "simulated", "name": "smart-sim",
                                               "template": "smart: {last_user_message}"}]},
        ],
        "store": {"url": f"sqlite:///{tmp_path / 'keel.db'}"}, "auth": {"virtual_keys": True},
    }


def test_a_pro_key_is_routed_to_smart_and_a_free_key_to_fast(
    gateway: Callable[..., GatewayProcess], tmp_path: Path,
) -> None:
    config = keel_config(tmp_path)
    free = create_key(config, tmp_path, "--tenant", "team-a", "--tier", "free")
    pro = create_key(config, tmp_path, "--tenant", "team-a", "--tier", "pro")
    gw = gateway(config, env={"KEEL_MASTER_KEY": MASTER})

    seen = {}
    for name, secret in (("free", free), ("pro", pro), ("master", MASTER)):
        client = openai.OpenAI(base_url=gw.url + "/v1", api_key=secret, max_retries=0, timeout=10)
        raw = client.chat.completions.with_raw_response.create(model="auto", messages=MESSAGES)
        answer = raw.parse()
        seen[name] = (raw.headers["x-keel-route"], answer.choices[0].message.content)
    assert seen == {
        "free": ("fast; reason=default", "fast: hello"),
        "pro": ("smart; reason=rule[0]", "smart: hello"),
        "master": ("fast; reason=default", "fast: hello"),  # no key, no tier: no key_tiers rule matches
    }

    streamed = openai.OpenAI(base_url=gw.url + "/v1", api_key=pro, max_retries=0, timeout=10)
    with streamed.chat.completions.with_streaming_response.create(
        model="auto", messages=MESSAGES, stream=True,
    ) as response:
        assert response.headers["x-keel-route"] == "smart; reason=rule[0]"
        text = "".join(chunk.choices[0].delta.content or "" for chunk in response.parse() if chunk.choices)
    assert text == "smart: hello"

    gw.stop()  # the log is flushed on shutdown
    store = RecordStore(config["store"]["url"])
    try:
        tiers = {key.id: key.tier for key in KeyStore(store).list()}
        logged = [(tiers.get(row["key_id"]), row["deployment"], row["metadata"]["keel.route"]["model"],
                   row["metadata"]["keel.route"]["reason"]) for row in store.records(since=0)]
    finally:
        store.close()
    assert sorted(logged, key=str) == sorted([
        ("free", "fast-sim", "fast", "default"), ("pro", "smart-sim", "smart", "rule[0]"),
        (None, "fast-sim", "fast", "default"), ("pro", "smart-sim", "smart", "rule[0]"),
    ], key=str)
