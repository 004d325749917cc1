"""Per-minute rollups of the request log (`request_minutes`, keel.observability.rollups): what `keel
report` and the dashboard aggregate instead of scanning `requests`; back-filled from the rows already
logged by the same code the writer adds increments with.

Revision ID: 0008_request_minutes
Revises: 0007_evals
"""

from __future__ import annotations

from alembic import op

from keel.observability import rollups

revision = "0008_request_minutes"
down_revision: str | None = "0007_evals"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    bind = op.get_bind()
    rollups.request_minutes.create(bind)
    rollups.backfill(bind)


def downgrade() -> None:
    op.drop_table("request_minutes")
