"""Acceptance: virtual keys across two `keel serve` replicas sharing one PostgreSQL database.

A key made with `keel keys create` works on both through the official openai SDK; a model outside
its list is a 403 `model_not_allowed`, a key of the wrong format a 401; a key revoked through one
replica's admin API is refused by the other within a second; a header with a bare CR is a 4xx,
and the gateway goes on serving.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml
from conftest import GatewayProcess, fresh_pg_database

MASTER = "sk-master-keys-e2e"
MESSAGES: list[Any] = [{"role": "user", "content": "hello"}]


def keel_config(url: str) -> dict[str, Any]:
    return {"models": [{"name": "chat", "deployments": [{"provider": "simulated"}]},
                       {"name": "big", "deployments": [{"provider": "simulated"}]}],
            "store": {"url": url}, "auth": {"virtual_keys": True}}


def create_key(config: dict[str, Any], tmp_path: Path, *args: str) -> str:
    path = tmp_path / "keys.yaml"
    path.write_text(yaml.safe_dump(config))
    done = subprocess.run([sys.executable, "-m", "keel.cli", "keys", "create", "--config", str(path), *args],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    secret = done.stdout.strip()
    assert secret.startswith("sk-keel-") and secret not in done.stderr
    return secret


def client(gw: GatewayProcess, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0, timeout=10)


def test_a_key_revoked_on_one_replica_is_refused_by_the_other_within_a_second(
    gateway: Callable[..., GatewayProcess], tmp_path: Path,
) -> None:
    with fresh_pg_database("keel_keys") as url:
        config = keel_config(url)
        secret = create_key(config, tmp_path, "--tenant", "team-a", "--model", "chat", "--label", "e2e")
        first = gateway(config, env={"KEEL_MASTER_KEY": MASTER})
        second = gateway(config, env={"KEEL_MASTER_KEY": MASTER})
        for gw in (first, second):
            answer = client(gw, secret).chat.completions.create(model="chat", messages=MESSAGES)
            assert answer.choices[0].message.content
        with pytest.raises(openai.PermissionDeniedError) as denied:
            client(first, secret).chat.completions.create(model="big", messages=MESSAGES)
        assert denied.value.status_code == 403 and denied.value.code == "model_not_allowed"
        with pytest.raises(openai.AuthenticationError):
            client(first, "sk-not-a-keel-key").chat.completions.create(model="chat", messages=MESSAGES)

        [key] = httpx.get(first.url + "/admin/keys", headers={"authorization": f"Bearer {MASTER}"}).json()["data"]
        revoked = httpx.delete(f"{first.url}/admin/keys/{key['id']}", headers={"authorization": f"Bearer {MASTER}"})
        assert revoked.status_code == 200
        revoked_at = time.monotonic()
        other = client(second, secret)
        refused_after = None
        while time.monotonic() - revoked_at < 5:  # a bound to fail on, not a sleep: each poll is a real call
            try:
                other.chat.completions.create(model="chat", messages=MESSAGES)
            except openai.AuthenticationError as exc:
                refused_after = time.monotonic() - revoked_at
                assert "revoked" in exc.message
                break
        assert refused_after is not None and refused_after < 1.0, refused_after


def test_a_bare_cr_in_a_header_is_refused_and_the_gateway_goes_on(
    gateway: Callable[..., GatewayProcess], tmp_path: Path,
) -> None:
    config = keel_config(f"sqlite:///{tmp_path / 'keel.db'}")
    gw = gateway(config, env={"KEEL_MASTER_KEY": MASTER})
    body = b'{"model": "chat", "messages": [{"role": "user", "content": "hi"}]}'
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as conn:
        head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sk-keel-a\rb\r\n"
                b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body))
        conn.sendall(head + body)
        status_line = conn.recv(200).split(b"\r\n", 1)[0]
    assert status_line.startswith(b"HTTP/1.1 4"), status_line
    assert client(gw, MASTER).chat.completions.create(model="chat", messages=MESSAGES).choices
