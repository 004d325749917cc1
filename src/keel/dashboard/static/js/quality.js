// Quality: eval runs, judge–human agreement, drift with its alerts, and the review queue, labelled from here.
import { badge, el, figure, fmt, get, post, problem, table, tenant, windowParams } from "./common.js";
import { timeChart } from "./charts.js";

export const filtered = true; // the window of the drift figures

export async function render(main, v) {
  const [quality, series, queue] = await Promise.all([
    get("/dashboard/api/quality", windowParams(v)).catch((error) => error),
    get("/dashboard/api/drift", windowParams(v)).catch((error) => error),
    get("/admin/review", { status: "pending", limit: 20 }).catch((error) => error),
  ]);
  const reviewSection = el("section", { id: "review" });
  main.append(el("h2", {}, "Review queue"), reviewSection);
  if (queue instanceof Error) reviewSection.append(problem("The review queue", queue));
  else reviewQueue(reviewSection, queue);
  if (quality instanceof Error) { main.append(problem("Eval runs and drift", quality)); return; }
  main.append(
    el("h2", {}, "Eval runs"),
    el("p", { class: "muted" }, "Each metric's mean, and its change from the suite's run before (`keel eval compare A B` tests it case by case)."),
    table([
      { label: "Run", value: (r) => el("span", { class: "mono" }, r.id) },
      { label: "Suite", value: (r) => r.suite ?? "" },
      { label: "Started", value: (r) => fmt.time(r.started_at) },
      { label: "Cases", value: (r) => r.summary?.cases, format: fmt.int, num: true },
      { label: "Errors", value: (r) => r.summary?.errors, format: fmt.int, num: true },
      { label: "Cost", value: (r) => r.summary?.cost_usd, format: fmt.usd, num: true },
      { label: "Metrics", value: (r) => metrics(r, before(quality.runs, r)) },
      { label: "", value: (r) => badge(r.passed === null || r.passed === undefined ? r.status ?? "n/a" : r.passed ? "pass" : "fail") },
    ], quality.runs || [], { attrs: { id: "runs" }, rowAttrs: (r) => ({ "data-run": r.id }),
                             empty: "No eval run yet: `keel eval run <suite>` records one." }),
    el("h2", {}, "Judge–human agreement"),
    table([
      { label: "Judge", value: (r) => r.judge },
      { label: "Items", value: (r) => r.n, format: fmt.int, num: true },
      { label: "Accuracy", value: (r) => r.accuracy, format: fmt.pct, num: true },
      { label: "Cohen's κ", value: (r) => r.kappa, format: fmt.num, num: true },
      { label: "95% interval", value: (r) => (r.kappa_low == null ? "–" : `${fmt.num(r.kappa_low)} – ${fmt.num(r.kappa_high)}`) },
    ], quality.agreement || [], { attrs: { id: "agreement" }, empty: "No item labelled by both a judge and a person yet." }),
    el("h2", {}, "Drift"),
    drift(quality.drift),
    series instanceof Error ? problem("Drift over time", series) : driftCharts(series),
  );
}

const DRIFT_FORMATS = { "output tokens": fmt.num, "latency ms": fmt.ms, "cost per call": fmt.usd,
                        "error rate": fmt.pct, "refusal rate": fmt.pct };

// Each model's metrics over the window, bucket by bucket against the baseline: the band outside which a
// move is big enough to be drift (dashed), and the alerts (buckets whose verdict is drift) as red marks,
// listed under the charts.
function driftCharts(data) {
  if (!data.lines) return "";
  const lines = data.lines.filter((line) => line.values.some((x) => x !== null));
  if (!lines.length) return el("p", { class: "muted", id: "drift-charts" }, "Not enough calls in any bucket of this window to chart drift.");
  const span = [data.window.since, data.window.until];
  const constant = (x) => data.t.map(() => x);
  const alerts = [];
  const charts = lines.map((line) => {
    const format = DRIFT_FORMATS[line.metric] ?? fmt.num;
    line.alerts.forEach((alert, i) => { if (alert) alerts.push({ ...line, at: data.t[i], value: line.values[i] }); });
    return timeChart(`${line.model}: ${line.metric}`, data.t, [
      { label: "window", values: line.values },
      { label: "baseline", values: constant(line.baseline), color: "#6b7280", dash: [2, 3] },
      { label: "drift below", values: constant(line.low), color: "#c0392b", dash: [6, 4] },
      { label: "drift above", values: constant(line.high), color: "#c0392b", dash: [6, 4] },
      { label: "alert", values: line.values.map((x, i) => (line.alerts[i] ? x : null)), color: "#c0392b", markers: true },
    ], format, `drift:${line.model}:${line.metric}`, span);
  });
  return el("div", { id: "drift-charts" },
    el("h3", {}, `Over time (${Math.round(data.step_s / 60)} min buckets, each against the baseline)`),
    el("div", { class: "charts" }, charts),
    alerts.length ? table([
      { label: "When", value: (a) => fmt.time(a.at) },
      { label: "Model", value: (a) => a.model },
      { label: "Metric", value: (a) => a.metric },
      { label: "Value", value: (a) => figure("span", a.value, DRIFT_FORMATS[a.metric] ?? fmt.num) },
      { label: "Baseline", value: (a) => figure("span", a.baseline, DRIFT_FORMATS[a.metric] ?? fmt.num) },
      { label: "", value: () => badge("alert", "alert") },
    ], alerts, { attrs: { id: "drift-alerts" }, rowAttrs: (a) => ({ "data-alert": `${a.model}:${a.metric}:${a.at}` }) })
      : el("p", { class: "muted", id: "drift-alerts" }, "No drift alert in this window."));
}

