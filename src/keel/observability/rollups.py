"""Rollups of the request log: `request_minutes`, one row per (width, start, tenant, model, feature)
with the counts, sums and latency histograms of the calls that started in [start, start + width).
Widths are a minute, ten minutes and an hour (`WIDTHS`): each call is counted once at each width, so
a week reads 168 hourly rows per key, a day 144 ten-minute ones, an hour 60 per-minute ones.

`keel report` and the dashboard read aggregates from these rows instead of scanning `requests`
(keel.observability.queries), so a window of a million calls costs thousands of rows.

Maintenance: `RecordStore.write` adds the increments of the rows it actually inserted, in the same
transaction (a replayed batch adds nothing twice); `RecordStore.purge` removes the units it
emptied and recomputes the ones it cut; migration 0008 back-fills existing logs with `backfill`, the
same `aggregate` + `apply` the writer uses.

Percentiles: latencies and times to first token go into fixed log buckets of ratio 1.04; a bucket
stands for its geometric midpoint, so a percentile read from the histogram is within 2% of one
computed over the raw values (`RELATIVE_ERROR`). Keys: a call with no tenant, model or feature is
stored under '' (primary key columns cannot be NULL): an empty tag and no tag are the same here.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
from sqlalchemy import (
    BigInteger,
    Column,
    Connection,
    Float,
    Integer,
    String,
    Table,
    Text,
    and_,
    bindparam,
    delete,
    select,
    tuple_,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite

from keel.observability.store import metadata, requests

MINUTE = 60
WIDTHS = (3600, 600, 60)  # seconds, coarsest first; each divides the one before
BUCKET_RATIO = 1.04
RELATIVE_ERROR = math.sqrt(BUCKET_RATIO) - 1  # 1.98%: a bucket's midpoint against any value in it
_LOG_RATIO = math.log(BUCKET_RATIO)
_FLOOR_MS = 0.01  # values at or below it share the lowest bucket

REFUSALS = ("blocked", "rate_limited", "budget_exceeded")  # Keel doing its job: not failures
CLIENT_ERRORS = ("invalid",)  # the caller's mistake
NOT_ATTEMPTED = REFUSALS + CLIENT_ERRORS
SERVER_ERRORS = ("error",)  # what the SLO's error rate counts
# The outcomes of keel.observability.record.Outcome, one counter column each; anything else is
# counted under "other" (and as attempted, as the report counts it).
OUTCOMES = ("ok", "error", "cached", "client_closed", "blocked", "rate_limited", "budget_exceeded", "invalid")

KEY_COLUMNS = ("width", "start", "tenant", "model", "feature")
COUNT_COLUMNS = (
    "requests", "attempted", *(f"n_{o}" for o in OUTCOMES), "n_other",
    "prompt_tokens", "completion_tokens", "cached_tokens", "cost_nanousd",
    "cache_hits", "cache_semantic_hits", "cache_misses", "cache_bypasses",
)
SUM_COLUMNS = ("cost_usd", "saved_usd", "latency_sum_ms")
HIST_COLUMNS = ("latency_hist", "ttft_hist")

request_minutes = Table(
    "request_minutes",
    metadata,
    Column("width", Integer, primary_key=True),  # seconds: 60, 600 or 3600
    Column("start", BigInteger, primary_key=True),  # unix seconds, a multiple of the width
    Column("tenant", String, primary_key=True),
    Column("model", String, primary_key=True),
    Column("feature", String, primary_key=True),
    *(Column(name, BigInteger if name in ("cost_nanousd", "prompt_tokens", "completion_tokens", "cached_tokens")
             else Integer, nullable=False, server_default="0") for name in COUNT_COLUMNS),
    *(Column(name, Float, nullable=False, server_default="0") for name in SUM_COLUMNS),
    # Sparse histograms as JSON [bucket, count, bucket, count, ...] of the attempted calls.
    *(Column(name, Text, nullable=False, server_default="[]") for name in HIST_COLUMNS),
)

Key = tuple[int, int, str, str, str]  # width, start, tenant, model, feature


def bucket_of(ms: float) -> int:
    """The histogram bucket of a latency: [1.04^b, 1.04^(b+1)) ms."""
    return math.floor(math.log(max(ms, _FLOOR_MS)) / _LOG_RATIO)


def bucket_value(bucket: int) -> float:
    """What a bucket stands for: its geometric midpoint."""
    return math.exp((bucket + 0.5) * _LOG_RATIO)


def hist_percentile(hist: Mapping[int, int], q: float) -> float | None:
    """The q-quantile of a histogram, with the report's rule (linear between the closest ranks)
    applied to the buckets' midpoints: within `RELATIVE_ERROR` of the exact figure."""
    n = sum(hist.values())
    if n == 0:
        return None
    position = (n - 1) * q
    low = math.floor(position)
    high = min(low + 1, n - 1)
    low_value = high_value = None
    seen = 0
    for bucket in sorted(hist):
        seen += hist[bucket]
        if low_value is None and seen > low:
            low_value = bucket_value(bucket)
        if seen > high:
            high_value = bucket_value(bucket)
            break
    assert low_value is not None and high_value is not None
    return low_value + (high_value - low_value) * (position - low)


