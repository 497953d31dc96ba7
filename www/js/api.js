// REST client for the public contract: tokens kept in sessionStorage (so two
// windows can be two users), refreshed before they expire and once more on a
// 401, with the contract's error shape turned into ApiError.

const SESSION_KEY = "chat.session";
// Refresh this long before the access token expires (capped at a fifth of its lifetime).
const REFRESH_LEAD_MS = 60_000;
const RETRY_REFRESH_MS = 5_000;

export class ApiError extends Error {
  constructor(status, code, message, details = {}) {
    super(message);
    this.status = status;
    this.code = code;
    this.details = details;
  }
}

export function loadSession() {
  try {
    return JSON.parse(sessionStorage.getItem(SESSION_KEY) || "null");
  } catch {
    return null;
  }
}

/** Keep ":" readable in conversation ids; everything else is percent-encoded. */
export function pathPart(value) {
  return encodeURIComponent(value).replace(/%3A/gi, ":");
}

export class Api {
  /**
   * @param {object} hooks onSession(session) after login/refresh; onExpired() when
   *   the refresh token is refused (the user must log in again).
   */
  constructor(hooks = {}) {
    this.hooks = hooks;
    this.session = loadSession();
    this.refreshing = null;
    this.timer = null;
    if (this.session) this.scheduleRefresh();
  }

  get loggedIn() {
    return Boolean(this.session && this.session.access_token);
  }

  // -- low level ---------------------------------------------------------

  async request(method, path, body, { auth = true, retry = true } = {}) {
    if (auth) await this.ensureFresh();
    const headers = { Accept: "application/json" };
    if (body !== undefined) headers["Content-Type"] = "application/json";
    if (auth && this.session) headers.Authorization = `Bearer ${this.session.access_token}`;
    let resp;
    try {
      resp = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
    } catch (err) {
      throw new ApiError(0, "network_error", `network error: ${err.message}`);
    }
    if (resp.status === 401 && auth && retry && this.session) {
      if (await this.refresh()) return this.request(method, path, body, { auth, retry: false });
    }
    const text = await resp.text();
    let data = null;
    if (text) {
      try {
        data = JSON.parse(text);
      } catch {
        data = { raw: text };
      }
    }
    if (!resp.ok) {
      const err = (data && data.error) || {};
      throw new ApiError(resp.status, err.code || `http_${resp.status}`, err.message || resp.statusText, err.details);
    }
    return data;
  }

  get(path) {
    return this.request("GET", path);
  }
  post(path, body = {}) {
    return this.request("POST", path, body);
  }
  patch(path, body = {}) {
    return this.request("PATCH", path, body);
  }
  del(path) {
    return this.request("DELETE", path);
  }

  // -- tokens ------------------------------------------------------------

  setTokens(data, extra = {}) {
    this.session = {
      ...(this.session || {}),
      ...extra,
      access_token: data.access_token,
      refresh_token: data.refresh_token,
      expires_at: Date.now() + (data.expires_in || 900) * 1000,
      expires_in: data.expires_in || 900,
      user_id: data.user_id,
      device_id: data.device_id,
    };
    sessionStorage.setItem(SESSION_KEY, JSON.stringify(this.session));
    this.scheduleRefresh();
    if (this.hooks.onSession) this.hooks.onSession(this.session);
  }

  scheduleRefresh(delay) {
    clearTimeout(this.timer);
    if (!this.session) return;
    if (delay === undefined) {
      const lead = Math.min(REFRESH_LEAD_MS, this.session.expires_in * 200);
      delay = Math.max(1000, this.session.expires_at - Date.now() - lead);
    }
    this.timer = setTimeout(() => this.refresh(), delay);
  }

  async ensureFresh() {
    if (this.session && Date.now() > this.session.expires_at - 5000) await this.refresh();
  }

  /** Rotate the tokens; true on success. Concurrent callers share one request. */
  refresh() {
    if (!this.session) return Promise.resolve(false);
    if (this.refreshing) return this.refreshing;
    this.refreshing = (async () => {
      try {
        const data = await this.request(
          "POST",
          "/v1/auth/refresh",
          { refresh_token: this.session.refresh_token },
          { auth: false },
        );
        this.setTokens(data);
        return true;
      } catch (err) {
        if (err.status === 400 || err.status === 401 || err.status === 403) {
          this.clear();
          if (this.hooks.onExpired) this.hooks.onExpired(err);
        } else {
          // Network trouble or a 5xx: the refresh token is still good, try again soon.
          this.scheduleRefresh(RETRY_REFRESH_MS);
        }
        return false;
      } finally {
        this.refreshing = null;
      }
    })();
    return this.refreshing;
  }

  clear() {
    clearTimeout(this.timer);
    this.session = null;
    sessionStorage.removeItem(SESSION_KEY);
  }

  // -- accounts ----------------------------------------------------------

  signup(username, password, name) {
    const body = { username, password };
    if (name) body.name = name;
    return this.request("POST", "/v1/auth/signup", body, { auth: false });
  }

  async login(username, password, deviceType, deviceId) {
    const body = { username, password, device_type: deviceType };
    if (deviceId) body.device_id = deviceId;
    const data = await this.request("POST", "/v1/auth/login", body, { auth: false });
    this.setTokens(data, { username, device_type: deviceType });
    return data;
  }

  async logout() {
    try {
      if (this.session) await this.request("POST", "/v1/auth/logout", undefined, { retry: false });
    } finally {
      this.clear();
    }
  }

  // -- profiles, contacts, devices --------------------------------------

  me() {
    return this.get("/v1/me");
  }
  user(username) {
    return this.get(`/v1/users/${pathPart(username)}`);
  }
  syncContacts(usernames) {
    return this.post("/v1/contacts/sync", { usernames });
  }
  devices() {
    return this.get("/v1/me/devices");
  }
  removeDevice(deviceId) {
    return this.del(`/v1/me/devices/${pathPart(deviceId)}`);
  }

  // -- conversations -----------------------------------------------------

  conversations() {
    return this.get("/v1/conversations");
  }
  history(conversation, beforeSeq, limit = 30) {
    const q = new URLSearchParams({ limit: String(limit) });
    if (beforeSeq !== null && beforeSeq !== undefined) q.set("before_seq", String(beforeSeq));
    return this.get(`/v1/conversations/${pathPart(conversation)}/messages?${q}`);
  }

  // -- groups ------------------------------------------------------------

  groups() {
    return this.get("/v1/groups");
  }
  publicGroups() {
    return this.get("/v1/groups/public");
  }
  group(id) {
    return this.get(`/v1/groups/${pathPart(id)}`);
  }
  createGroup(name, members, isPublic) {
    return this.post("/v1/groups", { name, members, public: Boolean(isPublic) });
  }
  renameGroup(id, name) {
    return this.patch(`/v1/groups/${pathPart(id)}`, { name });
  }
  addMembers(id, members) {
    return this.post(`/v1/groups/${pathPart(id)}/members`, { members });
  }
  removeMember(id, userId) {
    return this.del(`/v1/groups/${pathPart(id)}/members/${pathPart(userId)}`);
  }
  joinGroup(id) {
    return this.post(`/v1/groups/${pathPart(id)}/join`);
  }
  deleteGroup(id) {
    return this.del(`/v1/groups/${pathPart(id)}`);
  }
}
