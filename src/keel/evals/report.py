"""An eval run as people read it: a terminal table, Markdown (for a pull request), JSON (for machines) and
a self-contained HTML page with charts (inline SVG: no script, no CDN; it opens from a CI artifact)."""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from keel.evals.compare import MetricDelta
from keel.evals.gate import GateCheck
from keel.evals.judge_report import JudgeFigures
from keel.evals.runner import RunOutcome

FAILURES_SHOWN = 10
PAGE_STYLE = """
body { font: 15px/1.45 system-ui, sans-serif; margin: 1.5rem auto; max-width: 60rem; padding: 0 1rem; color: #222 }
table { border-collapse: collapse; margin: .5rem 0 1.5rem; width: 100% }
td, th { border-bottom: 1px solid #ddd; padding: .3rem .5rem; text-align: left }
.pass { color: #1a7f37 } .fail { color: #cf222e; font-weight: 600 } svg { max-width: 100%; height: auto }
"""


@dataclass
class EvalReport:
    outcome: RunOutcome
    checks: list[GateCheck] = field(default_factory=list)
    baseline: str | None = None  # the run compared against
    deltas: list[MetricDelta] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.outcome.passed and all(check.passed for check in self.checks)

    def failures(self) -> list[tuple[str, str, str]]:
        """(case id, metric, why) of every failed check and failed call, in case order."""
        found = []
        for result in sorted(self.outcome.results, key=lambda r: r.case_id):
            if result.error:
                found.append((result.case_id, "call", result.error))
            for key, score in result.scores.items():
                if score.get("passed") is False:
                    found.append((result.case_id, key, score.get("reason") or "failed"))
        return found

    def as_dict(self) -> dict[str, Any]:
        outcome = self.outcome
        return {
            "run_id": outcome.run_id, "suite": outcome.suite.name, "target": outcome.suite.target.describe(),
            "dataset": str(outcome.dataset.path), "dataset_version": outcome.dataset.version,
            **outcome.summary(), "passed": self.passed,
            "gate": [{"check": c.label, "value": c.value, "passed": c.passed} for c in self.checks],
            "baseline": self.baseline, "comparison": [d.as_dict() for d in self.deltas],
            "failures": [{"case": c, "metric": m, "why": w} for c, m, w in self.failures()],
        }


def render_json(report: EvalReport) -> str:
    return orjson.dumps(report.as_dict(), option=orjson.OPT_INDENT_2).decode()


