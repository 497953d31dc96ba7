// The protocol console: every frame sent and received, pretty-printed, plus
// connection events, and a textarea that sends a raw frame as typed.

import { $, h } from "./dom.js";

const MAX_ENTRIES = 500;

export class ProtocolConsole {
  /**
   * @param {(raw: string) => boolean} sendRaw sends text on the socket; false if offline.
   * @param {(name: string) => string} fill a frame template by name (ping, message, ...).
   */
  constructor(sendRaw, fill) {
    this.sendRaw = sendRaw;
    this.fill = fill;
    this.log = $("#console-log");
    this.count = 0;
    this.hidePing = $("#console-hide-ping");
    $("#btn-console-send").addEventListener("click", () => this.sendFromInput());
    $("#console-input").addEventListener("keydown", (ev) => {
      if (ev.key === "Enter" && (ev.ctrlKey || ev.metaKey)) {
        ev.preventDefault();
        this.sendFromInput();
      }
    });
    $("#btn-console-clear").addEventListener("click", () => {
      this.log.replaceChildren();
      this.count = 0;
      this.updateCount();
    });
    this.hidePing.addEventListener("change", () => {
      this.log.classList.toggle("hide-ping", this.hidePing.checked);
    });
    for (const btn of document.querySelectorAll("[data-template]")) {
      btn.addEventListener("click", () => {
        $("#console-input").value = this.fill(btn.dataset.template);
      });
    }
  }

  sendFromInput() {
    const input = $("#console-input");
    const raw = input.value.trim();
    if (!raw) return;
    if (this.sendRaw(raw)) {
      $("#console-status").textContent = "sent";
    } else {
      $("#console-status").textContent = "not connected: frame not sent";
    }
  }

  /** A frame that went out ("out") or came in ("in"); `frame` may be a raw string. */
  frame(direction, frame, raw) {
    let obj = frame;
    if (typeof frame === "string") {
      try {
        obj = JSON.parse(frame);
      } catch {
        obj = null;
      }
    }
    const type = obj && typeof obj === "object" ? obj.type || "?" : "raw";
    const text = obj !== null && typeof obj === "object" ? JSON.stringify(obj, null, 2) : String(raw ?? frame);
    this.add(
      h(
        "div",
        {
          class: `console-entry ${direction} type-${String(type).replace(/[^a-z_]/gi, "")}`,
          dataset: { testid: "console-frame", direction, type },
        },
        h(
          "div",
          { class: "console-head" },
          h("span", { class: "console-dir" }, direction === "out" ? "▲ sent" : "▼ received"),
          h("span", { class: "console-type" }, type),
          h("time", {}, timeLabel()),
        ),
        h("pre", { class: "console-json" }, text),
      ),
    );
  }

  /** A connection event: state changes, closes, reconnect delays. */
  event(state, text) {
    this.add(
      h(
        "div",
        { class: `console-entry event state-${state}`, dataset: { testid: "console-event", state } },
        h(
          "div",
          { class: "console-head" },
          h("span", { class: "console-dir" }, "● socket"),
          h("span", { class: "console-type" }, text),
          h("time", {}, timeLabel()),
        ),
      ),
    );
  }

  add(el) {
    const stick = this.log.scrollTop + this.log.clientHeight >= this.log.scrollHeight - 20;
    this.log.append(el);
    this.count += 1;
    while (this.log.childElementCount > MAX_ENTRIES) this.log.firstElementChild.remove();
    if (stick) this.log.scrollTop = this.log.scrollHeight;
    this.updateCount();
  }

  updateCount() {
    $("#console-count").textContent = String(this.count);
  }

  clear() {
    this.log.replaceChildren();
    this.count = 0;
    this.updateCount();
  }
}

function timeLabel() {
  const d = new Date();
  return `${d.toLocaleTimeString([], { hour12: false })}.${String(d.getMilliseconds()).padStart(3, "0")}`;
}
