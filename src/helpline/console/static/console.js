// The counselor console: presence, offers with a countdown, one chat pane per conversation,
// live over /ws with catch-up over REST after every reconnection (merged by id: no duplicates).

import {
  LiveSocket,
  RISK_LABEL,
  announce,
  api,
  clockTime,
  el,
  formatDuration,
  logout,
  riskBadge,
  secondsSince,
  session,
  setConnectionState,
  setUnauthorizedHandler,
  toLocalTime,
  wireLoginForm,
} from "./lib.js";

const $ = (id) => document.getElementById(id);
const BASE_TITLE = "Helpline console";

const state = {
  me: null,
  offers: new Map(), // offer id -> offer view + receivedAt + localDeadline (ms)
  convs: new Map(), // conversation id -> {conv, messages: Map(id -> message), unread}
  statusLater: new Map(), // message_id -> status seen before the message itself
  goneOffers: new Set(), // offers read, declined or withdrawn: never shown again
  presenceVersion: 0, // bumped on every presence change seen, so an older snapshot cannot undo it
  active: null,
  drafts: new Map(),
  renderedLog: null, // conversation id whose messages the log shows
  resyncing: null,
  resyncAgain: false,
  lastResync: 0,
};
let live = null;
let ticker = null;

// ---------------------------------------------------------------------------------- statuses

const OUT_RANK = { pending: 0, sent: 1, delivered: 2, read: 3 };
const IN_RANK = { queued: 0, delivered: 1, read: 2 };

// The status a message moves to: never backwards, as the server itself decides; a failed message
// may come back (a supervisor replayed it, or the chatbot says it arrived after all).
function nextStatus(direction, current, incoming) {
  if (!current || current === incoming) return incoming || current;
  if (direction === "in") return (IN_RANK[incoming] ?? 0) > (IN_RANK[current] ?? 0) ? incoming : current;
  if (incoming === "failed") return current === "read" ? current : "failed";
  if (current === "failed") return incoming;
  return (OUT_RANK[incoming] ?? 0) > (OUT_RANK[current] ?? 0) ? incoming : current;
}

const STATUS_TEXT = {
  pending: "Sending",
  sent: "Sent",
  delivered: "Delivered",
  read: "Read",
  failed: "Not delivered",
};

const TICK_PATHS = {
  sent: ["M4 8.5 7.5 12 15 4.5"],
  delivered: ["M1.5 8.5 5 12 12.5 4.5", "M9 11.2 9.8 12 17.3 4.5"],
  read: ["M1.5 8.5 5 12 12.5 4.5", "M9 11.2 9.8 12 17.3 4.5"],
  failed: ["M5.5 4.5l7 7", "M12.5 4.5l-7 7"],
};

function tick(status) {
  const svg = el("svg", { viewBox: "0 0 19 16", width: 19, height: 16, "aria-hidden": "true", focusable: "false" });
  if (status === "pending") {
    svg.append(el("circle", { cx: 9.5, cy: 8, r: 5.5 }), el("path", { d: "M9.5 5v3l2 1.5" }));
  } else {
    for (const d of TICK_PATHS[status] || []) svg.append(el("path", { d }));
  }
  return el(
    "span",
    { class: `tick tick-${status}`, title: STATUS_TEXT[status] || status, dataset: { status } },
    svg,
    el("span", { class: status === "failed" ? "tick-text" : "sr-only" }, STATUS_TEXT[status] || status),
  );
}

// ---------------------------------------------------------------------------------- sound, title

let audio = null;
function unlockAudio() {
  if (audio) {
    if (audio.state === "suspended") audio.resume().catch(() => {});
    return;
  }
  if (!window.AudioContext) return;
  try {
    audio = new AudioContext();
  } catch {
    audio = null;
  }
}