// The run's metrics (mean against threshold), each with its change from `prior` (the suite's run before).
function metrics(run, prior) {
  const list = run.summary?.metrics || [];
  if (!list.length) return "";
  const was = new Map((prior?.summary?.metrics || []).map((m) => [m.key, m.mean]));
  return el("ul", { class: "metrics" }, list.map((m) => {
    const delta = m.mean != null && was.get(m.key) != null ? m.mean - was.get(m.key) : null;
    return el("li", { "data-metric": m.key },
      el("span", { class: "mono" }, m.key), " ", figure("span", m.mean, fmt.num, { class: "mean" }),
      m.threshold != null ? el("span", { class: "muted" }, ` (${m.lower_is_better ? "≤" : "≥"} ${fmt.num(m.threshold)})`) : "",
      delta === null ? "" : figure("span", delta, (d) => ` ${d >= 0 ? "+" : "−"}${fmt.num(Math.abs(d))}`,
        { class: `delta ${delta === 0 ? "" : (delta > 0) !== Boolean(m.lower_is_better) ? "better" : "worse"}` }));
  }));
}

const before = (runs, run) => runs.find((r) => r.suite === run.suite && r.started_at < run.started_at);

// Drift rows with a verdict first; those without enough data yet folded under a summary.
function drift(rows) {
  if (rows === undefined || rows === null) return el("p", { class: "muted" }, "Drift is not computed for the dashboard; `keel drift` reports it.");
  if (!rows.length) return el("p", { class: "muted" }, "No drift measured in this window.");
  const keys = Object.keys(rows[0]).filter((k) => k !== "note" || rows.some((r) => r.verdict !== "not enough data"));
  const columns = keys.map((k) => ({
    label: k.replaceAll("_", " "),
    value: (r) => (k === "alert" ? badge(r[k] ? "alert" : "ok") : k === "verdict" ? badge(r[k], r[k] === "drift" ? "alert" : r[k] === "stable" ? "ok" : "") :
                   typeof r[k] === "number" ? fmt.num(r[k]) : r[k] === null ? "–" : typeof r[k] === "object" ? JSON.stringify(r[k]) : r[k]),
  }));
  const measured = rows.filter((r) => r.verdict !== "not enough data");
  const waiting = rows.filter((r) => r.verdict === "not enough data");
  return el("div", { id: "drift" },
    measured.length ? table(columns, measured, { attrs: { "data-drift": "measured" } }) : el("p", { class: "muted" }, "Not enough calls yet to measure drift."),
    waiting.length ? el("details", {}, el("summary", {}, `${waiting.length} metrics without enough data yet`),
                        table(columns, waiting, { attrs: { "data-drift": "waiting" } })) : "");
}

function reviewQueue(where, page) {
  const reviewer = el("input", { name: "reviewer", placeholder: "your name or email", value: localStorage.getItem("keel.reviewer") || "" });
  where.replaceChildren(
    el("p", { class: "muted" }, `${page.total} pending.`),
    tenant ? "" : el("label", { class: "filters" }, "Labelling as (the master key names its reviewer)", reviewer),
    ...page.data.map((item) => reviewItem(item, () => (tenant ? undefined : reviewer.value.trim() || undefined))),
  );
  reviewer.addEventListener("change", () => localStorage.setItem("keel.reviewer", reviewer.value.trim()));
}

function reviewItem(item, reviewer) {
  const score = el("input", { type: "number", min: 1, max: 5, step: 1, name: "score", size: 3, placeholder: "1–5" });
  const comment = el("input", { name: "comment", placeholder: "comment", size: 30 });
  const said = el("span", { class: "muted", role: "status" });
  const box = el("article", { class: "review-item", "data-item": item.id },
    el("div", {}, badge(item.source, "ok"), " ", el("span", { class: "mono" }, item.ref ?? item.id), " ",
       el("span", { class: "muted" }, fmt.time(item.created_at))),
    el("h3", {}, "Input"), el("pre", {}, show(item.input)),
    el("h3", {}, "Output"), el("pre", {}, show(item.output)),
    item.judge ? el("p", { class: "muted" }, `Judges: ${JSON.stringify(item.judge)}`) : "",
    el("div", { class: "actions" },
      ["pass", "fail"].map((label) => el("button", { type: "button", "data-label": label, class: label === "pass" ? "primary" : "danger",
        onclick: async () => {
          for (const b of box.querySelectorAll("button")) b.disabled = true;
          try {
            const body = { label, comment: comment.value.trim() || undefined, reviewer: reviewer() };
            if (score.value) body.score = Number(score.value);
            const labelled = await post(`/admin/review/${encodeURIComponent(item.id)}/labels`, body);
            said.textContent = `Labelled ${label} (${labelled.labels.length} label${labelled.labels.length === 1 ? "" : "s"}).`;
            box.dataset.labelled = label;
          } catch (error) {
            said.textContent = error.message;
            for (const b of box.querySelectorAll("button")) b.disabled = false;
          }
        } }, label === "pass" ? "Pass" : "Fail")),
      score, comment, said));
  return box;
}

const show = (v) => (v === null || v === undefined ? "(none)" : typeof v === "string" ? v : JSON.stringify(v, null, 2));
