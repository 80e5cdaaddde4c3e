"""The dashboard page: one HTML document with its own small script (no CDN, no library).

The script polls ``/api/summary`` (monitoring/state.py's snapshot) every POLL_MS and draws each
panel as inline SVG: line charts over period ends for latency, batch size, throughput, cache
hit rate, freshness, rows behind, skew, live MAE (training MAE dashed) and traffic share, and
bars of the newest PSI per feature for drift (coloured by band, thresholds marked). Each panel
says what it shows in ``data-state``: "data", "note" (nothing to plot, and why) or "empty"
(nothing yet); the browser test reads those.
"""

from __future__ import annotations

POLL_MS = 2000

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>Sluice monitor</title>
<link rel="icon" href="data:,">
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body { font: 14px/1.4 system-ui, sans-serif; margin: 0; background: #f6f7f9; color: #1d2330; }
header { padding: 12px 20px; background: #1d2330; color: #fff; }
header h1 { font-size: 18px; margin: 0 0 4px; }
header p { margin: 0; color: #c5cad6; font-size: 12px; }
main { display: grid; grid-template-columns: repeat(auto-fill, minmax(420px, 1fr));
  gap: 14px; padding: 14px 20px; }
.panel { background: #fff; border: 1px solid #dde1e8; border-radius: 6px; padding: 10px 12px; }
.panel h2 { font-size: 14px; margin: 0 0 6px; }
.panel .note { color: #6b7385; font-size: 12px; margin: 4px 0 0; }
.legend { font-size: 11px; color: #444; }
.legend span { display: inline-block; margin-right: 10px; }
.legend i { display: inline-block; width: 10px; height: 3px; margin-right: 4px;
  vertical-align: middle; }
.chart svg { width: 100%; max-width: 640px; height: auto; display: block; }
svg text { font-size: 10px; fill: #555; }
#alerts { grid-column: 1 / -1; }
#alerts li { font-family: ui-monospace, monospace; font-size: 12px; }
.band-drift { color: #b3261e; } .band-possible { color: #a86400; }
</style>
</head>
<body>
<header><h1>Sluice monitor</h1><p id="status">waiting for the first results</p></header>
<main id="panels"></main>
<script>
"use strict";
const PANELS = ["latency", "batch", "throughput", "cache", "freshness", "behind", "drift",
  "skew", "mae", "traffic"];
const COLORS = ["#3366cc", "#dc3912", "#ff9900", "#109618", "#990099", "#0099c6",
  "#dd4477", "#66aa00", "#b82e2e", "#316395"];
const BAND_COLORS = {none: "#4caf50", possible: "#ff9800", drift: "#d32f2f",
  unknown: "#9e9e9e"};
const NS = "http://www.w3.org/2000/svg";
const W = 400, H = 170, L = 46, R = 8, T = 8, B = 22;

function el(tag, attrs, parent) {
  const node = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
  if (parent) parent.appendChild(node);
  return node;
}

function fmt(v) {
  if (v === null || v === undefined || Number.isNaN(v)) return "-";
  const a = Math.abs(v);
  if (a !== 0 && (a < 0.01 || a >= 100000)) return v.toExponential(1);
  if (a >= 100) return String(Math.round(v));
  if (a >= 10) return v.toFixed(1);
  return String(Math.round(v * 1000) / 1000);
}

function clock(ms) {
  return new Date(ms).toISOString().substring(11, 19);
}

function section(name) {
  let node = document.getElementById("panel-" + name);
  if (!node) {
    node = document.createElement("section");
    node.className = "panel";
    node.id = "panel-" + name;
    node.dataset.state = "empty";
    node.innerHTML = "<h2></h2><div class='chart'></div><div class='legend'></div>" +
      "<p class='note'></p>";
    document.getElementById("panels").appendChild(node);
  }
  return node;
}

function lineChart(node, panel) {
  const series = panel.series.filter(s => s.points.length > 0);
  const chart = node.querySelector(".chart");
  const legend = node.querySelector(".legend");
  chart.textContent = "";
  legend.textContent = "";
  const refs = panel.reference || [];
  if (series.length === 0) return 0;
  const xs = series.flatMap(s => s.points.map(p => p[0]));
  const ys = series.flatMap(s => s.points.map(p => p[1])).concat(refs.map(r => r.value));
  let x0 = Math.min(...xs), x1 = Math.max(...xs);
  if (x1 === x0) { x0 -= 1000; x1 += 1000; }
  let y0 = Math.min(0, ...ys), y1 = Math.max(...ys);
  if (y1 <= y0) y1 = y0 + 1;
  y1 += (y1 - y0) * 0.08;
  const sx = x => L + (x - x0) / (x1 - x0) * (W - L - R);
  const sy = y => H - B - (y - y0) / (y1 - y0) * (H - T - B);
  const svg = el("svg", {viewBox: `0 0 ${W} ${H}`, role: "img"}, chart);
  el("line", {x1: L, y1: H - B, x2: W - R, y2: H - B, stroke: "#999"}, svg);
  el("line", {x1: L, y1: T, x2: L, y2: H - B, stroke: "#999"}, svg);
  for (const y of [y0, (y0 + y1) / 2, y1]) {
    el("text", {x: L - 4, y: sy(y) + 3, "text-anchor": "end"}, svg).textContent = fmt(y);
  }
  el("text", {x: L, y: H - 6}, svg).textContent = clock(x0);
  el("text", {x: W - R, y: H - 6, "text-anchor": "end"}, svg).textContent = clock(x1);
  series.forEach((s, i) => {
    const color = COLORS[i % COLORS.length];
    const pts = s.points.map(p => `${sx(p[0]).toFixed(1)},${sy(p[1]).toFixed(1)}`).join(" ");
    el("polyline", {points: pts, fill: "none", stroke: color, "stroke-width": 1.6,
      "class": "series"}, svg);
    for (const p of s.points) {
      el("circle", {cx: sx(p[0]), cy: sy(p[1]), r: 2, fill: color, "class": "point"}, svg);
    }
    const last = s.points[s.points.length - 1][1];
    const item = document.createElement("span");
    item.innerHTML = `<i style="background:${color}"></i>`;
    item.appendChild(document.createTextNode(`${s.name}: ${fmt(last)}`));
    legend.appendChild(item);
  });
  refs.forEach((r, i) => {
    const color = COLORS[i % COLORS.length];
    el("line", {x1: L, x2: W - R, y1: sy(r.value), y2: sy(r.value), stroke: color,
      "stroke-dasharray": "4 3"}, svg);
    const item = document.createElement("span");
    item.textContent = `${r.name}: ${fmt(r.value)}`;
    legend.appendChild(item);
  });
  return xs.length;
}

function driftChart(node, rows) {
  const chart = node.querySelector(".chart");
  const legend = node.querySelector(".legend");
  chart.textContent = "";
  legend.textContent = "";
  const shown = rows.filter(r => r.psi !== null && r.psi !== undefined);
  if (shown.length === 0) return 0;
  const rowH = 14, width = 520, left = 270;
  const height = shown.length * rowH + 24;
  // Up to 1 on the axis: the bands end at 0.25; larger values are clipped, their number shown.
  const top = Math.min(1, Math.max(0.5, ...shown.map(r => r.psi)));
  const sx = v => left + Math.min(v, top) / top * (width - left - 50);
  const models = new Set(shown.map(r => r.version.replace(/ v[0-9]+$/, "")));
  const svg = el("svg", {viewBox: `0 0 ${width} ${height}`, role: "img"}, chart);
  shown.forEach((r, i) => {
    const y = i * rowH + 4;
    const version = models.size > 1 ? r.version : r.version.replace(/^.* (v[0-9]+)$/, "$1");
    const label = `${version} ${r.feature}`;
    const text = el("text", {x: left - 4, y: y + 10, "text-anchor": "end"}, svg);
    text.textContent = label.length > 48 ? "..." + label.slice(-45) : label;
    el("title", {}, text).textContent = `${r.version} ${r.feature}: band ${r.band}`;
    el("rect", {x: left, y: y + 2, width: Math.max(1, sx(r.psi) - left), height: rowH - 4,
      fill: BAND_COLORS[r.band] || "#9e9e9e", "class": "bar"}, svg);
    el("text", {x: sx(r.psi) + 3, y: y + 10}, svg).textContent = fmt(r.psi);
  });
  for (const [v, c] of [[0.1, "#ff9800"], [0.25, "#d32f2f"]]) {
    el("line", {x1: sx(v), x2: sx(v), y1: 0, y2: height - 18, stroke: c,
      "stroke-dasharray": "3 3"}, svg);
    el("text", {x: sx(v), y: height - 6, "text-anchor": "middle"}, svg).textContent = String(v);
  }
  legend.textContent = "PSI of the newest period per feature; colour: band " +
    "(green none, orange possible, red drift, grey unknown)";
  return shown.length;
}

function render(data) {
  for (const name of PANELS) {
    const node = section(name);
    const notes = Object.entries(data.notes).map(([k, v]) => `${k}: ${v}`).join("; ");
    const panel = name === "drift" ?
      {title: "Drift per feature (PSI)", unit: "", note: notes || null} : data.panels[name];
    node.querySelector("h2").textContent = panel.title + (panel.unit ? ` (${panel.unit})` : "");
    const n = name === "drift" ? driftChart(node, data.drift) : lineChart(node, panel);
    const note = panel.note || (n === 0 ? "no data yet" : "");
    node.querySelector(".note").textContent = note;
    node.dataset.state = n > 0 ? "data" : (panel.note ? "note" : "empty");
    node.dataset.points = String(n);
  }
  let alerts = document.getElementById("alerts");
  if (!alerts) {
    alerts = document.createElement("section");
    alerts.className = "panel";
    alerts.id = "alerts";
    alerts.innerHTML = "<h2>Alerts</h2><ul></ul>";
    document.getElementById("panels").appendChild(alerts);
  }
  const list = alerts.querySelector("ul");
  list.textContent = "";
  for (const a of data.alerts.slice(0, 15)) {
    const item = document.createElement("li");
    item.className = "band-" + a.band;
    item.textContent = a.message;
    list.appendChild(item);
  }
  if (data.alerts.length === 0) list.innerHTML = "<li>none</li>";
  if (data.alerts.length > 15) {
    const more = document.createElement("li");
    more.textContent = `... and ${data.alerts.length - 15} more (newest first)`;
    list.appendChild(more);
  }
  const consumed = Object.entries(data.consumed).map(([k, v]) => `${k} ${v}`).join(", ");
  document.getElementById("status").textContent =
    `period ${data.period_s} s; read: ${consumed || "nothing yet"}; ` +
    `${data.records} results; updated ${clock(data.updated_at_ms)} UTC`;
  document.body.dataset.updates = String(Number(document.body.dataset.updates || 0) + 1);
}

async function poll() {
  try {
    const response = await fetch("/api/summary", {cache: "no-store"});
    if (response.ok) render(await response.json());
  } catch (err) {
    document.getElementById("status").textContent = "the monitor does not answer";
  }
  setTimeout(poll, POLL_MS);
}
const POLL_MS = __POLL_MS__;
poll();
</script>
</body>
</html>
""".replace("__POLL_MS__", str(POLL_MS))
