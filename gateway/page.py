"""The status page the gateway serves at ``GET /``: one self-contained HTML document.

No build step and nothing from elsewhere (no fonts, scripts or styles from the internet): its
CSS and JavaScript are inline, so it works offline and behind any proxy. The script polls
``/v1/status`` every POLL_MS (2 s), shows health, every shard with its owner, keys, operations
per second and log size, the standbys, and draws the latency of data requests over the last
minutes as an inline SVG. It keeps its own history (HISTORY_S, ten minutes) and merges the
history each answer carries, so a page opened late still shows the minutes before it.

Elements tests read: ``#health`` (ok, degraded, unavailable), one ``tr[data-shard=N]`` per
shard whose ``.owner`` cell reads ``no owner`` when the shard has none, ``#standbys``, and the
``data-updated`` attribute of ``body`` (the count of answers shown so far).
"""

from __future__ import annotations

HTML = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>zkv status</title>
<style>
  :root { --ok: #1a7f37; --bad: #cf222e; --warn: #9a6700; --fg: #1f2328; --muted: #656d76; }
  body { font: 14px/1.4 system-ui, sans-serif; color: var(--fg); margin: 1.5rem; max-width: 60rem; }
  h1 { font-size: 1.3rem; margin: 0 0 .5rem; }
  h2 { font-size: 1rem; margin: 1.2rem 0 .4rem; }
  #health { font-weight: 700; padding: .1rem .5rem; border-radius: .3rem; color: #fff; }
  #health.ok { background: var(--ok); } #health.degraded { background: var(--warn); }
  #health.unavailable { background: var(--bad); }
  table { border-collapse: collapse; min-width: 36rem; }
  th, td { text-align: left; padding: .25rem .8rem .25rem 0; border-bottom: 1px solid #d0d7de; }
  td.num, th.num { text-align: right; }
  .none { color: var(--bad); font-weight: 700; }
  .muted { color: var(--muted); }
  svg { border: 1px solid #d0d7de; background: #fff; }
  .p50 { stroke: #0969da; } .p99 { stroke: #bc4c00; }
</style>
</head>
<body data-updated="0">
<h1>zkv cluster <span id="health" class="unavailable">loading</span></h1>
<div class="muted" id="summary">waiting for the first answer of /v1/status</div>
<h2>Shards</h2>
<table id="shards">
  <thead><tr><th>shard</th><th>owner</th><th class="num">keys</th>
  <th class="num">ops/s</th><th class="num">log</th><th class="num">failovers</th></tr></thead>
  <tbody></tbody>
</table>
<h2>Standbys</h2>
<div id="standbys" class="muted">none</div>
<h2>Latency of data requests (last minutes)</h2>
<div class="muted" id="recent"></div>
<svg id="graph" width="640" height="180" viewBox="0 0 640 180" role="img"
     aria-label="latency graph"></svg>
<div class="muted"><span style="color:#0969da">&#9644; p50</span>
  <span style="color:#bc4c00">&#9644; p99</span> (ms, log scale)</div>
<script>
"use strict";
const POLL_MS = 2000, HISTORY_S = 600;
const points = new Map();  // t (s) -> {p50_ms, p99_ms, rps}
let answers = 0;

function text(value) { return value === null || value === undefined ? "-" : String(value); }
function bytes(n) {
  if (n === null || n === undefined) return "memory";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(1) : String(n)) + " " + units[i];
}
function cell(row, value, cls) {
  const td = document.createElement("td");
  td.textContent = value;
  if (cls) td.className = cls;
  row.appendChild(td);
  return td;
}

function show(status) {
  const health = document.getElementById("health");
  health.textContent = status.status;
  health.className = status.status;
  const shards = status.shards || [];
  const owned = shards.filter(s => s.owner !== null).length;
  document.getElementById("summary").textContent = status.status === "unavailable"
    ? "broker: " + text(status.error)
    : owned + " of " + shards.length + " shards owned, " + text(status.workers) +
      " workers, as of " + new Date(status.time * 1000).toLocaleTimeString();
  const body = document.querySelector("#shards tbody");
  body.replaceChildren();
  for (const shard of shards) {
    const row = document.createElement("tr");
    row.dataset.shard = shard.shard;
    cell(row, String(shard.shard));
    const none = shard.owner === null;
    cell(row, none ? "no owner" : shard.owner, none ? "owner none" : "owner");
    cell(row, text(shard.keys), "num");
    cell(row, shard.ops_per_s === null ? "-" : shard.ops_per_s.toFixed(1), "num");
    cell(row, none && shard.log_bytes === null ? "-" : bytes(shard.log_bytes), "num");
    cell(row, text(shard.failovers), "num");
    body.appendChild(row);
  }
  const standbys = status.standbys || [];
  document.getElementById("standbys").textContent = standbys.length
    ? standbys.map(s => s.worker).join(", ") : "none";
  const latency = status.latency || {};
  for (const p of latency.history || []) points.set(p.t, p);
  const cutoff = status.time - HISTORY_S;
  for (const t of points.keys()) if (t < cutoff) points.delete(t);
  document.getElementById("recent").textContent = latency.requests
    ? "last " + Math.round(latency.window_s) + " s: " + latency.requests + " requests, p50 " +
      text(latency.p50_ms) + " ms, p99 " + text(latency.p99_ms) + " ms"
    : "no data requests in the last minute";
  draw(status.time);
}

function draw(now) {
  const svg = document.getElementById("graph");
  const W = 640, H = 180, PAD = 30, NS = "http://www.w3.org/2000/svg";
  svg.replaceChildren();
  const series = [...points.values()].sort((a, b) => a.t - b.t);
  // The span shown: what history there is, from two minutes up to HISTORY_S.
  const span = Math.min(HISTORY_S, Math.max(120, series.length ? now - series[0].t : 0));
  const y = ms => {  // log scale, 0.1 ms to 10 s
    const v = Math.log10(Math.min(Math.max(ms, 0.1), 10000));
    return H - PAD / 2 - (v + 1) / 5 * (H - PAD);
  };
  const x = t => PAD + (t - (now - span)) / span * (W - PAD - 5);
  for (const ms of [0.1, 1, 10, 100, 1000, 10000]) {
    const line = document.createElementNS(NS, "line");
    line.setAttribute("x1", PAD); line.setAttribute("x2", W);
    line.setAttribute("y1", y(ms)); line.setAttribute("y2", y(ms));
    line.setAttribute("stroke", "#eaeef2");
    svg.appendChild(line);
    const label = document.createElementNS(NS, "text");
    label.setAttribute("x", 2); label.setAttribute("y", y(ms) + 4);
    label.setAttribute("font-size", "10"); label.setAttribute("fill", "#656d76");
    label.textContent = ms >= 1000 ? ms / 1000 + "s" : String(ms);
    svg.appendChild(label);
  }
  for (const [t, label] of [[now - span, "-" + Math.round(span / 60) + " min"], [now, "now"]]) {
    const mark = document.createElementNS(NS, "text");
    mark.setAttribute("x", t === now ? W - 25 : PAD); mark.setAttribute("y", H - 2);
    mark.setAttribute("font-size", "10"); mark.setAttribute("fill", "#656d76");
    mark.textContent = label;
    svg.appendChild(mark);
  }
  for (const key of ["p50_ms", "p99_ms"]) {
    const pts = series.filter(p => p[key] !== null)
      .map(p => x(p.t).toFixed(1) + "," + y(p[key]).toFixed(1));
    if (!pts.length) continue;
    const line = document.createElementNS(NS, "polyline");
    line.setAttribute("points", pts.join(" "));
    line.setAttribute("fill", "none");
    line.setAttribute("stroke-width", "2");
    line.setAttribute("class", key === "p50_ms" ? "p50" : "p99");
    svg.appendChild(line);
  }
}

// With bearer tokens (--tokens), open the page as /#token=<an admin token>: the fragment never
// leaves the browser; it is kept for this tab only and taken out of the address bar.
const TOKEN = (() => {
  const found = /(?:^#|&)token=([^&]+)/.exec(location.hash);
  if (found) {
    sessionStorage.setItem("zkv-token", decodeURIComponent(found[1]));
    history.replaceState(null, "", location.pathname + location.search);
  }
  return sessionStorage.getItem("zkv-token");
})();

async function poll() {
  try {
    const headers = TOKEN ? {"Authorization": "Bearer " + TOKEN} : {};
    const answer = await fetch("/v1/status", {cache: "no-store", headers});
    const status = await answer.json();
    show(status);
  } catch (error) {
    show({status: "unavailable", error: String(error), time: Date.now() / 1000, shards: []});
  }
  answers += 1;
  document.body.dataset.updated = String(answers);
  setTimeout(poll, POLL_MS);
}
poll();
</script>
</body>
</html>
"""
