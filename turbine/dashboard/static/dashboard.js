// Turbine's fleet dashboard: one EventSource, the state it carries, and the DOM drawn from it.
// No framework, no build step, nothing fetched from elsewhere. Every value from the server is
// put in the page as text (textContent / setAttribute), never parsed as HTML.
"use strict";

const MAX_DECISION_ROWS = 60;   // shown; the server keeps 200 per router
const MAX_DECISIONS = 400;      // kept here
const MAX_PLANNER = 200;
const MAX_GONE = 12;
const SVG = "http://www.w3.org/2000/svg";
const COLORS = { blue: "#4c9aff", green: "#3fb950", amber: "#d29922", red: "#f85149", violet: "#a371f7", cyan: "#39c5cf", gray: "#8b98a5" };

const S = {
  meta: { interval_s: 1, history_s: 600, planner: false }, models: [], workers: [], history: [],
  decisions: new Map(), planner: new Map(), disagg: {}, gone: [], updates: 0, lastAt: 0, seen: new Set(),
};
window.turbineDashboard = S; // for debugging from the console, and the browser test
S.errors = []; // script errors and refused content (CSP): the browser test insists there are none
window.addEventListener("error", (e) => S.errors.push(String(e.message)));
document.addEventListener("securitypolicyviolation", (e) => S.errors.push(`CSP ${e.violatedDirective}: ${e.sample || e.blockedURI}`));

// --- helpers ------------------------------------------------------------------------------------
function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    // styles through the CSSOM: the page's CSP refuses style attributes
    if (k === "class") e.className = v; else if (k === "style") Object.assign(e.style, v); else e.setAttribute(k, v);
  }
  for (const c of children) if (c !== null && c !== undefined) e.append(c instanceof Node ? c : String(c));
  return e;
}
function svg(tag, attrs) {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  return e;
}
function fmt(v, digits) {
  if (v === null || v === undefined || Number.isNaN(v)) return "–";
  const a = Math.abs(v);
  if (digits !== undefined) return v.toFixed(digits);
  if (a >= 1e9) return (v / 1e9).toFixed(1) + "G";
  if (a >= 1e6) return (v / 1e6).toFixed(1) + "M";
  if (a >= 1e4) return (v / 1e3).toFixed(1) + "k";
  if (a >= 100) return v.toFixed(0);
  if (a >= 10) return v.toFixed(1);
  return v.toFixed(2);
}
function bytes(v) { return v === null || v === undefined ? "–" : fmt(v) + "B"; }
function shortId(id) { return id.replace(/^worker-/, "").slice(0, 8); }
function clock(t) { return new Date(t * 1000).toLocaleTimeString([], { hour12: false }); }
function mean(xs) { const v = xs.filter((x) => x !== null && x !== undefined); return v.length ? v.reduce((a, b) => a + b, 0) / v.length : null; }
function recent(field, seconds) { return mean(S.history.slice(-Math.max(1, Math.round(seconds / S.meta.interval_s))).map((p) => p[field])); }
function replaceRows(tbody, rows) { tbody.replaceChildren(...rows); }

// --- state ----------------------------------------------------------------------------------------
function apply(u) {
  if (u.reset) { S.history = []; S.decisions.clear(); S.planner.clear(); }
  S.meta = u.meta; S.models = u.models; S.workers = u.workers; S.disagg = u.disagg; S.lastAt = u.t; S.updates += 1;
  for (const p of u.history) S.history.push(p);
  const horizon = (S.history.length ? S.history[S.history.length - 1].t : u.t) - S.meta.history_s;
  while (S.history.length && S.history[0].t < horizon) S.history.shift();
  for (const d of u.decisions) S.decisions.set(d.key, d);
  if (S.decisions.size > MAX_DECISIONS) {
    const old = [...S.decisions.values()].sort((a, b) => a.at - b.at).slice(0, S.decisions.size - MAX_DECISIONS);
    for (const d of old) S.decisions.delete(d.key);
  }
  for (const a of u.planner) S.planner.set(a.key, a);
  if (S.planner.size > MAX_PLANNER) {
    const old = [...S.planner.values()].sort((a, b) => a.at - b.at).slice(0, S.planner.size - MAX_PLANNER);
    for (const a of old) S.planner.delete(a.key);
  }
  for (const id of u.left) S.gone.unshift({ id, at: u.t });
  S.gone = S.gone.slice(0, MAX_GONE);
  scheduleRender();
}

