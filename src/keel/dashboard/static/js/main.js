// The page's entry: the nav, the time range and filters (on the pages that have them), then the page itself.
import { RANGES, carryFilters, el, get, problem, setParams, tenant, view } from "./common.js";

const PAGES = {
  overview: () => import("./overview.js"),
  cost: () => import("./cost.js"),
  requests: () => import("./requests.js"),
  traces: () => import("./traces.js"),
  quality: () => import("./quality.js"),
  keys: () => import("./keys.js"),
};

const name = document.body.dataset.page;
document.querySelector(`[data-nav="${name}"]`)?.setAttribute("aria-current", "page");
carryFilters();

const main = document.getElementById("main");
const page = await PAGES[name]();

async function draw() {
  const status = el("p", { class: "loading", id: "status", role: "status" }, "Loading…");
  main.replaceChildren(el("h1", {}, document.title.split(" · ")[0]), status);
  try {
    await page.render(main, view());
    document.body.dataset.ready = String(Number(document.body.dataset.ready || 0) + 1);
  } catch (error) {
    main.append(problem("This page could not be loaded", error));
    document.body.dataset.ready = "error";
  } finally {
    status.remove();
  }
}

if (page.filtered) controls(document.getElementById("controls"), draw);
else document.getElementById("controls").remove();
await draw();

function controls(where, redraw) {
  const v = view();
  const change = (changes) => { setParams(changes); redraw(); };
  const buttons = Object.keys(RANGES).map((range) =>
    el("button", { type: "button", "data-range": range, "aria-pressed": String(v.range === range),
                   onclick: () => { mark(range); change({ range, since: null, until: null }); } }, range));
  const local = (t) => new Date((t - new Date().getTimezoneOffset() * 60) * 1000).toISOString().slice(0, 16);
  const since = el("input", { type: "datetime-local", name: "since", value: local(v.since) });
  const until = el("input", { type: "datetime-local", name: "until", value: local(v.until) });
  const custom = el("button", { type: "button", "data-range": "custom", "aria-pressed": String(v.range === "custom"),
    onclick: () => {
      const s = Date.parse(since.value) / 1000, u = Date.parse(until.value) / 1000;
      if (!(s < u)) { since.setCustomValidity("The start must be before the end."); since.reportValidity(); return; }
      since.setCustomValidity("");
      mark("custom");
      change({ range: "custom", since: s, until: u });
    } }, "Apply");
  const mark = (range) => { for (const b of [...buttons, custom]) b.setAttribute("aria-pressed", String(b.dataset.range === range)); };
  const model = el("select", { name: "model", onchange: () => change({ model: model.value }) }, el("option", { value: "" }, "all models"));
  const feature = el("select", { name: "feature", onchange: () => change({ feature: feature.value }) }, el("option", { value: "" }, "all features"));
  // The master key sees every tenant and may pick one; a tenant admin sees its own only.
  const tenants = el("select", { name: "tenant", onchange: () => change({ tenant: tenants.value }) }, el("option", { value: "" }, "all tenants"));
  where.replaceChildren(
    el("div", { class: "ranges", role: "group", "aria-label": "Time range" }, buttons),
    el("label", {}, "From", since), el("label", {}, "To", until), custom,
    el("label", {}, "Model", model), el("label", {}, "Feature", feature),
    tenant ? "" : el("label", {}, "Tenant", tenants),
  );
  get("/dashboard/api/filters", { since: (v.until - 30 * 86400).toFixed(0), until: v.until.toFixed(0) }).then((found) => {
    for (const [select, names, chosen] of [[model, found.models, v.model], [feature, found.features, v.feature],
                                           [tenants, found.tenants, v.tenant]]) {
      for (const n of new Set([...(names || []), ...(chosen ? [chosen] : [])])) select.append(el("option", { value: n }, n));
      select.value = chosen;
    }
    where.dataset.filtersLoaded = "true";
  }).catch((error) => where.append(problem("Filters", error)));
}
