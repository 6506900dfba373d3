// bimip-client against the real server (`$BIMIP_BIN serve`), over real WebSockets (`ws`).
import { test } from "node:test";
import assert from "node:assert/strict";
import { MemoryOutbox } from "../dist/index.js";
import { TestServer, WebSocket, collect, nextEvent, serverBinary, waitFor } from "./server-helper.mjs";

let missing;
try {
  serverBinary();
} catch (e) {
  missing = e;
}
if (missing) test("the bimip server binary is available", () => assert.fail(missing.message));
const serverTest = missing ? (name, fn) => test(name, { skip: "no server binary (see the failure above)" }, fn) : test;

async function withServer(t, args, fn) {
  const server = await new TestServer({ args }).start();
  const clients = [];
  const track = (c) => (clients.push(c), c);
  try {
    await fn(server, track);
  } catch (e) {
    if (server.log.length) t.diagnostic(`server stderr:\n${server.log.join("").slice(-4000)}`);
    throw e;
  } finally {
    await Promise.all(clients.map((c) => c.close()));
    await server.stop();
  }
}

serverTest("two clients chat both ways (binary and JSON) with acks, delivered and read receipts", async (t) => {
  await withServer(t, [], async (server, track) => {
    await server.contacts("alice", "bob");
    const alice = track(server.client("alice", { device: "laptop" }));
    const bob = track(server.client("bob", { format: "json", device: "phone" }));
    const aliceGot = collect(alice, "message");
    const bobGot = collect(bob, "message");
    const [wa, wb] = await Promise.all([alice.connect(), bob.connect()]);
    assert.equal(wa.user, "alice");
    assert.equal(wa.device, "laptop");
    assert.equal(wb.user, "bob");

    const hi = alice.send("bob", "hi bob");
    const ackInfo = await hi.acked;
    assert.equal(ackInfo.duplicate, false);
    assert.ok(ackInfo.offset > 0n);
    await waitFor(() => bobGot.length === 1, "bob to get the message");
    assert.equal(bobGot[0].text(), "hi bob");
    assert.equal(bobGot[0].from, "alice");
    assert.equal(bobGot[0].id, hi.id);
    assert.equal(bobGot[0].offset, ackInfo.offset, "Ack offset = offset in bob's queue");

    // bob's client sends DELIVERED by itself; READ when the app says so.
    await waitFor(() => hi.status === "delivered", "alice's message to show delivered");
    const read = nextEvent(alice, "receipt", (r) => r.kind === "read");
    bob.markRead("alice", bobGot[0].offset);
    const r = await read;
    assert.deepEqual(r.messageIds, [hi.id]);
    assert.equal(r.peer, "bob");
    assert.equal(hi.status, "read");

    const reply = bob.send("alice", new TextEncoder().encode("hello alice 👋"));
    await reply.acked;
    await waitFor(() => aliceGot.length === 1, "alice to get the reply");
    assert.equal(aliceGot[0].text(), "hello alice 👋");
    await waitFor(() => reply.status === "delivered", "bob's reply delivered");
    alice.markRead("bob", aliceGot[0].offset);
    await waitFor(() => reply.status === "read", "bob's reply read");
    assert.deepEqual(alice.pending(), []);
    assert.deepEqual(bob.pending(), []);
  });
});

