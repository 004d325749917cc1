"""The one query layer over the request log: `keel report` and the dashboard's API call these
functions, so a figure is computed one way wherever it is shown.

Aggregates come from the per-minute rollups (keel.observability.rollups) for the whole minutes of
a window and from the `requests` rows of its partial minutes at either end, so counts and sums are
exact for any window. Percentiles (latency P50/P99, time to first token) are exact (sorted raw
values) while the window holds at most `EXACT_LIMIT` attempted calls, and read from the rollups'
log histograms beyond that: within `rollups.RELATIVE_ERROR` (2%) of the exact figure.

What is counted is the report's rule (docs/observability.md): requests are every record; attempted
are all but refusals (blocked, rate-limited, over budget) and client errors (invalid); latency is
over the attempted calls; the error rate is errors (outcome `error`) over attempted; the cache hit
rate is hits over lookups (hits and misses).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import ColumnElement, Connection, Select, Text, and_, case, cast, func, or_, select

from keel.observability import rollups, usage_rollups
from keel.observability.rollups import NOT_ATTEMPTED, OUTCOMES, SERVER_ERRORS, Agg, hist_percentile, request_minutes
from keel.observability.store import RecordStore, requests
from keel.observability.usage_rollups import usage_hours

EXACT_LIMIT = 20_000  # attempted calls in a window up to which percentiles are computed exactly
MINUTE = rollups.MINUTE
# Bucket widths of a time series, so that a bucket is whole minutes and a window has <= MAX_BUCKETS.
STEPS = (60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400, 604800)
MAX_BUCKETS = 240
# A text search reads at most this many of the window's newest rows (matching the other filters)
# per page; when fewer than a page match, `next` continues further back.
SEARCH_SCAN = 50_000


@dataclass(frozen=True, slots=True)
class Window:
    """The calls that started in [since, until) (unix seconds)."""

    since: float
    until: float


@dataclass(frozen=True, slots=True)
class Filters:
    """Exact filters on the rollup keys; None: all."""

    tenant: str | None = None
    model: str | None = None
    feature: str | None = None


def percentile(ordered: Sequence[float], q: float) -> float | None:
    """The q-quantile (0..1) of sorted values, interpolating linearly between closest ranks."""
    if not ordered:
        return None
    position = (len(ordered) - 1) * q
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return float(ordered[low] + (ordered[high] - ordered[low]) * (position - low))


@dataclass(frozen=True, slots=True)
class Usage:
    """Tokens and spend of one feature, model, user, key or prompt (None: calls without one)."""

    name: str | None
    requests: int
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    cost_usd: float
    attempted: int = 0  # calls Keel tried to answer (refusals and client errors are not)
    errors: int = 0  # of those, the failed ones: the SLO's error rate
    latency_ms: float | None = None  # the mean latency of the attempted calls

    @property
    def error_rate(self) -> float | None:
        return self.errors / self.attempted if self.attempted else None

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "requests": self.requests, "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens, "cached_tokens": self.cached_tokens,
                "cost_usd": self.cost_usd, "latency_ms": self.latency_ms, "error_rate": self.error_rate}


@dataclass(frozen=True, slots=True)
class CacheUsage:
    """The cache's use by one model (None: calls without one) in the window."""

    model: str | None
    hits: int  # exact and semantic
    misses: int
    bypasses: int
    saved_usd: float
    semantic_hits: int = 0  # of `hits`, those the semantic cache served

    @property
    def calls(self) -> int:
        """Calls to the model that went through the cache: hits, misses and bypasses."""
        return self.hits + self.misses + self.bypasses

    @property
    def hit_rate(self) -> float | None:
        """Hits over lookups (hits and misses); None with no lookup."""
        lookups = self.hits + self.misses
        return self.hits / lookups if lookups else None

    def as_json(self) -> dict[str, Any]:
        return {"model": self.model, "calls": self.calls, "hits": self.hits, "semantic_hits": self.semantic_hits,
                "misses": self.misses, "bypasses": self.bypasses, "hit_rate": self.hit_rate,
                "saved_usd": self.saved_usd}