def decode_hist(text: str | None, into: Counter[int] | None = None) -> Counter[int]:
    out: Counter[int] = Counter() if into is None else into
    if text and text != "[]":
        flat = orjson.loads(text)
        for i in range(0, len(flat), 2):
            out[flat[i]] += flat[i + 1]
    return out


def encode_hist(hist: Mapping[int, int]) -> str:
    flat: list[int] = []
    for bucket in sorted(hist):
        if hist[bucket]:
            flat += (bucket, hist[bucket])
    return orjson.dumps(flat).decode()


@dataclass(slots=True)
class Agg:
    """The counts, sums and histograms of a set of calls (one rollup row, or any sum of them)."""

    counts: Counter[str] = field(default_factory=Counter)
    sums: dict[str, float] = field(default_factory=lambda: dict.fromkeys(SUM_COLUMNS, 0.0))
    latency: Counter[int] = field(default_factory=Counter)
    ttft: Counter[int] = field(default_factory=Counter)

    def add_row(self, row: Mapping[Any, Any]) -> None:
        """Count one `requests` row (a mapping keyed by column)."""
        counts, sums = self.counts, self.sums
        outcome = row["outcome"]
        counts["requests"] += 1
        counts[f"n_{outcome}" if outcome in OUTCOMES else "n_other"] += 1
        counts["prompt_tokens"] += row["prompt_tokens"] or 0
        counts["completion_tokens"] += row["completion_tokens"] or 0
        counts["cached_tokens"] += row["cached_tokens"] or 0
        counts["cost_nanousd"] += row["cost_nanousd"] or 0
        sums["cost_usd"] += row["cost_usd"] or 0.0
        cache = row["cache_status"]
        if cache != "none":
            if str(cache).startswith("hit"):
                counts["cache_hits"] += 1
                counts["cache_semantic_hits"] += cache == "hit_semantic"
            elif cache == "miss":
                counts["cache_misses"] += 1
            else:
                counts["cache_bypasses"] += 1
            sums["saved_usd"] += row.get("cost_saved_usd") or 0.0
        if outcome not in NOT_ATTEMPTED:
            counts["attempted"] += 1
            latency = float(row["latency_ms"])
            sums["latency_sum_ms"] += latency
            self.latency[bucket_of(latency)] += 1
            ttft = row.get("ttft_ms")
            if ttft is not None:
                self.ttft[bucket_of(float(ttft))] += 1

    def merge(self, other: Agg) -> None:
        self.counts.update(other.counts)
        for name, value in other.sums.items():
            self.sums[name] += value
        self.latency.update(other.latency)
        self.ttft.update(other.ttft)

    def add_stored(self, row: Mapping[Any, Any]) -> None:
        """Add a stored rollup row (its counters; histograms when selected)."""
        for name in COUNT_COLUMNS:
            if row.get(name):
                self.counts[name] += int(row[name])
        for name in SUM_COLUMNS:
            if row.get(name):
                self.sums[name] += float(row[name])
        if "latency_hist" in row:
            decode_hist(row["latency_hist"], self.latency)
        if "ttft_hist" in row:
            decode_hist(row["ttft_hist"], self.ttft)

    def as_row(self) -> dict[str, Any]:
        return {**{name: self.counts.get(name, 0) for name in COUNT_COLUMNS}, **self.sums,
                "latency_hist": encode_hist(self.latency), "ttft_hist": encode_hist(self.ttft)}


