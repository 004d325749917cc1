"""A virtual key's tier: set by `keel keys create --tier` and the admin API, refused when it is not a
plain short label, and matched by routing rules' `key_tiers` (the store and its migration:
tests/integration/test_key_tier_store.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from starlette.testclient import TestClient
from typer.testing import CliRunner

from keel.auth.keys import TIER_CHARS, Credential, VirtualKey
from keel.cli import app
from keel.config import RouteRuleConfig, parse_config
from keel.engine import Keel
from keel.pipeline import Call, Context
from keel.routing.rules import RuleRoute
from keel.server import create_app
from keel.types import ChatRequest

MASTER = "master-key-of-the-tier-test"
MESSAGES = [{"role": "user", "content": "hello"}]
BAD_TIERS = ["", " ", "pro\nfree", "pro\x00", "p" * (TIER_CHARS + 1)]


# ---------------------------------------------------------------------------- the CLI and the admin API


def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "keel.yaml"
    path.write_text(orjson.dumps({
        "models": [{"name": "sim", "deployments": [{"provider": "simulated"}]}],
        "store": {"url": f"sqlite:///{tmp_path / 'keel.db'}"}, "auth": {"virtual_keys": True},
    }).decode())
    return path


def test_keel_keys_create_tier_is_stored_and_listed(tmp_path: Path) -> None:
    path = config_file(tmp_path)
    runner = CliRunner()
    made = runner.invoke(app, ["keys", "create", "-c", str(path), "--tenant", "team-a", "--tier", "pro", "--json"])
    assert made.exit_code == 0, made.output
    created = orjson.loads(made.stdout)
    assert created["tier"] == "pro" and created["key"].startswith("sk-keel-")
    listed = runner.invoke(app, ["keys", "list", "-c", str(path), "--json"])
    assert [(k["id"], k["tier"]) for k in orjson.loads(listed.stdout)] == [(created["id"], "pro")]
    table = runner.invoke(app, ["keys", "list", "-c", str(path)], env={"COLUMNS": "200"})
    assert table.exit_code == 0, table.output
    header, row = [line for line in table.stdout.splitlines() if "tier" in line or created["id"] in line][:2]
    assert "tier" in header and " pro " in row


def test_keel_keys_create_refuses_a_bad_tier_and_stores_nothing(tmp_path: Path) -> None:
    path = config_file(tmp_path)
    runner = CliRunner()
    refused = runner.invoke(app, ["keys", "create", "-c", str(path), "--tenant", "team-a", "--tier", "p" * 65])
    assert refused.exit_code == 2 and "tier" in refused.output
    assert orjson.loads(runner.invoke(app, ["keys", "list", "-c", str(path), "--json"]).stdout) == []


@pytest.fixture
def client(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[TestClient]:
    monkeypatch.setenv("KEEL_MASTER_KEY", MASTER)
    cfg = parse_config({
        "models": [{"name": "sim", "deployments": [{"provider": "simulated"}]}],
        "store": {"url": f"sqlite:///{tmp_path / 'keel.db'}"}, "auth": {"virtual_keys": True},
    })
    with TestClient(create_app(Keel(cfg))) as client:
        yield client


def test_the_admin_api_creates_and_lists_keys_with_their_tier(client: TestClient) -> None:
    master = {"authorization": f"Bearer {MASTER}"}
    pro = client.post("/admin/keys", json={"tenant": "team-a", "tier": "pro"}, headers=master)
    plain = client.post("/admin/keys", json={"tenant": "team-a"}, headers=master)
    assert pro.status_code == plain.status_code == 201
    assert (pro.json()["tier"], plain.json()["tier"]) == ("pro", None)
    listed = client.get("/admin/keys", headers=master).json()["data"]
    assert {k["id"]: k["tier"] for k in listed} == {pro.json()["id"]: "pro", plain.json()["id"]: None}


@pytest.mark.parametrize("tier", [*BAD_TIERS, 3])
def test_the_admin_api_refuses_a_bad_tier_with_400_naming_it(client: TestClient, tier: Any) -> None:
    master = {"authorization": f"Bearer {MASTER}"}
    refused = client.post("/admin/keys", json={"tenant": "team-a", "tier": tier}, headers=master)
    assert refused.status_code == 400, refused.text
    assert "tier" in refused.json()["error"]["message"]
    assert client.get("/admin/keys", headers=master).json()["data"] == []


# ---------------------------------------------------------------------------- routing rules


def call_with(tier: str | None, *, key: bool = True, tenant: str = "team-a") -> Call:
    cfg = parse_config({"models": [{"name": "fast", "deployments": [{"provider": "simulated"}]}]},
                       warn_unset_keys=False)
    model = cfg.model("fast")
    assert model is not None
    ctx = Context()
    if key:
        ctx.key = VirtualKey(id="vk_1", tenant=tenant, digest="0" * 64, tier=tier)
        ctx.key_id, ctx.tenant = ctx.key.id, tenant
    request = ChatRequest.model_validate({"model": "auto", "messages": MESSAGES})
    return Call(request=request, model=model, deployments=[], ctx=ctx)


async def test_rules_route_by_the_keys_tier_and_a_call_without_one_matches_no_tier_rule() -> None:
    route = RuleRoute([RouteRuleConfig(tier="smart", key_tiers=["pro", "enterprise"]),
                       RouteRuleConfig(tier="mid", key_tiers=["free"], tenants=["team-b"])],
                      ["fast", "mid", "smart"])
    for tier, tenant, expected in [("pro", "team-a", (2, "rule[0]")), ("enterprise", "team-a", (2, "rule[0]")),
                                   ("free", "team-b", (1, "rule[1]")), ("free", "team-a", (0, "default")),
                                   ("Pro", "team-a", (0, "default")), (None, "team-a", (0, "default"))]:
        choice = await route.decide(call_with(tier, tenant=tenant), [])
        assert (choice.tier, choice.reason) == expected, (tier, tenant)
    keyless = await route.decide(call_with(None, key=False), [])
    assert (keyless.tier, keyless.reason) == (0, "default")


async def test_a_rule_without_key_tiers_still_matches_any_key() -> None:
    route = RuleRoute([RouteRuleConfig(tier="smart", tenants=["team-a"])], ["fast", "smart"])
    assert (await route.decide(call_with(None), [])).tier == 1
    assert (await route.decide(call_with("pro"), [])).tier == 1


async def test_in_process_the_auth_stage_gives_the_rules_the_keys_tier(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEEL_MASTER_KEY", MASTER)
    sim = {"provider": "simulated"}
    cfg = parse_config({
        "models": [{"name": "auto", "router": {"strategy": "rules", "tiers": ["fast", "smart"],
                                               "rules": [{"tier": "smart", "key_tiers": ["pro"]}]}},
                   {"name": "fast", "deployments": [{**sim, "name": "fast-sim"}]},
                   {"name": "smart", "deployments": [{**sim, "name": "smart-sim"}]}],
        "store": {"url": f"sqlite:///{tmp_path / 'keel.db'}"}, "auth": {"virtual_keys": True},
    })
    async with Keel(cfg) as keel:
        keel.writer.store.migrate()
        _, pro = keel.keys.create("team-a", tier="pro")
        _, free = keel.keys.create("team-a", tier="free")
        routes = {}
        for name, secret in (("pro", pro), ("free", free), ("master", MASTER)):
            ctx = Context(credential=Credential.of(f"Bearer {secret}"))
            await keel.handle(ChatRequest.model_validate({"model": "auto", "messages": MESSAGES}), ctx)
            assert ctx.route is not None
            routes[name] = (ctx.route.model, ctx.route.reason)
    assert routes == {"pro": ("smart", "rule[0]"), "free": ("fast", "default"), "master": ("fast", "default")}