function beep() {
  if (!audio || !$("sound-toggle").checked) return;
  if (audio.state === "suspended") audio.resume();
  const t = audio.currentTime;
  for (const [offset, freq] of [
    [0, 880],
    [0.18, 1175],
  ]) {
    const osc = audio.createOscillator();
    const gain = audio.createGain();
    osc.type = "sine";
    osc.frequency.value = freq;
    gain.gain.setValueAtTime(0.0001, t + offset);
    gain.gain.exponentialRampToValueAtTime(0.2, t + offset + 0.02);
    gain.gain.exponentialRampToValueAtTime(0.0001, t + offset + 0.15);
    osc.connect(gain).connect(audio.destination);
    osc.start(t + offset);
    osc.stop(t + offset + 0.16);
  }
}

let flashOn = false;
function updateTitle() {
  const n = state.offers.size;
  if (n === 0) {
    flashOn = false;
    const unread = [...state.convs.values()].reduce((sum, e) => sum + e.unread, 0);
    document.title = unread ? `(${unread}) ${BASE_TITLE}` : BASE_TITLE;
    return;
  }
  flashOn = !flashOn;
  document.title = flashOn ? `● New chat offer${n > 1 ? `s (${n})` : ""}` : BASE_TITLE;
}

// ---------------------------------------------------------------------------------- toasts

let toastTimer = null;
function toast(text, kind = "error") {
  const node = $("toast");
  node.textContent = text;
  node.dataset.kind = kind;
  node.hidden = false;
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => {
    node.hidden = true;
  }, 6000);
}

function apiFailed(err, what) {
  if (err.status === 401) return; // the sign-in page takes over
  toast(`${what}: ${err.message}`);
}

// ---------------------------------------------------------------------------------- state updates

function entryFor(conv) {
  let entry = state.convs.get(conv.id);
  if (!entry) {
    entry = { conv, messages: new Map(), unread: 0 };
    state.convs.set(conv.id, entry);
  } else if (entry.conv.status === "closed" && conv.status !== "closed") {
    // A snapshot taken before the close: a closed conversation never opens again.
  } else {
    entry.conv = { ...entry.conv, ...conv };
  }
  return entry;
}

function setPresenceView(presence) {
  state.me.presence = { ...state.me.presence, ...presence };
  state.presenceVersion += 1;
}

function dropOffer(id) {
  state.offers.delete(id);
  state.goneOffers.add(id);
}

// Merge one message by id; returns true when it was new.
function mergeMessage(entry, message) {
  const known = entry.messages.get(message.id);
  const later = state.statusLater.get(message.message_id);
  if (later) state.statusLater.delete(message.message_id);
  if (!known) {
    const m = { ...message };
    if (later) m.status = nextStatus(m.direction, m.status, later);
    entry.messages.set(m.id, m);
    return true;
  }
  const status = nextStatus(known.direction, known.status, message.status);
  Object.assign(known, message, { status: later ? nextStatus(known.direction, status, later) : status });
  return false;
}

function setOffer(offer, source) {
  if (state.goneOffers.has(offer.id)) return false;
  const now = Date.now();
  const previous = state.offers.get(offer.id);
  let localDeadline;
  if (source === "event") localDeadline = now + offer.expires_in_s * 1000;
  else localDeadline = toLocalTime(offer.deadline);
  if (previous) localDeadline = Math.min(previous.localDeadline, localDeadline);
  state.offers.set(offer.id, { ...offer, receivedAt: previous?.receivedAt ?? now, localDeadline });
  return !previous;
}

// ---------------------------------------------------------------------------------- catching up

async function loadConversation(id) {
  try {
    const data = await api("GET", `/api/conversations/${encodeURIComponent(id)}/messages/`);
    const entry = entryFor(data.conversation);
    for (const m of data.results) mergeMessage(entry, m);
    return entry;
  } catch (err) {
    if (err.status === 404) {
      // Transferred away, or never ours: it leaves the list.
      state.convs.delete(id);
      if (state.active === id) state.active = null;
      return null;
    }
    throw err;
  }
}