@dataclass(slots=True)
class Figures:
    """The figures of a set of calls: counts and sums, and latency percentiles."""

    agg: Agg = field(default_factory=Agg)
    p50_ms: float | None = None
    p99_ms: float | None = None
    ttft_p50_ms: float | None = None
    latencies: list[float] | None = None  # sorted, when the percentiles were computed exactly

    def count(self, name: str) -> int:
        return int(self.agg.counts.get(name, 0))

    @property
    def requests(self) -> int:
        return self.count("requests")

    @property
    def attempted(self) -> int:
        return self.count("attempted")

    @property
    def errors(self) -> int:
        return sum(self.count(f"n_{o}") for o in SERVER_ERRORS)

    @property
    def error_rate(self) -> float | None:
        return self.errors / self.attempted if self.attempted else None

    @property
    def cost_usd(self) -> float:
        return self.agg.sums["cost_usd"]

    @property
    def saved_usd(self) -> float:
        return self.agg.sums["saved_usd"]

    @property
    def outcomes(self) -> dict[str, int]:
        found = {o: self.count(f"n_{o}") for o in OUTCOMES}
        found["other"] = self.count("n_other")
        return {name: n for name, n in sorted(found.items()) if n}

    def share_over(self, ms: float) -> float | None:
        """The share of the attempted calls slower than `ms` (None: none attempted); from the
        histogram (a bucket counts as its midpoint) when the percentiles came from it."""
        if self.latencies is not None:
            n = len(self.latencies)
            return (n - bisect.bisect_right(self.latencies, ms)) / n if n else None
        n = sum(self.agg.latency.values())
        if not n:
            return None
        return sum(c for bucket, c in self.agg.latency.items() if rollups.bucket_value(bucket) > ms) / n

    @property
    def cache_lookups(self) -> int:
        return self.count("cache_hits") + self.count("cache_misses")

    @property
    def cache_hit_rate(self) -> float | None:
        lookups = self.cache_lookups
        return self.count("cache_hits") / lookups if lookups else None

    def totals_json(self) -> dict[str, Any]:
        return {
            "requests": self.requests, "attempted": self.attempted, "errors": self.errors,
            "cost_usd": self.cost_usd, "prompt_tokens": self.count("prompt_tokens"),
            "completion_tokens": self.count("completion_tokens"), "cache_hits": self.count("cache_hits"),
            "cache_lookups": self.cache_lookups, "saved_usd": self.saved_usd,
            "guardrail_blocks": self.count("n_blocked"), "rate_limited": self.count("n_rate_limited"),
            "budget_refusals": self.count("n_budget_exceeded"),
        }


# ---------------------------------------------------------------------------- windows and filters


Part = tuple[int, int, int]  # width, first start, end: the rollup rows of one width in a window


def cover(window: Window, widths: Sequence[int] = rollups.WIDTHS) -> tuple[list[Part], list[Window]]:
    """The window as whole rollup units, coarsest first, and the parts no unit covers (read raw)."""
    if not widths:
        return [], [window]
    width = widths[0]
    lo, hi = math.ceil(window.since / width) * width, math.floor(window.until / width) * width
    if lo >= hi:
        return cover(window, widths[1:])
    parts: list[Part] = [(width, lo, hi)]
    raws: list[Window] = []
    for since, until in ((window.since, lo), (hi, window.until)):
        if since < until:
            more, rest = cover(Window(since, until), widths[1:])
            parts += more
            raws += rest
    return parts, raws


def _widths(step: int | None) -> tuple[int, ...]:
    """The rollup widths that fit in a series' buckets (all for a total)."""
    return rollups.WIDTHS if step is None else tuple(w for w in rollups.WIDTHS if step % w == 0)


def _rollup_where(parts: Sequence[Part], filters: Filters) -> list[ColumnElement[bool]]:
    table = request_minutes
    where: list[ColumnElement[bool]] = [or_(*(
        and_(table.c.width == width, table.c.start >= lo, table.c.start < hi) for width, lo, hi in parts))]
    for name in ("tenant", "model", "feature"):
        value = getattr(filters, name)
        if value is not None:
            where.append(table.c[name] == value)
    return where


