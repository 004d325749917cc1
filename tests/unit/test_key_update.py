"""Changing a key in place through the admin API (PATCH /admin/keys/{id}) and `keel keys update`:
the change is used by the next call (a tier moves the key's calls to another route), only the fields
given change, and bad input gets a precise error with nothing changed (the store itself, on SQLite
and PostgreSQL: tests/integration/test_key_update_store.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from starlette.testclient import TestClient
from typer.testing import CliRunner

from keel.cli import app
from keel.config import parse_config
from keel.engine import Keel
from keel.server import create_app

MASTER = "master-key-of-the-key-update-test"
SIM = {"provider": "simulated"}


def settings(tmp_path: Path) -> dict[str, Any]:
    return {
        "models": [{"name": "auto", "router": {"strategy": "rules", "tiers": ["fast", "smart"],
                                               "rules": [{"tier": "smart", "key_tiers": ["pro"]}]}},
                   {"name": "fast", "deployments": [{**SIM, "name": "fast-sim"}]},
                   {"name": "smart", "deployments": [{**SIM, "name": "smart-sim"}]}],
        "store": {"url": f"sqlite:///{tmp_path / 'keel.db'}"}, "auth": {"virtual_keys": True},
    }


@pytest.fixture
def client(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[TestClient]:
    monkeypatch.setenv("KEEL_MASTER_KEY", MASTER)
    with TestClient(create_app(Keel(parse_config(settings(tmp_path))))) as client:
        yield client


def bearer(secret: str) -> dict[str, str]:
    return {"authorization": f"Bearer {secret}"}


def routed(client: TestClient, secret: str) -> str:
    answer = client.post("/v1/chat/completions", headers=bearer(secret),
                         json={"model": "auto", "messages": [{"role": "user", "content": "hello"}]})
    assert answer.status_code == 200, answer.text
    return answer.headers["x-keel-route"].split(";")[0]


def test_a_changed_tier_routes_the_keys_next_call_and_only_given_fields_change(client: TestClient) -> None:
    made = client.post("/admin/keys", headers=bearer(MASTER),
                       json={"tenant": "team-a", "tier": "free", "label": "app", "requests_per_minute": 50}).json()
    assert routed(client, made["key"]) == "fast"
    changed = client.patch(f"/admin/keys/{made['id']}", headers=bearer(MASTER), json={"tier": "pro"})
    assert changed.status_code == 200, changed.text
    body = changed.json()
    assert (body["tier"], body["label"], body["limits"]) == ("pro", "app", {"requests_per_minute": 50})
    assert "key" not in body and "digest" not in body  # the secret is never shown again
    assert routed(client, made["key"]) == "smart"
    cleared = client.patch(f"/admin/keys/{made['id']}", headers=bearer(MASTER), json={"tier": None}).json()
    assert cleared["tier"] is None and routed(client, made["key"]) == "fast"


def test_a_changed_model_list_refuses_the_models_left_out(client: TestClient) -> None:
    made = client.post("/admin/keys", headers=bearer(MASTER), json={"tenant": "team-a"}).json()
    assert routed(client, made["key"]) == "fast"
    client.patch(f"/admin/keys/{made['id']}", headers=bearer(MASTER), json={"models": ["smart"]})
    refused = client.post("/v1/chat/completions", headers=bearer(made["key"]),
                          json={"model": "fast", "messages": [{"role": "user", "content": "hi"}]})
    assert refused.status_code in (401, 403) and refused.json()["error"]["type"]


@pytest.mark.parametrize(("body", "status", "named"), [
    ({"tenant": "team-b"}, 400, "tenant"),
    ({"admin": True}, 400, "admin"),
    ({"tier": "a b\n"}, 400, "tier"),
    ({"requests_per_minute": 0}, 400, "requests_per_minute"),
    ({"models": []}, 400, "models"),
    ({"budgets": [{"limit_usd": -1}]}, 400, "limit_usd"),
    ({}, 400, "change"),
])
def test_bad_changes_are_refused_naming_the_field_and_nothing_changes(
        client: TestClient, body: dict[str, Any], status: int, named: str) -> None:
    made = client.post("/admin/keys", headers=bearer(MASTER), json={"tenant": "team-a", "tier": "free"}).json()
    refused = client.patch(f"/admin/keys/{made['id']}", headers=bearer(MASTER), json=body)
    assert refused.status_code == status, refused.text
    assert named in refused.json()["error"]["message"]
    listed = client.get("/admin/keys", headers=bearer(MASTER)).json()["data"]
    assert [(k["tier"], k["tenant"], k["admin"]) for k in listed] == [("free", "team-a", False)]


def test_not_json_a_missing_a_revoked_and_another_tenants_key(client: TestClient) -> None:
    master = bearer(MASTER)
    made = client.post("/admin/keys", headers=master, json={"tenant": "team-a"}).json()
    other_admin = client.post("/admin/keys", headers=master, json={"tenant": "team-b", "admin": True}).json()
    garbled = client.patch(f"/admin/keys/{made['id']}", headers=master, content=b"{tier:")
    assert garbled.status_code == 400 and garbled.json()["error"]["code"] == "invalid_json"
    missing = client.patch("/admin/keys/vk_0000000000000000", headers=master, json={"tier": "pro"})
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "key_not_found"
    foreign = client.patch(f"/admin/keys/{made['id']}", headers=bearer(other_admin["key"]), json={"tier": "pro"})
    assert foreign.status_code == 404  # another tenant's key is not told to exist
    ordinary = client.patch(f"/admin/keys/{made['id']}", headers=bearer(made["key"]), json={"tier": "pro"})
    assert ordinary.status_code in (401, 403)
    client.delete(f"/admin/keys/{made['id']}", headers=master)
    revoked = client.patch(f"/admin/keys/{made['id']}", headers=master, json={"tier": "pro"})
    assert revoked.status_code == 409 and revoked.json()["error"]["code"] == "key_revoked"
    assert {k["id"]: k["tier"] for k in client.get("/admin/keys", headers=master).json()["data"]}[made["id"]] is None


def test_keel_keys_update_changes_and_clears_fields(tmp_path: Path) -> None:
    path = tmp_path / "keel.yaml"
    path.write_text(orjson.dumps(settings(tmp_path)).decode())
    runner = CliRunner()
    made = orjson.loads(runner.invoke(app, ["keys", "create", "-c", str(path), "--tenant", "team-a", "--tier", "free",
                                            "--label", "app", "--json"]).stdout)
    changed = runner.invoke(app, ["keys", "update", made["id"], "-c", str(path), "--tier", "pro", "--rpm", "30",
                                  "--clear", "label", "--json"])
    assert changed.exit_code == 0, changed.output
    body = orjson.loads(changed.stdout)
    assert (body["tier"], body["label"], body["limits"]) == ("pro", None, {"requests_per_minute": 30})
    for args, says in ((["--clear", "colour"], "--clear"), ([], "say what to change"),
                       (["--tier", "pro\nfree"], "tier"), (["--expires-in", "soon"], "expires-in")):
        refused = runner.invoke(app, ["keys", "update", made["id"], "-c", str(path), *args])
        assert refused.exit_code == 2 and says in refused.output, (args, refused.output)
    missing = runner.invoke(app, ["keys", "update", "vk_0000000000000000", "-c", str(path), "--tier", "x"])
    assert missing.exit_code == 1 and "no key" in missing.output
    listed = orjson.loads(runner.invoke(app, ["keys", "list", "-c", str(path), "--json"]).stdout)
    assert [(k["tier"], k["label"]) for k in listed] == [("pro", None)]
