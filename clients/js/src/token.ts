// Token helpers: the `exp` claim (read without checking the signature: only the server can do
// that) and a single-flight wrapper around the app's `getToken`.

import type { TokenReason } from "./types.js";

function base64UrlDecode(s: string): string {
  const b64 = s.replace(/-/g, "+").replace(/_/g, "/");
  const padded = b64 + "===".slice((b64.length + 3) % 4);
  const bin = atob(padded);
  const bytes = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
  return new TextDecoder().decode(bytes);
}

/** The token's `exp` in unix ms, or undefined when the token is not a JWT with a numeric `exp`. */
export function tokenExpiry(token: string): number | undefined {
  const parts = token.split(".");
  if (parts.length !== 3) return undefined;
  try {
    const claims: unknown = JSON.parse(base64UrlDecode(parts[1]!));
    if (claims && typeof claims === "object" && "exp" in claims) {
      const exp = (claims as { exp: unknown }).exp;
      if (typeof exp === "number" && Number.isFinite(exp)) return exp * 1000;
    }
  } catch {
    // not a JWT we can read: treat as "expiry unknown"
  }
  return undefined;
}

/**
 * One `getToken` call at a time. Concurrent callers share the promise. `reset()` (the session ended)
 * detaches a pending call: its result is dropped and the next caller starts a fresh one.
 */
export class SingleFlight {
  private pending: Promise<string | null> | undefined;
  private epoch = 0;

  constructor(private readonly fetch: (ctx: { reason: TokenReason }) => Promise<string | null>) {}

  get inFlight(): boolean {
    return this.pending !== undefined;
  }

  get(reason: TokenReason): Promise<string | null> {
    if (this.pending) return this.pending;
    const epoch = this.epoch;
    const stale = () => epoch !== this.epoch;
    const p: Promise<string | null> = (async () => this.fetch({ reason }))()
      .then(
        (t) => {
          if (stale()) throw new StaleTokenError();
          return t;
        },
        (e: unknown) => {
          throw stale() ? new StaleTokenError() : e;
        },
      )
      .finally(() => {
        if (this.pending === p) this.pending = undefined;
      });
    this.pending = p;
    p.catch(() => {}); // callers handle it; never an unhandled rejection
    return p;
  }

  reset(): void {
    this.epoch++;
    this.pending = undefined;
  }
}

/** A token arrived for a session that has ended. */
export class StaleTokenError extends Error {
  constructor() {
    super("token request outlived its session");
    this.name = "StaleTokenError";
  }
}
