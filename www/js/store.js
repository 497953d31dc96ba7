// Client-side state: conversations, their messages and per-message states,
// users (names, presence), groups and contacts. No I/O here: main.js feeds it
// frames and REST answers and renders from it.

/** "dm:<a>:<b>" with the two user ids sorted, as the contract defines it. */
export function dmId(a, b) {
  return a < b ? `dm:${a}:${b}` : `dm:${b}:${a}`;
}

export function groupConvId(groupId) {
  return `group:${groupId}`;
}

/** {kind: "dm", ids: [a, b]} or {kind: "group", ids: [g]}; null if malformed. */
export function parseConversation(id) {
  const i = id.indexOf(":");
  if (i < 0) return null;
  const kind = id.slice(0, i);
  const rest = id.slice(i + 1);
  if (kind === "dm") {
    const j = rest.indexOf(":");
    if (j < 0) return null;
    return { kind, ids: [rest.slice(0, j), rest.slice(j + 1)] };
  }
  if (kind === "group" && rest) return { kind, ids: [rest] };
  return null;
}

/**
 * One conversation as this device knows it.
 * `messages` holds stored messages by seq (a (conversation, seq) seen twice is
 * dropped); `pending` holds this device's messages not yet acked, by client id.
 */
export class Conversation {
  constructor(id, me) {
    this.id = id;
    const parsed = parseConversation(id) || { kind: "dm", ids: [] };
    this.kind = parsed.kind;
    this.groupId = parsed.kind === "group" ? parsed.ids[0] : null;
    this.peer = parsed.kind === "dm" ? parsed.ids.find((u) => u !== me) || me : null;
    this.me = me;
    this.messages = new Map();
    this.pending = new Map();
    this.events = []; // group events shown as system lines: {ts, text}
    this.lastMessage = null;
    this.unread = 0;
    this.readSeq = 0; // this user's read offset
    this.peerDelivered = 0; // highest delivered offset of another participant
    this.peerRead = 0; // highest read offset of another participant
    this.lastReadSent = 0;
    this.lastDeliveredSent = 0;
    this.deliveredWanted = 0;
    this.historyLoaded = false;
    this.nextBeforeSeq = null;
    this.loadingHistory = false;
    this.typing = new Map(); // user_id -> expiry timer
    this.left = false; // removed from the group, or the group was deleted
    this.name = null; // a group's last known name (kept after leaving it)
    this.opened = false;
  }

  get maxSeq() {
    let max = this.lastMessage ? this.lastMessage.seq || 0 : 0;
    for (const seq of this.messages.keys()) if (seq > max) max = seq;
    return max;
  }

  /** The highest seq of a message from someone else (what a read receipt covers). */
  get maxOtherSeq() {
    let max = 0;
    for (const m of this.messages.values()) if (!m.mine && m.seq > max) max = m.seq;
    if (this.lastMessage && this.lastMessage.from !== this.me && this.lastMessage.seq > max) max = this.lastMessage.seq;
    return max;
  }

  get lastTs() {
    return this.lastMessage ? this.lastMessage.ts || 0 : 0;
  }

  /**
   * Add a stored message (frame or history item). Returns false if this
   * (conversation, seq) is already here: the caller drops it.
   */
  addStored(msg) {
    if (this.messages.has(msg.seq)) return false;
    const mine = msg.from === this.me;
    const entry = {
      seq: msg.seq,
      id: msg.id,
      message_id: msg.message_id,
      from: msg.from,
      from_device: msg.from_device,
      body: msg.body,
      ts: msg.ts,
      mine,
      error: null,
    };
    // The same message may still sit in pending if its echo overtook the ack.
    if (mine && msg.id && this.pending.has(msg.id)) this.pending.delete(msg.id);
    this.messages.set(msg.seq, entry);
    if (!this.lastMessage || msg.seq >= (this.lastMessage.seq || 0)) this.lastMessage = { ...msg };
    return true;
  }

  /** A message this device is sending: shown at once as "sending". */
  addPending(clientId, body, ts) {
    const entry = { seq: null, id: clientId, body, ts, mine: true, from: this.me, error: null, sentAt: ts };
    this.pending.set(clientId, entry);
    return entry;
  }

  /** An ack for one of ours: the message is stored with this seq. */
  ack(frame) {
    const entry = this.pending.get(frame.id);
    if (!entry) return false;
    this.pending.delete(frame.id);
    if (!this.messages.has(frame.seq)) {
      this.messages.set(frame.seq, {
        ...entry,
        seq: frame.seq,
        message_id: frame.message_id,
        ts: frame.ts || entry.ts,
        error: null,
      });
    }
    if (!this.lastMessage || frame.seq >= (this.lastMessage.seq || 0)) {
      this.lastMessage = { seq: frame.seq, from: this.me, body: entry.body, ts: frame.ts || entry.ts, id: frame.id };
    }
    return true;
  }