let renderPending = false;
function scheduleRender() {
  if (renderPending) return;
  renderPending = true;
  setTimeout(() => { renderPending = false; render(); }, 30);
}

// --- rendering --------------------------------------------------------------------------------------
function render() {
  renderHeader();
  renderCards();
  renderCharts();
  renderFleet();
  renderDecisions();
  renderDisagg();
  renderPlanner();
}

function renderHeader() {
  document.getElementById("models").replaceChildren(...S.models.map((m) =>
    el("span", { class: "model", "data-model": m.name }, m.name, " ", el("span", { class: "dim" },
      `${m.policy} · ${m.workers} workers` + (m.queued ? ` · ${m.queued} queued` : "")))));
  document.getElementById("updated").textContent = S.lastAt ? "updated " + clock(S.lastAt) : "";
  const mins = Math.round(S.meta.history_s / 60);
  document.getElementById("history-span").textContent = mins >= 1 ? `${mins} min` : `${S.meta.history_s} s`;
}

function renderCards() {
  const ws = S.workers;
  document.getElementById("worker-count").textContent = String(ws.length);
  const roles = {};
  for (const w of ws) roles[w.role] = (roles[w.role] || 0) + 1;
  const bad = ws.filter((w) => w.state === "suspect" || w.state === "silent").length;
  document.getElementById("worker-roles").textContent =
    Object.entries(roles).map(([r, n]) => `${n} ${r}`).join(" · ") + (bad ? ` · ${bad} unhealthy` : "");
  const last = S.history.length ? S.history[S.history.length - 1] : null;
  document.getElementById("stat-rps").textContent = fmt(recent("requests_ps", 5));
  document.getElementById("stat-inflight").textContent = last ? `${last.inflight} in flight` : "";
  document.getElementById("stat-tps").textContent = fmt(recent("output_tps", 5));
  document.getElementById("stat-prompt").textContent = last ? `prompt ${fmt(recent("prompt_tps", 5))}/s · cached ${fmt(recent("cached_tps", 5))}/s` : "";
  document.getElementById("stat-ttft").textContent = `${fmt(recent("ttft_ms_p50", 10))} / ${fmt(recent("ttft_ms_p90", 10))}`;
  document.getElementById("stat-itl").textContent = `${fmt(recent("itl_ms_p50", 10))} / ${fmt(recent("itl_ms_p90", 10))}`;
  let active = 0, total = 0, waiting = 0;
  for (const w of ws) { active += w.kv_active_blocks; total += w.kv_total_blocks; waiting += w.waiting; }
  document.getElementById("stat-kv").textContent = total ? (100 * active / total).toFixed(1) + "%" : "–";
  const queued = S.models.reduce((a, m) => a + m.queued, 0);
  document.getElementById("stat-queue").textContent = `${fmt(active, 0)} of ${fmt(total, 0)} blocks · ${waiting} waiting` + (queued ? ` · ${queued} in the frontend's queue` : "");
}

function series(field, scale) {
  const k = scale || 1;
  return S.history.map((p) => [p.t, p[field] === null || p[field] === undefined ? null : p[field] * k]);
}

function renderCharts() {
  chart("c-tput", [
    { name: "output tok/s", color: COLORS.blue, data: series("output_tps"), area: true },
    { name: "prompt tok/s", color: COLORS.violet, data: series("prompt_tps") },
    { name: "cached tok/s", color: COLORS.cyan, data: series("cached_tps") },
  ]);
  chart("c-ttft", [
    { name: "p50", color: COLORS.green, data: series("ttft_ms_p50") },
    { name: "p90", color: COLORS.amber, data: series("ttft_ms_p90") },
    { name: "mean", color: COLORS.gray, data: series("ttft_ms_mean"), dash: true },
  ]);
  chart("c-itl", [
    { name: "p50", color: COLORS.green, data: series("itl_ms_p50") },
    { name: "p90", color: COLORS.amber, data: series("itl_ms_p90") },
    { name: "mean", color: COLORS.gray, data: series("itl_ms_mean"), dash: true },
  ]);
  chart("c-load", [
    { name: "running", color: COLORS.blue, data: series("running"), area: true },
    { name: "waiting", color: COLORS.amber, data: series("waiting") },
    { name: "in flight", color: COLORS.gray, data: series("inflight"), dash: true },
    { name: "req/s", color: COLORS.green, data: series("requests_ps") },
  ]);
  chart("c-kv", [{ name: "in use", color: COLORS.violet, data: series("kv_used", 100), area: true }], { max: 100 });
}

