"""Virtual keys in the request-log database (table `virtual_keys`, revision 0002; `tier` 0004), so every
replica sharing that database sees the same keys. Blocking (SQLAlchemy Core): the call path
reaches it through `lookup.KeyLookup`, off the event loop and rarely."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy import JSON, Boolean, Column, Float, Index, String, Table, insert, select, update

from keel.auth.keys import KeyBudget, KeyLimits, VirtualKey, check_tier, digest, new_key_id, new_secret
from keel.observability.store import RecordStore, metadata

# On the request log's metadata: one schema, which the migrations are checked against.
virtual_keys = Table(
    "virtual_keys",
    metadata,
    Column("id", String, primary_key=True),
    Column("digest", String, nullable=False, unique=True),
    Column("hint", String, nullable=False),
    Column("tenant", String, nullable=False),
    Column("owner", String),
    Column("label", String),
    Column("models", JSON(none_as_null=True)),
    Column("limits", JSON(none_as_null=True)),
    Column("budgets", JSON(none_as_null=True)),
    Column("admin", Boolean, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("expires_at", Float),
    Column("revoked_at", Float),
    Column("tier", String),  # revision 0004; null: the key has no tier
    Index("ix_virtual_keys_tenant", "tenant"),
)


class KeyRevoked(ValueError):
    """A revoked key cannot be changed."""


# What a key's change may touch (`KeyStore.update`): never its tenant, secret, admin right or history.
LIMITS = frozenset({"requests_per_minute", "tokens_per_minute", "max_concurrency"})  # KeyLimits' fields
CHANGEABLE = frozenset({"owner", "label", "tier", "models", "budgets", "expires_at"}) | LIMITS


class KeyStore:
    """Create, find, list and revoke keys. `store` is the request log's (its schema, migrated)."""

    def __init__(self, store: RecordStore, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.clock = clock

    def create(
        self, tenant: str, *, owner: str | None = None, label: str | None = None,
        models: Sequence[str] | None = None, limits: KeyLimits | None = None,
        budgets: Sequence[KeyBudget] = (), admin: bool = False, expires_at: float | None = None,
        tier: str | None = None,
    ) -> tuple[VirtualKey, str]:
        """A new key and its secret: the only time the secret exists outside the client."""
        if not tenant.strip():
            raise ValueError("a key needs a tenant: the team or customer it belongs to")
        check_tier(tier)
        secret = new_secret()
        key = VirtualKey(
            id=new_key_id(), tenant=tenant, digest=digest(secret), owner=owner, label=label,
            models=tuple(models) if models else None, limits=limits or KeyLimits(), budgets=tuple(budgets),
            admin=admin, created_at=self.clock(), expires_at=expires_at, hint=secret[-4:], tier=tier,
        )
        with self.store.transaction("store a key in") as conn:
            conn.execute(insert(virtual_keys).values(_row(key)))
        return key, secret

    def find(self, key_digest: str) -> VirtualKey | None:
        """The key with this digest, usable or not; None when there is none."""
        with self.store.connection() as conn:
            row = conn.execute(select(virtual_keys).where(virtual_keys.c.digest == key_digest)).mappings().first()
        return None if row is None else _key(dict(row))

    def list(self, tenant: str | None = None) -> list[VirtualKey]:
        """Every key (of one tenant, when given), oldest first."""
        query = select(virtual_keys).order_by(virtual_keys.c.created_at, virtual_keys.c.id)
        if tenant is not None:
            query = query.where(virtual_keys.c.tenant == tenant)
        with self.store.connection() as conn:
            return [_key(dict(row)) for row in conn.execute(query).mappings()]

    def revoke(self, key_id: str, tenant: str | None = None) -> VirtualKey | None:
        """Revoke a key (of `tenant` only, when given); None when there is no such key. Revoking
        twice keeps the first time."""
        where = virtual_keys.c.id == key_id
        if tenant is not None:
            where &= virtual_keys.c.tenant == tenant
        with self.store.transaction("revoke a key in") as conn:
            conn.execute(update(virtual_keys).where(where, virtual_keys.c.revoked_at.is_(None))
                         .values(revoked_at=self.clock()))
            row = conn.execute(select(virtual_keys).where(where)).mappings().first()
        return None if row is None else _key(dict(row))

    def update(self, key_id: str, changes: dict[str, Any], tenant: str | None = None) -> VirtualKey | None:
        """Change some of a key's fields (of `tenant`'s key only, when given). `changes` maps names in
        CHANGEABLE to new values (None clears; `models` a tuple, `budgets` KeyBudgets). None when there
        is no such key; KeyRevoked when it is revoked. Read and written in one transaction with the row
        locked, so two changes of one key at once both land."""
        unknown = set(changes) - CHANGEABLE
        if unknown:
            raise ValueError(f"a key's {', '.join(sorted(unknown))} cannot be changed")
        check_tier(changes.get("tier"))
        where = virtual_keys.c.id == key_id
        if tenant is not None:
            where &= virtual_keys.c.tenant == tenant
        with self.store.transaction("change a key in") as conn:
            row = conn.execute(select(virtual_keys).where(where).with_for_update()).mappings().first()
            if row is None:
                return None
            key = _key(dict(row))
            if key.revoked_at is not None:
                raise KeyRevoked(f"key {key_id} is revoked; create a new key instead")
            fields = {k: v for k, v in changes.items() if k not in LIMITS}
            limits = {k: v for k, v in changes.items() if k in LIMITS}
            if limits:
                fields["limits"] = dataclasses.replace(key.limits, **limits)
            changed = dataclasses.replace(key, **fields)
            conn.execute(update(virtual_keys).where(virtual_keys.c.id == key_id).values(_row(changed)))
        return changed


def _row(key: VirtualKey) -> dict[str, Any]:
    return {
        "id": key.id, "digest": key.digest, "hint": key.hint, "tenant": key.tenant, "owner": key.owner,
        "label": key.label, "models": list(key.models) if key.models is not None else None,
        "limits": key.limits.as_dict(), "budgets": [b.as_dict() for b in key.budgets],
        "admin": key.admin, "created_at": key.created_at, "expires_at": key.expires_at, "revoked_at": key.revoked_at,
        "tier": key.tier,
    }


def _key(row: dict[str, Any]) -> VirtualKey:
    models = row["models"]
    return VirtualKey(
        id=row["id"], tenant=row["tenant"], digest=row["digest"], owner=row["owner"], label=row["label"],
        models=tuple(models) if models is not None else None, limits=KeyLimits(**(row["limits"] or {})),
        budgets=tuple(KeyBudget(**b) for b in row["budgets"] or ()), admin=bool(row["admin"]),
        created_at=row["created_at"], expires_at=row["expires_at"], revoked_at=row["revoked_at"], hint=row["hint"],
        tier=row["tier"],
    )
