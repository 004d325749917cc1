// Quality: eval runs, judge–human agreement, drift with its alerts, and the review queue, labelled from here.
import { badge, el, fmt, get, post, problem, table, tenant, windowParams } from "./common.js";

export const filtered = true; // the window of the drift figures

export async function render(main, v) {
  const [quality, queue] = await Promise.all([
    get("/dashboard/api/quality", windowParams(v)).catch((error) => error),
    get("/admin/review", { status: "pending", limit: 20 }).catch((error) => error),
  ]);
  const reviewSection = el("section", { id: "review" });
  main.append(el("h2", {}, "Review queue"), reviewSection);
  if (queue instanceof Error) reviewSection.append(problem("The review queue", queue));
  else reviewQueue(reviewSection, queue);
  if (quality instanceof Error) { main.append(problem("Eval runs and drift", quality)); return; }
  main.append(
    el("h2", {}, "Eval runs"),
    table([
      { label: "Run", value: (r) => el("span", { class: "mono" }, r.id) },
      { label: "Suite", value: (r) => r.suite ?? "" },
      { label: "Started", value: (r) => fmt.time(r.started_at) },
      { label: "Metrics", value: (r) => metrics(r.metrics ?? r.summary) },
      { label: "", value: (r) => badge(r.passed === null || r.passed === undefined ? "n/a" : r.passed ? "pass" : "fail") },
    ], quality.runs || [], { attrs: { id: "runs" }, empty: "No eval run yet: `keel eval run <suite>` records one." }),
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
  );
}

function metrics(m) {
  if (!m || typeof m !== "object") return "";
  return el("span", { class: "mono" }, Object.entries(m).map(([k, v]) => `${k} ${typeof v === "number" ? fmt.num(v) : JSON.stringify(v)}`).join(", "));
}

function drift(rows) {
  if (rows === undefined || rows === null) return el("p", { class: "muted" }, "Drift is not computed for the dashboard; `keel drift` reports it.");
  if (!rows.length) return el("p", { class: "muted" }, "No drift measured in this window.");
  const keys = Object.keys(rows[0]);
  return table(keys.map((k) => ({
    label: k.replaceAll("_", " "),
    value: (r) => (k === "alert" ? badge(r[k] ? "alert" : "ok") : k === "verdict" ? badge(r[k], r[k] === "drift" ? "alert" : r[k] === "stable" ? "ok" : "") : typeof r[k] === "number" ? fmt.num(r[k]) : r[k] === null ? "–" : typeof r[k] === "object" ? JSON.stringify(r[k]) : r[k]),
  })), rows, { attrs: { id: "drift" } });
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
