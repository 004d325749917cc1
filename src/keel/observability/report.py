"""`keel report`: latency, errors and cost of a window of the request log against the SLO
targets (`slo:` in keel.yaml), then tokens and spend by feature, model, user and dialect.

What is counted (the outcome classes are the observe stage's; docs/observability.md has the table):
- requests: every record in the window, whatever its outcome;
- attempted: the calls Keel tried to answer (answered, cached, failed, closed by the client), that
  is all but the caller's mistakes (`invalid`) and refusals (blocked, rate-limited, over budget);
- latency P50/P99: over the attempted calls; refusals and rejected requests would flatter the
  figure. Percentiles interpolate linearly between the closest ranks (NumPy's default), exactly
  while the window holds at most 20,000 attempted calls, and beyond that from the per-minute
  rollups' latency histograms, within 2% (keel.observability.queries: the dashboard's figures);
- error rate: the attempted calls whose outcome is `error` (Keel or the upstream failed), over
  the attempted calls: a client's bad request or a spent budget is not a failure of the service;
- cost per request: the window's spend over its requests;
- cache, per model: the calls that went through the cache (cache_status other than `none`), its hits
  (any `hit_*`; the semantic ones also counted apart), misses and bypasses; hit rate = hits / (hits +
  misses), bypasses (`no-cache`, non-deterministic requests) being no lookup; saved = the sum of the
  hits' `cost_saved_usd`.
A row passes when its value is at or under its target; with no call to measure it passes
vacuously and shows n/a.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from keel.config import SLOConfig
from keel.observability import queries
from keel.observability.queries import CacheUsage, Filters, Usage, Window, percentile
from keel.observability.rollups import CLIENT_ERRORS, NOT_ATTEMPTED, REFUSALS, SERVER_ERRORS
from keel.observability.store import RecordStore, StoreError
from keel.wording import counted

# The outcome classes and the figures' rules live with the rollups and the query layer.
__all__ = ["CLIENT_ERRORS", "NOT_ATTEMPTED", "REFUSALS", "SERVER_ERRORS", "CacheUsage", "Usage", "percentile"]
# dialect: the API the client spoke (docs/dialects.md); prompt: the template and version, "name@version".
DIMENSIONS = ("feature", "model", "user", "dialect", "prompt")

_WINDOW = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 604_800}


def parse_window(text: str) -> float:
    """`30m`, `24h`, `7d` (also `s` and `w`) in seconds."""
    match = _WINDOW.match(text.lower())
    if not match or float(match.group(1)) <= 0:
        raise ValueError(
            f"--since must be a positive number followed by s, m, h, d or w (e.g. 30m, 24h, 7d), got {text!r}"
        )
    return float(match.group(1)) * _UNIT_SECONDS[match.group(2)]


@dataclass(frozen=True, slots=True)
class Check:
    """One SLO row: a measured value against its target."""

    name: str  # the JSON key: p50_ms, p99_ms, error_rate, cost_per_request_usd
    label: str
    value: float | None  # None: nothing to measure in the window
    target: float

    @property
    def passed(self) -> bool | None:
        return None if self.value is None else self.value <= self.target


@dataclass(slots=True)
class SLOReport:
    since: float
    until: float
    feature: str | None
    requests: int
    errors: int
    outcomes: dict[str, int]
    attempted: int
    p50_ms: float | None
    p99_ms: float | None
    error_rate: float
    cost_usd: float
    cost_per_request_usd: float
    targets: SLOConfig
    breakdowns: dict[str, list[Usage]] = field(default_factory=dict)  # feature/model/user → rows by spend
    label: str | None = None  # how the window was asked for, e.g. "24h"
    cache: list[CacheUsage] = field(default_factory=list)  # per model; empty when no call used the cache
    # Calls answered by a deployment with no known price, per deployment: their cost is unknown, not 0.
    unpriced: dict[str | None, int] = field(default_factory=dict)

    @property
    def unpriced_calls(self) -> int:
        return sum(self.unpriced.values())

    @property
    def checks(self) -> list[Check]:
        return [
            Check("p50_ms", "latency P50", self.p50_ms, self.targets.p50_ms),
            Check("p99_ms", "latency P99", self.p99_ms, self.targets.p99_ms),
            Check("error_rate", "error rate", self.error_rate if self.attempted else None, self.targets.error_rate),
            Check(
                "cost_per_request_usd", "cost per request",
                self.cost_per_request_usd if self.requests else None, self.targets.cost_per_request_usd,
            ),
        ]

    @property
    def passed(self) -> bool:
        return all(check.passed is not False for check in self.checks)

    def as_json(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "p50_ms": self.p50_ms,
            "p99_ms": self.p99_ms,
            "error_rate": self.error_rate,
            "cost_per_request_usd": self.cost_per_request_usd,
            "targets": {check.name: check.target for check in self.checks},
            "pass": self.passed,
            "checks": {check.name: {"value": check.value, "target": check.target, "pass": check.passed}
                       for check in self.checks},
            "window": {"since": _iso(self.since), "until": _iso(self.until), "label": self.label,
                       "feature": self.feature},
            "errors": self.errors,
            "attempted": self.attempted,
            "cost_usd": self.cost_usd,
            "outcomes": self.outcomes,
            **{
                f"by_{dimension}": [
                    {dimension: row.name, "requests": row.requests, "prompt_tokens": row.prompt_tokens,
                     "completion_tokens": row.completion_tokens, "cached_tokens": row.cached_tokens,
                     "cost_usd": row.cost_usd, "mean_latency_ms": row.latency_ms, "error_rate": row.error_rate}
                    for row in rows
                ]
                for dimension, rows in self.breakdowns.items()
            },
            "cache": [row.as_json() for row in self.cache],
            "unpriced_calls": self.unpriced_calls,
            "unpriced_by_deployment": [{"deployment": name, "calls": n} for name, n in self.unpriced.items()],
        }


def build_report(
    store: RecordStore,
    *,
    since: float,
    until: float | None = None,
    feature: str | None = None,
    slo: SLOConfig | None = None,
    label: str | None = None,
) -> SLOReport:
    """The SLO report of the records that started in [since, until) (unix seconds), through the
    dashboard's queries (keel.observability.queries)."""
    until = time.time() if until is None else until
    window, filters = Window(since, until), Filters(feature=feature)
    with store.connection() as conn:
        found = queries.figures(conn, window, filters)
        breakdowns = {dimension: queries.usage(conn, dimension, window, filters) for dimension in DIMENSIONS}
        cache = queries.cache_usage(conn, window, filters)
        unpriced = queries.unpriced(conn, window, filters)
    total = found.requests
    errors, attempted, cost = found.errors, found.attempted, found.cost_usd
    return SLOReport(
        since=since,
        until=until,
        feature=feature,
        requests=total,
        errors=errors,
        outcomes=found.outcomes,
        attempted=attempted,
        p50_ms=found.p50_ms,
        p99_ms=found.p99_ms,
        error_rate=errors / attempted if attempted else 0.0,
        cost_usd=cost,
        cost_per_request_usd=cost / total if total else 0.0,
        targets=slo or SLOConfig(),
        breakdowns=breakdowns,
        label=label,
        cache=cache,
        unpriced=unpriced,
    )


