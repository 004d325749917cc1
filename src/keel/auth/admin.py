"""The admin API of keys and of the request log, scoped by tenant.

    app.include_router(keys_router(keel, auth=admin_key))

`auth` (a FastAPI dependency) admits the master key, which sees every tenant, and tenant admin
keys (`admin: true`), which see and change only their own tenant: it leaves the caller's key in
`request.state.admin` and its tenant in `request.state.tenant` (None for the master key; read them
with `caller_key` and `caller_tenant`). The secret of a new key is in the answer to
its creation, and nowhere else, ever.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from typing import Any, Literal, TypeVar

import orjson
from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from keel.auth.keys import TIER_CHARS, KeyBudget, KeyLimits, VirtualKey, check_tier
from keel.auth.lookup import KeyLookup
from keel.auth.store import KeyRevoked, KeyStore
from keel.errors import AdminForbidden, InvalidJSON, InvalidRequest, KeysUnavailable
from keel.observability.store import StoreError
from keel.validation_errors import describe

T = TypeVar("T")


class KeyNotFound(InvalidRequest):
    status = 404
    code = "key_not_found"


class KeyNotChangeable(InvalidRequest):
    status = 409
    code = "key_revoked"


class KeyBudgetSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    limit_usd: float = Field(gt=0, allow_inf_nan=False)
    window: Literal["day", "month", "total"] = "month"


class KeyFields(BaseModel):
    """What a key holds that is set when it is made and may be changed after: their constraints in one
    place for POST and PATCH /admin/keys (and `keel keys create` and `update`)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    owner: str | None = Field(default=None, max_length=256)
    label: str | None = Field(default=None, max_length=256)
    tier: str | None = Field(default=None, min_length=1, max_length=TIER_CHARS)  # routing rules' `key_tiers`
    models: list[str] | None = Field(default=None, min_length=1)  # none: every model
    requests_per_minute: int | None = Field(default=None, ge=1)
    tokens_per_minute: int | None = Field(default=None, ge=1)
    max_concurrency: int | None = Field(default=None, ge=1)  # calls in flight at once, per process
    expires_in_s: float | None = Field(default=None, gt=0, allow_inf_nan=False)  # from now

    _plain_tier = field_validator("tier")(check_tier)


class NewKey(KeyFields):
    """The body of POST /admin/keys (and the options of `keel keys create`)."""

    tenant: str | None = Field(default=None, min_length=1, max_length=128)  # a tenant admin's own by default
    budgets: list[KeyBudgetSpec] = Field(default_factory=list)
    admin: bool = False


class KeyChange(KeyFields):
    """The body of PATCH /admin/keys/{id} (and the options of `keel keys update`): only the fields
    given change; null clears one (a key with no tier, every model, the default limits, no expiry).
    A key's tenant, secret and admin right stay as made: for another, create a key and revoke this one."""

    budgets: list[KeyBudgetSpec] | None = None

    def changes(self, now: float) -> dict[str, Any]:
        """The fields given, as `KeyStore.update` takes them."""
        changes: dict[str, Any] = {}
        for name in self.model_fields_set:
            value = getattr(self, name)
            if name == "models":
                changes[name] = tuple(value) if value else None
            elif name == "budgets":
                changes[name] = tuple(KeyBudget(b.limit_usd, b.window) for b in value or ())
            elif name == "expires_in_s":
                changes["expires_at"] = now + value if value else None
            else:
                changes[name] = value
        return changes


def caller_tenant(request: Request) -> str | None:
    """The tenant the admin caller may see; None: every tenant (the master key)."""
    tenant: str | None = getattr(request.state, "tenant", None)
    return tenant


def caller_key(request: Request) -> VirtualKey | None:
    """The admin caller's key, by bearer key or dashboard session alike; None: the master key."""
    key: VirtualKey | None = getattr(request.state, "admin", None)
    return key


