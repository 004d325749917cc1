"""What a cache hit saved: `requests.cost_saved_usd` (the answer's cost when it was stored; null
when the call was not a hit, and in rows written before this revision).

Revision ID: 0003_cost_saved
Revises: 0002_virtual_keys
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003_cost_saved"
down_revision: str | None = "0002_virtual_keys"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.add_column("requests", sa.Column("cost_saved_usd", sa.Float()))


def downgrade() -> None:
    with op.batch_alter_table("requests") as batch:  # SQLite drops a column by copying the table
        batch.drop_column("cost_saved_usd")
