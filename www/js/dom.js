// Small DOM helpers: element builder and formatting. Text always goes in as
// text nodes (never innerHTML), so message bodies cannot inject markup.

/**
 * Build an element: h("button", {id: "x", onclick: fn, dataset: {testid: "y"}}, "text", child).
 * Attributes starting with "on" become listeners; `dataset` fills data-*;
 * null/undefined/false attributes and children are skipped.
 */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "dataset") {
      for (const [k, v] of Object.entries(value)) if (v !== null && v !== undefined) el.dataset[k] = String(v);
    } else if (key.startsWith("on") && typeof value === "function") {
      el.addEventListener(key.slice(2), value);
    } else if (key === "class") {
      el.className = value;
    } else if (key === "value") {
      el.value = value;
    } else if (value === true) {
      el.setAttribute(key, "");
    } else {
      el.setAttribute(key, String(value));
    }
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const child of children) {
    if (child === null || child === undefined || child === false) continue;
    if (Array.isArray(child)) append(el, child);
    else el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

export const $ = (sel, root = document) => root.querySelector(sel);

/** "14:03" today, "3 Mar 14:03" otherwise. */
export function formatTime(ts) {
  if (!ts) return "";
  const d = new Date(ts);
  const now = new Date();
  const hm = d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
  if (d.toDateString() === now.toDateString()) return hm;
  return `${d.toLocaleDateString([], { day: "numeric", month: "short" })} ${hm}`;
}

/** "online", "last seen 5 min ago", "last seen 3 Mar 14:03" or "offline". */
export function formatPresence(user) {
  if (!user) return "";
  if (user.online) return "online";
  if (!user.last_seen) return "offline";
  const ago = Date.now() - user.last_seen;
  if (ago < 60_000) return "last seen just now";
  if (ago < 3_600_000) return `last seen ${Math.round(ago / 60_000)} min ago`;
  return `last seen ${formatTime(user.last_seen)}`;
}

export function uuid() {
  if (crypto.randomUUID) return crypto.randomUUID();
  // crypto.randomUUID needs a secure context; plain http on a LAN address is not one.
  const b = crypto.getRandomValues(new Uint8Array(16));
  b[6] = (b[6] & 0x0f) | 0x40;
  b[8] = (b[8] & 0x3f) | 0x80;
  const hex = [...b].map((x) => x.toString(16).padStart(2, "0")).join("");
  return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${hex.slice(16, 20)}-${hex.slice(20)}`;
}

/** Split "alice, bob carol" into ["alice", "bob", "carol"] (lower-cased, unique). */
export function parseUsernames(text) {
  const names = text
    .split(/[\s,;]+/)
    .map((s) => s.trim().replace(/^@/, "").toLowerCase())
    .filter(Boolean);
  return [...new Set(names)];
}
