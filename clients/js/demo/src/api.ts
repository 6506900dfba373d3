// The HTTP routes the demo calls with fetch (the client package speaks only the WebSocket).
// Every call but devToken carries the signed-in user's JWT.

export interface DevToken {
  token: string;
  user: string;
  expires_at: number;
}

export type Presence = "online" | "away" | "busy" | "dnd" | "offline";

export interface ContactInfo {
  user: string;
  presence: Presence;
  lastSeen?: number;
  details?: string;
}

export interface StoredMessage {
  /** Offset in this user's queue. */
  offset: bigint;
  /** Own sent copies: the offset in the recipient's queue (what receipts refer to). */
  peerOffset?: bigint;
  id: string;
  from: string;
  to: string;
  timestamp: number;
  text: string;
}

/** A refusal by the server (as opposed to a network failure, which fetch throws as TypeError). */
export class HttpError extends Error {
  constructor(
    message: string,
    readonly status: number,
  ) {
    super(message);
  }
}

async function call<T>(method: string, path: string, token?: string, body?: unknown): Promise<T> {
  const headers: Record<string, string> = {};
  if (token) headers.authorization = `Bearer ${token}`;
  if (body !== undefined) headers["content-type"] = "application/json";
  const res = await fetch(path, {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await res.text();
  let json: any = undefined;
  try {
    json = text ? JSON.parse(text) : undefined;
  } catch {
    // not JSON: reported below with the status
  }
  if (!res.ok) {
    const msg = json?.error?.message ?? (text || res.statusText);
    throw new HttpError(`${method} ${path}: ${res.status} ${msg}`, res.status);
  }
  return json as T;
}

/** Mints a token in `--dev` mode (loopback only). */
export function devToken(user: string, device: string): Promise<DevToken> {
  return call<DevToken>("POST", "/dev/token", undefined, { user, device });
}

/** Maps the server's presence words (or wire Status names) to a dot colour. */
export function presenceOf(online: unknown, status: unknown): Presence {
  const s = String(status ?? "").toLowerCase().replace(/^status_/, "");
  if (online === false || s === "offline") return "offline";
  if (s === "away" || s === "busy" || s === "dnd") return s;
  return online === true || s === "online" ? "online" : "offline";
}

const u = encodeURIComponent;

export class Api {
  constructor(
    readonly user: string,
    private token: () => string,
  ) {}

  async contacts(): Promise<ContactInfo[]> {
    const r = await call<any>("GET", `/v1/users/${u(this.user)}/contacts`, this.token());
    const list: any[] = Array.isArray(r) ? r : (r?.contacts ?? []);
    return list.map((c) => {
      if (typeof c === "string") return { user: c, presence: "offline" as Presence };
      const p = c.presence ?? c;
      return {
        user: String(c.contact ?? c.user),
        presence: presenceOf(p.online, p.intent ?? p.status),
        lastSeen: Number(p.last_seen) || undefined,
        details: p.details || undefined,
      };
    });
  }

  addContact(contact: string): Promise<unknown> {
    return call("PUT", `/v1/users/${u(this.user)}/contacts/${u(contact)}`, this.token(), {});
  }

  /**
   * One page of the stored conversation with `contact`, both directions, sorted oldest first;
   * `more` when the page stopped at `limit`. `order: "desc"` pages backwards from `fromOffset`
   * (default: the newest).
   */
  async messages(
    contact: string,
    o: { fromOffset?: bigint; limit?: number; order?: "asc" | "desc" } = {},
  ): Promise<{ list: StoredMessage[]; more: boolean }> {
    const q = new URLSearchParams({ contact, partition: "chat", limit: String(o.limit ?? 50) });
    if (o.fromOffset !== undefined) q.set("from_offset", String(o.fromOffset));
    if (o.order) q.set("order", o.order);
    const r = await call<any>("GET", `/v1/users/${u(this.user)}/messages?${q}`, this.token());
    const list: StoredMessage[] = (r?.messages ?? []).map((m: any) => ({
      offset: BigInt(m.offset),
      peerOffset: m.peer_offset ? BigInt(m.peer_offset) : undefined,
      id: String(m.id),
      from: String(m.from),
      to: String(m.to),
      timestamp: Number(m.timestamp),
      text: typeof m.text === "string" ? m.text : decodeBase64(m.payload ?? ""),
    }));
    list.sort((a, b) => (a.offset < b.offset ? -1 : a.offset > b.offset ? 1 : 0));
    return { list, more: r?.next_offset != null };
  }

  /** The user's own stored intent and invisibility. */
  async myPresence(): Promise<{ intent: Presence; invisible: boolean }> {
    const r = await call<any>(
      "GET",
      `/v1/users/${u(this.user)}/presence?include_invisible=true`,
      this.token(),
    );
    const intent = presenceOf(true, r?.intent ?? "online");
    return { intent, invisible: r?.invisible === true };
  }
}

function decodeBase64(b64: string): string {
  try {
    const bin = atob(b64);
    const bytes = Uint8Array.from(bin, (c) => c.charCodeAt(0));
    return new TextDecoder().decode(bytes);
  } catch {
    return "";
  }
}
