// Public types of bimip-client. Generated protobuf types never appear here: events carry plain objects.

/** Wire format: `"binary"` is the `bimip.v1` subprotocol, `"json"` is `bimip.v1.json`. */
export type Format = "binary" | "json";

/**
 * Connection state.
 * - `idle`: created, `connect()` not called yet.
 * - `connecting`: the first connection of a session is being opened.
 * - `connected`: a `Welcome` arrived on the current socket.
 * - `reconnecting`: the link was lost; a new socket is opened after `retryInMs`.
 * - `closed`: `close()` was called or the server ended the session for good (kick, revoke, no token).
 */
export type ConnState = "idle" | "connecting" | "connected" | "reconnecting" | "closed";

/** A user's intent. `online` means none (plain online); `setIntent("online")` clears a stored intent. */
export type Intent = "online" | "away" | "busy" | "dnd";

/** An offset in a user's queue: an exact uint64, as protobuf-es decodes it. */
export type Offset = bigint;

export type TokenReason = "initial" | "expiring" | "expired" | "rejected";

export interface ReconnectOptions {
  /** Base delay of the full-jitter exponential backoff (ms). Default 500. */
  minMs?: number;
  /** Cap of the backoff (ms); also the delay after a `1008 rate limit` close. Default 30000. */
  maxMs?: number;
  /** The backoff restarts from `minMs` only after a link stayed up this long (ms). Default 10000. */
  stableMs?: number;
}

/** The part of the WebSocket interface the client uses (browsers' `WebSocket`, Node 22's, or `ws`). */
export interface WebSocketLike {
  binaryType: string;
  readonly readyState: number;
  readonly protocol: string;
  send(data: string | ArrayBufferLike | ArrayBufferView): void;
  close(code?: number, reason?: string): void;
  onopen: ((ev: any) => void) | null;
  onclose: ((ev: { code: number; reason: string; wasClean?: boolean }) => void) | null;
  onerror: ((ev: any) => void) | null;
  onmessage: ((ev: { data: unknown }) => void) | null;
}

export type WebSocketConstructor = new (url: string, protocols?: string | string[]) => WebSocketLike;

export type LogLevel = "debug" | "warn" | "error";

export interface ClientOptions {
  /** `ws://host:port/ws` or `wss://…/ws` (`http(s)://` is turned into `ws(s)://`). The client adds `token` and `device`. */
  url: string;
  /** A token to start with. Without `getToken` it is the only token: once it expires the session ends. */
  token?: string;
  /**
   * Called for a new token: at the first connect when `token` is missing, 60 s before the current one
   * expires, after a 4000–4499 close and when upgrades keep failing. Calls are single-flight: concurrent
   * needs share one promise. Resolve `null` for "logged out" (the client closes for good); throw for a
   * temporary failure (the client retries with backoff).
   */
  getToken?: (ctx: { reason: TokenReason }) => Promise<string | null>;
  /** Ask `getToken` for a new token this long before the current one's `exp` (ms). Default 60000. */
  refreshTokenBeforeMs?: number;
  /** Device id (keep one per installation). Default: the id the server gives in `Welcome`, reused on reconnects. */
  device?: string;
  /** Default `"binary"`. */
  format?: Format;
  /** WebSocket constructor: required on Node 20 (pass `WebSocket` from the `ws` package). Default `globalThis.WebSocket`. */
  WebSocket?: new (url: string, protocols?: string | string[]) => any;
  /** `false`: never reconnect (the first loss closes the client). */
  reconnect?: false | ReconnectOptions;
  /** How long to wait for the socket to open and the `Welcome` to arrive (ms). Default 10000. */
  connectTimeoutMs?: number;
  /** A send without an `Ack` for this long (ms) on an open link counts as a dead link: reconnect and resend. Default 10000. */
  ackTimeoutMs?: number;
  /** Where unacknowledged messages wait. Default: in memory (lost on reload). */
  outbox?: OutboxStore;
  /** At most one TYPING/RECORDING per peer and kind in this interval (ms). Default 3000. */
  typingThrottleMs?: number;
  /** Receipts are coalesced for this long (ms) before being sent. Default 100. */
  receiptDelayMs?: number;
  /** Send a DELIVERED receipt for every chat message received. Default true. */
  autoDeliver?: boolean;
  /** Acknowledge notifications and queued receipts once they were emitted. Default true. */
  autoAck?: boolean;
  /** Listen to the browser's `online` and `visibilitychange` events. Default true where they exist. */
  networkEvents?: boolean;
  logger?: (level: LogLevel, msg: string, data?: unknown) => void;
}