  fail(clientId, error) {
    const entry = this.pending.get(clientId);
    if (!entry) return false;
    entry.error = error;
    return true;
  }

  /** A receipt frame: another participant's offsets, or ours from another device. */
  receipt(frame) {
    if (frame.user_id === this.me) {
      if (frame.status === "read" && frame.up_to_seq > this.readSeq) {
        this.readSeq = frame.up_to_seq;
        this.recountUnread();
      }
      return;
    }
    if (frame.up_to_seq > this.peerDelivered) this.peerDelivered = frame.up_to_seq;
    if (frame.status === "read" && frame.up_to_seq > this.peerRead) this.peerRead = frame.up_to_seq;
  }

  recountUnread() {
    if (this.readSeq >= this.maxSeq) {
      this.unread = 0;
      return;
    }
    let n = 0;
    for (const m of this.messages.values()) if (!m.mine && m.seq > this.readSeq) n += 1;
    // Only messages we hold can be counted; never claim fewer than the server said.
    this.unread = Math.max(n, Math.min(this.unread, this.maxSeq - this.readSeq));
  }

  /** sending -> acked -> delivered -> read (or failed) for one of our messages. */
  stateOf(entry) {
    if (!entry.mine) return "received";
    if (entry.error) return "failed";
    if (entry.seq === null || entry.seq === undefined) return "sending";
    if (entry.seq <= this.peerRead) return "read";
    if (entry.seq <= this.peerDelivered) return "delivered";
    return "acked";
  }

  /** Messages in seq order, then pending ones, with group events placed by time. */
  timeline() {
    const stored = [...this.messages.values()].sort((a, b) => a.seq - b.seq);
    const pending = [...this.pending.values()].sort((a, b) => a.sentAt - b.sentAt);
    const events = [...this.events].sort((a, b) => a.ts - b.ts);
    const out = [];
    let e = 0;
    for (const m of stored) {
      while (e < events.length && events[e].ts < m.ts) out.push({ event: events[e++] });
      out.push({ message: m });
    }
    while (e < events.length) out.push({ event: events[e++] });
    for (const m of pending) out.push({ message: m });
    return out;
  }

  typingUsers() {
    return [...this.typing.keys()];
  }
}

/** Everything the page knows; one instance per logged-in session. */
export class Store {
  constructor(me, deviceId) {
    this.me = me;
    this.deviceId = deviceId;
    this.convs = new Map();
    this.users = new Map(); // user_id -> {user_id, username, name, online, last_seen}
    this.groups = new Map(); // group_id -> group object
    this.contacts = []; // user ids, in the order they were added
    this.publicGroups = [];
    this.devices = [];
    this.duplicatesDropped = 0;
  }

  conv(id) {
    let c = this.convs.get(id);
    if (!c) {
      c = new Conversation(id, this.me);
      this.convs.set(id, c);
    }
    return c;
  }

  /** Remember a user's name and presence; returns the merged record. */
  putUser(u) {
    const prev = this.users.get(u.user_id) || { user_id: u.user_id };
    const next = { ...prev };
    for (const [k, v] of Object.entries(u)) if (v !== undefined) next[k] = v;
    this.users.set(u.user_id, next);
    return next;
  }

  addContact(userId) {
    if (userId !== this.me && !this.contacts.includes(userId)) this.contacts.push(userId);
  }

  displayName(userId) {
    if (userId === this.me) return "You";
    const u = this.users.get(userId);
    if (u && (u.name || u.username)) return u.name || u.username;
    return `user ${String(userId).slice(0, 8)}`;
  }

  title(conv) {
    if (conv.kind === "group") {
      const g = this.groups.get(conv.groupId);
      if (g) return g.name;
      return conv.name || `group ${String(conv.groupId).slice(0, 8)}`;
    }
    return this.displayName(conv.peer);
  }

  putGroup(group) {
    this.groups.set(group.group_id, group);
    const c = this.conv(groupConvId(group.group_id));
    c.left = false;
    c.name = group.name;
    return c;
  }

  /** Conversations for the left column, most recent first (groups without messages last). */
  conversationList() {
    return [...this.convs.values()]
      .filter((c) => c.lastMessage || c.kind === "group" || c.messages.size || c.pending.size || c.opened)
      .sort((a, b) => b.lastTs - a.lastTs || this.title(a).localeCompare(this.title(b)));
  }
}
