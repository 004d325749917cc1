"""Rollups of spend by user, key and prompt version: `usage_hours`, one row per (dimension, width,
start, tenant, value) with the requests, tokens, spend, errors and latency sum of the calls that
started in [start, start + width). Widths are a day and an hour (`WIDTHS`, UTC days): a week reads
six daily rows per value and the hours at its ends.

Why a table of its own: `request_minutes` (keel.observability.rollups) is keyed by tenant, model and
feature; a user, key or prompt in that key would multiply its rows by thousands. Here the key holds
the tenant and one value of one dimension, so the Cost page's "by user" over 7 days reads a few
hundred thousand rows at most instead of every call (keel.observability.queries.usage). Model and
feature are not in the key: a breakdown filtered by them reads `requests`.

Maintenance is request_minutes' own: `RecordStore.write` adds the increments of the rows it actually
inserted, in the same transaction; `RecordStore.purge` removes the units it emptied and recounts the
ones it cut; migration 0009 back-fills existing logs with `backfill`, the writer's `aggregate` +
`apply`. What is counted is the report's rule, as in `rollups.Agg.add_row` (attempted, errors, latency
over the attempted calls).
A call with no user, key or prompt, or no tenant, is stored under '' (no tag and an empty tag are
the same here, as in request_minutes).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    Connection,
    Float,
    Integer,
    String,
    Table,
    delete,
    func,
    insert,
    literal,
    select,
)
from sqlalchemy.dialects import postgresql, sqlite

from keel.observability import rollups
from keel.observability.rollups import NOT_ATTEMPTED, SERVER_ERRORS
from keel.observability.store import metadata, requests

DIMENSIONS = ("user", "key", "prompt")
WIDTHS = (86_400, 3600)  # seconds, coarsest first; the hour divides the day
KEY_COLUMNS = ("dimension", "width", "start", "tenant", "value")
# The counters of `rollups.Agg` that a usage row needs (rollups.COUNT_COLUMNS names), and its sums.
COUNT_COLUMNS = ("requests", "attempted", "n_error", "prompt_tokens", "completion_tokens", "cached_tokens")
SUM_COLUMNS = ("cost_usd", "latency_sum_ms")
COLUMNS = (*COUNT_COLUMNS, *SUM_COLUMNS)
# The `requests` columns these rollups read.
ROW_COLUMNS = (*rollups.ROW_COLUMNS, "user", "key_id", "prompt", "prompt_version")

usage_hours = Table(
    "usage_hours",
    metadata,
    Column("dimension", String, primary_key=True),  # user, key or prompt
    Column("width", Integer, primary_key=True),  # seconds: 3600 or 86400
    Column("start", BigInteger, primary_key=True),  # unix seconds, a multiple of the width
    Column("tenant", String, primary_key=True),
    Column("value", String, primary_key=True),  # the user, the key's id, the prompt's "name@version"
    *(Column(name, BigInteger, nullable=False, server_default="0") for name in COUNT_COLUMNS),
    *(Column(name, Float, nullable=False, server_default="0") for name in SUM_COLUMNS),
)

Key = tuple[str, int, int, str, str]  # dimension, width, start, tenant, value


def value_of(row: Mapping[Any, Any], dimension: str) -> str:
    """A `requests` row's value of a dimension ('' when it has none)."""
    if dimension == "user":
        return str(row.get("user") or "")
    if dimension == "key":
        return str(row.get("key_id") or "")
    prompt, version = row.get("prompt"), row.get("prompt_version")
    return "" if prompt is None or version is None else f"{prompt}@{version}"


Sums = list[float]  # one number per COLUMNS name, in its order