// Everything the server knows, merged into what the page shows: run on sign-in, after every
// reconnection and when the server asks for it ("resync"). Concurrent calls coalesce.
function resync() {
  if (state.resyncing) {
    state.resyncAgain = true;
    return state.resyncing;
  }
  state.lastResync = Date.now();
  state.resyncing = (async () => {
    do {
      state.resyncAgain = false;
      const started = Date.now();
      const presenceVersion = state.presenceVersion;
      const [me, offers, convs] = await Promise.all([
        api("GET", "/api/agents/me"),
        api("GET", "/api/offers/"),
        api("GET", "/api/conversations/"),
      ]);
      if (state.me && state.presenceVersion !== presenceVersion) me.presence = state.me.presence;
      state.me = me;
      const fresh = new Set(offers.results.map((o) => o.id));
      for (const [id, o] of state.offers) if (!fresh.has(id) && o.receivedAt < started) dropOffer(id);
      for (const o of offers.results) setOffer(o, "rest");
      const mine = convs.results.filter((c) => c.counselor_id === me.id);
      for (const c of mine) entryFor(c);
      const open = [...state.convs.values()].filter((e) => e.conv.status !== "closed").map((e) => e.conv.id);
      await Promise.all(open.map((id) => loadConversation(id)));
      renderAll();
    } while (state.resyncAgain);
  })()
    .catch((err) => apiFailed(err, "Could not refresh"))
    .finally(() => {
      state.resyncing = null;
    });
  return state.resyncing;
}

// ---------------------------------------------------------------------------------- live events

function onEvent(event) {
  switch (event.type) {
    case "offer": {
      const offer = event.offer;
      if (setOffer(offer, "event")) {
        const c = offer.conversation;
        beep();
        announce(
          `New chat offer: ${c.client_name}, ${RISK_LABEL[c.risk] || c.risk}. ` +
            `${Math.round(offer.expires_in_s)} seconds to read it.`,
          { urgent: true },
        );
      }
      renderOffers();
      break;
    }
    case "offer_withdrawn": {
      const offer = state.offers.get(event.offer_id);
      dropOffer(event.offer_id);
      if (offer) {
        const why = { timed_out: "it was not read in time", taken: "a colleague took it", closed: "the client left" };
        announce(`Offer for ${offer.conversation.client_name} withdrawn: ${why[event.reason] || event.reason}.`);
      }
      renderOffers();
      break;
    }
    case "message": {
      const m = event.message;
      const entry = state.convs.get(m.conversation_id);
      if (!entry) {
        loadConversation(m.conversation_id)
          .then(renderAll)
          .catch((err) => apiFailed(err, "Could not load the conversation"));
        break;
      }
      const isNew = mergeMessage(entry, m);
      if (isNew && m.direction === "in") {
        if (state.active === m.conversation_id && document.visibilityState === "visible") markRead(entry);
        else entry.unread += 1;
        announce(`${entry.conv.client_name}: ${m.text}`);
      }
      renderConvList();
      if (state.active === m.conversation_id) renderLog();
      break;
    }
    case "message_status": {
      const entry = state.convs.get(event.conversation_id);
      const m = entry && [...entry.messages.values()].find((x) => x.message_id === event.message_id);
      if (!m) {
        state.statusLater.set(event.message_id, event.status);
        break;
      }
      const before = m.status;
      m.status = nextStatus(m.direction, m.status, event.status);
      if (m.status === "failed" && before !== "failed") {
        announce(`A message to ${entry.conv.client_name} could not be delivered.`, { urgent: true });
      }
      if (state.active === event.conversation_id) renderLog();
      break;
    }
    case "conversation_closed": {
      const entry = state.convs.get(event.conversation_id);
      if (!entry) break;
      if (event.closed_by === "transfer") {
        state.convs.delete(event.conversation_id);
        if (state.active === event.conversation_id) state.active = null;
        announce(`${entry.conv.client_name} was transferred.`);
      } else {
        entry.conv.status = "closed";
        entry.conv.closed_by = event.closed_by;
        entry.conv.close_reason = event.reason;
        if (event.closed_by !== "counselor") announce(`${entry.conv.client_name} ended the conversation.`);
      }
      renderAll();
      break;
    }
    case "presence": {
      if (state.me) {
        const before = state.me.presence?.status;
        setPresenceView(event.presence);
        if (before === "available" && event.presence.status === "paused" && event.presence.reason === "no answer") {
          announce("You were paused because an offer was not read in time. Join the queue when you are ready.", {
            urgent: true,
          });
        }
      }
      renderMe();
      break;
    }
    case "resync":
      resync();
      break;
    default:
      break;
  }
}

