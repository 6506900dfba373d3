import { test } from "node:test";
import assert from "node:assert/strict";
import { BimipClient } from "../dist/index.js";
import { ReceiptCoalescer } from "../dist/receipts.js";
import { fakeSocketClass, flush } from "./fake-socket.mjs";

test("ReceiptCoalescer keeps the highest offset per (partition, peer, kind) and requeues what was in flight", () => {
  const rc = new ReceiptCoalescer();
  const r = (peer, kind, upTo) => ({ partition: "chat", peer, kind, upTo });
  assert.ok(rc.mark(r("bob", "read", 3n)));
  assert.ok(rc.mark(r("bob", "read", 5n)));
  assert.ok(!rc.mark(r("bob", "read", 4n)), "lower than pending");
  assert.ok(rc.mark(r("bob", "delivered", 4n)), "another kind");
  assert.ok(rc.mark(r("carol", "read", 1n)));
  const sent = rc.take();
  assert.deepEqual(sent.map((x) => `${x.peer}/${x.kind}/${x.upTo}`), ["bob/read/5", "bob/delivered/4", "carol/read/1"]);
  assert.ok(!rc.mark(r("bob", "read", 5n)), "equal to in flight");
  rc.settle(sent[0]);
  assert.ok(!rc.mark(r("bob", "read", 2n)), "lower than acknowledged");
  rc.requeue(); // link lost: bob/delivered/4 and carol/read/1 go back
  assert.deepEqual(rc.take().map((x) => `${x.peer}/${x.kind}/${x.upTo}`), ["bob/delivered/4", "carol/read/1"]);
  assert.ok(!rc.mark(r("bob", "read", 0n)));
});

test("client: marks within receiptDelayMs become one Receipt frame per peer and kind; DELIVERED is automatic", async (t) => {
  t.mock.timers.enable({ apis: ["setTimeout", "Date"], now: 1_000_000 });
  const { FakeSocket, instances } = fakeSocketClass();
  const c = new BimipClient({ url: "ws://x/ws", token: "t", WebSocket: FakeSocket, receiptDelayMs: 100 });
  const got = [];
  c.on("message", (m) => got.push(`${m.from}@${m.offset}:${m.text()}`));
  c.connect();
  await flush();
  const s = instances[0];
  s.welcome("alice");
  const msg = (offset, text) =>
    s.recv({ body: { case: "message", value: { id: `b${offset}`, from: "bob", to: "alice", partition: 1, payload: new TextEncoder().encode(text), offset: BigInt(offset) } } });
  msg(1, "one");
  msg(2, "two");
  msg(2, "two"); // a repeat of the same (peer, offset): dropped
  msg(3, "three");
  assert.deepEqual(got, ["bob@1:one", "bob@2:two", "bob@3:three"]);
  c.markRead("bob", 2n);
  c.markRead("bob", 3n);
  c.markRead("bob", 1n);
  assert.equal(s.framesOf("receipt").length, 0, "nothing before the delay");
  t.mock.timers.tick(100);
  const receipts = s.framesOf("receipt").map((f) => `${f.body.value.to}/${f.body.value.kind}/${f.body.value.upToOffset}`);
  assert.deepEqual(receipts, ["bob/1/3", "bob/2/3"], "one DELIVERED and one READ, both up to 3");
  // Acked: a lower mark later sends nothing.
  for (const f of s.framesOf("receipt")) s.recv({ ref: f.ref, body: { case: "ack", value: { offset: 4n } } });
  c.markRead("bob", 2n);
  t.mock.timers.tick(100);
  assert.equal(s.framesOf("receipt").length, 2);
  await c.close();
});

test("client: receipts marked offline or in flight at a drop are sent after the reconnect", async (t) => {
  t.mock.timers.enable({ apis: ["setTimeout", "Date"], now: 1_000_000 });
  t.mock.method(Math, "random", () => 0);
  const { FakeSocket, instances } = fakeSocketClass();
  const c = new BimipClient({ url: "ws://x/ws", token: "t", WebSocket: FakeSocket, autoDeliver: false });
  c.connect();
  await flush();
  instances[0].welcome();
  c.markRead("bob", 5n);
  t.mock.timers.tick(100);
  assert.equal(instances[0].framesOf("receipt").length, 1);
  instances[0].serverClose(1006); // no Ack came
  c.markRead("carol", 2n);
  t.mock.timers.tick(0);
  await flush();
  instances[1].welcome();
  const r = instances[1].framesOf("receipt").map((f) => `${f.body.value.to}/${f.body.value.upToOffset}`);
  assert.deepEqual(r.sort(), ["bob/5", "carol/2"]);
  await c.close();
});

test("fan-out: notifications and queued receipts are emitted, then acknowledged by partition", async (t) => {
  t.mock.timers.enable({ apis: ["setTimeout", "Date"], now: 1_000_000 });
  const { FakeSocket, instances } = fakeSocketClass();
  const c = new BimipClient({ url: "ws://x/ws", token: "t", WebSocket: FakeSocket });
  const seen = [];
  c.on("message", (m) => seen.push(`msg:${m.partition}:${m.offset}`));
  c.on("receipt", (r) => seen.push(`receipt:${r.peer}:${r.kind}:${r.upTo}`));
  c.on("summary", (s) => seen.push(`summary:${s.senders.map((x) => `${x.from}=${x.unread}`).join(",")}`));
  c.connect();
  await flush();
  const s = instances[0];
  s.welcome("ben");
  s.recv({ body: { case: "batch", value: { partition: 2, messages: [{ id: "n", from: "system", to: "ben", partition: 2, payload: new Uint8Array([1]), offset: 40n }], nextOffset: 41n } } });
  s.recv({ body: { case: "summary", value: { senders: [{ from: "ann", unread: 3n, firstOffset: 41n, lastOffset: 43n }] } } });
  s.recv({ body: { case: "batch", value: { partition: 3, nextOffset: 45n, receipts: [{ from: "carol", to: "ben", kind: 2, upToOffset: 12n, messageIds: ["b-7"] }] } } });
  assert.deepEqual(seen, ["msg:notification:40", "summary:ann=3", "receipt:carol:read:12"]);
  t.mock.timers.tick(100);
  const acks = s.framesOf("receipt").map((f) => `${f.body.value.partition}/${f.body.value.upToOffset}`);
  assert.deepEqual(acks, ["2/40", "3/44"]);
  await c.close();
});
