"""Acceptance: the semantic cache through `keel serve` with the official openai SDK.

A paraphrase of an answered question is a `semantic-hit` (plain and streamed, the stream read by the
SDK as a live one), a near miss the guards refuse is a miss, two tenants never share an entry, and the
request log and /metrics record what happened. On the postgres backend (pgvector, through pgserver) a
second replica is served what the first stored.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from conftest import GatewayProcess
from pgvector_server import PgvectorServer, pgvector_database, pgvector_server  # noqa: F401
from test_cache_e2e import MASTER, create_key, records, sdk

pytest.importorskip("onnxruntime", reason="the semantic cache needs the local embedder: pip install 'keel[local]'")

ASKED = "What is the capital city of France?"
PARAPHRASE = "What's the capital of France?"


def serving(tmp_path: Path, cache: dict[str, Any] | None = None, **more: Any) -> dict[str, Any]:
    return {"models": [{"name": "sim", "deployments": [{"provider": "simulated", "price": {"input": 1, "output": 2}}]}],
            "store": {"url": f"sqlite:///{tmp_path}/log.db"},
            "cache": cache or {"semantic": {"enabled": True, "threshold": 0.85}}, **more}


def ask(client: Any, question: str, **fields: Any) -> tuple[str, str]:
    """The answer's text and its x-keel-cache."""
    raw = client.chat.completions.with_raw_response.create(
        model="sim", messages=[{"role": "user", "content": question}], temperature=0, **fields)
    if fields.get("stream"):
        text = "".join(c.choices[0].delta.content or "" for c in raw.parse() if c.choices)
    else:
        text = raw.parse().choices[0].message.content
    return text, raw.headers["x-keel-cache"]


def test_a_paraphrase_is_a_semantic_hit_plain_and_streamed_and_a_near_miss_is_not(
    gateway: Callable[..., GatewayProcess], tmp_path: Path,
) -> None:
    config = serving(tmp_path)
    gw = gateway(config, env={"KEEL_MASTER_KEY": MASTER})
    client = sdk(gw)
    assert ask(client, ASKED) == (f"echo: {ASKED}", "miss")
    assert ask(client, PARAPHRASE) == (f"echo: {ASKED}", "semantic-hit")
    assert ask(client, "What is the capital city of Spain?") == ("echo: What is the capital city of Spain?", "miss")
    streamed = ask(client, "Tell me the capital city of France?", stream=True,
                   stream_options={"include_usage": True})
    assert streamed == (f"echo: {ASKED}", "semantic-hit")
    assert ask(client, "Book 2 tickets to Paris") == ("echo: Book 2 tickets to Paris", "miss")
    assert ask(client, "Book 3 tickets to Paris") == ("echo: Book 3 tickets to Paris", "miss")  # a guard refused
    metrics = httpx.get(gw.url + "/metrics", headers={"authorization": f"Bearer {MASTER}"}).text
    gw.stop()  # flushes the request log

    rows = records(config)
    assert [(r["cache_status"], r["outcome"]) for r in rows] == [
        ("miss", "ok"), ("hit_semantic", "cached"), ("miss", "ok"), ("hit_semantic", "cached"), ("miss", "ok"),
        ("miss", "ok")]
    assert rows[1]["cost_nanousd"] == 0 and rows[1]["cost_saved_usd"] == pytest.approx(rows[0]["cost_nanousd"] / 1e9)
    assert 'keel_cache_requests_total{model="sim",status="hit_semantic"} 2.0' in metrics
    assert 'keel_cache_semantic_refusals_total{guard="number"} 1.0' in metrics


def test_two_tenants_asking_alike_never_get_each_others_answer(
    gateway: Callable[..., GatewayProcess], tmp_path: Path,
) -> None:
    config = serving(tmp_path, auth={"virtual_keys": True})
    acme, globex = create_key(config, tmp_path, "acme"), create_key(config, tmp_path, "globex")
    gw = gateway(config, env={"KEEL_MASTER_KEY": MASTER})
    seen = [ask(sdk(gw, key), question)[1] for key, question in
            ((acme, ASKED), (globex, PARAPHRASE), (acme, PARAPHRASE), (globex, ASKED))]
    assert seen == ["miss", "miss", "semantic-hit", "semantic-hit"]


def test_replicas_share_both_caches_in_postgres_and_an_outage_is_a_miss(
    tmp_path: Path, pgvector_database: str, pgvector_server: PgvectorServer,  # noqa: F811
) -> None:
    config = serving(tmp_path, {"backend": "postgres", "postgres_url": pgvector_database, "exact": {"enabled": True},
                                "semantic": {"enabled": True, "threshold": 0.85}})
    replicas = [GatewayProcess(config, tmp_path, {"KEEL_MASTER_KEY": MASTER}) for _ in range(2)]
    try:
        for replica in replicas:
            replica.start()
        one, two = (sdk(gw) for gw in replicas)
        assert ask(one, ASKED) == (f"echo: {ASKED}", "miss")
        assert ask(two, PARAPHRASE) == (f"echo: {ASKED}", "semantic-hit")  # stored by the other replica
        assert ask(two, ASKED) == (f"echo: {ASKED}", "hit")  # the exact entry, in PostgreSQL too
        pgvector_server.stop()
        assert ask(one, "Which city is the capital of France?") == ("echo: Which city is the capital of France?",
                                                                     "miss")
        assert ask(two, ASKED) == (f"echo: {ASKED}", "miss")
        metrics = httpx.get(replicas[1].url + "/metrics", headers={"authorization": f"Bearer {MASTER}"}).text
        pgvector_server.start()
        assert ask(one, "Tell me the capital city of France?") == (f"echo: {ASKED}", "semantic-hit")  # what it held
    finally:
        for replica in replicas:
            replica.stop()
    assert 'keel_cache_backend_up{backend="postgresql"} 0.0' in metrics
    errors = float(metrics.split('keel_cache_backend_errors_total{backend="postgresql"} ')[1].split()[0])
    assert errors >= 2  # the exact lookup and the semantic search of the call while it was down
    log = replicas[1].log()
    assert log.count("the cache store (PostgreSQL) cannot be reached") == 1 and "Traceback" not in log
    # `keel cache clear` reaches PostgreSQL without a gateway: 3 exact entries (the question, and the two
    # semantic hits' answers stored under their own exact keys) and 1 semantic entry.
    path = tmp_path / "clear.yaml"
    path.write_text(yaml.safe_dump(config))
    done = subprocess.run([sys.executable, "-m", "keel.cli", "cache", "clear", "--config", str(path), "--model", "sim"],
                          capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout.strip()) == (0, "Removed 4 cache entries from PostgreSQL."), done.stderr
