"""Changing a key in place (`KeyStore.update`) on SQLite and the real PostgreSQL (the request log's
fixtures; PostgreSQL skipped locally when it is not running): only the fields given change, None
clears, a revoked or another tenant's key is not changed, and on PostgreSQL two changes of one key
at once both land (the row is locked between its read and its write)."""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest
from test_request_log import pg_database, stores, url  # noqa: F401  (its fixtures, reused)

from keel.auth.keys import KeyBudget, KeyLimits
from keel.auth.store import KeyRevoked, KeyStore
from keel.observability.store import RecordStore


@pytest.fixture
def keys(url: str, stores: Callable[[str], RecordStore]) -> KeyStore:  # noqa: F811
    store = stores(url)
    store.migrate()
    return KeyStore(store)


def test_only_the_fields_given_change_and_none_clears(keys: KeyStore) -> None:
    made, secret = keys.create("team-a", tier="free", label="app", models=["sim"],
                               limits=KeyLimits(requests_per_minute=10, tokens_per_minute=1000))
    changed = keys.update(made.id, {"tier": "pro", "requests_per_minute": 60, "models": None})
    assert changed is not None
    assert (changed.tier, changed.label, changed.models) == ("pro", "app", None)
    assert changed.limits == KeyLimits(requests_per_minute=60, tokens_per_minute=1000)
    assert (changed.digest, changed.tenant, changed.created_at) == (made.digest, made.tenant, made.created_at)
    assert keys.find(made.digest) == changed  # stored, found by the same secret's digest
    cleared = keys.update(made.id, {"tier": None, "label": None, "budgets": (KeyBudget(5.0, "day"),)})
    assert cleared is not None
    assert (cleared.tier, cleared.label, cleared.budgets) == (None, None, (KeyBudget(5.0, "day"),))
    assert secret.endswith(cleared.hint)


def test_a_missing_revoked_or_other_tenants_key_is_not_changed(keys: KeyStore) -> None:
    mine, _ = keys.create("team-a", tier="free")
    assert keys.update("vk_0000000000000000", {"tier": "pro"}) is None
    assert keys.update(mine.id, {"tier": "pro"}, tenant="team-b") is None
    keys.revoke(mine.id)
    with pytest.raises(KeyRevoked, match="revoked"):
        keys.update(mine.id, {"tier": "pro"})
    assert [k.tier for k in keys.list()] == ["free"]


@pytest.mark.parametrize("changes", [{"tenant": "team-b"}, {"admin": True}, {"digest": "0" * 64}, {"tier": "a b\n"}])
def test_what_a_change_may_not_touch_is_refused_and_nothing_stored(keys: KeyStore, changes: dict[str, object]) -> None:
    made, _ = keys.create("team-a")
    with pytest.raises(ValueError):
        keys.update(made.id, changes)
    assert keys.list() == [made]


@pytest.fixture
def pg_keys(pg_database: str, stores: Callable[[str], RecordStore]) -> KeyStore:  # noqa: F811
    """PostgreSQL only: SQLite has one writer at a time, the row lock is PostgreSQL's to test."""
    import psycopg

    with psycopg.connect(pg_database, autocommit=True) as conn:
        conn.execute("DROP SCHEMA public CASCADE")
        conn.execute("CREATE SCHEMA public")
    store = stores(pg_database)
    store.migrate()
    return KeyStore(store)


def test_two_changes_of_one_key_at_once_both_land_on_postgresql(pg_keys: KeyStore) -> None:
    keys = pg_keys
    made, _ = keys.create("team-a")
    for round_ in range(10):
        start = threading.Barrier(2)
        changes = [{"requests_per_minute": 100 + round_}, {"tokens_per_minute": 5000 + round_}]
        threads = [threading.Thread(target=change_at, args=(keys, made.id, start, c)) for c in changes]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        found = keys.find(made.digest)
        assert found is not None
        assert found.limits == KeyLimits(requests_per_minute=100 + round_, tokens_per_minute=5000 + round_)


def change_at(keys: KeyStore, key_id: str, start: threading.Barrier, fields: dict[str, object]) -> None:
    start.wait()
    keys.update(key_id, fields)
