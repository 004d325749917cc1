"""The dashboard's JSON API (`/dashboard/api/...`): what the pages draw, read from the request log
through keel.observability.queries, the queries `keel report` uses.

Every handler runs its (synchronous, database-bound) query in a worker thread. Scoping: a tenant
admin sees its tenant only (`caller_tenant`); the master key sees all, or one with `tenant=`.
docs/dashboard.md (## API) lists the endpoints; notes/dashboard-contract.md their shapes.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from fastapi import APIRouter, Depends, Request

from keel.auth.admin import caller_tenant
from keel.config import SLOConfig
from keel.errors import InvalidRequest, KeelError
from keel.observability import queries
from keel.observability.queries import Figures, Filters, Search, Window
from keel.observability.store import RecordStore

DEFAULT_WINDOW_S = 3600.0
MAX_WINDOW_S = 366 * 86_400.0
T = TypeVar("T")


class NotFound(KeelError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


def _served_store(request: Request) -> RecordStore:
    from keel.server.calls import served_by

    return served_by(request).keel.writer.store


def _served_slo(request: Request) -> SLOConfig:
    from keel.server.calls import served_by

    return served_by(request).keel.config.slo


def dashboard_api_router(
    store_of: Callable[[Request], RecordStore] = _served_store,
    auth: Callable[..., Any] | None = None,
    slo_of: Callable[[Request], SLOConfig] = _served_slo,
) -> APIRouter:
    """The API's routes behind `auth` (the admin dependency: master key, tenant admin key or the
    dashboard's session). `store_of` and `slo_of` find the request log and the SLO targets of the
    gateway serving a request."""
    router = APIRouter(prefix="/dashboard/api", dependencies=[Depends(auth)] if auth is not None else [])

    async def run(request: Request, work: Callable[[RecordStore], T]) -> T:
        store = store_of(request)
        return await asyncio.to_thread(work, store)

    @router.get("/overview")
    async def overview(request: Request) -> dict[str, Any]:
        window, filters = window_of(request), filters_of(request)
        slo = slo_of(request)
        return await run(request, lambda store: overview_json(store, window, filters, slo))

    @router.get("/filters")
    async def filter_values(request: Request) -> dict[str, Any]:
        window, tenant = window_of(request), caller_tenant(request)

        def work(store: RecordStore) -> dict[str, Any]:
            with store.connection() as conn:
                found = queries.filter_values(conn, window, tenant)
            if tenant is not None:
                del found["tenants"]
            return found

        return await run(request, work)

    @router.get("/cost")
    async def cost(request: Request) -> dict[str, Any]:
        window, filters = window_of(request), filters_of(request)
        return await run(request, lambda store: cost_json(store, window, filters, time.time()))

    @router.get("/requests")
    async def search(request: Request) -> dict[str, Any]:
        window, filters, ask = window_of(request), filters_of(request), search_of(request)

        def work(store: RecordStore) -> dict[str, Any]:
            with store.connection() as conn:
                page, after = queries.search(conn, window, filters, ask)
            return {"data": page, "next": None if after is None else f"{after[0]!r}:{after[1]}"}

        return await run(request, work)

    @router.get("/requests/{request_id}")
    async def one(request: Request, request_id: str) -> dict[str, Any]:
        tenant = caller_tenant(request)

        def work(store: RecordStore) -> dict[str, Any] | None:
            with store.connection() as conn:
                return queries.record(conn, request_id, tenant)

        found = await run(request, work)
        if found is None:
            raise NotFound(f"No request {request_id!r} in the log (or it is another tenant's).", param="request_id")
        return found

    @router.get("/traces/{trace_id}")
    async def trace(request: Request, trace_id: str) -> dict[str, Any]:
        tenant = caller_tenant(request)
        found = await run(request, lambda store: queries.trace(store, trace_id, tenant))
        if found is None:
            raise NotFound(f"No trace {trace_id!r} in the log (or it is another tenant's).", param="trace_id")
        keep = ("span_id", "parent_id", "name", "started_at", "ended_at", "status", "attributes", "request_id")
        return {"trace_id": trace_id, "spans": [{name: span.get(name) for name in keep} for span in found]}

    @router.get("/quality")
    async def quality(request: Request) -> dict[str, Any]:
        window, tenant = window_of(request), caller_tenant(request)
        return await run(request, lambda store: quality_json(store, window, tenant))

    @router.get("/drift")
    async def drift(request: Request) -> dict[str, Any]:
        window, tenant = window_of(request), caller_tenant(request)
        return await run(request, lambda store: drift_json(store, window, tenant))

    return router


# ---------------------------------------------------------------------------- parameters


def _number(request: Request, name: str) -> float | None:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return None
    try:
        value = float(raw)
    except ValueError:
        raise InvalidRequest(f"{name} must be a number (unix seconds), got {raw!r}.", param=name) from None
    if not math.isfinite(value) or value < 0:
        raise InvalidRequest(f"{name} must be a finite, non-negative number, got {raw!r}.", param=name)
    return value


def window_of(request: Request, now: float | None = None) -> Window:
    """`since` and `until` (unix seconds): until defaults to now, since to an hour before it."""
    until = _number(request, "until")
    until = (time.time() if now is None else now) if until is None else until
    since = _number(request, "since")
    since = until - DEFAULT_WINDOW_S if since is None else since
    if since >= until:
        raise InvalidRequest(f"since ({since}) must be before until ({until}).", param="since")
    if until - since > MAX_WINDOW_S:
        raise InvalidRequest("The window is longer than a year; ask for a shorter one.", param="since")
    return Window(since, until)


def filters_of(request: Request) -> Filters:
    """`model`, `feature` and, for the master key only, `tenant`; a tenant admin is kept to its tenant."""
    params = request.query_params
    own = caller_tenant(request)
    asked = params.get("tenant") or None
    if own is not None and asked is not None and asked != own:
        raise InvalidRequest(f"A tenant admin sees its own tenant ('{own}') only.", param="tenant")
    return Filters(tenant=own or asked, model=params.get("model") or None, feature=params.get("feature") or None)


GUARDRAIL_FILTERS = ("any", "block", "redact", "flag")


def search_of(request: Request) -> Search:
    params = request.query_params
    status = params.get("status") or None
    if status is not None and not status.isdigit():
        raise InvalidRequest(f"status must be an HTTP status code such as 200 or 429, got {status!r}.", param="status")
    guardrail = params.get("guardrail") or None
    if guardrail is not None and guardrail not in GUARDRAIL_FILTERS:
        raise InvalidRequest(f"guardrail must be one of {', '.join(GUARDRAIL_FILTERS)}, got {guardrail!r}.",
                             param="guardrail")
    limit_text = params.get("limit") or "50"
    if not limit_text.isdigit() or not 1 <= int(limit_text) <= 500:
        raise InvalidRequest(f"limit must be a whole number from 1 to 500, got {limit_text!r}.", param="limit")
    return Search(
        q=params.get("q") or None, status=None if status is None else int(status),
        outcome=params.get("outcome") or None, user=params.get("user") or None, cache=params.get("cache") or None,
        guardrail=guardrail, limit=int(limit_text), before=_cursor(params.get("before") or None),
    )


def _cursor(text: str | None) -> tuple[float, str] | None:
    """A `next` cursor as the search returned it: "<started_at>:<request_id>"."""
    if text is None:
        return None
    started, _, request_id = text.partition(":")
    try:
        return float(started), request_id
    except ValueError:
        raise InvalidRequest("before must be the `next` cursor of a previous page.", param="before") from None


# ---------------------------------------------------------------------------- documents


SLO_ROWS = (
    ("p50_ms", "latency P50"), ("p99_ms", "latency P99"), ("error_rate", "error rate"),
    ("cost_per_request_usd", "cost per request"),
)


def slo_rows(found: Figures, slo: SLOConfig) -> list[dict[str, Any]]:
    """The SLO table: value against target, pass/fail and the error budget left.

    The budget of a latency percentile q is the share of calls allowed over its target (1 - q);
    of the error rate, the target itself; of the cost, the target per request. Left is 1 minus the
    share of it spent: 1 when untouched, 0 when spent, negative when overspent; None with no call.
    """
    values = {
        "p50_ms": found.p50_ms, "p99_ms": found.p99_ms, "error_rate": found.error_rate,
        "cost_per_request_usd": found.cost_usd / found.requests if found.requests else None,
    }
    rows = []
    for name, label in SLO_ROWS:
        value, target = values[name], float(getattr(slo, name))
        left: float | None = None
        if value is not None:
            if name in ("p50_ms", "p99_ms"):
                allowed = 0.5 if name == "p50_ms" else 0.01
                slow = found.share_over(target)
                left = None if slow is None else 1 - slow / allowed
            elif target > 0:
                left = 1 - value / target
        rows.append({"name": name, "label": label, "value": value, "target": target,
                     "passed": None if value is None else value <= target, "error_budget_left": left})
    return rows


def overview_json(store: RecordStore, window: Window, filters: Filters, slo: SLOConfig) -> dict[str, Any]:
    """The Overview page's document: SLO table, totals and the time series."""
    step = queries.choose_step(window)
    with store.connection() as conn:
        found = queries.figures(conn, window, filters)
        buckets = queries.series(conn, window, filters, step)
    starts = list(range(int(window.since // step * step), int(window.until), step))
    series: dict[str, list[Any]] = {name: [] for name in SERIES}
    for start in starts:
        point = buckets.get(start) or Figures()
        totals = point.totals_json()
        series["requests"].append(point.requests)
        series["errors"].append(point.errors)
        series["error_rate"].append(point.error_rate)
        series["p50_ms"].append(point.p50_ms)
        series["p99_ms"].append(point.p99_ms)
        series["ttft_p50_ms"].append(point.ttft_p50_ms)
        series["cost_usd"].append(point.cost_usd)
        series["tokens"].append(totals["prompt_tokens"] + totals["completion_tokens"])
        series["cache_hit_rate"].append(point.cache_hit_rate)
        series["saved_usd"].append(point.saved_usd)
        series["guardrail_blocks"].append(totals["guardrail_blocks"])
        series["rate_limited"].append(totals["rate_limited"])
    return {
        "window": {"since": window.since, "until": window.until, "step_s": step},
        "slo": slo_rows(found, slo),
        "totals": found.totals_json(),
        "series": {"t": starts, **series},
    }


SERIES = ("requests", "errors", "error_rate", "p50_ms", "p99_ms", "ttft_p50_ms", "cost_usd", "tokens",
          "cache_hit_rate", "saved_usd", "guardrail_blocks", "rate_limited")
COST_DIMENSIONS = ("feature", "model", "user", "key", "prompt")


def cost_json(store: RecordStore, window: Window, filters: Filters, now: float) -> dict[str, Any]:
    """The Cost page's document: spend by feature, model, user, key and prompt version, and the
    forecast to the window's end (its spend so far, plus its rate so far over the time left)."""
    with store.connection() as conn:
        found = queries.totals(conn, window, filters)
        by = {name: [row.as_json() for row in queries.usage(conn, name, window, filters)] for name in COST_DIMENSIONS}
    elapsed = min(now, window.until) - window.since
    left = max(0.0, window.until - max(now, window.since))
    projected = found.cost_usd + (found.cost_usd / elapsed * left if elapsed > 0 else 0.0)
    return {
        "window": {"since": window.since, "until": window.until},
        "total_usd": found.cost_usd,
        "by": by,
        "forecast": {"window_end": window.until, "projected_usd": projected},
    }


def quality_json(store: RecordStore, window: Window, tenant: str | None) -> dict[str, Any]:
    """The Quality page's document: eval runs (newest first), each judge's agreement with the
    reviewers, and drift of the window against the week before it (master key only: drift reads
    every tenant's calls)."""
    from keel.evals.drift import build_drift
    from keel.evals.judge_trust import agreement_by_judge
    from keel.evals.results import EvalStore
    from keel.evals.review import ReviewQueue

    runs = [] if tenant is not None else [  # eval runs belong to no tenant: the master key's
        {"id": run.id, "suite": run.suite, "started_at": run.started_at, "ended_at": run.ended_at,
         "status": run.status, "summary": run.summary, "passed": _passed(run.summary)}
        for run in EvalStore(store).runs(limit=50)
    ]
    pairs = ReviewQueue(store).labelled_pairs(tenant=tenant)
    agreement = [
        {"judge": judge, "n": found.n, "accuracy": found.accuracy, "kappa": found.kappa,
         "kappa_low": found.kappa_low, "kappa_high": found.kappa_high}
        for judge, found in agreement_by_judge(pairs).items()
    ]
    drift: list[dict[str, Any]] = []
    if tenant is None:
        report = build_drift(store, window=(window.since, window.until), baseline=drift_baseline(window))
        drift = [{**row.as_json(), "alert": row.verdict == "drift"} for row in report.rows]
    return {"runs": runs, "agreement": agreement, "drift": drift}


def drift_baseline(window: Window) -> tuple[float, float]:
    """What the Quality page compares a window with: the week before it (or as long as it, if longer)."""
    span = window.until - window.since
    return window.since - max(span, 7 * 86_400.0), window.since


def drift_json(store: RecordStore, window: Window, tenant: str | None) -> dict[str, Any]:
    """The Quality page's drift charts: the window in at most 24 buckets (whole minutes), each compared with the
    baseline as `keel drift` compares (keel.evals.drift.drift_series); master key only, as the
    drift table (`lines` is null for a tenant admin)."""
    from keel.evals.drift import chart_step, drift_series

    if tenant is not None:
        return {"lines": None}
    step = chart_step(window.since, window.until, queries.STEPS)
    found = drift_series(store, window=(window.since, window.until), baseline=drift_baseline(window), step_s=step)
    return found.as_json()


def _passed(summary: Mapping[str, Any] | None) -> bool | None:
    if not summary:
        return None
    value = summary.get("passed")
    return value if isinstance(value, bool) else None
