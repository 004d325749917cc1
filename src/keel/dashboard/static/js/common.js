// What every page shares: the calls to the gateway's APIs (with the session's CSRF token on unsafe
// methods), the time range and filters kept in the URL, small DOM builders and number formats.

const meta = (name) => document.querySelector(`meta[name="${name}"]`)?.content || "";
export const csrf = meta("keel-csrf");
export const tenant = meta("keel-tenant") || null; // null: the master key, every tenant

export class ApiError extends Error {
  constructor(status, body) {
    const error = body && body.error ? body.error : {};
    super(error.message || `The gateway answered ${status}.`);
    this.status = status;
    this.code = error.code || null;
  }
}

async function call(method, path, body) {
  const headers = { accept: "application/json" };
  if (method !== "GET") headers["x-keel-csrf"] = csrf;
  if (body !== undefined) headers["content-type"] = "application/json";
  const answer = await fetch(path, {
    method, headers, credentials: "same-origin", body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (answer.status === 401) { // the session ended (signed out elsewhere, key revoked): sign in again
    location.assign(`/dashboard/login?next=${encodeURIComponent(location.pathname + location.search)}`);
  }
  const data = answer.headers.get("content-type")?.includes("json") ? await answer.json() : null;
  if (!answer.ok) throw new ApiError(answer.status, data);
  return data;
}

export const get = (path, params) => call("GET", params ? `${path}?${query(params)}` : path);
export const post = (path, body) => call("POST", path, body ?? {});
export const del = (path) => call("DELETE", path);

export function query(params) {
  const found = new URLSearchParams();
  for (const [name, value] of Object.entries(params)) {
    if (value !== null && value !== undefined && value !== "") found.set(name, String(value));
  }
  return found.toString();
}

// ------------------------------------------------------------------ the time range and filters (in the URL)

export const RANGES = { "1h": 3600, "24h": 86400, "7d": 7 * 86400 };

export function view() {
  const url = new URLSearchParams(location.search);
  const range = url.get("range") || "1h";
  let until = Number(url.get("until")) || null;
  let since = Number(url.get("since")) || null;
  if (range !== "custom" || !since) {
    until = Date.now() / 1000;
    since = until - (RANGES[range] || 3600);
  } else if (!until) {
    until = Date.now() / 1000;
  }
  return { range, since, until, model: url.get("model") || "", feature: url.get("feature") || "",
           tenant: url.get("tenant") || "" };
}

export const windowParams = (v) => ({ since: v.since.toFixed(3), until: v.until.toFixed(3), model: v.model,
                                      feature: v.feature, tenant: v.tenant });

export function setParams(changes) {
  const url = new URLSearchParams(location.search);
  for (const [name, value] of Object.entries(changes)) {
    if (value === null || value === undefined || value === "") url.delete(name); else url.set(name, String(value));
  }
  const search = url.toString();
  history.replaceState(null, "", location.pathname + (search ? `?${search}` : ""));
  carryFilters();
}

// The nav links keep the range and filters, so moving between pages keeps what is being looked at.
export function carryFilters() {
  const url = new URLSearchParams(location.search);
  const kept = query({ range: url.get("range"), since: url.get("since"), until: url.get("until"),
                       model: url.get("model"), feature: url.get("feature"), tenant: url.get("tenant") });
  for (const link of document.querySelectorAll("[data-nav]")) {
    link.href = `/dashboard/${link.dataset.nav}${kept ? `?${kept}` : ""}`;
  }
}

// ------------------------------------------------------------------ DOM

export function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else if (name === "dataset") Object.assign(node.dataset, value);
    else if (name === "text") node.textContent = value;
    else node.setAttribute(name, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

// A figure: its text formatted, its exact value in data-value (what the tests compare with the log).
export const figure = (tag, value, format, attrs) =>
  el(tag, { ...attrs, "data-value": value === null || value === undefined ? "" : String(value) }, format(value));

export function card(label, value, format, name) {
  return el("div", { class: "card", "data-total": name },
    el("div", { class: "label" }, label), figure("div", value, format, { class: "figure" }));
}

// columns: [{ label, value(row) -> any, format?, num?, name? }]
export function table(columns, rows, options = {}) {
  const head = el("tr", {}, columns.map((c) => el("th", { class: c.num ? "num" : null, scope: "col" }, c.label)));
  const body = el("tbody", {}, rows.map((row, i) => {
    const tr = el("tr", { class: options.onclick ? "clickable" : null, tabindex: options.onclick ? "0" : null,
                          ...(options.rowAttrs ? options.rowAttrs(row, i) : {}) },
      columns.map((c) => {
        const value = c.value(row);
        const cell = c.format ? figure("td", value, c.format) : el("td", {}, value instanceof Node ? value : value ?? "");
        if (c.num) cell.classList.add("num");
        if (c.name) cell.dataset.col = c.name;
        return cell;
      }));
    if (options.onclick) {
      tr.addEventListener("click", () => options.onclick(row, tr));
      tr.addEventListener("keydown", (e) => { if (e.key === "Enter") options.onclick(row, tr); });
    }
    return tr;
  }));
  const t = el("table", options.attrs || {}, el("thead", {}, head), body);
  if (!rows.length) body.append(el("tr", {}, el("td", { colspan: columns.length, class: "muted" }, options.empty || "Nothing in this window.")));
  return el("div", { class: "scroll" }, t);
}

export function badge(text, kind) {
  return el("span", { class: `badge ${kind || String(text).toLowerCase()}` }, text);
}

export function problem(where, error) {
  return el("p", { class: "problem", role: "alert" }, `${where}: ${error.message}`);
}

// ------------------------------------------------------------------ formats

const dash = "–";
export const fmt = {
  int: (v) => (v === null || v === undefined ? dash : Math.round(v).toLocaleString("en-US")),
  usd: (v) => (v === null || v === undefined ? dash : `$${usdDigits(v)}`),
  ms: (v) => (v === null || v === undefined ? dash : `${v >= 100 ? Math.round(v).toLocaleString("en-US") : v.toFixed(1)} ms`),
  pct: (v) => (v === null || v === undefined ? dash : `${(v * 100).toFixed(v !== 0 && Math.abs(v) < 0.1 ? 2 : 1)}%`),
  num: (v) => (v === null || v === undefined ? dash : String(Math.round(v * 1000) / 1000)),
  time: (t) => (t ? new Date(t * 1000).toLocaleString("en-GB", { hour12: false }) : dash),
  text: (v) => (v === null || v === undefined || v === "" ? dash : String(v)),
};

function usdDigits(v) {
  if (v === 0) return "0.00";
  const a = Math.abs(v);
  return a >= 1 ? v.toFixed(2) : a >= 0.01 ? v.toFixed(4) : v.toFixed(6);
}

export function slo(name, value) {
  if (name === "error_rate") return fmt.pct(value);
  if (name.endsWith("_usd")) return fmt.usd(value);
  if (name.endsWith("_ms")) return fmt.ms(value);
  return fmt.num(value);
}
