// payswitch live dashboard: polls the admin JSON endpoints and renders them.
// Every URL is relative, so the page keeps working behind a path-prefixing proxy, and all
// text from the server goes through textContent, never markup.
"use strict";

(() => {
  const INTERVAL_MS = 1000;
  const TIMEOUT_MS = 3000;
  const TAIL_RETRY_MS = 2000;
  const HISTORY = 60; // samples kept for the sparkline (one per poll)
  const EVENTS_SHOWN = 100;
  const COLUMNS = 12;
  // What payswitch_gateway_up counts as down; the other flags only stop new traffic.
  const DOWN_FLAGS = ["active_failed", "ejected"];
  const BLOCKING_FLAGS = ["active_failed", "ejected", "draining", "throttled"];

  // Most severe first: the first flag found is the gateway's status.
  const STATUSES = [
    ["active_failed", "active-failed", "active health checks failing"],
    ["ejected", "ejected", "ejected by outlier detection"],
    ["draining", "draining", "drained by an operator"],
    ["throttled", "throttled", "answered 429; backing off"],
    ["degraded", "degraded", "latency or errors above its baseline"],
  ];

  const $ = (id) => document.getElementById(id);
  const rows = new Map(); // gateway name -> {row, detail, cells}
  const open = new Set(); // gateway names whose detail row is shown
  let last = null; // {t, counters: Map(name -> {requests, failures})}
  const history = []; // {req, fail} per poll, in req/s and failures/s
  let stats = null; // the latest admin/stats answer, or null when unavailable

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  // The admin token typed into the page goes with every call: with a token set on the
  // admin port, the data calls need it as much as the drain buttons do.
  function authHeaders(accept) {
    const headers = { Accept: accept };
    const token = $("token").value.trim();
    if (token) headers.Authorization = "Bearer " + token;
    return headers;
  }

  async function getJSON(path) {
    const ctl = new AbortController();
    const timer = setTimeout(() => ctl.abort(), TIMEOUT_MS);
    try {
      const resp = await fetch(path, {
        cache: "no-store",
        headers: authHeaders("application/json"),
        signal: ctl.signal,
      });
      const body = await resp.json().catch(() => null);
      return { status: resp.status, body };
    } finally {
      clearTimeout(timer);
    }
  }

  function statusOf(gw) {
    const flags = new Set(gw.flags || []);
    const found = STATUSES.filter(([flag]) => flags.has(flag));
    if (found.length === 0) return { main: ["", "up", "eligible"], extra: [] };
    return { main: found[0], extra: found.slice(1) };
  }

  function fmtLatency(ms, requests) {
    if (!requests && !ms) return "–";
    if (ms < 1) return ms.toFixed(2) + " ms";
    if (ms < 1000) return ms.toFixed(ms < 10 ? 1 : 0) + " ms";
    return (ms / 1000).toFixed(2) + " s";
  }

  function fmtRate(r) {
    if (r === null || r === undefined) return "–";
    if (r === 0) return "0";
    if (r < 100) return r.toFixed(1);
    return Math.round(r).toLocaleString();
  }

  function fmtValue(v) {
    if (v === null || v === undefined) return "–";
    if (typeof v === "boolean") return v ? "yes" : "no";
    if (typeof v === "number") return Number.isInteger(v) ? String(v) : String(+v.toFixed(3));
    if (typeof v === "object") return JSON.stringify(v);
    return String(v);
  }

  function fmtAgo(epochSeconds) {
    const s = Math.max(0, Date.now() / 1000 - epochSeconds);
    if (s < 60) return Math.round(s) + " s ago";
    if (s < 3600) return Math.round(s / 60) + " min ago";
    if (s < 86400) return Math.round(s / 3600) + " h ago";
    return Math.round(s / 86400) + " d ago";
  }

  function fmtTime(epochSeconds) {
    return new Date(epochSeconds * 1000).toLocaleTimeString([], { hour12: false });
  }

  function chip(status, minor) {
    const [, label, why] = status;
    const node = el("span", "chip st-" + label + (minor ? " chip-minor" : ""), label);
    node.title = why;
    return node;
  }

  // A control command from payswitch.control in force: what, who, until when, why.
  function overlayChip(o) {
    const what = o.action === "weight" ? "weight " + o.weight : o.action;
    const node = el("span", "chip chip-minor st-draining", "control: " + what + " by " + o.issuer);
    node.title = o.reason + " (until " + o.expires_at + ")";
    return node;
  }

  // -- rates ----------------------------------------------------------------------

  function rates(gateways, now) {
    const counters = new Map();
    const perGateway = new Map();
    let req = 0;
    let fail = 0;
    for (const gw of gateways) {
      const cur = { requests: gw.requests || 0, failures: gw.failures || 0 };
      counters.set(gw.name, cur);
      if (!last) continue;
      const prev = last.counters.get(gw.name);
      const dt = (now - last.t) / 1000;
      if (!prev || dt <= 0) continue;
      // A counter that went down belongs to a gateway recreated by a reload.
      const dReq = cur.requests >= prev.requests ? cur.requests - prev.requests : cur.requests;
      const dFail = cur.failures >= prev.failures ? cur.failures - prev.failures : cur.failures;
      perGateway.set(gw.name, dReq / dt);
      req += dReq / dt;
      fail += dFail / dt;
    }
    const first = !last;
    last = { t: now, counters };
    if (!first) {
      history.push({ req, fail });
      if (history.length > HISTORY) history.shift();
    }
    return { perGateway, req: first ? null : req, fail: first ? null : fail };
  }

  function drawSparkline() {
    const w = 300;
    const h = 56;
    const pad = 3;
    // Headroom above the peak, so a steady rate does not hug the top edge.
    const peak = 1.2 * Math.max(1, ...history.map((p) => p.req));
    const step = w / (HISTORY - 1);
    const x0 = w - (history.length - 1) * step;
    const line = (key) =>
      history
        .map((p, i) => {
          const x = x0 + i * step;
          const y = h - pad - (p[key] / peak) * (h - 2 * pad);
          return x.toFixed(1) + "," + y.toFixed(1);
        })
        .join(" ");
    $("spark-req").setAttribute("points", history.length > 1 ? line("req") : "");
    $("spark-fail").setAttribute("points", history.length > 1 ? line("fail") : "");
    $("peak").textContent = history.length ? fmtRate(Math.max(...history.map((p) => p.req))) : "–";
  }

  // -- gateways table -------------------------------------------------------------

  function makeRow(name) {
    const row = el("tr", "gw");
    const cells = {};
    const nameCell = el("td");
    const btn = el("button", "name-btn", name);
    btn.type = "button";
    btn.setAttribute("aria-expanded", "false");
    btn.addEventListener("click", () => {
      if (open.has(name)) open.delete(name);
      else open.add(name);
      const shown = open.has(name);
      btn.setAttribute("aria-expanded", String(shown));
      entry.detail.hidden = !shown;
    });
    nameCell.append(btn);
    row.append(nameCell);
    for (const key of ["region", "provider", "status", "score", "weight", "inFlight", "latency", "rate", "requests", "failures", "action"]) {
      const cell = el("td", ["region", "provider", "status", "score"].includes(key) ? "" : "num");
      cells[key] = cell;
      row.append(cell);
    }
    const score = el("div", "score");
    const bar = el("div", "bar");
    const fill = el("div", "bar-fill");
    const num = el("span", "score-num");
    bar.append(fill);
    score.append(bar, num);
    cells.score.append(score);
    cells.scoreFill = fill;
    cells.scoreNum = num;
    const act = el("button", "act-btn", "drain");
    act.type = "button";
    act.dataset.gateway = name;
    act.addEventListener("click", () => act.dataset.action && drainAction(name, act.dataset.action, act));
    cells.action.append(act);
    cells.actBtn = act;

    const detail = el("tr", "details");
    detail.hidden = true;
    const detailCell = el("td");
    detailCell.colSpan = COLUMNS;
    detail.append(detailCell);
    cells.detail = detailCell;

    const entry = { row, detail, cells };
    return entry;
  }

  function renderDetails(cell, gw) {
    const health = gw.health || gw;
    const groups = el("div", "detail-groups");
    const sections = [
      ["gateway", { url: gw.url, weight: gw.weight, effective_weight: gw.effective_weight }],
      ["limits", health.limits],
      ["outlier", health.outlier],
      ["degradation", health.degradation],
      ["active checks", health.active],
    ];
    for (const [title, values] of sections) {
      if (!values || typeof values !== "object") continue;
      const box = el("div");
      box.append(el("h3", "", title));
      const dl = el("dl");
      for (const [k, v] of Object.entries(values)) {
        dl.append(el("dt", "", k.replaceAll("_", " ")), el("dd", "", fmtValue(v)));
      }
      box.append(dl);
      groups.append(box);
    }
    cell.replaceChildren(groups);
  }

  function renderGateways(gateways, perGateway) {
    const body = $("gateway-rows");
    const seen = new Set();
    const ordered = [];
    for (const gw of gateways) {
      seen.add(gw.name);
      let entry = rows.get(gw.name);
      if (!entry) {
        entry = makeRow(gw.name);
        rows.set(gw.name, entry);
      }
      ordered.push(entry.row, entry.detail);
      const c = entry.cells;
      c.region.textContent = gw.region || "–";
      c.provider.textContent = gw.provider || "–";
      const st = statusOf(gw);
      const win = gatewayStats(gw.name);
      const sinceLine = el("span", "since", win ? "since " + fmtTime(win.since) + (win.reason ? " · " + win.reason : "") : "");
      if (win) sinceLine.title = fmtAgo(win.since) + (win.reason ? ": " + win.reason : "");
      c.status.replaceChildren(chip(st.main, false), ...st.extra.map((s) => chip(s, true)), document.createTextNode(" "), sinceLine);
      if (gw.overlay) c.status.append(overlayChip(gw.overlay));
      const score = Math.max(0, Math.min(1, Number(gw.score) || 0));
      c.scoreFill.style.width = (score * 100).toFixed(1) + "%";
      c.scoreFill.className = "bar-fill" + (score < 0.5 ? " low" : score < 0.8 ? " mid" : "");
      c.scoreNum.textContent = score.toFixed(2);
      c.weight.textContent = fmtValue(gw.effective_weight) + " / " + fmtValue(gw.weight);
      c.weight.title = "effective / configured";
      c.inFlight.textContent = String(gw.in_flight ?? "–");
      c.latency.textContent = fmtLatency(gw.ewma_latency_ms || 0, gw.requests);
      c.rate.textContent = fmtRate(perGateway.get(gw.name));
      c.requests.textContent = (gw.requests ?? 0).toLocaleString();
      c.failures.replaceChildren(...failureCells(win));
      const draining = (gw.flags || []).includes("draining");
      c.actBtn.dataset.action = draining ? "undrain" : "drain";
      c.actBtn.textContent = draining ? "undrain" : "drain";
      entry.detail.hidden = !open.has(gw.name);
      if (open.has(gw.name)) renderDetails(c.detail, gw);
    }
    for (const name of [...rows.keys()]) {
      if (!seen.has(name)) rows.delete(name);
    }
    if (ordered.length === 0) {
      const empty = el("tr", "empty");
      const td = el("td", "", "No gateways configured.");
      td.colSpan = COLUMNS;
      empty.append(td);
      ordered.push(empty);
    }
    body.replaceChildren(...ordered);
  }

  function renderSummary(gateways, r) {
    const counts = new Map();
    let up = 0;
    let eligible = 0;
    let inFlight = 0;
    for (const gw of gateways) {
      const label = statusOf(gw).main[1];
      const flags = gw.flags || [];
      counts.set(label, (counts.get(label) || 0) + 1);
      // Counted as payswitch_gateway_up counts, so the page and sum() agree.
      if (!flags.some((f) => DOWN_FLAGS.includes(f))) up += 1;
      if (!flags.some((f) => BLOCKING_FLAGS.includes(f))) eligible += 1;
      inFlight += gw.in_flight || 0;
    }
    $("gw-count").textContent = String(gateways.length);
    $("up-count").textContent = String(up);
    $("eligible-count").textContent = String(eligible);
    $("in-flight").textContent = String(inFlight);
    const chips = [];
    for (const status of [["", "up", "eligible"], ...STATUSES.slice().reverse()]) {
      const n = counts.get(status[1]);
      if (n) {
        const c = chip(status, false);
        c.textContent = n + " " + status[1];
        chips.push(c);
      }
    }
    $("status-summary").replaceChildren(...chips);
    $("rate").textContent = fmtRate(r.req);
    $("fail-rate").textContent = fmtRate(r.fail);
    drawSparkline();
  }

  // -- windows (admin/stats) ------------------------------------------------------

  function gatewayStats(name) {
    if (!stats || !Array.isArray(stats.gateways)) return null;
    return stats.gateways.find((g) => g.name === name) || null;
  }

  function failureCells(win) {
    if (!win) return [document.createTextNode("–")];
    const nodes = [];
    for (const key of ["1m", "5m"]) {
      const w = win[key] || { requests: 0, failures: 0 };
      const pct = w.requests ? (100 * w.failures) / w.requests : 0;
      if (nodes.length) nodes.push(document.createTextNode(" / "));
      const n = el("span", "fail-pct" + (pct >= 5 ? " bad" : ""), w.failures.toLocaleString());
      n.title = key + ": " + w.failures + " of " + w.requests + " attempts failed";
      nodes.push(n);
    }
    return nodes;
  }

  function fmtMs(ms) {
    if (ms === null || ms === undefined) return "–";
    return fmtLatency(ms, 1);
  }

  function fmtSuccess(ratio) {
    if (ratio === null || ratio === undefined) return "–";
    return (100 * ratio).toFixed(ratio >= 0.9995 || ratio === 0 ? 0 : 2) + "%";
  }

  function renderRoutes() {
    const body = $("route-rows");
    if (!stats || !Array.isArray(stats.routes)) return;
    const rowsOut = stats.routes.map((r) => {
      const tr = el("tr", "route");
      tr.append(el("td", "", r.route));
      for (const key of ["1m", "5m"]) {
        const w = r[key] || {};
        const success = el("td", "num", fmtSuccess(w.success_rate));
        if (w.success_rate !== null && w.success_rate !== undefined && w.success_rate < 0.99) {
          success.className = "num success-bad";
        }
        success.title = (w.requests ?? 0) + " requests over the last " + (w.seconds ?? 0) + " s";
        tr.append(el("td", "num", fmtRate(w.rate)), success, el("td", "num", fmtMs(w.p50_ms)), el("td", "num", fmtMs(w.p99_ms)));
      }
      return tr;
    });
    if (rowsOut.length === 0) {
      const empty = el("tr", "empty");
      const td = el("td", "", "No requests routed yet.");
      td.colSpan = 9;
      empty.append(td);
      rowsOut.push(empty);
    }
    body.replaceChildren(...rowsOut);
  }

  // -- drain / undrain ------------------------------------------------------------

  function showActionError(text) {
    const box = $("action-error");
    box.textContent = text;
    box.hidden = !text;
  }

  async function drainAction(name, action, button) {
    const headers = authHeaders("application/json");
    button.disabled = true;
    try {
      const resp = await fetch("admin/gateways/" + encodeURIComponent(name) + "/" + action, {
        method: "POST",
        headers,
        cache: "no-store",
      });
      if (resp.status === 401 || resp.status === 403) {
        showActionError(action + " " + name + ": the admin token is missing or wrong (" + resp.status + ")");
      } else if (!resp.ok) {
        showActionError(action + " " + name + " failed: HTTP " + resp.status);
      } else {
        showActionError("");
      }
    } catch (err) {
      showActionError(action + " " + name + " failed: " + err);
    } finally {
      button.disabled = false;
    }
  }

  function restoreToken() {
    const input = $("token");
    try {
      input.value = sessionStorage.getItem("payswitch-admin-token") || "";
      input.addEventListener("input", () => sessionStorage.setItem("payswitch-admin-token", input.value));
    } catch (_) {
      // Storage may be disabled; the field still works for this page.
    }
    // A new token reopens the event tail with it (the polls pick it up on their own).
    input.addEventListener("change", openTail);
  }

  // -- live event tail ------------------------------------------------------------

  let source = null;

  function addEvent(ev) {
    const li = el("li", "sev-" + ev.severity);
    const time = String(ev.time || "").replace(/^.*T/, "").replace("Z", "");
    li.append(
      el("span", "ev-time", time),
      el("span", "ev-sev", ev.severity),
      el("span", "ev-kind", ev.kind),
      el("span", "ev-fields", JSON.stringify(ev.fields || {})),
    );
    const list = $("events");
    list.prepend(li);
    while (list.children.length > EVENTS_SHOWN) list.lastElementChild.remove();
  }

  // The tail is read with fetch rather than EventSource, which cannot send the token.
  let tailRun = 0;

  function openTail() {
    tailRun += 1;
    if (source) source.abort();
    source = null;
    $("events").replaceChildren();
    followTail(tailRun);
  }

  async function followTail(run) {
    while (run === tailRun) {
      const ctl = new AbortController();
      source = ctl;
      try {
        const severity = $("severity").value;
        const resp = await fetch("admin/events?severity=" + encodeURIComponent(severity), {
          cache: "no-store",
          headers: authHeaders("text/event-stream"),
          signal: ctl.signal,
        });
        if (resp.status === 401 || resp.status === 403) {
          $("tail-state").textContent = "needs the admin token";
        } else if (!resp.ok || !resp.body) {
          $("tail-state").textContent = "reconnecting…";
        } else {
          $("tail-state").textContent = "live";
          await readEvents(resp.body.getReader(), run);
          if (run === tailRun) $("tail-state").textContent = "reconnecting…";
        }
      } catch (err) {
        if (run !== tailRun) return;
        $("tail-state").textContent = "reconnecting…";
      }
      await new Promise((done) => setTimeout(done, TAIL_RETRY_MS));
    }
  }

  // Server-sent events: blocks separated by a blank line, the event in its data lines.
  async function readEvents(reader, run) {
    const decoder = new TextDecoder();
    let buffered = "";
    while (run === tailRun) {
      const { value, done } = await reader.read();
      if (done) return;
      buffered += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffered.indexOf("\n\n")) >= 0) {
        const block = buffered.slice(0, cut);
        buffered = buffered.slice(cut + 2);
        const data = block.split("\n").filter((l) => l.startsWith("data:"))
          .map((l) => l.slice(5).replace(/^ /, "")).join("\n");
        if (!data) continue;
        try {
          addEvent(JSON.parse(data));
        } catch (err) {
          console.warn("bad event", err);
        }
      }
    }
  }

  // -- rules ----------------------------------------------------------------------

  function renderConfig(resp) {
    const banner = $("reload-error");
    const fixed = $("reload-fixed");
    if (resp.status === 503) {
      $("generation").textContent = "not loaded";
      $("hash").textContent = "–";
      $("loaded").textContent = "–";
      return;
    }
    const cfg = resp.body || {};
    $("generation").textContent = String(cfg.generation ?? "–");
    $("hash").textContent = cfg.hash ? String(cfg.hash).slice(0, 12) : "–";
    $("hash").title = cfg.hash || "";
    if (typeof cfg.loaded_at === "number") {
      $("loaded").textContent = fmtTime(cfg.loaded_at) + " (" + fmtAgo(cfg.loaded_at) + ")";
      $("loaded").title = "trigger: " + (cfg.trigger || "?");
    }
    const err = cfg.last_error;
    const lastReload = $("last-reload");
    lastReload.textContent = err && !err.superseded ? "refused" : "ok";
    lastReload.className = err && !err.superseded ? "success-bad" : "";
    banner.hidden = !err || err.superseded;
    fixed.hidden = !err || !err.superseded;
    if (!err) return;
    const when = typeof err.at === "number" ? fmtTime(err.at) + " (" + fmtAgo(err.at) + ")" : "?";
    if (err.superseded) {
      fixed.textContent = "A reload was refused at " + when + "; the rules have loaded fine since.";
      return;
    }
    $("reload-error-detail").textContent =
      "Refused at " + when + " (trigger: " + (err.trigger || "?") + "). Still serving generation " +
      String(cfg.generation ?? "?") + "; fix the rules and they load on the next change.";
    const items = (err.issues || []).map((i) => {
      const where = [i.file, i.line].filter((x) => x !== null && x !== undefined && x !== "").join(":");
      const ptr = i.pointer ? " " + i.pointer : "";
      return el("li", "", (where || "rules") + ptr + " — " + (i.message || ""));
    });
    $("reload-error-issues").replaceChildren(...items);
  }

  // -- loop -----------------------------------------------------------------------

  function setConn(kind, text) {
    const c = $("conn");
    c.className = "conn conn-" + kind;
    c.textContent = text;
  }

  async function tick() {
    const started = performance.now();
    try {
      const [gws, cfg, st] = await Promise.all([
        getJSON("admin/gateways"),
        getJSON("admin/config"),
        getJSON("admin/stats").catch(() => ({ status: 0, body: null })),
      ]);
      if (gws.status === 401 || gws.status === 403) {
        $("gateways").classList.add("stale");
        setConn("down", "type the admin token: this admin port asks for one");
        return;
      }
      if (gws.status !== 200 || !Array.isArray(gws.body)) {
        throw new Error("admin/gateways answered " + gws.status);
      }
      // The windows are an addition: without them the rest of the page still works.
      stats = st.status === 200 ? st.body : null;
      renderRoutes();
      const r = rates(gws.body, started);
      renderGateways(gws.body, r.perGateway);
      renderSummary(gws.body, r);
      renderConfig(cfg);
      $("gateways").classList.remove("stale");
      setConn(cfg.status === 503 ? "wait" : "live", cfg.status === 503 ? "rules not loaded" : "live");
      $("updated").textContent = new Date().toLocaleTimeString([], { hour12: false });
    } catch (err) {
      $("gateways").classList.add("stale");
      setConn("down", "admin API unreachable — retrying");
      console.warn("dashboard poll failed", err);
    } finally {
      setTimeout(tick, Math.max(0, INTERVAL_MS - (performance.now() - started)));
    }
  }

  restoreToken();
  $("severity").addEventListener("change", openTail);
  openTail();
  tick();
})();
