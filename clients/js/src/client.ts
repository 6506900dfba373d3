// BimipClient: one WebSocket at a time, full-jitter reconnects, single-flight token refresh, an
// outbox resent in order after every reconnect, coalesced receipts, presence, typing and RESUME
// history pages.

import {
  Partition,
  Platform,
  ReceiptKind,
  Status,
  type Ack,
  type Awareness,
  type Batch,
  type Error as WireError,
  type Frame,
  type Message,
  type Receipt,
  type Welcome,
} from "./gen/bimip/v1/bimip_pb.js";
import { backoffDelay, DEFAULT_BACKOFF } from "./backoff.js";
import { classifyClose, type CloseAction } from "./close-codes.js";
import { binaryCodec, encodedSize, makeFrame, type Codec, type FrameBodyInit, type FrameInit } from "./codec.js";
import { AsyncQueue, Emitter } from "./emitter.js";
import { BimipError, wireErrorCode } from "./errors.js";
import { MemoryOutbox, OutgoingMessage } from "./outbox.js";
import { ReceiptCoalescer, type PendingReceipt } from "./receipts.js";
import { SingleFlight, StaleTokenError, tokenExpiry } from "./token.js";
import type {
  AnyClientEvent,
  ClientEvents,
  ClientOptions,
  ConnState,
  ErrorCode,
  InboundMessage,
  Intent,
  LogLevel,
  Offset,
  OutboxStore,
  Outgoing,
  PresenceEvent,
  StateEvent,
  TokenReason,
  WebSocketConstructor,
  WebSocketLike,
  WelcomeEvent,
} from "./types.js";

const OPEN = 1;
/** How many inbound (peer, offset) keys are remembered for dedupe. */
const SEEN_LIMIT = 5_000;
/** How many acknowledged outgoing messages are kept to apply receipts to. */
const RECENT_LIMIT = 2_000;
/** Retry delay after the server answered a send with UNAVAILABLE or RATE_LIMITED (ms). */
const SEND_RETRY_MS = 1_000;

interface Request {
  ack?(a: Ack): void;
  error(e: WireError, ref: bigint): void;
  awareness?(a: Awareness): void;
  /** Returns true when this was the last batch of the request. */
  batch?(b: Batch): boolean;
  /** The connection dropped before the answer. */
  lost?(): void;
}

interface HistoryRequest {
  peer: string;
  from: Offset;
  limit: number;
  queue: AsyncQueue<InboundMessage[]>;
  cancelled: boolean;
}

interface Op {
  frames: () => FrameBodyInit[];
  waiters: { resolve: () => void; reject: (e: unknown) => void }[];
}

const INTENT_STATUS: Record<Intent, Status> = {
  online: Status.ONLINE,
  away: Status.AWAY,
  busy: Status.BUSY,
  dnd: Status.DND,
};

const PLATFORMS = { fcm: Platform.FCM, apns: Platform.APNS, webhook: Platform.WEBHOOK } as const;

const utf8 = new TextEncoder();
const utf8Decoder = new TextDecoder();

