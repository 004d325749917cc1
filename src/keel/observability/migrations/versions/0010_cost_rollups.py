"""Rollups of spend by user, key and prompt version (`usage_hours`, keel.observability.usage_rollups):
what the Cost page and `keel report` read for those breakdowns instead of scanning `requests`;
back-filled from the rows already logged by the same code the writer adds increments with.

Revision ID: 0010_cost_rollups
Revises: 0009_unpriced_alerts
"""

from __future__ import annotations

from alembic import op

from keel.observability import usage_rollups

revision = "0010_cost_rollups"
down_revision: str | None = "0009_unpriced_alerts"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    bind = op.get_bind()
    usage_rollups.usage_hours.create(bind)
    usage_rollups.backfill(bind)


def downgrade() -> None:
    op.drop_table("usage_hours")