def key_of(row: Mapping[Any, Any], width: int = MINUTE) -> Key:
    started = float(row["started_at"])
    return (width, int(started // width) * width, row.get("tenant") or "", row.get("model") or "",
            row.get("feature") or "")


def aggregate(rows: Iterable[Mapping[Any, Any]], widths: Sequence[int] = WIDTHS) -> dict[Key, Agg]:
    """The rollup increments of `requests` rows at each of `widths`: counted per minute, then the
    minutes merged into the coarser widths."""
    minutes: dict[Key, Agg] = {}
    for row in rows:
        key = key_of(row)
        agg = minutes.get(key)
        if agg is None:
            agg = minutes[key] = Agg()
        agg.add_row(row)
    out: dict[Key, Agg] = {}
    for width in widths:
        if width == MINUTE:
            out.update(minutes)
            continue
        for (_, start, *rest), agg in minutes.items():
            key = (width, start // width * width, rest[0], rest[1], rest[2])
            coarse = out.get(key)
            if coarse is None:
                coarse = out[key] = Agg()
            coarse.merge(agg)
    return out


def apply(conn: Connection, increments: Mapping[Key, Agg]) -> None:
    """Add increments to `request_minutes` inside the caller's transaction.

    The key rows are created first (INSERT ... ON CONFLICT DO NOTHING, in key order), then read
    (FOR UPDATE on PostgreSQL), merged and written back: two writers adding to the same minute
    wait for each other instead of losing an increment. On SQLite the caller's transaction
    already holds the database's write lock.
    """
    if not increments:
        return
    keys = sorted(increments)
    postgres = conn.dialect.name == "postgresql"
    insert = (postgresql.insert if postgres else sqlite.insert)(request_minutes).on_conflict_do_nothing()
    key_rows = [dict(zip(KEY_COLUMNS, key, strict=True)) for key in keys]
    conn.execute(insert, key_rows)
    table = request_minutes
    # Counts and sums are added in SQL (col = col + increment); only the histograms are read,
    # merged here and written back whole.
    stored: dict[Key, tuple[str, str]] = {}
    key_columns = [table.c[name] for name in KEY_COLUMNS]
    for chunk in _chunks(keys, 500):
        query = select(*key_columns, table.c.latency_hist, table.c.ttft_hist).where(tuple_(*key_columns).in_(chunk))
        if postgres:
            query = query.with_for_update()
        for row in conn.execute(query):
            stored[(int(row[0]), int(row[1]), row[2], row[3], row[4])] = (row[5], row[6])
    writes = []
    for key in keys:
        increment = increments[key]
        latency, ttft = stored.get(key, ("[]", "[]"))
        writes.append({
            **{f"k_{name}": value for name, value in zip(KEY_COLUMNS, key, strict=True)},
            **{name: increment.counts.get(name, 0) for name in COUNT_COLUMNS}, **increment.sums,
            "latency_hist": _merged(latency, increment.latency), "ttft_hist": _merged(ttft, increment.ttft),
        })
    statement = (
        update(table)
        .where(and_(*(table.c[name] == bindparam(f"k_{name}") for name in KEY_COLUMNS)))
        .values({
            **{name: table.c[name] + bindparam(name) for name in (*COUNT_COLUMNS, *SUM_COLUMNS)},
            **{name: bindparam(name) for name in HIST_COLUMNS},
        })
    )
    conn.execute(statement, writes)


def _merged(stored: str, increment: Counter[int]) -> str:
    if not increment:
        return stored
    if stored == "[]":
        return encode_hist(increment)
    return encode_hist(decode_hist(stored, Counter(increment)))


def purge(conn: Connection, older_than: float) -> None:
    """After the rows that started before `older_than` were deleted: the units they emptied go, and
    the unit cut in two, at each width, is counted again from the rows left in it."""
    table = request_minutes
    for width in WIDTHS:
        cut = int(older_than // width) * width
        conn.execute(delete(table).where(table.c.width == width, table.c.start < cut))
        if cut < older_than:
            conn.execute(delete(table).where(table.c.width == width, table.c.start == cut))
            rows = conn.execute(
                select(*(requests.c[name] for name in ROW_COLUMNS))
                .where(requests.c.started_at >= cut, requests.c.started_at < cut + width)
            ).mappings()
            apply(conn, aggregate(rows, (width,)))


def backfill(
    conn: Connection, chunk_rows: int = 50_000, columns: Sequence[str] | None = None,
    add: Callable[[Sequence[Mapping[Any, Any]]], None] | None = None,
) -> None:
    """Build the rollups of every row already in `requests` (migration 0008), oldest first, in
    chunks of whole minutes. Another rollup's back-fill (keel.observability.usage_rollups) passes
    the `columns` it reads and what to `add` with each chunk of rows."""
    columns = ROW_COLUMNS if columns is None else columns
    if add is None:
        add = lambda rows: apply(conn, aggregate(rows))  # noqa: E731
    start = conn.execute(select(requests.c.started_at).order_by(requests.c.started_at).limit(1)).scalar()
    while start is not None:
        first_minute = int(float(start) // MINUTE) * MINUTE
        rows = list(conn.execute(
            select(*(requests.c[name] for name in columns))
            .where(requests.c.started_at >= first_minute)
            .order_by(requests.c.started_at).limit(chunk_rows)
        ).mappings())
        if len(rows) == chunk_rows:  # stop before the last, maybe partial, minute
            end = key_of(rows[-1])[1]
            if end == first_minute:  # one minute holds more than a chunk: take it whole
                end = first_minute + MINUTE
                rows = list(conn.execute(
                    select(*(requests.c[name] for name in columns))
                    .where(requests.c.started_at >= first_minute, requests.c.started_at < end)
                ).mappings())
            else:
                rows = [row for row in rows if row["started_at"] < end]
        else:
            end = None
        add(rows)
        if end is None:
            return
        start = conn.execute(
            select(requests.c.started_at).where(requests.c.started_at >= end)
            .order_by(requests.c.started_at).limit(1)
        ).scalar()


# The `requests` columns a rollup reads.
ROW_COLUMNS = (
    "started_at", "tenant", "model", "feature", "outcome", "prompt_tokens", "completion_tokens", "cached_tokens",
    "cost_nanousd", "cost_usd", "cache_status", "cost_saved_usd", "latency_ms", "ttft_ms",
)


def _chunks(items: Sequence[Key], size: int) -> Iterable[Sequence[Key]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]
