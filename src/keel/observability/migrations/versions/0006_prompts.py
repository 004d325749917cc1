"""The prompt template and version each call was rendered from (`requests.prompt`, `prompt_version`;
null when the call named none), indexed by prompt for `keel report --by prompt`.

Revision ID: 0006_prompts
Revises: 0005_dialects
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006_prompts"
down_revision: str | None = "0005_dialects"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.add_column("requests", sa.Column("prompt", sa.String()))
    op.add_column("requests", sa.Column("prompt_version", sa.String()))
    op.create_index("ix_requests_prompt", "requests", ["prompt"])


def downgrade() -> None:
    op.drop_index("ix_requests_prompt", table_name="requests")
    with op.batch_alter_table("requests") as batch:  # SQLite drops a column by copying the table
        batch.drop_column("prompt_version")
        batch.drop_column("prompt")
