import { test } from "node:test";
import assert from "node:assert/strict";
import { binaryCodec, jsonCodec, makeFrame, FrameSchema, Status, ReceiptKind } from "../dist/proto.js";
import { equals } from "@bufbuild/protobuf";

const MAX = 18446744073709551615n;
const samples = [
  { ref: MAX, body: { case: "message", value: { id: "c-1", to: "bob", payload: new TextEncoder().encode("hi 👋"), offset: MAX } } },
  { ref: 1n, body: { case: "awareness", value: { to: "bob", status: Status.TYPING, ttlMs: 5000 } } },
  { ref: 2n, body: { case: "receipt", value: { to: "ann", kind: ReceiptKind.READ, upToOffset: 9007199254740993n, messageIds: ["a", "b"] } } },
  { body: { case: "welcome", value: { user: "ben", device: "phone", session: "s", serverTime: -1n, heartbeatMs: 20000, maxFrameBytes: 65536, node: "n" } } },
  { ref: 3n, body: { case: "subscribe", value: { users: ["a", "b"], unsubscribe: true } } },
  { ref: 4n, body: { case: "pushToken", value: { platform: 3, token: "t", sandbox: true, locale: "pt-BR" } } },
  { ref: 5n, body: { case: "ping", value: { timestamp: 1795436001931n } } },
  { body: { case: "batch", value: { partition: 3, nextOffset: 45n, receipts: [{ from: "c", to: "b", kind: 2, upToOffset: 12n, messageIds: ["x"] }] } } },
  { body: { case: "summary", value: { senders: [{ from: "ann", unread: 3n, firstOffset: 1n, lastOffset: 3n, lastMessage: { id: "m", payload: new Uint8Array([0, 255]) } }] } } },
  { ref: 6n, body: { case: "error", value: { code: 5, message: "slow down" } } },
];

test("codec round trips: binary and JSON, exact uint64", () => {
  for (const init of samples) {
    const f = makeFrame(init);
    const bin = binaryCodec.encode(f);
    assert.ok(bin instanceof Uint8Array);
    assert.ok(equals(FrameSchema, binaryCodec.decode(bin), f), `binary ${init.body.case}`);
    assert.ok(equals(FrameSchema, binaryCodec.decode(bin.buffer.slice(bin.byteOffset, bin.byteOffset + bin.byteLength)), f));
    const text = jsonCodec.encode(f);
    assert.equal(typeof text, "string");
    assert.ok(equals(FrameSchema, jsonCodec.decode(text), f), `json ${init.body.case}`);
  }
});

test("JSON form: camelCase names, 64-bit as strings, enums by name, Base64 bytes, defaults left out", () => {
  assert.equal(
    jsonCodec.encode(makeFrame(samples[0])),
    '{"ref":"18446744073709551615","message":{"id":"c-1","to":"bob","payload":"aGkg8J+Riw==","offset":"18446744073709551615"}}',
  );
  assert.equal(jsonCodec.encode(makeFrame(samples[1])), '{"ref":"1","awareness":{"to":"bob","status":"STATUS_TYPING","ttlMs":5000}}');
});

test("JSON input: snake_case names, numbers for 64-bit and enums, unknown fields ignored", () => {
  const f = jsonCodec.decode('{"ref":9,"receipt":{"kind":1,"up_to_offset":5,"partition":"PARTITION_CHAT"},"future_field":{"x":1}}');
  assert.equal(f.ref, 9n);
  assert.equal(f.body.case, "receipt");
  assert.equal(f.body.value.kind, ReceiptKind.DELIVERED);
  assert.equal(f.body.value.upToOffset, 5n);
  const g = jsonCodec.decode('{"awareness":{"status":8,"to":"ann","unknown":true}}');
  assert.equal(g.body.value.status, Status.RESUME);
});

test("codecs refuse the wrong WebSocket message type", () => {
  assert.throws(() => binaryCodec.decode("{}"), /binary/);
  assert.throws(() => jsonCodec.decode(new Uint8Array([1])), /text/);
  assert.throws(() => jsonCodec.decode("{not json"));
});
