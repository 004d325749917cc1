// Cost: spend by feature, model, user, key and prompt version; the forecast to the window's end;
// budgets with their thresholds, what is left, and the burn-down over the window.
import { card, el, fmt, get, problem, table, tenant, windowParams } from "./common.js";
import { timeChart } from "./charts.js";

export const filtered = true;

const DIMENSIONS = [["feature", "By feature"], ["model", "By model"], ["user", "By user"], ["key", "By key"],
                    ["prompt", "By prompt version"]];

export async function render(main, v) {
  const params = windowParams(v);
  const [data, budgets] = await Promise.all([
    get("/dashboard/api/cost", params),
    get("/admin/budgets").then((b) => b.data).catch((error) => error),
  ]);
  main.append(
    el("div", { class: "cards", id: "cost-totals" },
      card("Spend in the window", data.total_usd, fmt.usd, "total_usd"),
      card(`Forecast to ${fmt.time(data.forecast.window_end)}`, data.forecast.projected_usd, fmt.usd, "projected_usd"),
    ),
  );
  for (const [dimension, title] of DIMENSIONS) {
    main.append(el("h2", {}, title), usage(dimension, data.by[dimension] || [], data.total_usd));
  }
  main.append(el("h2", {}, "Budgets"));
  const rows = Array.isArray(data.budgets) && data.budgets.length ? data.budgets : budgets;
  if (rows instanceof Error) main.append(problem("Budgets", rows));
  else await budgetsView(main, rows || [], v);
}

function usage(dimension, rows, total) {
  return table([
    { label: dimension, value: (r) => r.name ?? "(none)", name: "name" },
    { label: "Requests", value: (r) => r.requests, format: fmt.int, num: true, name: "requests" },
    { label: "Prompt tok.", value: (r) => r.prompt_tokens, format: fmt.int, num: true, name: "prompt_tokens" },
    { label: "Completion tok.", value: (r) => r.completion_tokens, format: fmt.int, num: true, name: "completion_tokens" },
    { label: "Cost", value: (r) => r.cost_usd, format: fmt.usd, num: true, name: "cost_usd" },
    { label: "Share", value: (r) => (total ? r.cost_usd / total : null), format: fmt.pct, num: true, name: "share" },
    { label: "Mean latency", value: (r) => r.latency_ms, format: fmt.ms, num: true, name: "latency_ms" },
    { label: "Error rate", value: (r) => r.error_rate, format: fmt.pct, num: true, name: "error_rate" },
  ], rows, { attrs: { "data-by": dimension }, rowAttrs: (r) => ({ "data-name": r.name ?? "" }) });
}

async function budgetsView(main, rules, v) {
  const counters = rules.flatMap((entry) => entry.counters.map((counter) => ({ entry, counter })));
  if (!counters.length) {
    main.append(el("p", { class: "muted" }, "No budget rules. Set them in keel.yaml (budgets:) or POST /admin/budgets."));
    return;
  }
  main.append(table([
    { label: "Scope", value: ({ entry }) => `${entry.rule.scope}${entry.rule.match ? ` = ${entry.rule.match}` : ""}` },
    { label: "Counter", value: ({ counter }) => counter.value ?? "all" },
    { label: "Window", value: ({ entry, counter }) => `${entry.rule.window} ${counter.period}` },
    { label: "Limit", value: ({ entry }) => entry.rule.limit_usd, format: fmt.usd, num: true, name: "limit_usd" },
    { label: "Spent", value: ({ counter }) => counter.spent_usd, format: fmt.usd, num: true, name: "spent_usd" },
    { label: "Reserved", value: ({ counter }) => counter.reserved_usd, format: fmt.usd, num: true, name: "reserved_usd" },
    { label: "Left", value: ({ counter }) => counter.remaining_usd, format: fmt.usd, num: true, name: "remaining_usd" },
    { label: "Used, with alert thresholds", value: ({ entry, counter }) => used(entry.rule, counter) },
    { label: "Resets", value: ({ counter }) => (counter.resets_at ? new Date(counter.resets_at).toLocaleString("en-GB") : "never") },
  ], counters, { attrs: { id: "budgets" }, rowAttrs: ({ entry, counter }) => ({ "data-budget": `${entry.rule.scope}:${counter.value ?? ""}` }) }));
  // Burn-down: what was left through the window, back from what is left now (the window's spend added back).
  const charts = el("div", { class: "charts" });
  main.append(el("h3", {}, "Burn-down"), charts);
  for (const { entry, counter } of counters.slice(0, 4)) {
    const filter = { global: {}, feature: { feature: counter.value }, tenant: tenant ? {} : { tenant: counter.value } }[entry.rule.scope];
    if (!filter) continue;
    const series = (await get("/dashboard/api/overview", { ...windowParams({ ...v, model: "", feature: "", tenant: "" }), ...filter })).series;
    let after = 0;
    const left = new Array(series.t.length);
    for (let i = series.t.length - 1; i >= 0; i--) {
      after += series.cost_usd[i] || 0;
      left[i] = counter.remaining_usd + counter.reserved_usd + after - (series.cost_usd[i] || 0);
    }
    charts.append(timeChart(`${entry.rule.scope} ${counter.value ?? ""} — left of ${fmt.usd(entry.rule.limit_usd)}`,
      series.t, [{ label: "USD left", values: left }], fmt.usd, `burn-${entry.rule.scope}-${counter.value ?? ""}`, [v.since, v.until]));
  }
}

function used(rule, counter) {
  const share = rule.limit_usd ? (counter.spent_usd + counter.reserved_usd) / rule.limit_usd : 0;
  const bar = el("div", { class: `bar ${share >= 1 ? "out" : share >= (rule.alert_at?.[0] ?? 1) ? "low" : ""}`, title: fmt.pct(share) },
    el("span", { style: `width:${(Math.min(1, share) * 100).toFixed(1)}%` }),
    (rule.alert_at || []).filter((a) => a < 1).map((a) => el("i", { style: `left:${(a * 100).toFixed(1)}%`, title: `alert at ${fmt.pct(a)}` })));
  return el("div", { class: "row-actions", "data-value": String(share) }, bar, el("span", {}, fmt.pct(share)));
}
