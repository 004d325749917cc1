"""A virtual key's tier: `virtual_keys.tier`, a label (`free`, `pro`) that routing rules match with
`key_tiers`; null for keys made before this revision, and for keys made without one.

Revision ID: 0004_key_tier
Revises: 0003_cost_saved
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004_key_tier"
down_revision: str | None = "0003_cost_saved"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.add_column("virtual_keys", sa.Column("tier", sa.String()))


def downgrade() -> None:
    with op.batch_alter_table("virtual_keys") as batch:  # SQLite drops a column by copying the table
        batch.drop_column("tier")
