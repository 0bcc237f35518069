// The supervisor view: per site, the live queue, counselors, lapsed offers, outbox and dead letters
// (with replay), and hourly charts drawn as inline SVG. Polls every few seconds and refreshes at
// once on live site events (queue_changed, presence).

import {
  LiveSocket,
  announce,
  api,
  el,
  formatDuration,
  logout,
  session,
  setConnectionState,
  setUnauthorizedHandler,
  wireLoginForm,
} from "./lib.js";

const $ = (id) => document.getElementById(id);
const POLL_MS = 5000;
const STATS_MS = 60000;

const state = { me: null, overview: null, dead: [], stats: null, blocks: new Map(), multiSite: false };
let live = null;
let pollTimer = null;
let statsTimer = null;
let soon = null;

// ---------------------------------------------------------------------------------- data

function siteQuery(extra = {}) {
  const params = new URLSearchParams(extra);
  const site = $("site-filter").value;
  if (site) params.set("site", site);
  const q = params.toString();
  return q ? `?${q}` : "";
}

async function refresh() {
  try {
    const [overview, dead] = await Promise.all([
      api("GET", `/api/supervisor/overview${siteQuery()}`),
      api("GET", `/api/supervisor/dead-letters${siteQuery({ limit: 50 })}`),
    ]);
    state.overview = overview;
    state.dead = dead.results;
    render();
    $("updated").textContent = `Updated ${new Date().toLocaleTimeString([], {
      hour: "2-digit",
      minute: "2-digit",
      second: "2-digit",
    })}`;
  } catch (err) {
    if (err.status !== 401) toast(`Could not refresh: ${err.message}`);
  }
}

async function refreshStats() {
  try {
    state.stats = await api("GET", `/api/supervisor/stats${siteQuery({ hours: $("stats-hours").value })}`);
    renderCharts();
  } catch (err) {
    if (err.status !== 401) toast(`Could not load the charts: ${err.message}`);
  }
}

function refreshSoon() {
  clearTimeout(soon);
  soon = setTimeout(refresh, 300);
}

async function replay(id, button) {
  button.disabled = true;
  try {
    await api("POST", `/api/supervisor/dead-letters/${id}/replay`);
    toast(`Event ${id} is being sent again.`, "info");
    announce(`Dead letter ${id} replayed.`);
  } catch (err) {
    toast(err.status === 409 ? `Event ${id} was already replayed.` : `Could not replay event ${id}: ${err.message}`);
    button.disabled = false;
  }
  await refresh();
}

// ---------------------------------------------------------------------------------- rendering

let toastTimer = null;
function toast(text, kind = "error") {
  const node = $("toast");
  node.textContent = text;
  node.dataset.kind = kind;
  node.hidden = false;
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => {
    node.hidden = true;
  }, 5000);
}

function kpi(key, label) {
  const value = el("span", { class: "value" }, "–");
  const sub = el("span", { class: "sub" }, "");
  const node = el("div", { class: "card kpi", role: "group", "aria-label": label, dataset: { kpi: key } },
    el("span", { class: "label", "aria-hidden": "true" }, label), value, sub);
  return { node, value, sub };
}

const KPIS = [
  ["waiting", "Waiting"],
  ["longest_wait", "Longest wait"],
  ["high_risk", "High risk"],
  ["assigned", "In conversation"],
  ["counselors", "In the queue"],
  ["lapsed", "Lapsed offers"],
  ["outbox", "Outbox"],
  ["dead", "Dead letters"],
];

