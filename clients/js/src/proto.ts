// `bimip-client/proto`: the generated schemas (FrameSchema, enums, message types) and the two codecs,
// for code that works with raw frames.

export * from "./gen/bimip/v1/bimip_pb.js";
export { binaryCodec, makeFrame, type Codec, type FrameInit } from "./codec.js";
export { jsonCodec } from "./codec-json.js";
