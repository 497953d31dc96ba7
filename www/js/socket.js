// The device's WebSocket: ws(s)://<host>/v1/ws?token=<access token>.
// Reconnects with exponential backoff (with jitter) whenever the socket drops,
// and reports its state: connecting -> online -> reconnecting -> online ...
// A ping every PING_MS with no answer within PONG_TIMEOUT_MS counts as a drop.

const BACKOFF_BASE_MS = 500;
const BACKOFF_MAX_MS = 15_000;
const PING_MS = 25_000;
const PONG_TIMEOUT_MS = 10_000;

export class ChatSocket {
  /**
   * @param {object} opts
   *   url(): Promise<string>, the upgrade URL with a fresh token;
   *   onFrame(frame, raw), onOpen(), onState(state, info), onSent(frame, raw);
   *   probe(): Promise, called before a retry after failed attempts (checks the token).
   */
  constructor(opts) {
    this.opts = opts;
    this.ws = null;
    this.state = "offline";
    this.attempt = 0;
    this.opened = false; // ever opened since start(): later drops are "reconnecting"
    this.stopped = true;
    this.timer = null;
    this.pingTimer = null;
    this.lastFrameAt = 0;
  }

  start() {
    this.stopped = false;
    this.attempt = 0;
    this.opened = false;
    this.connect();
  }

  stop() {
    this.stopped = true;
    clearTimeout(this.timer);
    clearInterval(this.pingTimer);
    const ws = this.ws;
    this.ws = null;
    if (ws) ws.close(1000, "client stopped");
    this.setState("offline");
  }

  /** Drop the current socket and connect again at once (a tester's button). */
  reconnectNow() {
    if (this.stopped) return;
    clearTimeout(this.timer);
    const ws = this.ws;
    this.ws = null;
    if (ws) ws.close(1000, "client reconnect");
    this.attempt = 0;
    this.setState(this.opened ? "reconnecting" : "connecting", { delay: 0 });
    this.connect();
  }

  get isOpen() {
    return Boolean(this.ws && this.ws.readyState === WebSocket.OPEN);
  }

  /** Send a frame (object) or a raw string; false if the socket is not open. */
  send(frame) {
    if (!this.isOpen) return false;
    const raw = typeof frame === "string" ? frame : JSON.stringify(frame);
    this.ws.send(raw);
    if (this.opts.onSent) this.opts.onSent(frame, raw);
    return true;
  }

  setState(state, info = {}) {
    this.state = state;
    if (this.opts.onState) this.opts.onState(state, info);
  }

  async connect() {
    if (this.stopped) return;
    this.setState(this.opened ? "reconnecting" : "connecting", { attempt: this.attempt });
    let url;
    try {
      // After two failed attempts in a row, make sure the token is still accepted
      // (the upgrade hides the 401 from the browser); this refreshes or logs out.
      if (this.attempt >= 2 && this.opts.probe) await this.opts.probe();
      if (this.stopped) return;
      url = await this.opts.url();
    } catch {
      if (!this.stopped) this.scheduleReconnect();
      return;
    }
    if (this.stopped) return;
    const ws = new WebSocket(url);
    this.ws = ws;
    ws.onopen = () => {
      if (this.ws !== ws) return;
      this.attempt = 0;
      this.opened = true;
      this.lastFrameAt = Date.now();
      this.startPing();
      this.setState("online");
      if (this.opts.onOpen) this.opts.onOpen();
    };
    ws.onmessage = (ev) => {
      if (this.ws !== ws) return;
      this.lastFrameAt = Date.now();
      let frame;
      try {
        frame = JSON.parse(ev.data);
      } catch {
        frame = { type: "unparsable", raw: String(ev.data) };
      }
      this.opts.onFrame(frame, ev.data);
    };
    ws.onclose = (ev) => {
      if (this.ws !== ws) return;
      this.ws = null;
      clearInterval(this.pingTimer);
      if (this.opts.onClose) this.opts.onClose(ev);
      if (!this.stopped) this.scheduleReconnect();
    };
    ws.onerror = () => {
      // onclose follows and does the work.
    };
  }

  scheduleReconnect() {
    const ceiling = Math.min(BACKOFF_MAX_MS, BACKOFF_BASE_MS * 2 ** this.attempt);
    // "Equal jitter": at least half the ceiling, so retries spread out but still back off.
    const delay = Math.round(ceiling / 2 + (Math.random() * ceiling) / 2);
    this.attempt += 1;
    this.setState(this.opened ? "reconnecting" : "connecting", { delay, attempt: this.attempt });
    clearTimeout(this.timer);
    this.timer = setTimeout(() => this.connect(), delay);
  }

  startPing() {
    clearInterval(this.pingTimer);
    this.pingTimer = setInterval(() => {
      if (!this.isOpen) return;
      if (Date.now() - this.lastFrameAt > PING_MS + PONG_TIMEOUT_MS) {
        // Nothing at all came back, not even the last pong: the socket is dead.
        // Do not wait for a close handshake that will never finish.
        const ws = this.ws;
        this.ws = null;
        clearInterval(this.pingTimer);
        ws.close(4000, "ping timeout");
        if (this.opts.onClose) this.opts.onClose({ code: 4000, reason: "ping timeout" });
        this.scheduleReconnect();
        return;
      }
      this.send({ type: "ping" });
    }, PING_MS);
  }
}
