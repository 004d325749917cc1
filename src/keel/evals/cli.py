"""`keel eval run | compare | runs | promote | review`: golden-dataset suites through Keel's pipeline,
their reports and the CI gate (docs/evals.md). Exit codes: 0 passed, 1 a threshold or gate failed, 2 bad input."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, cast

import typer
from rich.console import Console

from keel.evals.review_cli import promote, review_label, review_list

if TYPE_CHECKING:
    from keel.config import KeelConfig
    from keel.evals.compare_report import Comparison
    from keel.evals.dataset import Dataset
    from keel.evals.pairwise_runs import PairwiseRuns
    from keel.evals.report import EvalReport
    from keel.evals.results import CaseResult, EvalStore, RunRecord
    from keel.evals.runner import RunOutcome
    from keel.evals.suite import Suite

eval_app = typer.Typer(help="Evaluation: run suites of golden cases, compare runs, gate CI.", no_args_is_help=True)
review_app = typer.Typer(help="The human review queue (docs/review.md): list and label items.", no_args_is_help=True)
eval_app.add_typer(review_app, name="review")
eval_app.command("promote")(promote)  # a production call becomes a golden case
review_app.command("list")(review_list)
review_app.command("label")(review_label)
out = Console()
err = Console(stderr=True)

ConfigOption = Annotated[
    Path | None, typer.Option("--config", "-c", help="keel.yaml: its models, prompts and store.url (the results)"),
]


class ReviewWhich(StrEnum):
    failed = "failed"
    all = "all"


class Format(StrEnum):
    table = "table"
    markdown = "markdown"
    json = "json"
    html = "html"


@contextmanager
def _results(config: Path | None) -> Iterator[EvalStore]:
    from keel.cli import _fail, _load
    from keel.evals.results import EvalStore
    from keel.observability.store import RecordStore, StoreError

    _, cfg = _load(config, calls_upstreams=False)
    try:
        store = RecordStore(cfg.store.url)
        try:
            store.migrate()
            yield EvalStore(store)
        finally:
            store.close()
    except StoreError as exc:
        raise _fail(str(exc), 1) from None


@eval_app.command()
def run(
    suite_path: Annotated[Path, typer.Argument(metavar="SUITE", help="the suite file (YAML)")],
    config: ConfigOption = None,
    concurrency: Annotated[int | None, typer.Option(help="cases in flight at once; default: the suite's")] = None,
    fresh: Annotated[bool, typer.Option("--fresh", help="call every case again (no answers reused)")] = False,
    output_format: Annotated[Format, typer.Option("--format", help="table, markdown, json or html")] = Format.table,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="write the report here, not stdout")] = None,
    fail_under: Annotated[list[str] | None, typer.Option(
        "--fail-under", help="METRIC=VALUE: exit 1 when the metric's mean is under VALUE (repeat)")] = None,
    max_regression: Annotated[list[str] | None, typer.Option(
        "--max-regression", help="METRIC=DELTA: exit 1 when the metric got worse than the baseline by more")] = None,
    baseline: Annotated[str | None, typer.Option(help="the run to compare with; default: the suite's last run")] = None,
    progress: Annotated[bool, typer.Option(help="show a progress bar on stderr")] = True,
    judge_runs: Annotated[int | None, typer.Option(
        "--judge-runs", min=1, max=20, help="judge each case K times and report the judges' stability; "
        "default: the suite's judge.runs (1)")] = None,
    review: Annotated[ReviewWhich | None, typer.Option(
        help="send the run's failed cases (or all) to the review queue, for people to label")] = None,
) -> None:
    """Run SUITE's cases through the pipeline, score them, store the results, print the report."""
    from keel.cli import _fail, _load
    from keel.evals.compare import compare
    from keel.evals.dataset import DatasetInvalid
    from keel.evals.gate import GateInvalid, gate, parse_limits
    from keel.evals.report import EvalReport
    from keel.evals.suite import SuiteInvalid, load_suite

    try:
        suite = load_suite(suite_path)
        dataset = suite.load_dataset()
        under = parse_limits(fail_under or [], "--fail-under")
        regression = parse_limits(max_regression or [], "--max-regression")
    except (SuiteInvalid, DatasetInvalid, GateInvalid) as exc:
        raise _fail(str(exc), 2) from None
    _, cfg = _load(config, calls_upstreams=True)
    with _results(config) as store:
        try:
            outcome = asyncio.run(_run(cfg, suite, store, dataset, concurrency, not fresh, progress, judge_runs))
        except (SuiteInvalid, ValueError) as exc:
            raise _fail(str(exc), 2) from None
        assert outcome.run_id is not None
        if review is not None:
            _send_to_review(store, outcome, review is ReviewWhich.all)
        before = store.run(baseline) if baseline else store.previous(suite.name, outcome.run_id)
        deltas = compare(store.results(before.id), outcome.results) if before is not None else None
    try:
        checks = gate(outcome.metrics, fail_under=under, max_regression=regression, deltas=deltas)
    except GateInvalid as exc:
        raise _fail(str(exc), 2) from None
    report = EvalReport(outcome, checks, before.id if before is not None else None, deltas or [])
    _emit(report, output_format, output)
    raise typer.Exit(0 if report.passed else 1)


