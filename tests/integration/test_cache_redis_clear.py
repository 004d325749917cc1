"""Invalidating the exact cache on the real Redis: `RedisStore.clear` by model, tenant, key prefix and
age (read from each entry), across many SCAN steps; and `keel cache clear` on a Redis-backed config
(skips locally without Redis, fails in CI: KEEL_REQUIRE_SERVICES=1)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import REDIS_URL

from keel.cache.entry import CachedAnswer
from keel.cache.key import cache_key
from keel.cache.redis_store import RedisStore
from keel.types import ChatRequest

NOW = 1_000_000.0
COMPLETION = {"id": "c", "choices": [{"message": {"role": "assistant", "content": "4"}, "finish_reason": "stop"}]}
ENTRIES = {  # name: (model, tenant, stored this many seconds before NOW)
    "m-acme": ("m", "acme", 400), "m-globex": ("m", "globex", 300), "n-acme": ("n", "acme", 200),
    "n-none": ("n", None, 100), "ab-x": ("a:b", "x", 0), "a-bx": ("a", "b:x", 0),
}


def key(name: str) -> str:
    model, tenant, _ = ENTRIES[name]
    request = ChatRequest.model_validate(
        {"model": model, "temperature": 0, "messages": [{"role": "user", "content": "hi"}]}
    )
    return cache_key(request, tenant)


@pytest.fixture
async def store(redis_prefix: str) -> AsyncIterator[RedisStore]:
    store = RedisStore(REDIS_URL, redis_prefix, clock=lambda: NOW)
    for name, (_, _, age) in ENTRIES.items():
        await store.set(key(name), CachedAnswer(COMPLETION, 1, NOW - age).dumps(), 3600)
    yield store
    await store.close()


async def left(store: RedisStore) -> set[str]:
    return {name for name in ENTRIES if await store.get(key(name)) is not None}


@pytest.mark.parametrize(("filters", "removed"), [
    ({"model": "m"}, {"m-acme", "m-globex"}),
    ({"tenant": "acme"}, {"m-acme", "n-acme"}),
    ({"model": "a"}, {"a-bx"}),  # not model "a:b"
    ({"tenant": "b"}, set()),  # not tenant "b:x"
    ({"model": "a:b", "tenant": "x"}, {"ab-x"}),
    ({"key_prefix": "v2:-:"}, {"n-none"}),
    ({"key_prefix": "v2:*"}, set()),  # a prefix is literal, never a pattern
    ({"older_than_s": 250}, {"m-acme", "m-globex"}),
    ({"older_than_s": 250, "model": "n"}, set()),
    ({}, set(ENTRIES)),
])
async def test_redis_clears_what_every_filter_given_selects(
    store: RedisStore, filters: dict[str, Any], removed: set[str],
) -> None:
    assert await store.clear(**filters) == len(removed)
    assert await left(store) == set(ENTRIES) - removed


async def test_an_entry_without_a_readable_time_counts_as_old(store: RedisStore) -> None:
    await store.set(key("ab-x"), b"not json", 3600)
    await store.set(key("a-bx"), CachedAnswer(COMPLETION, 1).dumps(), 3600)  # no stored_at
    assert await store.clear(older_than_s=1000) == 2
    assert await left(store) == set(ENTRIES) - {"ab-x", "a-bx"}


async def test_a_clear_walks_every_scan_step(store: RedisStore) -> None:
    pipe = store.redis.pipeline(transaction=False)
    for i in range(2500):
        pipe.set(f"{store.prefix}v2:bulk:m:{i:064d}", b"x", px=60_000)
    await pipe.execute()
    assert await store.clear(tenant="bulk") == 2500
    assert await left(store) == set(ENTRIES)


async def test_a_clear_redis_cannot_answer_fails_instead_of_reporting_zero() -> None:
    from keel.cache.redis_store import CacheStoreUnavailable

    down = RedisStore("redis://127.0.0.1:1/0", "nowhere", timeout_s=0.2)
    with pytest.raises(CacheStoreUnavailable, match="could not be cleared"):
        await down.clear()
    await down.close()


def keel_cache_clear(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "keel.cli", "cache", "clear", "--config", str(config), *args],
                          capture_output=True, text=True, timeout=60)


async def test_keel_cache_clear_removes_entries_from_redis_and_prints_how_many(
    store: RedisStore, redis_prefix: str, tmp_path: Path,
) -> None:
    path = tmp_path / "keel.yaml"
    path.write_text(yaml.safe_dump({
        "models": [{"name": name, "deployments": [{"provider": "simulated"}]} for name in ("m", "n", "a", "a:b")],
        "cache": {"backend": "redis", "redis_url": REDIS_URL, "exact": {"enabled": True}},
        "state": {"key_prefix": redis_prefix},
    }))
    done = keel_cache_clear(path, "--model", "m", "--tenant", "acme")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "Removed 1 cache entry from Redis."
    assert await left(store) == set(ENTRIES) - {"m-acme"}
    done = keel_cache_clear(path, "--prefix", "v2:-:")
    assert done.stdout.strip() == "Removed 1 cache entry from Redis."
    unknown = keel_cache_clear(path, "--model", "gpt-5")
    assert unknown.returncode == 2 and "gpt-5" in unknown.stderr
    assert await left(store) == set(ENTRIES) - {"m-acme", "n-none"}
    done = keel_cache_clear(path, "--older-than", "1m")  # stored in 1970 (NOW) by the CLI's clock
    assert done.returncode == 0 and done.stdout.strip() == "Removed 4 cache entries from Redis."
    assert await left(store) == set()


async def test_keel_cache_clear_clears_redis_and_names_the_models_whose_cache_it_cannot_reach(
    store: RedisStore, redis_prefix: str, tmp_path: Path,
) -> None:
    path = tmp_path / "keel.yaml"
    in_memory = {"name": "mem", "deployments": [{"provider": "simulated"}],
                 "cache": {"backend": "memory", "exact": {"enabled": True}}}
    path.write_text(yaml.safe_dump({
        "models": [{"name": name, "deployments": [{"provider": "simulated"}]} for name in ("m", "n", "a", "a:b")]
        + [in_memory],
        "cache": {"backend": "redis", "redis_url": REDIS_URL, "exact": {"enabled": True}},
        "state": {"key_prefix": redis_prefix},
    }))
    done = keel_cache_clear(path)
    assert done.returncode == 2 and done.stdout.strip() == "Removed 6 cache entries from Redis."
    assert "the cache of mem is in the memory of the running gateway" in " ".join(done.stderr.split())
    assert await left(store) == set()