// ---------------------------------------------------------------------------------- actions

async function setPresence(status, reason) {
  unlockAudio();
  try {
    const presence = await api("PUT", "/api/agents/me/presence", { status, reason: reason || null });
    setPresenceView(presence);
    renderMe();
    if (status === "offline") {
      for (const id of state.offers.keys()) dropOffer(id);
      renderOffers();
    }
  } catch (err) {
    apiFailed(err, "Could not change your presence");
  }
}

async function readOffer(id) {
  unlockAudio();
  try {
    const data = await api("POST", `/api/offers/${id}/read`);
    dropOffer(id);
    const entry = entryFor(data.conversation);
    for (const m of data.messages) mergeMessage(entry, m);
    select(data.conversation.id, { focus: true });
    markRead(entry);
  } catch (err) {
    if (err.status === 409 || err.status === 404) {
      dropOffer(id);
      toast("This offer is no longer available: it lapsed or a colleague took it.", "info");
    } else {
      apiFailed(err, "Could not read the offer");
    }
  }
  renderAll();
}

async function declineOffer(id) {
  try {
    await api("POST", `/api/offers/${id}/decline`);
  } catch (err) {
    if (err.status !== 409 && err.status !== 404) apiFailed(err, "Could not decline the offer");
  }
  dropOffer(id);
  renderOffers();
}

const reading = new Set();
async function markRead(entry) {
  const id = entry.conv.id;
  const unread = [...entry.messages.values()].some((m) => m.direction === "in" && m.status !== "read");
  entry.unread = 0;
  if (!unread || entry.conv.status !== "assigned" || reading.has(id)) return;
  reading.add(id);
  try {
    await api("POST", `/api/conversations/${encodeURIComponent(id)}/read/`);
    for (const m of entry.messages.values()) if (m.direction === "in") m.status = "read";
  } catch (err) {
    if (err.status !== 409) apiFailed(err, "Could not mark the messages read");
  } finally {
    reading.delete(id);
  }
  renderConvList();
}

async function sendReply() {
  const entry = state.convs.get(state.active);
  const box = $("reply");
  const text = box.value.trim();
  if (!entry || !text) return;
  box.value = "";
  state.drafts.delete(entry.conv.id);
  try {
    const m = await api("POST", `/api/conversations/${encodeURIComponent(entry.conv.id)}/messages/`, { text });
    mergeMessage(entry, m);
    renderLog();
    renderConvList();
  } catch (err) {
    if (!box.value) box.value = text;
    apiFailed(err, "The reply was not sent");
  }
}

async function closeConversation(reason) {
  const entry = state.convs.get(state.active);
  if (!entry) return;
  try {
    const data = await api("POST", `/api/conversations/${encodeURIComponent(entry.conv.id)}/close/`, { reason });
    entryFor(data.conversation);
    $("close-menu").open = false;
    announce(`Conversation with ${entry.conv.client_name} closed.`);
  } catch (err) {
    apiFailed(err, "Could not close the conversation");
  }
  renderAll();
}

async function transferConversation(kind, target) {
  const entry = state.convs.get(state.active);
  if (!entry || !target) return;
  try {
    await api("POST", `/api/conversations/${encodeURIComponent(entry.conv.id)}/transfer/`, { [kind]: target });
    state.convs.delete(entry.conv.id);
    state.active = null;
    $("transfer-menu").open = false;
    announce(`Conversation with ${entry.conv.client_name} transferred.`);
  } catch (err) {
    apiFailed(err, err.status === 404 ? "No such counselor or site" : "Could not transfer");
  }
  renderAll();
}