serverTest("a message sent while the server is down is delivered exactly once after it returns", async (t) => {
  await withServer(t, ["--presence-grace-ms", "200"], async (server, track) => {
    await server.contacts("alice", "bob");
    const alice = track(server.client("alice", { device: "a1" }));
    const bob = track(server.client("bob", { device: "b1" }));
    const bobGot = collect(bob, "message");
    await Promise.all([alice.connect(), bob.connect()]);
    await alice.send("bob", "before").acked;
    await waitFor(() => bobGot.length === 1, "the first message");

    await server.kill();
    await waitFor(() => alice.state === "reconnecting" && bob.state === "reconnecting", "both clients to notice");
    const down = alice.send("bob", "sent while the server was down");
    assert.equal(down.status, "queued");
    assert.deepEqual(alice.pending().map((m) => m.id), [down.id]);

    await server.start(); // same address, same data dir
    const ack = await down.acked;
    assert.equal(ack.duplicate, false);
    await waitFor(() => bob.state === "connected", "bob to reconnect");

    // bob gets it live (if he was back first) or through the summary; either way the queue holds it once.
    const pages = [];
    for await (const page of bob.history("alice", { from: 1n })) pages.push(...page);
    assert.deepEqual(pages.map((m) => m.text()), ["before", "sent while the server was down"]);
    await new Promise((r) => setTimeout(r, 300));
    assert.ok(bobGot.filter((m) => m.id === down.id).length <= 1, "never emitted twice");

    // A resend of an id the server already stored (an Ack lost with the link) is acknowledged as a duplicate.
    const store = new MemoryOutbox();
    await store.put({ id: down.id, to: "bob", payload: down.payload, partition: "chat", createdAt: Date.now() });
    const again = track(server.client("alice", { device: "a1", outbox: store }));
    const dup = new Promise((res) => again.on("ack", res));
    await again.connect();
    const dupAck = await dup;
    assert.equal(dupAck.duplicate, true);
    assert.equal(dupAck.offset, ack.offset);
    const after = [];
    for await (const page of bob.history("alice", { from: 1n })) after.push(...page);
    assert.equal(after.filter((m) => m.id === down.id).length, 1, "stored once");
  });
});

serverTest("token refresh: 4001 on an open connection → getToken, then reconnect with the new token", async (t) => {
  await withServer(t, ["--jwt-leeway-secs", "0"], async (server, track) => {
    const reasons = [];
    const exp = Math.floor(Date.now() / 1000) + 2;
    const alice = track(
      server.client("alice", {
        claims: { exp },
        refreshTokenBeforeMs: 0,
        getToken: async ({ reason }) => {
          reasons.push(reason);
          return server.token("alice");
        },
      }),
    );
    const states = collect(alice, "state");
    const first = await alice.connect();
    const second = await nextEvent(alice, "welcome", (w) => w.session !== first.session, 10_000);
    assert.equal(second.user, "alice");
    assert.ok(reasons.includes("expired") || reasons.includes("expiring"), `getToken called: ${reasons}`);
    const closeEv = states.find((s) => s.state === "reconnecting");
    assert.equal(closeEv.code, 4001, `closed with ${closeEv.code} ${closeEv.reason}`);
    assert.equal(closeEv.retryInMs, 0, "reconnects at once");
    const m = alice.send("alice", "note to self after refresh");
    await m.acked;
  });
});

serverTest("an expired token at the upgrade: the server accepts, then closes 4001 (a browser can see that)", async (t) => {
  await withServer(t, ["--jwt-leeway-secs", "0"], async (server) => {
    const token = server.token("alice", { exp: Math.floor(Date.now() / 1000) - 5 });
    const ws = new WebSocket(`${server.wsUrl}?token=${token}`, ["bimip.v1"]);
    const closed = await new Promise((res) => {
      ws.on("close", (code, reason) => res({ code, reason: reason.toString() }));
      ws.on("error", () => {});
    });
    assert.equal(closed.code, 4001);
    assert.match(closed.reason, /expired/);
  });
});

for (const [what, path, code, error] of [
  ["kick", (u, d) => `/v1/users/${u}/devices/${d}/kick`, 4502, "kicked"],
  ["revoke", (u) => `/v1/users/${u}/revoke`, 4501, "revoked"],
]) {
  serverTest(`${what} (${code}) is terminal: closed with a fatal error, no reconnect attempts`, async (t) => {
    await withServer(t, [], async (server, track) => {
      const alice = track(server.client("alice", { device: "tab1" }));
      const states = collect(alice, "state");
      const errors = collect(alice, "error");
      await alice.connect();
      const closed = nextEvent(alice, "state", (s) => s.state === "closed");
      await server.api("POST", path("alice", "tab1"));
      const st = await closed;
      assert.equal(st.code, code);
      assert.deepEqual(errors.map((e) => [e.code, e.fatal, e.closeCode]), [[error, true, code]]);
      const n = states.length;
      await new Promise((r) => setTimeout(r, 1500));
      assert.equal(states.length, n, "no reconnect after a terminal close");
      assert.equal(alice.state, "closed");
    });
  });
}

