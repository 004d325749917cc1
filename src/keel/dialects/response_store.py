"""Stored responses of the Responses API in the request-log database (table `stored_responses`,
revision 0005), scoped by tenant: what `previous_response_id` continues and `GET /v1/responses/{id}`
returns (docs/responses-api.md)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any, TypeVar

from sqlalchemy import JSON, Column, Delete, Float, Index, Select, String, Table, delete, insert, select

from keel.errors import KeelError
from keel.observability.store import RecordStore, StoreError, metadata, retained

log = logging.getLogger("keel.responses")

# On the request log's metadata: one schema, which the migrations are checked against.
stored_responses = Table(
    "stored_responses",
    metadata,
    Column("id", String, primary_key=True),
    Column("tenant", String),
    Column("created_at", Float, nullable=False),
    Column("request_id", String, nullable=False),
    Column("model", String, nullable=False),
    Column("previous_response_id", String),
    Column("messages", JSON(none_as_null=True), nullable=False),
    Column("response", JSON(none_as_null=True), nullable=False),
    Index("ix_stored_responses_created_at", "created_at"),
)
retained(stored_responses.c.created_at)  # stored answers go with the records, at `retention_days`


class ResponseNotFound(KeelError):
    """No stored response by that id for this caller: never stored (`store: false`), deleted, or another
    tenant's (which is not said: tenants never learn of each other's)."""

    status = 404
    type = "invalid_request_error"
    code = "not_found"

    def __init__(self, response_id: str, param: str | None = None) -> None:
        super().__init__(
            f"No response with id '{response_id}' is stored for this key. Responses made with 'store': false, "
            "deleted ones and other tenants' cannot be read or continued; send the earlier turns in 'input' instead.",
            param=param,
        )


ANY_TENANT = object()  # the master key's scope: every tenant's responses
Scope = str | None | object  # a tenant (None: responses made without a virtual key), or ANY_TENANT


class ResponseStore:
    """Save, find and delete stored responses in the request-log database, off the event loop.

    A response is saved after its answer has been delivered, so a client that continues it at once
    could ask before the row exists: `expect` marks an id as being saved, and `find` waits for it."""

    def __init__(self, store: RecordStore, wait_s: float = 10.0) -> None:
        self.store = store
        self.wait_s = wait_s
        self._saving: dict[str, asyncio.Event] = {}

    def expect(self, response_id: str) -> None:
        self._saving[response_id] = asyncio.Event()

    def settled(self, response_id: str) -> None:
        """The save of `response_id` is done (or will not happen: the call failed, or `store` was false)."""
        event = self._saving.pop(response_id, None)
        if event is not None:
            event.set()

    async def save(self, row: dict[str, Any]) -> None:
        try:
            await asyncio.to_thread(self._insert, row)
        except StoreError as exc:
            log.error("could not store response %s (request %s): %s", row["id"], row["request_id"], exc)
        finally:
            self.settled(row["id"])

    async def find(self, response_id: str, scope: Scope) -> dict[str, Any] | None:
        """The stored row, if `scope` may see it."""
        saving = self._saving.get(response_id)
        if saving is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(saving.wait(), self.wait_s)
        return await asyncio.to_thread(self._select, response_id, scope)

    async def delete(self, response_id: str, scope: Scope) -> bool:
        return await asyncio.to_thread(self._delete, response_id, scope)

    def _insert(self, row: dict[str, Any]) -> None:
        with self.store.transaction("store a response in") as conn:
            conn.execute(insert(stored_responses).values(row))

    def _select(self, response_id: str, scope: Scope) -> dict[str, Any] | None:
        query = _scoped(select(stored_responses).where(stored_responses.c.id == response_id), scope)
        with self.store.connection() as conn:
            row = conn.execute(query).mappings().first()
        return None if row is None else dict(row)

    def _delete(self, response_id: str, scope: Scope) -> bool:
        query = _scoped(delete(stored_responses).where(stored_responses.c.id == response_id), scope)
        with self.store.transaction("delete a response from") as conn:
            return bool(conn.execute(query).rowcount)


Q = TypeVar("Q", Select[Any], Delete)


def _scoped(query: Q, scope: Scope) -> Q:
    if scope is ANY_TENANT:
        return query
    column = stored_responses.c.tenant
    return query.where(column.is_(None) if scope is None else column == scope)