function select(id, { focus = false } = {}) {
  if (state.active && state.active !== id) state.drafts.set(state.active, $("reply").value);
  state.active = id;
  $("reply").value = state.drafts.get(id) || "";
  const entry = state.convs.get(id);
  if (entry) markRead(entry);
  renderAll();
  if (focus && entry && entry.conv.status !== "closed") $("reply").focus();
}

// ---------------------------------------------------------------------------------- rendering

function renderMe() {
  const me = state.me;
  if (!me) return;
  $("me-name").textContent = me.name;
  $("site-name").textContent = me.site_name || me.site;
  const p = me.presence || { status: "offline" };
  const badge = $("presence-badge");
  badge.className = `badge presence presence-${p.status}`;
  badge.textContent =
    p.status === "available" ? "In the queue" : p.status === "paused" ? `Paused${p.reason ? ` · ${p.reason}` : ""}` : "Offline";
  $("join-btn").disabled = p.status === "available";
  $("join-btn").setAttribute("aria-pressed", String(p.status === "available"));
  $("pause-btn").disabled = p.status === "paused" && p.reason === $("pause-reason").value;
  $("leave-btn").disabled = p.status === "offline";
  const active = [...state.convs.values()].filter((e) => e.conv.status === "assigned").length;
  $("load").textContent = me.max_conversations ? `${active} of ${me.max_conversations}` : "";
  if (!state.active) renderHint();
}

function offerSecondsLeft(offer) {
  return Math.max(0, (offer.localDeadline - Date.now()) / 1000);
}

function renderOffers() {
  const list = $("offers");
  list.replaceChildren();
  const offers = [...state.offers.values()].sort(
    (a, b) => riskRank(b.conversation.risk) - riskRank(a.conversation.risk) || a.id - b.id,
  );
  for (const offer of offers) {
    const c = offer.conversation;
    const total = Math.max(1, Date.parse(offer.deadline) - Date.parse(offer.created_at)) / 1000;
    const left = offerSecondsLeft(offer);
    const bar = el("span", { class: "bar-fill" });
    bar.style.width = `${Math.min(100, (left / total) * 100)}%`;
    list.append(
      el(
        "li",
        { class: `offer-card risk-${c.risk}`, dataset: { offerId: offer.id } },
        el("div", { class: "offer-top" }, el("strong", { class: "client" }, c.client_name), riskBadge(c.risk)),
        el(
          "p",
          { class: "offer-meta" },
          [`via ${c.source}`, c.location ? `from ${c.location}` : null].filter(Boolean).join(" · "),
          " · waiting ",
          el("span", { dataset: { since: c.created_at } }, formatDuration(secondsSince(c.created_at))),
        ),
        el(
          "div",
          { class: "countdown", dataset: { countdown: offer.id, total } },
          el("span", { class: "bar", "aria-hidden": "true" }, bar),
          el("span", { class: "secs", role: "timer", "aria-live": "off" }, `${Math.ceil(left)} s left`),
        ),
        el(
          "div",
          { class: "offer-actions" },
          el(
            "button",
            {
              type: "button",
              class: "primary",
              "aria-label": `Read and accept the offer from ${c.client_name}`,
              onclick: () => readOffer(offer.id),
            },
            "Read & accept",
          ),
          el(
            "button",
            { type: "button", "aria-label": `Decline the offer from ${c.client_name}`, onclick: () => declineOffer(offer.id) },
            "Decline",
          ),
        ),
      ),
    );
  }
  $("offers-empty").hidden = offers.length > 0;
  $("offers-count").hidden = offers.length === 0;
  $("offers-count").textContent = String(offers.length);
  if (!state.active) renderHint();
  updateTitle();
}

function riskRank(risk) {
  return { high: 2, medium: 1, low: 0 }[risk] ?? 0;
}