def _number(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _verdict(passed: bool | None) -> str:
    return {True: "pass", False: "FAIL", None: "-"}[passed]


def _title(report: EvalReport) -> str:
    o = report.outcome
    spent = f"${o.cost_usd:.4f}"
    return (f"{o.suite.name}: {len(o.results)} cases of {o.dataset.path.name}@{o.dataset.version} against "
            f"{o.suite.target.describe()}; {o.errors} failed calls, {sum(r.reused for r in o.results)} reused, "
            f"{spent} spent, {o.seconds:.1f} s" + (f" (run {o.run_id})" if o.run_id else ""))


JUDGE_HEADERS = ("judge metric", "length rho", "length r", "stability", "labelled", "accuracy", "kappa [95% CI]")


def judge_cells(j: JudgeFigures) -> tuple[str, ...]:
    """A judge's row, as every format shows it: the Spearman and Pearson correlations of its scores with the
    answers' lengths, its stability over k runs (the share of cases judged identically every time / of
    agreeing run pairs), and its agreement with the reviewers' labels."""
    steady, h = j.stability, j.humans
    stable = "-" if steady.identical is None else f"{steady.k}x: {steady.identical:.2f} / {_number(steady.pairwise, 2)}"
    if h is None or h.n == 0:
        humans: tuple[str, ...] = ("0", "-", "-")
    else:
        ci = "" if h.kappa_low is None else f" [{_signed(h.kappa_low)}, {_signed(h.kappa_high)}]"
        humans = (str(h.n), _number(h.accuracy), f"{_signed(h.kappa)}{ci}")
    return (j.key, _signed(j.length.spearman), _signed(j.length.pearson), stable, *humans)


def render_table(report: EvalReport) -> RenderableType:
    parts: list[RenderableType] = [Text(_title(report), style="bold")]
    table = Table(title="Metrics", title_justify="left")
    for header in ("metric", "scored", "mean", "pass rate", "threshold", "verdict"):
        table.add_column(header, justify="left" if header == "metric" else "right")
    for m in report.outcome.metrics:
        table.add_row(m.key, str(m.scored), _number(m.mean), _number(m.pass_rate), _number(m.threshold, 2),
                      _verdict(m.passed))
    parts.append(table)
    if report.outcome.judges:
        judges = Table(title="Judges: verbosity, stability, agreement with reviewers", title_justify="left")
        for header in JUDGE_HEADERS:
            judges.add_column(header, justify="left" if header == "judge metric" else "right")
        for j in report.outcome.judges:
            judges.add_row(*judge_cells(j))
        parts.append(judges)
    if report.deltas:
        parts.append(_comparison_table(report.deltas, report.baseline))
    if report.checks:
        gate = Table(title="Gate", title_justify="left")
        gate.add_column("check")
        gate.add_column("value", justify="right")
        gate.add_column("verdict", justify="right")
        for check in report.checks:
            gate.add_row(check.label, _number(check.value), _verdict(check.passed))
        parts.append(gate)
    failures = report.failures()
    if failures:
        shown = Table(title=f"Failed cases ({len(failures)})", title_justify="left")
        for header in ("case", "metric", "why"):
            shown.add_column(header)
        for case, metric, why in failures[:FAILURES_SHOWN]:
            shown.add_row(case, metric, why[:160])
        parts.append(shown)
    parts += [Text(f"warning: {w}", style="yellow") for w in report.outcome.warnings]
    parts.append(Text("PASSED" if report.passed else "FAILED", style="bold green" if report.passed else "bold red"))
    return Group(*parts)


def _comparison_table(deltas: Sequence[MetricDelta], baseline: str | None) -> Table:
    table = Table(title=f"Against {baseline}", title_justify="left")
    for header in ("metric", "cases", "before", "after", "delta", "95% CI", "regressed", "fixed"):
        table.add_column(header, justify="left" if header == "metric" else "right")
    for d in deltas:
        table.add_row(d.key, str(d.cases), _number(d.mean_a), _number(d.mean_b), _signed(d.delta),
                      f"[{_signed(d.low)}, {_signed(d.high)}]", str(len(d.regressed)), str(len(d.fixed)))
    return table


def _signed(value: float | None) -> str:
    return "n/a" if value is None else f"{value:+.3f}"


def render_markdown(report: EvalReport) -> str:
    lines = [f"## {html.escape(_title(report))}", "", "| metric | scored | mean | pass rate | threshold | verdict |",
             "|---|---:|---:|---:|---:|---|"]
    for m in report.outcome.metrics:
        lines.append(f"| {m.key} | {m.scored} | {_number(m.mean)} | {_number(m.pass_rate)} | "
                     f"{_number(m.threshold, 2)} | {_verdict(m.passed)} |")
    if report.outcome.judges:
        lines += ["", "Judges: verbosity, stability, agreement with reviewers:", "",
                  "| " + " | ".join(JUDGE_HEADERS) + " |", "|---|" + "---:|" * (len(JUDGE_HEADERS) - 1)]
        lines += ["| " + " | ".join(judge_cells(j)) + " |" for j in report.outcome.judges]
    if report.deltas:
        lines += ["", f"Against {report.baseline}:", "", "| metric | before | after | delta | 95% CI | regressed |",
                  "|---|---:|---:|---:|---|---:|"]
        lines += [f"| {d.key} | {_number(d.mean_a)} | {_number(d.mean_b)} | {_signed(d.delta)} | "
                  f"[{_signed(d.low)}, {_signed(d.high)}] | {len(d.regressed)} |" for d in report.deltas]
    if report.checks:
        lines += ["", "| gate | value | verdict |", "|---|---:|---|"]
        lines += [f"| {c.label} | {_number(c.value)} | {_verdict(c.passed)} |" for c in report.checks]
    failures = report.failures()
    if failures:
        lines += ["", f"Failed cases ({len(failures)}, first {min(len(failures), FAILURES_SHOWN)}):", ""]
        lines += [f"- `{case}` {metric}: {why[:160]}" for case, metric, why in failures[:FAILURES_SHOWN]]
    lines += [f"- warning: {w}" for w in report.outcome.warnings]
    lines += ["", f"**{'PASSED' if report.passed else 'FAILED'}**"]
    return "\n".join(lines) + "\n"


def render_html(report: EvalReport) -> str:
    """One page, no external resources: the figures, a bar chart of each metric against its threshold,
    the latency histogram, the comparison and the failed cases."""
    o = report.outcome
    rows = "".join(
        f"<tr><td>{html.escape(m.key)}</td><td>{m.scored}</td><td>{_number(m.mean)}</td><td>{_number(m.pass_rate)}"
        f"</td><td>{_number(m.threshold, 2)}</td><td class='{_verdict(m.passed).lower()}'>{_verdict(m.passed)}</td>"
        "</tr>" for m in o.metrics)
    failures = "".join(f"<tr><td>{html.escape(c)}</td><td>{html.escape(m)}</td><td>{html.escape(w[:300])}</td></tr>"
                       for c, m, w in report.failures()[:50])
    comparison = "".join(
        f"<tr><td>{html.escape(d.key)}</td><td>{_number(d.mean_a)}</td><td>{_number(d.mean_b)}</td>"
        f"<td>{_signed(d.delta)}</td><td>[{_signed(d.low)}, {_signed(d.high)}]</td><td>{len(d.regressed)}</td></tr>"
        for d in report.deltas)
    judges = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in judge_cells(j)) + "</tr>"
                     for j in o.judges)
    verdict = "PASSED" if report.passed else "FAILED"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(o.suite.name)}: {verdict}</title>
