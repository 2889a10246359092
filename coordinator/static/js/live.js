// The /ws connection of one page: JSON-RPC 2.0, subscriptions, reconnect with backoff and resync.
//
// On every (re)connection the page's `subscribe` sends its listen_* calls, then its `sync` fetches the state
// from /api/v1. Notifications that arrive meanwhile are held and handed over after the sync, marked as
// replayed: the fetched state may already include them, so applying them must be idempotent.

import { ApiError, socketUrl } from "./api.js";

const BACKOFF_MS = [250, 500, 1000, 2000, 3000, 5000];
const STABLE_MS = 5000;

/** The state of the current page's connection, for the header: listen to "change". */
export const connection = new EventTarget();
connection.state = "idle";
connection.retryAt = null;
connection.retryNow = () => {};

function announce(state, retryAt = null, live = null) {
  connection.state = state;
  connection.retryAt = retryAt;
  connection.retryNow = live ? () => live.retryNow() : () => {};
  connection.dispatchEvent(new Event("change"));
}

export class Live {
  /**
   * @param {object} handlers
   * @param {(live: Live) => Promise<void>} handlers.subscribe  sends the listen_* calls
   * @param {() => Promise<void>} handlers.sync  fetches the state
   * @param {(method: string, params: any[], replayed: boolean) => void} handlers.note
   * @param {(notes: Array<[string, any[]]>) => void} [handlers.replay]  takes the held notes at once instead
   * @param {(error: Error) => void} [handlers.failed]  a sync that failed (it is retried by reconnecting)
   */
  constructor(handlers) {
    this.handlers = handlers;
    this.socket = null;
    this.pending = new Map();
    this.ids = 0;
    this.attempt = 0;
    this.timer = null;
    this.closed = false;
    this.held = null;
    this.openedAt = 0;
    this.onWake = () => {
      if (this.timer !== null && document.visibilityState !== "hidden") this.retryNow();
    };
    window.addEventListener("online", this.onWake);
    document.addEventListener("visibilitychange", this.onWake);
  }

  start() {
    this.connect();
    return this;
  }

  close() {
    this.closed = true;
    announce("idle");
    clearTimeout(this.timer);
    this.timer = null;
    window.removeEventListener("online", this.onWake);
    document.removeEventListener("visibilitychange", this.onWake);
    if (this.socket) this.socket.close(1000);
    this.socket = null;
  }

  retryNow() {
    if (this.closed) return;
    clearTimeout(this.timer);
    this.timer = null;
    this.connect();
  }

  /** A JSON-RPC request on the socket; rejects with ApiError on an error reply or a lost connection. */
  call(method, params = []) {
    const socket = this.socket;
    if (!socket || socket.readyState !== WebSocket.OPEN) {
      return Promise.reject(new ApiError(0, "not connected"));
    }
    const id = ++this.ids;
    return new Promise((resolve, reject) => {
      this.pending.set(id, { resolve, reject });
      socket.send(JSON.stringify({ jsonrpc: "2.0", id, method, params }));
    });
  }

  connect() {
    if (this.closed) return;
    announce(this.attempt === 0 ? "connecting" : "reconnecting", null, this);
    let socket;
    try {
      socket = new WebSocket(socketUrl(), "testfleet.v1.json");
    } catch (error) {
      this.scheduleReconnect();
      return;
    }
    this.socket = socket;
    socket.addEventListener("open", () => this.opened(socket));
    socket.addEventListener("message", (event) => this.received(socket, event));
    socket.addEventListener("close", () => this.lost(socket));
  }

  async opened(socket) {
    this.openedAt = Date.now();
    this.held = [];
    try {
      await this.handlers.subscribe(this);
      await this.handlers.sync();
    } catch (error) {
      if (socket !== this.socket) return;
      if (this.handlers.failed) this.handlers.failed(error);
      if (error instanceof ApiError && error.fatal) {
        this.closed = true;
        announce(error.unauthorized ? "unauthorized" : "idle");
        socket.close(1000);
        return;
      }
      socket.close(4000, "resync failed");
      return;
    }
    if (socket !== this.socket) return;
    const held = this.held;
    this.held = null;
    this.attempt = 0;
    announce("live", null, this);
    if (this.handlers.replay) this.handlers.replay(held);
    else for (const [method, params] of held) this.handlers.note(method, params, true);
  }

  received(socket, event) {
    if (socket !== this.socket || typeof event.data !== "string") return;
    let frame;
    try {
      frame = JSON.parse(event.data);
    } catch (error) {
      return;
    }
    if (frame.method !== undefined && frame.id !== undefined && frame.id !== null) {
      socket.send(JSON.stringify({
        jsonrpc: "2.0", id: frame.id, error: { code: -32601, message: `a dashboard has no method ${frame.method}` },
      }));
      return;
    }
    if (frame.method !== undefined) {
      const params = Array.isArray(frame.params) ? frame.params : [];
      if (this.held !== null) this.held.push([frame.method, params]);
      else this.handlers.note(frame.method, params, false);
      return;
    }
    const waiter = this.pending.get(frame.id);
    if (!waiter) return;
    this.pending.delete(frame.id);
    if (frame.error) waiter.reject(new ApiError(frame.error.code, frame.error.message));
    else waiter.resolve(frame.result);
  }

  lost(socket) {
    if (socket !== this.socket) return;
    this.socket = null;
    this.held = null;
    for (const waiter of this.pending.values()) waiter.reject(new ApiError(0, "connection lost"));
    this.pending.clear();
    if (this.closed) return;
    if (this.openedAt && Date.now() - this.openedAt > STABLE_MS) this.attempt = 0;
    this.openedAt = 0;
    this.scheduleReconnect();
  }

  scheduleReconnect() {
    const base = BACKOFF_MS[Math.min(this.attempt, BACKOFF_MS.length - 1)];
    const delay = Math.round(base * (0.8 + Math.random() * 0.4));
    this.attempt += 1;
    const retryAt = Date.now() + delay;
    announce("reconnecting", retryAt, this);
    clearTimeout(this.timer);
    this.timer = setTimeout(() => {
      this.timer = null;
      this.connect();
    }, delay);
  }
}
