"""The exact cache on the real Redis: hits, misses, bypass and no-store, TTL, and an entry that no
longer parses dropped (skips locally without Redis, fails in CI: KEEL_REQUIRE_SERVICES=1)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from conftest import REDIS_URL

from keel.cache.key import cache_key
from keel.cache.redis_store import RedisStore
from keel.config import parse_config
from keel.engine import Keel
from keel.pipeline import Completion, Context
from keel.types import ChatRequest

REQUEST = ChatRequest.model_validate({"model": "m", "temperature": 0, "messages": [{"role": "user", "content": "hi"}]})


@pytest.fixture
async def keel(tmp_path: Path, redis_prefix: str) -> AsyncIterator[Keel]:
    keel = Keel(parse_config({
        "models": [{"name": "m", "deployments": [{"provider": "simulated"}]}],
        "cache": {"backend": "redis", "redis_url": REDIS_URL, "exact": {"enabled": True, "ttl_s": 60}},
        "state": {"key_prefix": redis_prefix},
        "store": {"url": f"sqlite:///{tmp_path}/keel.db", "spool_path": str(tmp_path / "spool.jsonl")},
    }))
    yield keel
    await keel.close()


async def status(keel: Keel, control: str | None = None, request: ChatRequest = REQUEST) -> str:
    ctx = Context(cache_control=control)
    reply = await keel.handle(request, ctx)
    assert isinstance(reply, Completion) and reply.body["choices"][0]["message"]["content"] == "echo: hi"
    return ctx.cache_status


async def test_hits_misses_bypass_and_no_store_on_redis(keel: Keel) -> None:
    assert await status(keel, "no-store") == "miss"
    assert await status(keel) == "miss"
    assert await status(keel) == "hit_exact"
    assert await status(keel, "no-cache") == "bypass"
    warm = REQUEST.model_copy(update={"temperature": 1.0})
    assert await status(keel, request=warm) == "bypass"


async def test_entries_expire_in_redis_and_a_broken_one_is_dropped(keel: Keel, redis_prefix: str) -> None:
    assert keel.cache.exact is not None
    store = keel.cache.exact.settings["m"].store
    assert isinstance(store, RedisStore)
    key = cache_key(REQUEST, None)
    await status(keel)
    ttl_ms: Any = await store.redis.pttl(store.prefix + key)
    assert 0 < ttl_ms <= 60_000 and store.prefix.startswith(redis_prefix + ":")
    await store.set(key, b"not json", 60)
    assert await status(keel) == "miss"  # dropped, answered afresh, stored again
    assert await status(keel) == "hit_exact"
