"""The admin API for budgets: list rules with their counters, add a rule, delete one.

    app.include_router(admin_router(budgets, auth=require_master_key))

A tenant admin key (`request.state.tenant` set by `auth`) lists only its tenant's rules and
counters, and changes none: rules are the operator's (the master key's).

`auth` is a FastAPI dependency (a callable taking the `Request`) that raises on a bad key; the
gateway's error handler turns its `KeelError` into the OpenAI error shape. Errors of this router
are answered here, in that shape, so it works mounted anywhere.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from pydantic import ValidationError

from keel.auth.admin import caller_tenant, tenant_budgets
from keel.budgets.budgets import Budgets
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
