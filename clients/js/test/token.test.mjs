import { test } from "node:test";
import assert from "node:assert/strict";
import { BimipClient, tokenExpiry } from "../dist/index.js";
import { SingleFlight, StaleTokenError } from "../dist/token.js";
import { fakeSocketClass, flush } from "./fake-socket.mjs";
import { mintToken } from "./jwt.mjs";

test("tokenExpiry reads exp (ms) without checking the signature", () => {
  assert.equal(tokenExpiry(mintToken("s", { sub: "a", exp: 2_000_000_000 })), 2_000_000_000_000);
  assert.equal(tokenExpiry("not-a-jwt"), undefined);
  assert.equal(tokenExpiry("a.b.c"), undefined);
});

test("SingleFlight: concurrent needs share one getToken call; reset() drops a stale result", async () => {
  let calls = 0;
  const releases = [];
  const release = () => releases.shift()();
  const sf = new SingleFlight(async ({ reason }) => {
    const n = ++calls;
    await new Promise((r) => releases.push(r));
    return `tok-${n}-${reason}`;
  });
  const a = sf.get("expired");
  const b = sf.get("expiring");
  const c = sf.get("rejected");
  assert.equal(a, b);
  assert.equal(b, c);
  assert.equal(calls, 1);
  release();
  assert.deepEqual(await Promise.all([a, b, c]), ["tok-1-expired", "tok-1-expired", "tok-1-expired"]);
  assert.equal(sf.inFlight, false);

  const d = sf.get("initial");
  assert.equal(calls, 2);
  sf.reset(); // the session ended while the request was out
  const e = sf.get("initial"); // a new session starts a new request
  assert.equal(calls, 3);
  release();
  await assert.rejects(d, StaleTokenError);
  release();
  assert.equal(await e, "tok-3-initial");
});

test("SingleFlight: a failing getToken rejects every waiter once, then the next call retries", async () => {
  let calls = 0;
  const sf = new SingleFlight(async () => {
    calls++;
    if (calls === 1) throw new Error("network");
    return "ok";
  });
  await assert.rejects(Promise.all([sf.get("initial"), sf.get("initial")]), /network/);
  assert.equal(calls, 1);
  assert.equal(await sf.get("initial"), "ok");
});

test("4001: getToken once (reason expired), reconnect at once with the new token; a second 4001 backs off", async (t) => {
  t.mock.timers.enable({ apis: ["setTimeout", "Date"], now: 1_000_000 });
  t.mock.method(Math, "random", () => 0.5);
  const { FakeSocket, instances } = fakeSocketClass();
  const reasons = [];
  const c = new BimipClient({
    url: "ws://x/ws",
    WebSocket: FakeSocket,
    getToken: async ({ reason }) => {
      reasons.push(reason);
      return `tok${reasons.length}`;
    },
  });
  const states = [];
  c.on("state", (s) => states.push(s));
  c.connect();
  await flush();
  assert.deepEqual(reasons, ["initial"]);
  assert.equal(instances[0].token, "tok1");
  instances[0].welcome();
  instances[0].serverClose(4001, "token expired");
  assert.equal(states.at(-1).retryInMs, 0);
  t.mock.timers.tick(0);
  await flush();
  assert.deepEqual(reasons, ["initial", "expired"]);
  assert.equal(instances.length, 2);
  assert.equal(instances[1].token, "tok2");
  // The server refuses again at once (e.g. clock skew): no tight loop.
  instances[1].serverClose(4001, "token expired");
  assert.ok(states.at(-1).retryInMs > 0, "the second immediate refresh goes through the backoff");
  await c.close();
});

test("4001 without getToken is terminal; getToken resolving null means logged out", async () => {
  {
    const { FakeSocket, instances } = fakeSocketClass();
    const c = new BimipClient({ url: "ws://x/ws", token: "static", WebSocket: FakeSocket });
    const errors = [];
    c.on("error", (e) => errors.push(e));
    c.connect();
    await flush();
    instances[0].open();
    instances[0].serverClose(4001, "token expired");
    assert.equal(c.state, "closed");
    assert.equal(errors[0].code, "token_expired");
    assert.equal(errors[0].fatal, true);
  }
  {
    const { FakeSocket, instances } = fakeSocketClass();
    const c = new BimipClient({ url: "ws://x/ws", WebSocket: FakeSocket, getToken: async () => null });
    await assert.rejects(c.connect(), (e) => e.code === "logged_out" && e.fatal === true);
    assert.equal(c.state, "closed");
    assert.equal(instances.length, 0);
  }
});

test("a token close to expiry is refreshed before connecting; two closes before Welcome ask for a token once (reason rejected)", async (t) => {
  t.mock.timers.enable({ apis: ["setTimeout", "Date"], now: 1_700_000_000_000 });
  t.mock.method(Math, "random", () => 0);
  const { FakeSocket, instances } = fakeSocketClass();
  const reasons = [];
  const soon = mintToken("s", { sub: "a", exp: 1_700_000_030 }); // 30 s left
  const c = new BimipClient({
    url: "ws://x/ws",
    token: soon,
    WebSocket: FakeSocket,
    getToken: async ({ reason }) => {
      reasons.push(reason);
      return mintToken("s", { sub: "a", exp: 1_700_100_000 });
    },
  });
  c.connect();
  await flush();
  assert.deepEqual(reasons, ["expiring"]);
  // A browser sees a refused upgrade as a plain 1006 before open.
  instances[0].serverClose(1006);
  t.mock.timers.tick(0);
  await flush();
  instances[1].serverClose(1006);
  t.mock.timers.tick(0);
  await flush();
  assert.deepEqual(reasons, ["expiring", "rejected"]);
  instances[2].serverClose(1006);
  t.mock.timers.tick(0);
  await flush();
  instances[3].serverClose(1006);
  t.mock.timers.tick(0);
  await flush();
  assert.deepEqual(reasons, ["expiring", "rejected"], "only once per unstable streak");
  await c.close();
});

test("a getToken failure after 4001 is retried with backoff (the old token is not reused)", async (t) => {
  t.mock.timers.enable({ apis: ["setTimeout", "Date"], now: 1_000_000 });
  t.mock.method(Math, "random", () => 0.5);
  const { FakeSocket, instances } = fakeSocketClass();
  const reasons = [];
  const c = new BimipClient({
    url: "ws://x/ws",
    token: "old",
    WebSocket: FakeSocket,
    getToken: async ({ reason }) => {
      reasons.push(reason);
      if (reasons.length === 1) throw new Error("auth backend down");
      return "new";
    },
  });
  const states = [];
  const errors = [];
  c.on("state", (s) => states.push(s));
  c.on("error", (e) => errors.push(e));
  c.connect();
  await flush();
  instances[0].welcome();
  instances[0].serverClose(4001, "token expired");
  t.mock.timers.tick(0);
  await flush();
  assert.deepEqual(reasons, ["expired"]);
  assert.equal(instances.length, 1, "no socket with the old token");
  assert.equal(errors[0].fatal, false);
  assert.equal(states.at(-1).state, "reconnecting");
  t.mock.timers.tick(states.at(-1).retryInMs);
  await flush();
  assert.deepEqual(reasons, ["expired", "expired"]);
  assert.equal(instances[1].token, "new");
  await c.close();
});
