// Overview: the SLO table with the error budget left, the totals, and the charts over time.
import { badge, card, el, figure, fmt, get, slo, table, windowParams } from "./common.js";
import { timeChart } from "./charts.js";

export const filtered = true;

export async function render(main, v) {
  const data = await get("/dashboard/api/overview", windowParams(v));
  const totals = data.totals, s = data.series, span = [data.window.since, data.window.until];
  const hitRate = totals.cache_lookups ? totals.cache_hits / totals.cache_lookups : null;
  main.append(
    el("h2", {}, "Service levels"),
    table([
      { label: "Objective", value: (r) => r.label },
      { label: "Now", value: (r) => r.value, format: (x) => "", num: true, name: "value" },
      { label: "Target", value: (r) => r.target, num: true, name: "target" },
      { label: "", value: (r) => badge(r.passed === null ? "n/a" : r.passed ? "pass" : "fail") },
      { label: "Error budget left", value: (r) => budgetLeft(r.error_budget_left), name: "budget" },
    ].map(sloFormat), data.slo, { rowAttrs: (r) => ({ "data-slo": r.name }), attrs: { id: "slo" } }),
    el("h2", {}, "Totals"),
    el("div", { class: "cards", id: "totals" },
      card("Requests", totals.requests, fmt.int, "requests", span, true),
      card("Errors", totals.errors, fmt.int, "errors"),
      card("Cost", totals.cost_usd, fmt.usd, "cost_usd"),
      card("Cost per request", totals.requests ? totals.cost_usd / totals.requests : null, fmt.usd, "cost_per_request_usd"),
      card("Prompt tokens", totals.prompt_tokens, fmt.int, "prompt_tokens"),
      card("Completion tokens", totals.completion_tokens, fmt.int, "completion_tokens"),
      card("Cache hit rate", hitRate, fmt.pct, "cache_hit_rate", span),
      card("Saved by the cache", totals.saved_usd, fmt.usd, "saved_usd"),
      card("Guardrail blocks", totals.guardrail_blocks, fmt.int, "guardrail_blocks"),
      card("Rate-limited", totals.rate_limited, fmt.int, "rate_limited"),
      card("Budget refusals", totals.budget_refusals, fmt.int, "budget_refusals"),
    ),
    el("h2", {}, `Over time (${Math.round(data.window.step_s / 60)} min buckets)`),
    el("div", { class: "charts" },
      timeChart("Requests", s.t, [{ label: "requests", values: s.requests }, { label: "errors", values: s.errors }], fmt.int, "requests", span, true),
      timeChart("Latency", s.t, [{ label: "p50", values: s.p50_ms }, { label: "p99", values: s.p99_ms },
                                 { label: "TTFT p50", values: s.ttft_p50_ms }], fmt.ms, "latency", span),
      timeChart("Error rate", s.t, [{ label: "error rate", values: s.error_rate }], fmt.pct, "error_rate", span),
      timeChart("Cost", s.t, [{ label: "USD", values: s.cost_usd }], fmt.usd, "cost", span),
      timeChart("Tokens", s.t, [{ label: "tokens", values: s.tokens }], fmt.int, "tokens", span, true),
      timeChart("Cache hit rate", s.t, [{ label: "hit rate", values: s.cache_hit_rate }], fmt.pct, "cache_hit_rate", span),
      timeChart("Money saved by the cache", s.t, [{ label: "USD saved", values: s.saved_usd }], fmt.usd, "saved", span),
      timeChart("Refusals", s.t, [{ label: "guardrail blocks", values: s.guardrail_blocks },
                                  { label: "rate-limited", values: s.rate_limited }], fmt.int, "refusals", span, true),
    ),
  );
}

// The value and target columns are formatted by the objective's unit.
function sloFormat(column) {
  if (column.name !== "value" && column.name !== "target") return column;
  return { ...column, format: undefined, value: (r) => figure("span", column.value(r), (x) => slo(r.name, x)) };
}

function budgetLeft(left) {
  if (left === null || left === undefined) return el("span", { class: "muted", "data-value": "" }, "n/a");
  const share = Math.max(0, Math.min(1, left));
  return el("div", { class: "row-actions", "data-value": String(left) },
    el("div", { class: `bar ${left <= 0 ? "out" : left < 0.25 ? "low" : ""}`, title: fmt.pct(left) },
      el("span", { style: `width:${(share * 100).toFixed(1)}%` })),
    el("span", {}, fmt.pct(left)));
}
