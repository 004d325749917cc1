"""`keel serve --workers N` refuses state kept in one process: each worker would count on its own."""

from __future__ import annotations

from typing import Any

import pytest

from keel.config import ConfigError, parse_config
from keel.server.workers import SharedStateRequired, in_process_state, require_shared_state

SIM = [{"provider": "simulated"}]
REDIS = "redis://127.0.0.1:6379/0"


def problems(**config: Any) -> list[str]:
    return in_process_state(parse_config({"models": [{"name": "m", "deployments": SIM}], **config}))


def test_a_config_with_no_limits_budgets_or_caches_runs_on_several_workers() -> None:
    assert problems() == []
    assert problems(store={"url": "sqlite:///keel.db"}) == []  # the log may stay in SQLite: see workers.py


def test_in_process_limits_budgets_and_caches_are_each_named_with_the_keys_to_set() -> None:
    found = problems(limits={"global": {"requests_per_minute": 10}}, budgets=[{"scope": "global", "limit_usd": 1}],
                     cache={"exact": {"enabled": True}, "semantic": {"enabled": True}})
    assert found == [
        "rate limits are counted in memory (limits.backend: memory): set limits.backend: redis and "
        "limits.redis_url (or state.redis_url)",
        "budgets are counted in memory (no state.redis_url): set state.redis_url",
        "cache.exact is kept in memory (cache.backend: memory): set cache.backend: redis (with cache.redis_url "
        "or state.redis_url) or postgres",
        "cache.semantic is kept in memory: set cache.semantic.backend: postgres (or cache.backend: postgres) "
        "with a PostgreSQL that has pgvector",
    ]


def test_virtual_keys_need_shared_limits_and_budgets_for_what_keys_carry() -> None:
    found = problems(auth={"virtual_keys": True})
    assert len(found) == 2 and found[0].startswith("rate limits") and found[1].startswith("virtual keys' budgets")


def test_state_in_redis_and_postgres_is_accepted() -> None:
    assert problems(
        limits={"backend": "redis", "global": {"requests_per_minute": 10}}, state={"redis_url": REDIS},
        budgets=[{"scope": "global", "limit_usd": 1}], auth={"virtual_keys": True},
        cache={"backend": "redis", "exact": {"enabled": True}},
    ) == []


def test_a_top_level_cache_no_model_uses_is_not_held_against_the_workers() -> None:
    config = parse_config({
        "models": [{"name": "m", "deployments": SIM,
                    "cache": {"backend": "redis", "redis_url": REDIS, "exact": {"enabled": True}}}],
        "cache": {"exact": {"enabled": True}},
    })
    assert in_process_state(config) == []


def test_one_worker_may_keep_everything_in_memory_and_two_are_refused_with_a_config_error() -> None:
    config = parse_config({"models": [{"name": "m", "deployments": SIM}], "budgets": [
        {"scope": "global", "limit_usd": 1}]})
    require_shared_state(config, 1)
    with pytest.raises(SharedStateRequired) as refused:
        require_shared_state(config, 2)
    assert isinstance(refused.value, ConfigError)
    assert str(refused.value).startswith("--workers 2: every worker is a replica")
    assert str(refused.value).endswith("Configure Redis/PostgreSQL as said (docs/scale-out.md), or run one worker.")
