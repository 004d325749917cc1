// Requests: the log, searchable (text in the stored, redacted content) and filterable, newest first,
// with a detail view of one call: input, output, usage, cost, guardrail verdicts, attempts.
import { badge, el, fmt, get, post, problem, query, setParams, table, windowParams } from "./common.js";

export const filtered = true;

const FILTERS = [
  ["q", "Search text", "text"], ["status", "Status", "text"],
  ["outcome", "Outcome", ["", "ok", "error", "blocked", "rate_limited", "budget_exceeded", "cached", "client_closed", "invalid"]],
  ["user", "User", "text"], ["cache", "Cache", ["", "none", "miss", "hit_exact", "hit_semantic"]],
  ["guardrail", "Guardrail", "text"],
];

export async function render(main, v) {
  const url = new URLSearchParams(location.search);
  const inputs = {};
  const form = el("form", { class: "filters", id: "request-filters", role: "search",
    onsubmit: (e) => { e.preventDefault(); apply(); } },
    FILTERS.map(([name, label, kind]) => {
      const input = Array.isArray(kind)
        ? el("select", { name }, kind.map((o) => el("option", { value: o }, o || "any")))
        : el("input", { name, type: name === "q" ? "search" : "text", size: name === "q" ? 24 : 10 });
      input.value = url.get(name) || "";
      inputs[name] = input;
      return el("label", {}, label, input);
    }),
    el("button", { type: "submit", class: "primary" }, "Search"));
  const list = el("div", { id: "request-list" });
  const detail = el("aside", { class: "detail panel", id: "request-detail", hidden: true });
  const split = el("div", { class: "split" }, list, detail);
  main.append(form, split);

  const apply = () => {
    setParams(Object.fromEntries(Object.entries(inputs).map(([n, i]) => [n, i.value])));
    load();
  };
  let rows = [];
  const load = async (before) => {
    const params = { ...windowParams(v), limit: 50, before };
    for (const [name, input] of Object.entries(inputs)) params[name] = input.value;
    const page = await get("/dashboard/api/requests", params);
    rows = before ? rows.concat(page.data) : page.data;
    list.replaceChildren(
      table([
        { label: "Time", value: (r) => fmt.time(r.started_at) },
        { label: "Model", value: (r) => r.model ?? "" },
        { label: "Feature", value: (r) => r.feature ?? "" },
        { label: "User", value: (r) => r.user ?? "" },
        { label: "Outcome", value: (r) => badge(r.outcome), name: "outcome" },
        { label: "Status", value: (r) => r.status, num: true, name: "status" },
        { label: "Cache", value: (r) => (r.cache_status === "none" ? "" : r.cache_status) },
        { label: "Latency", value: (r) => r.latency_ms, format: fmt.ms, num: true, name: "latency_ms" },
        { label: "Cost", value: (r) => r.cost_usd, format: fmt.usd, num: true, name: "cost_usd" },
        { label: "Input", value: (r) => el("span", { class: "mono" }, r.preview ?? "") },
      ], rows, { attrs: { id: "requests" }, empty: "No request matches in this window.",
                 rowAttrs: (r) => ({ "data-request": r.request_id }),
                 onclick: (r, tr) => open(r.request_id, tr) }),
      page.next ? el("button", { type: "button", id: "more", onclick: () => load(page.next) }, "Older requests") : "",
    );
    list.dataset.count = String(rows.length);
  };
  const open = async (id, tr) => {
    for (const other of list.querySelectorAll("tr[aria-selected]")) other.removeAttribute("aria-selected");
    tr?.setAttribute("aria-selected", "true");
    setParams({ id });
    detail.hidden = false;
    split.classList.add("detail-open");
    detail.replaceChildren(el("p", { class: "loading" }, "Loading…"));
    try {
      detail.replaceChildren(...details(await get(`/dashboard/api/requests/${encodeURIComponent(id)}`)).flat());
      detail.dataset.request = id;
    } catch (error) {
      detail.replaceChildren(problem("This request", error));
    }
  };
  await load();
  if (url.get("id")) await open(url.get("id"));
}

