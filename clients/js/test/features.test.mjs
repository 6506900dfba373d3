import { test } from "node:test";
import assert from "node:assert/strict";
import { BimipClient } from "../dist/index.js";
import { fakeSocketClass, flush } from "./fake-socket.mjs";

async function setup(t, opts = {}) {
  t.mock.timers.enable({ apis: ["setTimeout", "Date"], now: 1_000_000 });
  t.mock.method(Math, "random", () => 0);
  const { FakeSocket, instances } = fakeSocketClass();
  const c = new BimipClient({ url: "ws://x/ws", token: "t", WebSocket: FakeSocket, ...opts });
  c.connect();
  await flush();
  instances[0].welcome("alice", "phone");
  return { c, instances };
}

test("typing: throttled per peer and kind, never queued while offline", async (t) => {
  const { c, instances } = await setup(t, { typingThrottleMs: 3000 });
  assert.equal(c.typing("bob"), true);
  assert.equal(c.typing("bob"), false, "throttled");
  assert.equal(c.typing("bob", "recording"), true, "another kind");
  assert.equal(c.typing("carol"), true, "another peer");
  t.mock.timers.tick(3000);
  assert.equal(c.typing("bob"), true);
  const typing = instances[0].framesOf("awareness").map((f) => `${f.body.value.to}:${f.body.value.status}`);
  assert.deepEqual(typing, ["bob:6", "bob:7", "carol:6", "bob:6"]);
  // A refusal of a TYPING (the peer does not watch us) is not an app error.
  const errors = [];
  c.on("error", (e) => errors.push(e));
  const ref = instances[0].framesOf("awareness")[0].ref;
  instances[0].recv({ ref, body: { case: "error", value: { code: 3, message: "not a contact" } } });
  assert.deepEqual(errors, []);
  instances[0].serverClose(1006);
  assert.equal(c.typing("bob"), false, "dropped while offline");
  t.mock.timers.tick(0);
  await flush();
  instances[1].welcome();
  assert.equal(instances[1].framesOf("awareness").length, 0, "nothing replayed");
  await c.close();
});

test("presence: watch() subscribes (and again after a reconnect); snapshots and broadcasts become presence events", async (t) => {
  const { c, instances } = await setup(t);
  const seen = [];
  c.on("presence", (p) => seen.push(p));
  const w = c.watch(["bob", "carol"]);
  const sub = instances[0].framesOf("subscribe")[0];
  assert.deepEqual(sub.body.value.users, ["bob", "carol"]);
  instances[0].recv({ ref: sub.ref, body: { case: "awareness", value: { from: "bob", status: 1, intent: 3, details: "lunch", timestamp: 5n } } });
  instances[0].recv({ ref: sub.ref, body: { case: "awareness", value: { from: "carol", status: 2, lastSeen: 4n, timestamp: 5n } } });
  instances[0].recv({ ref: sub.ref, body: { case: "ack", value: { timestamp: 5n } } });
  await w;
  instances[0].recv({ body: { case: "awareness", value: { from: "bob", status: 5, intent: 5, timestamp: 6n } } });
  instances[0].recv({ body: { case: "awareness", value: { from: "alice", status: 4, intent: 4, timestamp: 7n, invisible: true } } });
  instances[0].recv({ body: { case: "awareness", value: { from: "bob", to: "alice", status: 6, device: "web", ttlMs: 5000, timestamp: 8n } } });
  assert.deepEqual(seen, [
    { user: "bob", state: "online", intent: "away", details: "lunch", timestamp: 5, self: false },
    { user: "carol", state: "offline", lastSeen: 4, timestamp: 5, self: false },
    { user: "bob", state: "online", intent: "dnd", timestamp: 6, self: false },
    { user: "alice", state: "online", intent: "busy", timestamp: 7, self: true, invisible: true },
  ]);
  // unwatch, then the reconnect replays only the rest
  const u = c.unwatch(["carol"]);
  const unsub = instances[0].framesOf("subscribe")[1];
  assert.equal(unsub.body.value.unsubscribe, true);
  instances[0].recv({ ref: unsub.ref, body: { case: "ack", value: {} } });
  await u;
  instances[0].serverClose(1001, "server shutting down");
  t.mock.timers.tick(0);
  await flush();
  instances[1].welcome();
  assert.deepEqual(instances[1].framesOf("subscribe").map((f) => f.body.value.users), [["bob"]]);
  await c.close();
});

