"""`keel eval compare` as people read it: the per-metric deltas and, with `--judge`, the pairwise verdicts
(B's win rate, position consistency, the length-controlled win rate), as a terminal table, Markdown, JSON
or a self-contained HTML page."""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from typing import Any

import orjson
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from keel.evals.compare import MetricDelta
from keel.evals.pairwise_runs import PairwiseRuns
from keel.evals.report import PAGE_STYLE, _comparison_table, _number, _section, _signed

VERDICTS_SHOWN = 20


@dataclass
class Comparison:
    a: str
    b: str
    deltas: list[MetricDelta]
    pairwise: PairwiseRuns | None = None
    warnings: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"a": self.a, "b": self.b, "metrics": [d.as_dict() for d in self.deltas],
                "pairwise": self.pairwise.as_dict() if self.pairwise else None, "warnings": self.all_warnings}

    @property
    def all_warnings(self) -> list[str]:
        return [*self.warnings, *(self.pairwise.warnings if self.pairwise else ())]


def _rate(value: float | None) -> str:
    return "n/a" if value is None else f"{value * 100:.1f}%"


def pairwise_rows(p: PairwiseRuns) -> list[tuple[str, str]]:
    """(figure, value) of a pairwise comparison, in the order every format shows them."""
    r, lc = p.report, p.report.length_controlled
    return [
        ("cases judged", f"{len(r.verdicts) - r.unjudged} of {len(r.verdicts)}"),
        ("wins of B / ties / wins of A", f"{r.wins_b} / {r.ties} / {r.wins_a}"),
        ("B's win rate (ties as half)", _rate(r.win_rate_b)),
        ("position consistency", _rate(r.consistency)),
        ("B's length-controlled win rate", _rate(lc.win_rate)),
        ("length pull (slope; > 0: longer wins)", _signed(lc.slope)),
    ]


def _decided(p: PairwiseRuns) -> list[tuple[str, str, str, str]]:
    """(case, verdict in each order, combined, a reason) of the first cases, decided ones first."""
    ordered = sorted(p.report.verdicts, key=lambda v: (v.combined in ("tie", None), v.case_id))
    return [(v.case_id, f"{v.first or '-'} / {v.second or '-'}", v.combined or "unjudged",
             v.problem or v.reasons[0] or v.reasons[1]) for v in ordered[:VERDICTS_SHOWN]]


def render_json(comparison: Comparison) -> str:
    return orjson.dumps(comparison.as_dict(), option=orjson.OPT_INDENT_2).decode()


def render_table(comparison: Comparison) -> RenderableType:
    parts: list[RenderableType] = []
    if comparison.deltas:
        parts.append(_comparison_table(comparison.deltas, comparison.a))
    for d in comparison.deltas:
        if d.regressed:
            parts.append(Text(f"{d.key}: regressed in {comparison.b}: {', '.join(d.regressed[:20])}", style="red"))
        if d.fixed:
            parts.append(Text(f"{d.key}: fixed in {comparison.b}: {', '.join(d.fixed[:20])}", style="green"))
    if (p := comparison.pairwise) is not None:
        table = Table(title=f"Pairwise, judged by {p.judge} in both orders", title_justify="left")
        table.add_column("figure")
        table.add_column("value", justify="right")
        for name, value in pairwise_rows(p):
            table.add_row(name, value)
        parts.append(table)
        cases = Table(title="Verdicts (A shown first / B shown first)", title_justify="left")
        for header in ("case", "orders", "verdict", "reason"):
            cases.add_column(header)
        for case, orders, verdict, reason in _decided(p):
            cases.add_row(case, orders, verdict, reason[:120])
        parts.append(cases)
    parts += [Text(f"warning: {w}", style="yellow") for w in comparison.all_warnings]
    return Group(*parts)


def render_markdown(comparison: Comparison) -> str:
    lines = [f"## {comparison.b} against {comparison.a}", ""]
    if comparison.deltas:
        lines += ["| metric | cases | before | after | delta | 95% CI | regressed | fixed |",
                  "|---|---:|---:|---:|---:|---|---:|---:|"]
        lines += [f"| {d.key} | {d.cases} | {_number(d.mean_a)} | {_number(d.mean_b)} | {_signed(d.delta)} | "
                  f"[{_signed(d.low)}, {_signed(d.high)}] | {len(d.regressed)} | {len(d.fixed)} |"
                  for d in comparison.deltas]
    if (p := comparison.pairwise) is not None:
        lines += ["", f"Pairwise, judged by `{p.judge}` in both orders:", "", "| figure | value |", "|---|---:|"]
        lines += [f"| {name} | {value} |" for name, value in pairwise_rows(p)]
        lines += ["", "| case | A first / B first | verdict | reason |", "|---|---|---|---|"]
        lines += [f"| {case} | {orders} | {verdict} | {reason[:120].replace('|', '/')} |"
                  for case, orders, verdict, reason in _decided(p)]
    lines += [f"- warning: {w}" for w in comparison.all_warnings]
    return "\n".join(lines) + "\n"


def render_html(comparison: Comparison) -> str:
    deltas = "".join(
        f"<tr><td>{html.escape(d.key)}</td><td>{d.cases}</td><td>{_number(d.mean_a)}</td><td>{_number(d.mean_b)}"
        f"</td><td>{_signed(d.delta)}</td><td>[{_signed(d.low)}, {_signed(d.high)}]</td><td>{len(d.regressed)}</td>"
        "</tr>" for d in comparison.deltas)
    body = _section(f"Metrics against {comparison.a}", ("metric", "cases", "before", "after", "delta", "95% CI",
                                                        "regressed"), deltas)
    if (p := comparison.pairwise) is not None:
        figures = "".join(f"<tr><td>{html.escape(n)}</td><td>{html.escape(v)}</td></tr>" for n, v in pairwise_rows(p))
        verdicts = "".join(f"<tr><td>{html.escape(c)}</td><td>{html.escape(o)}</td><td>{html.escape(v)}</td>"
                           f"<td>{html.escape(r[:300])}</td></tr>" for c, o, v, r in _decided(p))
        body += (f"<h2>Pairwise, judged by {html.escape(p.judge)} in both orders</h2>{_outcome_bar(p)}"
                 f"<table>{figures}</table>"
                 + _section("Verdicts", ("case", "A first / B first", "verdict", "reason"), verdicts))
    warnings = "".join(f"<p class='fail'>warning: {html.escape(w)}</p>" for w in comparison.all_warnings)
    title = html.escape(f"{comparison.b} against {comparison.a}")
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
            f"<style>{PAGE_STYLE}</style></head><body><h1>{title}</h1>{warnings}{body}</body></html>\n")


def _outcome_bar(p: PairwiseRuns) -> str:
    """One bar split into B's wins, ties and A's wins."""
    r = p.report
    judged = r.wins_a + r.wins_b + r.ties
    if not judged:
        return ""
    width, x, parts = 600, 0.0, []
    for label, count, colour in ((f"B wins {r.wins_b}", r.wins_b, "#1a7f37"), (f"ties {r.ties}", r.ties, "#8c959f"),
                                 (f"A wins {r.wins_a}", r.wins_a, "#cf222e")):
        share = width * count / judged
        if count:
            parts.append(f'<rect x="{x:.1f}" y="0" width="{share:.1f}" height="24" fill="{colour}">'
                         f"<title>{label}</title></rect>"
                         f'<text x="{x + 4:.1f}" y="40" font-size="12">{html.escape(label)}</text>')
        x += share
    return f'<svg viewBox="0 0 {width} 46" role="img" aria-label="pairwise outcomes">{"".join(parts)}</svg>'