function lastMessage(entry) {
  let last = null;
  for (const m of entry.messages.values()) if (!last || m.id > last.id) last = m;
  return last;
}

function renderConvList() {
  const list = $("convs");
  list.replaceChildren();
  const entries = [...state.convs.values()].sort(
    (a, b) =>
      (a.conv.status === "closed") - (b.conv.status === "closed") ||
      riskRank(b.conv.risk) - riskRank(a.conv.risk) ||
      Date.parse(a.conv.created_at) - Date.parse(b.conv.created_at),
  );
  for (const entry of entries) {
    const c = entry.conv;
    const last = lastMessage(entry);
    const closed = c.status === "closed";
    list.append(
      el(
        "li",
        {},
        el(
          "button",
          {
            type: "button",
            class: `conv-item${closed ? " closed" : ""}`,
            "aria-current": state.active === c.id ? "true" : null,
            dataset: { conversationId: c.id },
            onclick: () => select(c.id, { focus: true }),
          },
          el(
            "span",
            { class: "conv-top" },
            el("strong", {}, c.client_name),
            closed ? el("span", { class: "badge closed-badge" }, "Closed") : riskBadge(c.risk),
            entry.unread ? el("span", { class: "unread", "aria-label": `${entry.unread} new` }, entry.unread) : null,
          ),
          el(
            "span",
            { class: "preview" },
            last ? `${last.direction === "out" ? "You: " : ""}${last.text.slice(0, 80)}` : "",
          ),
        ),
      ),
    );
  }
  $("convs-empty").hidden = entries.length > 0;
  renderMe();
  updateTitle();
}

function paneMeta(c) {
  const parts = [];
  parts.push(riskBadge(c.risk));
  parts.push(el("span", {}, `Site ${c.site.toUpperCase()}`));
  if (c.location) parts.push(el("span", {}, `From ${c.location}`));
  parts.push(el("span", {}, `via ${c.source}`));
  if (c.assigned_at) {
    const waited = (Date.parse(c.assigned_at) - Date.parse(c.created_at)) / 1000;
    parts.push(el("span", {}, `Waited ${formatDuration(waited)}`));
    if (c.status !== "closed") {
      parts.push(
        el(
          "span",
          {},
          "Open for ",
          el("span", { dataset: { since: c.assigned_at } }, formatDuration(secondsSince(c.assigned_at))),
        ),
      );
    }
  } else {
    parts.push(
      el("span", {}, "Waiting ", el("span", { dataset: { since: c.created_at } }, formatDuration(secondsSince(c.created_at)))),
    );
  }
  return parts;
}

function renderPane() {
  const entry = state.active ? state.convs.get(state.active) : null;
  $("pane-empty").hidden = !!entry;
  $("pane-chat").hidden = !entry;
  if (!entry) {
    state.renderedLog = null;
    renderHint();
    return;
  }
  const c = entry.conv;
  $("pane-title").textContent = c.client_name;
  $("pane-meta").replaceChildren(...paneMeta(c));
  const closed = c.status === "closed";
  $("closed-note").hidden = !closed;
  if (closed) {
    const by = { chatbot: "the client (chatbot)", counselor: "you", system: "the system" }[c.closed_by] || c.closed_by;
    $("closed-text").textContent = `This conversation is closed${by ? ` by ${by}` : ""}${
      c.close_reason ? ` (${c.close_reason.replaceAll("_", " ")})` : ""
    }.`;
  }
  $("composer").hidden = closed;
  for (const id of ["transfer-menu", "close-menu"]) {
    $(id).hidden = closed;
    if (closed) $(id).open = false;
  }
  renderLog();
}

