"""Stored responses of the Responses API in the request-log database (table `stored_responses`,
revision 0005), scoped by tenant: what `previous_response_id` continues and `GET /v1/responses/{id}`
returns."""

from __future__ import annotations

from sqlalchemy import JSON, Column, Float, Index, String, Table

from keel.observability.store import metadata

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
