"""The admin API for budgets (list rules with their counters, add a rule, delete one) and for the
caches (invalidate entries of the exact and semantic caches).

    app.include_router(admin_router(budgets, auth=require_master_key))
    app.include_router(cache_router(keel.cache, model_names, auth=require_master_key))

A tenant admin key (`request.state.tenant` set by `auth`) lists only its tenant's rules and
counters, and changes none: rules are the operator's (the master key's).

`auth` is a FastAPI dependency (a callable taking the `Request`) that raises on a bad key; the
gateway's error handler turns its `KeelError` into the OpenAI error shape. Errors of this router
are answered here, in that shape, so it works mounted anywhere.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Collection
from typing import Any

import orjson
from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from pydantic import ValidationError

from keel.auth.admin import caller_tenant, tenant_budgets
from keel.budgets.budgets import Budgets
from keel.cache.build import Caches
from keel.config import BudgetConfig
from keel.errors import AdminForbidden, InvalidJSON, InvalidRequest, KeelError
from keel.server.responses import error_response, json_response
from keel.validation_errors import describe


class BudgetRuleNotFound(InvalidRequest):
    status = 404
    code = "budget_rule_not_found"


class BudgetRuleFromConfig(InvalidRequest):
    status = 409
    code = "budget_rule_in_config"


def admin_router(
    budgets: Budgets, auth: Callable[..., Any] | None = None,
    key_ids: Callable[[Request, str], Awaitable[list[str]]] | None = None,
) -> APIRouter:
    """`key_ids(request, tenant)`: the ids of a tenant's keys, whose `key` budgets it may see."""
    router = APIRouter(prefix="/admin", dependencies=[Depends(auth)] if auth is not None else [])

    @router.get("/budgets")
    async def list_budgets(request: Request) -> Response:
        status, tenant = await budgets.status(), caller_tenant(request)
        if tenant is not None:
            status = tenant_budgets(status, tenant, await key_ids(request, tenant) if key_ids else ())
        return json_response({"object": "list", "data": status})

    @router.post("/budgets")
    async def add_budget(request: Request) -> Response:
        if caller_tenant(request) is not None:
            return error_response(AdminForbidden("Budget rules are set with the master key, not a tenant's key."))
        try:
            data = orjson.loads(await request.body())
        except orjson.JSONDecodeError as exc:
            return error_response(
                InvalidJSON(f"The body is not valid JSON ({exc}); send one budget rule as a JSON object.")
            )
        try:
            rule = BudgetConfig.model_validate(data)
            entry = await budgets.add_rule(rule)
        except ValidationError as exc:
            return error_response(InvalidRequest(f"The budget rule is invalid: {describe(exc, BudgetConfig)}"))
        except KeelError as exc:
            return error_response(exc)
        created = {"index": entry.index, "source": entry.source, "id": entry.id, "rule": rule.model_dump()}
        return json_response(created, 201)

    @router.delete("/budgets/{index}")
    async def delete_budget(index: int, request: Request) -> Response:
        if caller_tenant(request) is not None:
            return error_response(AdminForbidden("Budget rules are set with the master key, not a tenant's key."))
        try:
            entry = await budgets.remove_rule(index)
        except LookupError as exc:
            return error_response(BudgetRuleNotFound(str(exc)))
        except PermissionError as exc:
            return error_response(BudgetRuleFromConfig(str(exc)))
        except KeelError as exc:
            return error_response(exc)
        return json_response({"deleted": True, "index": index, "rule": entry.rule.model_dump()})

    return router


CLEAR_FILTERS = ("model", "tenant", "older_than_s", "key_prefix")


def cache_router(
    cache: Caches, models: Collection[str], auth: Callable[..., Any] | None = None,
) -> APIRouter:
    """`DELETE /admin/cache?model=&tenant=&older_than_s=&key_prefix=`: remove the caches' entries
    that match every filter given (none: all). A tenant admin key clears its own tenant's only."""
    router = APIRouter(prefix="/admin", dependencies=[Depends(auth)] if auth is not None else [])

    @router.delete("/cache")
    async def clear_cache(request: Request) -> Response:
        try:
            filters = _clear_filters(request, models)
            deleted = await cache.clear(**filters)
        except KeelError as exc:
            return error_response(exc)
        return json_response({"deleted": deleted})

    return router


def _clear_filters(request: Request, models: Collection[str]) -> dict[str, Any]:
    """The filters of a cache clear from the query, checked; a tenant admin's tenant always among them."""
    query = request.query_params
    for name in query:
        if name not in CLEAR_FILTERS:
            raise InvalidRequest(
                f"Unknown parameter '{name}': a cache clear takes {', '.join(CLEAR_FILTERS)}.", param=name
            )
    for name in CLEAR_FILTERS:
        if len(query.getlist(name)) > 1 or query.get(name) == "":
            raise InvalidRequest(f"Give '{name}' once, with a value (or leave it out).", param=name)
    model, tenant, age, key_prefix = (query.get(name) for name in CLEAR_FILTERS)
    if model is not None and model not in models:
        listed = ", ".join(sorted(models)) or "none"
        raise InvalidRequest(f"The model '{model}' does not exist. Models served here: {listed}.", param="model")
    older_than_s: float | None = None
    if age is not None:
        try:
            older_than_s = float(age)
        except ValueError:
            older_than_s = math.nan
        if not math.isfinite(older_than_s) or older_than_s < 0:
            raise InvalidRequest(
                f"older_than_s must be a number of seconds, 0 or more (86400 for a day), got '{age}'.",
                param="older_than_s",
            )
    own = caller_tenant(request)
    if own is not None:
        if tenant is not None and tenant != own:
            raise AdminForbidden(f"A tenant admin key clears the cache of its own tenant ('{own}') only.")
        tenant = own
    return {"model": model, "tenant": tenant, "older_than_s": older_than_s, "key_prefix": key_prefix}
