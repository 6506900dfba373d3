import { test } from "node:test";
import assert from "node:assert/strict";
import { BimipClient, MemoryOutbox } from "../dist/index.js";
import { fakeSocketClass, flush } from "./fake-socket.mjs";

const sentMessages = (s) => s.framesOf("message").map((f) => ({ ref: f.ref, id: f.body.value.id, to: f.body.value.to }));
const ack = (s, ref, id, offset, duplicate = false) =>
  s.recv({ ref, body: { case: "ack", value: { id, offset: BigInt(offset), timestamp: 1n, duplicate } } });

test("outbox: queued offline, sent in order, resent in the original order after a reconnect with the same ids", async (t) => {
  t.mock.timers.enable({ apis: ["setTimeout", "Date"], now: 1_000_000 });
  t.mock.method(Math, "random", () => 0.5);
  const { FakeSocket, instances } = fakeSocketClass();
  const c = new BimipClient({ url: "ws://x/ws", token: "t", WebSocket: FakeSocket });
  const statuses = [];
  c.on("outgoing", (e) => statuses.push(`${e.id}:${e.status}`));
  const a = c.send("bob", "a", { id: "a" });
  const b = c.send("bob", "b", { id: "b" });
  c.connect();
  await flush();
  const c1 = c.send("bob", "c", { id: "c" });
  assert.equal(a.status, "queued");
  instances[0].welcome();
  assert.deepEqual(sentMessages(instances[0]).map((m) => m.id), ["a", "b", "c"]);
  assert.equal(b.status, "sent");
  ack(instances[0], sentMessages(instances[0])[0].ref, "a", 7);
  assert.deepEqual(await a.acked, { offset: 7n, timestamp: 1, duplicate: false });
  assert.equal(a.status, "acked");
  assert.deepEqual(c.pending().map((m) => m.id), ["b", "c"]);

  instances[0].serverClose(1006);
  const d = c.send("carol", "d", { id: "d" }); // while reconnecting
  assert.equal(d.status, "queued");
  t.mock.timers.tick(250);
  await flush();
  instances[1].welcome();
  assert.deepEqual(sentMessages(instances[1]).map((m) => m.id), ["b", "c", "d"], "unacked first, in order, then the new one");
  const refs = sentMessages(instances[1]).map((m) => m.ref);
  ack(instances[1], refs[0], "b", 8, true); // the server had stored it before the drop
  ack(instances[1], refs[1], "c", 9);
  ack(instances[1], refs[2], "d", 3);
  assert.equal((await b.acked).duplicate, true);
  assert.equal((await c1.acked).offset, 9n);
  assert.equal((await d.acked).offset, 3n);
  assert.deepEqual(c.pending(), []);
  assert.deepEqual(statuses.slice(0, 3), ["a:queued", "b:queued", "c:queued"]);
  await c.close();
});

test("outbox: an Ack that does not come within ackTimeoutMs drops the link; the message is resent", async (t) => {
  t.mock.timers.enable({ apis: ["setTimeout", "Date"], now: 1_000_000 });
  t.mock.method(Math, "random", () => 0);
  const { FakeSocket, instances } = fakeSocketClass();
  const c = new BimipClient({ url: "ws://x/ws", token: "t", WebSocket: FakeSocket, ackTimeoutMs: 2000 });
  c.connect();
  await flush();
  instances[0].welcome();
  const m = c.send("bob", "hi");
  t.mock.timers.tick(1999);
  assert.ok(instances[0].isLive);
  t.mock.timers.tick(1);
  assert.ok(!instances[0].isLive, "dead link dropped");
  t.mock.timers.tick(0);
  await flush();
  instances[1].welcome();
  assert.deepEqual(sentMessages(instances[1]).map((x) => x.id), [m.id]);
  await c.close();
});

test("outbox: a stored outbox (e.g. IndexedDB) is loaded and sent first; refused messages fail and leave the store", async () => {
  const store = new MemoryOutbox();
  await store.put({ id: "old-1", to: "bob", payload: new TextEncoder().encode("x"), partition: "chat", createdAt: 1 });
  await store.put({ id: "old-2", to: "bob", payload: new TextEncoder().encode("y"), partition: "chat", createdAt: 2 });
  const { FakeSocket, instances } = fakeSocketClass();
  const c = new BimipClient({ url: "ws://x/ws", token: "t", WebSocket: FakeSocket, outbox: store });
  const fresh = c.send("bob", "z", { id: "new" });
  c.connect();
  await flush();
  instances[0].welcome();
  const sent = sentMessages(instances[0]);
  assert.deepEqual(sent.map((m) => m.id), ["old-1", "old-2", "new"]);
  assert.equal(fresh.status, "sent");
  const errors = [];
  c.on("error", (e) => errors.push(e));
  instances[0].recv({ ref: sent[2].ref, body: { case: "error", value: { code: 3, message: "you cannot message this user" } } });
  await assert.rejects(fresh.acked, (e) => e.code === "forbidden");
  assert.equal(fresh.status, "failed");
  assert.equal(errors[0].code, "forbidden");
  ack(instances[0], sent[0].ref, "old-1", 1);
  ack(instances[0], sent[1].ref, "old-2", 2);
  await flush();
  assert.deepEqual(await store.load(), []);
  await c.close();
});

test("receipts from the peer move sent messages to delivered, then read (never back)", async () => {
  const { FakeSocket, instances } = fakeSocketClass();
  const c = new BimipClient({ url: "ws://x/ws", token: "t", WebSocket: FakeSocket });
  c.connect();
  await flush();
  instances[0].welcome();
  const m1 = c.send("bob", "1", { id: "m1" });
  const m2 = c.send("bob", "2", { id: "m2" });
  const [r1, r2] = sentMessages(instances[0]).map((m) => m.ref);
  ack(instances[0], r1, "m1", 10);
  ack(instances[0], r2, "m2", 11);
  const events = [];
  c.on("receipt", (e) => events.push(e));
  instances[0].recv({ body: { case: "receipt", value: { from: "bob", to: "alice", kind: 2, upToOffset: 10n, messageIds: ["m1"] } } });
  assert.equal(m1.status, "read");
  assert.equal(m2.status, "acked");
  instances[0].recv({ body: { case: "receipt", value: { from: "bob", to: "alice", kind: 1, upToOffset: 11n, messageIds: ["m1", "m2"] } } });
  assert.equal(m1.status, "read", "delivered after read does not move it back");
  assert.equal(m2.status, "delivered");
  assert.deepEqual(events[0], { peer: "bob", kind: "read", upTo: 10n, messageIds: ["m1"], timestamp: 0 });
  await c.close();
});