def _send_to_review(store: EvalStore, outcome: RunOutcome, every: bool) -> None:
    from keel.evals.review import ReviewQueue
    from keel.evals.review_feed import enqueue_eval_results

    assert outcome.run_id is not None
    added = enqueue_eval_results(ReviewQueue(store.store), outcome.run_id, outcome.results,
                                 {case.id: case for case in outcome.dataset.cases}, every=every)
    err.print(f"{added} case(s) sent to the review queue (keel eval review list)")


async def _run(cfg: KeelConfig, suite: Suite, store: EvalStore, dataset: Dataset, concurrency: int | None,
               resume: bool, progress: bool, judge_runs: int | None) -> RunOutcome:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from keel.evals.runner import run_suite

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("${task.fields[spent]:.4f}"), TimeElapsedColumn())
    with Progress(*columns, console=err, transient=True, disable=not progress) as bar:
        task = bar.add_task(suite.name, total=len(dataset), spent=0.0)

        def advance(_: object, spent: float) -> None:
            bar.update(task, advance=1, spent=spent)

        return await run_suite(cfg, suite, store, dataset=dataset, concurrency=concurrency, resume=resume,
                               on_case=advance, judge_runs=judge_runs)


def _emit(report: EvalReport | Comparison, output_format: Format, output: Path | None) -> None:
    from rich.console import RenderableType

    from keel.evals import compare_report
    from keel.evals import report as run_report

    table: RenderableType
    if isinstance(report, compare_report.Comparison):
        table, texts = compare_report.render_table(report), {
            Format.json: compare_report.render_json, Format.markdown: compare_report.render_markdown,
            Format.html: compare_report.render_html}
        text = texts.get(output_format, compare_report.render_markdown)(report)
    else:
        table, texts_run = run_report.render_table(report), {
            Format.json: run_report.render_json, Format.markdown: run_report.render_markdown,
            Format.html: run_report.render_html}
        text = texts_run.get(output_format, run_report.render_markdown)(report)
    if output_format is Format.table and output is None:
        out.print(table)
        return
    if output is not None:
        output.write_text(text, encoding="utf-8")
        err.print(f"report written to {output}")
    else:
        sys.stdout.write(text if text.endswith("\n") else text + "\n")


@eval_app.command("compare")
def compare_runs(
    run_a: Annotated[str, typer.Argument(metavar="RUN_A", help="the earlier run (the baseline, answer A)")],
    run_b: Annotated[str, typer.Argument(metavar="RUN_B", help="the later run (answer B)")],
    config: ConfigOption = None,
    judge: Annotated[str | None, typer.Option(
        help="a model of keel.yaml that judges the two runs' answers pairwise, in both orders")] = None,
    concurrency: Annotated[int, typer.Option(help="cases judged at once (two judge calls each)")] = 8,
    output_format: Annotated[Format, typer.Option("--format", help="table, markdown, json or html")] = Format.table,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="write the report here, not stdout")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON (the same as --format json)")] = False,
) -> None:
    """Per-metric deltas of RUN_B against RUN_A with bootstrap confidence intervals, and the cases that flipped;
    with --judge, B's pairwise win rate over A, its position consistency and its length-controlled win rate."""
    from keel.cli import _fail, _load
    from keel.evals.compare import compare
    from keel.evals.compare_report import Comparison
    from keel.evals.pairwise_runs import PairwiseUnavailable
    from keel.evals.results import RunNotFound

    with _results(config) as store:
        try:
            a, b = store.run(run_a), store.run(run_b)
        except RunNotFound as exc:
            raise _fail(str(exc), 2) from None
        results_a, results_b = store.results(a.id), store.results(b.id)
    comparison = Comparison(a.id, b.id, compare(results_a, results_b))
    if a.suite != b.suite:
        comparison.warnings.append(f"comparing runs of two suites ({a.suite}, {b.suite})")
    if judge is not None:
        _, cfg = _load(config, calls_upstreams=True)
        if judge not in {m.name for m in cfg.models}:
            raise _fail(f"--judge {judge}: not a model of the config; its models: "
                        f"{', '.join(m.name for m in cfg.models)}", 2)
        try:
            comparison.pairwise = asyncio.run(_pairwise(cfg, judge, a, b, results_a, results_b, concurrency))
        except PairwiseUnavailable as exc:
            raise _fail(str(exc), 2) from None
    _emit(comparison, Format.json if as_json else output_format, output)


