// Traces: a waterfall of one trace's spans (a chain of calls, each with its upstream attempts),
// nested by parent, placed on the trace's own time line; a span's attributes on click.
import { badge, el, fmt, get, query, setParams } from "./common.js";

export const filtered = false;

export async function render(main) {
  const asked = new URLSearchParams(location.search).get("trace") || "";
  const input = el("input", { name: "trace", value: asked, size: 36, placeholder: "trace id (32 hex digits)", class: "mono" });
  const out = el("div", { id: "trace" });
  main.append(
    el("form", { class: "filters", onsubmit: (e) => { e.preventDefault(); setParams({ trace: input.value.trim() }); show(input.value.trim(), out); } },
      el("label", {}, "Trace", input), el("button", { type: "submit", class: "primary" }, "Show")),
    out);
  if (asked) await show(asked, out);
  else out.append(el("p", { class: "muted" }, "Open a trace from a request's detail (Requests page), or paste its id."));
}

async function show(traceId, out) {
  out.replaceChildren(el("p", { class: "loading" }, "Loading…"));
  const data = await get(`/dashboard/api/traces/${encodeURIComponent(traceId)}`);
  const spans = data.spans;
  if (!spans.length) { out.replaceChildren(el("p", { class: "muted" }, "No span of this trace is in the log.")); return; }
  const start = Math.min(...spans.map((s) => s.started_at));
  const end = Math.max(...spans.map((s) => s.ended_at));
  const total = Math.max(end - start, 1e-6);
  const depth = depths(spans);
  const attrs = el("div", { class: "panel detail", id: "span-detail", hidden: true });
  const rows = ordered(spans).map((s) => {
    const left = ((s.started_at - start) / total) * 100;
    const width = Math.max(((s.ended_at - s.started_at) / total) * 100, 0.3);
    const row = el("div", { class: "row", tabindex: "0", role: "button", "data-span": s.span_id, "data-name": s.name },
      el("div", { class: "name", style: `padding-left:${depth.get(s.span_id) * 14}px`, title: s.name }, s.name),
      el("div", { class: "track" },
        el("div", { class: `span ${s.status === "error" ? "error" : s.request_id ? "call" : ""}`,
                    style: `left:${left.toFixed(2)}%;width:${width.toFixed(2)}%`,
                    title: `${s.name}: ${fmt.ms((s.ended_at - s.started_at) * 1000)}` })));
    const pick = () => {
      for (const r of out.querySelectorAll(".row[aria-selected]")) r.removeAttribute("aria-selected");
      row.setAttribute("aria-selected", "true");
      attrs.hidden = false;
      attrs.replaceChildren(
        el("h3", {}, s.name, " ", badge(s.status, s.status === "error" ? "error" : "ok")),
        el("p", {}, `${fmt.ms((s.ended_at - s.started_at) * 1000)}, from +${fmt.ms((s.started_at - start) * 1000)}`),
        s.request_id ? el("p", {}, "Request ", el("a", { href: `/dashboard/requests?${query({ id: s.request_id, range: "7d" })}` }, s.request_id)) : "",
        el("pre", {}, JSON.stringify(s.attributes || {}, null, 2)));
    };
    row.addEventListener("click", pick);
    row.addEventListener("keydown", (e) => { if (e.key === "Enter") pick(); });
    return row;
  });
  out.replaceChildren(
    el("p", {}, `${spans.length} spans over ${fmt.ms(total * 1000)}`),
    el("div", { class: "waterfall panel", id: "waterfall" }, rows), attrs);
}

// Depth first, children after their parent in start order; a span whose parent is not here is a root.
function ordered(spans) {
  const ids = new Set(spans.map((s) => s.span_id));
  const children = new Map();
  for (const s of spans) {
    const parent = s.parent_id && ids.has(s.parent_id) ? s.parent_id : null;
    if (!children.has(parent)) children.set(parent, []);
    children.get(parent).push(s);
  }
  const out = [];
  const walk = (parent) => {
    for (const s of (children.get(parent) || []).sort((a, b) => a.started_at - b.started_at)) { out.push(s); walk(s.span_id); }
  };
  walk(null);
  return out;
}

function depths(spans) {
  const byId = new Map(spans.map((s) => [s.span_id, s]));
  const depth = new Map();
  const of = (s, seen = 0) => {
    if (depth.has(s.span_id)) return depth.get(s.span_id);
    const parent = s.parent_id ? byId.get(s.parent_id) : null;
    const d = parent && seen < 64 ? of(parent, seen + 1) + 1 : 0;
    depth.set(s.span_id, d);
    return d;
  };
  for (const s of spans) of(s);
  return depth;
}
