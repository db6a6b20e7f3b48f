// The session page's live grid: rows from state.json, updates from the session's event
// stream (SSE, authenticated by the log-in cookie). Rows are updated in place and the grid is
// redrawn at most 4 times a second, so 500 machines reporting every second stay smooth.
"use strict";
(function () {
  const root = document.getElementById("session");
  const id = root.dataset.id;
  const base = location.pathname.replace(/\/sessions\/\d+.*$/, "");
  const tbody = document.getElementById("rows");
  const ENDED = ["succeeded", "failed", "evicted", "cancelled", "no-show"];
  const rows = new Map();          // machine id -> row object
  const dirty = new Set();          // rows whose cells need redrawing
  let sortKey = "name", sortDir = 1, needSort = true, needFilter = true;
  let sessionState = root.dataset.state;
  let reloadTimer = null;
  // The throughput chart: the server's history from state.json (the whole session, at most
  // ~600 points), then one point a second from the session.stats events.
  const chart = [];                 // {t (epoch s), sender, median} in MB/s
  const CHART_MAX = 1200;           // beyond this, neighbouring points are averaged pairwise
  let historyLoaded = false, chartDirty = false;

  function pct(r) { return r.state === "succeeded" ? 100 : (r.total ? 100 * r.done / r.total : 0); }
  function eta(r) {
    if ((r.state !== "receiving" && r.state !== "catchup") || !r.rate || !r.total) return Infinity;
    return (r.total - r.done) * 8 / r.rate;
  }
  function fmtEta(s) {
    if (!isFinite(s)) return "–";
    s = Math.round(s);
    return s >= 3600 ? `${Math.floor(s / 3600)}h${String(Math.floor(s / 60) % 60).padStart(2, "0")}`
         : s >= 60 ? `${Math.floor(s / 60)}m${String(s % 60).padStart(2, "0")}` : `${s}s`;
  }
  // Issue 9: what the agent does now, and how much of the image its disk already held.
  const PHASES = {hashing: "hashing", multicast: "multicast", catchup: "catch-up", verifying: "verifying"};
  function phaseText(r) {
    if (r.state === "succeeded") return r.via === "catchup" ? "done by catch-up" : "done";
    if (ENDED.includes(r.state)) return "–";
    if (r.state === "catchup" && !r.phase) return "catch-up";
    return PHASES[r.phase] || "–";
  }
  function fmtBytes(n) {
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
    return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
  }
  function sparedText(r) {
    if (!r.held) return "–";
    const share = r.total ? ` ${Math.round(100 * r.held / r.total)}% ·` : "";
    return `spared${share} ${fmtBytes(r.held)}`;
  }
  function median(xs) {
    if (!xs.length) return 0;
    const a = xs.slice().sort((x, y) => x - y), m = a.length >> 1;
    return a.length % 2 ? a[m] : (a[m - 1] + a[m]) / 2;
  }

  function makeRow(r) {
    const tr = document.createElement("tr");
    tr.dataset.id = r.id;
    for (let i = 0; i < 10; i++) tr.appendChild(document.createElement("td"));
    tr.cells[0].textContent = r.name || `machine ${r.id}`;
    const mac = document.createElement("span");
    mac.className = "mac";
    mac.textContent = r.mac;
    tr.cells[0].appendChild(mac);
    tr.cells[0].title = `machine ${r.id}`;
    for (const i of [2, 3, 4, 5, 6, 8]) tr.cells[i].className = "num";
    tr.cells[9].className = "reason";
    r.tr = tr;
    tbody.appendChild(tr);
    return r;
  }

  function upsert(cols, values) {
    const o = {};
    cols.forEach((c, i) => { o[c] = values[i]; });
    let r = rows.get(o.id);
    if (!r) { r = makeRow(o); rows.set(o.id, r); needSort = true; }
    if (r.state !== o.state) needSort = needFilter = true;
    Object.assign(r, o);
    dirty.add(r);
  }

  async function load() {
    const resp = await fetch(`${base}/sessions/${id}/state.json`, {credentials: "same-origin"});
    if (resp.status === 401 || resp.redirected) { location.reload(); return; }
    const data = await resp.json();
    for (const m of data.machines) upsert(data.columns, m);
    if (!historyLoaded) loadHistory(data.history);
    setSessionState(data.state, data.reason);
    document.getElementById("t-counts").textContent =
      Object.entries(data.counts).map(([k, v]) => `${v} ${k}`).join(" · ");
  }

  function setSessionState(state, reason) {
    sessionState = state;
    const el = document.getElementById("session-state");
    el.textContent = state;
    el.className = `state st-${state}`;
    root.dataset.state = state;
    for (const f of document.querySelectorAll(".actions form")) {
      f.hidden = !f.dataset.when.split(" ").includes(state);
    }
    const why = document.getElementById("session-reason");
    why.textContent = reason || "";
    why.hidden = !reason;
  }

  function scheduleReload() {
    if (reloadTimer === null) reloadTimer = setTimeout(() => { reloadTimer = null; load(); }, 500);
  }

  function onProgress(m) {
    const r = rows.get(m.machine_id);
    if (!r) { scheduleReload(); return; }
    r.done = m.bytes_done; r.total = m.bytes_total; r.rate = m.rate_bps;
    r.loss = m.loss; r.naks = m.naks;
    if (m.phase) { r.phase = m.phase; r.held = m.held_bytes || 0; }
    const next = m.phase === "catchup" || (r.state === "catchup" && m.phase !== "multicast")
      ? "catchup" : "receiving";
    if (r.state !== next && !ENDED.includes(r.state)) { r.state = next; needFilter = true; }
    dirty.add(r);
    if (sortKey !== "name" && sortKey !== "state") needSort = true;
  }

  function loadHistory(h) {
    if (!h || !h.points || !h.points.length || h.start == null) return;
    historyLoaded = true;
    const past = h.points.map(p => ({t: h.start + p[0], sender: p[1], median: p[2]}));
    const last = past[past.length - 1].t;
    const live = chart.filter(p => p.t > last);    // samples that came before state.json did
    chart.splice(0, chart.length, ...past, ...live);
    chartDirty = true;
  }

  function onStats(m) {
    if (typeof m.t !== "number") return;
    chart.push({t: m.t, sender: m.sender_mbps || 0, median: m.median_mbps || 0});
    if (chart.length > CHART_MAX) {
      const halved = [];
      for (let i = 0; i + 1 < chart.length; i += 2) {
        const a = chart[i], b = chart[i + 1];
        halved.push({t: a.t, sender: (a.sender + b.sender) / 2, median: (a.median + b.median) / 2});
      }
      if (chart.length % 2) halved.push(chart[chart.length - 1]);
      chart.splice(0, chart.length, ...halved);
    }
    chartDirty = true;
  }

  function drawChart() {
    chartDirty = false;
    if (chart.length < 2) return;
    const t0 = chart[0].t, t1 = chart[chart.length - 1].t || t0 + 1;
    let top = 1;
    for (const p of chart) top = Math.max(top, p.sender, p.median);
    top *= 1.1;
    const pts = key => chart.map(p =>
      `${(600 * (p.t - t0) / Math.max(1, t1 - t0)).toFixed(1)},${(139 - 135 * p[key] / top).toFixed(1)}`).join(" ");
    document.getElementById("line-sender").setAttribute("points", pts("sender"));
    document.getElementById("line-median").setAttribute("points", pts("median"));
    document.getElementById("chart-max").textContent = `top ${top.toFixed(1)} MB/s, over ${fmtEta(t1 - t0)}`;
  }

  function sortValue(r, key) {
    switch (key) {
      case "pct": return pct(r);
      case "eta": return eta(r);
      case "rate": return r.rate || 0;
      case "name": return (r.name || r.mac).toLowerCase();
      default: return r[key] ?? "";
    }
  }

  const perf = {renders: 0, lastMs: 0, maxMs: 0};   // read by the browser tests
  function render() {
    const t0 = performance.now();
    renderNow();
    perf.lastMs = performance.now() - t0;
    perf.maxMs = Math.max(perf.maxMs, perf.lastMs);
    perf.renders++;
    if (chartDirty) drawChart();
  }

  function renderNow() {
    const all = [...rows.values()];
    const active = all.filter(r => r.state === "receiving");
    const medPct = median(active.map(pct)), medRate = median(active.map(r => r.rate || 0));
    for (const r of dirty) {
      const c = r.tr.cells, p = pct(r);
      c[1].textContent = r.state;
      c[1].className = `st-${r.state}`;
      c[2].textContent = p.toFixed(1);
      c[3].textContent = r.rate ? (r.rate / 8e6).toFixed(1) : "–";
      c[4].textContent = fmtEta(eta(r));
      c[5].textContent = `${(100 * (r.loss || 0)).toFixed(1)}%`;
      c[6].textContent = r.naks || 0;
      c[7].textContent = phaseText(r);
      c[7].className = `ph-${r.phase || "none"}`;
      c[8].textContent = sparedText(r);
      c[9].textContent = r.reason || "";
    }
    dirty.clear();
    // A laggard: receiving, and well behind the median machine in progress or speed.
    for (const r of all) {
      const lag = r.state === "receiving" && active.length > 2 &&
        (pct(r) < medPct - 10 || (medRate > 0 && (r.rate || 0) < medRate / 2));
      if (lag !== r.lag) { r.lag = lag; r.tr.classList.toggle("laggard", lag); needFilter = true; }
    }
    const fractions = all.map(pct);
    if (fractions.length) {
      const lo = Math.min(...fractions), md = median(fractions), hi = Math.max(...fractions);
      document.getElementById("p-slowest").style.width = `${lo}%`;
      document.getElementById("t-slowest").textContent = `${lo.toFixed(1)}%`;
      document.getElementById("t-median").textContent = `${md.toFixed(1)}%`;
      document.getElementById("t-fastest").textContent = `${hi.toFixed(1)}%`;
    }
    sessionTotals(all);
    if (needFilter) applyFilter(all);
    if (needSort) {
      all.sort((a, b) => {
        const x = sortValue(a, sortKey), y = sortValue(b, sortKey);
        return (x < y ? -1 : x > y ? 1 : a.id - b.id) * sortDir;
      });
      const frag = document.createDocumentFragment();
      for (const r of all) frag.appendChild(r.tr);
      tbody.appendChild(frag);
      needSort = false;
    }
  }

  // The session's totals: bytes the disks already held (not sent), machines done by catch-up.
  function sessionTotals(all) {
    let held = 0, total = 0, byCatchup = 0, catching = 0;
    for (const r of all) {
      held += r.held || 0; total += r.total || 0;
      if (r.state === "succeeded" && r.via === "catchup") byCatchup++;
      if (r.state === "catchup") catching++;
    }
    const parts = [];
    if (held) parts.push(`spared ${fmtBytes(held)} (${Math.round(100 * held / Math.max(1, total))}%)`);
    if (byCatchup) parts.push(`${byCatchup} by catch-up`);
    if (catching) parts.push(`${catching} catching up`);
    document.getElementById("t-spared").textContent = parts.join(" · ");
  }

  function applyFilter(all) {
    const q = document.getElementById("filter").value.trim().toLowerCase();
    const st = document.getElementById("state-filter").value;
    const lagOnly = document.getElementById("laggards-only").checked;
    let shown = 0;
    for (const r of all) {
      const text = `${r.name} ${r.mac} ${r.reason}`.toLowerCase();
      const ok = (!q || text.includes(q)) && (!st || r.state === st) && (!lagOnly || r.lag);
      r.tr.hidden = !ok;
      shown += ok;
    }
    document.getElementById("shown").textContent = `${shown} of ${all.length} machines shown`;
    needFilter = false;
  }

  for (const th of document.querySelectorAll("#grid th[data-key]")) {
    th.addEventListener("click", () => {
      sortDir = sortKey === th.dataset.key ? -sortDir : 1;
      sortKey = th.dataset.key;
      for (const o of document.querySelectorAll("#grid th")) o.removeAttribute("aria-sort");
      th.setAttribute("aria-sort", sortDir > 0 ? "ascending" : "descending");
      needSort = true;
    });
  }
  for (const id of ["filter", "state-filter", "laggards-only"]) {
    document.getElementById(id).addEventListener("input", () => { needFilter = true; });
  }

  setSessionState(sessionState, document.getElementById("session-reason").textContent.trim());
  load().then(render);
  setInterval(render, 250);
  // Safety net: events a slow tab missed (the server drops a lagging stream's oldest).
  setInterval(() => { if (!ENDED.concat(["partial"]).includes(sessionState)) load(); }, 5000);
  const events = new EventSource(`${base}/sessions/${id}/events`);
  events.addEventListener("machine.progress", e => onProgress(JSON.parse(e.data)));
  events.addEventListener("session.stats", e => onStats(JSON.parse(e.data)));
  events.onmessage = scheduleReload;
  for (const kind of ["session.running", "session.transfer-started", "session.succeeded", "session.partial", "session.failed",
                      "session.cancelled", "machine.assigned", "machine.receiving",
                      "machine.succeeded", "machine.failed", "machine.evicted", "machine.cancelled",
                      "machine.no-show", "machine.catchup", "machine.spared",
                      "session.transfer-ended"]) {
    events.addEventListener(kind, scheduleReload);
  }
  window.fleetcastGrid = {rows, render, chart, perf};   // for the browser tests
})();
