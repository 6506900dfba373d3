// One signed-in user: the client connection, the HTTP calls, and the state the UI draws.
// The UI re-renders on every change (`onChange`); the state is small enough for that.

import { BimipClient } from "../../src/index.ts";
import type { ConnState, Format, Intent } from "../../src/index.ts";
import { Api, devToken, HttpError, type Presence, type StoredMessage } from "./api.ts";

export type Tick = "queued" | "sent" | "acked" | "delivered" | "read" | "failed";
const RANK: Record<Tick, number> = { failed: 0, queued: 1, sent: 2, acked: 3, delivered: 4, read: 5 };

export interface ChatMessage {
  id: string;
  from: string;
  to: string;
  text: string;
  timestamp: number;
  /** Own messages: the offset in the peer's queue (from the Ack); others: in ours. */
  offset?: bigint;
  /** The offset in our queue, when known: orders messages with the same timestamp. */
  seq?: bigint;
  status?: Tick;
}

export interface Contact {
  user: string;
  presence: Presence;
  lastSeen?: number;
  details?: string;
  unread: number;
  typingUntil: number;
  preview?: string;
}

interface Conversation {
  messages: ChatMessage[];
  keys: Set<string>;
  /** Highest offset (in our queue) of a message from the peer. */
  lastIncoming: bigint;
  readUpTo: bigint;
  /** Oldest offset (in our queue) of the history pages loaded so far; 0 before the first. */
  oldest: bigint;
  /** Older messages exist before `oldest`. */
  more: boolean;
}

export interface SavedSession {
  user: string;
  token: string;
  format: Format;
}

const SESSION_KEY = "bimip.demo.session";

export function loadSaved(): SavedSession | undefined {
  try {
    const s = JSON.parse(sessionStorage.getItem(SESSION_KEY) ?? "null");
    return s && typeof s.user === "string" && typeof s.token === "string" ? s : undefined;
  } catch {
    return undefined;
  }
}

/** A stable device id per user and browser (cursors are kept per device). */
function deviceFor(user: string): string {
  const key = `bimip.demo.device.${user}`;
  let d = localStorage.getItem(key);
  if (!d) {
    d = "web-" + crypto.randomUUID().slice(0, 8);
    localStorage.setItem(key, d);
  }
  return d;
}

export async function signIn(user: string, format: Format): Promise<SavedSession> {
  const t = await devToken(user, deviceFor(user));
  const s: SavedSession = { user: t.user, token: t.token, format };
  sessionStorage.setItem(SESSION_KEY, JSON.stringify(s));
  return s;
}

export function forget(): void {
  sessionStorage.removeItem(SESSION_KEY);
}

const keyOf = (m: { from: string; id: string }) => `${m.from}\n${m.id}`;

export class Session {
  readonly me: string;
  readonly client: BimipClient;
  readonly api: Api;
  conn: { state: ConnState; retryAt?: number; reason?: string } = { state: "idle" };
  intent: Exclude<Presence, "offline"> = "online";
  invisible = false;
  contacts = new Map<string, Contact>();
  open?: string;
  error?: string;
  private convs = new Map<string, Conversation>();
  private listeners = new Set<() => void>();
  private offs: Array<() => void> = [];
  private typingTimer?: ReturnType<typeof setTimeout>;

  constructor(private saved: SavedSession) {
    this.me = saved.user;
    this.api = new Api(saved.user, () => this.saved.token);
    const proto = location.protocol === "https:" ? "wss:" : "ws:";
    this.client = new BimipClient({
      url: `${proto}//${location.host}/ws`,
      token: saved.token,
      getToken: () => this.refreshToken(),
      device: deviceFor(saved.user),
      format: saved.format,
      // warnings (dropped links, refused sends) to the console; errors are bugs
      logger: (level, msg, data) => {
        if (level === "error") console.error("bimip:", msg, data);
        else if (level === "warn") console.warn("bimip:", msg, data ?? "");
      },
    });
    this.wire();
  }

  onChange(fn: () => void): () => void {
    this.listeners.add(fn);
    return () => this.listeners.delete(fn);
  }

  private changed(): void {
    for (const fn of this.listeners) fn();
  }

  private fail(e: unknown): void {
    this.error = e instanceof Error ? e.message : String(e);
    this.changed();
  }

  private async refreshToken(): Promise<string | null> {
    try {
      const s = await signIn(this.me, this.saved.format);
      this.saved = s;
      return s.token;
    } catch (e) {
      // Refused (no --dev, or not from this machine): signed out for good. A network failure
      // (the server is down) is thrown on, and the client tries again with backoff.
      if (e instanceof HttpError && e.status >= 400 && e.status < 500) return null;
      throw e;
    }
  }

