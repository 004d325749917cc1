"""Virtual keys (`virtual_keys`, each stored as its SHA-256) and the tenant of each request.

Revision ID: 0002_virtual_keys
Revises: 0001_request_log
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002_virtual_keys"
down_revision: str | None = "0001_request_log"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.create_table(
        "virtual_keys",
        sa.Column("id", sa.String(), primary_key=True),
        sa.Column("digest", sa.String(), nullable=False, unique=True),
        sa.Column("hint", sa.String(), nullable=False),
        sa.Column("tenant", sa.String(), nullable=False),
        sa.Column("owner", sa.String()),
        sa.Column("label", sa.String()),
        sa.Column("models", sa.JSON()),
        sa.Column("limits", sa.JSON()),
        sa.Column("budgets", sa.JSON()),
        sa.Column("admin", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("expires_at", sa.Float()),
        sa.Column("revoked_at", sa.Float()),
    )
    op.create_index("ix_virtual_keys_tenant", "virtual_keys", ["tenant"])
    op.add_column("requests", sa.Column("tenant", sa.String()))
    op.create_index("ix_requests_tenant", "requests", ["tenant"])


def downgrade() -> None:
    op.drop_index("ix_requests_tenant", table_name="requests")
    with op.batch_alter_table("requests") as batch:  # SQLite drops a column by copying the table
        batch.drop_column("tenant")
    op.drop_index("ix_virtual_keys_tenant", table_name="virtual_keys")
    op.drop_table("virtual_keys")