async def _pairwise(cfg: KeelConfig, judge: str, a: RunRecord, b: RunRecord, results_a: list[CaseResult],
                    results_b: list[CaseResult], concurrency: int) -> PairwiseRuns:
    from keel.engine import Keel
    from keel.evals.judges import judge_ask
    from keel.evals.pairwise_runs import judge_runs

    async with Keel(cfg) as keel:
        return await judge_runs(judge_ask(keel), judge, a, b, results_a, results_b, concurrency=concurrency)


@eval_app.command("runs")
def list_runs(
    config: ConfigOption = None,
    suite: Annotated[str | None, typer.Option(help="only this suite's runs")] = None,
    limit: Annotated[int, typer.Option(help="how many, newest first")] = 20,
) -> None:
    """The latest eval runs: id, suite, when, status, and whether they passed."""
    from datetime import UTC, datetime

    from rich.table import Table

    with _results(config) as store:
        runs = store.runs(suite, limit)
    table = Table(title=f"{len(runs)} eval run(s)", title_justify="left")
    for header in ("run", "suite", "started", "status", "cases", "passed", "cost"):
        table.add_column(header, no_wrap=header in ("run", "started"))
    for r in runs:
        summary = r.summary or {}
        table.add_row(r.id, r.suite, datetime.fromtimestamp(r.started_at, UTC).strftime("%Y-%m-%d %H:%M:%S"),
                      r.status, str(summary.get("cases", "")), str(summary.get("passed", "")),
                      f"${summary.get('cost_usd', 0.0):.4f}")
    out.print(table)


@eval_app.command("trust")
def trust(
    config: ConfigOption = None,
    judge: Annotated[str | None, typer.Option(help="only this judge (a judge metric's key, or online)")] = None,
    source: Annotated[str | None, typer.Option(help="only items from eval, production or semantic_cache")] = None,
    since: Annotated[str | None, typer.Option(help="only labels of the last 30d, 24h ...")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Each judge's agreement with the reviewers' pass/fail labels in the review queue: accuracy and
    Cohen's kappa with its 95% bootstrap interval (the online judge's too, under `online`)."""
    import time

    import orjson
    from rich.table import Table

    from keel.cli import _fail
    from keel.evals.judge_trust import agreement_by_judge
    from keel.evals.review import SOURCES, ReviewQueue, Source
    from keel.observability.report import parse_window

    if source is not None and source not in SOURCES:
        raise _fail(f"--source is one of {', '.join(SOURCES)}, not {source!r}", 2)
    try:
        after = None if since is None else time.time() - parse_window(since)
    except ValueError as exc:
        raise _fail(str(exc), 2) from None
    with _results(config) as store:
        pairs = ReviewQueue(store.store).labelled_pairs(judge=judge, source=cast("Source | None", source), since=after)
    found = agreement_by_judge(pairs)
    if as_json:
        sys.stdout.write(orjson.dumps({name: {"n": a.n, "accuracy": a.accuracy, "kappa": a.kappa,
                                              "kappa_ci": [a.kappa_low, a.kappa_high]}
                                       for name, a in found.items()}, option=orjson.OPT_INDENT_2).decode() + "\n")
        return
    table = Table(title=f"Judges against reviewers ({len(pairs)} labelled verdicts)", title_justify="left")
    for header in ("judge", "labelled", "accuracy", "kappa", "95% CI"):
        table.add_column(header, justify="left" if header == "judge" else "right")
    for name, a in found.items():
        ci = "-" if a.kappa_low is None else f"[{a.kappa_low:+.2f}, {a.kappa_high:+.2f}]"
        table.add_row(name, str(a.n), "-" if a.accuracy is None else f"{a.accuracy:.3f}",
                      "-" if a.kappa is None else f"{a.kappa:+.3f}", ci)
    out.print(table)
    if not found:
        err.print("no labelled item has a judge's pass/fail verdict yet: send cases with `keel eval run --review "
                  "all` and label them (`keel eval review label`)")

