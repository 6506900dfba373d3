// Frame codecs. The binary one is always loaded; the JSON one (larger: it carries the JSON mapping)
// lives in codec-json.ts and is imported only when `format: "json"` is chosen.

import { create, fromBinary, toBinary, type MessageInitShape } from "@bufbuild/protobuf";
import { FrameSchema, type Frame } from "./gen/bimip/v1/bimip_pb.js";

export type FrameInit = MessageInitShape<typeof FrameSchema>;
export type FrameBodyInit = NonNullable<FrameInit["body"]>;

export interface Codec {
  /** The WebSocket subprotocol that selects this encoding. */
  readonly subprotocol: "bimip.v1" | "bimip.v1.json";
  encode(frame: Frame): Uint8Array | string;
  /** Throws on data that is not a frame of this encoding. */
  decode(data: unknown): Frame;
}

export function makeFrame(init: FrameInit): Frame {
  return create(FrameSchema, init);
}

export const binaryCodec: Codec = {
  subprotocol: "bimip.v1",
  encode: (frame) => toBinary(FrameSchema, frame),
  decode(data) {
    if (data instanceof ArrayBuffer) return fromBinary(FrameSchema, new Uint8Array(data));
    if (ArrayBuffer.isView(data)) {
      return fromBinary(FrameSchema, new Uint8Array(data.buffer, data.byteOffset, data.byteLength));
    }
    throw new Error("expected a binary WebSocket message on a bimip.v1 connection");
  },
};

/** Byte length of an encoded frame (UTF-8 for JSON text). */
export function encodedSize(data: Uint8Array | string): number {
  if (typeof data !== "string") return data.byteLength;
  return new TextEncoder().encode(data).byteLength;
}