def open_log(url: str, named_by: str = "store.url in keel.yaml") -> RecordStore:
    """The request log to report on; a clear error when there is none yet at that URL (a report
    never creates an empty database). `named_by` says where the URL came from, for the message."""
    path = sqlite_file(url)
    if path is not None and not path.exists():
        raise StoreError(
            f"no request log at {path} ({named_by}); `keel serve` creates it on its first call, "
            "relative to the directory it runs in: run the report from there, or name its config with --config"
        )
    store = RecordStore(url)
    try:
        has_schema = store.has_schema()
    except StoreError:
        store.close()
        raise
    if not has_schema:
        store.close()
        raise StoreError(
            f"the request log at {store.safe_url} has no tables yet: start `keel serve` once against it, "
            f"or check {named_by}"
        )
    return store


def sqlite_file(url: str) -> Path | None:
    """The file of a sqlite:/// URL; None for other URLs and in-memory databases."""
    if not url.startswith("sqlite:"):
        return None
    try:
        database = make_url(url).database
    except ArgumentError:
        return None  # RecordStore says what is wrong with it
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return Path(database).expanduser().absolute()


# ---------------------------------------------------------------------------- output


def render_json(report: SLOReport) -> str:
    return orjson.dumps(report.as_json(), option=orjson.OPT_INDENT_2).decode()


