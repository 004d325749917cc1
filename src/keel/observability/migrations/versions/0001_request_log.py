"""The request log: `requests` (one row per call) and `spans` (finished trace spans).

Revision ID: 0001_request_log
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001_request_log"
down_revision: str | None = None
branch_labels: str | None = None
depends_on: str | None = None

JSONColumn = sa.JSON()


def upgrade() -> None:
    op.create_table(
        "requests",
        sa.Column("request_id", sa.String(), primary_key=True),
        sa.Column("started_at", sa.Float(), nullable=False),
        sa.Column("ended_at", sa.Float(), nullable=False),
        sa.Column("endpoint", sa.String(), nullable=False),
        sa.Column("trace_id", sa.String()),
        sa.Column("span_id", sa.String()),
        sa.Column("key_id", sa.String()),
        sa.Column("user", sa.String()),
        sa.Column("feature", sa.String()),
        sa.Column("model", sa.String()),
        sa.Column("deployment", sa.String()),
        sa.Column("upstream_model", sa.String()),
        sa.Column("system_fingerprint", sa.String()),
        sa.Column("stream", sa.Boolean(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("fallbacks", sa.Integer(), nullable=False),
        sa.Column("attempt_log", JSONColumn),
        sa.Column("cache_status", sa.String(), nullable=False),
        sa.Column("guardrails", JSONColumn),
        sa.Column("input", JSONColumn),
        sa.Column("output", JSONColumn),
        sa.Column("metadata", JSONColumn),
        sa.Column("prompt_tokens", sa.Integer(), nullable=False),
        sa.Column("completion_tokens", sa.Integer(), nullable=False),
        sa.Column("cached_tokens", sa.Integer(), nullable=False),
        sa.Column("cost_usd", sa.Float(), nullable=False),
        sa.Column("cost_nanousd", sa.BigInteger(), nullable=False),
        sa.Column("cost_estimated", sa.Boolean(), nullable=False),
        sa.Column("latency_ms", sa.Float(), nullable=False),
        sa.Column("ttft_ms", sa.Float()),
        sa.Column("upstream_ms", sa.Float()),
        sa.Column("status", sa.Integer(), nullable=False),
        sa.Column("outcome", sa.String(), nullable=False),
        sa.Column("error_type", sa.String()),
        sa.Column("error_message", sa.Text()),
        sa.Column("spans", JSONColumn),
    )
    op.create_index("ix_requests_started_at", "requests", ["started_at"])
    op.create_index("ix_requests_feature", "requests", ["feature"])
    op.create_index("ix_requests_model", "requests", ["model"])
    op.create_index("ix_requests_user", "requests", ["user"])
    op.create_index("ix_requests_trace_id", "requests", ["trace_id"])

    op.create_table(
        "spans",
        sa.Column("trace_id", sa.String(), primary_key=True),
        sa.Column("span_id", sa.String(), primary_key=True),
        sa.Column("parent_id", sa.String()),
        sa.Column("name", sa.String(), nullable=False),
        sa.Column("started_at", sa.Float(), nullable=False),
        sa.Column("ended_at", sa.Float(), nullable=False),
        sa.Column("status", sa.String(), nullable=False),
        sa.Column("attributes", JSONColumn),
        sa.Column("request_id", sa.String()),
    )
    op.create_index("ix_spans_started_at", "spans", ["started_at"])


def downgrade() -> None:
    op.drop_index("ix_spans_started_at", table_name="spans")
    op.drop_table("spans")
    for name in ("trace_id", "user", "model", "feature", "started_at"):
        op.drop_index(f"ix_requests_{name}", table_name="requests")
    op.drop_table("requests")