export interface InboundMessage {
  id: string;
  from: string;
  to: string;
  /** The message's offset in this user's own queue (use it for receipts and `history({from})`). */
  offset: Offset;
  /** Unix ms when the server stored it. */
  timestamp: number;
  partition: "chat" | "notification";
  payload: Uint8Array;
  /** The device that sent it. */
  device: string;
  /** true when this user already acknowledged it (RESUME pages). */
  acknowledged: boolean;
  /** The payload decoded as UTF-8. */
  text(): string;
}

export type OutgoingStatus = "queued" | "sent" | "acked" | "delivered" | "read" | "failed";

export interface AckInfo {
  offset: Offset;
  timestamp: number;
  duplicate: boolean;
}

/** A message handed to `send()`. Its status only moves forward. */
export interface Outgoing {
  readonly id: string;
  readonly to: string;
  readonly payload: Uint8Array;
  readonly partition: "chat" | "notification";
  /** Unix ms when `send()` was called. */
  readonly createdAt: number;
  readonly status: OutgoingStatus;
  /** Offset in the recipient's queue, once acknowledged. */
  readonly offset?: Offset;
  /** Resolves on the server's `Ack`; rejects when the server refuses the message or the client is closed first. */
  readonly acked: Promise<AckInfo>;
}

/** What an `OutboxStore` keeps: plain data. */
export interface OutboxRecord {
  id: string;
  to: string;
  payload: Uint8Array;
  partition: "chat" | "notification";
  createdAt: number;
}

/** Storage for unacknowledged messages, e.g. IndexedDB so they survive a page reload. */
export interface OutboxStore {
  load(): Promise<OutboxRecord[]>;
  put(m: OutboxRecord): Promise<void>;
  remove(id: string): Promise<void>;
}

export interface WelcomeEvent {
  user: string;
  device: string;
  session: string;
  serverTime: number;
  heartbeatMs: number;
  maxFrameBytes: number;
  node: string;
}

export interface StateEvent {
  state: ConnState;
  /** Failed attempts since the last stable link. */
  attempt: number;
  /** When reconnecting: the delay before the next attempt. */
  retryInMs?: number;
  /** The close code that caused this change, if any. */
  code?: number;
  reason?: string;
}

export interface PresenceEvent {
  user: string;
  state: "online" | "offline";
  /** Set when the user chose away/busy/dnd (also while offline). */
  intent?: Exclude<Intent, "online">;
  details?: string;
  /** Unix ms the user was last connected (offline only). */
  lastSeen?: number;
  /** Unix ms of the change. */
  timestamp: number;
  /** true when this is the current user's own intent, changed from another device. */
  self: boolean;
  /** Own devices only: the current user is invisible. */
  invisible?: boolean;
}

export interface TypingEvent {
  from: string;
  kind: "typing" | "recording";
  device: string;
  ttlMs: number;
  /** Unix ms (local clock) when the indicator should disappear. */
  until: number;
}

export interface ReceiptEvent {
  /** The user who received or read the messages. */
  peer: string;
  kind: "delivered" | "read";
  /** Offset in the peer's queue, as in the `Ack`s of the messages sent to them. */
  upTo: Offset;
  messageIds: string[];
  timestamp: number;
}

export interface SenderSummary {
  from: string;
  unread: number;
  firstOffset: Offset;
  lastOffset: Offset;
  last?: InboundMessage;
}

export interface SummaryEvent {
  senders: SenderSummary[];
}

export type ErrorCode =
  | "bad_request"
  | "unauthorized"
  | "forbidden"
  | "not_found"
  | "rate_limited"
  | "too_large"
  | "unavailable"
  | "internal"
  | "unknown"
  // Client-side and close-code errors:
  | "token_expired"
  | "revoked"
  | "kicked"
  | "logged_out"
  | "closed"
  | "protocol";

export interface ErrorEvent {
  code: ErrorCode;
  message: string;
  /** The `ref` of the request the server refused. */
  ref?: bigint;
  /** true: the client is closed and will not reconnect. */
  fatal: boolean;
  /** The WebSocket close code behind the error, if any. */
  closeCode?: number;
}

export interface OutgoingEvent {
  id: string;
  to: string;
  status: OutgoingStatus;
  offset?: Offset;
  error?: { code: ErrorCode; message: string };
}

export interface AckEvent extends AckInfo {
  id: string;
  to: string;
}

export interface ClientEvents {
  state: StateEvent;
  welcome: WelcomeEvent;
  message: InboundMessage;
  presence: PresenceEvent;
  typing: TypingEvent;
  receipt: ReceiptEvent;
  summary: SummaryEvent;
  error: ErrorEvent;
  /** Every status change of a message sent by this client. */
  outgoing: OutgoingEvent;
  /** A message sent by this client was stored by the server. */
  ack: AckEvent;
}

export type AnyClientEvent = {
  [K in keyof ClientEvents]: { type: K } & ClientEvents[K];
}[keyof ClientEvents];
