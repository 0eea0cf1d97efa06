// kvsup's dashboard. It holds no data of its own: every second it fetches
// the daemon's status, events and samples from its own origin, sending the
// admin token in Authorization. The token comes from the URL fragment
// (`/#token=...`, which the browser never sends to a server) or the form,
// and is kept in sessionStorage: gone when the tab is closed.
// Data is written with textContent only, never parsed as HTML.
"use strict";

(function () {
  const TOKEN_KEY = "kvsup.token";
  const POLL_MS = 1000;
  const FETCH_TIMEOUT_MS = 5000;
  const MAX_EVENT_ROWS = 50;
  const SVG_NS = "http://www.w3.org/2000/svg";
  const COLORS = ["#3b6fd4", "#d4553b", "#2f9e6b", "#9b4fc9", "#c99a2e", "#2e9fc9"];

  const $ = (id) => document.getElementById(id);
  // Counts the page's renders: a live page's count goes up without a reload.
  const state = { polls: 0, renders: 0, timer: null, loadedAt: Date.now() };
  window.kvsupDashboard = state;

  // Moves a token from the fragment to sessionStorage and clears the
  // fragment from the address bar (no navigation, no history entry).
  function takeFragmentToken() {
    const m = /(?:^#|&)token=([0-9a-fA-F]{64})(?:&|$)/.exec(location.hash);
    if (m) sessionStorage.setItem(TOKEN_KEY, m[1].toLowerCase());
    if (location.hash) history.replaceState(null, "", location.pathname + location.search);
  }

  function token() {
    return sessionStorage.getItem(TOKEN_KEY);
  }

  class Refused extends Error {}

  async function getJson(path) {
    const ctl = new AbortController();
    const t = setTimeout(() => ctl.abort(), FETCH_TIMEOUT_MS);
    try {
      const r = await fetch(path, {
        headers: { Authorization: "Bearer " + token() },
        cache: "no-store",
        credentials: "omit",
        redirect: "error",
        signal: ctl.signal,
      });
      if (r.status === 401) throw new Refused("the admin token was refused");
      if (!r.ok) throw new Error(path + ": HTTP " + r.status);
      return await r.json();
    } finally {
      clearTimeout(t);
    }
  }

  function el(tag, text, cls) {
    const e = document.createElement(tag);
    if (text !== undefined && text !== null) e.textContent = String(text);
    if (cls) e.className = cls;
    return e;
  }

  function svgEl(tag, attrs, text) {
    const e = document.createElementNS(SVG_NS, tag);
    for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, String(v));
    if (text !== undefined) e.textContent = String(text);
    return e;
  }

  function dash(v) {
    return v === null || v === undefined ? "–" : v;
  }

  function clock(ms) {
    const d = new Date(ms);
    return d.toLocaleTimeString([], { hour12: false }) + "." + String(d.getMilliseconds()).padStart(3, "0");
  }

  function renderStatus(s) {
    $("cluster").textContent = s.cluster || "";
    $("primary").textContent = s.primary || "none";
    $("epoch").textContent = dash(s.epoch);
    $("mode").textContent = s.mode || "";
    const conds = $("conditions");
    conds.replaceChildren();
    const kinds = { Ready: "good", Degraded: "alarm", FailoverInProgress: "busy", ModeSwitchInProgress: "busy" };
    for (const [name, on] of Object.entries(s.conditions || {})) {
      conds.append(el("li", name + ": " + (on ? "yes" : "no"), (on ? "on " : "") + (kinds[name] || "")));
    }
    const body = $("nodes").tBodies[0];
    body.replaceChildren();
    for (const n of s.nodes || []) {
      const tr = el("tr");
      const role = n.role || "unknown";
      tr.append(
        el("td", n.name),
        el("td", role, role === "primary" ? "role-primary" : role === "down" ? "bad" : ""),
        el("td", n.healthy ? "healthy" : n.running ? "unhealthy" : "not running", n.healthy ? "ok" : "bad"),
        el("td", dash(n.epoch)),
        el("td", dash(n.commit_index)),
        el("td", dash(n.lag), n.lag > 0 ? "warn" : ""),
        el("td", dash(n.pid)),
        el("td", dash(n.restarts)),
        el("td", n.last_error || "", "bad"),
      );
      body.append(tr);
    }
  }

  function renderEvents(e) {
    const body = $("events").tBodies[0];
    body.replaceChildren();
    const list = (e.events || []).slice(-MAX_EVENT_ROWS).reverse();
    for (const ev of list) {
      const tr = el("tr", null, "kind-" + ev.kind);
      tr.append(el("td", clock(ev.time_ms)), el("td", ev.kind), el("td", ev.node || "–"), el("td", ev.message));
      body.append(tr);
    }
  }

  // Nice round tick step for a range [0, max].
  function step(max) {
    const raw = max / 4;
    const p = Math.pow(10, Math.floor(Math.log10(raw)));
    for (const m of [1, 2, 5, 10]) if (raw <= m * p) return m * p;
    return 10 * p;
  }

  function fmt(v) {
    if (v >= 1e6) return (v / 1e6).toFixed(1) + "M";
    if (v >= 1e4) return (v / 1e3).toFixed(0) + "k";
    if (v >= 1e3) return (v / 1e3).toFixed(1) + "k";
    return Number.isInteger(v) ? String(v) : v.toFixed(1);
  }

  const W = 420, H = 180, L = 44, R = 8, T = 10, B = 22;

  // Frame, y grid and labels for [0, yMax]; returns the y scale.
  function frame(svg, yMax) {
    const s = step(yMax > 0 ? yMax : 1);
    const top = Math.max(s, Math.ceil((yMax > 0 ? yMax : 1) / s) * s);
    const y = (v) => T + (H - T - B) * (1 - v / top);
    for (let v = 0; v <= top + s / 2; v += s) {
      svg.append(svgEl("line", { x1: L, x2: W - R, y1: y(v), y2: y(v), class: "grid" }));
      svg.append(svgEl("text", { x: L - 4, y: y(v) + 3, "text-anchor": "end" }, fmt(v)));
    }
    return y;
  }

  function empty(svg, what) {
    svg.append(svgEl("text", { x: W / 2, y: H / 2, "text-anchor": "middle", class: "empty" }, what));
  }

  // Lines over time; a null value breaks its line. series: [{name, points: [[t, v|null]]}]
  function lineChart(svg, series, t0, t1) {
    svg.replaceChildren();
    const all = series.flatMap((s) => s.points.map((p) => p[1])).filter((v) => v !== null);
    if (all.length === 0) return empty(svg, "no samples yet");
    const y = frame(svg, Math.max(...all));
    const span = Math.max(1, t1 - t0);
    const x = (t) => L + (W - L - R) * ((t - t0) / span);
    svg.append(svgEl("text", { x: L, y: H - 6 }, clock(t0).slice(0, 8)));
    svg.append(svgEl("text", { x: W - R, y: H - 6, "text-anchor": "end" }, clock(t1).slice(0, 8)));
    series.forEach((s, i) => {
      const color = COLORS[i % COLORS.length];
      let run = [];
      const flush = () => {
        if (run.length > 0) svg.append(svgEl("polyline", { points: run.join(" "), class: "series", stroke: color }));
        run = [];
      };
      for (const [t, v] of s.points) {
        if (v === null) flush();
        else run.push(x(t).toFixed(1) + "," + y(v).toFixed(1));
      }
      flush();
      if (series.length > 1) {
        svg.append(svgEl("rect", { x: L + 8 + i * 60, y: T + 2, width: 10, height: 10, fill: color }));
        svg.append(svgEl("text", { x: L + 22 + i * 60, y: T + 11 }, s.name));
      }
    });
  }

  function barChart(svg, failovers) {
    svg.replaceChildren();
    const list = failovers.slice(-12);
    if (list.length === 0) return empty(svg, "no failover yet");
    const y = frame(svg, Math.max(...list.map((f) => f.ms)));
    const slot = (W - L - R) / list.length;
    list.forEach((f, i) => {
      const bx = L + i * slot + slot * 0.2;
      const bw = slot * 0.6;
      const bar = svgEl("rect", { x: bx, y: y(f.ms), width: bw, height: y(0) - y(f.ms), class: "bar" });
      bar.append(svgEl("title", {}, f.node + " at " + clock(f.t_ms) + ": " + f.ms + " ms"));
      svg.append(bar);
      svg.append(svgEl("text", { x: bx + bw / 2, y: y(f.ms) - 3, "text-anchor": "middle" }, f.ms + " ms"));
      svg.append(svgEl("text", { x: bx + bw / 2, y: H - 6, "text-anchor": "middle" }, "→ " + f.node));
    });
  }

  function renderSamples(d) {
    const samples = d.samples || [];
    const t1 = samples.length ? samples[samples.length - 1].t_ms : Date.now();
    const t0 = samples.length ? samples[0].t_ms : t1 - 1000;
    lineChart($("chart-writes"), [{ name: "writes/s", points: (d.writes_per_s || []).map((r) => [r.t_ms, r.per_s]) }], t0, t1);
    const names = [...new Set(samples.flatMap((s) => Object.keys(s.lag || {})))].sort();
    lineChart(
      $("chart-lag"),
      names.map((n) => ({ name: n, points: samples.map((s) => [s.t_ms, (s.lag || {})[n] ?? null]) })),
      t0,
      t1,
    );
    barChart($("chart-failovers"), d.failovers || []);
  }

  function showLogin(message) {
    $("login").hidden = false;
    $("login-error").textContent = message || "";
    $("conn").textContent = "no token";
    $("conn").className = "conn bad";
  }

  async function poll() {
    state.timer = null;
    state.polls += 1;
    try {
      const [status, events, samples] = await Promise.all([
        getJson("/v1/status"),
        getJson("/v1/events"),
        getJson("/v1/samples"),
      ]);
      renderStatus(status);
      renderEvents(events);
      renderSamples(samples);
      state.renders += 1;
      $("login").hidden = true;
      $("conn").textContent = "updated " + clock(Date.now());
      $("conn").className = "conn";
    } catch (e) {
      if (e instanceof Refused) {
        sessionStorage.removeItem(TOKEN_KEY);
        showLogin(e.message);
        return; // no polling without a token
      }
      $("conn").textContent = "supervisor unreachable: " + e.message;
      $("conn").className = "conn bad";
    }
    state.timer = setTimeout(poll, POLL_MS);
  }

  function start() {
    if (state.timer !== null) clearTimeout(state.timer);
    if (!token()) return showLogin("");
    poll();
  }

  $("login").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const v = $("token-input").value.trim();
    if (!/^[0-9a-fA-F]{64}$/.test(v)) return showLogin("a token is 64 hexadecimal digits");
    sessionStorage.setItem(TOKEN_KEY, v.toLowerCase());
    $("token-input").value = "";
    start();
  });

  takeFragmentToken();
  start();
})();