test("typing events carry an expiry; a refused watch rejects and is reported", async (t) => {
  const { c, instances } = await setup(t);
  const typing = [];
  c.on("typing", (e) => typing.push(e));
  instances[0].recv({ body: { case: "awareness", value: { from: "bob", to: "alice", status: 7, device: "web", ttlMs: 10000 } } });
  assert.deepEqual(typing, [{ from: "bob", kind: "recording", device: "web", ttlMs: 10000, until: 1_000_000 + 10000 }]);
  const errors = [];
  c.on("error", (e) => errors.push(e));
  const w = c.watch(["zoe"]);
  const sub = instances[0].framesOf("subscribe")[0];
  instances[0].recv({ ref: sub.ref, body: { case: "error", value: { code: 3, message: "not allowed to see (not a contact): zoe" } } });
  await assert.rejects(w, (e) => e.code === "forbidden");
  assert.equal(errors[0].code, "forbidden");
  await c.close();
});

test("setIntent: away / invisible frames, resolved on the Ack, sent after connecting when offline", async (t) => {
  t.mock.timers.enable({ apis: ["setTimeout", "Date"], now: 1_000_000 });
  const { FakeSocket, instances } = fakeSocketClass();
  const c = new BimipClient({ url: "ws://x/ws", token: "t", WebSocket: FakeSocket });
  const p1 = c.setIntent("busy", { details: "meeting" });
  const p2 = c.setIntent("away", { invisible: true }); // replaces the first before it was sent
  c.connect();
  await flush();
  instances[0].welcome();
  const frames = instances[0].framesOf("awareness").map((f) => ({ ref: f.ref, ...f.body.value }));
  assert.deepEqual(frames.map((f) => [f.status, f.invisible]), [
    [1, true],
    [3, false],
  ]);
  for (const f of frames) instances[0].recv({ ref: f.ref, body: { case: "ack", value: {} } });
  await Promise.all([p1, p2]);
  const p3 = c.setIntent("online", { invisible: false });
  const f3 = instances[0].framesOf("awareness")[2];
  assert.equal(f3.body.value.status, 1);
  assert.equal(f3.body.value.invisible, false);
  instances[0].recv({ ref: f3.ref, body: { case: "error", value: { code: 6, message: "details too long" } } });
  await assert.rejects(p3, (e) => e.code === "too_large");
  await c.close();
});

test("history: RESUME pages as an async iterator; a page cut by a reconnect continues from nextOffset", async (t) => {
  const { c, instances } = await setup(t);
  const enc = (s) => new TextEncoder().encode(s);
  const m = (o) => ({ id: `b${o}`, from: "bob", to: "alice", partition: 1, payload: enc(`m${o}`), offset: BigInt(o) });
  const it = c.history("bob", { from: 1n, limit: 2 });
  const pages = [];
  const done = (async () => {
    for await (const page of it) pages.push(page.map((x) => `${x.offset}:${x.text()}`));
  })();
  const r1 = instances[0].framesOf("awareness")[0];
  assert.equal(r1.body.value.status, 8);
  assert.equal(r1.body.value.fromOffset, 1n);
  assert.equal(r1.body.value.limit, 2);
  instances[0].recv({ ref: r1.ref, body: { case: "batch", value: { partition: 1, contact: "bob", messages: [m(1), m(2)], more: true, nextOffset: 3n } } });
  await flush();
  instances[0].serverClose(1006);
  t.mock.timers.tick(0);
  await flush();
  instances[1].welcome();
  const r2 = instances[1].framesOf("awareness")[0];
  assert.equal(r2.body.value.fromOffset, 3n, "continues where it stopped");
  instances[1].recv({ ref: r2.ref, body: { case: "batch", value: { partition: 1, contact: "bob", messages: [m(3), m(4)], more: true, nextOffset: 5n } } });
  instances[1].recv({ ref: r2.ref, body: { case: "batch", value: { partition: 1, contact: "bob", messages: [m(5)], nextOffset: 6n } } });
  await done;
  assert.deepEqual(pages, [["1:m1", "2:m2"], ["3:m3", "4:m4"], ["5:m5"]]);
  // A live push of something a page already had is not emitted again.
  const live = [];
  c.on("message", (x) => live.push(x.offset));
  instances[1].recv({ body: { case: "message", value: m(5) } });
  instances[1].recv({ body: { case: "message", value: m(6) } });
  assert.deepEqual(live, [6n]);

  // Breaking out early stops it; an Error fails it.
  const it2 = c.history("bob");
  const r3 = instances[1].framesOf("awareness").at(-1);
  instances[1].recv({ ref: r3.ref, body: { case: "error", value: { code: 1, message: "RESUME needs the peer in `to`" } } });
  await assert.rejects(it2.next(), (e) => e.code === "bad_request");
  await c.close();
});