def render_table(report: SLOReport, top: int = 20) -> RenderableType:
    """Rich tables: the SLO rows with PASS/FAIL in colour, then the breakdowns."""
    slo = Table(title=_title(report), title_justify="left", expand=False)
    for header, justify in (("metric", "left"), ("value", "right"), ("target", "right"), ("result", "center")):
        slo.add_column(header, justify=justify)  # type: ignore[arg-type]
    for check in report.checks:
        slo.add_row(check.label, _value(check.name, check.value), "≤ " + _value(check.name, check.target),
                    _verdict(check.passed))
    summary = Text(_summary(report), style="dim")
    parts: list[RenderableType] = [slo, summary]
    if report.unpriced:
        parts.append(Text(_unpriced(report), style="bold yellow"))
    for dimension, rows in report.breakdowns.items():
        table = Table(title=f"By {dimension}", title_justify="left")
        table.add_column(dimension)
        for header in USAGE_HEADERS:
            table.add_column(header, justify="right")
        for row in _top(rows, top):
            table.add_row(*_usage_cells(row, dimension))
        parts.append(table)
    if report.cache:
        table = Table(title="Cache", title_justify="left")
        table.add_column("model")
        for header in CACHE_HEADERS:
            table.add_column(header, justify="right")
        for cache in report.cache:
            table.add_row(*_cache_cells(cache))
        parts.append(table)
    return Group(*parts)


def render_markdown(report: SLOReport, top: int = 20) -> str:
    lines = [f"## {_title(report)}", "", "| metric | value | target | result |", "|---|---:|---:|:---:|"]
    for check in report.checks:
        verdict = {True: "PASS", False: "**FAIL**", None: "n/a"}[check.passed]
        lines.append(
            f"| {check.label} | {_value(check.name, check.value)} | ≤ {_value(check.name, check.target)} | {verdict} |"
        )
    lines += ["", _summary(report)]
    if report.unpriced:
        lines += ["", f"**{_unpriced(report)}**"]
    for dimension, rows in report.breakdowns.items():
        header = f"| {dimension} | " + " | ".join(USAGE_HEADERS) + " |"
        lines += ["", f"### By {dimension}", "", header, "|---|" + "---:|" * len(USAGE_HEADERS)]
        for row in _top(rows, top):
            cells = [cell.replace("|", "\\|") for cell in _usage_cells(row, dimension)]
            lines.append("| " + " | ".join(cells) + " |")
    if report.cache:
        lines += ["", "### Cache", "", "| model | " + " | ".join(CACHE_HEADERS) + " |", "|---|---:|---:|---:|---:|"]
        for cache in report.cache:
            lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in _cache_cells(cache)) + " |")
    return "\n".join(lines)


def _summary(report: SLOReport) -> str:
    return (
        f"{counted(report.requests, 'request')} ({report.attempted:,} attempted), "
        f"{counted(report.errors, 'error')}, spend {_usd(report.cost_usd)}"
        + (f"; outcomes: {_outcomes(report)}" if report.outcomes else "")
    )


