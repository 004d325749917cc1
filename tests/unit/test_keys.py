"""Virtual keys in-process and through the gateway (ASGI, SQLite): stored hashed, 401 for a
missing, unknown, malformed, expired or revoked key, 403 for a model the key may not use, the
key's id and tenant in the request log, and tenants that never see each other's data."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from keel.auth.keys import Credential, KeyLimits, VirtualKey, digest, new_secret
from keel.auth.lookup import KeyLookup
from keel.config import parse_config
from keel.engine import Keel
from keel.errors import AuthenticationFailed, ModelNotAllowed
from keel.pipeline import Context
from keel.server import create_app
from keel.types import ChatRequest

MASTER = "master-key-of-the-test"
MESSAGES = [{"role": "user", "content": "hello"}]


PRICED = {"provider": "simulated", "price": {"input": 1000, "output": 1000}}


def config(tmp_path: Path, **extra: Any) -> Any:
    return parse_config({
        "models": [{"name": "sim", "deployments": [PRICED]}, {"name": "other", "deployments": [PRICED]}],
        "store": {"url": f"sqlite:///{tmp_path / 'keel.db'}"}, "auth": {"virtual_keys": True}, **extra,
    })


def bearer(secret: str) -> dict[str, str]:
    return {"authorization": f"Bearer {secret}"}


# ---------------------------------------------------------------------------- the key itself


def test_a_secret_is_prefixed_random_and_only_its_digest_is_kept(tmp_path: Path) -> None:
    keel = Keel(config(tmp_path))
    keel.writer.store.migrate()
    key, secret = keel.keys.create("team-a", label="ci")
    assert secret.startswith("sk-keel-") and len(secret) == 51 and secret != new_secret()
    assert key.digest == digest(secret) and Credential.of(f"Bearer {secret}").well_formed
    raw = (tmp_path / "keel.db").read_bytes()
    assert secret.encode() not in raw and secret[8:].encode() not in raw  # never stored, only its hash
    assert "digest" not in key.public() and secret not in str(key.public())
    assert keel.keys.find(digest(secret)) == key


# ---------------------------------------------------------------------------- the lookup cache


class CountingSource:
    def __init__(self, keys: dict[str, VirtualKey]) -> None:
        self.keys = keys
        self.reads = 0

    def find(self, key_digest: str) -> VirtualKey | None:
        self.reads += 1
        return self.keys.get(key_digest)


async def test_a_found_key_is_read_again_only_after_the_ttl() -> None:
    now = [0.0]
    key = VirtualKey(id="vk_1", tenant="a", digest="d1")
    source = CountingSource({"d1": key})
    lookup = KeyLookup(source, ttl_s=0.5, clock=lambda: now[0])
    assert await lookup.find("d1") is key and await lookup.find("d1") is key
    assert source.reads == 1
    source.keys["d1"] = revoked = VirtualKey(id="vk_1", tenant="a", digest="d1", revoked_at=1.0)
    now[0] = 0.49
    assert await lookup.find("d1") is key  # still within the TTL
    now[0] = 0.5
    assert await lookup.find("d1") is revoked and source.reads == 2


async def test_unknown_keys_are_remembered_in_a_bounded_cache() -> None:
    source = CountingSource({})
    lookup = KeyLookup(source, ttl_s=0.5, negative_size=100, clock=lambda: 0.0)
    for i in range(1000):
        assert await lookup.find(f"random-{i}") is None
    assert len(lookup._unknown) == 100  # a flood of made-up keys cannot grow memory
    assert await lookup.find("random-999") is None and source.reads == 1000  # the newest are remembered


async def test_concurrent_misses_of_one_key_share_one_read() -> None:
    source = CountingSource({"d1": VirtualKey(id="vk_1", tenant="a", digest="d1")})
    lookup = KeyLookup(source)
    found = await asyncio.gather(*(lookup.find("d1") for _ in range(20)))
    assert {k.id for k in found if k} == {"vk_1"} and source.reads == 1


# ---------------------------------------------------------------------------- in-process


@pytest.fixture
async def keel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv("KEEL_MASTER_KEY", MASTER)
    async with Keel(config(tmp_path)) as keel:
        yield keel


async def call(keel: Keel, authorization: str | None, model: str = "sim") -> Context:
    ctx = Context(credential=Credential.of(authorization))
    await keel.handle(ChatRequest.model_validate({"model": model, "messages": MESSAGES}), ctx)
    return ctx


async def test_a_valid_key_names_the_call_by_its_id_and_tenant(keel: Keel) -> None:
    key, secret = keel.keys.create("team-a", models=["sim"], limits=KeyLimits(requests_per_minute=5))
    ctx = await call(keel, f"Bearer {secret}")
    assert ctx.key_id == key.id and ctx.tenant == "team-a"
    assert ctx.key is not None and ctx.key.limits.requests_per_minute == 5  # for the rate limits
    keel.writer.flush()
    [record] = keel.writer.store.records(0)
    assert record["key_id"] == key.id and record["tenant"] == "team-a"


@pytest.mark.parametrize("case", ["missing", "unknown", "malformed", "expired", "revoked", "not bearer"])
async def test_a_bad_key_is_refused_with_401_and_logged(keel: Keel, case: str) -> None:
    key, secret = keel.keys.create("team-a", expires_at=time.time() - 1 if case == "expired" else None)
    if case == "revoked":
        keel.keys.revoke(key.id)
    header = {"missing": None, "unknown": f"Bearer {new_secret()}", "malformed": "Bearer sk-live-123",
              "expired": f"Bearer {secret}", "revoked": f"Bearer {secret}", "not bearer": f"Basic {secret}"}[case]
    with pytest.raises(AuthenticationFailed) as refused:
        await call(keel, header)
    assert refused.value.status == 401 and refused.value.code == "invalid_api_key"
    assert secret not in refused.value.message
    keel.writer.flush()
    [record] = keel.writer.store.records(0)
    assert record["status"] == 401 and record["outcome"] == "invalid"


async def test_a_key_for_a_model_it_may_not_use_gets_403(keel: Keel) -> None:
    _, secret = keel.keys.create("team-a", models=["sim"])
    for model in ("other", "no-such-model"):  # an unknown model tells a limited key nothing more
        with pytest.raises(ModelNotAllowed) as refused:
            await call(keel, f"Bearer {secret}", model)
        assert refused.value.status == 403 and refused.value.code == "model_not_allowed"


async def test_a_caller_without_a_key_learns_nothing_of_the_models(keel: Keel) -> None:
    with pytest.raises(AuthenticationFailed):
        await call(keel, None, "no-such-model")


async def test_the_master_key_passes_and_in_process_calls_are_trusted(keel: Keel) -> None:
    assert (await call(keel, f"Bearer {MASTER}", "other")).key_id == "master"
    reply = await keel.chat(model="other", messages=MESSAGES)
    assert reply.choices[0].message.content


async def test_a_tenant_budget_counts_that_tenants_calls_only(tmp_path: Path) -> None:
    cfg = config(tmp_path, budgets=[{"scope": "tenant", "match": "team-a", "limit_usd": 1e-6}])
    async with Keel(cfg) as keel:
        _, a = keel.keys.create("team-a")
        _, b = keel.keys.create("team-b")
        with pytest.raises(Exception) as refused:
            await call(keel, f"Bearer {a}")
        assert getattr(refused.value, "code", None) == "budget_exceeded"
        assert (await call(keel, f"Bearer {b}")).tenant == "team-b"


# ---------------------------------------------------------------------------- the gateway


@pytest.fixture
def client(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[TestClient]:
    monkeypatch.setenv("KEEL_MASTER_KEY", MASTER)
    cfg = config(tmp_path, budgets=[{"scope": "tenant", "limit_usd": 1e6}, {"scope": "key", "limit_usd": 1e5}])
    with TestClient(create_app(Keel(cfg))) as client:
        yield client


def create(client: TestClient, by: str = MASTER, **fields: Any) -> dict[str, Any]:
    answer = client.post("/admin/keys", json=fields, headers=bearer(by))
    assert answer.status_code == 201, answer.text
    created: dict[str, Any] = answer.json()
    return created


def chat(client: TestClient, secret: str | None, model: str = "sim") -> Any:
    return client.post("/v1/chat/completions", json={"model": model, "messages": MESSAGES},
                       headers=bearer(secret) if secret else {})


def test_keys_are_created_shown_once_listed_and_revoked_through_the_admin_api(client: TestClient) -> None:
    created = create(client, tenant="team-a", label="ci", models=["sim"], requests_per_minute=60)
    assert created["key"].startswith("sk-keel-") and created["limits"] == {"requests_per_minute": 60}
    assert chat(client, created["key"]).status_code == 200
    listed = client.get("/admin/keys", headers=bearer(MASTER)).json()["data"]
    assert [k["id"] for k in listed] == [created["id"]] and "key" not in listed[0]
    assert created["key"] not in client.get("/admin/keys", headers=bearer(MASTER)).text
    assert client.delete(f"/admin/keys/{created['id']}", headers=bearer(MASTER)).json()["revoked"] is True
    refused = chat(client, created["key"])  # the replica that revoked forgets it at once
    assert refused.status_code == 401
    assert refused.json()["error"]["type"] == "authentication_error"
    assert refused.json()["error"]["code"] == "invalid_api_key"


def test_bad_keys_get_openai_shaped_401s_and_a_disallowed_model_403(client: TestClient) -> None:
    limited = create(client, tenant="team-a", models=["sim"])["key"]
    for secret in (None, "sk-keel-short", new_secret(), "x" * 5000):
        answer = chat(client, secret)
        assert answer.status_code == 401 and set(answer.json()["error"]) == {"message", "type", "param", "code"}
    refused = chat(client, limited, "other")
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "model_not_allowed"
    assert client.get("/v1/models", headers=bearer(limited)).status_code == 200
    assert client.get("/v1/models", headers=bearer(new_secret())).status_code == 401


def test_admin_api_needs_the_master_key_or_a_tenant_admin_key(client: TestClient) -> None:
    user = create(client, tenant="team-a")["key"]
    assert client.get("/admin/keys").status_code == 401
    assert client.get("/admin/keys", headers=bearer(user)).status_code == 403
    assert client.post("/admin/keys", json={"label": "no tenant"}, headers=bearer(MASTER)).status_code == 400
    bad = client.post("/admin/keys", json={"tenant": "a", "colour": "red"}, headers=bearer(MASTER))
    assert bad.status_code == 400 and "colour" in bad.json()["error"]["message"]


def test_a_tenant_admin_sees_and_changes_only_its_own_tenant(client: TestClient) -> None:
    admin_a = create(client, tenant="team-a", admin=True)["key"]
    key_a = create(client, by=admin_a, label="made by a's admin")  # its tenant by default
    assert key_a["tenant"] == "team-a"
    key_b = create(client, tenant="team-b")
    forbidden = client.post("/admin/keys", json={"tenant": "team-b"}, headers=bearer(admin_a))
    assert forbidden.status_code == 403
    seen = client.get("/admin/keys", headers=bearer(admin_a)).json()["data"]
    assert {k["tenant"] for k in seen} == {"team-a"} and key_b["id"] not in {k["id"] for k in seen}
    assert client.delete(f"/admin/keys/{key_b['id']}", headers=bearer(admin_a)).status_code == 404
    assert chat(client, key_b["key"]).status_code == 200  # untouched
    assert client.post("/admin/budgets", json={"scope": "global", "limit_usd": 1},
                       headers=bearer(admin_a)).status_code == 403


def test_the_request_log_and_budgets_are_scoped_by_tenant(client: TestClient) -> None:
    admin_a = create(client, tenant="team-a", admin=True)["key"]
    key_a, key_b = create(client, tenant="team-a"), create(client, tenant="team-b")
    assert chat(client, key_a["key"]).status_code == 200
    assert chat(client, key_b["key"]).status_code == 200
    keel: Keel = client.app.api.state.keel.keel  # type: ignore[attr-defined]
    assert keel.writer.flush()
    everyone = client.get("/admin/requests", headers=bearer(MASTER)).json()["data"]
    assert {r["tenant"] for r in everyone} == {"team-a", "team-b"}
    mine = client.get("/admin/requests", headers=bearer(admin_a)).json()["data"]
    assert [r["key_id"] for r in mine] == [key_a["id"]] and {r["tenant"] for r in mine} == {"team-a"}
    budgets = client.get("/admin/budgets", headers=bearer(admin_a)).json()["data"]
    counted = {c["value"] for rule in budgets for c in rule["counters"]}
    assert counted == {"team-a", key_a["id"]}
    all_counted = {c["value"] for rule in client.get("/admin/budgets", headers=bearer(MASTER)).json()["data"]
                   for c in rule["counters"]}
    assert {"team-b", key_b["id"]} <= all_counted
