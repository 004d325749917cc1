"""The API each call was made in (`requests.dialect`: chat.completions, embeddings, responses, messages,
completions; null in-process), and the Responses API's stored responses (`stored_responses`): what a
`previous_response_id` continues from and `GET /v1/responses/{id}` returns, scoped by tenant.

Revision ID: 0005_dialects
Revises: 0004_key_tier
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005_dialects"
down_revision: str | None = "0004_key_tier"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.add_column("requests", sa.Column("dialect", sa.String()))
    op.create_table(
        "stored_responses",
        sa.Column("id", sa.String(), primary_key=True),  # resp_...
        sa.Column("tenant", sa.String()),  # null: a gateway without virtual keys
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("request_id", sa.String(), nullable=False),  # the request log's row
        sa.Column("model", sa.String(), nullable=False),
        sa.Column("previous_response_id", sa.String()),
        sa.Column("messages", sa.JSON(), nullable=False),  # the conversation so far, this answer included
        sa.Column("response", sa.JSON(), nullable=False),  # the Response object as served
    )
    op.create_index("ix_stored_responses_created_at", "stored_responses", ["created_at"])


def downgrade() -> None:
    op.drop_index("ix_stored_responses_created_at", table_name="stored_responses")
    op.drop_table("stored_responses")
    with op.batch_alter_table("requests") as batch:  # SQLite drops a column by copying the table
        batch.drop_column("dialect")