def _unpriced(report: SLOReport) -> str:
    """The calls whose cost is unknown: the spend above leaves them out (they are not free)."""
    where = ", ".join(f"{name or '(no deployment)'} {n:,}" for name, n in report.unpriced.items())
    return (
        f"{counted(report.unpriced_calls, 'call')} answered by a deployment with no known price ({where}): "
        "their cost is unknown, not $0, and not in the spend above; set the deployment's price: or add the "
        "model under pricing: in keel.yaml"
    )


def _title(report: SLOReport) -> str:
    window = f"last {report.label}" if report.label else f"since {_iso(report.since)}"
    scope = f", feature {report.feature}" if report.feature is not None else ""
    verdict = "PASS" if report.passed else "FAIL"
    return f"Keel SLO report: {window}{scope} ({verdict})"


def _top(rows: list[Usage], top: int) -> list[Usage]:
    if top <= 0 or len(rows) <= top:
        return rows
    rest = rows[top:]
    timed = [r for r in rest if r.latency_ms is not None]
    latency = sum(r.latency_ms * r.attempted for r in timed if r.latency_ms is not None) / max(
        1, sum(r.attempted for r in timed)) if timed else None
    other = Usage(
        f"({len(rest)} more)", sum(r.requests for r in rest), sum(r.prompt_tokens for r in rest),
        sum(r.completion_tokens for r in rest), sum(r.cached_tokens for r in rest), sum(r.cost_usd for r in rest),
        sum(r.attempted for r in rest), sum(r.errors for r in rest), latency,
    )
    return [*rows[:top], other]


def _usage_cells(row: Usage, dimension: str) -> list[str]:
    if row.name is not None:
        name = row.name
    else:  # a call with no dialect was made in-process, through the library
        name = "(library)" if dimension == "dialect" else f"(no {dimension})"
    latency = "n/a" if row.latency_ms is None else f"{row.latency_ms:,.0f} ms"
    errors = "n/a" if row.error_rate is None else f"{row.error_rate * 100:.1f}%"
    return [name, f"{row.requests:,}", f"{row.prompt_tokens:,}", f"{row.completion_tokens:,}", _usd(row.cost_usd),
            latency, errors]


USAGE_HEADERS = ("requests", "prompt tokens", "completion tokens", "spend", "mean latency", "error rate")


CACHE_HEADERS = ("calls", "hit rate", "semantic hits", "bypasses", "saved")


def _cache_cells(row: CacheUsage) -> list[str]:
    """model, calls through the cache, hit rate (with hits/lookups), semantic hits, bypasses, money saved."""
    rate = "n/a" if row.hit_rate is None else f"{row.hit_rate * 100:.1f}% ({row.hits:,}/{row.hits + row.misses:,})"
    return [row.model if row.model is not None else "(no model)", f"{row.calls:,}", rate, f"{row.semantic_hits:,}",
            f"{row.bypasses:,}", _usd(row.saved_usd)]


def _verdict(passed: bool | None) -> Text:
    if passed is None:
        return Text("n/a", style="dim")
    return Text("PASS", style="bold green") if passed else Text("FAIL", style="bold red")


def _value(name: str, value: float | None) -> str:
    if value is None:
        return "n/a"
    if name.endswith("_ms"):
        return f"{value:,.0f} ms" if value >= 10 else f"{value:.1f} ms"
    if name == "error_rate":
        return f"{value * 100:.2f}%"
    return _usd(value)


def _usd(value: float) -> str:
    """Dollars and cents; below a dollar, down to a millionth (per-request costs are small)."""
    if value >= 1 or value == 0:
        return f"${value:,.2f}"
    digits = f"{value:.6f}".rstrip("0")
    return "$" + (digits if len(digits.split(".")[1]) >= 2 else f"{value:.2f}")


def _outcomes(report: SLOReport) -> str:
    return ", ".join(f"{name} {count:,}" for name, count in report.outcomes.items())


def _iso(unix: float) -> str:
    return datetime.fromtimestamp(unix, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