function newId(): string {
  const c = (globalThis as { crypto?: Crypto }).crypto;
  if (c && typeof c.randomUUID === "function") return c.randomUUID();
  const bytes = new Uint8Array(16);
  if (c && typeof c.getRandomValues === "function") c.getRandomValues(bytes);
  else for (let i = 0; i < 16; i++) bytes[i] = Math.floor(Math.random() * 256);
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

function toInbound(m: Message): InboundMessage {
  const payload = m.payload;
  return {
    id: m.id,
    from: m.from,
    to: m.to,
    offset: m.offset,
    timestamp: Number(m.timestamp),
    partition: m.partition === Partition.NOTIFICATION ? "notification" : "chat",
    payload,
    device: m.device,
    acknowledged: m.acknowledged,
    text: () => utf8Decoder.decode(payload),
  };
}

function intentOf(s: Status): Exclude<Intent, "online"> | undefined {
  switch (s) {
    case Status.AWAY:
      return "away";
    case Status.BUSY:
      return "busy";
    case Status.DND:
      return "dnd";
    default:
      return undefined;
  }
}

export class BimipClient {
  private readonly opts: ClientOptions;
  private readonly emitter: Emitter<ClientEvents>;
  private readonly backoff: { minMs: number; maxMs: number; stableMs: number } | undefined;
  private readonly tokens: SingleFlight | undefined;
  private readonly store: OutboxStore;

  private _state: ConnState = "idle";
  private _me: { user: string; device: string } | undefined;
  private lastWelcome: WelcomeEvent | undefined;
  private codec: Codec | undefined;
  private token: string | undefined;
  /** The token the current/last socket was opened with. */
  private tokenUsed: string | undefined;
  private forceRefresh: TokenReason | undefined;
  private device: string | undefined;

  private ws: WebSocketLike | undefined;
  /** Bumped for every connection attempt and on close: stale async work checks it. */
  private gen = 0;
  private welcomed = false;
  private heartbeatMs = 20_000;
  private maxFrameBytes = 0;
  private lastRx = 0;

  /** Failed attempts since the last stable link. */
  private attempt = 0;
  /** Attempts in a row that closed before a Welcome. */
  private unwelcomedStreak = 0;
  private rejectedRefreshUsed = false;
  private immediateUsed = false;

  private timers = new Map<string, ReturnType<typeof setTimeout>>();
  private nextRefValue = 1n;
  private readonly requests = new Map<bigint, Request>();
  /** Refs of frames whose answers only matter when they are refusals (TYPING): logged, not emitted. */
  private readonly quietRefs = new Set<bigint>();

  private outbox = new Map<string, OutgoingMessage>();
  private readonly recent = new Map<string, OutgoingMessage>();
  private storeLoaded: Promise<void> | undefined;
  private readonly receipts = new ReceiptCoalescer();
  private readonly seen = new Map<string, true>();
  private readonly watched = new Set<string>();
  private watchWaiters: Op["waiters"] = [];
  private intentOp: Op | undefined;
  private pushOps: Op[] = [];
  private readonly histories = new Set<HistoryRequest>();
  private readonly typingSent = new Map<string, number>();
  private welcomeWaiters: { resolve: (w: WelcomeEvent) => void; reject: (e: unknown) => void }[] = [];
  private detachNetwork: (() => void) | undefined;
  private closeWaiter: (() => void) | undefined;

  constructor(opts: ClientOptions) {
    if (!opts || typeof opts.url !== "string" || opts.url === "") throw new TypeError("bimip-client: `url` is required");
    this.opts = opts;
    this.emitter = new Emitter<ClientEvents>((err) => this.log("error", "an event listener threw", err));
    this.backoff = opts.reconnect === false ? undefined : { ...DEFAULT_BACKOFF, ...(opts.reconnect ?? {}) };
    this.tokens = opts.getToken ? new SingleFlight(opts.getToken) : undefined;
    this.store = opts.outbox ?? new MemoryOutbox();
    this.token = opts.token;
    this.device = opts.device;
  }

  // ---------------------------------------------------------------- public API

  get state(): ConnState {
    return this._state;
  }

  /** The user and device of the current session, known after the first `Welcome`. */
  get me(): { user: string; device: string } | undefined {
    return this._me;
  }

  /**
   * Starts the session (idempotent) and resolves on the next `Welcome`. Rejects only when the session
   * ends for good first (`close()`, kick, revoke, no token). After a terminal close it starts anew.
   */
  connect(): Promise<WelcomeEvent> {
    if (this._state === "connected" && this.lastWelcome) return Promise.resolve(this.lastWelcome);
    const p = new Promise<WelcomeEvent>((resolve, reject) => this.welcomeWaiters.push({ resolve, reject }));
    if (this._state === "idle" || this._state === "closed") {
      this.attempt = 0;
      this.unwelcomedStreak = 0;
      this.rejectedRefreshUsed = false;
      this.immediateUsed = false;
      this.attachNetwork();
      this.setState({ state: "connecting", attempt: 0 });
      void this.open();
    }
    return handled(p);
  }

  /** Ends the session: no more reconnects. Unacknowledged messages stay in the outbox store. */
  async close(): Promise<void> {
    if (this._state === "closed" || this._state === "idle") {
      this._state = "closed";
      return;
    }
    const ws = this.ws;
    this.shutdown(new BimipError("closed", "the client was closed"));
    this.setState({ state: "closed", attempt: this.attempt, code: 1000, reason: "closed by the client" });
    if (ws) {
      const closed = new Promise<void>((resolve) => {
        const t = setTimeout(resolve, 1_000);
        this.closeWaiter = () => {
          clearTimeout(t);
          resolve();
        };
      });
      ws.onclose = () => {
        const w = this.closeWaiter;
        this.closeWaiter = undefined;
        w?.();
      };
      try {
        ws.close(1000, "bye");
      } catch {
        // already closing
      }
      await closed;
    }
  }

  /** Adds a listener; returns the function that removes it. */
  on<K extends keyof ClientEvents>(type: K, fn: (e: ClientEvents[K]) => void): () => void {
    return this.emitter.on(type, fn);
  }

  /** Every event as `{type, ...payload}`, until `signal` aborts or the loop breaks. */
  events(signal?: AbortSignal): AsyncIterableIterator<AnyClientEvent> {
    let off = () => {};
    const q = new AsyncQueue<AnyClientEvent>(() => off());
    off = this.emitter.onAny((type, e) => q.push({ type, ...(e as object) } as AnyClientEvent));
    if (signal) {
      if (signal.aborted) {
        off();
        q.end();
      } else {
        signal.addEventListener(
          "abort",
          () => {
            off();
            q.end();
          },
          { once: true },
        );
      }
    }
    return q;
  }

  /**
   * Sends a message. It is queued at once (also while offline) under a client id and sent, in order,
   * as soon as a connection is up; after a reconnect every unacknowledged message is sent again.
   */
  send(to: string, body: Uint8Array | string, o: { id?: string; partition?: "chat" | "notification" } = {}): Outgoing {
    if (typeof to !== "string" || to === "") throw new TypeError("bimip-client: send() needs a recipient");
    const id = o.id ?? newId();
    const existing = this.outbox.get(id) ?? this.recent.get(id);
    if (existing) return existing;
    const payload = typeof body === "string" ? utf8.encode(body) : body;
    const m = new OutgoingMessage(id, to, payload, o.partition ?? "chat", Date.now());
    this.outbox.set(id, m);
    this.store.put(m.record()).catch((e) => this.log("error", "outbox store put failed", e));
    this.emitOutgoing(m);
    this.flushOutbox();
    return m;
  }

  /** Messages not yet acknowledged by the server, in send order. */
  pending(): readonly Outgoing[] {
    return [...this.outbox.values()].filter((m) => m.status !== "failed");
  }

  /** Reports messages from `peer` up to `upTo` (inclusive, an offset of this user's queue) as delivered. Coalesced. */
  markDelivered(peer: string, upTo: Offset): void {
    this.markReceipt({ partition: "chat", peer, kind: "delivered", upTo });
  }

  /** Reports messages from `peer` up to `upTo` as read. Coalesced: only the highest per peer is sent. */
  markRead(peer: string, upTo: Offset): void {
    this.markReceipt({ partition: "chat", peer, kind: "read", upTo });
  }

  /**
   * The chat messages `peer` sent to this user (RESUME), as pages in offset order. Starts at `from`
   * (inclusive) or, without it, at this device's cursor for `peer` (past what it marked delivered or
   * read). Waits for a connection; a page interrupted by a reconnect continues where it stopped.
   */
  history(peer: string, o: { from?: Offset; limit?: number; signal?: AbortSignal } = {}): AsyncIterableIterator<InboundMessage[]> {
    const h: HistoryRequest = {
      peer,
      from: o.from ?? 0n,
      limit: Math.max(0, Math.min(o.limit ?? 0, 1000)),
      queue: new AsyncQueue<InboundMessage[]>(() => {
        h.cancelled = true;
        this.histories.delete(h);
      }),
      cancelled: false,
    };
    if (this._state === "closed") {
      h.queue.fail(new BimipError("closed", "the client is closed"));
      return h.queue;
    }
    this.histories.add(h);
    if (o.signal) {
      const abort = () => {
        h.cancelled = true;
        this.histories.delete(h);
        h.queue.fail(o.signal?.reason ?? new Error("aborted"));
      };
      if (o.signal.aborted) abort();
      else o.signal.addEventListener("abort", abort, { once: true });
    }
    if (this.isConnected()) this.sendHistory(h);
    return h.queue;
  }

  /**
   * Sets this user's intent: away/busy/dnd, or `online` to clear it. `invisible: true` hides the user
   * (seen as offline, the intent kept); `invisible: false`, or `online` while invisible, shows them
   * again with their intent. Resolves on the Ack (sent after the next connect when offline).
   */
  setIntent(intent: Intent, o: { invisible?: boolean; details?: string } = {}): Promise<void> {
    const status = INTENT_STATUS[intent];
    if (status === undefined) return Promise.reject(new TypeError(`bimip-client: unknown intent ${String(intent)}`));
    const frames = (): FrameBodyInit[] => {
      const out: FrameBodyInit[] = [];
      if (intent !== "online" && o.invisible !== undefined) {
        out.push({ case: "awareness", value: { status: Status.ONLINE, invisible: o.invisible } });
      }
      out.push({
        case: "awareness",
        value: { status, details: o.details ?? "", invisible: intent === "online" ? o.invisible === true : false },
      });
      return out;
    };
    return handled(new Promise<void>((resolve, reject) => {
      // A newer intent replaces one still waiting for a connection; its callers wait for the newer one.
      const waiters = [...(this.intentOp?.waiters ?? []), { resolve, reject }];
      this.intentOp = { frames, waiters };
      if (this.isConnected()) this.sendIntent();
    }));
  }

  /** Tells `peer` this user is typing (or recording). Throttled; dropped while offline. Returns whether a frame went out. */
  typing(peer: string, kind: "typing" | "recording" = "typing", o: { ttlMs?: number } = {}): boolean {
    if (!this.isConnected()) return false;
    const key = `${kind}\u0000${peer}`;
    const now = Date.now();
    const last = this.typingSent.get(key);
    if (last !== undefined && now - last < (this.opts.typingThrottleMs ?? 3_000)) return false;
    this.typingSent.set(key, now);
    const ref = this.newRef();
    this.quietRefs.add(ref);
    if (this.quietRefs.size > 64) this.quietRefs.delete(this.quietRefs.values().next().value as bigint);
    return this.write({
      ref,
      body: {
        case: "awareness",
        value: { to: peer, status: kind === "typing" ? Status.TYPING : Status.RECORDING, ttlMs: o.ttlMs ?? 0 },
      },
    });
  }

  /**
   * Asks for the presence of `users` now (snapshots arrive as `presence` events) and keeps asking
   * after every reconnect. Rejects when the server refuses some of them (the others still arrive).
   */
  watch(users: string[]): Promise<void> {
    const fresh = users.filter((u) => !this.watched.has(u));
    for (const u of users) this.watched.add(u);
    return handled(
      new Promise<void>((resolve, reject) => {
        if (this.isConnected()) {
          if (fresh.length === 0) return resolve();
          this.subscribe(fresh, false, [{ resolve, reject }]);
        } else {
          this.watchWaiters.push({ resolve, reject });
        }
      }),
    );
  }

  /** Stops watching `users` (no more snapshots after reconnects; under the `open` policy no more live changes). */
  unwatch(users: string[]): Promise<void> {
    const gone = users.filter((u) => this.watched.delete(u));
    if (gone.length === 0 || !this.isConnected()) return Promise.resolve();
    return handled(new Promise<void>((resolve, reject) => this.subscribe(gone, true, [{ resolve, reject }])));
  }

  /** Registers (or with `remove`, removes) this device's push token. Resolves on the Ack. */
  registerPush(
    platform: "fcm" | "apns" | "webhook",
    token: string,
    o: { remove?: boolean; sandbox?: boolean; locale?: string } = {},
  ): Promise<void> {
    const p = PLATFORMS[platform];
    if (p === undefined && !o.remove) return Promise.reject(new TypeError(`bimip-client: unknown push platform ${String(platform)}`));
    return handled(new Promise<void>((resolve, reject) => {
      const op: Op = {
        frames: () => [
          {
            case: "pushToken",
            value: { platform: p ?? Platform.UNSPECIFIED, token, remove: o.remove ?? false, sandbox: o.sandbox ?? false, locale: o.locale ?? "" },
          },
        ],
        waiters: [{ resolve, reject }],
      };
      this.pushOps.push(op);
      if (this.isConnected()) this.sendOp(op, () => this.pushOps.splice(this.pushOps.indexOf(op) >>> 0, 1));
    }));
  }

  /** Skips the wait of a pending reconnect (a "retry now" button). */
  reconnectNow(): void {
    if (this._state === "reconnecting" && this.timers.has("reconnect")) {
      this.clearTimer("reconnect");
      this.setState({ state: "connecting", attempt: this.attempt });
      void this.open();
    }
  }

  // ---------------------------------------------------------------- connection

  private isConnected(): boolean {
    return this._state === "connected" && this.welcomed && this.ws !== undefined && this.ws.readyState === OPEN;
  }

  private async ready(): Promise<Codec> {
    if (!this.codec) {
      this.codec = this.opts.format === "json" ? (await import("./codec-json.js")).jsonCodec : binaryCodec;
    }
    if (!this.storeLoaded) {
      this.storeLoaded = this.store.load().then(
        (records) => {
          const loaded = new Map<string, OutgoingMessage>();
          for (const r of [...records].sort((a, b) => a.createdAt - b.createdAt)) {
            if (this.outbox.has(r.id) || this.recent.has(r.id)) continue;
            loaded.set(r.id, new OutgoingMessage(r.id, r.to, r.payload, r.partition ?? "chat", r.createdAt));
          }
          if (loaded.size > 0) {
            for (const [id, m] of this.outbox) loaded.set(id, m);
            this.outbox = loaded;
          }
        },
        (e) => this.log("error", "outbox store load failed", e),
      );
    }
    await this.storeLoaded;
    return this.codec;
  }

  private async tokenForConnect(): Promise<string | null> {
    const fetch = async (reason: TokenReason): Promise<string | null> => {
      const t = await this.tokens!.get(reason);
      if (t === null) return null;
      if (typeof t !== "string" || t === "") throw new Error("getToken returned no token");
      this.token = t;
      return t;
    };
    const expiring = (t: string) => {
      const exp = tokenExpiry(t);
      return exp !== undefined && exp - Date.now() < (this.opts.refreshTokenBeforeMs ?? 60_000);
    };
    const forced = this.forceRefresh;
    this.forceRefresh = undefined;
    if (forced && this.tokens) {
      // A token fetched ahead of time (see scheduleTokenRefresh) is good enough after a 4001.
      if (forced === "expired" && this.token && this.token !== this.tokenUsed && !expiring(this.token)) return this.token;
      try {
        return await fetch(forced);
      } catch (e) {
        this.forceRefresh = forced; // still needed at the next attempt
        throw e;
      }
    }
    if (!this.token) {
      if (!this.tokens) throw new BimipError("unauthorized", "no `token` and no `getToken` given", { fatal: true });
      return fetch("initial");
    }
    if (this.tokens && expiring(this.token)) {
      const exp = tokenExpiry(this.token) ?? 0;
      return fetch(exp <= Date.now() ? "expired" : "expiring");
    }
    return this.token;
  }

  private buildUrl(token: string): string {
    let base = this.opts.url.replace(/^http(s?):\/\//i, "ws$1://");
    const u = new URL(base);
    u.searchParams.set("token", token);
    if (this.device) u.searchParams.set("device", this.device);
    base = u.toString();
    return base;
  }

  private async open(): Promise<void> {
    const gen = ++this.gen;
    this.clearTimer("reconnect");
    let codec: Codec;
    let token: string | null;
    try {
      codec = await this.ready();
      token = await this.tokenForConnect();
    } catch (e) {
      if (gen !== this.gen || this._state === "closed" || e instanceof StaleTokenError) return;
      if (e instanceof BimipError && e.fatal) return this.fatal(e.code, e.message);
      this.log("warn", "could not get a token", e);
      this.emit("error", { code: "unauthorized", message: `getToken failed: ${errMessage(e)}`, fatal: false });
      return this.scheduleReconnect({ kind: "reconnect", delay: "backoff" });
    }
    if (gen !== this.gen || this._state === "closed") return;
    if (token === null) return this.fatal("logged_out", "getToken returned null (logged out)");

    const Ctor = (this.opts.WebSocket ?? (globalThis as { WebSocket?: unknown }).WebSocket) as WebSocketConstructor | undefined;
    if (typeof Ctor !== "function") {
      return this.fatal("closed", "no WebSocket implementation: pass the `WebSocket` option (on Node 20: the `ws` package)");
    }
    let ws: WebSocketLike;
    try {
      ws = new Ctor(this.buildUrl(token), [codec.subprotocol]);
    } catch (e) {
      this.log("error", "WebSocket constructor threw", e);
      return this.scheduleReconnect({ kind: "reconnect", delay: "backoff" });
    }
    this.tokenUsed = token;
    this.ws = ws;
    this.welcomed = false;
    ws.binaryType = "arraybuffer";
    ws.onopen = () => {
      if (this.ws !== ws) return;
      this.lastRx = Date.now();
      this.log("debug", "socket open");
    };
    ws.onmessage = (ev) => {
      if (this.ws !== ws) return;
      this.onData(ev.data);
    };
    // Keep a handler: `ws` (Node) throws on an error event nobody listens to.
    ws.onerror = (ev) => {
      if (this.ws === ws) this.log("debug", "socket error", (ev as { message?: string })?.message);
    };
    ws.onclose = (ev) => {
      if (this.ws !== ws) return;
      this.onClosed(ev.code, ev.reason ?? "");
    };
    this.setTimer("connect", this.opts.connectTimeoutMs ?? 10_000, () => {
      if (this.ws === ws && !this.welcomed) this.drop("connect timeout");
    });
  }

  /** Abandons the current socket at once (no close handshake wait) and handles it as a lost link. */
  private drop(why: string): void {
    const ws = this.ws;
    if (!ws) return;
    this.log("warn", `dropping the connection: ${why}`);
    detach(ws);
    try {
      ws.close();
    } catch {
      // closing a socket that never opened may throw in some implementations
    }
    this.onClosed(1006, why);
  }

  private onClosed(code: number, reason: string): void {
    const wasWelcomed = this.welcomed;
    if (this.ws) detach(this.ws);
    this.ws = undefined;
    this.welcomed = false;
    for (const t of ["connect", "heartbeat", "stable", "ack", "sendRetry", "receipts"]) this.clearTimer(t);
    const lost = [...this.requests.values()];
    this.requests.clear();
    this.quietRefs.clear();
    for (const r of lost) r.lost?.();
    for (const m of this.outbox.values()) m.requeue();
    this.receipts.requeue();
    if (this._state === "closed") return;
    this.log("debug", `closed ${code} ${reason}`);
    this.unwelcomedStreak = wasWelcomed ? 0 : this.unwelcomedStreak + 1;
    const action = classifyClose(code, reason);
    if (!this.backoff && action.kind !== "fatal") {
      return this.fatal("closed", `connection lost (${code}${reason ? ` ${reason}` : ""}) and reconnect is off`, code);
    }
    if (action.kind === "fatal") return this.fatal(action.error, action.message, code);
    if (action.kind === "refresh" && !this.tokens) {
      return this.fatal("token_expired", reason || "token expired, and there is no getToken to refresh it", code);
    }
    if (action.kind === "refresh") this.forceRefresh = "expired";
    else if (this.unwelcomedStreak >= 2 && this.tokens && !this.rejectedRefreshUsed) {
      // A browser cannot see why an upgrade failed: two failures in a row may be a refused token.
      this.rejectedRefreshUsed = true;
      this.forceRefresh = "rejected";
    }
    this.scheduleReconnect(action, code, reason);
  }

  private scheduleReconnect(action: CloseAction, code?: number, reason?: string): void {
    if (this._state === "closed" || !this.backoff) {
      if (this._state !== "closed") this.fatal("closed", "connection failed and reconnect is off", code);
      return;
    }
    let delay: number;
    if ((action.kind === "refresh" || (action.kind === "reconnect" && action.delay === "now")) && !this.immediateUsed) {
      // At once, but only once until a link stays up: a server that keeps closing gets the backoff.
      this.immediateUsed = true;
      delay = 0;
    } else if (action.kind === "reconnect" && action.delay === "max") {
      delay = this.backoff.maxMs;
    } else {
      delay = backoffDelay(this.attempt, this.backoff);
    }
    this.attempt++;
    const ev: StateEvent = { state: "reconnecting", attempt: this.attempt, retryInMs: delay };
    if (code !== undefined) ev.code = code;
    if (reason) ev.reason = reason;
    this.setState(ev);
    this.setTimer("reconnect", delay, () => {
      this.setState({ state: "connecting", attempt: this.attempt });
      void this.open();
    });
  }

  private fatal(code: ErrorCode, message: string, closeCode?: number): void {
    if (this._state === "closed") return;
    const err = new BimipError(code, message, { fatal: true, ...(closeCode !== undefined ? { closeCode } : {}) });
    const ev: ClientEvents["error"] = { code, message, fatal: true };
    if (closeCode !== undefined) ev.closeCode = closeCode;
    this.shutdown(err);
    this.emit("error", ev);
    const st: StateEvent = { state: "closed", attempt: this.attempt, reason: message };
    if (closeCode !== undefined) st.code = closeCode;
    this.setState(st);
  }

  /** Common part of close() and fatal(): stop everything, fail what waits, keep the outbox store. */
  private shutdown(err: BimipError): void {
    this.gen++;
    this._state = "closed";
    this.tokens?.reset();
    for (const name of [...this.timers.keys()]) this.clearTimer(name);
    if (this.ws) {
      const ws = this.ws;
      this.ws = undefined;
      detach(ws);
      if (err.code !== "closed" || err.fatal) {
        try {
          ws.close(1000, "bye");
        } catch {
          // ignore
        }
      }
    }
    this.welcomed = false;
    this.requests.clear();
    this.detachNetwork?.();
    this.detachNetwork = undefined;
    for (const w of this.welcomeWaiters.splice(0)) w.reject(err);
    // The messages stay in the store for the next session; their promises end here.
    for (const m of this.outbox.values()) m.reject(err);
    this.outbox = new Map();
    this.storeLoaded = undefined;
    this.receipts.requeue();
    for (const h of this.histories) h.queue.fail(err);
    this.histories.clear();
    const ops = [...(this.intentOp ? [this.intentOp] : []), ...this.pushOps];
    this.intentOp = undefined;
    this.pushOps = [];
    for (const op of ops) for (const w of op.waiters) w.reject(err);
    for (const w of this.watchWaiters.splice(0)) w.reject(err);
  }

  private onWelcome(w: Welcome): void {
    this.clearTimer("connect");
    this.welcomed = true;
    this._me = { user: w.user, device: w.device };
    if (!this.opts.device) this.device = w.device;
    this.heartbeatMs = w.heartbeatMs > 0 ? w.heartbeatMs : 20_000;
    this.maxFrameBytes = w.maxFrameBytes;
    const ev: WelcomeEvent = {
      user: w.user,
      device: w.device,
      session: w.session,
      serverTime: Number(w.serverTime),
      heartbeatMs: w.heartbeatMs,
      maxFrameBytes: w.maxFrameBytes,
      node: w.node,
    };
    this.lastWelcome = ev;
    this.setState({ state: "connected", attempt: this.attempt });
    if (this.backoff) {
      this.setTimer("stable", this.backoff.stableMs, () => {
        this.attempt = 0;
        this.unwelcomedStreak = 0;
        this.rejectedRefreshUsed = false;
        this.immediateUsed = false;
      });
    }
    this.armHeartbeat();
    this.scheduleTokenRefresh();
    this.emit("welcome", ev);
    for (const wt of this.welcomeWaiters.splice(0)) wt.resolve(ev);
    if (!this.isConnected()) return; // a listener closed the client
    // Replay the session's state on the new connection, oldest first.
    if (this.watched.size > 0 || this.watchWaiters.length > 0) {
      const waiters = this.watchWaiters.splice(0);
      if (this.watched.size > 0) this.subscribe([...this.watched], false, waiters);
      else for (const x of waiters) x.resolve();
    }
    if (this.intentOp) this.sendIntent();
    for (const op of [...this.pushOps]) this.sendOp(op, () => this.pushOps.splice(this.pushOps.indexOf(op) >>> 0, 1));
    this.flushReceipts();
    this.flushOutbox();
    for (const h of this.histories) this.sendHistory(h);
  }

  private armHeartbeat(): void {
    const hb = this.heartbeatMs;
    this.setTimer("heartbeat", Math.max(1_000, Math.floor(hb / 2)), () => {
      if (!this.isConnected()) return;
      // Judge by the clock, not by timer ticks: a throttled background tab fires late, which proves nothing.
      const idle = Date.now() - this.lastRx;
      if (idle > 2 * hb + 5_000) return this.drop("no data from the server (heartbeat)");
      if (idle >= hb) this.write({ ref: this.newRef(), body: { case: "ping", value: { timestamp: BigInt(Date.now()) } } });
      this.armHeartbeat();
    });
  }

  /** Fetches the next token ahead of expiry, so the reconnect after the server's 4001 needs no wait. */
  private scheduleTokenRefresh(): void {
    if (!this.tokens || !this.token) return;
    const exp = tokenExpiry(this.token);
    if (exp === undefined) return;
    const at = Math.max(0, exp - (this.opts.refreshTokenBeforeMs ?? 60_000) - Date.now());
    const current = this.token;
    this.setTimer("token", Math.min(at, 2 ** 31 - 1), () => {
      if (this.token !== current || this._state === "closed") return;
      this.tokens!.get("expiring").then(
        (t) => {
          if (t === null) return this.fatal("logged_out", "getToken returned null (logged out)");
          if (typeof t === "string" && t !== "") this.token = t;
        },
        (e) => {
          if (!(e instanceof StaleTokenError)) this.log("warn", "token refresh failed; retrying at reconnect", e);
        },
      );
    });
  }

  private attachNetwork(): void {
    if (this.opts.networkEvents === false || this.detachNetwork) return;
    const g = globalThis as { addEventListener?: Function; removeEventListener?: Function; document?: { visibilityState?: string; addEventListener?: Function; removeEventListener?: Function } };
    if (typeof g.addEventListener !== "function" || typeof g.removeEventListener !== "function") return;
    const onOnline = () => {
      // The network is back: skip the backoff.
      if (this._state === "reconnecting") this.reconnectNow();
    };
    const onVisible = () => {
      if (g.document?.visibilityState !== "visible") return;
      if (this.isConnected()) this.write({ ref: this.newRef(), body: { case: "ping", value: { timestamp: BigInt(Date.now()) } } });
      else if (this._state === "reconnecting") this.reconnectNow();
    };
    g.addEventListener("online", onOnline);
    g.document?.addEventListener?.("visibilitychange", onVisible);
    this.detachNetwork = () => {
      g.removeEventListener!("online", onOnline);
      g.document?.removeEventListener?.("visibilitychange", onVisible);
    };
  }

  // ---------------------------------------------------------------- inbound

  private onData(data: unknown): void {
    this.lastRx = Date.now();
    let frame: Frame;
    try {
      frame = this.codec!.decode(data);
    } catch (e) {
      this.log("warn", "undecodable frame", e);
      this.emit("error", { code: "protocol", message: `could not decode a frame: ${errMessage(e)}`, fatal: false });
      return;
    }
    const ref = frame.ref;
    const body = frame.body;
    switch (body.case) {
      case "welcome":
        return this.onWelcome(body.value);
      case "message":
        return this.onMessage(body.value);
      case "ack": {
        const r = this.requests.get(ref);
        if (r) {
          this.requests.delete(ref);
          r.ack?.(body.value);
        }
        return;
      }
      case "error": {
        const r = ref !== 0n ? this.requests.get(ref) : undefined;
        if (r) {
          this.requests.delete(ref);
          return r.error(body.value, ref);
        }
        const code = wireErrorCode(body.value.code);
        if (this.quietRefs.delete(ref)) return this.log("debug", `refused: ${body.value.message}`);
        const ev: ClientEvents["error"] = { code, message: body.value.message, fatal: false };
        if (ref !== 0n) ev.ref = ref;
        return this.emit("error", ev);
      }
      case "awareness": {
        const r = ref !== 0n ? this.requests.get(ref) : undefined;
        if (r?.awareness) return r.awareness(body.value);
        return this.onAwareness(body.value);
      }
      case "batch": {
        const r = ref !== 0n ? this.requests.get(ref) : undefined;
        if (r?.batch) {
          if (r.batch(body.value)) this.requests.delete(ref);
          return;
        }
        return this.onFanoutBatch(body.value);
      }
      case "summary":
        return this.emit("summary", {
          senders: body.value.senders.map((s) => ({
            from: s.from,
            unread: Number(s.unread),
            firstOffset: s.firstOffset,
            lastOffset: s.lastOffset,
            ...(s.lastMessage ? { last: toInbound(s.lastMessage) } : {}),
          })),
        });
      case "receipt":
        return this.onReceipt(body.value);
      default:
        return; // pong (liveness is lastRx), and kinds a newer server may add
    }
  }

  private remember(key: string): boolean {
    if (this.seen.has(key)) return false;
    this.seen.set(key, true);
    if (this.seen.size > SEEN_LIMIT) this.seen.delete(this.seen.keys().next().value as string);
    return true;
  }

  private onMessage(m: Message): void {
    // Dedupe by (peer, offset): a message stored while the connection was being set up can arrive
    // twice (fan-out and real time), and a live push can repeat what a history page had.
    if (!this.remember(`${m.from}\u0000${m.offset}`)) return;
    const msg = toInbound(m);
    this.emit("message", msg);
    const self = this._me?.user;
    if (msg.partition === "chat" && msg.from !== self && this.opts.autoDeliver !== false && msg.offset > 0n) {
      this.markReceipt({ partition: "chat", peer: msg.from, kind: "delivered", upTo: msg.offset });
    } else if (msg.partition === "notification" && this.opts.autoAck !== false && msg.offset > 0n && msg.to === self) {
      this.markReceipt({ partition: "notification", peer: "", kind: "delivered", upTo: msg.offset });
    }
  }

  private onFanoutBatch(b: Batch): void {
    if (b.partition === Partition.NOTIFICATION) {
      for (const m of b.messages) this.onMessage(m);
      if (this.opts.autoAck !== false && b.nextOffset > 1n) {
        this.markReceipt({ partition: "notification", peer: "", kind: "delivered", upTo: b.nextOffset - 1n });
      }
    } else if (b.partition === Partition.RECEIPT) {
      for (const r of b.receipts) this.onReceipt(r);
      if (this.opts.autoAck !== false && b.nextOffset > 1n) {
        this.markReceipt({ partition: "receipt", peer: "", kind: "delivered", upTo: b.nextOffset - 1n });
      }
    } else {
      for (const m of b.messages) this.onMessage(m);
    }
  }

  private onAwareness(a: Awareness): void {
    const now = Date.now();
    if (a.status === Status.TYPING || a.status === Status.RECORDING) {
      const ttlMs = a.ttlMs > 0 ? a.ttlMs : 5_000;
      return this.emit("typing", {
        from: a.from,
        kind: a.status === Status.TYPING ? "typing" : "recording",
        device: a.device,
        ttlMs,
        until: now + ttlMs,
      });
    }
    if (a.status === Status.RESUME || a.status === Status.UNSPECIFIED || a.from === "") return;
    const intent = intentOf(a.intent) ?? intentOf(a.status);
    const ev: PresenceEvent = {
      user: a.from,
      state: a.status === Status.OFFLINE ? "offline" : "online",
      timestamp: a.timestamp !== 0n ? Number(a.timestamp) : now,
      self: a.from === this._me?.user,
    };
    if (intent) ev.intent = intent;
    if (a.details) ev.details = a.details;
    if (a.lastSeen !== 0n) ev.lastSeen = Number(a.lastSeen);
    if (ev.self) ev.invisible = a.invisible;
    this.emit("presence", ev);
  }

  private onReceipt(r: Receipt): void {
    const kind = r.kind === ReceiptKind.READ ? "read" : "delivered";
    this.emit("receipt", {
      peer: r.from,
      kind,
      upTo: r.upToOffset,
      messageIds: [...r.messageIds],
      timestamp: Number(r.timestamp),
    });
    const touched = new Set<OutgoingMessage>();
    for (const id of r.messageIds) {
      const m = this.recent.get(id) ?? this.outbox.get(id);
      if (m && m.to === r.from) touched.add(m);
    }
    for (const m of this.recent.values()) {
      if (m.to === r.from && m.offset !== undefined && m.offset <= r.upToOffset) touched.add(m);
    }
    for (const m of touched) if (m.advance(kind)) this.emitOutgoing(m);
  }

  // ---------------------------------------------------------------- outbound

  private newRef(): bigint {
    return this.nextRefValue++;
  }

  /** Encodes and writes a frame; false when there is no open socket or the frame is too large. */
  private write(init: FrameInit): boolean {
    const ws = this.ws;
    if (!ws || ws.readyState !== OPEN || !this.codec) return false;
    const data = this.codec.encode(makeFrame(init));
    if (this.maxFrameBytes > 0 && encodedSize(data) > this.maxFrameBytes) {
      throw new BimipError("too_large", `frame of ${encodedSize(data)} bytes exceeds the server's ${this.maxFrameBytes}`);
    }
    try {
      ws.send(data);
    } catch (e) {
      this.log("warn", "socket send failed", e);
      return false;
    }
    return true;
  }

  private request(body: FrameBodyInit, handler: Request): bigint | undefined {
    const ref = this.newRef();
    this.requests.set(ref, handler);
    let ok = false;
    try {
      ok = this.write({ ref, body });
    } catch (e) {
      this.requests.delete(ref);
      throw e;
    }
    if (!ok) {
      this.requests.delete(ref);
      return undefined;
    }
    return ref;
  }

  private flushOutbox(): void {
    if (!this.isConnected()) return;
    for (const m of this.outbox.values()) {
      if (!m.needsSend) continue;
      if (!this.sendOne(m)) return; // the socket went away; the rest waits for the reconnect
    }
  }

  private sendOne(m: OutgoingMessage): boolean {
    let ref: bigint | undefined;
    try {
      ref = this.request(
        {
          case: "message",
          value: { id: m.id, to: m.to, payload: m.payload, partition: m.partition === "notification" ? Partition.NOTIFICATION : Partition.CHAT },
        },
        {
          ack: (a) => this.onSendAck(m, a),
          error: (e, r) => this.onSendError(m, wireErrorCode(e.code), e.message, r),
        },
      );
    } catch (e) {
      const err = e instanceof BimipError ? e : new BimipError("internal", errMessage(e));
      this.failOutgoing(m, err);
      return true;
    }
    if (ref === undefined) return false;
    m.ref = ref;
    m.sentAt = Date.now();
    if (m.advance("sent")) this.emitOutgoing(m);
    this.armAckTimer();
    return true;
  }

  private armAckTimer(): void {
    if (this.timers.has("ack")) return;
    const timeout = this.opts.ackTimeoutMs ?? 10_000;
    const check = () => {
      this.timers.delete("ack");
      if (!this.isConnected()) return;
      let oldest: number | undefined;
      for (const m of this.outbox.values()) if (m.status === "sent" && (oldest === undefined || m.sentAt < oldest)) oldest = m.sentAt;
      if (oldest === undefined) return;
      const waited = Date.now() - oldest;
      if (waited >= timeout) return this.drop(`no Ack within ${timeout} ms`);
      this.setTimer("ack", timeout - waited, check);
    };
    this.setTimer("ack", timeout, check);
  }

  private onSendAck(m: OutgoingMessage, a: Ack): void {
    this.outbox.delete(m.id);
    this.store.remove(m.id).catch((e) => this.log("error", "outbox store remove failed", e));
    m.offset = a.offset;
    m.ref = undefined;
    m.isAcked = true;
    this.recent.set(m.id, m);
    if (this.recent.size > RECENT_LIMIT) this.recent.delete(this.recent.keys().next().value as string);
    const info = { offset: a.offset, timestamp: Number(a.timestamp), duplicate: a.duplicate };
    const advanced = m.advance("acked");
    m.resolve(info);
    this.emit("ack", { id: m.id, to: m.to, ...info });
    if (advanced) this.emitOutgoing(m);
  }

  private onSendError(m: OutgoingMessage, code: ErrorCode, message: string, ref: bigint): void {
    if (code === "unavailable" || code === "rate_limited") {
      // Temporary: the same id is sent again shortly (the server stores it once).
      m.requeue();
      this.log("warn", `send ${m.id} refused (${code}); retrying`, message);
      if (!this.timers.has("sendRetry")) this.setTimer("sendRetry", SEND_RETRY_MS, () => this.flushOutbox());
      return;
    }
    this.failOutgoing(m, new BimipError(code, message, { ref }));
  }

  private failOutgoing(m: OutgoingMessage, err: BimipError): void {
    this.outbox.delete(m.id);
    this.store.remove(m.id).catch((e) => this.log("error", "outbox store remove failed", e));
    m.advance("failed");
    m.reject(err);
    this.emitOutgoing(m, { code: err.code, message: err.message });
    const ev: ClientEvents["error"] = { code: err.code, message: `message ${m.id} to ${m.to}: ${err.message}`, fatal: false };
    if (err.ref !== undefined) ev.ref = err.ref;
    this.emit("error", ev);
  }

  private markReceipt(r: PendingReceipt): void {
    if (typeof r.upTo !== "bigint") r = { ...r, upTo: BigInt(r.upTo as unknown as number) };
    if (!this.receipts.mark(r)) return;
    if (this.isConnected() && !this.timers.has("receipts")) {
      this.setTimer("receipts", this.opts.receiptDelayMs ?? 100, () => this.flushReceipts());
    }
  }

  private flushReceipts(): void {
    this.clearTimer("receipts");
    if (!this.isConnected() || !this.receipts.hasPending) return;
    for (const r of this.receipts.take()) {
      const partition = r.partition === "chat" ? Partition.CHAT : r.partition === "notification" ? Partition.NOTIFICATION : Partition.RECEIPT;
      const ref = this.request(
        {
          case: "receipt",
          value: { to: r.peer, kind: r.kind === "read" ? ReceiptKind.READ : ReceiptKind.DELIVERED, upToOffset: r.upTo, partition },
        },
        {
          ack: () => this.receipts.settle(r),
          error: (e) => {
            this.receipts.settle(r);
            this.emit("error", { code: wireErrorCode(e.code), message: `receipt to ${r.peer || r.partition}: ${e.message}`, fatal: false });
          },
        },
      );
      if (ref === undefined) break; // requeued on the close that follows
    }
  }

  private subscribe(users: string[], unsubscribe: boolean, waiters: Op["waiters"]): void {
    const ref = this.request(
      { case: "subscribe", value: { users, unsubscribe } },
      {
        awareness: (a) => this.onAwareness(a),
        lost: () => {
          if (unsubscribe) for (const w of waiters) w.resolve();
          else this.watchWaiters.push(...waiters);
        },
        ack: () => {
          for (const w of waiters) w.resolve();
        },
        error: (e, r) => {
          const err = new BimipError(wireErrorCode(e.code), e.message, { ref: r });
          this.emit("error", { code: err.code, message: e.message, ref: r, fatal: false });
          for (const w of waiters) w.reject(err);
        },
      },
    );
    // Not sent: the reconnect replays the watch list.
    if (ref === undefined && !unsubscribe) this.watchWaiters.push(...waiters);
    else if (ref === undefined) for (const w of waiters) w.resolve();
  }

  private sendIntent(): void {
    const op = this.intentOp;
    if (!op) return;
    this.sendOp(op, () => {
      if (this.intentOp === op) this.intentOp = undefined;
    });
  }

  /** Sends an op's frames; the waiters settle on the last frame's answer. */
  private sendOp(op: Op, done: () => void): void {
    const frames = op.frames();
    frames.forEach((body, i) => {
      const last = i === frames.length - 1;
      const ref = this.request(body, {
        ack: () => {
          if (!last) return;
          done();
          for (const w of op.waiters) w.resolve();
        },
        error: (e, r) => {
          done();
          for (const w of op.waiters) w.reject(new BimipError(wireErrorCode(e.code), e.message, { ref: r }));
        },
      });
      if (ref === undefined) return; // left for the next connection
    });
  }

  private sendHistory(h: HistoryRequest): void {
    if (h.cancelled) return;
    const ref = this.request(
      { case: "awareness", value: { status: Status.RESUME, to: h.peer, fromOffset: h.from, limit: h.limit } },
      {
        batch: (b) => {
          if (h.cancelled) return !b.more;
          const page = b.messages.map((m) => {
            this.remember(`${m.from}\u0000${m.offset}`);
            return toInbound(m);
          });
          if (b.nextOffset > 0n) h.from = b.nextOffset;
          if (page.length > 0) h.queue.push(page);
          if (!b.more) {
            this.histories.delete(h);
            h.queue.end();
          }
          return !b.more;
        },
        error: (e, r) => {
          this.histories.delete(h);
          h.queue.fail(new BimipError(wireErrorCode(e.code), e.message, { ref: r }));
        },
      },
    );
    if (ref === undefined) this.log("debug", "history request waits for the next connection");
  }

  // ---------------------------------------------------------------- helpers

  private emit<K extends keyof ClientEvents>(type: K, e: ClientEvents[K]): void {
    this.emitter.emit(type, e);
  }

  private emitOutgoing(m: OutgoingMessage, error?: { code: ErrorCode; message: string }): void {
    const ev: ClientEvents["outgoing"] = { id: m.id, to: m.to, status: m.status };
    if (m.offset !== undefined) ev.offset = m.offset;
    if (error) ev.error = error;
    this.emit("outgoing", ev);
  }

  private setState(ev: StateEvent): void {
    this._state = ev.state;
    this.emit("state", ev);
  }

  private setTimer(name: string, ms: number, fn: () => void): void {
    this.clearTimer(name);
    this.timers.set(
      name,
      setTimeout(() => {
        this.timers.delete(name);
        fn();
      }, ms),
    );
  }

  private clearTimer(name: string): void {
    const t = this.timers.get(name);
    if (t !== undefined) {
      clearTimeout(t);
      this.timers.delete(name);
    }
  }

  private log(level: LogLevel, msg: string, data?: unknown): void {
    this.opts.logger?.(level, msg, data);
  }
}

function detach(ws: WebSocketLike): void {
  const noop = () => {};
  ws.onopen = noop;
  ws.onmessage = noop;
  ws.onclose = noop;
  ws.onerror = noop; // never null: `ws` throws on an unhandled error event
}

/**
 * Marks a promise as handled so an app that ignores it never gets an unhandled rejection (the same
 * failure is also an `error` event or a state change); callers that await it still see the rejection.
 */
function handled<T>(p: Promise<T>): Promise<T> {
  p.catch(() => {});
  return p;
}

function errMessage(e: unknown): string {
  return e instanceof Error ? e.message : String(e);
}
