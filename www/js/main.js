// The testers' web client: wires the REST client, the WebSocket, the store and
// the views together. It speaks only the public contract (api-contract.md).

import { Api, ApiError } from "./api.js";
import { ProtocolConsole } from "./console.js";
import { $, formatPresence, formatTime, h, parseUsernames, uuid } from "./dom.js";
import { ChatSocket } from "./socket.js";
import { dmId, groupConvId, Store } from "./store.js";

const TYPING_IDLE_MS = 3000; // send "stop" after this long without a keystroke
const TYPING_REPEAT_MS = 4000; // repeat "start" while the user keeps typing
const TYPING_SHOW_MS = 6000; // hide a peer's indicator if its "stop" never comes
const RESEND_AFTER_MS = 10_000; // resend an unacked message (same id: idempotent)
const PRESENCE_POLL_MS = 60_000; // contacts who share no conversation get no presence frames
const HISTORY_PAGE = 30;
const DIRECTORY_KEY = "chat.directory";

const STATE_LABELS = {
  sending: "○ sending",
  acked: "✓ sent",
  delivered: "✓✓ delivered",
  read: "✓✓ read",
  failed: "⚠ failed",
};

function wsUrl(token) {
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  return `${scheme}://${location.host}/v1/ws?token=${encodeURIComponent(token)}`;
}

function initials(text) {
  const parts = String(text || "?")
    .replace(/^user /, "")
    .split(/[\s._-]+/)
    .filter(Boolean);
  return (parts.length > 1 ? parts[0][0] + parts[1][0] : (parts[0] || "?").slice(0, 2)).toUpperCase();
}

function hue(text) {
  let n = 0;
  for (const ch of String(text)) n = (n * 31 + ch.charCodeAt(0)) % 360;
  return n;
}

function avatar(text, key, big = false) {
  return h(
    "div",
    { class: `avatar${big ? " big" : ""}`, style: `background: hsl(${hue(key || text)} 55% 45%)` },
    initials(text),
  );
}

class App {
  constructor() {
    this.api = new Api({ onExpired: () => this.onExpired() });
    this.store = null;
    this.socket = null;
    this.current = null; // open conversation id
    this.tab = "chats";
    this.authMode = "login";
    this.timers = [];
    this.receiptTimer = null;
    this.typingIdle = null;
    this.console = new ProtocolConsole(
      (raw) => this.sendRaw(raw),
      (name) => this.template(name),
    );
    this.bindStatic();
    if (this.api.loggedIn) this.enter();
    else this.showAuth();
  }

  get me() {
    return this.store ? this.store.me : null;
  }

  get conv() {
    return this.store && this.current ? this.store.conv(this.current) : null;
  }

  // ---------------------------------------------------------------------
  // Static wiring
  // ---------------------------------------------------------------------