function niceMax(v) {
  if (!(v > 0)) return 1;
  const p = Math.pow(10, Math.floor(Math.log10(v)));
  for (const m of [1, 2, 2.5, 5, 10]) if (v <= m * p) return m * p;
  return 10 * p;
}

function chart(id, lines, opts) {
  const node = document.getElementById(id);
  if (!node || node.closest("[hidden]")) return;
  const W = Math.max(120, node.clientWidth || 300), H = Math.max(60, node.clientHeight || 150);
  node.setAttribute("viewBox", `0 0 ${W} ${H}`);
  const padL = 38, padR = 6, padT = 6, padB = 16;
  const end = S.history.length ? S.history[S.history.length - 1].t : Date.now() / 1000;
  // the window the data covers, in whole minutes (a fresh fleet's first minute is not squeezed into ten)
  const covered = S.history.length ? end - S.history[0].t : 0;
  const span = Math.min(S.meta.history_s, Math.max(60, Math.ceil(covered / 60) * 60)), start = end - span;
  let ymax = (opts && opts.max) || 0;
  if (!(opts && opts.max)) for (const l of lines) for (const [, v] of l.data) if (v !== null && v > ymax) ymax = v;
  ymax = (opts && opts.max) || niceMax(ymax);
  const x = (t) => padL + (W - padL - padR) * (t - start) / span;
  const y = (v) => H - padB - (H - padT - padB) * Math.min(v, ymax) / ymax;
  const kids = [];
  for (let i = 0; i <= 4; i++) {
    const v = ymax * i / 4, yy = y(v);
    kids.push(svg("line", { class: "grid-line", x1: padL, x2: W - padR, y1: yy, y2: yy }));
    const t = svg("text", { x: padL - 4, y: yy + 3, "text-anchor": "end" }); t.textContent = fmt(v); kids.push(t);
  }
  const ticks = span >= 240 ? [span, span * 0.75, span / 2, span / 4, 0] : [span, span / 2, 0];
  for (const ago of ticks) {
    const t = svg("text", { x: x(end - ago), y: H - 3, "text-anchor": ago === span ? "start" : ago === 0 ? "end" : "middle" });
    t.textContent = ago === 0 ? "now" : ago >= 60 ? `-${Math.round(ago / 60)}m` : `-${Math.round(ago)}s`;
    kids.push(t);
  }
  for (const l of lines) {
    let d = "", pen = false, area = "", runStart = null, lastX = null, lastY = null, run = 0;
    const dots = [];
    const endRun = () => {
      if (pen && l.area) area += `L${lastX},${y(0)}L${runStart},${y(0)}Z`;
      if (pen && run === 1) dots.push([lastX, lastY]); // a lone point draws no line
      pen = false; run = 0;
    };
    for (const [t, v] of l.data) {
      if (t < start) continue;
      if (v === null) { endRun(); continue; }
      const px = x(t).toFixed(1), py = y(v).toFixed(1);
      d += (pen ? "L" : "M") + px + "," + py;
      if (l.area) area += (pen ? "L" : "M") + px + "," + py;
      if (!pen) runStart = px;
      pen = true; lastX = px; lastY = py; run += 1;
    }
    endRun();
    for (const [cx, cy] of dots) kids.push(svg("circle", { cx, cy, r: 2, fill: l.color }));
    if (l.area && area) kids.push(svg("path", { class: "area", d: area, fill: l.color }));
    if (d) kids.push(svg("path", Object.assign({ class: "series", d, stroke: l.color }, l.dash ? { "stroke-dasharray": "4 3" } : {})));
  }
  node.replaceChildren(...kids);
  const legend = document.querySelector(`.legend[data-for="${id}"]`);
  if (legend && !legend.childElementCount) {
    legend.replaceChildren(...lines.map((l) => el("span", {}, el("i", { style: { background: l.color } }), l.name)));
  }
}

function bar(used, total, cls) {
  const pct = total ? Math.min(100, 100 * used / total) : 0;
  return el("span", {}, el("span", { class: "bar " + (cls || ""), title: `${used} of ${total} blocks` },
    el("b", { style: { width: pct.toFixed(1) + "%" } })), el("span", { class: "bar-label" }, total ? pct.toFixed(0) + "%" : "–"));
}