function siteBlock(slug, name) {
  let block = state.blocks.get(slug);
  if (block) return block;
  const headingId = `site-${slug}-h`;
  const kpis = {};
  const kpiRow = el("div", { class: "kpis" });
  for (const [key, label] of KPIS) {
    kpis[key] = kpi(key, label);
    kpiRow.append(kpis[key].node);
  }
  const counselors = el("div", { class: "table-wrap" });
  const dead = el("div", { class: "table-wrap" });
  const volume = el("div", { class: "chart-box" });
  const waits = el("div", { class: "chart-box" });
  const node = el(
    "section",
    { class: "site-block", "aria-labelledby": headingId, dataset: { site: slug } },
    el("h2", { id: headingId }, name, el("span", { class: "muted small" }, slug.toUpperCase())),
    kpiRow,
    el(
      "div",
      { class: "grid-2" },
      el("section", { class: "panel", "aria-label": `Counselors of ${name}` }, el("h3", {}, "Counselors"), counselors),
      el("section", { class: "panel", "aria-label": `Dead letters of ${name}` }, el("h3", {}, "Dead letters"), dead),
    ),
    el(
      "div",
      { class: "grid-2" },
      el(
        "section",
        { class: "panel", "aria-label": `Conversations per hour, ${name}` },
        el("h3", {}, "Conversations per hour"),
        volume,
        el("p", { class: "legend" }, el("span", {}, el("span", { class: "swatch volume" }), "conversations started")),
      ),
      el(
        "section",
        { class: "panel", "aria-label": `Wait to assignment, ${name}` },
        el("h3", {}, "Wait to a counselor"),
        waits,
        el(
          "p",
          { class: "legend" },
          el("span", {}, el("span", { class: "swatch median" }), "median"),
          el("span", {}, el("span", { class: "swatch max" }), "longest"),
        ),
      ),
    ),
  );
  block = { node, kpis, counselors, dead, volume, waits, sig: {} };
  state.blocks.set(slug, block);
  return block;
}

function setKpi(block, key, value, sub, alert = false) {
  const k = block.kpis[key];
  k.value.textContent = String(value);
  k.sub.textContent = sub || "";
  k.node.classList.toggle("alert", !!alert);
}

// Replace a table only when its data changed, so focus (a Replay button) survives polling.
function replaceIfChanged(block, key, data, build) {
  const sig = JSON.stringify(data);
  if (block.sig[key] === sig) return;
  block.sig[key] = sig;
  block[key].replaceChildren(build());
}

const STATUS_LABEL = { available: "In queue", paused: "Paused", offline: "Offline" };

function counselorTable(site) {
  if (!site.counselors.length) return el("p", { class: "empty" }, "No counselors for this site yet.");
  const rows = site.counselors.map((c) =>
    el(
      "tr",
      { dataset: { counselor: c.username } },
      el("td", {}, el("strong", {}, c.name), el("div", { class: "muted small" }, c.username)),
      el(
        "td",
        {},
        el("span", { class: `badge presence presence-${c.status}` }, STATUS_LABEL[c.status] || c.status),
        c.in_wrapup ? el("span", { class: "muted small" }, " wrap-up") : null,
      ),
      el("td", {}, c.reason || ""),
      el("td", { class: "num" }, `${c.active_conversations} / ${site.max_chats_per_counselor ?? "–"}`),
      el("td", { class: "num" }, c.pending_offers),
    ),
  );
  return el(
    "table",
    {},
    el("caption", { class: "sr-only" }, `Counselors of ${site.name}`),
    el(
      "thead",
      {},
      el(
        "tr",
        {},
        el("th", { scope: "col" }, "Counselor"),
        el("th", { scope: "col" }, "State"),
        el("th", { scope: "col" }, "Reason"),
        el("th", { scope: "col", class: "num" }, "Chats"),
        el("th", { scope: "col", class: "num" }, "Offers"),
      ),
    ),
    el("tbody", {}, rows),
  );
}

function shortTime(iso) {
  const d = new Date(iso);
  const today = d.toDateString() === new Date().toDateString();
  return today
    ? d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" })
    : d.toLocaleString([], { dateStyle: "short", timeStyle: "short" });
}

