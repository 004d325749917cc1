"""The evaluation tables (revision 0007) on the request log's metadata: one schema, which the migrations
are checked against. Blocking SQLAlchemy Core, reached off the event loop."""

from __future__ import annotations

from sqlalchemy import JSON, Column, Float, Index, Integer, String, Table, Text

from keel.observability.store import metadata

_JSON = JSON(none_as_null=True)

eval_runs = Table(
    "eval_runs",
    metadata,
    Column("id", String, primary_key=True),
    Column("suite", String, nullable=False),
    Column("dataset", String, nullable=False),
    Column("dataset_version", String, nullable=False),
    Column("target", _JSON, nullable=False),
    Column("started_at", Float, nullable=False),
    Column("ended_at", Float),
    Column("status", String, nullable=False),
    Column("config", _JSON),
    Column("summary", _JSON),
    Index("ix_eval_runs_suite", "suite", "started_at"),
)

eval_results = Table(
    "eval_results",
    metadata,
    Column("run_id", String, primary_key=True),
    Column("case_id", String, primary_key=True),
    Column("case_hash", String, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("request_id", String),
    Column("output", Text),
    Column("answer", _JSON),
    Column("scores", _JSON),
    Column("latency_ms", Float),
    Column("cost_usd", Float),
    Column("error", Text),
    Index("ix_eval_results_case_hash", "case_hash"),
)

review_items = Table(
    "review_items",
    metadata,
    Column("id", String, primary_key=True),
    Column("tenant", String),
    Column("source", String, nullable=False),
    Column("ref", String),
    Column("created_at", Float, nullable=False),
    Column("input", _JSON),
    Column("output", _JSON),
    Column("reference", _JSON),
    Column("judge", _JSON),
    Column("status", String, nullable=False),
    Index("ix_review_items_status", "status", "created_at"),
)

review_labels = Table(
    "review_labels",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("item_id", String, nullable=False),
    Column("reviewer", String, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("label", String),
    Column("score", Float),
    Column("comment", Text),
    Index("ix_review_labels_item_id", "item_id"),
)