function renderFleet() {
  const rows = [];
  let host = null;
  const hosts = {};
  for (const w of S.workers) (hosts[w.host] = hosts[w.host] || []).push(w);
  for (const w of S.workers) {
    if (w.host !== host) {
      host = w.host;
      const group = hosts[host];
      const pids = [...new Set(group.map((g) => g.pid).filter(Boolean))];
      rows.push(el("tr", { class: "host" }, el("td", { colspan: 11 },
        `host ${host} · ${group.length} worker${group.length === 1 ? "" : "s"}` + (pids.length ? ` · pid ${pids.join(", ")}` : ""))));
    }
    const tier = (name) => w.tiers.find((t) => t.tier === name);
    const cell = (t, cls) => t ? bar(t.blocks, t.capacity_blocks, cls) : el("span", { class: "dim" }, "–");
    const state = w.state === "suspect" ? `suspect ${fmt(w.suspect_s, 1)}s` : w.state;
    rows.push(el("tr", { "data-worker": w.id, "data-state": w.state },
      el("td", { title: w.id + (w.engine ? ` (${w.engine})` : "") }, w.id),
      el("td", {}, w.model),
      el("td", { class: "role" }, w.role),
      el("td", {}, el("span", { class: "state state-" + w.state }, state)),
      el("td", { class: "num" }, w.running),
      el("td", { class: "num" }, w.waiting),
      el("td", { class: "num", title: w.router_foreign ? `${w.router_foreign} from other frontends` : "" },
        `${w.router_active} / ${w.router_queued}`),
      el("td", {}, bar(w.kv_active_blocks, w.kv_total_blocks)),
      el("td", {}, cell(tier("host"), "host")),
      el("td", {}, cell(tier("disk"), "disk")),
      el("td", { class: "num dim" }, w.report_age_s === null ? "–" : fmt(w.report_age_s, 1) + " s")));
  }
  replaceRows(document.querySelector("#fleet tbody"), rows);
  document.getElementById("fleet-note").textContent = `${S.workers.length} workers on ${Object.keys(hosts).length} host${Object.keys(hosts).length === 1 ? "" : "s"}`;
  const now = S.lastAt;
  document.getElementById("left").replaceChildren(...(S.gone.length ? [el("span", {}, "left: ")] : []),
    ...S.gone.map((g) => el("span", { class: "gone", "data-gone": g.id }, `${g.id} (${Math.max(0, Math.round(now - g.at))} s ago)`)));
}

function alternatives(d) {
  if (!d.alternatives) return el("span", { class: "dim" }, "over the detail budget");
  return el("div", { class: "alts" }, ...d.alternatives.slice(0, 5).map((a) => {
    const val = a.ttft_ms !== null && a.ttft_ms !== undefined ? `${fmt(a.ttft_ms)} ms` : `cost ${fmt(a.cost)}`;
    return el("span", { class: "alt" + (a.worker === d.worker ? " chosen" : ""), title: a.worker + (a.itl_ms ? ` · imposes ITL ${fmt(a.itl_ms)} ms` : "") },
      el("span", { class: "w" }, shortId(a.worker)), `${val} · ${fmt(a.overlap_blocks, a.overlap_blocks % 1 ? 1 : 0)} blk`);
  }));
}

function renderDecisions() {
  const ds = [...S.decisions.values()].sort((a, b) => b.at - a.at).slice(0, MAX_DECISION_ROWS);
  const rows = ds.map((d) => {
    const actual = d.actual_cached_blocks;
    const ovCls = actual === null ? "dim" : actual >= d.overlap_blocks ? "hit" : "miss";
    const fresh = !S.seen.has(d.key);
    S.seen.add(d.key);
    return el("tr", { "data-key": d.key, "data-worker": d.worker, class: fresh && S.updates > 1 ? "fresh" : null },
      el("td", { class: "dim" }, clock(d.at)),
      el("td", { title: d.request_id }, el("span", { class: "ellipsis" }, d.request_id)),
      el("td", { class: "role" }, d.model + (d.pool === "prefill" ? " · prefill" : d.remote_kv ? " · decode, remote KV" : "")),
      el("td", { title: d.worker }, d.worker),
      el("td", { class: "num" }, `${d.overlap_blocks} → `, el("span", { class: ovCls }, actual === null ? "…" : String(actual))),
      el("td", { class: "num" }, `${fmt(d.predicted_ttft_ms)} → ${fmt(d.actual_ttft_ms)}`),
      el("td", {}, alternatives(d)));
  });
  replaceRows(document.querySelector("#decisions tbody"), rows);
  if (S.seen.size > 4 * MAX_DECISIONS) S.seen = new Set(S.decisions.keys());
  const m = S.meta;
  document.getElementById("routing-note").textContent =
    `${m.decisions_logged} routed` + (m.decisions_without_detail ? `, ${m.decisions_without_detail} without alternatives (rate budget)` : "");
}