  async start(): Promise<void> {
    this.client.connect().catch((e: unknown) => this.fail(e));
    try {
      const [contacts, mine] = await Promise.all([
        this.api.contacts(),
        this.api.myPresence().catch(() => undefined),
      ]);
      for (const c of contacts) Object.assign(this.contact(c.user), c);
      if (mine) {
        this.intent = mine.intent === "offline" ? "online" : mine.intent;
        this.invisible = mine.invisible;
      }
      if (contacts.length) this.client.watch(contacts.map((c) => c.user)).catch((e) => this.fail(e));
      this.changed();
    } catch (e) {
      this.fail(e);
    }
  }

  async stop(): Promise<void> {
    for (const off of this.offs) off();
    clearTimeout(this.typingTimer);
    await this.client.close();
  }

  // ---- client events -------------------------------------------------------------------

  private wire(): void {
    const c = this.client;
    this.offs.push(
      c.on("state", (e) => {
        this.conn = {
          state: e.state,
          retryAt: e.retryInMs !== undefined ? Date.now() + e.retryInMs : undefined,
          reason: e.reason,
        };
        this.changed();
      }),
      c.on("welcome", () => {
        // After a reconnect, catch up on the open chat (messages that came while we were away
        // arrive through the summary too; this also covers our own sends from other tabs).
        if (this.open) this.loadHistory(this.open);
      }),
      c.on("presence", (p) => {
        if (p.self || p.user === this.me) {
          // our own status, changed in another tab or device
          this.intent = p.intent ?? "online";
          if (p.invisible !== undefined) this.invisible = p.invisible;
          this.changed();
          return;
        }
        const k = this.contacts.get(p.user);
        if (!k) return;
        k.presence = p.state === "offline" ? "offline" : (p.intent ?? "online");
        k.lastSeen = p.lastSeen;
        k.details = p.details;
        this.changed();
      }),
      c.on("typing", (t) => {
        const k = this.contacts.get(t.from);
        if (!k) return;
        k.typingUntil = t.until;
        this.changed();
        this.scheduleTypingExpiry();
      }),
      c.on("message", (m) => {
        const text = safeText(m);
        const msg: ChatMessage = { id: m.id, from: m.from, to: m.to, text, timestamp: Number(m.timestamp) };
        if (m.from === this.me) {
          // our own message, sent from another tab or device
          this.ingest(m.to, [{ ...msg, status: "acked" }], false);
        } else {
          this.ingest(m.from, [{ ...msg, offset: m.offset, seq: m.offset }], true);
          this.contact(m.from).typingUntil = 0;
        }
        this.changed();
      }),
      c.on("summary", ({ senders }) => {
        for (const s of senders) this.catchUp(s.from, s.firstOffset);
      }),
      c.on("receipt", (r) => {
        const conv = this.convs.get(r.peer);
        if (!conv) return;
        const ids = new Set(r.messageIds);
        const tick: Tick = r.kind === "read" ? "read" : "delivered";
        for (const m of conv.messages) {
          if (m.from !== this.me) continue;
          if (ids.has(m.id) || (m.offset !== undefined && m.offset <= r.upTo)) raise(m, tick);
        }
        this.changed();
      }),
      c.on("outgoing", (o) => {
        for (const conv of this.convs.values()) {
          const m = conv.messages.find((x) => x.from === this.me && x.id === o.id);
          if (m) {
            if (o.offset !== undefined) m.offset = o.offset;
            raise(m, o.status);
          }
        }
        this.changed();
      }),
      c.on("error", (e) => {
        if (e.fatal) this.fail(new Error(e.message));
      }),
    );
  }

  private scheduleTypingExpiry(): void {
    clearTimeout(this.typingTimer);
    const next = Math.min(
      ...[...this.contacts.values()].map((k) => k.typingUntil).filter((t) => t > Date.now()),
    );
    if (Number.isFinite(next)) {
      this.typingTimer = setTimeout(() => {
        this.changed();
        this.scheduleTypingExpiry();
      }, next - Date.now() + 20);
    }
  }

  // ---- state helpers -------------------------------------------------------------------

  contact(user: string): Contact {
    let k = this.contacts.get(user);
    if (!k) {
      k = { user, presence: "offline", unread: 0, typingUntil: 0 };
      this.contacts.set(user, k);
    }
    return k;
  }

  conversation(peer: string): Conversation {
    let c = this.convs.get(peer);
    if (!c) {
      c = { messages: [], keys: new Set(), lastIncoming: 0n, readUpTo: 0n, oldest: 0n, more: false };
      this.convs.set(peer, c);
    }
    return c;
  }

  messages(peer: string): readonly ChatMessage[] {
    return this.convs.get(peer)?.messages ?? [];
  }