test("events(): every event as {type, ...payload} until the signal aborts", async (t) => {
  const { FakeSocket, instances } = fakeSocketClass();
  const c = new BimipClient({ url: "ws://x/ws", token: "t", WebSocket: FakeSocket });
  const ac = new AbortController();
  const got = [];
  const loop = (async () => {
    for await (const e of c.events(ac.signal)) {
      got.push(e.type === "message" ? `${e.type}:${e.text()}` : `${e.type}:${e.state ?? e.user ?? ""}`);
      if (e.type === "message") ac.abort();
    }
  })();
  c.connect();
  await flush();
  instances[0].welcome("alice");
  instances[0].recv({ body: { case: "message", value: { id: "x", from: "bob", to: "alice", partition: 1, payload: new TextEncoder().encode("hey"), offset: 1n } } });
  await loop;
  assert.deepEqual(got, ["state:connecting", "state:connected", "welcome:alice", "message:hey"]);
  await c.close();
});

test("JSON format: the bimip.v1.json subprotocol, text frames; device from Welcome reused on reconnect", async (t) => {
  t.mock.timers.enable({ apis: ["setTimeout", "Date"], now: 1_000_000 });
  t.mock.method(Math, "random", () => 0);
  const { FakeSocket, instances } = fakeSocketClass();
  const c = new BimipClient({ url: "http://h:1/ws?x=1", token: "tok", WebSocket: FakeSocket, format: "json" });
  c.connect();
  await flush();
  const s = instances[0];
  assert.deepEqual(s.protocols, ["bimip.v1.json"]);
  assert.equal(s.url.protocol, "ws:");
  assert.equal(s.url.searchParams.get("x"), "1");
  assert.equal(s.url.searchParams.get("device"), null);
  s.welcome("alice", "dev-123");
  c.send("bob", "hi", { id: "j1" });
  assert.equal(typeof s.sent[0], "string");
  assert.match(s.sent[0], /"message":\{"id":"j1","to":"bob","partition":"PARTITION_CHAT","payload":"aGk="\}/);
  s.serverClose(1006);
  t.mock.timers.tick(0);
  await flush();
  assert.equal(instances[1].url.searchParams.get("device"), "dev-123");
  await c.close();
});

test("heartbeat: a Ping after heartbeatMs of silence; a link silent for 2×heartbeatMs + 5 s is dropped", async (t) => {
  t.mock.timers.enable({ apis: ["setTimeout", "Date"], now: 1_000_000 });
  t.mock.method(Math, "random", () => 0);
  const { FakeSocket, instances } = fakeSocketClass();
  const c = new BimipClient({ url: "ws://x/ws", token: "t", WebSocket: FakeSocket });
  c.connect();
  await flush();
  instances[0].welcome("alice", "d", 1000);
  t.mock.timers.tick(500);
  assert.equal(instances[0].framesOf("ping").length, 0);
  t.mock.timers.tick(500);
  const pings = instances[0].framesOf("ping");
  assert.equal(pings.length, 1, "a Ping after 1 s of silence");
  instances[0].recv({ ref: pings[0].ref, body: { case: "pong", value: pings[0].body.value } });
  t.mock.timers.tick(5000);
  assert.ok(instances[0].isLive, "the Pong counted as life");
  t.mock.timers.tick(1000);
  assert.ok(instances[0].isLive, "6 s: not yet");
  assert.ok(instances[0].framesOf("ping").length > 1, "more Pings while silent");
  t.mock.timers.tick(2000);
  assert.ok(!instances[0].isLive, "more than 7 s of silence: dropped");
  assert.equal(c.state, "connecting", "and reconnecting at once (random 0)");
  await c.close();
});
