"""Calls whose answering deployment has no known price: `requests.cost_unpriced` (their cost is unknown,
not 0; false in rows written before this revision), with a partial index on `started_at` over those rows
only, so `keel report` counts a window's unpriced calls without reading the others.

Revision ID: 0009_cost_unpriced
Revises: 0008_request_minutes
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009_cost_unpriced"
down_revision: str | None = "0008_request_minutes"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.add_column("requests", sa.Column("cost_unpriced", sa.Boolean(), nullable=False, server_default=sa.false()))
    op.create_index("ix_requests_unpriced", "requests", ["started_at"],
                    sqlite_where=sa.text("cost_unpriced"), postgresql_where=sa.text("cost_unpriced"))


def downgrade() -> None:
    op.drop_index("ix_requests_unpriced", table_name="requests")
    with op.batch_alter_table("requests") as batch:  # SQLite drops a column by copying the table
        batch.drop_column("cost_unpriced")
