"""The admin API of the review queue (docs/review.md):

    GET  /admin/review                 items, pending first (?status=&source=&tenant=&limit=&offset=)
    GET  /admin/review/{id}            one item with its labels
    POST /admin/review/{id}/labels     {"label": "pass"|"fail", "score": 4, "comment": "..."}
    POST /admin/review                 {"request_id": "req_..."} (a logged call), or an item by hand

    app.include_router(review_router(keel.review.queue, auth=admin_key))

`auth` admits the master key (every tenant) and tenant admin keys (their tenant only, left in
`request.state.tenant`): another tenant's item is "not found". A label's reviewer is the tenant admin
key's owner (its id when it has none); with the master key, the body's `reviewer` says who.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, Literal, TypeVar

import orjson
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from keel.auth.admin import caller_key, caller_tenant
from keel.errors import AdminForbidden, InvalidJSON, InvalidRequest, KeelError
from keel.evals import review
from keel.evals.review import ReviewQueue, Source, new_item
from keel.observability.store import StoreError
from keel.validation_errors import describe

T = TypeVar("T")
B = TypeVar("B", bound=BaseModel)


class ReviewItemNotFound(InvalidRequest):
    status = 404
    code = "review_item_not_found"


class InvalidLabel(InvalidRequest):
    code = "invalid_label"


class RequestNotFound(InvalidRequest):
    status = 404
    code = "request_not_found"


class ContentNotLogged(InvalidRequest):
    status = 409
    code = "content_not_logged"


class ReviewUnavailable(KeelError):
    """The request-log database holding the queue cannot be used right now."""

    status = 503
    type = "api_error"
    code = "review_unavailable"


class NewLabel(BaseModel):
    """The body of POST /admin/review/{id}/labels."""

    model_config = ConfigDict(extra="forbid", strict=True)
    label: Literal["pass", "fail"] | None = None
    score: float | None = Field(default=None, allow_inf_nan=False)
    comment: str | None = Field(default=None, max_length=10_000)
    reviewer: str | None = Field(default=None, min_length=1, max_length=256)  # with the master key

    @model_validator(mode="after")
    def _says_something(self) -> NewLabel:
        if self.label is None and self.score is None:
            raise ValueError("a label needs 'label' ('pass' or 'fail'), a 'score', or both")
        return self


class NewItem(BaseModel):
    """The body of POST /admin/review: a logged call by its id, or an item's content by hand."""

    model_config = ConfigDict(extra="forbid", strict=True)
    request_id: str | None = Field(default=None, min_length=1, max_length=256)
    source: Source = "production"
    ref: str | None = Field(default=None, max_length=512)
    tenant: str | None = Field(default=None, min_length=1, max_length=128)  # the master key's choice
    input: Any = None
    output: Any = None
    reference: Any = None
    judge: dict[str, dict[str, Any]] | None = None

    @model_validator(mode="after")
    def _one_way(self) -> NewItem:
        if self.request_id is not None and (self.input is not None or self.output is not None or self.ref):
            raise ValueError("give 'request_id' (its input and output come from the request log) or 'input' "
                             "and 'output', not both")
        if self.request_id is None and self.input is None:
            raise ValueError("give 'request_id' (a call of the request log) or the item's 'input'")
        return self