function deadTable(site, letters) {
  if (!letters.length) return el("p", { class: "empty" }, "None. Every event reached RapidPro.");
  const rows = letters.map((d) =>
    el(
      "tr",
      { dataset: { deadLetter: d.id } },
      el(
        "td",
        {},
        el("code", {}, d.chat_session || d.conversation_id.slice(0, 8)),
        el("span", { class: "sub" }, `#${d.id} · ${shortTime(d.created_at)}`),
      ),
      el("td", {}, d.event),
      el(
        "td",
        { class: "error-text" },
        el("span", { class: "reason" }, d.last_error || ""),
        el("span", { class: "sub" }, `${d.attempts} ${d.attempts === 1 ? "try" : "tries"}`),
      ),
      el(
        "td",
        { class: "num" },
        el(
          "button",
          {
            type: "button",
            "aria-label": `Replay dead letter ${d.id} (${d.event})`,
            onclick: (ev) => replay(d.id, ev.currentTarget),
          },
          "Replay",
        ),
      ),
    ),
  );
  return el(
    "table",
    {},
    el("caption", { class: "sr-only" }, `Dead letters of ${site.name}`),
    el(
      "thead",
      {},
      el(
        "tr",
        {},
        el("th", { scope: "col" }, "Conversation"),
        el("th", { scope: "col" }, "Event"),
        el("th", { scope: "col" }, "Reason"),
        el("th", { scope: "col", class: "num" }, el("span", { class: "sr-only" }, "Action")),
      ),
    ),
    el("tbody", {}, rows),
  );
}

function render() {
  const container = $("sites");
  const wanted = state.overview.sites.map((s) => s.slug);
  for (const [slug, block] of state.blocks) {
    if (!wanted.includes(slug)) {
      block.node.remove();
      state.blocks.delete(slug);
    }
  }
  for (const site of state.overview.sites) {
    const block = siteBlock(site.slug, site.name);
    if (block.node.parentNode !== container) container.append(block.node);
    const q = site.queue;
    setKpi(block, "waiting", q.waiting, `${q.queued} queued · ${q.offered} being offered`, q.waiting > 0);
    setKpi(block, "longest_wait", formatDuration(q.longest_wait_s), q.waiting ? "oldest in the queue" : "queue empty");
    setKpi(block, "high_risk", q.high_risk_waiting, "waiting with high risk", q.high_risk_waiting > 0);
    setKpi(block, "assigned", q.assigned, "conversations with a counselor");
    const cs = site.counselors_summary;
    setKpi(block, "counselors", cs.available, `counselors · ${cs.paused} paused · ${cs.offline} offline`);
    setKpi(block, "lapsed", site.offers_lapsed_last_hour, "not read in time, last hour");
    setKpi(
      block,
      "outbox",
      site.outbox.pending,
      site.outbox.pending ? `to send, oldest ${formatDuration(site.outbox.oldest_pending_age_s)}` : "all sent to RapidPro",
      site.outbox.oldest_pending_age_s > 60,
    );
    setKpi(block, "dead", site.dead_letters, site.dead_letters ? "need a replay" : "none", site.dead_letters > 0);
    replaceIfChanged(block, "counselors", site.counselors, () => counselorTable(site));
    const letters = state.dead.filter((d) => d.site === site.slug);
    replaceIfChanged(block, "dead", letters, () => deadTable(site, letters));
  }
  renderCharts();
}

// ---------------------------------------------------------------------------------- charts

const CH = { w: 640, h: 220, left: 44, right: 12, top: 12, bottom: 30 };

function niceMax(value) {
  if (value <= 0) return 1;
  const exp = 10 ** Math.floor(Math.log10(value));
  for (const m of [1, 2, 2.5, 5, 10]) if (m * exp >= value) return m * exp;
  return 10 * exp;
}

// Axis maxima whose quarters are whole numbers.
const COUNT_STEPS = [4, 8, 12, 16, 20, 40, 60, 80, 100, 200, 400, 800, 1000, 2000, 4000, 8000];
function niceCountMax(value) {
  return COUNT_STEPS.find((s) => s >= value) ?? niceMax(value);
}

