// Time-series charts with uPlot (vendored: static/vendor/uPlot.iife.min.js, loaded before this module).
import { el } from "./common.js";

const COLORS = ["#2f6fde", "#c0392b", "#1b7f4c", "#b7791f", "#7b4fc9", "#0f8b8d"];
const WHOLE = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1e3, 2e3, 5e3, 1e4, 2e4, 5e4, 1e5, 1e6];

// series: [{ label, values, color?, dash?, markers? }] (dash: a dashed line, e.g. [5, 4]; markers: points
// only); t: epoch seconds of each bucket; span: [since, until] of the window, so a
// window with one bucket still spans its time. `whole`: counts (integer ticks, from 0).
// An empty window says so instead of drawing axes.
export function timeChart(title, t, series, format, name, span, whole = false) {
  const box = el("div", { class: "chart", "data-chart": name }, el("h3", {}, title));
  const points = series.reduce((n, s) => n + s.values.filter((v) => v !== null && v !== undefined).length, 0);
  if (!t.length || !points) {
    box.append(el("div", { class: "empty" }, "No data in this window."));
    return box;
  }
  const opts = {
    width: 400, height: 200,
    series: [{}, ...series.map((s, i) => ({
      label: s.label, stroke: s.color ?? COLORS[i % COLORS.length], width: s.markers ? 0 : 1.5, spanGaps: false,
      points: { show: t.length < 60 && !s.dash }, ...(s.dash ? { dash: s.dash } : {}),
      // markers: points only (an alert, say), no line between them
      ...(s.markers ? { paths: () => null, points: { show: true, size: 11, width: 2, fill: s.color, stroke: s.color } } : {}),
      value: (u, v) => (v === null || v === undefined ? "–" : format(v)),
    }))],
    axes: [{}, { values: (u, splits) => splits.map((v) => compact(format, v)), size: 76,
                 ...(whole ? { incrs: WHOLE } : {}) }],
    scales: {
      x: { time: true, ...(span ? { range: () => [Math.min(span[0], t[0]), Math.max(span[1], t[t.length - 1])] } : {}) },
      y: { range: (u, min, max) => [Math.min(0, min), max > 0 ? max * 1.1 : 1] },
    },
    legend: { live: true },
  };
  const plot = new uPlot(opts, [t, ...series.map((s) => s.values)], box);
  box.plot = plot; // what is drawn, for the browser tests (plot.data)
  const fit = () => plot.setSize({ width: Math.max(240, box.clientWidth - 12), height: 200 });
  new ResizeObserver(fit).observe(box);
  requestAnimationFrame(fit);
  return box;
}

// Axis labels: the series' own unit, at three significant digits (a tick is not a figure to read exactly).
function compact(format, v) {
  const text = format(Number(v.toPrecision(3)));
  return text.replace(/(\.\d*?[1-9])0+(?=\D*$)|\.0+(?=\D*$)/, "$1");
}
