// Shared by the counselor console and the supervisor view: session, REST calls, the live socket,
// a tiny DOM builder and formatting helpers. Plain ES modules, no build step.

const TOKEN_KEY = "helpline.token";

export const session = {
  get token() {
    return sessionStorage.getItem(TOKEN_KEY);
  },
  set token(value) {
    if (value) sessionStorage.setItem(TOKEN_KEY, value);
    else sessionStorage.removeItem(TOKEN_KEY);
  },
};

export class ApiError extends Error {
  constructor(status, body) {
    const err = (body && body.error) || {};
    super(err.message || `HTTP ${status}`);
    this.status = status;
    this.code = err.code || "error";
    this.fields = err.fields || {};
  }
}

// Difference between the server's clock and ours (ms), from the Date header of API answers.
let clockSkewMs = 0;
export const serverNow = () => Date.now() + clockSkewMs;
export const toLocalTime = (isoString) => Date.parse(isoString) - clockSkewMs;

let onUnauthorized = () => {};
export function setUnauthorizedHandler(fn) {
  onUnauthorized = fn;
}

export async function api(method, path, body) {
  const headers = { Accept: "application/json" };
  if (session.token) headers.Authorization = `Token ${session.token}`;
  const init = { method, headers, cache: "no-store" };
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const started = Date.now();
  const response = await fetch(path, init);
  const date = response.headers.get("Date");
  if (date) {
    const mid = (started + Date.now()) / 2;
    // Date is truncated to the second and may be cached for up to a second by the server:
    // only a clearly wrong local clock (minutes off) is corrected.
    const skew = Date.parse(date) + 1000 - mid;
    clockSkewMs = Math.abs(skew) > 5000 ? skew : 0;
  }
  let data = null;
  const text = await response.text();
  if (text) {
    try {
      data = JSON.parse(text);
    } catch {
      data = null;
    }
  }
  if (!response.ok) {
    const error = new ApiError(response.status, data);
    if (response.status === 401 && path !== "/api/token/") onUnauthorized(error);
    throw error;
  }
  return data;
}

export async function login(username, password) {
  const data = await api("POST", "/api/token/", { username, password });
  session.token = data.token;
  return data;
}

export async function logout() {
  try {
    if (session.token) await api("DELETE", "/api/token/");
  } catch {
    // the token is forgotten here either way
  }
  session.token = null;
}

// A WebSocket to /ws that reconnects by itself with exponential backoff and jitter, pings to
// notice dead connections, and calls onOpen after each (re)connection's "hello" so the page
// can catch up over REST.
export class LiveSocket {
  constructor({ onEvent, onOpen, onState, onAuthFailed }) {
    this.onEvent = onEvent;
    this.onOpen = onOpen;
    this.onState = onState || (() => {});
    this.onAuthFailed = onAuthFailed || (() => {});
    this.ws = null;
    this.attempt = 0;
    this.timer = null;
    this.pingTimer = null;
    this.lastSeen = 0;
    this.stopped = true;
    this.held = false;
  }

  start() {
    this.stopped = false;
    this.connect();
  }

  stop() {
    this.stopped = true;
    clearTimeout(this.timer);
    clearInterval(this.pingTimer);
    if (this.ws) this.ws.close(1000, "bye");
    this.ws = null;
  }

  // Diagnostics and tests: drop the connection and stay away until resume().
  hold() {
    this.held = true;
    clearTimeout(this.timer);
    if (this.ws) this.ws.close(4000, "held");
  }

  resume() {
    if (this.stopped) return;
    this.held = false;
    this.attempt = 0;
    clearTimeout(this.timer);
    if (!this.ws) this.connect();
  }

  get connected() {
    return !!this.ws && this.ws.readyState === WebSocket.OPEN;
  }