function hourLabel(iso) {
  return new Date(iso).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
}

function frame(title, description, yMax, yFormat, hours) {
  const svg = el("svg", {
    class: "chart",
    viewBox: `0 0 ${CH.w} ${CH.h}`,
    role: "img",
    "aria-label": `${title}. ${description}`,
    preserveAspectRatio: "xMidYMid meet",
  });
  svg.append(el("title", {}, title), el("desc", {}, description));
  const plotH = CH.h - CH.top - CH.bottom;
  for (let i = 0; i <= 4; i++) {
    const y = CH.top + plotH - (plotH * i) / 4;
    svg.append(el("line", { class: i ? "grid" : "axis", x1: CH.left, x2: CH.w - CH.right, y1: y, y2: y }));
    svg.append(el("text", { x: CH.left - 6, y: y + 4, "text-anchor": "end" }, yFormat((yMax * i) / 4)));
  }
  const n = hours.length;
  const step = (CH.w - CH.left - CH.right) / n;
  const every = Math.max(1, Math.ceil(n / 8));
  hours.forEach((h, i) => {
    if (i % every !== 0) return;
    svg.append(el("text", { x: CH.left + step * i + step / 2, y: CH.h - 10, "text-anchor": "middle" }, hourLabel(h.start)));
  });
  return { svg, step, plotH };
}

function volumeChart(site) {
  const hours = site.hours;
  const total = hours.reduce((s, h) => s + h.conversations, 0);
  const busiest = hours.reduce((a, h) => (h.conversations > (a?.conversations ?? -1) ? h : a), null);
  const yMax = niceCountMax(Math.max(...hours.map((h) => h.conversations), 4));
  const description = total
    ? `${total} conversations in ${hours.length} hours; busiest hour ${hourLabel(busiest.start)} with ${busiest.conversations}.`
    : `No conversations in the last ${hours.length} hours.`;
  const { svg, step, plotH } = frame("Conversations per hour", description, yMax, (v) => String(Math.round(v)), hours);
  hours.forEach((h, i) => {
    if (!h.conversations) return;
    const height = (h.conversations / yMax) * plotH;
    const bar = el("rect", {
      class: "bar-volume",
      x: CH.left + step * i + step * 0.15,
      y: CH.top + plotH - height,
      width: step * 0.7,
      height,
      rx: 2,
    });
    bar.append(el("title", {}, `${hourLabel(h.start)}: ${h.conversations}`));
    svg.append(bar);
  });
  return svg;
}

function waitFormat(seconds) {
  if (seconds < 60) return `${Math.round(seconds)}s`;
  if (seconds < 3600) {
    const m = Math.floor(seconds / 60);
    const s = Math.round(seconds % 60);
    return s ? `${m}:${String(s).padStart(2, "0")}` : `${m}m`;
  }
  return `${+(seconds / 3600).toFixed(1)}h`;
}

// Axis maxima whose quarters are round durations.
const WAIT_STEPS = [20, 40, 60, 120, 240, 480, 600, 1200, 2400, 3600, 7200, 14400, 28800, 57600];
function niceWaitMax(value) {
  return WAIT_STEPS.find((s) => s >= value) ?? niceMax(value);
}