def aggregate(rows: Iterable[Mapping[Any, Any]], widths: Sequence[int] = WIDTHS) -> dict[Key, Sums]:
    """The increments of `requests` rows at each of `widths`: counted per hour, then the hours
    added into days. Each row is counted once (COLUMNS' increments, by the report's rule, as
    `rollups.Agg.add_row` counts: attempted are all but NOT_ATTEMPTED, errors the SERVER_ERRORS,
    latency over the attempted), then added to its three keys."""
    hours: dict[Key, Sums] = {}
    for row in rows:
        start = int(float(row["started_at"]) // 3600) * 3600
        tenant = row.get("tenant") or ""
        outcome = row["outcome"]
        attempted = outcome not in NOT_ATTEMPTED
        increment = (1, int(attempted), int(outcome in SERVER_ERRORS), row["prompt_tokens"] or 0,
                     row["completion_tokens"] or 0, row["cached_tokens"] or 0, row["cost_usd"] or 0.0,
                     float(row["latency_ms"]) if attempted else 0.0)
        for dimension in DIMENSIONS:
            _add(hours, (dimension, 3600, start, tenant, value_of(row, dimension)), increment)
    out: dict[Key, Sums] = {}
    for width in widths:
        if width == 3600:
            out.update(hours)
            continue
        for (dimension, _, start, tenant, value), sums in hours.items():
            _add(out, (dimension, width, start // width * width, tenant, value), sums)
    return out


def _add(into: dict[Key, Sums], key: Key, sums: Sequence[float]) -> None:
    """`sums` added to `into[key]`, a new row of them when the key has none."""
    row = into.get(key)
    if row is None:
        into[key] = list(sums)
    else:
        for i, number in enumerate(sums):
            row[i] += number


def apply(conn: Connection, increments: Mapping[Key, Sums]) -> None:
    """Add increments to `usage_hours` inside the caller's transaction: one INSERT ... ON CONFLICT
    DO UPDATE SET column = column + increment per key, in key order (two writers adding to the same
    row wait for each other; neither loses an increment)."""
    if not increments:
        return
    insert = (postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert)(usage_hours)
    statement = insert.on_conflict_do_update(
        index_elements=[usage_hours.c[name] for name in KEY_COLUMNS],
        set_={name: usage_hours.c[name] + insert.excluded[name] for name in (*COUNT_COLUMNS, *SUM_COLUMNS)},
    )
    conn.execute(statement, [as_row(key, increments[key]) for key in sorted(increments)])


def as_row(key: Key, sums: Sums) -> dict[str, Any]:
    """A `usage_hours` row: the key's columns and the sums (counts as integers)."""
    numbers = {name: number if name in SUM_COLUMNS else int(number) for name, number in zip(COLUMNS, sums, strict=True)}
    return {**dict(zip(KEY_COLUMNS, key, strict=True)), **numbers}


def purge(conn: Connection, older_than: float) -> None:
    """After the rows that started before `older_than` were deleted: the units they emptied go; the
    hour cut in two is counted again from the rows left in it, and the day cut in two is the sum of
    its hours left (so an hourly purge reads an hour of the log, not a day)."""
    table = usage_hours
    hour, day = int(older_than // 3600) * 3600, int(older_than // 86_400) * 86_400
    conn.execute(delete(table).where(table.c.width == 3600, table.c.start < hour))
    if hour < older_than:
        conn.execute(delete(table).where(table.c.width == 3600, table.c.start == hour))
        rows = conn.execute(
            select(*(requests.c[name] for name in ROW_COLUMNS))
            .where(requests.c.started_at >= hour, requests.c.started_at < hour + 3600)
        ).mappings()
        apply(conn, aggregate(rows, (3600,)))
    conn.execute(delete(table).where(table.c.width == 86_400, table.c.start < day))
    if day < older_than:
        conn.execute(delete(table).where(table.c.width == 86_400, table.c.start == day))
        hours = (
            select(table.c.dimension, literal(86_400).label("width"), literal(day).label("start"), table.c.tenant,
                   table.c.value, *(func.sum(table.c[name]).label(name) for name in COLUMNS))
            .where(table.c.width == 3600, table.c.start >= day, table.c.start < day + 86_400)
            .group_by(table.c.dimension, table.c.tenant, table.c.value)
        )
        conn.execute(insert(table).from_select([*KEY_COLUMNS, *COLUMNS], hours))


def backfill(conn: Connection, chunk_rows: int = 50_000) -> None:
    """Build the rollups of every row already in `requests` (migration 0009): request_minutes'
    chunked walk of the log, adding these increments."""
    rollups.backfill(conn, chunk_rows, columns=ROW_COLUMNS, add=lambda rows: apply(conn, aggregate(rows)))