def raw_where(window: Window, filters: Filters) -> list[ColumnElement[bool]]:
    """The `requests` conditions of a window and filters. The tenant, model and feature are compared
    through coalesce(), which keeps the planners off their indexes: each matches a large share of
    the log, so reading the window by `started_at` (newest first for the search) is the cheaper path
    (SQLite would otherwise read every call of a model to keep a minute's worth)."""
    where = [requests.c.started_at >= window.since, requests.c.started_at < window.until]
    for name in ("tenant", "model", "feature"):
        value = getattr(filters, name)
        if value is not None:
            where.append(func.coalesce(requests.c[name], "") == value)
    return where


def _edge_rows(conn: Connection, raws: Sequence[Window], filters: Filters) -> list[Mapping[Any, Any]]:
    columns = [requests.c[name] for name in rollups.ROW_COLUMNS]
    rows: list[Mapping[Any, Any]] = []
    for part in raws:
        rows += conn.execute(select(*columns).where(*raw_where(part, filters))).mappings().all()
    return rows


def choose_step(window: Window) -> int:
    """The bucket width of a series over the window: whole minutes, at most MAX_BUCKETS buckets."""
    span = max(window.until - window.since, MINUTE)
    for step in STEPS:
        if span / step <= MAX_BUCKETS:
            return step
    return STEPS[-1]


# ---------------------------------------------------------------------------- aggregates


_SUMMED = (*rollups.COUNT_COLUMNS, *rollups.SUM_COLUMNS)


def _rollup_sums(
    conn: Connection, parts: Sequence[Part], filters: Filters, group: ColumnElement[Any] | None,
) -> dict[Any, Agg]:
    out: dict[Any, Agg] = {}
    if not parts:
        return out
    table = request_minutes
    sums = [func.sum(table.c[name]).label(name) for name in _SUMMED]
    query: Select[Any] = select(*sums).where(*_rollup_where(parts, filters))
    if group is not None:
        query = select(group.label("g"), *sums).where(*_rollup_where(parts, filters)).group_by(group)
    for row in conn.execute(query).mappings():
        if row["requests"] is None:
            continue
        agg = Agg()
        agg.add_stored(row)
        out[row["g"] if group is not None else None] = agg
    return out


def _rollup_hists(conn: Connection, parts: Sequence[Part], filters: Filters, step: int | None) -> dict[int | None, Agg]:
    out: dict[int | None, Agg] = {}
    if not parts:
        return out
    table = request_minutes
    query = select(table.c.start, table.c.latency_hist, table.c.ttft_hist).where(
        *_rollup_where(parts, filters), table.c.attempted > 0)
    for start, latency, ttft in conn.execute(query):
        key = None if step is None else int(start) // step * step
        agg = out.get(key)
        if agg is None:
            agg = out[key] = Agg()
        rollups.decode_hist(latency, agg.latency)
        rollups.decode_hist(ttft, agg.ttft)
    return out


def _exact_latencies(conn: Connection, window: Window, filters: Filters) -> list[tuple[float, float, float | None]]:
    query = select(requests.c.started_at, requests.c.latency_ms, requests.c.ttft_ms).where(
        *raw_where(window, filters), requests.c.outcome.not_in(NOT_ATTEMPTED))
    return [(float(s), float(lat), None if t is None else float(t)) for s, lat, t in conn.execute(query)]


def figures(conn: Connection, window: Window, filters: Filters = Filters()) -> Figures:
    """The window's totals and percentiles."""
    return _figures(conn, window, filters, None).get(None) or Figures()


def totals(conn: Connection, window: Window, filters: Filters = Filters()) -> Figures:
    """The window's counts and sums only (no percentiles: those read latencies or histograms)."""
    return _figures(conn, window, filters, None, percentiles=False).get(None) or Figures()


def series(conn: Connection, window: Window, filters: Filters, step: int) -> dict[int, Figures]:
    """Figures per bucket of `step` seconds (bucket start -> figures; buckets with no call absent)."""
    found = _figures(conn, window, filters, step)
    return {int(key): value for key, value in found.items() if key is not None}


