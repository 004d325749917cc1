"""Invalidating the exact cache: the key layout that makes entries findable by tenant and model, the
memory store's `clear` by each filter, `DELETE /admin/cache` (master key, tenant admin keys, bad
parameters) and `keel cache clear` on an in-memory cache (it cannot reach it, and says what to do)."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from starlette.testclient import TestClient

from keel.cache.entry import CachedAnswer, CorruptEntry
from keel.cache.key import KeyScope, cache_key
from keel.cache.memory import MemoryStore
from keel.config import parse_config
from keel.engine import Keel
from keel.pipeline import Context
from keel.server import create_app
from keel.types import ChatRequest

MESSAGES = [{"role": "user", "content": "What is 2+2?"}]


def chat(model: str = "m", content: str = "What is 2+2?") -> ChatRequest:
    return ChatRequest.model_validate(
        {"model": model, "temperature": 0, "messages": [{"role": "user", "content": content}]}
    )


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# ---------------------------------------------------------------------------- the key layout


def test_the_key_names_its_tenant_and_model_then_the_hash() -> None:
    version, tenant, model, digest = cache_key(chat("gpt-4o"), "acme").split(":")
    assert (version, tenant, model, len(digest)) == ("v2", "acme", "gpt-4o", 64)
    assert cache_key(chat(), None).split(":")[1] == "-"
    assert cache_key(chat(), "-").split(":")[1] == "%2D"  # a tenant named "-" is not "no tenant"


def test_a_colon_in_a_model_or_tenant_never_makes_two_scopes_collide() -> None:
    one = cache_key(chat("a:b"), "x")  # model "a:b" of tenant "x"
    two = cache_key(chat("a"), "b:x")  # model "a" of tenant "b:x"
    assert one != two and one.count(":") == two.count(":") == 3
    assert KeyScope(model="a:b", tenant="x").matches(one) and not KeyScope(model="a:b", tenant="x").matches(two)
    assert KeyScope(model="a", tenant="b:x").matches(two) and not KeyScope(model="a", tenant="b:x").matches(one)
    assert not KeyScope(model="a").matches(one)  # model "a" does not reach model "a:b"
    assert not KeyScope(tenant="b").matches(two)  # tenant "b" does not reach tenant "b:x"
    assert "*" not in cache_key(chat("m*"), "t?[x]").split(":", 3)[1] + cache_key(chat("m*"), "t").split(":")[2]


def test_a_scope_matches_only_keys_of_this_version() -> None:
    key = cache_key(chat(), "acme")
    assert KeyScope().matches(key)
    assert not KeyScope().matches("v1:" + key.rsplit(":", 1)[1]) and not KeyScope().matches("v3:acme:m:x")
    assert KeyScope(key_prefix=key[:12]).matches(key) and not KeyScope(key_prefix="v2:other").matches(key)


def test_an_entry_keeps_when_it_was_stored_and_one_without_that_time_still_reads() -> None:
    completion = {"id": "c1", "choices": [{"message": {"role": "assistant", "content": "4"}}]}
    assert CachedAnswer.loads(CachedAnswer(completion, 5, 1234.5).dumps()).stored_at == 1234.5
    assert CachedAnswer.loads(orjson.dumps({"completion": completion, "cost_nanos": 5})).stored_at is None
    for bad in ("yesterday", True, [1]):
        with pytest.raises(CorruptEntry):
            CachedAnswer.loads(orjson.dumps({"completion": completion, "cost_nanos": 5, "stored_at": bad}))
    with pytest.raises(CorruptEntry):
        CachedAnswer.loads(b"[1, 2]")


# ---------------------------------------------------------------------------- the memory store


async def filled(clock: Clock) -> tuple[MemoryStore, dict[str, str]]:
    """Entries of two models and three tenants (none among them), stored 100 s apart."""
    store = MemoryStore(1 << 20, clock=clock)
    keys: dict[str, str] = {}
    for name, (model, tenant) in {"m-acme": ("m", "acme"), "m-globex": ("m", "globex"), "n-acme": ("n", "acme"),
                                  "n-none": ("n", None)}.items():
        keys[name] = cache_key(chat(model), tenant)
        await store.set(keys[name], name.encode(), ttl_s=3600)
        clock.now += 100
    return store, keys


async def left(store: MemoryStore, keys: dict[str, str]) -> set[str]:
    return {name for name, key in keys.items() if await store.get(key) is not None}


@pytest.mark.parametrize(("filters", "removed"), [
    ({}, {"m-acme", "m-globex", "n-acme", "n-none"}),
    ({"model": "m"}, {"m-acme", "m-globex"}),
    ({"tenant": "acme"}, {"m-acme", "n-acme"}),
    ({"model": "n", "tenant": "acme"}, {"n-acme"}),
    ({"older_than_s": 250}, {"m-acme", "m-globex"}),  # stored 400 s and 300 s ago; the others 200 s, 100 s
    ({"older_than_s": 250, "tenant": "acme"}, {"m-acme"}),
    ({"key_prefix": "v2:-:"}, {"n-none"}),  # the entries of no tenant
    ({"key_prefix": "v2:acme:n:", "model": "m"}, set()),  # every filter must hold
    ({"model": "unknown"}, set()),
])
async def test_the_memory_store_clears_what_every_filter_given_selects(
    filters: dict[str, Any], removed: set[str],
) -> None:
    clock = Clock()
    store, keys = await filled(clock)
    assert await store.clear(**filters) == len(removed)
    assert await left(store, keys) == set(keys) - removed
    assert store.size == sum(len(k) + len(name) for name, k in keys.items() if name not in removed)


async def test_expired_entries_are_dropped_by_a_clear_but_not_counted() -> None:
    clock = Clock()
    store, keys = await filled(clock)
    clock.now += 3600 - 250  # the first two (stored 400 s and 300 s before) are past their hour
    assert await store.clear(tenant="acme") == 1  # n-acme; m-acme had expired
    assert len(store) == 1 and await left(store, keys) == {"n-none"}


# ---------------------------------------------------------------------------- the stage


@pytest.fixture
async def keel(tmp_path: Path) -> Any:
    async with Keel(parse_config({
        "models": [{"name": "m", "deployments": [{"provider": "simulated"}]}],
        "cache": {"backend": "memory", "exact": {"enabled": True}},
        "store": {"url": f"sqlite:///{tmp_path}/keel.db", "spool_path": str(tmp_path / "spool.jsonl")},
    })) as keel:
        yield keel


async def status(keel: Keel, tenant: str | None = None) -> str:
    ctx = Context(tenant=tenant)
    await keel.handle(chat(), ctx)
    return ctx.cache_status


async def test_an_entry_of_the_old_key_version_is_never_read(keel: Keel) -> None:
    assert keel.cache.exact is not None
    store = keel.cache.exact.settings["m"].store
    fields = chat().model_dump(mode="json", exclude_none=True, exclude={"stream", "stream_options", "user", "metadata"})
    digest = hashlib.sha256(orjson.dumps({"tenant": None, "request": fields}, option=orjson.OPT_SORT_KEYS)).hexdigest()
    stale = {"id": "old", "choices": [{"message": {"role": "assistant", "content": "stale"}, "finish_reason": "stop"}]}
    await store.set(f"v1:{digest}", CachedAnswer(stale, 1).dumps(), 60)  # what the version before wrote
    assert await status(keel) == "miss"
    assert await status(keel) == "hit_exact"


async def test_the_stage_stores_when_an_entry_was_made_and_a_clear_makes_the_next_call_a_miss(keel: Keel) -> None:
    assert keel.cache.exact is not None
    assert [await status(keel, t) for t in ("acme", "globex")] == ["miss", "miss"]
    raw = await keel.cache.exact.settings["m"].store.get(cache_key(chat(), "acme"))
    assert raw is not None and CachedAnswer.loads(raw).stored_at is not None
    assert await keel.cache.clear(tenant="acme") == 1
    assert [await status(keel, t) for t in ("acme", "globex")] == ["miss", "hit_exact"]
    assert await keel.cache.clear(model="not-cached") == 0
    assert await keel.cache.clear() == 2


# ---------------------------------------------------------------------------- the admin API

MASTER = "sk-master-cache-clear"


def bearer(secret: str) -> dict[str, str]:
    return {"authorization": f"Bearer {secret}"}


@pytest.fixture
def client(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[TestClient]:
    monkeypatch.setenv("KEEL_MASTER_KEY", MASTER)
    cfg = parse_config({
        "models": [{"name": "sim", "deployments": [{"provider": "simulated"}]},
                   {"name": "other", "deployments": [{"provider": "simulated"}]}],
        "cache": {"backend": "memory", "exact": {"enabled": True}},
        "store": {"url": f"sqlite:///{tmp_path / 'keel.db'}"}, "auth": {"virtual_keys": True},
    })
    with TestClient(create_app(Keel(cfg))) as client:
        yield client


def create(client: TestClient, **fields: Any) -> str:
    answer = client.post("/admin/keys", json=fields, headers=bearer(MASTER))
    assert answer.status_code == 201, answer.text
    secret: str = answer.json()["key"]
    return secret


def cache(client: TestClient, secret: str, model: str = "sim") -> str:
    answer = client.post("/v1/chat/completions", headers=bearer(secret),
                         json={"model": model, "messages": MESSAGES, "temperature": 0})
    assert answer.status_code == 200, answer.text
    return answer.headers["x-keel-cache"]


def clear(client: TestClient, secret: str | None, **query: Any) -> Any:
    return client.delete("/admin/cache", params=query, headers=bearer(secret) if secret else {})


def test_a_tenant_admin_clears_its_own_tenant_only_and_the_master_key_everything(client: TestClient) -> None:
    admin_a, key_a, key_b = create(client, tenant="team-a", admin=True), create(client, tenant="team-a"), create(
        client, tenant="team-b")
    assert [cache(client, k) for k in (key_a, key_b, key_a, key_b)] == ["miss", "miss", "hit", "hit"]

    forbidden = clear(client, admin_a, tenant="team-b")
    assert forbidden.status_code == 403 and forbidden.json()["error"]["code"] == "forbidden"
    assert "team-a" in forbidden.json()["error"]["message"]
    assert clear(client, admin_a, tenant="team-a").json() == {"deleted": 1}
    assert (cache(client, key_a), cache(client, key_b)) == ("miss", "hit")  # team-b's untouched

    assert clear(client, admin_a).json() == {"deleted": 1}  # no tenant given: its own
    assert cache(client, key_a, "other") == "miss"
    assert clear(client, MASTER, model="other").json() == {"deleted": 1}
    assert (cache(client, key_a, "other"), cache(client, key_b)) == ("miss", "hit")
    everything = clear(client, MASTER)
    assert everything.status_code == 200 and everything.json() == {"deleted": 2}  # a's "other", b's "sim"
    assert (cache(client, key_a, "other"), cache(client, key_b)) == ("miss", "miss")


def test_clearing_needs_an_admin_key(client: TestClient) -> None:
    user = create(client, tenant="team-a")
    cache(client, user)
    missing = clear(client, None)
    assert missing.status_code == 401 and missing.json()["error"]["type"] == "authentication_error"
    assert clear(client, user).status_code == 403  # may call models, not the admin API
    assert cache(client, user) == "hit"


@pytest.mark.parametrize(("query", "param"), [
    ({"older_than_s": "-1"}, "older_than_s"), ({"older_than_s": "a day"}, "older_than_s"),
    ({"older_than_s": "nan"}, "older_than_s"), ({"model": "gpt-5"}, "model"), ({"model": ""}, "model"),
    ({"modle": "sim"}, "modle"),  # a typo must not clear everything
])
def test_bad_parameters_are_a_400_naming_the_parameter_and_clear_nothing(
    client: TestClient, query: dict[str, str], param: str,
) -> None:
    user = create(client, tenant="team-a")
    cache(client, user)
    bad = clear(client, MASTER, **query)
    assert bad.status_code == 400
    assert bad.json()["error"]["param"] == param and param in bad.json()["error"]["message"]
    assert cache(client, user) == "hit"


def test_a_clear_by_age_keeps_younger_entries(client: TestClient) -> None:
    user = create(client, tenant="team-a")
    cache(client, user)
    assert clear(client, MASTER, older_than_s=3600).json() == {"deleted": 0}
    assert clear(client, MASTER, older_than_s=0, key_prefix="v2:team-a:sim:").json() == {"deleted": 1}
    assert cache(client, user) == "miss"


# ---------------------------------------------------------------------------- the CLI, in memory


def test_keel_cache_clear_on_an_in_memory_cache_says_to_use_the_admin_api(tmp_path: Path) -> None:
    path = tmp_path / "keel.yaml"
    path.write_text(yaml.safe_dump({
        "models": [{"name": "sim", "deployments": [{"provider": "simulated"}]}],
        "cache": {"backend": "memory", "exact": {"enabled": True}}, "server": {"host": "0.0.0.0", "port": 8123},
    }))
    done = subprocess.run([sys.executable, "-m", "keel.cli", "cache", "clear", "--config", str(path),
                           "--tenant", "team-a", "--older-than", "24h"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stdout == ""
    message = " ".join(done.stderr.split())
    assert "memory of the running gateway" in message and "nothing of it was cleared" in message
    assert "curl -X DELETE 'http://127.0.0.1:8123/admin/cache?tenant=team-a&older_than_s=86400'" in message
