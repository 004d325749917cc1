"""The admin API for budgets: list rules with their counters, add a rule, delete one.

    app.include_router(admin_router(budgets, auth=require_master_key))

`auth` is a FastAPI dependency (a callable taking the `Request`) that raises on a bad key; the
gateway's error handler turns its `KeelError` into the OpenAI error shape. Errors of this router
are answered here, in that shape, so it works mounted anywhere.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson
from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from pydantic import ValidationError

from keel.budgets.budgets import Budgets
from keel.config import BudgetConfig
from keel.errors import InvalidJSON, InvalidRequest, KeelError
from keel.server.responses import error_response, json_response
from keel.validation_errors import describe


class BudgetRuleNotFound(InvalidRequest):
    status = 404
    code = "budget_rule_not_found"


class BudgetRuleFromConfig(InvalidRequest):
    status = 409
    code = "budget_rule_in_config"


def admin_router(budgets: Budgets, auth: Callable[..., Any] | None = None) -> APIRouter:
    router = APIRouter(prefix="/admin", dependencies=[Depends(auth)] if auth is not None else [])

    @router.get("/budgets")
    async def list_budgets() -> Response:
        return json_response({"object": "list", "data": await budgets.status()})

    @router.post("/budgets")
    async def add_budget(request: Request) -> Response:
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
    async def delete_budget(index: int) -> Response:
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
