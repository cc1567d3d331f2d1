// The wa-router status page. Plain script, no build step, no library.
//
// Everything it shows comes from the JSON admin API next to it (/admin/status,
// /admin/sessions, ...), asked with `Authorization: Bearer <token>`; the token is typed
// into the login form and kept in this tab's sessionStorage, never in a cookie or a URL.
// Data goes into the page as text only (textContent), never as HTML.
"use strict";

(function () {
  const TOKEN_KEY = "wa-router.admin-token";
  const REFRESH_MS = 3000;
  const PAGE = 50; // sessions listed at once
  const SCAN_LIMIT = 1000; // page size while looking for an id prefix
  const SCAN_PAGES = 20; // pages read per search (More reads on)
  const STATES = ["healthy", "suspect", "down"];

  class AuthError extends Error {}
  class ApiError extends Error {
    constructor(status, message) {
      super(message);
      this.status = status;
    }
  }

  const $ = (id) => document.getElementById(id);

  let token = null;
  let timer = null;
  let statusGen = 0;
  let searchGen = 0;
  let skew = 0; // the router's clock minus this browser's, in seconds
  const search = { prefix: "", rows: [], cursor: null, paged: false };

  // -- DOM helpers: text only --------------------------------------------------------

  function setText(node, value) {
    node.textContent = value === null || value === undefined ? "" : String(value);
    return node;
  }

  function cell(value, className) {
    const td = document.createElement("td");
    setText(td, value);
    if (className) td.className = className;
    return td;
  }

  function dash(value) {
    return value === null || value === undefined ? "-" : value;
  }

  function nowS() {
    return Date.now() / 1000 + skew;
  }

  function ago(unixS) {
    if (typeof unixS !== "number") return "-";
    const s = Math.max(0, nowS() - unixS);
    if (s < 120) return s.toFixed(0) + " s ago";
    if (s < 7200) return (s / 60).toFixed(0) + " min ago";
    if (s < 172800) return (s / 3600).toFixed(0) + " h ago";
    return (s / 86400).toFixed(0) + " d ago";
  }

  // -- the API -----------------------------------------------------------------------

  // `path` is relative to /admin/ (where this page is), e.g. "status".
  async function api(method, path) {
    let resp;
    try {
      resp = await fetch(path, {
        method: method,
        headers: { Authorization: "Bearer " + token, Accept: "application/json" },
        cache: "no-store",
        credentials: "omit",
        redirect: "error",
      });
    } catch (exc) {
      throw new ApiError(0, "cannot reach the router (" + exc.message + ")");
    }
    let body = null;
    try {
      body = await resp.json();
    } catch (_) {
      body = null;
    }
    const message = body && typeof body.message === "string" ? body.message : resp.statusText;
    if (resp.status === 401) throw new AuthError(message);
    if (!resp.ok) {
      throw new ApiError(resp.status, method + " " + path + ": " + resp.status + " " + message);
    }
    return body;
  }

  // -- signing in and out ------------------------------------------------------------

  function showLogin(message) {
    clearTimeout(timer);
    timer = null;
    token = null;
    statusGen++;
    searchGen++;
    sessionStorage.removeItem(TOKEN_KEY);
    $("dashboard").hidden = true;
    $("logout").hidden = true;
    $("ready").hidden = true;
    setText($("updated"), "");
    $("login").hidden = false;
    const err = $("login-error");
    setText(err, message || "");
    err.hidden = !message;
    $("token").value = "";
    $("login-submit").disabled = false;
    $("token").focus();
  }

  function refused(exc) {
    return "The router refused the token (" + exc.message + "). Enter the admin token again.";
  }

  async function signIn(candidate) {
    if (!/^[\x21-\x7e]+$/.test(candidate)) {
      showLogin("A token is printable ASCII without spaces (admin.token of the config).");
      return;
    }
    token = candidate;
    $("login-submit").disabled = true;
    let status;
    try {
      status = await api("GET", "status");
    } catch (exc) {
      showLogin(exc instanceof AuthError ? refused(exc) : "Could not sign in: " + exc.message);
      return;
    }
    sessionStorage.setItem(TOKEN_KEY, token);
    $("login").hidden = true;
    setText($("login-error"), "");
    $("login-error").hidden = true;
    $("dashboard").hidden = false;
    $("logout").hidden = false;
    renderStatus(status);
    await guard(() => runSearch(false));
    schedule();
  }

  // Runs `fn`; a refused token sends back to the login form, other errors show on top.
  async function guard(fn) {
    try {
      await fn();
      return true;
    } catch (exc) {
      if (exc instanceof AuthError) {
        showLogin(refused(exc));
      } else {
        const err = $("error");
        setText(err, exc.message);
        err.hidden = false;
      }
      return false;
    }
  }

  // -- the refresh -------------------------------------------------------------------

  function schedule() {
    clearTimeout(timer);
    timer = setTimeout(tick, REFRESH_MS);
  }

  async function tick() {
    if (token === null) return;
    await refresh();
    if (token !== null) schedule();
  }

  async function refresh() {
    const ok = await guard(async () => {
      const mine = ++statusGen;
      const status = await api("GET", "status");
      if (mine === statusGen && token !== null) renderStatus(status);
      if (!search.paged) await runSearch(false);
    });
    if (ok) $("error").hidden = true;
  }

  function renderStatus(s) {
    if (typeof s.now === "number") skew = s.now - Date.now() / 1000;
    const ready = $("ready");
    setText(ready, s.ready ? "ready" : "not ready");
    ready.className = "badge " + (s.ready ? "ok" : "bad");
    ready.hidden = false;
    setText($("updated"), "updated " + new Date().toLocaleTimeString() + ", every 3 s");

    const wh = s.webhooks || {};
    setText($("sum-inflight"), dash(s.inflight));
    setText($("sum-parked"), dash(s.parking && s.parking.parked));
    setText($("sum-backlog"), wh.backlog === null ? "no backlog configured" : dash(wh.backlog));
    setText($("sum-sessions"), dash(s.directory && s.directory.size));
    const ratio = s.directory && s.directory.cache_hit_ratio;
    setText($("sum-hits"), typeof ratio === "number" ? (ratio * 100).toFixed(1) + " %" : "-");
    setText($("sum-webhooks"), dash(wh.relayed) + " / " + dash(wh.queued));
    setText($("sum-sync"), s.sync ? s.sync.summary + " (" + ago(s.sync.started_at) + ")" : "not yet");

    const rows = (s.instances || []).map(instanceRow);
    $("instances").tBodies[0].replaceChildren(...rows);
  }

  function instanceRow(i) {
    const tr = document.createElement("tr");
    tr.dataset.instance = i.name;
    if (i.draining) tr.className = "draining";
    const state = STATES.includes(i.state) ? i.state : "unknown";
    let sessions = String(i.sessions);
    if (typeof i.reported_sessions === "number") sessions += " (" + i.reported_sessions + " reported)";
    tr.append(
      cell(i.name, "name"),
      cell(i.url, "url"),
      cell(i.state, "state state-" + state),
      cell(i.draining ? "draining" : "no", "drained"),
      cell(sessions, "num"),
      cell(dash(i.inflight), "num"),
      cell(typeof i.latency_ms === "number" ? i.latency_ms.toFixed(1) : "-", "num"),
      cell(ago(i.last_check_at)),
      cell(dash(i.failures), "num"),
      cell(dash(i.last_error), "error-text"),
    );
    const button = document.createElement("button");
    button.type = "button";
    const action = i.draining ? "undrain" : "drain";
    button.className = action;
    setText(button, i.draining ? "Undrain" : "Drain");
    button.addEventListener("click", () => setDraining(i.name, action, button));
    const td = document.createElement("td");
    td.append(button);
    tr.append(td);
    return tr;
  }

  // -- actions -----------------------------------------------------------------------

  async function setDraining(name, action, button) {
    button.disabled = true;
    await guard(async () => {
      const path = "instances/" + encodeURIComponent(name) + "/" + action;
      const answer = await api("POST", path);
      if (answer.shared === false) {
        throw new ApiError(0, name + ": " + action + " holds on this router only: the store could not be told");
      }
    });
    button.disabled = false;
    if (token !== null) await refresh();
  }

  async function runSync(dryRun) {
    const buttons = [$("sync"), $("sync-dry")];
    const out = $("sync-output");
    buttons.forEach((b) => (b.disabled = true));
    out.hidden = false;
    out.className = "";
    setText(out, dryRun ? "Dry run..." : "Syncing...");
    const ok = await guard(async () => {
      const report = await api("POST", "sync?dry_run=" + (dryRun ? "1" : "0"));
      setText(out, (report.lines || []).join("\n"));
      out.className = report.ok ? "" : "bad";
    });
    if (!ok) out.hidden = true;
    buttons.forEach((b) => (b.disabled = false));
    if (ok && token !== null) await refresh();
  }

  // -- sessions ----------------------------------------------------------------------

  // The sessions whose id starts with search.prefix, in id order. The listing is in id
  // order too, so the scan stops at the first id past the prefix.
  async function runSearch(more) {
    const mine = ++searchGen;
    const prefix = search.prefix;
    const found = more ? search.rows.slice() : [];
    const seen = new Set(found.map((r) => r.session));
    let cursor = more ? search.cursor : null;
    if (!more && prefix !== "") {
      // A whole id answers at once, however far the scan would have to read.
      try {
        const entry = await api("GET", "sessions/" + encodeURIComponent(prefix));
        found.push(entry);
        seen.add(entry.session);
      } catch (exc) {
        if (!(exc instanceof ApiError) || (exc.status !== 404 && exc.status !== 400)) throw exc;
      }
    }
    const want = found.length + PAGE;
    let scanned = 0;
    let pages = 0;
    let done = false;
    while (!done && found.length < want && pages < SCAN_PAGES) {
      const limit = prefix === "" ? PAGE : SCAN_LIMIT;
      let path = "sessions?limit=" + limit;
      if (cursor !== null) path += "&cursor=" + encodeURIComponent(cursor);
      const page = await api("GET", path);
      pages++;
      scanned += page.sessions.length;
      for (const row of page.sessions) {
        if (row.session.startsWith(prefix)) {
          if (!seen.has(row.session)) {
            found.push(row);
            seen.add(row.session);
          }
        } else if (row.session > prefix) {
          done = true;
          break;
        }
      }
      cursor = page.next_cursor;
      if (cursor === null) done = true;
    }
    if (mine !== searchGen || token === null) return;
    search.rows = found;
    search.cursor = done ? null : cursor;
    renderSessions(scanned);
  }

  function renderSessions(scanned) {
    const rows = search.rows.map((r) => {
      const tr = document.createElement("tr");
      tr.dataset.session = r.session;
      tr.append(
        cell(r.session, "name"),
        cell(dash(r.instance)),
        cell(dash(r.status)),
        cell(dash(r.source)),
        cell(ago(r.observed_at)),
      );
      return tr;
    });
    $("sessions").tBodies[0].replaceChildren(...rows);
    let note = search.rows.length + (search.rows.length === 1 ? " session" : " sessions");
    if (search.prefix !== "") note += " starting with \u201c" + search.prefix + "\u201d";
    if (search.cursor !== null) {
      note += search.rows.length === 0 ? " so far (" + scanned + " read): More reads on" : "; More lists more";
    }
    setText($("sessions-note"), note);
    $("more").hidden = search.cursor === null;
  }

  // -- wiring ------------------------------------------------------------------------

  function start() {
    $("login-form").addEventListener("submit", (ev) => {
      ev.preventDefault();
      signIn($("token").value.trim());
    });
    $("logout").addEventListener("click", () => showLogin(""));
    $("sync").addEventListener("click", () => runSync(false));
    $("sync-dry").addEventListener("click", () => runSync(true));
    $("search-form").addEventListener("submit", (ev) => {
      ev.preventDefault();
      search.prefix = $("search").value.trim();
      search.rows = [];
      search.cursor = null;
      search.paged = false;
      guard(() => runSearch(false));
    });
    $("more").addEventListener("click", () => {
      search.paged = true;
      guard(() => runSearch(true));
    });
    const stored = sessionStorage.getItem(TOKEN_KEY);
    if (stored) {
      signIn(stored);
    } else {
      showLogin("");
    }
  }

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", start);
  } else {
    start();
  }
})();