def _figures(
    conn: Connection, window: Window, filters: Filters, step: int | None, percentiles: bool = True,
) -> dict[int | None, Figures]:
    table = request_minutes
    parts, raws = cover(window, _widths(step))
    group = None if step is None else (table.c.start // step) * step
    aggs: dict[int | None, Agg] = {
        (None if key is None else int(key)): agg for key, agg in _rollup_sums(conn, parts, filters, group).items()}
    for row in _edge_rows(conn, raws, filters):  # counted as the rollups count them
        key = None if step is None else int(float(row["started_at"]) // step * step)
        agg = aggs.get(key)
        if agg is None:
            agg = aggs[key] = Agg()
        agg.add_row(row)
    attempted = sum(agg.counts.get("attempted", 0) for agg in aggs.values())
    out = {key: Figures(agg) for key, agg in aggs.items()}
    if not percentiles:
        return out
    if attempted <= EXACT_LIMIT:
        values: dict[int | None, tuple[list[float], list[float]]] = {}
        for started, latency, ttft in _exact_latencies(conn, window, filters):
            key = None if step is None else int(started // step * step)
            lat, ttfts = values.setdefault(key, ([], []))
            lat.append(latency)
            if ttft is not None:
                ttfts.append(ttft)
        for key, (lat, ttfts) in values.items():
            lat.sort()
            ttfts.sort()
            figures_ = out.setdefault(key, Figures())
            figures_.p50_ms, figures_.p99_ms = percentile(lat, 0.50), percentile(lat, 0.99)
            figures_.ttft_p50_ms = percentile(ttfts, 0.50)
            figures_.latencies = lat
        return out
    for key, agg in _rollup_hists(conn, parts, filters, step).items():
        out.setdefault(key, Figures()).agg.latency.update(agg.latency)
        out[key].agg.ttft.update(agg.ttft)
    for figures_ in out.values():
        figures_.p50_ms = hist_percentile(figures_.agg.latency, 0.50)
        figures_.p99_ms = hist_percentile(figures_.agg.latency, 0.99)
        figures_.ttft_p50_ms = hist_percentile(figures_.agg.ttft, 0.50)
    return out


# ---------------------------------------------------------------------------- breakdowns

ROLLED_UP = ("model", "feature", "tenant")  # dimensions the rollups are keyed by
# Dimensions read from `requests` (column, or the prompt's "name@version").
RAW_DIMENSIONS = {"user": "user", "key": "key_id", "dialect": "dialect", "prompt": "prompt"}
# Of those, the ones usage_rollups keeps (read from it unless a model or feature filter is set).
USAGE_ROLLED_UP = usage_rollups.DIMENSIONS


def usage(conn: Connection, dimension: str, window: Window, filters: Filters = Filters()) -> list[Usage]:
    """Tokens, spend, mean latency and error rate per value of a dimension, by spend: feature,
    model, tenant from request_minutes; user, key, prompt from usage_hours (from `requests` when
    filtered by model or feature, which that table is not keyed by); dialect from `requests`. The
    window's ends that no rollup unit covers are read from `requests`."""
    if dimension in ROLLED_UP:
        parts, raws = cover(window)
        aggs = _rollup_sums(conn, parts, filters, request_minutes.c[dimension])
        by_name: dict[str | None, Agg] = {(name or None): agg for name, agg in aggs.items()}
        for row in _edge_rows(conn, raws, filters):
            by_name.setdefault(row[dimension] or None, Agg()).add_row(row)
    elif dimension in USAGE_ROLLED_UP and filters.model is None and filters.feature is None:
        parts, raws = cover(window, usage_rollups.WIDTHS)
        by_name = _usage_rollup_sums(conn, dimension, parts, filters.tenant)
        _add(by_name, _raw_sums(conn, dimension, raws, filters))
    elif dimension in RAW_DIMENSIONS:
        by_name = _raw_sums(conn, dimension, [window], filters)
    else:
        raise ValueError(f"no breakdown by {dimension!r}; use one of {', '.join((*ROLLED_UP, *RAW_DIMENSIONS))}")
    rows = [_usage_of(name, agg) for name, agg in by_name.items()]
    rows.sort(key=lambda row: (-row.cost_usd, -row.requests, row.name or ""))
    return rows


def _usage_of(name: str | None, agg: Agg) -> Usage:
    counts = agg.counts
    attempted = counts.get("attempted", 0)
    return Usage(
        name, counts.get("requests", 0), counts.get("prompt_tokens", 0), counts.get("completion_tokens", 0),
        counts.get("cached_tokens", 0), agg.sums["cost_usd"], attempted,
        sum(counts.get(f"n_{o}", 0) for o in SERVER_ERRORS),
        agg.sums["latency_sum_ms"] / attempted if attempted else None,
    )


def _add(into: dict[str | None, Agg], more: Mapping[str | None, Agg]) -> None:
    for name, agg in more.items():
        into.setdefault(name, Agg()).merge(agg)


def _usage_rollup_sums(
    conn: Connection, dimension: str, parts: Sequence[Part], tenant: str | None,
) -> dict[str | None, Agg]:
    """usage_hours' sums per value over whole units (its '' is "none": None)."""
    out: dict[str | None, Agg] = {}
    table = usage_hours
    # One query per part: each reads one range of the primary key (dimension, width, start); an OR
    # of the parts in one query reads every row of the dimension (SQLite's plan).
    for width, lo, hi in parts:
        where = [table.c.dimension == dimension, table.c.width == width, table.c.start >= lo, table.c.start < hi]
        if tenant is not None:
            where.append(table.c.tenant == tenant)
        query = select(table.c.value, *(func.sum(table.c[name]).label(name) for name in usage_rollups.COLUMNS)).where(
            *where).group_by(table.c.value)
        for row in conn.execute(query).mappings():
            value = row["value"] or None
            if value not in out:
                out[value] = Agg()
            out[value].add_stored(row)  # usage_hours' columns are request_minutes' own names
    return out


def _raw_sums(
    conn: Connection, dimension: str, windows: Sequence[Window], filters: Filters,
) -> dict[str | None, Agg]:
    """Sums per value of a dimension straight from `requests` (a GROUP BY in the database),
    counted as the rollups count them ('' and no value alike: None)."""
    out: dict[str | None, Agg] = {}
    attempted = requests.c.outcome.not_in(NOT_ATTEMPTED)
    column: ColumnElement[Any] = requests.c[RAW_DIMENSIONS[dimension]]
    if dimension == "prompt":  # null when the call named no prompt
        column = (requests.c.prompt + "@" + requests.c.prompt_version).label("prompt")
    for window in windows:
        query = (
            select(
                column,
                func.count(),
                func.coalesce(func.sum(requests.c.prompt_tokens), 0),
                func.coalesce(func.sum(requests.c.completion_tokens), 0),
                func.coalesce(func.sum(requests.c.cached_tokens), 0),
                func.coalesce(func.sum(requests.c.cost_usd), 0.0),
                func.sum(case((attempted, 1), else_=0)),
                func.sum(case((requests.c.outcome.in_(SERVER_ERRORS), 1), else_=0)),
                func.sum(case((attempted, requests.c.latency_ms), else_=0.0)),
            )
            .where(*raw_where(window, filters))
            .group_by(column)
        )
        for name, count, prompt, completion, cached, cost, tried, failed, latency in conn.execute(query):
            agg = Agg()
            agg.counts.update({"requests": int(count), "prompt_tokens": int(prompt),
                               "completion_tokens": int(completion), "cached_tokens": int(cached),
                               "attempted": int(tried or 0), "n_error": int(failed or 0)})
            agg.sums["cost_usd"] = float(cost)
            agg.sums["latency_sum_ms"] = float(latency or 0.0)
            out.setdefault(name or None, Agg()).merge(agg)
    return out


def unpriced(conn: Connection, window: Window, filters: Filters = Filters()) -> dict[str | None, int]:
    """The calls answered by a deployment with no known price (their cost is unknown, not 0), per
    deployment, most first: read through the partial index over those rows only."""
    query = (
        select(requests.c.deployment, func.count())
        .where(requests.c.cost_unpriced, *raw_where(window, filters))
        .group_by(requests.c.deployment)
    )
    found = {name: int(count) for name, count in conn.execute(query)}
    return dict(sorted(found.items(), key=lambda item: (-item[1], item[0] or "")))


def cache_usage(conn: Connection, window: Window, filters: Filters = Filters()) -> list[CacheUsage]:
    """Hits, misses, bypasses and the money saved, per model (models that used the cache only)."""
    parts, raws = cover(window)
    aggs = _rollup_sums(conn, parts, filters, request_minutes.c.model)
    by_model: dict[str | None, Agg] = {(name or None): agg for name, agg in aggs.items()}
    for row in _edge_rows(conn, raws, filters):
        by_model.setdefault(row["model"] or None, Agg()).add_row(row)
    rows = []
    for model, agg in by_model.items():
        c = agg.counts
        found = CacheUsage(model, c.get("cache_hits", 0), c.get("cache_misses", 0), c.get("cache_bypasses", 0),
                           agg.sums["saved_usd"], c.get("cache_semantic_hits", 0))
        if found.calls:
            rows.append(found)
    rows.sort(key=lambda row: (-row.saved_usd, -row.calls, row.model or ""))
    return rows


def filter_values(conn: Connection, window: Window, tenant: str | None) -> dict[str, list[str]]:
    """The models, features and tenants seen in the window (for the pickers)."""
    parts = [(w, lo, hi) for w, lo, hi in cover(_outer(window))[0]]
    out: dict[str, list[str]] = {}
    for name in ("model", "feature", "tenant"):
        column = request_minutes.c[name]
        query = select(column).where(*_rollup_where(parts, Filters(tenant=tenant))).distinct()
        out[name + "s"] = sorted(value for (value,) in conn.execute(query) if value)
    return out


def _outer(window: Window) -> Window:
    """The window widened to whole minutes."""
    return Window(math.floor(window.since / MINUTE) * MINUTE, math.ceil(window.until / MINUTE) * MINUTE)


# ---------------------------------------------------------------------------- the log itself


@dataclass(frozen=True, slots=True)
class Search:
    """What the request log page asks for; None: any."""

    q: str | None = None
    status: int | None = None
    outcome: str | None = None
    user: str | None = None
    cache: str | None = None  # a cache_status, or "hit" for either kind of hit
    guardrail: str | None = None  # "any", or an action: block | redact | flag
    limit: int = 50
    before: tuple[float, str] | None = None  # keyset cursor: (started_at, request_id), exclusive


LIST_COLUMNS = (
    "request_id", "started_at", "model", "feature", "user", "tenant", "status", "outcome", "cache_status",
    "latency_ms", "cost_usd", "prompt_tokens", "completion_tokens", "trace_id", "guardrails", "input",
)
PREVIEW_CHARS = 120
_ACTION_RANK = {"block": 3, "redact": 2, "flag": 1}


def search(
    conn: Connection, window: Window, filters: Filters, ask: Search,
) -> tuple[list[dict[str, Any]], tuple[float, str] | None]:
    """A page of the log, newest first, and the cursor of the next page (None: no more).

    Without `q`, the page is the newest `limit` rows matching the filters (the started_at index
    read backwards). With `q`, a case-insensitive substring of the stored (redacted) input or
    output: at most SEARCH_SCAN of the newest matching rows are read per page, so a rare word
    answers in bounded time; `next` then points past the rows read, to search further back.
    """
    where = raw_where(window, filters)
    if ask.before is not None:
        started, request_id = ask.before
        where.append(or_(requests.c.started_at < started,
                         and_(requests.c.started_at == started, requests.c.request_id < request_id)))
    for name, value in (("status", ask.status), ("outcome", ask.outcome), ("user", ask.user)):
        if value is not None:
            where.append(requests.c[name] == value)
    if ask.cache is not None:
        cache = requests.c.cache_status
        where.append(cache.like("hit%") if ask.cache == "hit" else cache == ask.cache)
    if ask.guardrail is not None:
        verdicts = cast(requests.c.guardrails, Text)
        if ask.guardrail == "any":
            where.append(and_(requests.c.guardrails.is_not(None), verdicts != "[]"))
        else:
            where.append(verdicts.like(f'%"action":"{_like_escape(ask.guardrail)}"%', escape="\\"))
    order = (requests.c.started_at.desc(), requests.c.request_id.desc())
    columns = [requests.c[name] for name in LIST_COLUMNS]
    limit = max(1, min(ask.limit, 500))
    if not ask.q:
        rows = conn.execute(select(*columns).where(*where).order_by(*order).limit(limit + 1)).mappings().all()
        page = [_listed(row) for row in rows[:limit]]
        more = len(rows) > limit
        return page, ((page[-1]["started_at"], page[-1]["request_id"]) if more and page else None)
    # The newest SEARCH_SCAN rows first (a LIMIT in a subquery: the planner cannot push the text
    # match below it), then the text match over them only.
    scanned = (
        select(*columns, requests.c.output).where(*where).order_by(*order).limit(SEARCH_SCAN).subquery("scanned")
    )
    needle = f"%{_like_escape(ask.q)}%"
    text_match = or_(cast(scanned.c.input, Text).ilike(needle, escape="\\"),
                     cast(scanned.c.output, Text).ilike(needle, escape="\\"))
    query = (
        select(*(scanned.c[name] for name in LIST_COLUMNS)).where(text_match)
        .order_by(scanned.c.started_at.desc(), scanned.c.request_id.desc()).limit(limit + 1)
    )
    rows = conn.execute(query).mappings().all()
    page = [_listed(row) for row in rows[:limit]]
    if len(rows) > limit:
        return page, (page[-1]["started_at"], page[-1]["request_id"])
    # Fewer than a page: everything was searched, or the scan stopped at its last row.
    last = conn.execute(
        select(requests.c.started_at, requests.c.request_id).where(*where).order_by(*order)
        .offset(SEARCH_SCAN - 1).limit(1)
    ).first()
    return page, None if last is None else (float(last[0]), str(last[1]))


def _like_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _listed(row: Mapping[Any, Any]) -> dict[str, Any]:
    out = {name: row[name] for name in LIST_COLUMNS if name not in ("guardrails", "input")}
    out["cache_status"] = row["cache_status"]
    out["guardrail"] = _strongest_verdict(row["guardrails"])
    out["preview"] = preview(row["input"])
    return out


def _strongest_verdict(verdicts: Any) -> str | None:
    """'check:action' of the strongest guardrail action taken (block > redact > flag)."""
    best: tuple[int, str] | None = None
    for verdict in verdicts or ():
        if not isinstance(verdict, dict):
            continue
        rank = _ACTION_RANK.get(str(verdict.get("action")), 0)
        if rank and (best is None or rank > best[0]):
            best = (rank, f"{verdict.get('check')}:{verdict.get('action')}")
    return None if best is None else best[1]


def preview(value: Any) -> str:
    """The first PREVIEW_CHARS characters of a call's input: its last user message's text, or the
    input itself as text."""
    text = _text_of(value)
    return text if len(text) <= PREVIEW_CHARS else text[:PREVIEW_CHARS - 1] + "…"


def _text_of(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(isinstance(m, dict) for m in value):
        for message in reversed(value):
            if message.get("role") == "user":
                return _text_of(message.get("content"))
        return _text_of(value[-1].get("content"))
    if isinstance(value, list):
        parts = [p.get("text") if isinstance(p, dict) else p for p in value]
        return " ".join(str(p) for p in parts if isinstance(p, str))
    if isinstance(value, dict):
        return _text_of(value.get("content") or value.get("messages") or value.get("input"))
    return str(value)


def record(conn: Connection, request_id: str, tenant: str | None) -> dict[str, Any] | None:
    """One whole record; None when missing or (with `tenant`) another tenant's."""
    query = select(requests).where(requests.c.request_id == request_id)
    if tenant is not None:
        query = query.where(requests.c.tenant == tenant)
    row = conn.execute(query).mappings().first()
    return None if row is None else dict(row)


def trace(store: RecordStore, trace_id: str, tenant: str | None) -> list[dict[str, Any]] | None:
    """The spans of a trace in start order; None when no call of it is the tenant's (or it has none)."""
    if tenant is not None:
        with store.connection() as conn:
            owned = conn.execute(
                select(requests.c.request_id).where(requests.c.trace_id == trace_id, requests.c.tenant == tenant)
                .limit(1)).first()
        if owned is None:
            return None
    found = store.spans(trace_id)
    return found or None
