// The `bimip.v1.json` codec: canonical proto3 JSON, unknown fields ignored (as the server does).

import { fromJsonString, toJsonString } from "@bufbuild/protobuf";
import { FrameSchema } from "./gen/bimip/v1/bimip_pb.js";
import type { Codec } from "./codec.js";

export const jsonCodec: Codec = {
  subprotocol: "bimip.v1.json",
  encode: (frame) => toJsonString(FrameSchema, frame),
  decode(data) {
    if (typeof data !== "string") {
      throw new Error("expected a text WebSocket message on a bimip.v1.json connection");
    }
    return fromJsonString(FrameSchema, data, { ignoreUnknownFields: true });
  },
};