  connect() {
    if (this.stopped || this.held || !session.token) return;
    if (this.ws && this.ws.readyState <= WebSocket.OPEN) return;
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    const ws = new WebSocket(`${scheme}//${location.host}/ws?token=${encodeURIComponent(session.token)}`);
    this.ws = ws;
    this.onState(this.attempt ? "reconnecting" : "connecting");
    ws.onmessage = (msg) => {
      this.lastSeen = Date.now();
      let event;
      try {
        event = JSON.parse(msg.data);
      } catch {
        return;
      }
      if (event.type === "hello") {
        this.attempt = 0;
        this.onState("live");
        this.onOpen(event);
      } else if (event.type === "error" && event.code === "not_authenticated") {
        this.stopped = true;
        this.onAuthFailed(event);
      } else if (event.type !== "pong") {
        this.onEvent(event);
      }
    };
    ws.onopen = () => {
      this.lastSeen = Date.now();
      clearInterval(this.pingTimer);
      this.pingTimer = setInterval(() => this.ping(), 15000);
    };
    ws.onclose = (ev) => {
      clearInterval(this.pingTimer);
      if (this.ws === ws) this.ws = null;
      if (ev.code === 4401) {
        this.stopped = true;
        this.onAuthFailed(ev);
        return;
      }
      if (this.stopped) return;
      this.onState(this.held ? "offline" : "reconnecting");
      if (this.held) return;
      const base = Math.min(15000, 500 * 2 ** this.attempt);
      this.attempt += 1;
      this.timer = setTimeout(() => this.connect(), base / 2 + Math.random() * (base / 2));
    };
  }

  ping() {
    if (!this.connected) return;
    if (Date.now() - this.lastSeen > 40000) {
      this.ws.close(4000, "no answer to pings"); // onclose reconnects
      return;
    }
    this.ws.send('{"type":"ping"}');
  }
}

// el("div", {class: "x", onclick: fn, "aria-label": "y"}, child, "text", ...)
export function el(tag, attrs, ...children) {
  const node = document.createElementNS(
    tag === "svg" || SVG_TAGS.has(tag) ? "http://www.w3.org/2000/svg" : "http://www.w3.org/1999/xhtml",
    tag,
  );
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key.startsWith("on") && typeof value === "function") node.addEventListener(key.slice(2), value);
    else if (key === "dataset") Object.assign(node.dataset, value);
    else node.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}
const SVG_TAGS = new Set(["path", "g", "rect", "line", "polyline", "circle", "text", "title", "desc"]);

export function formatDuration(seconds) {
  if (seconds === null || seconds === undefined || Number.isNaN(seconds)) return "–";
  const s = Math.max(0, Math.floor(seconds));
  if (s < 60) return `${s} s`;
  const m = Math.floor(s / 60);
  if (m < 60) return `${m}:${String(s % 60).padStart(2, "0")}`;
  const h = Math.floor(m / 60);
  return `${h} h ${String(m % 60).padStart(2, "0")} min`;
}

export function secondsSince(isoString) {
  if (!isoString) return null;
  return (serverNow() - Date.parse(isoString)) / 1000;
}

export function clockTime(isoString) {
  if (!isoString) return "";
  return new Date(isoString).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
}

export const RISK_LABEL = { high: "High risk", medium: "Medium risk", low: "Low risk" };

export function riskBadge(risk) {
  const r = risk || "low";
  return el("span", { class: `badge risk-${r}` }, RISK_LABEL[r] || r);
}

// One polite and one assertive live region per page, for screen readers.
export function announce(text, { urgent = false } = {}) {
  const region = document.getElementById(urgent ? "announce-urgent" : "announce-polite");
  if (!region) return;
  region.textContent = "";
  // A new text node in a fresh task is announced even when the text repeats.
  setTimeout(() => {
    region.textContent = text;
  }, 50);
}

// The sign-in form shared by both pages: calls onSignedIn() after a successful login.
export function wireLoginForm(form, onSignedIn) {
  const error = form.querySelector("[data-role=error]");
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    error.textContent = "";
    const button = form.querySelector("button[type=submit]");
    button.disabled = true;
    try {
      await login(form.username.value.trim(), form.password.value);
      form.password.value = "";
      await onSignedIn();
    } catch (err) {
      if (err.status === 401) error.textContent = "Wrong username or password.";
      else if (err.status === 429) error.textContent = "Too many attempts. Wait a few minutes and try again.";
      else error.textContent = `Could not sign in: ${err.message}`;
      form.password.focus();
    } finally {
      button.disabled = false;
    }
  });
}

export function setConnectionState(node, state) {
  const labels = {
    connecting: "Connecting…",
    live: "Live",
    reconnecting: "Reconnecting…",
    offline: "Offline",
  };
  node.dataset.state = state;
  node.textContent = labels[state] || state;
}
