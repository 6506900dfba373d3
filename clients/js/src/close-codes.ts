// What the client does after the server (or the network) closed the socket.
//
// Application codes: 4000–4499 = refresh the token, then reconnect at once; 4500–4999 = stop.
// 4001 token expired, 4501 revoked, 4502 kicked. Older servers sent 1008 with a reason text for
// all three; those reasons are still understood.

import type { ErrorCode } from "./types.js";

export type CloseAction =
  /** Reconnect after a delay: the normal backoff, the maximum backoff, or at once. */
  | { kind: "reconnect"; delay: "backoff" | "max" | "now" }
  /** Get a fresh token (the server said the current one is no longer good), then reconnect at once. */
  | { kind: "refresh" }
  /** Do not reconnect: the session is over. */
  | { kind: "fatal"; error: ErrorCode; message: string };

export function classifyClose(code: number, reason: string): CloseAction {
  if (code >= 4000 && code <= 4499) return { kind: "refresh" };
  if (code >= 4500 && code <= 4999) {
    const error: ErrorCode = code === 4501 ? "revoked" : code === 4502 ? "kicked" : "closed";
    return { kind: "fatal", error, message: reason || `closed by the server (${code})` };
  }
  switch (code) {
    case 1008: {
      const r = reason.toLowerCase();
      if (r.includes("token expired")) return { kind: "refresh" };
      if (r.includes("revoked")) return { kind: "fatal", error: "revoked", message: reason };
      if (r.includes("kicked")) return { kind: "fatal", error: "kicked", message: reason };
      // "rate limit" and any other policy close: wait the longest.
      return { kind: "reconnect", delay: "max" };
    }
    case 1013: // slow consumer: nothing is lost; reconnect now and catch up (summary, history)
      return { kind: "reconnect", delay: "now" };
    default: // 1000, 1001 (shutdown, heartbeat timeout), 1006, 1009, 1011, 1012, …
      return { kind: "reconnect", delay: "backoff" };
  }
}