// What the empty pane suggests doing next.
function renderHint() {
  const status = state.me?.presence?.status || "offline";
  const open = [...state.convs.values()].filter((e) => e.conv.status !== "closed").length;
  let title = "No conversation open";
  let text = "Join the queue to receive offers. Read an offer to start the conversation.";
  if (state.offers.size) {
    title = state.offers.size > 1 ? `${state.offers.size} offers are waiting` : "An offer is waiting";
    text = "Read it on the left before the countdown ends: the conversation opens here.";
  } else if (open) {
    text = "Choose a conversation on the left to open it here.";
  } else if (status === "available") {
    title = "You are in the queue";
    text = "New conversations are offered to you on the left, with a sound and a flashing title.";
  } else if (status === "paused") {
    title = "You are paused";
    text = "No offers come while you are paused. Join the queue when you are ready.";
  }
  $("hint-title").textContent = title;
  $("hint-text").textContent = text;
}

// Attachments are URL references: a shared location (geo:LAT,LON, RFC 5870) opens a map, a file its URL.
const GEO = /^geo:(-?\d{1,2}(?:\.\d+)?),(-?\d{1,3}(?:\.\d+)?)/;

function attachmentLinks(items) {
  if (!items || !items.length) return null;
  return el(
    "ul",
    { class: "attachments" },
    items.map((a) => {
      const geo = GEO.exec(a.url || "");
      if (geo) {
        const [lat, lon] = [geo[1], geo[2]];
        const map = `https://www.openstreetmap.org/?mlat=${lat}&mlon=${lon}#map=15/${lat}/${lon}`;
        return el("li", {}, el("a", { href: map, target: "_blank", rel: "noopener" }, `Location ${lat}, ${lon}`));
      }
      if (!/^https?:\/\//.test(a.url || "")) return null;
      const name = a.filename || a.url.split("/").pop() || "attachment";
      return el("li", {}, el("a", { href: a.url, target: "_blank", rel: "noopener noreferrer" }, name));
    }),
  );
}

function messageNode(entry, m) {
  const mine = m.direction === "out";
  const who = mine ? m.counselor_name || "You" : entry.conv.client_name;
  return el(
    "div",
    { class: `msg ${mine ? "out" : "in"}`, dataset: { id: m.id, messageId: m.message_id, status: m.status } },
    el("span", { class: "sr-only" }, `${mine ? "You" : who} said: `),
    el("div", { class: "bubble", dir: "auto" }, m.text, attachmentLinks(m.attachments)),
    el(
      "div",
      { class: "msg-meta" },
      el("time", { datetime: m.created_at }, clockTime(m.created_at)),
      mine ? tick(m.status) : null,
    ),
  );
}

// The log is updated in place (keyed by message id): a screen reader hears only what is new.
function renderLog() {
  const entry = state.active ? state.convs.get(state.active) : null;
  const log = $("log");
  if (!entry) return;
  if (state.renderedLog !== entry.conv.id) {
    log.replaceChildren();
    state.renderedLog = entry.conv.id;
  }
  const nearBottom = log.scrollHeight - log.scrollTop - log.clientHeight < 80;
  const existing = new Map([...log.children].map((n) => [Number(n.dataset.id), n]));
  const messages = [...entry.messages.values()].sort((a, b) => a.id - b.id);
  let previous = null;
  for (const m of messages) {
    let node = existing.get(m.id);
    if (!node) {
      node = messageNode(entry, m);
      if (previous) previous.after(node);
      else log.prepend(node);
    } else if (node.dataset.status !== m.status) {
      node.dataset.status = m.status;
      const old = node.querySelector(".tick");
      if (old) old.replaceWith(tick(m.status));
    }
    previous = node;
  }
  if (nearBottom) log.scrollTop = log.scrollHeight;
}

function renderAll() {
  if (state.active && !state.convs.has(state.active)) state.active = null;
  renderMe();
  renderOffers();
  renderConvList();
  renderPane();
}

// Once a second: countdowns, waiting times, the title flash.
function everySecond() {
  for (const node of document.querySelectorAll("[data-countdown]")) {
    const offer = state.offers.get(Number(node.dataset.countdown));
    if (!offer) continue;
    const left = offerSecondsLeft(offer);
    node.querySelector(".bar-fill").style.width = `${Math.min(100, (left / Number(node.dataset.total)) * 100)}%`;
    node.querySelector(".secs").textContent = left > 0 ? `${Math.ceil(left)} s left` : "Lapsing…";
    node.classList.toggle("urgent", left <= 10);
    node.closest(".offer-card")?.querySelector("button.primary")?.toggleAttribute("disabled", left <= 0);
  }
  for (const node of document.querySelectorAll("[data-since]")) {
    node.textContent = formatDuration(secondsSince(node.dataset.since));
  }
  // Without the live connection, keep catching up over REST every 15 seconds.
  if (live && !live.connected && Date.now() - state.lastResync > 15000) resync();
  updateTitle();
}

// ---------------------------------------------------------------------------------- start

function showLogin(note) {
  if (live) live.stop();
  live = null;
  clearInterval(ticker);
  session.token = null;
  state.me = null;
  state.offers.clear();
  state.goneOffers.clear();
  state.convs.clear();
  state.statusLater.clear();
  state.active = null;
  state.renderedLog = null;
  document.title = BASE_TITLE;
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
    if (err.status === 403) {
      showLogin("This account cannot use the counselor console.");
      return;
    }
    if (err.status === 401) {
      showLogin();
      return;
    }
    throw err;
  }
  unlockAudio();
  state.me = me;
  $("login-view").hidden = true;
  $("app-view").hidden = false;
  renderAll();
  live = new LiveSocket({
    onEvent,
    onOpen: () => resync(),
    onState: (s) => setConnectionState($("conn"), s),
    onAuthFailed: () => showLogin("Your session has ended. Please sign in again."),
  });
  live.start();
  window.helplineConsole = { live, state, resync };
  clearInterval(ticker);
  ticker = setInterval(everySecond, 1000);
  await resync();
}

