"""Evaluation runs and their per-case results (`eval_runs`, `eval_results`), and the human review queue
(`review_items`, `review_labels`), in the request-log database beside the calls they evaluate.

Revision ID: 0007_evals
Revises: 0006_prompts
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007_evals"
down_revision: str | None = "0006_prompts"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.create_table(
        "eval_runs",
        sa.Column("id", sa.String(), primary_key=True),  # run_...
        sa.Column("suite", sa.String(), nullable=False),
        sa.Column("dataset", sa.String(), nullable=False),
        sa.Column("dataset_version", sa.String(), nullable=False),  # the dataset's content hash
        sa.Column("target", sa.JSON(), nullable=False),
        sa.Column("started_at", sa.Float(), nullable=False),
        sa.Column("ended_at", sa.Float()),
        sa.Column("status", sa.String(), nullable=False),  # running | finished | interrupted
        sa.Column("config", sa.JSON()),  # the suite as run
        sa.Column("summary", sa.JSON()),  # per-metric aggregates, cost, latency
    )
    op.create_index("ix_eval_runs_suite", "eval_runs", ["suite", "started_at"])
    op.create_table(
        "eval_results",
        sa.Column("run_id", sa.String(), primary_key=True),
        sa.Column("case_id", sa.String(), primary_key=True),
        sa.Column("case_hash", sa.String(), nullable=False),  # the case and what it was sent to: resume key
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("request_id", sa.String()),  # the call's request-log record
        sa.Column("output", sa.Text()),  # the answer's text
        sa.Column("answer", sa.JSON()),  # the whole completion
        sa.Column("scores", sa.JSON()),  # metric key -> {value, passed, reason, ...}
        sa.Column("latency_ms", sa.Float()),
        sa.Column("cost_usd", sa.Float()),
        sa.Column("error", sa.Text()),
    )
    op.create_index("ix_eval_results_case_hash", "eval_results", ["case_hash"])
    op.create_table(
        "review_items",
        sa.Column("id", sa.String(), primary_key=True),  # rev_...
        sa.Column("tenant", sa.String()),
        sa.Column("source", sa.String(), nullable=False),  # eval | production | semantic_cache
        sa.Column("ref", sa.String()),  # run_id/case_id, or the request id
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("input", sa.JSON()),
        sa.Column("output", sa.JSON()),
        sa.Column("reference", sa.JSON()),
        sa.Column("judge", sa.JSON()),  # what a judge said, when one did: compared with the humans
        sa.Column("status", sa.String(), nullable=False),  # pending | labelled
    )
    op.create_index("ix_review_items_status", "review_items", ["status", "created_at"])
    op.create_table(
        "review_labels",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("item_id", sa.String(), nullable=False),
        sa.Column("reviewer", sa.String(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("label", sa.String()),  # pass | fail
        sa.Column("score", sa.Float()),
        sa.Column("comment", sa.Text()),
    )
    op.create_index("ix_review_labels_item_id", "review_labels", ["item_id"])


def downgrade() -> None:
    op.drop_index("ix_review_labels_item_id", table_name="review_labels")
    op.drop_table("review_labels")
    op.drop_index("ix_review_items_status", table_name="review_items")
    op.drop_table("review_items")
    op.drop_index("ix_eval_results_case_hash", table_name="eval_results")
    op.drop_table("eval_results")
    op.drop_index("ix_eval_runs_suite", table_name="eval_runs")
    op.drop_table("eval_runs")
