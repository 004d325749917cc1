"""Calls whose answering deployment has no known price: `requests.cost_unpriced` (their cost is unknown,
not 0; false in rows written before this revision), with a partial index on `started_at` over those rows
only, so `keel report` counts a window's unpriced calls without reading the others. And the alerts the
webhook has not taken yet (`pending_alerts`, keel.budgets.pending_alerts), so a restart delivers them.

Revision ID: 0009_unpriced_alerts
Revises: 0008_request_minutes
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009_unpriced_alerts"
down_revision: str | None = "0008_request_minutes"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.add_column("requests", sa.Column("cost_unpriced", sa.Boolean(), nullable=False, server_default=sa.false()))
    op.create_index("ix_requests_unpriced", "requests", ["started_at"],
                    sqlite_where=sa.text("cost_unpriced"), postgresql_where=sa.text("cost_unpriced"))
    op.create_table(
        "pending_alerts",
        sa.Column("id", sa.String(), primary_key=True),
        sa.Column("payload", sa.JSON(none_as_null=True), nullable=False),
        sa.Column("raised_at", sa.Float(), nullable=False),
        sa.Column("owner", sa.String(), nullable=False),
        sa.Column("lease_until", sa.Float(), nullable=False),
    )
    op.create_index("ix_pending_alerts_lease_until", "pending_alerts", ["lease_until"])


def downgrade() -> None:
    op.drop_index("ix_pending_alerts_lease_until", table_name="pending_alerts")
    op.drop_table("pending_alerts")
    op.drop_index("ix_requests_unpriced", table_name="requests")
    with op.batch_alter_table("requests") as batch:  # SQLite drops a column by copying the table
        batch.drop_column("cost_unpriced")