function details(r) {
  const field = (label, value) => [el("dt", {}, label), el("dd", {}, value ?? "–")];
  const reviewed = el("span", { class: "muted" });
  return [
    el("h2", {}, "Request ", el("span", { class: "mono" }, r.request_id)),
    el("dl", {},
      field("Time", fmt.time(r.started_at)),
      field("Outcome", [badge(r.outcome), ` ${r.status}`, r.error_type ? ` ${r.error_type}` : ""]),
      r.error_message ? field("Error", r.error_message) : null,
      field("Model", `${r.model ?? "–"}${r.deployment ? ` → ${r.deployment}` : ""}${r.upstream_model ? ` (${r.upstream_model})` : ""}`),
      field("Feature / user", `${r.feature ?? "–"} / ${r.user ?? "–"}`),
      field("Tenant / key", `${r.tenant ?? "–"} / ${r.key_id ?? "–"}`),
      field("Tokens", `${fmt.int(r.prompt_tokens)} in, ${fmt.int(r.completion_tokens)} out${r.cached_tokens ? `, ${fmt.int(r.cached_tokens)} cached` : ""}`),
      field("Cost", el("span", { "data-value": String(r.cost_usd), id: "detail-cost" }, fmt.usd(r.cost_usd) + (r.cost_estimated ? " (estimated)" : ""))),
      field("Latency", `${fmt.ms(r.latency_ms)}${r.ttft_ms != null ? `, first token ${fmt.ms(r.ttft_ms)}` : ""}`),
      field("Cache", r.cache_status),
      r.prompt ? field("Prompt", `${r.prompt} ${r.prompt_version ?? ""}`) : null,
      r.trace_id ? field("Trace", el("a", { href: `/dashboard/traces?${query({ trace: r.trace_id })}`, id: "trace-link" }, r.trace_id)) : null,
    ),
    el("h3", {}, "Input"), el("pre", { id: "detail-input" }, pretty(r.input)),
    el("h3", {}, "Output"), el("pre", { id: "detail-output" }, r.output == null && r.outcome !== "ok" ? "(none: the call did not answer)" : pretty(r.output)),
    el("h3", {}, "Guardrail verdicts"),
    (r.guardrails || []).length ? table([
      { label: "Check", value: (g) => g.name ?? g.check ?? "" },
      { label: "Stage", value: (g) => g.stage ?? g.direction ?? "" },
      { label: "Action", value: (g) => badge(g.action ?? g.verdict ?? "", g.action === "block" ? "blocked" : "") },
      { label: "Detail", value: (g) => el("span", { class: "mono" }, JSON.stringify(omit(g, ["name", "check", "stage", "direction", "action", "verdict"]))) },
    ], r.guardrails, { attrs: { id: "detail-guardrails" } }) : el("p", { class: "muted" }, "None."),
    el("h3", {}, `Attempts (${r.attempts ?? (r.attempt_log || []).length})`),
    (r.attempt_log || []).length ? table(Object.keys(r.attempt_log[0]).map((k) => ({ label: k, value: (a) => fmtCell(a[k]) })),
                                         r.attempt_log, { attrs: { id: "detail-attempts" } }) : el("p", { class: "muted" }, "None."),
    r.metadata ? [el("h3", {}, "Metadata"), el("pre", {}, pretty(r.metadata))] : [],
    el("div", { class: "actions" },
      el("button", { type: "button", id: "to-review", onclick: async (e) => {
        e.target.disabled = true;
        try {
          const item = await post("/admin/review", { request_id: r.request_id });
          reviewed.textContent = item.created ? "Added to the review queue." : "Already in the review queue.";
        } catch (error) { reviewed.textContent = error.message; e.target.disabled = false; }
      } }, "Send to the review queue"), " ", reviewed),
  ];
}

const pretty = (v) => (v === null || v === undefined ? "(not logged)" : typeof v === "string" ? v : JSON.stringify(v, null, 2));
const fmtCell = (v) => (v !== null && typeof v === "object" ? JSON.stringify(v) : v ?? "");
const omit = (o, keys) => Object.fromEntries(Object.entries(o).filter(([k]) => !keys.includes(k)));
