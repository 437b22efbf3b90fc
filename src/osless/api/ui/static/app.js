// The dashboard's script: changes through the REST API (/v1, the session cookie + CSRF header),
// live charts from the page's Server-Sent Events, log and build-log tails from the API's NDJSON
// streams. Everything app- or user-controlled goes into the DOM as text, never as HTML.
"use strict";

(function () {
  // The session's CSRF value lives in this origin's storage, put there by the sign-in's answer
  // (signedin.html); a page names only its session's id. A page of another port of this host can
  // set the session cookie (its author's session, planted), never this storage: such a session's
  // pages get no value here, so they change nothing and say why (#unbound).
  const KEY = "osless-session";
  const sidMeta = document.querySelector('meta[name="osless-session"]');
  const sid = sidMeta ? sidMeta.content : "";

  function kept() {
    try { return JSON.parse(window.localStorage.getItem(KEY) || "null"); } catch (e) { return null; }
  }

  // The CSRF value of this page's session, or "" with the banner shown: read at each change, since
  // a sign-in in another tab replaces both the cookie and the value.
  function csrfOf() {
    const k = kept();
    if (sid && k && k.sid === sid && typeof k.csrf === "string") return k.csrf;
    const banner = document.getElementById("unbound");
    if (banner) banner.hidden = false;
    return "";
  }

  const signedin = document.getElementById("signedin");
  if (signedin) {
    try {
      window.localStorage.setItem(KEY, JSON.stringify({ sid: signedin.dataset.sid, csrf: signedin.dataset.csrf }));
    } catch (e) { /* no storage: the pages show, their changes are off, and their banner says so */ }
    window.location.replace("/ui");
    return;
  }
  // A page brought to the front under a press must not take it as the visitor's: a page of another
  // port can open a dashboard page (or its author's one-time link) under a key the visitor holds,
  // or in the window the second click of a double click lands on (a popup closed on the first:
  // DoubleClickjacking; framing is refused, this is not). Changes, and a link's Continue, wait until
  // the page has been visible and focused for a moment (`html[data-settled]` then).
  const SETTLE_MS = 800;
  let since = performance.now();
  let settling = null;
  const go = document.getElementById("link-continue");
  function rearm() {
    since = performance.now();
    delete document.documentElement.dataset.settled;
    if (go) go.disabled = true;
    clearTimeout(settling);
    if (document.visibilityState !== "visible") return;
    settling = setTimeout(() => {
      document.documentElement.dataset.settled = "1";
      if (go) go.disabled = false;
    }, SETTLE_MS);
  }
  function settled() {
    return document.visibilityState === "visible" && performance.now() - since >= SETTLE_MS;
  }
  for (const ev of ["focus", "pageshow"]) window.addEventListener(ev, rearm);
  document.addEventListener("visibilitychange", rearm);
  rearm();

  if (sid) {
    csrfOf();  // the banner at once, not at the first change
    window.addEventListener("storage", (ev) => { if (ev.key === KEY || ev.key === null) csrfOf(); });
  }

  function notice(text, bad) {
    const el = document.getElementById("notice");
    if (!el) return;
    el.textContent = text;
    el.className = bad ? "error" : "ok";
  }

  async function call(method, path, body) {
    const csrf = csrfOf();
    if (!csrf) throw new Error("Changes are off: this browser did not sign in to this session. Sign in again.");
    const init = { method, headers: { "X-Osless-CSRF": csrf }, credentials: "same-origin" };
    if (body !== undefined) {
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    const r = await fetch(path, init);
    const text = await r.text();
    let data = null;
    try { data = text ? JSON.parse(text) : null; } catch (e) { data = text; }
    if (!r.ok) {
      const err = data && data.error ? data.error.message : ("HTTP " + r.status);
      throw new Error(err);
    }
    return data;
  }

  function typed(input) {
    const v = input.value;
    switch (input.dataset.type) {
      case "int": return v === "" ? undefined : parseInt(v, 10);
      case "float": return v === "" ? undefined : parseFloat(v);
      case "bool": return v === "" ? undefined : v === "true";
      case "json": return v === "" ? undefined : JSON.parse(v);
      default: return v;
    }
  }

  function configBody(form) {
    const set = {};
    const unset = [];
    for (const input of form.querySelectorAll("[name]")) {
      const kind = input.dataset.type;
      if (kind === "secret") {
        if (input.value !== "") set[input.name] = input.value;  // write-only: empty keeps it
        continue;
      }
      const initial = input.dataset.initial || "";
      const now = typed(input);
      const was = initial === "" ? undefined : JSON.parse(initial);
      if (JSON.stringify(now) === JSON.stringify(was)) continue;
      if (now === undefined) unset.push(input.name); else set[input.name] = now;
    }
    return { set, unset, revision: parseInt(form.dataset.revision, 10) };
  }

  function bodyOf(el) {
    if (el.dataset.json) return JSON.parse(el.dataset.json);
    if (el.tagName !== "FORM") return undefined;
    if (el.dataset.body === "config") return configBody(el);
    if (el.dataset.body === "event") {
      const text = el.querySelector("textarea").value.trim();
      return text === "" ? null : JSON.parse(text);
    }
    const out = {};
    for (const input of el.querySelectorAll("[name]")) {
      const v = typed(input);
      if (v !== undefined) out[input.name] = v;
    }
    return out;
  }

  async function act(el) {
    if (!settled()) { notice("This page just came to the front: press again to do that.", true); return; }
    if (el.dataset.confirm && !window.confirm(el.dataset.confirm)) return;
    let body;
    try { body = bodyOf(el); } catch (e) { notice("Not valid JSON: " + e.message, true); return; }
    try {
      const data = await call(el.dataset.method, el.dataset.path, body);
      if (el.dataset.result) {
        document.getElementById(el.dataset.result).textContent = JSON.stringify(data, null, 2);
      }
      notice("Done: " + el.dataset.method + " " + el.dataset.path, false);
      if (el.dataset.reload !== undefined) { window.location.reload(); return; }
      document.body.dispatchEvent(new CustomEvent("osless:changed"));
    } catch (e) {
      notice(e.message, true);
      if (el.dataset.result) document.getElementById(el.dataset.result).textContent = e.message;
    }
  }

  document.addEventListener("submit", (ev) => {
    const form = ev.target;
    if (form.id === "signout") {
      // Sent with the value, it ends every session of the token; without it (a session this
      // browser never signed in to), only this browser's cookie.
      const csrf = csrfOf();
      form.elements.csrf.value = csrf;
      if (csrf) window.localStorage.removeItem(KEY);
      return;
    }
    if (form.classList && form.classList.contains("api")) { ev.preventDefault(); act(form); }
  });
  document.addEventListener("click", (ev) => {
    const el = ev.target.closest("button.api");
    if (el) { ev.preventDefault(); act(el); }
  });

  // -- NDJSON streams (log tail, build log) as text lines ------------------------------------------
  const MAX_LINES = 2000;

  async function follow(url, pre, signal, onRecord) {
    const r = await fetch(url, { credentials: "same-origin", signal });
    if (!r.ok) {
      let msg = "HTTP " + r.status;
      try { msg = (await r.json()).error.message; } catch (e) { /* not JSON */ }
      throw new Error(msg);
    }
    const reader = r.body.getReader();
    const decoder = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += decoder.decode(value, { stream: true });
      let nl;
      while ((nl = buf.indexOf("\n")) >= 0) {
        const line = buf.slice(0, nl);
        buf = buf.slice(nl + 1);
        if (line.trim() === "") continue;
        let rec;
        try { rec = JSON.parse(line); } catch (e) { continue; }
        const text = onRecord(rec);
        if (text === null) continue;
        const row = document.createElement("div");
        row.textContent = text;  // text only: a log line is the app's, never markup
        pre.appendChild(row);
        while (pre.childNodes.length > MAX_LINES) pre.removeChild(pre.firstChild);
        pre.scrollTop = pre.scrollHeight;
      }
    }
  }

  function stamp(ts) { return new Date(ts * 1000).toISOString().slice(11, 23); }

  const logform = document.getElementById("logform");
  if (logform) {
    const pre = document.getElementById("logtail");
    let ctl = null;
    const start = () => {
      if (ctl) ctl.abort();
      ctl = new AbortController();
      pre.textContent = "";
      const q = new URLSearchParams({ follow: "true" });
      for (const input of logform.querySelectorAll("input[name]")) {
        if (input.value !== "") q.set(input.name, input.value);
      }
      const mine = ctl;
      follow(logform.dataset.logs + "?" + q.toString(), pre, ctl.signal, (rec) => {
        if (rec.line === undefined) return null;
        return stamp(rec.ts) + " " + (rec.source || "") + " " + rec.line;
      }).catch((e) => { if (!mine.signal.aborted) notice("Logs: " + e.message, true); });
    };
    logform.addEventListener("submit", (ev) => { ev.preventDefault(); start(); });
    logform.querySelector("[data-stop]").addEventListener("click", () => { if (ctl) ctl.abort(); });
    start();
  }

  const buildlog = document.getElementById("buildlog");
  if (buildlog) {
    follow(buildlog.dataset.src, buildlog, undefined, (rec) => {
      if (rec.deploy) {
        document.getElementById("deploy-status").textContent = rec.deploy.status;
        return "-- " + rec.deploy.status + (rec.deploy.error ? ": " + rec.deploy.error : "");
      }
      return rec.line === undefined ? null : rec.line;
    }).catch((e) => notice("Build log: " + e.message, true));
  }

  // -- the overview's figures, live -----------------------------------------------------------------
  const appsTable = document.querySelector("table[data-series]");
  if (appsTable) {
    const rowsByApp = new Map();
    for (const tr of appsTable.querySelectorAll("tr[data-app]")) rowsByApp.set(tr.dataset.app, tr);
    const set = (tr, field, text) => { const td = tr.querySelector('[data-field="' + field + '"]'); if (td) td.textContent = text; };
    const live = new EventSource(appsTable.dataset.series);
    live.onmessage = (ev) => {
      const points = JSON.parse(ev.data);
      for (const [app, p] of Object.entries(points)) {
        const tr = rowsByApp.get(app);
        if (!tr) continue;
        const rps = (p[1] || 0) + (p[2] || 0);
        set(tr, "rps", rps.toFixed(2));
        tr.querySelector('[data-field="rps"]').dataset.live = "1";
        set(tr, "err", rps > 0 ? (100 * (p[2] || 0) / rps).toFixed(1) + "%" : "-");
        set(tr, "p99", p[4] === null ? "-" : p[4] + " ms");
        set(tr, "instances", p[6] + " / " + p[5]);
      }
    };
  }

  // -- charts ---------------------------------------------------------------------------------------
  // A sample: [t, 1xx-3xx/s, 5xx/s, p50, p99, desired, ready, memory MB, cpu, cold starts, 4xx/s]
  // (ui/series.py's FIELDS).
  const CHARTS = {
    requests: [["2xx-3xx/s", 1, "#2a7"], ["4xx/s", 10, "#e90"], ["5xx/s", 2, "#d33"]],
    latency: [["p50", 3, "#27c"], ["p99", 4, "#c72"]],
    instances: [["desired", 5, "#888"], ["ready", 6, "#2a7"]],
    memory: [["MB", 7, "#27c"]],
    cpu: [["cores", 8, "#c72"]],
    cold: [["cold starts", 9, "#d33"]],
  };
  const charts = document.querySelector("div.charts[data-series]");
  if (charts && window.uPlot) {
    const rows = [];
    const plots = [];
    for (const el of charts.querySelectorAll("[data-chart]")) {
      const spec = CHARTS[el.dataset.chart];
      const width = Math.max(240, el.clientWidth || 300);
      const opts = {
        width, height: 150, legend: { show: true },
        series: [{}].concat(spec.map(([label, , stroke]) => ({ label, stroke, width: 1.5, spanGaps: true }))),
        axes: [{}, { size: 45 }],
      };
      const u = new uPlot(opts, [[]].concat(spec.map(() => [])), el);
      plots.push({ u, spec, el });
    }
    const redraw = () => {
      for (const p of plots) {
        const data = [rows.map((r) => r[0])].concat(p.spec.map(([, i]) => rows.map((r) => r[i])));
        p.u.setData(data);
        p.el.dataset.points = String(rows.length);
        p.el.dataset.last = JSON.stringify(rows.length ? p.spec.map(([, i]) => rows[rows.length - 1][i]) : []);
      }
      const last = rows[rows.length - 1];
      if (last) {
        document.getElementById("now-rps").textContent = ((last[1] || 0) + (last[2] || 0)).toFixed(2);
        document.getElementById("now-err").textContent = (last[2] || 0).toFixed(2);
        document.getElementById("now-p99").textContent = last[4] === null ? "-" : String(last[4]);
      }
      document.getElementById("samples").textContent = String(rows.length);
    };
    const events = new EventSource(charts.dataset.series);
    events.addEventListener("history", (ev) => { rows.length = 0; rows.push(...JSON.parse(ev.data)); redraw(); });
    events.onmessage = (ev) => {
      const point = JSON.parse(ev.data);
      const prev = rows[rows.length - 1];
      // Instances desired or ready moved: their table is drawn again (no polling of it otherwise).
      if (prev && (prev[5] !== point[5] || prev[6] !== point[6])) {
        document.body.dispatchEvent(new CustomEvent("osless:instances"));
      }
      rows.push(point);
      while (rows.length > 1800) rows.shift();
      redraw();
    };
    window.addEventListener("resize", () => {
      for (const p of plots) p.u.setSize({ width: Math.max(240, p.el.clientWidth), height: 150 });
    });
  }
})();
