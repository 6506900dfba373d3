import { ErrorCode as WireErrorCode } from "./gen/bimip/v1/bimip_pb.js";
import type { ErrorCode } from "./types.js";

/** An error from the server (an `Error` frame or a close code) or from the client itself. */
export class BimipError extends Error {
  readonly code: ErrorCode;
  readonly ref?: bigint;
  readonly closeCode?: number;
  readonly fatal: boolean;

  constructor(code: ErrorCode, message: string, o: { ref?: bigint; closeCode?: number; fatal?: boolean } = {}) {
    super(message);
    this.name = "BimipError";
    this.code = code;
    this.fatal = o.fatal ?? false;
    if (o.ref !== undefined) this.ref = o.ref;
    if (o.closeCode !== undefined) this.closeCode = o.closeCode;
  }
}

export function wireErrorCode(c: WireErrorCode): ErrorCode {
  switch (c) {
    case WireErrorCode.BAD_REQUEST:
      return "bad_request";
    case WireErrorCode.UNAUTHORIZED:
      return "unauthorized";
    case WireErrorCode.FORBIDDEN:
      return "forbidden";
    case WireErrorCode.NOT_FOUND:
      return "not_found";
    case WireErrorCode.RATE_LIMITED:
      return "rate_limited";
    case WireErrorCode.TOO_LARGE:
      return "too_large";
    case WireErrorCode.UNAVAILABLE:
      return "unavailable";
    case WireErrorCode.INTERNAL:
      return "internal";
    default:
      return "unknown";
  }
}
