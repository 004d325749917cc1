"""`keel drift`: the drift table of the request log (docs/drift.md). Exit codes: 0, 1 with --check when
something drifted (or the log cannot be read), 2 bad input."""

from __future__ import annotations

import asyncio
import sys
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    from keel.embedding.model import SentenceEmbedder
    from keel.evals.drift import Embed


class DriftFormat(StrEnum):
    table = "table"
    json = "json"
    markdown = "markdown"


def drift(
    config: Annotated[Path | None, typer.Option(
        "--config", "-c", help="keel.yaml: its store.url (the request log) and alerts")] = None,
    since: Annotated[str, typer.Option(help="the window, up to now: 30m, 1h, 24h")] = "1h",
    baseline: Annotated[str, typer.Option(help="the baseline: this long before the window (7d)")] = "7d",
    model: Annotated[str | None, typer.Option("--model", "-m", help="only this model's calls")] = None,
    output_format: Annotated[DriftFormat, typer.Option("--format", help="table, json or markdown")] = (
        DriftFormat.table
    ),
    check: Annotated[bool, typer.Option("--check", help="exit 1 when a metric drifted (for cron and CI)")] = False,
    alert: Annotated[bool, typer.Option(
        "--alert", help="send an alert per drift onset through alerts: (log, webhook)")] = False,
    state: Annotated[Path, typer.Option(
        help="with --alert: where what is drifting is remembered, so each onset alerts once")] = Path(
        ".keel-drift.json"),
    embed: Annotated[bool, typer.Option(help="compare the answers' embedding centroids (local embedder)")] = True,
    min_samples: Annotated[int, typer.Option(help="calls a side under which a metric is 'not enough data'")] = 30,
) -> None:
    """Output length, refusals, latency, errors, cost, upstream model and fingerprint, answer centroid,
    canary answers and the online judge's score of each model: the window against the baseline before it,
    with PSI, KS and z-tests."""
    from keel.cli import _fail, _load
    from keel.evals import drift as monitor
    from keel.observability.report import open_log, parse_window
    from keel.observability.store import StoreError

    source, cfg = _load(config, calls_upstreams=False)
    try:
        window_s = parse_window(since)
    except ValueError as exc:
        raise _fail(str(exc), 2) from None
    try:
        baseline_s = parse_window(baseline)
    except ValueError as exc:
        raise _fail(str(exc).replace("--since", "--baseline"), 2) from None
    if min_samples < 1:
        raise _fail("--min-samples must be at least 1", 2)
    window, before = monitor.windows(window_s, baseline_s)
    named_by = f"store.url in {source.path}" if source.path else "the default store.url"
    try:
        store = open_log(cfg.store.url, named_by)
        try:
            report = monitor.build_drift(
                store, window=window, baseline=before, model=model, embed=_embedder() if embed else None,
                thresholds=monitor.Thresholds(min_samples=min_samples),
                label=f"last {since.strip()} against the {baseline.strip()} before",
            )
        finally:
            store.close()
    except StoreError as exc:
        raise _fail(str(exc), 1) from None
    if output_format is DriftFormat.json:
        sys.stdout.write(monitor.render_json(report) + "\n")
    elif output_format is DriftFormat.markdown:
        sys.stdout.write(monitor.render_markdown(report) + "\n")
    else:
        Console().print(monitor.render_table(report))
    if alert and (onsets := monitor.OnsetTracker(state).onsets(report)):
        asyncio.run(monitor.send_onsets(monitor.DriftAlertSender(cfg.alerts), onsets))
    if check and report.drifted:
        raise typer.Exit(1)


def _embedder() -> Embed | None:
    """The local embedder's encoder, loaded lazily on the first batch; None without the local extra."""
    try:
        from keel.embedding.model import load_embedder
    except ImportError:
        return None
    loaded: list[SentenceEmbedder] = []

    def encode(texts: list[str]) -> npt.NDArray[np.float32]:
        if not loaded:
            loaded.append(load_embedder())
        return loaded[0].encode(texts).array

    return encode