def keys_router(keys: KeyStore, lookup: KeyLookup | None, auth: Callable[..., Any]) -> APIRouter:
    router = APIRouter(prefix="/admin", dependencies=[Depends(auth)])

    # Plain dicts, serialised by FastAPI: these routes are not hot, and this module stays free of
    # keel.server (which imports it).
    @router.post("/keys", status_code=201)
    async def create_key(request: Request) -> dict[str, Any]:
        spec = _parsed(NewKey, await request.body(), "the new key's fields")
        own = caller_tenant(request)
        tenant = spec.tenant or own
        if tenant is None:
            raise InvalidRequest("Say which tenant the key belongs to: {\"tenant\": \"team-a\", ...}.", param="tenant")
        if own is not None and tenant != own:
            raise AdminForbidden(f"A tenant admin key creates keys of its own tenant ('{own}') only.")
        key, secret = await _store(lambda: create(keys, spec, tenant))
        return {**key.public(), "key": secret}

    @router.get("/keys")
    async def list_keys(request: Request) -> dict[str, Any]:
        found = await _store(lambda: keys.list(caller_tenant(request)))
        return {"object": "list", "data": [key.public() for key in found]}

    @router.delete("/keys/{key_id}")
    async def revoke_key(key_id: str, request: Request) -> dict[str, Any]:
        key = await _store(lambda: keys.revoke(key_id, caller_tenant(request)))
        if key is None:  # another tenant's key is "not found" too: its existence is not told
            raise KeyNotFound(f"There is no key '{key_id}'; GET /admin/keys lists the keys you can see.")
        if lookup is not None:
            lookup.forget(key.digest)
        return {**key.public(), "revoked": True}

    @router.patch("/keys/{key_id}")
    async def change_key(key_id: str, request: Request) -> dict[str, Any]:
        change = _parsed(KeyChange, await request.body(), "the fields to change")
        if not change.model_fields_set:
            raise InvalidRequest("Say what to change: {\"tier\": \"pro\"}, {\"label\": null}, ...")
        try:
            key = await _store(lambda: keys.update(key_id, change.changes(time.time()), caller_tenant(request)))
        except KeyRevoked as exc:
            raise KeyNotChangeable(f"{str(exc).capitalize()}.") from None
        if key is None:  # another tenant's key is "not found" too
            raise KeyNotFound(f"There is no key '{key_id}'; GET /admin/keys lists the keys you can see.")
        if lookup is not None:
            lookup.forget(key.digest)
        return key.public()

    @router.get("/requests")
    async def list_requests(request: Request, since_s: float = 3600, limit: int = 100) -> dict[str, Any]:
        """The newest records of the request log, the caller's tenant's only."""
        since = time.time() - max(0.0, since_s)
        rows = await _store(lambda: keys.store.records(
            since, limit=max(1, min(limit, 1000)), tenant=caller_tenant(request), newest_first=True))
        return {"object": "list", "data": rows}

    return router


def create(keys: KeyStore, spec: NewKey, tenant: str) -> tuple[VirtualKey, str]:
    """Store a key as `spec` says; the key and its secret."""
    expires_at = time.time() + spec.expires_in_s if spec.expires_in_s else None
    return keys.create(
        tenant, owner=spec.owner, label=spec.label, models=spec.models,
        limits=KeyLimits(spec.requests_per_minute, spec.tokens_per_minute, spec.max_concurrency),
        budgets=[KeyBudget(b.limit_usd, b.window) for b in spec.budgets], admin=spec.admin, expires_at=expires_at,
        tier=spec.tier,
    )


def tenant_budgets(status: list[dict[str, Any]], tenant: str | None, key_ids: Iterable[str]) -> list[dict[str, Any]]:
    """The budget rules and counters a tenant may see: its own tenant's and its keys'."""
    if tenant is None:
        return status
    mine = {"tenant": {tenant}, "key": set(key_ids)}
    shown = []
    for entry in status:
        values = mine.get(entry["rule"]["scope"])
        match = entry["rule"]["match"]
        if values is None or (match is not None and match not in values):
            continue
        counters = [c for c in entry["counters"] if c["value"] in values]
        shown.append({**entry, "counters": counters})
    return shown


M = TypeVar("M", bound=BaseModel)


def _parsed(model: type[M], body: bytes, what: str) -> M:
    """`body` as a `model`; errors in OpenAI's shape, `what` saying what the body holds."""
    try:
        data = orjson.loads(body or b"{}")
    except orjson.JSONDecodeError as exc:
        raise InvalidJSON(f"The body is not valid JSON ({exc}); send {what} as a JSON object.") from None
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise InvalidRequest(f"The body is invalid ({what}): {describe(exc, model)}") from None


async def _store(work: Callable[[], T]) -> T:
    try:
        return await asyncio.to_thread(work)
    except StoreError as exc:
        raise KeysUnavailable(f"The key store cannot be used right now ({exc}). Try again in a moment.") from None
