// Time-series charts with uPlot (vendored: static/vendor/uPlot.iife.min.js, loaded before this module).
import { el } from "./common.js";

const COLORS = ["#2f6fde", "#c0392b", "#1b7f4c", "#b7791f", "#7b4fc9", "#0f8b8d"];
const charts = new Set();

// series: [{ label, values, format? }]; t: epoch seconds. An empty window says so instead of drawing axes.
export function timeChart(title, t, series, format, name) {
  const box = el("div", { class: "chart", "data-chart": name }, el("h3", {}, title));
  const points = series.reduce((n, s) => n + s.values.filter((v) => v !== null && v !== undefined).length, 0);
  if (!t.length || !points) {
    box.append(el("div", { class: "empty" }, "No data in this window."));
    return box;
  }
  const opts = {
    width: 400, height: 200,
    series: [{}, ...series.map((s, i) => ({
      label: s.label, stroke: COLORS[i % COLORS.length], width: 1.5, spanGaps: false, points: { show: t.length < 60 },
      value: (u, v) => (v === null || v === undefined ? "–" : format(v)),
    }))],
    axes: [{}, { values: (u, splits) => splits.map((v) => format(v)), size: 70 }],
    scales: { x: { time: true } },
    legend: { live: true },
  };
  const plot = new uPlot(opts, [t, ...series.map((s) => s.values)], box);
  const fit = () => plot.setSize({ width: Math.max(240, box.clientWidth - 12), height: 200 });
  new ResizeObserver(fit).observe(box);
  charts.add(plot);
  requestAnimationFrame(fit);
  return box;
}
