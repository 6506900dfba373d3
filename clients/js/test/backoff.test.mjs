import { test } from "node:test";
import assert from "node:assert/strict";
import { BimipClient, backoffDelay } from "../dist/index.js";
import { fakeSocketClass, flush } from "./fake-socket.mjs";

test("backoffDelay: full jitter under an exponential ceiling capped at maxMs", () => {
  const cfg = { minMs: 500, maxMs: 30_000 };
  const top = () => 0.999999;
  const ceilings = [500, 1000, 2000, 4000, 8000, 16000, 30000, 30000];
  ceilings.forEach((c, attempt) => {
    assert.equal(backoffDelay(attempt, cfg, top), Math.floor(0.999999 * c), `attempt ${attempt}`);
    assert.equal(backoffDelay(attempt, cfg, () => 0), 0);
    assert.equal(backoffDelay(attempt, cfg, () => 0.5), c / 2);
  });
  assert.equal(backoffDelay(5000, cfg, top), Math.floor(0.999999 * 30000), "no overflow for large attempts");
});

test("reconnects with full-jitter backoff; the backoff resets only after a stable link", async (t) => {
  t.mock.timers.enable({ apis: ["setTimeout", "Date"], now: 1_000_000 });
  t.mock.method(Math, "random", () => 0.5);
  const { FakeSocket, instances, live } = fakeSocketClass();
  const states = [];
  const c = new BimipClient({
    url: "ws://x/ws",
    token: "t",
    WebSocket: FakeSocket,
    reconnect: { minMs: 100, maxMs: 1000, stableMs: 5000 },
  });
  c.on("state", (s) => states.push(s));
  const welcome = c.connect();
  await flush();
  assert.equal(instances.length, 1);
  instances[0].welcome();
  assert.equal((await welcome).user, "alice");
  assert.equal(c.state, "connected");

  // Lost after 1 s (not stable): retry in 0.5 * 100.
  t.mock.timers.tick(1000);
  instances[0].serverClose(1006);
  assert.deepEqual(states.at(-1), { state: "reconnecting", attempt: 1, retryInMs: 50, code: 1006 });
  t.mock.timers.tick(49);
  await flush();
  assert.equal(instances.length, 1, "no socket before the delay");
  t.mock.timers.tick(1);
  await flush();
  assert.equal(instances.length, 2);

  // Fails before Welcome: the ceiling doubles each time, up to maxMs.
  const expected = [100, 200, 400, 500, 500];
  for (const delay of expected) {
    instances.at(-1).serverClose(1006);
    assert.equal(states.at(-1).retryInMs, delay);
    assert.ok(live().length === 0, "one socket at a time: none open while waiting");
    t.mock.timers.tick(delay);
    await flush();
    assert.equal(live().length, 1);
  }

  // A link that stays up for stableMs resets the backoff.
  instances.at(-1).welcome();
  t.mock.timers.tick(5000);
  instances.at(-1).serverClose(1001, "server shutting down");
  assert.equal(states.at(-1).retryInMs, 50);
  assert.equal(states.at(-1).attempt, 1);
  await c.close();
  assert.equal(c.state, "closed");
});

test("a connect that hangs is abandoned after connectTimeoutMs (one socket at a time)", async (t) => {
  t.mock.timers.enable({ apis: ["setTimeout", "Date"], now: 1_000_000 });
  t.mock.method(Math, "random", () => 0.5);
  const { FakeSocket, instances, live } = fakeSocketClass();
  const c = new BimipClient({ url: "ws://x/ws", token: "t", WebSocket: FakeSocket, connectTimeoutMs: 3000 });
  c.connect().catch(() => {});
  await flush();
  instances[0].open(); // opens but never sends Welcome
  t.mock.timers.tick(2999);
  assert.equal(instances[0].closedByClient, undefined);
  t.mock.timers.tick(1);
  assert.ok(instances[0].closedByClient, "the pending socket is closed");
  assert.equal(c.state, "reconnecting");
  t.mock.timers.tick(250);
  await flush();
  assert.equal(instances.length, 2);
  assert.equal(live().length, 1);
  await c.close();
});

test("reconnect: false closes on the first loss", async () => {
  const { FakeSocket, instances } = fakeSocketClass();
  const c = new BimipClient({ url: "ws://x/ws", token: "t", WebSocket: FakeSocket, reconnect: false });
  const errors = [];
  c.on("error", (e) => errors.push(e));
  const w = c.connect();
  await flush();
  instances[0].welcome();
  await w;
  instances[0].serverClose(1006);
  assert.equal(c.state, "closed");
  assert.equal(errors[0].fatal, true);
});