  bindStatic() {
    $("#auth-tab-login").addEventListener("click", () => this.setAuthMode("login"));
    $("#auth-tab-signup").addEventListener("click", () => this.setAuthMode("signup"));
    $("#auth-form").addEventListener("submit", (ev) => {
      ev.preventDefault();
      this.submitAuth();
    });
    $("#btn-logout").addEventListener("click", () => this.logout());
    $("#btn-reconnect").addEventListener("click", () => this.socket && this.socket.reconnectNow());
    for (const btn of document.querySelectorAll(".tabs [data-tab]")) {
      btn.addEventListener("click", () => this.setTab(btn.dataset.tab));
    }
    $("#contacts-form").addEventListener("submit", (ev) => {
      ev.preventDefault();
      this.syncContacts($("#contacts-input").value);
    });
    $("#group-create-form").addEventListener("submit", (ev) => {
      ev.preventDefault();
      this.createGroup();
    });
    $("#btn-public-refresh").addEventListener("click", () => this.loadPublicGroups());
    $("#btn-devices-refresh").addEventListener("click", () => this.loadDevices());
    $("#composer").addEventListener("submit", (ev) => {
      ev.preventDefault();
      this.sendFromComposer();
    });
    const input = $("#composer-input");
    input.addEventListener("keydown", (ev) => {
      if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) {
        ev.preventDefault();
        this.sendFromComposer();
      }
    });
    input.addEventListener("input", () => this.onComposerInput());
    $("#message-scroller").addEventListener("scroll", () => {
      const c = this.conv;
      if (c && $("#message-scroller").scrollTop < 80) this.loadOlder(c);
    });
    $("#btn-load-older").addEventListener("click", () => this.conv && this.loadOlder(this.conv));
    $("#btn-group-info").addEventListener("click", () => {
      const panel = $("#group-panel");
      panel.hidden = !panel.hidden;
      this.renderGroupPanel();
    });
    document.addEventListener("visibilitychange", () => this.flushReceipts());
    window.addEventListener("focus", () => this.flushReceipts());
  }

  // ---------------------------------------------------------------------
  // Log in, sign up, log out
  // ---------------------------------------------------------------------

  showAuth() {
    $("#app-view").hidden = true;
    $("#auth-view").hidden = false;
    document.title = "Chat · log in";
    this.setAuthMode(this.authMode);
    $("#auth-username").focus();
  }

  setAuthMode(mode) {
    this.authMode = mode;
    $("#auth-form").dataset.mode = mode;
    $("#auth-tab-login").classList.toggle("active", mode === "login");
    $("#auth-tab-signup").classList.toggle("active", mode === "signup");
    $("#btn-auth-submit").textContent = mode === "login" ? "Log in" : "Sign up and log in";
    $("#auth-password").autocomplete = mode === "login" ? "current-password" : "new-password";
    $("#auth-error").textContent = "";
  }

  async submitAuth() {
    const username = $("#auth-username").value.trim().toLowerCase();
    const password = $("#auth-password").value;
    const name = $("#auth-name").value.trim();
    const deviceType = $("#auth-device-type").value;
    const deviceId = $("#auth-device-id").value.trim();
    const btn = $("#btn-auth-submit");
    $("#auth-error").textContent = "";
    btn.disabled = true;
    try {
      if (this.authMode === "signup") await this.api.signup(username, password, name || undefined);
      await this.api.login(username, password, deviceType, deviceId || undefined);
      $("#auth-password").value = "";
      await this.enter();
    } catch (err) {
      $("#auth-error").textContent = err instanceof ApiError ? `${err.message} (${err.code})` : String(err);
    } finally {
      btn.disabled = false;
    }
  }

  async logout() {
    // Stop the socket first so its close does not look like a drop to reconnect from.
    this.stopSession();
    try {
      await this.api.logout();
    } catch (err) {
      console.warn("logout failed", err);
    }
    this.showAuth();
  }

  onExpired() {
    if (!this.store) return; // already logged out on purpose
    this.toast("Your session ended (logged out, device removed or token refused). Log in again.", "error");
    this.stopSession();
    this.showAuth();
  }

  stopSession() {
    if (this.socket) this.socket.stop();
    this.socket = null;
    for (const t of this.timers) clearInterval(t);
    this.timers = [];
    clearTimeout(this.receiptTimer);
    this.receiptTimer = null;
    this.store = null;
    this.current = null;
    this.console.clear();
  }

  // ---------------------------------------------------------------------
  // Session start
  // ---------------------------------------------------------------------

  async enter() {
    const s = this.api.session;
    this.store = new Store(s.user_id, s.device_id);
    this.loadDirectory();
    this.current = null;
    $("#auth-view").hidden = true;
    $("#app-view").hidden = false;
    $("#me-username").textContent = s.username ? `@${s.username}` : "";
    $("#me-name").textContent = s.username || "";
    $("#me-device").textContent = String(s.device_id || "").slice(0, 8);
    $("#me-device").title = s.device_id || "";
    $("#me-device-type").textContent = s.device_type ? `(${s.device_type})` : "";
    document.title = `Chat · ${s.username || "me"}`;
    this.setTab("chats");
    this.renderAll();

    this.socket = new ChatSocket({
      url: async () => {
        await this.api.ensureFresh();
        if (!this.api.session) throw new Error("logged out");
        return wsUrl(this.api.session.access_token);
      },
      probe: () => this.api.me(),
      onFrame: (frame, raw) => this.onFrame(frame, raw),
      onSent: (frame, raw) => this.console.frame("out", frame, raw),
      onState: (state, info) => this.onSocketState(state, info),
      onOpen: () => this.onSocketOpen(),
      onClose: (ev) => this.console.event("closed", `closed (code ${ev.code}${ev.reason ? `: ${ev.reason}` : ""})`),
    });
    this.socket.start();
    this.timers.push(setInterval(() => this.resendStale(), RESEND_AFTER_MS / 2));
    this.timers.push(setInterval(() => this.refreshPresence(), PRESENCE_POLL_MS));

    const store = this.store;
    await Promise.allSettled([this.loadMe(), this.loadConversations(), this.loadGroups(), this.loadContacts()]);
    if (this.store === store) this.renderAll();
  }

  async loadMe() {
    const me = await this.api.me();
    if (!this.store) return;
    this.store.putUser(me);
    $("#me-name").textContent = me.name || me.username;
    $("#me-username").textContent = `@${me.username}`;
  }

  async loadConversations() {
    let data;
    try {
      data = await this.api.conversations();
    } catch (err) {
      this.toastError("Could not load conversations", err);
      return;
    }
    if (!this.store) return;
    for (const item of data.conversations || []) {
      const c = this.store.conv(item.conversation);
      c.unread = item.unread || 0;
      c.readSeq = Math.max(c.readSeq, item.read_seq || 0);
      const last = item.last_message;
      if (last && (!c.lastMessage || (last.seq || 0) >= (c.lastMessage.seq || 0))) c.lastMessage = last;
      if (c.kind === "group" && !this.store.groups.has(c.groupId)) this.refreshGroup(c.groupId);
    }
    this.flushReceipts();
    this.renderConversationList();
  }

  async loadGroups() {
    let data;
    try {
      data = await this.api.groups();
    } catch (err) {
      this.toastError("Could not load groups", err);
      return;
    }
    if (!this.store) return;
    const seen = new Set();
    for (const g of data.groups || []) {
      seen.add(g.group_id);
      this.store.putGroup(g);
    }
    for (const id of [...this.store.groups.keys()]) {
      if (!seen.has(id)) this.forgetGroup(id);
    }
    this.renderConversationList();
    this.renderGroups();
    this.renderConversation();
  }

  async refreshGroup(groupId) {
    try {
      const g = await this.api.group(groupId);
      if (!this.store) return;
      if (g.members && g.members.some((m) => m.user_id === this.me)) this.store.putGroup(g);
      else this.store.conv(groupConvId(groupId)).name = g.name;
    } catch (err) {
      if (err.status === 403 || err.status === 404) {
        if (this.store) this.forgetGroup(groupId);
      } else {
        console.warn("group fetch failed", err);
      }
    }
    this.renderConversationList();
    this.renderGroups();
    if (this.current === groupConvId(groupId)) this.renderConversation();
  }

  forgetGroup(groupId) {
    const g = this.store.groups.get(groupId);
    const c = this.store.conv(groupConvId(groupId));
    if (g) c.name = g.name;
    c.left = true;
    this.store.groups.delete(groupId);
  }

  // ---------------------------------------------------------------------
  // Names directory (user_id -> username, name), kept per browser
  // ---------------------------------------------------------------------

  loadDirectory() {
    try {
      const dir = JSON.parse(localStorage.getItem(DIRECTORY_KEY) || "{}");
      for (const [user_id, u] of Object.entries(dir)) this.store.putUser({ user_id, ...u });
    } catch {
      localStorage.removeItem(DIRECTORY_KEY);
    }
  }

  rememberUser(u) {
    this.store.putUser(u);
    try {
      const dir = JSON.parse(localStorage.getItem(DIRECTORY_KEY) || "{}");
      dir[u.user_id] = { username: u.username, name: u.name };
      localStorage.setItem(DIRECTORY_KEY, JSON.stringify(dir));
    } catch {
      // A full or disabled localStorage only costs names after a reload.
    }
  }

  // ---------------------------------------------------------------------
  // Contacts and presence
  // ---------------------------------------------------------------------

  contactsKey() {
    return `chat.contacts.${this.me}`;
  }

  async loadContacts() {
    let names = [];
    try {
      names = JSON.parse(localStorage.getItem(this.contactsKey()) || "[]");
    } catch {
      names = [];
    }
    if (names.length) await this.syncContacts(names.join(","), { quiet: true });
  }

  async syncContacts(text, { quiet = false } = {}) {
    const usernames = parseUsernames(text);
    if (!usernames.length) return [];
    let data;
    try {
      data = await this.api.syncContacts(usernames);
    } catch (err) {
      this.toastError("Contact sync failed", err);
      return [];
    }
    if (!this.store) return [];
    const found = data.contacts || [];
    for (const u of found) {
      this.rememberUser(u);
      this.store.addContact(u.user_id);
    }
    const foundNames = new Set(found.map((u) => u.username));
    const missing = usernames.filter((n) => !foundNames.has(n));
    if (missing.length && !quiet) this.toast(`No such user: ${missing.join(", ")}`, "error");
    if (!quiet) $("#contacts-input").value = "";
    this.saveContacts();
    this.renderContacts();
    this.renderConversationList();
    await this.refreshPresence(found.map((u) => u.user_id));
    return found;
  }

  saveContacts() {
    const names = this.store.contacts.map((id) => this.store.users.get(id)?.username).filter(Boolean);
    localStorage.setItem(this.contactsKey(), JSON.stringify(names));
  }

  removeContact(userId) {
    this.store.contacts = this.store.contacts.filter((id) => id !== userId);
    this.saveContacts();
    this.renderContacts();
  }

  /** GET /v1/users/{username} for contacts (all, or these ids): online and last seen. */
  async refreshPresence(ids) {
    if (!this.store) return;
    const store = this.store;
    const targets = (ids || store.contacts).slice(0, 100);
    await Promise.allSettled(
      targets.map(async (id) => {
        const u = store.users.get(id);
        if (!u || !u.username) return;
        const info = await this.api.user(u.username);
        store.putUser(info);
      }),
    );
    if (this.store !== store) return;
    this.renderContacts();
    this.renderConversationHeader();
  }

  // ---------------------------------------------------------------------
  // WebSocket
  // ---------------------------------------------------------------------

  onSocketState(state, info) {
    const el = $("#conn-state");
    el.dataset.state = state;
    let label = state;
    if (state === "reconnecting" || state === "connecting") {
      label = info.delay ? `${state} (retry in ${(info.delay / 1000).toFixed(1)} s)` : `${state}…`;
    }
    $("#conn-label").textContent = label;
    this.console.event(state, label);
    $("#composer").classList.toggle("offline", state !== "online");
  }

  onSocketOpen() {
    if (!this.store) return;
    // The server replays what this device missed. Re-acknowledge from scratch so a
    // delivered receipt lost with the old socket is sent again for the replay.
    for (const c of this.store.convs.values()) {
      c.lastDeliveredSent = 0;
      c.lastReadSent = 0;
      for (const entry of c.pending.values()) if (!entry.error) this.transmit(c, entry);
    }
    this.loadConversations();
    this.flushReceipts();
  }

  sendRaw(raw) {
    if (!this.socket) return false;
    let frame = raw;
    try {
      frame = JSON.parse(raw);
    } catch {
      // Sent as typed: testers may want to see the server reject bad JSON.
    }
    if (!this.socket.isOpen) return false;
    this.socket.ws.send(raw);
    this.console.frame("out", frame, raw);
    if (frame && typeof frame === "object" && frame.type === "message" && frame.id) {
      // A message typed in the console still shows up once it is acked.
      const conv = frame.group ? groupConvId(frame.group) : frame.to ? dmId(this.me, frame.to) : null;
      if (conv && typeof frame.body === "string") {
        const c = this.store.conv(conv);
        if (!c.pending.has(frame.id)) c.addPending(frame.id, frame.body, Date.now()).lastSentAt = Date.now();
        this.renderConversationList();
        this.renderMessages();
      }
    }
    return true;
  }

  template(name) {
    const c = this.conv;
    const conversation = c ? c.id : "dm:<user_a>:<user_b>";
    switch (name) {
      case "message": {
        const f = { type: "message", id: uuid() };
        if (c && c.kind === "group") f.group = c.groupId;
        else f.to = c ? c.peer : "<user_id>";
        f.body = "hello from the console";
        return JSON.stringify(f, null, 2);
      }
      case "receipt":
        return JSON.stringify(
          { type: "receipt", conversation, status: "read", up_to_seq: c ? c.maxSeq : 1 },
          null,
          2,
        );
      case "typing":
        return JSON.stringify({ type: "typing", conversation, state: "start" }, null, 2);
      case "bad":
        return '{"type": "message", "id": "x"}';
      default:
        return '{"type": "ping"}';
    }
  }

  onFrame(frame, raw) {
    this.console.frame("in", frame, raw);
    if (!this.store) return;
    switch (frame.type) {
      case "message":
        this.onMessage(frame);
        break;
      case "ack":
        this.onAck(frame);
        break;
      case "receipt":
        this.onReceipt(frame);
        break;
      case "typing":
        this.onTyping(frame);
        break;
      case "presence":
        this.onPresence(frame);
        break;
      case "group_event":
        this.onGroupEvent(frame);
        break;
      case "error":
        this.onErrorFrame(frame);
        break;
      default:
        break;
    }
  }

  onMessage(f) {
    if (!f.conversation || typeof f.seq !== "number") return;
    const c = this.store.conv(f.conversation);
    if (f.group && !this.store.groups.has(f.group) && !c.left) this.refreshGroup(f.group);
    if (!c.addStored(f)) {
      // Already have this (conversation, seq): drop it, but still acknowledge it.
      this.store.duplicatesDropped += 1;
      $("#dup-count").textContent = String(this.store.duplicatesDropped);
      this.scheduleDelivered(c, f.seq);
      return;
    }
    this.scheduleDelivered(c, f.seq);
    if (f.from !== this.me) {
      this.clearTyping(c, f.from);
      if (this.isVisible(c)) this.scheduleReceipts();
      else if (f.seq > c.readSeq) c.unread += 1;
    }
    this.renderConversationList();
    if (c.id === this.current) this.renderMessages();
  }

  onAck(f) {
    const c = this.store.conv(f.conversation);
    if (!c.ack(f)) return;
    this.renderConversationList();
    if (c.id === this.current) this.renderMessages();
  }

  onReceipt(f) {
    if (!f.conversation) return;
    const c = this.store.conv(f.conversation);
    c.receipt(f);
    if (f.user_id === this.me && f.status === "read" && f.up_to_seq > c.lastReadSent) c.lastReadSent = f.up_to_seq;
    this.renderConversationList();
    if (c.id === this.current) this.renderMessages();
  }

  onTyping(f) {
    if (!f.conversation || f.user_id === this.me) return;
    const c = this.store.conv(f.conversation);
    clearTimeout(c.typing.get(f.user_id));
    if (f.state === "start") {
      c.typing.set(
        f.user_id,
        setTimeout(() => this.clearTyping(c, f.user_id), TYPING_SHOW_MS),
      );
    } else {
      c.typing.delete(f.user_id);
    }
    this.renderTyping();
    this.renderConversationList();
  }

  clearTyping(c, userId) {
    if (!c.typing.has(userId)) return;
    clearTimeout(c.typing.get(userId));
    c.typing.delete(userId);
    this.renderTyping();
    this.renderConversationList();
  }

  onPresence(f) {
    this.store.putUser({ user_id: f.user_id, online: Boolean(f.online), last_seen: f.last_seen });
    this.renderContacts();
    this.renderConversationHeader();
  }

  onGroupEvent(f) {
    const store = this.store;
    const c = store.conv(groupConvId(f.group_id));
    const users = f.users || [];
    const lostIt = f.event === "deleted" || (f.event === "member_removed" && users.includes(this.me));
    if (lostIt) {
      if (f.group) c.name = f.group.name;
      this.forgetGroup(f.group_id);
    } else if (f.group) {
      store.putGroup(f.group);
      c.name = f.group.name;
    } else {
      this.refreshGroup(f.group_id);
    }
    c.events.push({ ts: f.ts || Date.now(), text: this.describeGroupEvent(f), event: f.event });
    this.renderConversationList();
    this.renderGroups();
    if (c.id === this.current) this.renderConversation();
  }

  describeGroupEvent(f) {
    const name = (id) => this.store.displayName(id);
    const actor = f.actor ? name(f.actor) : "Someone";
    const users = (f.users || []).map(name).join(", ") || "someone";
    const self = f.actor && f.users && f.users.length === 1 && f.users[0] === f.actor;
    switch (f.event) {
      case "created":
        return `${actor} created the group${f.group ? ` “${f.group.name}”` : ""}`;
      case "updated":
        return `${actor} updated the group${f.group ? `: now “${f.group.name}”` : ""}`;
      case "member_added":
        return self ? `${users} joined` : `${actor} added ${users}`;
      case "member_removed":
        return self ? `${users} left` : `${actor} removed ${users}`;
      case "role_changed":
        return `${actor} changed the role of ${users}`;
      case "deleted":
        return `${actor} deleted the group`;
      default:
        return `group event: ${f.event}`;
    }
  }

  onErrorFrame(f) {
    let shown = false;
    if (f.ref) {
      for (const c of this.store.convs.values()) {
        if (c.fail(f.ref, `${f.code}: ${f.message}`)) {
          shown = true;
          if (c.id === this.current) this.renderMessages();
        }
      }
    }
    this.toast(`${f.code}: ${f.message}${shown ? "" : f.ref ? ` (ref ${f.ref})` : ""}`, "error");
  }

  // ---------------------------------------------------------------------
  // Sending messages, receipts, typing
  // ---------------------------------------------------------------------

  sendFromComposer() {
    const c = this.conv;
    const input = $("#composer-input");
    const body = input.value;
    if (!c || !body.trim() || c.left) return;
    const entry = c.addPending(uuid(), body, Date.now());
    input.value = "";
    this.autosize();
    this.stopTyping();
    this.transmit(c, entry);
    this.renderConversationList();
    this.renderMessages({ toBottom: true });
  }

  transmit(c, entry) {
    const frame = { type: "message", id: entry.id };
    if (c.kind === "group") frame.group = c.groupId;
    else frame.to = c.peer;
    frame.body = entry.body;
    entry.lastSentAt = Date.now();
    // Offline: stays "sending" and goes out when the socket opens again.
    if (this.socket) this.socket.send(frame);
  }

  retry(c, entry) {
    entry.error = null;
    this.transmit(c, entry);
    this.renderMessages();
  }

  resendStale() {
    if (!this.store || !this.socket || !this.socket.isOpen) return;
    const now = Date.now();
    for (const c of this.store.convs.values()) {
      for (const entry of c.pending.values()) {
        if (!entry.error && now - (entry.lastSentAt || 0) > RESEND_AFTER_MS) this.transmit(c, entry);
      }
    }
  }

  isVisible(c) {
    return c.id === this.current && document.visibilityState === "visible";
  }

  scheduleDelivered(c, seq) {
    if (seq > c.deliveredWanted) c.deliveredWanted = seq;
    this.scheduleReceipts();
  }

  scheduleReceipts() {
    // Coalesce: a replay of many messages gets one cumulative receipt per conversation.
    if (!this.receiptTimer) this.receiptTimer = setTimeout(() => this.flushReceipts(), 30);
  }

  flushReceipts() {
    clearTimeout(this.receiptTimer);
    this.receiptTimer = null;
    if (!this.store || !this.socket) return;
    for (const c of this.store.convs.values()) {
      if (this.isVisible(c)) {
        const upTo = c.maxOtherSeq;
        if (upTo > c.lastReadSent && upTo > c.readSeq) {
          if (this.sendReceipt(c, "read", upTo)) {
            c.lastReadSent = upTo;
            c.readSeq = upTo;
            if (upTo > c.lastDeliveredSent) c.lastDeliveredSent = upTo;
          }
        }
        if (c.unread) {
          c.unread = 0;
          this.renderConversationList();
        }
      }
      const want = c.deliveredWanted;
      if (want > c.lastDeliveredSent && want > c.lastReadSent) {
        if (this.sendReceipt(c, "delivered", want)) c.lastDeliveredSent = want;
      }
    }
  }

  sendReceipt(c, status, upTo) {
    return this.socket.send({ type: "receipt", conversation: c.id, status, up_to_seq: upTo });
  }

  onComposerInput() {
    this.autosize();
    const c = this.conv;
    if (!c || !this.socket) return;
    if (!$("#composer-input").value) {
      this.stopTyping();
      return;
    }
    const now = Date.now();
    if (!c.typingSentAt || now - c.typingSentAt > TYPING_REPEAT_MS) {
      if (this.socket.send({ type: "typing", conversation: c.id, state: "start" })) c.typingSentAt = now;
    }
    clearTimeout(this.typingIdle);
    this.typingIdle = setTimeout(() => this.stopTyping(), TYPING_IDLE_MS);
  }

  stopTyping() {
    clearTimeout(this.typingIdle);
    const c = this.conv;
    if (!c || !c.typingSentAt) return;
    c.typingSentAt = 0;
    if (this.socket) this.socket.send({ type: "typing", conversation: c.id, state: "stop" });
  }

  autosize() {
    const input = $("#composer-input");
    input.style.height = "auto";
    input.style.height = `${Math.min(input.scrollHeight, 160)}px`;
  }

  // ---------------------------------------------------------------------
  // Conversations and history
  // ---------------------------------------------------------------------

  async openConversation(id) {
    if (!this.store) return;
    if (this.current && this.current !== id) this.stopTyping();
    this.current = id;
    const c = this.store.conv(id);
    c.opened = true;
    $("#group-panel").hidden = true;
    $("#composer-input").value = "";
    this.renderConversationList();
    this.renderConversation({ toBottom: true });
    $("#composer-input").focus();
    if (!c.historyLoaded) await this.loadOlder(c);
    this.flushReceipts();
  }

  openDm(userId) {
    this.setTab("chats");
    this.openConversation(dmId(this.me, userId));
  }

  /** Load the next older page (the newest page first time). */
  async loadOlder(c) {
    if (c.loadingHistory || (c.historyLoaded && c.nextBeforeSeq === null)) return;
    c.loadingHistory = true;
    const scroller = $("#message-scroller");
    const first = !c.historyLoaded;
    const fromBottom = scroller.scrollHeight - scroller.scrollTop;
    const store = this.store;
    try {
      const data = await this.api.history(c.id, first ? null : c.nextBeforeSeq, HISTORY_PAGE);
      for (const m of data.messages || []) c.addStored(m);
      c.nextBeforeSeq = data.next_before_seq ?? null;
      c.historyLoaded = true;
    } catch (err) {
      if (err.status === 404 || err.status === 403) {
        // Nothing stored yet (or not ours to read): an empty history.
        c.historyLoaded = true;
        c.nextBeforeSeq = null;
        if (err.status === 403) this.toastError("Cannot read this conversation", err);
      } else {
        this.toastError("Could not load history", err);
      }
    } finally {
      c.loadingHistory = false;
    }
    if (this.store !== store || c.id !== this.current) return;
    if (first) this.renderMessages({ toBottom: true });
    else this.renderMessages({ fromBottom });
    this.flushReceipts();
  }

  // ---------------------------------------------------------------------
  // Groups
  // ---------------------------------------------------------------------

  async resolveUsernames(text) {
    const names = parseUsernames(text);
    if (!names.length) return { ids: [], missing: [] };
    const data = await this.api.syncContacts(names);
    const found = data.contacts || [];
    for (const u of found) this.rememberUser(u);
    const have = new Set(found.map((u) => u.username));
    return { ids: found.map((u) => u.user_id), missing: names.filter((n) => !have.has(n)) };
  }

  async createGroup() {
    const name = $("#group-name").value.trim();
    if (!name) return;
    try {
      const { ids, missing } = await this.resolveUsernames($("#group-members").value);
      if (missing.length) {
        this.toast(`No such user: ${missing.join(", ")}`, "error");
        return;
      }
      const g = await this.api.createGroup(
        name,
        ids.filter((id) => id !== this.me),
        $("#group-public").checked,
      );
      if (!this.store) return;
      this.store.putGroup(g).name = g.name;
      $("#group-name").value = "";
      $("#group-members").value = "";
      $("#group-public").checked = false;
      this.renderGroups();
      this.setTab("chats");
      this.openConversation(groupConvId(g.group_id));
    } catch (err) {
      this.toastError("Could not create the group", err);
    }
  }

  async addGroupMembers(groupId, text) {
    try {
      const { ids, missing } = await this.resolveUsernames(text);
      if (missing.length) this.toast(`No such user: ${missing.join(", ")}`, "error");
      if (!ids.length) return;
      const g = await this.api.addMembers(groupId, ids);
      if (g && g.group_id) this.store.putGroup(g);
      else await this.refreshGroup(groupId);
      this.renderGroupPanel();
    } catch (err) {
      this.toastError("Could not add members", err);
    }
  }

  async removeGroupMember(groupId, userId) {
    try {
      await this.api.removeMember(groupId, userId);
      if (userId === this.me) {
        this.forgetGroup(groupId);
        this.renderAll();
      } else {
        await this.refreshGroup(groupId);
        this.renderGroupPanel();
      }
    } catch (err) {
      this.toastError(userId === this.me ? "Could not leave the group" : "Could not remove the member", err);
    }
  }

  async renameGroup(groupId, name) {
    if (!name.trim()) return;
    try {
      const g = await this.api.renameGroup(groupId, name.trim());
      if (g && g.group_id) this.store.putGroup(g).name = g.name;
      else await this.refreshGroup(groupId);
      this.renderAll();
    } catch (err) {
      this.toastError("Could not rename the group", err);
    }
  }

  async deleteGroup(groupId) {
    try {
      await this.api.deleteGroup(groupId);
      this.forgetGroup(groupId);
      this.renderAll();
    } catch (err) {
      this.toastError("Could not delete the group", err);
    }
  }

  async loadPublicGroups() {
    try {
      const data = await this.api.publicGroups();
      if (!this.store) return;
      this.store.publicGroups = data.groups || [];
      this.renderGroups();
    } catch (err) {
      this.toastError("Could not load public channels", err);
    }
  }

  async joinGroup(groupId) {
    try {
      const g = await this.api.joinGroup(groupId);
      if (g && g.group_id) this.store.putGroup(g).name = g.name;
      else await this.refreshGroup(groupId);
      this.renderGroups();
      this.setTab("chats");
      this.openConversation(groupConvId(groupId));
    } catch (err) {
      this.toastError("Could not join", err);
    }
  }

  // ---------------------------------------------------------------------
  // Devices
  // ---------------------------------------------------------------------

  async loadDevices() {
    try {
      const data = await this.api.devices();
      if (!this.store) return;
      this.store.devices = data.devices || [];
      this.renderDevices();
    } catch (err) {
      this.toastError("Could not load devices", err);
    }
  }

  async removeDevice(deviceId) {
    try {
      await this.api.removeDevice(deviceId);
      if (this.store && deviceId === this.store.deviceId) {
        this.stopSession();
        this.api.clear();
        this.toast("This device was removed.", "info");
        this.showAuth();
        return;
      }
      await this.loadDevices();
    } catch (err) {
      this.toastError("Could not remove the device", err);
    }
  }

  // ---------------------------------------------------------------------
  // Rendering
  // ---------------------------------------------------------------------

  setTab(tab) {
    this.tab = tab;
    for (const btn of document.querySelectorAll(".tabs [data-tab]")) {
      btn.classList.toggle("active", btn.dataset.tab === tab);
    }
    for (const name of ["chats", "contacts", "groups", "devices"]) {
      $(`#panel-${name}`).hidden = name !== tab;
    }
    if (!this.store) return;
    if (tab === "devices") this.loadDevices();
    if (tab === "groups") this.loadPublicGroups();
    if (tab === "contacts") this.refreshPresence();
  }

  renderAll() {
    this.renderConversationList();
    this.renderContacts();
    this.renderGroups();
    this.renderDevices();
    this.renderConversation();
  }

  renderConversationList() {
    if (!this.store) return;
    const list = $("#conversation-list");
    const items = this.store.conversationList().map((c) => {
      const title = this.store.title(c);
      const last = c.lastMessage;
      let preview = "";
      if (c.typing.size) preview = "typing…";
      else if (last) preview = `${last.from === this.me ? "You: " : ""}${last.body ?? ""}`;
      else if (c.kind === "group") preview = c.left ? "you left this group" : "no messages yet";
      return h(
        "li",
        {
          class: `item conv-item${c.id === this.current ? " active" : ""}${c.left ? " left" : ""}`,
          dataset: { testid: "conversation", conversation: c.id, kind: c.kind, unread: c.unread },
          onclick: () => this.openConversation(c.id),
        },
        avatar(title, c.kind === "group" ? c.groupId : c.peer),
        h(
          "div",
          { class: "item-main" },
          h(
            "div",
            { class: "item-top" },
            h(
              "span",
              { class: "item-title", dataset: { testid: "conversation-title" } },
              c.kind === "group" ? "# " : "",
              title,
            ),
            h("time", { class: "muted small" }, last ? formatTime(last.ts) : ""),
          ),
          h(
            "div",
            { class: "item-bottom" },
            h(
              "span",
              { class: `item-sub${c.typing.size ? " typing-text" : ""}`, dataset: { testid: "conversation-last" } },
              preview,
            ),
            c.unread ? h("span", { class: "badge", dataset: { testid: "unread" } }, String(c.unread)) : null,
          ),
        ),
      );
    });
    list.replaceChildren(...items);
    $("#conversations-empty").hidden = items.length > 0;
  }

  renderContacts() {
    if (!this.store) return;
    const items = this.store.contacts.map((id) => {
      const u = this.store.users.get(id) || { user_id: id };
      const title = u.name || u.username || id;
      return h(
        "li",
        {
          class: "item contact-item",
          dataset: { testid: "contact", username: u.username, userId: id, online: u.online ? "true" : "false" },
          onclick: () => this.openDm(id),
          title: "Open the conversation",
        },
        h(
          "div",
          { class: "avatar-wrap" },
          avatar(title, id),
          h("span", { class: `presence-dot${u.online ? " on" : ""}` }),
        ),
        h(
          "div",
          { class: "item-main" },
          h(
            "div",
            { class: "item-top" },
            h("span", { class: "item-title" }, title),
            h("span", { class: "muted small" }, `@${u.username || "?"}`),
          ),
          h(
            "div",
            { class: "item-bottom" },
            h("span", { class: `item-sub presence${u.online ? " on" : ""}`, dataset: { testid: "presence" } }, formatPresence(u)),
          ),
        ),
        h(
          "button",
          {
            type: "button",
            class: "icon-btn",
            title: "Remove from contacts (this browser only)",
            dataset: { testid: "contact-remove" },
            onclick: (ev) => {
              ev.stopPropagation();
              this.removeContact(id);
            },
          },
          "×",
        ),
      );
    });
    $("#contact-list").replaceChildren(...items);
    $("#contacts-empty").hidden = items.length > 0;
  }

  renderGroups() {
    if (!this.store) return;
    const mine = [...this.store.groups.values()].sort((a, b) => a.name.localeCompare(b.name));
    $("#group-list").replaceChildren(
      ...(mine.length
        ? mine.map((g) =>
            h(
              "li",
              {
                class: "item group-item",
                dataset: { testid: "group", groupId: g.group_id },
                onclick: () => {
                  this.setTab("chats");
                  this.openConversation(groupConvId(g.group_id));
                },
              },
              avatar(g.name, g.group_id),
              h(
                "div",
                { class: "item-main" },
                h("div", { class: "item-top" }, h("span", { class: "item-title" }, g.name)),
                h(
                  "div",
                  { class: "item-bottom" },
                  h(
                    "span",
                    { class: "item-sub" },
                    `${(g.members || []).length} members${g.public ? " · public" : ""} · ${this.myRole(g)}`,
                  ),
                ),
              ),
            ),
          )
        : [h("li", { class: "empty" }, "No groups yet.")]),
    );
    const pub = this.store.publicGroups;
    $("#public-group-list").replaceChildren(
      ...(pub.length
        ? pub.map((g) => {
            const member = this.store.groups.has(g.group_id);
            return h(
              "li",
              { class: "item", dataset: { testid: "public-group", groupId: g.group_id } },
              avatar(g.name, g.group_id),
              h(
                "div",
                { class: "item-main" },
                h("div", { class: "item-top" }, h("span", { class: "item-title" }, g.name)),
                h("div", { class: "item-bottom" }, h("span", { class: "item-sub" }, `${(g.members || []).length} members`)),
              ),
              h(
                "button",
                {
                  type: "button",
                  class: "small",
                  dataset: { testid: member ? "open-group" : "join-group" },
                  onclick: () =>
                    member ? this.openConversation(groupConvId(g.group_id)) : this.joinGroup(g.group_id),
                },
                member ? "Open" : "Join",
              ),
            );
          })
        : [h("li", { class: "empty" }, "No public channels (press Refresh).")]),
    );
  }

  myRole(g) {
    const m = (g.members || []).find((x) => x.user_id === this.me);
    return m ? m.role : "not a member";
  }

  renderDevices() {
    if (!this.store) return;
    const items = this.store.devices.map((d) => {
      const self = d.device_id === this.store.deviceId;
      return h(
        "li",
        { class: "item device-item", dataset: { testid: "device", deviceId: d.device_id, current: self ? "true" : "false" } },
        h("div", { class: `device-icon ${d.device_type}` }, d.device_type === "mobile" ? "M" : "W"),
        h(
          "div",
          { class: "item-main" },
          h(
            "div",
            { class: "item-top" },
            h("code", { class: "item-title", title: d.device_id }, String(d.device_id).slice(0, 12)),
            h(
              "span",
              { class: "tags" },
              self ? h("span", { class: "tag" }, "this device") : null,
              d.primary ? h("span", { class: "tag primary-tag" }, "primary") : null,
            ),
          ),
          h(
            "div",
            { class: "item-bottom" },
            h("span", { class: "item-sub" }, `${d.device_type} · ${formatPresence(d)}`),
          ),
        ),
        h(
          "button",
          {
            type: "button",
            class: "small danger",
            dataset: { testid: "device-remove" },
            onclick: () => this.removeDevice(d.device_id),
          },
          "Remove",
        ),
      );
    });
    $("#device-list").replaceChildren(...(items.length ? items : [h("li", { class: "empty" }, "Loading…")]));
  }

  renderConversation(opts = {}) {
    const c = this.conv;
    $("#conversation-view").dataset.conversation = c ? c.id : "";
    $("#conv-empty").hidden = Boolean(c);
    $("#conv-main").hidden = !c;
    if (!c) return;
    this.renderConversationHeader();
    this.renderMessages(opts);
    this.renderTyping();
    this.renderGroupPanel();
    const left = c.left;
    $("#composer-input").disabled = left;
    $("#btn-send").disabled = left;
    $("#composer-input").placeholder = left
      ? "You are not a member of this group any more"
      : "Write a message (Enter sends, Shift+Enter: new line)";
  }

  renderConversationHeader() {
    const c = this.conv;
    if (!c || !this.store) return;
    const title = this.store.title(c);
    $("#conv-title").textContent = c.kind === "group" ? `# ${title}` : title;
    $("#conv-id").textContent = c.id;
    $("#conv-avatar").replaceWith(
      Object.assign(avatar(title, c.kind === "group" ? c.groupId : c.peer, true), { id: "conv-avatar" }),
    );
    let sub = "";
    if (c.kind === "group") {
      const g = this.store.groups.get(c.groupId);
      sub = g
        ? `${(g.members || []).length} members${g.public ? " · public channel" : ""} · you are ${this.myRole(g)}`
        : c.left
          ? "you are no longer a member"
          : "";
    } else {
      const u = this.store.users.get(c.peer);
      sub = [u && u.username ? `@${u.username}` : null, formatPresence(u)].filter(Boolean).join(" · ");
    }
    $("#conv-subtitle").textContent = sub;
    $("#btn-group-info").hidden = c.kind !== "group" || !this.store.groups.has(c.groupId);
  }

  renderMessages(opts = {}) {
    const c = this.conv;
    if (!c || !this.store) return;
    const scroller = $("#message-scroller");
    const atBottom = scroller.scrollHeight - scroller.scrollTop - scroller.clientHeight < 40;
    const before = scroller.scrollTop;
    const nodes = c.timeline().map((item) => (item.event ? this.eventNode(item.event) : this.messageNode(c, item.message)));
    $("#message-list").replaceChildren(...nodes);
    $("#btn-load-older").hidden = !(c.historyLoaded && c.nextBeforeSeq !== null);
    $("#history-start").hidden = !(c.historyLoaded && c.nextBeforeSeq === null && nodes.length > 0);
    if (opts.fromBottom !== undefined) scroller.scrollTop = scroller.scrollHeight - opts.fromBottom;
    else if (opts.toBottom || atBottom) scroller.scrollTop = scroller.scrollHeight;
    else scroller.scrollTop = before;
  }

  messageNode(c, m) {
    const state = c.stateOf(m);
    const showFrom = c.kind === "group" && !m.mine;
    return h(
      "div",
      {
        class: `msg ${m.mine ? "mine" : "theirs"} state-${state}`,
        dataset: {
          testid: "message",
          seq: m.seq ?? "",
          id: m.id,
          state,
          mine: m.mine ? "true" : "false",
          from: m.from,
        },
      },
      h(
        "div",
        { class: "bubble" },
        showFrom ? h("div", { class: "msg-from", style: `color: hsl(${hue(m.from)} 55% 38%)` }, this.store.displayName(m.from)) : null,
        h("div", { class: "msg-body", dataset: { testid: "message-body" } }, m.body),
        h(
          "div",
          { class: "msg-meta" },
          m.seq ? h("span", { class: "msg-seq", title: "seq" }, `#${m.seq}`) : null,
          h("time", {}, formatTime(m.ts)),
          m.mine ? h("span", { class: "msg-state", dataset: { testid: "message-state" }, title: state }, STATE_LABELS[state]) : null,
        ),
        m.error
          ? h(
              "div",
              { class: "msg-error" },
              m.error,
              " ",
              h("button", { type: "button", class: "small", onclick: () => this.retry(c, m) }, "Retry"),
            )
          : null,
      ),
    );
  }

  eventNode(e) {
    return h("div", { class: "sys", dataset: { testid: "group-event", event: e.event } }, h("span", {}, e.text));
  }

  renderTyping() {
    const c = this.conv;
    const el = $("#typing-indicator");
    const who = c ? c.typingUsers() : [];
    el.dataset.typing = who.length ? "true" : "false";
    el.textContent = who.length
      ? `${who.map((id) => this.store.displayName(id)).join(", ")} ${who.length > 1 ? "are" : "is"} typing…`
      : "";
  }

  renderGroupPanel() {
    const panel = $("#group-panel");
    const c = this.conv;
    if (panel.hidden || !c || c.kind !== "group" || !this.store) return;
    const g = this.store.groups.get(c.groupId);
    if (!g) {
      panel.replaceChildren(h("p", { class: "muted" }, "You are not a member of this group."));
      return;
    }
    const role = this.myRole(g);
    const manager = role === "owner" || role === "admin";
    const order = { owner: 0, admin: 1, member: 2 };
    const members = [...(g.members || [])].sort((a, b) => order[a.role] - order[b.role]);
    const addInput = h("input", { id: "group-add-input", dataset: { testid: "group-add-input" }, placeholder: "usernames to add" });
    const renameInput = h("input", { id: "group-rename-input", dataset: { testid: "group-rename-input" }, value: g.name });
    panel.replaceChildren(
      h("h3", {}, "Members"),
      h(
        "ul",
        { class: "list members", dataset: { testid: "group-members-list" } },
        members.map((m) =>
          h(
            "li",
            { class: "item member-item", dataset: { testid: "group-member", userId: m.user_id, role: m.role } },
            avatar(this.store.displayName(m.user_id), m.user_id),
            h(
              "div",
              { class: "item-main" },
              h("span", { class: "item-title" }, this.store.displayName(m.user_id)),
              h("span", { class: "muted small" }, m.role),
            ),
            (manager && m.role !== "owner" && m.user_id !== this.me) || (m.user_id === this.me && role !== "owner")
              ? h(
                  "button",
                  {
                    type: "button",
                    class: "small danger",
                    dataset: { testid: m.user_id === this.me ? "group-leave-self" : "member-remove" },
                    onclick: () => this.removeGroupMember(g.group_id, m.user_id),
                  },
                  m.user_id === this.me ? "Leave" : "Remove",
                )
              : null,
          ),
        ),
      ),
      manager
        ? h(
            "form",
            {
              class: "inline-form",
              onsubmit: (ev) => {
                ev.preventDefault();
                this.addGroupMembers(g.group_id, addInput.value);
              },
            },
            addInput,
            h("button", { type: "submit", id: "btn-group-add", dataset: { testid: "group-add" } }, "Add"),
          )
        : null,
      manager
        ? h(
            "form",
            {
              class: "inline-form",
              onsubmit: (ev) => {
                ev.preventDefault();
                this.renameGroup(g.group_id, renameInput.value);
              },
            },
            renameInput,
            h("button", { type: "submit", dataset: { testid: "group-rename" } }, "Rename"),
          )
        : null,
      h(
        "div",
        { class: "panel-actions" },
        role !== "owner"
          ? h(
              "button",
              {
                type: "button",
                id: "btn-group-leave",
                class: "danger",
                dataset: { testid: "group-leave" },
                onclick: () => this.removeGroupMember(g.group_id, this.me),
              },
              "Leave group",
            )
          : h(
              "button",
              {
                type: "button",
                id: "btn-group-delete",
                class: "danger",
                dataset: { testid: "group-delete" },
                onclick: () => this.deleteGroup(g.group_id),
              },
              "Delete group",
            ),
      ),
    );
  }

  // ---------------------------------------------------------------------
  // Toasts
  // ---------------------------------------------------------------------

  toast(text, kind = "info") {
    const el = h("div", { class: `toast ${kind}`, dataset: { testid: "toast", kind }, role: "status" }, text);
    $("#toasts").append(el);
    setTimeout(() => el.remove(), 6000);
  }

  toastError(what, err) {
    const detail = err instanceof ApiError ? `${err.message} (${err.code})` : String(err && err.message ? err.message : err);
    this.toast(`${what}: ${detail}`, "error");
  }
}

window.chatApp = new App();