function wire() {
  setUnauthorizedHandler(() => showLogin("Your session has ended. Please sign in again."));
  wireLoginForm($("login-form"), startApp);
  $("join-btn").addEventListener("click", () => setPresence("available"));
  $("pause-btn").addEventListener("click", () => setPresence("paused", $("pause-reason").value));
  $("pause-reason").addEventListener("change", renderMe);
  $("leave-btn").addEventListener("click", () => setPresence("offline", "left"));
  $("logout-btn").addEventListener("click", async () => {
    await logout();
    showLogin("You have signed out.");
  });
  $("sound-toggle").checked = localStorage.getItem("helpline.sound") !== "off";
  $("sound-toggle").addEventListener("change", (ev) => {
    localStorage.setItem("helpline.sound", ev.target.checked ? "on" : "off");
    unlockAudio();
  });
  $("composer").addEventListener("submit", (ev) => {
    ev.preventDefault();
    sendReply();
  });
  $("reply").addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && !ev.shiftKey && !ev.ctrlKey && !ev.altKey && !ev.isComposing) {
      ev.preventDefault();
      sendReply();
    }
  });
  $("close-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    closeConversation($("close-reason").value);
  });
  $("transfer-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const form = ev.target;
    transferConversation(form.kind.value, form.target.value.trim());
  });
  $("dismiss-btn").addEventListener("click", () => {
    if (state.active) state.convs.delete(state.active);
    state.active = null;
    renderAll();
  });
  for (const id of ["transfer-menu", "close-menu"]) {
    $(id).addEventListener("keydown", (ev) => {
      if (ev.key === "Escape") {
        $(id).open = false;
        $(id).querySelector("summary").focus();
      }
    });
  }
  document.addEventListener("visibilitychange", () => {
    if (document.visibilityState !== "visible") return;
    const entry = state.active && state.convs.get(state.active);
    if (entry) markRead(entry);
    if (live && !live.connected) live.resume();
  });
  window.addEventListener("online", () => live && live.resume());
  // Browsers only let a page play sound after an interaction: the first one unlocks it.
  for (const type of ["pointerdown", "keydown"]) document.addEventListener(type, unlockAudio, { passive: true });
}

wire();
if (session.token) {
  startApp().catch(() => showLogin());
} else {
  showLogin();
}