def review_router(queue: ReviewQueue, auth: Callable[..., Any]) -> APIRouter:
    """`auth`: the admin check; it leaves the caller's key in `request.state.admin` (None: the master
    key), whether sent as a bearer key or held in the dashboard's session (keel.dashboard.auth)."""
    router = APIRouter(prefix="/admin", dependencies=[Depends(auth)])

    @router.get("/review")
    async def list_items(request: Request) -> dict[str, Any]:
        query = _query(request)
        tenant = _tenant(request, query.pop("tenant"))
        page = await _queue(lambda: queue.list_items(tenant=tenant, **query))
        return {"object": "list", "data": [item.as_dict() for item in page.items], "total": page.total,
                "offset": page.offset, "has_more": page.has_more}

    @router.get("/review/{item_id}")
    async def get_item(item_id: str, request: Request) -> dict[str, Any]:
        return (await _queue(lambda: queue.get(item_id, caller_tenant(request)))).as_dict()

    @router.post("/review/{item_id}/labels", status_code=201)
    async def label_item(item_id: str, request: Request) -> dict[str, Any]:
        body = _body(await request.body(), NewLabel, InvalidLabel, "the label")
        reviewer = _reviewer(request, body.reviewer)
        item = await _queue(lambda: queue.label(item_id, reviewer, label=body.label, score=body.score,
                                                comment=body.comment, tenant=caller_tenant(request)))
        return item.as_dict()

    @router.post("/review", status_code=201)
    async def add_item(request: Request) -> JSONResponse:
        body = _body(await request.body(), NewItem, InvalidRequest, "the item")
        own = caller_tenant(request)
        if body.request_id is not None:
            request_id = body.request_id
            item, created = await _queue(lambda: queue.add_call(request_id, own, body.reference))
        else:
            made = new_item(body.source, ref=body.ref, tenant=_tenant(request, body.tenant), input=body.input,
                            output=body.output, reference=body.reference, judge=body.judge)
            item, created = await _queue(lambda: queue.add(made))
        return JSONResponse({**item.as_dict(), "created": created}, 201 if created else 200)

    return router


LIST_PARAMETERS = ("status", "source", "tenant", "limit", "offset")


def _query(request: Request) -> dict[str, Any]:
    """The list's filters and page from the query string, checked (the queue checks their values)."""
    query = request.query_params
    for name in query:
        if name not in LIST_PARAMETERS:
            raise InvalidRequest(f"Unknown parameter '{name}': the review list takes {', '.join(LIST_PARAMETERS)}.",
                                 param=name)
    found: dict[str, Any] = {name: query.get(name) or None for name in ("status", "source", "tenant")}
    for name, default in (("limit", 50), ("offset", 0)):
        value = query.get(name)
        try:
            found[name] = default if value is None else int(value)
        except ValueError:
            raise InvalidRequest(f"'{name}' is a whole number, not '{value}'.", param=name) from None
    return found


def _tenant(request: Request, asked: str | None) -> str | None:
    """The tenant a call works in: a tenant admin's own (asking for another is refused); the master
    key's choice (None: every tenant)."""
    own = caller_tenant(request)
    if own is None:
        return asked
    if asked is not None and asked != own:
        raise AdminForbidden(f"A tenant admin key sees the review items of its own tenant ('{own}') only.")
    return own


def _reviewer(request: Request, named: str | None) -> str:
    """Who labels: a tenant admin key's owner (or id); with the master key, the body's `reviewer`."""
    key = caller_key(request)
    if key is None:
        if named is None or not named.strip():
            raise InvalidLabel("Say who is labelling: with the master key, send 'reviewer' (a name or email).",
                               param="reviewer")
        return named
    own = key.owner or key.id
    if named is not None and named != own:
        raise AdminForbidden(f"A tenant admin key labels as itself ('{own}'); leave 'reviewer' out.")
    return own


def _body(raw: bytes, model: type[B], error: type[InvalidRequest], what: str) -> B:
    try:
        data = orjson.loads(raw or b"{}")
    except orjson.JSONDecodeError as exc:
        raise InvalidJSON(f"The body is not valid JSON ({exc}); send {what} as a JSON object.") from None
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise error(f"The body is not {what}: {describe(exc, model)}") from None


_ERRORS: dict[type[review.ReviewError], type[InvalidRequest]] = {
    review.ItemNotFound: ReviewItemNotFound, review.BadLabel: InvalidLabel, review.CallNotFound: RequestNotFound,
    review.ContentNotLogged: ContentNotLogged,
}


async def _queue(work: Callable[[], T]) -> T:
    """The queue's blocking work off the event loop; its refusals as the API's errors."""
    try:
        return await asyncio.to_thread(work)
    except review.ReviewError as exc:
        raise _ERRORS.get(type(exc), InvalidRequest)(str(exc)) from None
    except StoreError as exc:
        raise ReviewUnavailable(f"The review queue cannot be used right now ({exc}). Try again in a moment.") from None