serverTest("RESUME history pages and the ONLINE summary", async (t) => {
  await withServer(t, [], async (server, track) => {
    const alice = track(server.client("alice"));
    await alice.connect();
    const sent = [];
    for (let i = 1; i <= 5; i++) sent.push(alice.send("carol", `m${i}`));
    await Promise.all(sent.map((m) => m.acked));

    const carol = track(server.client("carol", { autoDeliver: false }));
    const summary = nextEvent(carol, "summary");
    await carol.connect();
    const s = await summary;
    assert.equal(s.senders.length, 1);
    assert.equal(s.senders[0].from, "alice");
    assert.equal(s.senders[0].unread, 5);
    assert.equal(s.senders[0].last.text(), "m5");

    const pages = [];
    for await (const page of carol.history("alice", { limit: 2 })) pages.push(page.map((m) => m.text()));
    assert.deepEqual(pages, [["m1", "m2"], ["m3", "m4"], ["m5"]]);

    // From an offset; breaking out early is fine.
    const third = (await carol.history("alice", { from: s.senders[0].firstOffset + 2n, limit: 1 }).next()).value;
    assert.equal(third[0].text(), "m3");

    // After READ up to m4, the cursor-based history starts at m5.
    carol.markRead("alice", third[0].offset + 1n);
    await waitFor(() => sent[3].status === "read", "alice to see m4 read");
    assert.equal(sent[4].status, "acked");
    const rest = [];
    for await (const page of carol.history("alice")) rest.push(...page.map((m) => m.text()));
    assert.deepEqual(rest, ["m5"]);
  });
});

serverTest("presence: watch snapshots, ONLINE/OFFLINE, intents, invisibility, typing", async (t) => {
  await withServer(t, ["--presence-grace-ms", "100"], async (server, track) => {
    await server.contacts("alice", "bob");
    const alice = track(server.client("alice"));
    const seen = collect(alice, "presence");
    await alice.connect();
    await alice.watch(["bob"]);
    assert.equal(seen.at(-1).user, "bob");
    assert.equal(seen.at(-1).state, "offline");

    const bob = track(server.client("bob"));
    const online = nextEvent(alice, "presence", (p) => p.user === "bob" && p.state === "online");
    await bob.connect();
    await online;

    const away = nextEvent(alice, "presence", (p) => p.user === "bob" && p.intent === "away");
    await bob.setIntent("away", { details: "lunch" });
    const a = await away;
    assert.equal(a.state, "online");
    assert.equal(a.details, "lunch");

    const dnd = nextEvent(alice, "presence", (p) => p.user === "bob" && p.intent === "dnd");
    await bob.setIntent("dnd");
    await dnd;

    const typing = nextEvent(alice, "typing", (e) => e.from === "bob");
    assert.equal(bob.typing("alice"), true);
    const ty = await typing;
    assert.equal(ty.kind, "typing");
    assert.ok(ty.ttlMs > 0);

    const hidden = nextEvent(alice, "presence", (p) => p.user === "bob" && p.state === "offline");
    await bob.setIntent("online", { invisible: true });
    const h = await hidden;
    assert.ok(h.lastSeen > 0);

    const back = nextEvent(alice, "presence", (p) => p.user === "bob" && p.state === "online");
    await bob.setIntent("online", { invisible: false });
    const b = await back;
    assert.equal(b.intent, "dnd", "becoming visible keeps the intent");

    const cleared = nextEvent(alice, "presence", (p) => p.user === "bob" && p.state === "online" && p.intent === undefined);
    await bob.setIntent("online");
    await cleared;

    const gone = nextEvent(alice, "presence", (p) => p.user === "bob" && p.state === "offline");
    await bob.close();
    const g = await gone;
    assert.ok(g.lastSeen > 0);

    // Snapshots come back after alice reconnects (the watch list is replayed).
    const replay = nextEvent(alice, "presence", (p) => p.user === "bob");
    await server.kill();
    await server.start();
    const snap = await replay;
    assert.equal(snap.state, "offline");
  });
});