function renderDisagg() {
  const d = S.disagg || {};
  const counts = d.decisions || {};
  const any = Object.values(counts).some((n) => n > 0) || S.workers.some((w) => w.role !== "aggregated");
  const panel = document.getElementById("disagg-panel");
  panel.hidden = !any;
  if (any) {
    const chip = (label, v) => el("span", { class: "chip" }, el("b", {}, fmt(v, 0)), label);
    document.getElementById("disagg-counts").replaceChildren(
      ...Object.entries(counts).map(([k, n]) => chip(k.replaceAll("_", " "), n)),
      chip("blocks pulled", d.pulled_blocks || 0), chip("prefill failures", d.prefill_failures || 0),
      chip("transfers refused", d.transfer_errors || 0), chip("held KV released", d.releases || 0));
    chart("c-disagg", [
      { name: "remote prefill/s", color: COLORS.violet, data: series("disagg_remote_ps") },
      { name: "local/s", color: COLORS.gray, data: series("disagg_local_ps") },
      { name: "blocks pulled/s", color: COLORS.cyan, data: series("pulled_blocks_ps"), area: true },
    ]);
  }
  const tiers = S.workers.some((w) => w.tiers.length) || S.history.some((p) => p.onboard_bps || p.offload_bps);
  const tp = document.getElementById("tiers-panel");
  tp.hidden = !tiers;
  if (tiers) {
    chart("c-tiers", [
      { name: "onboarded to GPU", color: COLORS.green, data: series("onboard_bps"), area: true },
      { name: "offloaded from GPU", color: COLORS.amber, data: series("offload_bps") },
    ]);
  }
}

function renderPlanner() {
  const panel = document.getElementById("planner-panel");
  panel.hidden = !S.meta.planner && !S.planner.size;
  if (panel.hidden) return;
  const acts = [...S.planner.values()].sort((a, b) => b.at - a.at).slice(0, 50);
  const rows = acts.map((a) => el("tr", { "data-action": a.key },
    el("td", { class: "dim" }, clock(a.at)),
    el("td", {}, a.pool),
    el("td", {}, el("span", { class: "action action-" + a.action }, a.action)),
    el("td", { class: "num", title: `needed by the replica math: ${a.needed}` }, `${a.current} → ${a.target} (needs ${a.needed})`),
    el("td", {}, a.reason || el("span", { class: "dim" }, "within bounds")),
    el("td", { class: "num" }, `${fmt(a.rate)} → ${fmt(a.predicted_rate)}`),
    el("td", { class: "num" }, `${fmt(a.ttft_ms)} / ${fmt(a.itl_ms)}`),
    el("td", { class: "num" }, `${fmt(a.correction_ttft)} / ${fmt(a.correction_itl)}`)));
  if (!rows.length) rows.push(el("tr", {}, el("td", { colspan: 8, class: "dim" }, "no decision yet (one per planner interval)")));
  replaceRows(document.querySelector("#planner tbody"), rows);
}

// --- the stream ---------------------------------------------------------------------------------
function setConn(state) {
  const c = document.getElementById("conn");
  c.dataset.state = state;
  c.textContent = state;
}

function connect() {
  const es = new EventSource("events");
  es.onopen = () => setConn("live");
  es.onmessage = (e) => { try { apply(JSON.parse(e.data)); } catch (err) { console.error("bad update", err); } };
  es.onerror = () => {
    setConn("reconnecting");
    if (es.readyState === EventSource.CLOSED) setTimeout(connect, 5000); // refused (e.g. 503): the browser gave up
    // Signed out (the server restarted: its cookie secret changed)? Then the page itself asks for the key.
    fetch("state", { method: "HEAD", cache: "no-store" }).then((r) => { if (r.status === 401) location.reload(); }).catch(() => {});
  };
}

window.addEventListener("resize", scheduleRender);
connect();
