"""A virtual key's tier in the key store, on SQLite and the real PostgreSQL (the request log's
fixtures: a database of its own, skipped locally when PostgreSQL is not running): stored and read
back, refused when it is not a plain short label, and added as null to keys made before 0004."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from sqlalchemy import MetaData, Table, inspect, text
from test_request_log import HEAD, _alembic, pg_database, stores, url  # noqa: F401  (its fixtures, reused)

from keel.auth.keys import TIER_CHARS
from keel.auth.store import KeyStore
from keel.observability.store import VERSION_TABLE, RecordStore

BAD_TIERS = ["", " ", "pro\nfree", "pro\x00", "p" * (TIER_CHARS + 1)]


@pytest.fixture
def store(url: str, stores: Callable[[str], RecordStore]) -> RecordStore:  # noqa: F811
    """An empty request-log database, not migrated: a new SQLite file, or PostgreSQL emptied."""
    return stores(url)


def test_a_key_keeps_its_tier_and_a_key_without_one_has_none(store: RecordStore) -> None:
    store.migrate()
    keys = KeyStore(store)
    pro, _ = keys.create("team-a", tier="pro", label="paid")
    plain, _ = keys.create("team-a")
    assert keys.find(pro.digest) == pro and pro.tier == "pro"
    assert keys.find(plain.digest) == plain and plain.tier is None
    assert [(k.id, k.tier) for k in keys.list("team-a")] == [(pro.id, "pro"), (plain.id, None)]
    assert pro.public()["tier"] == "pro" and plain.public()["tier"] is None
    revoked = keys.revoke(pro.id)
    assert revoked is not None and revoked.tier == "pro"


@pytest.mark.parametrize("tier", BAD_TIERS)
def test_a_tier_that_is_not_a_plain_short_label_is_refused_and_nothing_stored(store: RecordStore, tier: str) -> None:
    store.migrate()
    keys = KeyStore(store)
    with pytest.raises(ValueError, match="tier"):
        keys.create("team-a", tier=tier)
    assert keys.list() == []


def test_keys_made_at_0003_upgrade_to_a_null_tier_and_downgrade_keeps_them(store: RecordStore) -> None:
    _alembic(store, "upgrade", "0003_cost_saved")
    with store.engine.begin() as conn:
        before = Table("virtual_keys", MetaData(), autoload_with=conn)
        assert "tier" not in before.c
        conn.execute(before.insert(), [
            {"id": f"vk_old{i}", "digest": f"{i:064x}", "hint": "abcd", "tenant": "team-a", "admin": False,
             "created_at": float(i), "models": ["chat"], "limits": {}, "budgets": []} for i in range(2)
        ])
    store.migrate()
    with store.engine.connect() as conn:
        assert conn.execute(text(f"SELECT version_num FROM {VERSION_TABLE}")).scalar_one() == HEAD
    keys = KeyStore(store)
    old = keys.list()
    assert [(k.id, k.tier, k.models) for k in old] == [("vk_old0", None, ("chat",)), ("vk_old1", None, ("chat",))]
    new, _ = keys.create("team-a", tier="pro")
    assert keys.find(new.digest) == new
    _alembic(store, "downgrade", "0003_cost_saved")  # and back: the column goes, the keys stay
    with store.engine.connect() as conn:
        assert "tier" not in {c["name"] for c in inspect(conn).get_columns("virtual_keys")}
        assert conn.execute(text("SELECT count(*) FROM virtual_keys")).scalar_one() == 3