  /**
   * Adds messages of the conversation with `peer`, skipping any already shown (a live push can
   * overlap a history page). New messages from the peer count as unread when `countUnread`.
   */
  private ingest(peer: string, msgs: ChatMessage[], countUnread: boolean): void {
    const conv = this.conversation(peer);
    const k = this.contact(peer);
    let added = false;
    for (const m of msgs) {
      const key = keyOf(m);
      if (conv.keys.has(key)) continue;
      conv.keys.add(key);
      conv.messages.push(m);
      added = true;
      if (m.from === peer && m.offset !== undefined) {
        if (m.offset > conv.lastIncoming) conv.lastIncoming = m.offset;
        if (countUnread && m.offset > conv.readUpTo) k.unread++;
      }
    }
    if (!added) return;
    conv.messages.sort(
      (a, b) =>
        a.timestamp - b.timestamp ||
        (a.seq !== undefined && b.seq !== undefined ? (a.seq < b.seq ? -1 : a.seq > b.seq ? 1 : 0) : 0),
    );
    const last = conv.messages[conv.messages.length - 1];
    k.preview = last ? (last.from === this.me ? "You: " : "") + last.text : undefined;
    if (conv.lastIncoming > 0n) this.client.markDelivered(peer, conv.lastIncoming);
    this.markReadIfOpen(peer);
  }

  private fromStore(peer: string, list: StoredMessage[]): ChatMessage[] {
    return list.map((m) => ({
      id: m.id,
      from: m.from,
      to: m.to,
      text: m.text,
      timestamp: m.timestamp,
      // receipts for our own messages refer to offsets in the peer's queue
      offset: m.from === this.me ? m.peerOffset : m.offset,
      seq: m.offset,
      status: m.from === this.me ? ("acked" as Tick) : undefined,
    }));
  }

  /** Fetches what the summary says is waiting from `peer`; it counts as unread. */
  private async catchUp(peer: string, from: bigint): Promise<void> {
    try {
      const { list } = await this.api.messages(peer, { fromOffset: from, limit: 1000, order: "asc" });
      this.ingest(peer, this.fromStore(peer, list), true);
      this.changed();
    } catch (e) {
      this.fail(e);
    }
  }

  /** The newest page of the conversation (`older`: the page before the oldest one loaded). */
  async loadHistory(peer: string, older = false): Promise<void> {
    const conv = this.conversation(peer);
    if (older && conv.oldest <= 1n) return;
    try {
      const { list, more } = await this.api.messages(peer, {
        limit: 50,
        order: "desc",
        fromOffset: older ? conv.oldest - 1n : undefined,
      });
      this.ingest(peer, this.fromStore(peer, list), false);
      const first = list[0];
      if (first && (conv.oldest === 0n || first.offset < conv.oldest)) {
        conv.oldest = first.offset;
        conv.more = more;
      }
      this.changed();
    } catch (e) {
      this.fail(e);
    }
  }

  hasOlder(peer: string): boolean {
    return this.convs.get(peer)?.more ?? false;
  }

  private markReadIfOpen(peer: string): void {
    const conv = this.convs.get(peer);
    if (this.open !== peer || document.visibilityState !== "visible" || !conv) return;
    if (conv.lastIncoming > conv.readUpTo) {
      conv.readUpTo = conv.lastIncoming;
      this.client.markRead(peer, conv.lastIncoming);
    }
    this.contact(peer).unread = 0;
  }

  // ---- user actions --------------------------------------------------------------------

  openChat(peer: string | undefined): void {
    this.open = peer;
    if (peer) {
      this.markReadIfOpen(peer);
      this.loadHistory(peer);
    }
    this.changed();
  }

  pageVisible(): void {
    if (this.open) this.markReadIfOpen(this.open);
    this.changed();
  }

  send(peer: string, text: string): void {
    const out = this.client.send(peer, text);
    const msg: ChatMessage = {
      id: out.id,
      from: this.me,
      to: peer,
      text,
      timestamp: Date.now(),
      status: out.status,
    };
    this.ingest(peer, [msg], false);
    this.changed();
  }

  typing(peer: string): void {
    this.client.typing(peer);
  }

  retryNow(): void {
    this.client.reconnectNow();
  }

  setStatus(intent: Exclude<Presence, "offline">, invisible: boolean): void {
    this.intent = intent;
    this.invisible = invisible;
    this.client.setIntent(intent as Intent, { invisible }).catch((e) => this.fail(e));
    this.changed();
  }

  async addContact(user: string): Promise<void> {
    try {
      await this.api.addContact(user);
      this.contact(user);
      await this.client.watch([user]);
      this.error = undefined;
      this.changed();
    } catch (e) {
      this.fail(e);
    }
  }

  dismissError(): void {
    this.error = undefined;
    this.changed();
  }
}

function raise(m: ChatMessage, to: Tick): void {
  // a status only moves forward; "failed" only replaces "not yet stored"
  const failedEarly = to === "failed" && (m.status === "queued" || m.status === "sent");
  if (!m.status || RANK[to] > RANK[m.status] || failedEarly) m.status = to;
}

function safeText(m: { payload: Uint8Array; text?: () => string }): string {
  try {
    return typeof m.text === "function" ? m.text() : new TextDecoder().decode(m.payload);
  } catch {
    return "(binary message)";
  }
}
