import { test } from "node:test";
import assert from "node:assert/strict";
import { BimipClient, classifyClose } from "../dist/index.js";
import { fakeSocketClass, flush } from "./fake-socket.mjs";

test("classifyClose: 4000–4499 refresh, 4500–4999 stop, 1008 rate limit waits longest, 1013 at once", () => {
  assert.deepEqual(classifyClose(4001, "token expired"), { kind: "refresh" });
  assert.deepEqual(classifyClose(4000, ""), { kind: "refresh" });
  assert.deepEqual(classifyClose(4499, "whatever"), { kind: "refresh" });
  assert.deepEqual(classifyClose(4501, "revoked"), { kind: "fatal", error: "revoked", message: "revoked" });
  assert.deepEqual(classifyClose(4502, "kicked"), { kind: "fatal", error: "kicked", message: "kicked" });
  assert.equal(classifyClose(4999, "").kind, "fatal");
  assert.equal(classifyClose(4999, "").error, "closed");
  assert.deepEqual(classifyClose(1008, "rate limit"), { kind: "reconnect", delay: "max" });
  assert.deepEqual(classifyClose(1013, "slow consumer: outbound buffer full, RESUME to catch up"), { kind: "reconnect", delay: "now" });
  for (const code of [1000, 1001, 1006, 1009, 1011, 1012]) {
    assert.deepEqual(classifyClose(code, ""), { kind: "reconnect", delay: "backoff" }, String(code));
  }
  // Servers from before the application codes said it with 1008 and a reason.
  assert.deepEqual(classifyClose(1008, "token expired"), { kind: "refresh" });
  assert.equal(classifyClose(1008, "revoked").error, "revoked");
  assert.equal(classifyClose(1008, "kicked").error, "kicked");
});

async function connected(opts = {}) {
  const { FakeSocket, instances, live } = fakeSocketClass();
  const c = new BimipClient({ url: "ws://x/ws", token: "t", WebSocket: FakeSocket, ...opts });
  const states = [];
  const errors = [];
  c.on("state", (s) => states.push(s));
  c.on("error", (e) => errors.push(e));
  const w = c.connect();
  await flush();
  instances[0].welcome();
  await w;
  return { c, instances, live, states, errors };
}

for (const [code, reason, error] of [
  [4502, "kicked", "kicked"],
  [4501, "revoked", "revoked"],
  [1008, "kicked", "kicked"],
]) {
  test(`${code} ${reason}: terminal closed state with a fatal error, no reconnect loop`, async (t) => {
    t.mock.timers.enable({ apis: ["setTimeout", "Date"], now: 1_000_000 });
    const { c, instances, states, errors } = await connected();
    const pending = c.send("bob", "x");
    instances[0].serverClose(code, reason);
    assert.equal(c.state, "closed");
    assert.deepEqual(states.at(-1), { state: "closed", attempt: 0, reason, code });
    assert.deepEqual(errors, [{ code: error, message: reason, fatal: true, closeCode: code }]);
    await assert.rejects(pending.acked, (e) => e.code === error);
    t.mock.timers.tick(10 * 60_000);
    await flush();
    assert.equal(instances.length, 1, "no new socket");
    // The app may start over (e.g. after signing in again).
    const again = c.connect();
    await flush();
    assert.equal(instances.length, 2);
    instances[1].welcome();
    await again;
    assert.equal(c.state, "connected");
    await c.close();
  });
}

test("1008 rate limit: reconnect after the maximum backoff", async (t) => {
  t.mock.timers.enable({ apis: ["setTimeout", "Date"], now: 1_000_000 });
  const { c, instances, states } = await connected({ reconnect: { maxMs: 7000 } });
  instances[0].serverClose(1008, "rate limit");
  assert.equal(states.at(-1).state, "reconnecting");
  assert.equal(states.at(-1).retryInMs, 7000);
  t.mock.timers.tick(6999);
  await flush();
  assert.equal(instances.length, 1);
  t.mock.timers.tick(1);
  await flush();
  assert.equal(instances.length, 2);
  await c.close();
});

test("1013 slow consumer: reconnect at once; the state event carries the code so the app can call history()", async (t) => {
  t.mock.timers.enable({ apis: ["setTimeout", "Date"], now: 1_000_000 });
  const { c, instances, states } = await connected();
  instances[0].serverClose(1013, "slow consumer: outbound buffer full, RESUME to catch up");
  assert.equal(states.at(-1).retryInMs, 0);
  assert.equal(states.at(-1).code, 1013);
  t.mock.timers.tick(0);
  await flush();
  assert.equal(instances.length, 2);
  await c.close();
});

test("close() sends 1000, ends the session and rejects what waits", async () => {
  const { c, instances, states } = await connected();
  const m = c.send("bob", "x");
  await c.close();
  assert.equal(instances[0].closedByClient.code, 1000);
  assert.equal(states.at(-1).state, "closed");
  await assert.rejects(m.acked, (e) => e.code === "closed");
  await assert.rejects(c.history("bob").next(), (e) => e.code === "closed");
});