function waitChart(site) {
  const hours = site.hours;
  const withData = hours.filter((h) => h.max_wait_s !== null);
  const yMax = niceWaitMax(Math.max(...withData.map((h) => h.max_wait_s), 10));
  const worst = withData.reduce((a, h) => (h.max_wait_s > (a?.max_wait_s ?? -1) ? h : a), null);
  const description = worst
    ? `Median and longest wait to a counselor per hour; the longest was ${formatDuration(worst.max_wait_s)} at ${hourLabel(worst.start)}.`
    : `No conversation was assigned in the last ${hours.length} hours.`;
  const { svg, step, plotH } = frame("Wait to a counselor", description, yMax, waitFormat, hours);
  const points = [];
  hours.forEach((h, i) => {
    if (h.max_wait_s === null) return;
    const x = CH.left + step * i + step / 2;
    const height = (h.max_wait_s / yMax) * plotH;
    const bar = el("rect", { class: "bar-max", x: x - step * 0.35, y: CH.top + plotH - height, width: step * 0.7, height, rx: 2 });
    bar.append(el("title", {}, `${hourLabel(h.start)}: longest ${formatDuration(h.max_wait_s)}`));
    svg.append(bar);
    points.push([x, CH.top + plotH - (h.median_wait_s / yMax) * plotH, h]);
  });
  if (points.length > 1) {
    svg.append(el("polyline", { class: "line-median", points: points.map(([x, y]) => `${x},${y}`).join(" ") }));
  }
  for (const [x, y, h] of points) {
    const dot = el("circle", { class: "dot-median", cx: x, cy: y, r: 3.5 });
    dot.append(el("title", {}, `${hourLabel(h.start)}: median ${formatDuration(h.median_wait_s)}`));
    svg.append(dot);
  }
  return svg;
}

function renderCharts() {
  if (!state.stats) return;
  for (const site of state.stats.sites) {
    const block = state.blocks.get(site.slug);
    if (!block) continue;
    replaceIfChanged(block, "volume", site.hours, () => volumeChart(site));
    replaceIfChanged(block, "waits", site.hours, () => waitChart(site));
  }
}

// ---------------------------------------------------------------------------------- start

function showLogin(note) {
  if (live) live.stop();
  live = null;
  clearInterval(pollTimer);
  clearInterval(statsTimer);
  session.token = null;
  for (const block of state.blocks.values()) block.node.remove();
  state.blocks.clear();
  $("app-view").hidden = true;
  $("login-view").hidden = false;
  $("login-note").textContent = note || "";
  $("username").focus();
}

async function startApp() {
  let me;
  try {
    me = await api("GET", "/api/agents/me");
  } catch (err) {
    showLogin(err.status === 403 ? "This account cannot use the supervisor view." : undefined);
    return;
  }
  if (me.role !== "supervisor" && me.role !== "admin") {
    showLogin("This page is for supervisors. Counselors work in the console at /console/.");
    return;
  }
  state.me = me;
  $("me-name").textContent = me.name;
  $("login-view").hidden = true;
  $("app-view").hidden = false;
  const overview = await api("GET", "/api/supervisor/overview");
  state.multiSite = overview.sites.length > 1;
  $("site-field").hidden = !state.multiSite;
  const filter = $("site-filter");
  filter.replaceChildren(el("option", { value: "" }, "All sites"));
  for (const s of overview.sites) filter.append(el("option", { value: s.slug }, s.name));
  state.overview = overview;
  await refresh();
  await refreshStats();
  live = new LiveSocket({
    onEvent: (event) => {
      if (event.type === "queue_changed" || event.type === "presence") refreshSoon();
      else if (event.type === "resync") refresh();
    },
    onOpen: () => refreshSoon(),
    onState: (s) => setConnectionState($("conn"), s),
    onAuthFailed: () => showLogin("Your session has ended. Please sign in again."),
  });
  live.start();
  window.helplineSupervisor = { live, state, refresh };
  clearInterval(pollTimer);
  pollTimer = setInterval(refresh, POLL_MS);
  clearInterval(statsTimer);
  statsTimer = setInterval(refreshStats, STATS_MS);
}

function wire() {
  setUnauthorizedHandler(() => showLogin("Your session has ended. Please sign in again."));
  wireLoginForm($("login-form"), startApp);
  $("logout-btn").addEventListener("click", async () => {
    await logout();
    showLogin("You have signed out.");
  });
  $("site-filter").addEventListener("change", () => {
    refresh().then(refreshStats);
  });
  $("stats-hours").addEventListener("change", refreshStats);
}

wire();
if (session.token) {
  startApp().catch(() => showLogin());
} else {
  showLogin();
}