<style>{PAGE_STYLE}</style></head><body>
<h1 class="{verdict.lower()}">{html.escape(o.suite.name)}: {verdict}</h1>
<p>{html.escape(_title(report))}</p>
<h2>Metrics</h2>{_bars(o)}
<table><tr><th>metric</th><th>scored</th><th>mean</th><th>pass rate</th><th>threshold</th><th>verdict</th></tr>{rows}
</table>
{_section("Judges: verbosity, stability, agreement with reviewers", JUDGE_HEADERS, judges)}
<h2>Latency</h2>{_histogram([r.latency_ms for r in o.results if r.latency_ms is not None and not r.reused])}
{_section(f"Against {report.baseline}", ("metric", "before", "after", "delta", "95% CI", "regressed"), comparison)}
{_section("Failed cases", ("case", "metric", "why"), failures)}
</body></html>
"""


def _section(title: str, headers: Sequence[str], rows: str) -> str:
    if not rows:
        return ""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    return f"<h2>{html.escape(title)}</h2><table><tr>{head}</tr>{rows}</table>"


def _bars(outcome: RunOutcome) -> str:
    """Each 0..1 metric's mean as a bar, its threshold as a tick."""
    shown = [m for m in outcome.metrics if m.mean is not None and 0 <= m.mean <= 1]
    if not shown:
        return ""
    height, width, left = 26 * len(shown) + 10, 600, 160
    parts = []
    for i, m in enumerate(shown):
        y = 8 + i * 26
        assert m.mean is not None
        colour = "#1a7f37" if m.passed is not False else "#cf222e"
        length = (width - left - 50) * m.mean
        parts.append(f'<text x="0" y="{y + 14}" font-size="13">{html.escape(m.key[:22])}</text>'
                     f'<rect x="{left}" y="{y}" width="{length:.1f}" height="18" fill="{colour}"/>'
                     f'<text x="{width - 45}" y="{y + 14}" font-size="13">{m.mean:.2f}</text>')
        if m.threshold is not None and 0 <= m.threshold <= 1:
            x = left + (width - left - 50) * m.threshold
            parts.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{y - 2}" y2="{y + 20}" stroke="#222" stroke-width="2"/>')
    return f'<svg viewBox="0 0 {width} {height}" role="img" aria-label="metric means">{"".join(parts)}</svg>'


def _histogram(latencies: Sequence[float], bins: int = 20) -> str:
    if not latencies:
        return "<p>No calls were made in this run (every answer was reused).</p>"
    low, high = min(latencies), max(latencies)
    step = (high - low) / bins or 1.0
    counts = [0] * bins
    for value in latencies:
        counts[min(int((value - low) / step), bins - 1)] += 1
    top, width, height = max(counts), 600, 160
    bar = width / bins
    rects = "".join(f'<rect x="{i * bar:.1f}" y="{height - 20 - (height - 30) * c / top:.1f}" width="{bar - 2:.1f}" '
                    f'height="{(height - 30) * c / top:.1f}" fill="#0969da"><title>{c} calls</title></rect>'
                    for i, c in enumerate(counts))
    axis = (f'<text x="0" y="{height - 4}" font-size="12">{low:.0f} ms</text>'
            f'<text x="{width - 70}" y="{height - 4}" font-size="12">{high:.0f} ms</text>')
    return f'<svg viewBox="0 0 {width} {height}" role="img" aria-label="latency histogram">{rects}{axis}</svg>'

