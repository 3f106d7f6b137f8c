// The dashboard's script: polls /stats, draws tiles, charts (uPlot) and
// tables. Rates are deltas of /stats counters between two polls, so a rate
// appears from the second poll on. Data from /stats (key names above all)
// only ever reaches the DOM as textContent, never as markup.
"use strict";
(function () {
  const POLL_MS = 1000;
  // Points kept per chart: five minutes at one poll a second.
  const KEEP = 300;
  const PATHS = ["l1_hit", "shared", "pinned", "blocking", "script"];
  const COLOURS = ["#3fb950", "#58a6ff", "#d29922", "#bc8cff", "#f85149"];

  // The token arrives as /?token=… (a page load cannot carry a header).
  // It leaves the address bar and history at once and lives in memory only,
  // sent as a header on every fetch.
  const params = new URLSearchParams(location.search);
  const token = params.get("token");
  if (token !== null) {
    params.delete("token");
    const rest = params.toString();
    history.replaceState(null, "", location.pathname + (rest ? "?" + rest : "") + location.hash);
  }
  const headers = token ? { Authorization: "Bearer " + token } : {};

  // What a test (or a curious operator) can read: polls done, last failure.
  const state = { polls: 0, lastError: null };
  window.nearcacheDashboard = state;

  const $ = (id) => document.getElementById(id);
  const setText = (id, v) => { $(id).textContent = v; };
  const num = (v) => (typeof v === "number" && isFinite(v) ? v : 0);
  const fmtInt = (v) => Math.round(num(v)).toLocaleString("en-US");
  const fmtRate = (v) => (v === null ? "—" : v >= 100 ? fmtInt(v) : num(v).toFixed(1));
  const fmtPct = (v) => (v === null || v === undefined ? "—" : (100 * v).toFixed(1) + " %");
  function fmtBytes(v) {
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let x = num(v), i = 0;
    while (x >= 1024 && i < units.length - 1) { x /= 1024; i++; }
    return (i === 0 ? x.toFixed(0) : x.toFixed(1)) + " " + units[i];
  }
  function fmtUs(v) {
    v = num(v);
    if (v < 1000) return v.toFixed(0) + " µs";
    if (v < 1e6) return (v / 1000).toFixed(1) + " ms";
    return (v / 1e6).toFixed(2) + " s";
  }
  const sum = (obj) => Object.values(obj || {}).reduce((a, b) => a + num(b), 0);

  function pill(id, label, cls) {
    const el = $(id);
    el.textContent = label;
    el.className = "pill " + cls;
  }

  // Replaces a table's body with rows of cells; an empty list is one row
  // saying so.
  function fillTable(id, rows, empty) {
    const body = $(id).tBodies[0];
    const fresh = document.createElement("tbody");
    if (rows.length === 0) {
      const tr = fresh.insertRow();
      const td = tr.insertCell();
      td.colSpan = $(id).tHead.rows[0].cells.length;
      td.className = "none";
      td.textContent = empty;
    }
    for (const cells of rows) {
      const tr = fresh.insertRow();
      for (const c of cells) tr.insertCell().textContent = c;
    }
    body.replaceWith(fresh);
  }

  // Charts: created on the first poll, fed a sliding window after.
  const charts = {};
  const series = { t: [], ops: PATHS.map(() => []), hit: [], p99: PATHS.map(() => []), bytes: [], budget: [] };
  function chart(id, lines, range, format) {
    const el = $(id);
    const opts = {
      width: Math.max(300, el.clientWidth),
      height: 180,
      legend: { live: false },
      cursor: { show: false },
      scales: range ? { y: { range } } : {},
      axes: [
        { stroke: "#8a96a3", grid: { stroke: "#2b343e" } },
        format
          ? { stroke: "#8a96a3", grid: { stroke: "#2b343e" }, size: 80, values: (u, ticks) => ticks.map(format) }
          : { stroke: "#8a96a3", grid: { stroke: "#2b343e" }, size: 60 },
      ],
      series: [{}].concat(lines.map((l, i) => ({ label: l, stroke: COLOURS[i % COLOURS.length], width: 2, points: { show: false } }))),
    };
    const data = [[]].concat(lines.map(() => []));
    return new uPlot(opts, data, el);
  }
  function push(arr, v) {
    arr.push(v);
    if (arr.length > KEEP) arr.shift();
  }
  window.addEventListener("resize", () => {
    for (const [id, u] of Object.entries(charts)) u.setSize({ width: Math.max(300, $(id).clientWidth), height: 180 });
  });

  let prev = null;
  function render(s, now) {
    const req = s.requests || {};
    const lat = req.latency_us || {};
    const cache = typeof s.cache === "object" && s.cache !== null ? s.cache : null;
    const rules = cache ? cache.rules || [] : [];
    const counts = {};
    for (const p of PATHS) counts[p] = num((lat[p] || {}).count);
    const hits = rules.reduce((a, r) => a + num(r.hits), 0);
    const misses = rules.reduce((a, r) => a + num(r.misses), 0);
    const limits = s.limits || {};
    const rejected = Object.values(limits).reduce((a, l) => a + num(l.rejected), 0);

    // Rates from the previous poll (none on the first).
    const dt = prev ? now - prev.now : 0;
    const rate = (a, b) => (dt > 0 ? Math.max(0, a - b) / dt : null);
    const opsByPath = PATHS.map((p) => (prev ? rate(counts[p], prev.counts[p]) : null));
    const opsTotal = prev ? opsByPath.reduce((a, b) => a + b, 0) : null;
    const dHits = prev ? hits - prev.hits : 0, dMiss = prev ? misses - prev.misses : 0;
    const intervalHit = dHits + dMiss > 0 ? dHits / (dHits + dMiss) : null;

    // Header.
    setText("version", s.version ? "v" + s.version : "");
    pill("upstream-state", "upstream " + s.upstream, s.upstream === "up" ? "good" : "bad");
    if (s.bus === "none" || s.bus === undefined) pill("bus-state", "no bus", "");
    else if (s.bus.healthy) pill("bus-state", "bus connected", "good");
    else if (s.bus.l1_usable) pill("bus-state", "bus lost, L1 served", "warn");
    else pill("bus-state", "bus lost", "bad");
    const ready = s.ready || {};
    pill("ready-state", ready.ready ? "ready" : "not ready: " + (ready.why || []).join(", "), ready.ready ? "good" : "bad");
    setText("updated", "updated " + new Date().toLocaleTimeString("en-GB"));

    // Tiles.
    setText("hit-ratio", cache ? fmtPct(cache.hit_ratio) : "L1 off");
    setText("ops-total", fmtRate(opsTotal));
    setText("commands-total", fmtInt(sum(req.commands)));
    setText("clients", fmtInt(req.clients));
    if (cache) {
      const share = cache.max_memory > 0 ? cache.bytes / cache.max_memory : 0;
      setText("l1-bytes", fmtBytes(cache.bytes));
      setText("l1-max", fmtBytes(cache.max_memory));
      setText("l1-share", fmtPct(share));
      setText("l1-keys", fmtInt(cache.keys));
      const bar = $("l1-bar");
      bar.style.width = Math.min(100, 100 * share).toFixed(1) + "%";
      bar.className = share > 0.9 ? "bad" : share > 0.8 ? "warn" : "";
    } else {
      setText("l1-bytes", "L1 off");
    }
    const backlog = s.upstream_backlog || {};
    setText("in-flight", fmtInt(backlog.in_flight));
    setText("max-in-flight", backlog.max_in_flight ? fmtInt(backlog.max_in_flight) : "no cap");
    setText("backlog-refused", fmtInt(backlog.refused));
    if (typeof s.bus === "object" && s.bus !== null) {
      // (No samples until a peer's invalidation arrives.)
      setText("bus-delay", s.bus.delay_samples ? fmtUs(s.bus.delay_p50_us) + " / " + fmtUs(s.bus.delay_p99_us) : "—");
      setText("bus-samples", fmtInt(s.bus.delay_samples));
    } else {
      setText("bus-delay", "no bus");
      setText("bus-samples", "0");
    }
    const peers = s.peers || {};
    setText("peers", peers.live === undefined ? "—" : fmtInt(peers.live));
    setText("peers-awaiting", fmtInt(peers.awaiting));
    setText("limit-rejections", fmtInt(rejected));
    setText("limit-rejections-rate", fmtRate(prev ? rate(rejected, prev.rejected) : null));
    setText("errors-total", fmtInt(sum(req.errors)));

    // Tables.
    fillTable("rules", rules.map((r) => [
      r.prefix !== undefined ? "prefix " + r.prefix : "pattern " + r.pattern,
      r.cache ? (num(r.ttl_ms) / 1000).toFixed(1) + " s" : "not cached",
      fmtInt(r.hits), fmtInt(r.misses), fmtPct(r.hit_ratio), fmtBytes(r.bytes),
    ]), "no rules");
    fillTable("latency", PATHS.map((p, i) => {
      const h = lat[p] || {};
      return [p, fmtRate(opsByPath[i]), fmtInt(h.count), fmtUs(h.p50), fmtUs(h.p99), fmtUs(h.max)];
    }), "no paths");
    fillTable("limits", Object.entries(limits).map(([name, l]) => [name, fmtInt(l.allowed), fmtInt(l.delayed), fmtInt(l.rejected)]), "no limits configured");
    fillTable("errors", Object.entries(req.errors || {}).filter(([, n]) => num(n) > 0).map(([kind, n]) => [kind, fmtInt(n)]), "none");
    fillTable("hot-keys", (Array.isArray(s.hot_keys) ? s.hot_keys : []).map((k) => [String(k.key), fmtInt(k.count)]), "none yet");
    fillTable("big-keys", (Array.isArray(s.big_keys) ? s.big_keys : []).map((k) => [String(k.key), fmtBytes(k.bytes), String(k.rule || "")]), "none yet");

    // Charts (rates need two polls).
    if (prev) {
      push(series.t, Date.now() / 1000);
      PATHS.forEach((p, i) => {
        push(series.ops[i], opsByPath[i]);
        push(series.p99[i], num((lat[p] || {}).p99) / 1000);
      });
      push(series.hit, intervalHit);
      push(series.bytes, cache ? num(cache.bytes) : 0);
      push(series.budget, cache ? num(cache.max_memory) : 0);
      if (!charts["chart-ops"]) {
        charts["chart-ops"] = chart("chart-ops", PATHS);
        charts["chart-hits"] = chart("chart-hits", ["hit ratio"], [0, 1]);
        charts["chart-latency"] = chart("chart-latency", PATHS);
        charts["chart-memory"] = chart("chart-memory", ["bytes", "max_memory"], null, fmtBytes);
      }
      charts["chart-ops"].setData([series.t].concat(series.ops));
      charts["chart-hits"].setData([series.t, series.hit]);
      charts["chart-latency"].setData([series.t].concat(series.p99));
      charts["chart-memory"].setData([series.t, series.bytes, series.budget]);
    }
    prev = { now, counts, hits, misses, rejected };
  }

  function showError(msg) {
    state.lastError = msg;
    const el = $("error");
    el.textContent = msg;
    el.hidden = false;
  }

  // One fetch at a time: the next is scheduled when this one is done.
  async function poll() {
    try {
      const res = await fetch("/stats", { headers, cache: "no-store" });
      if (res.status === 401) {
        showError("Not authorised: open this page as /?token=<admin.token>.");
      } else if (!res.ok) {
        showError("/stats answered HTTP " + res.status);
      } else {
        render(await res.json(), performance.now() / 1000);
        $("error").hidden = true;
        state.lastError = null;
        state.polls++;
      }
    } catch (e) {
      showError("Cannot reach /stats: " + e.message);
    } finally {
      setTimeout(poll, POLL_MS);
    }
  }
  poll();
})();
