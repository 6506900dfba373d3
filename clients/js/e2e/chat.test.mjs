// The demo chat in a real browser: alice (binary frames) and bob (JSON frames), in two isolated
// browser contexts, sign in, add each other, chat with delivered/read ticks, see typing, AWAY and
// invisibility, survive a server restart in the middle without losing or duplicating a message,
// find their history after a reload (in pages), and get an unread count from the ONLINE summary. A screenshot
// of each step goes to target/e2e-artifacts/. Any page error or console.error fails the test.
import assert from "node:assert/strict";
import { mkdirSync, mkdtempSync, readdirSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "node:test";
import { ARTIFACTS, launchBrowser, newUserPage, startServer } from "./harness.mjs";

const T = 15_000; // default wait for a UI change

test("alice and bob chat in the demo, across a server restart", { timeout: 180_000 }, async (t) => {
  // This run's screenshots, log and traces only.
  mkdirSync(ARTIFACTS, { recursive: true });
  for (const f of readdirSync(ARTIFACTS)) if (f.startsWith("chat-")) rmSync(join(ARTIFACTS, f));
  const dataDir = mkdtempSync(join(tmpdir(), "bimip-e2e-"));
  let server = await startServer({ dataDir, logName: "chat-server.log" });
  const browser = await launchBrowser();
  const errors = [];
  // While the server is down the browser logs each refused WebSocket as a console error.
  let serverDown = false;
  const allow = (text) => serverDown && /WebSocket|ERR_CONNECTION_REFUSED|Failed to fetch/.test(text);
  const alice = await newUserPage(browser, "alice", errors, allow);
  const bob = await newUserPage(browser, "bob", errors, allow);
  let n = 0;
  const shot = async (step) => {
    n++;
    const prefix = String(n).padStart(2, "0");
    for (const u of [alice, bob]) {
      await u.page.screenshot({ path: join(ARTIFACTS, `chat-${prefix}-${step}-${u.name}.png`), fullPage: true });
    }
  };
  const ok = { passed: true };
  const step = async (name, fn) => {
    if (!ok.passed) return t.test(name, { skip: "an earlier step failed" }, () => {});
    return t.test(name, async () => {
      try {
        await fn();
        assert.deepEqual(errors, [], "no page errors or console errors");
      } catch (e) {
        ok.passed = false;
        await shot(`FAILED-${name.replace(/\W+/g, "-")}`).catch(() => {});
        throw e;
      }
    });
  };
  const sel = (page, s, timeout = T) => page.waitForSelector(s, { timeout });
  const typingHidden = (page, timeout = T) =>
    page.waitForSelector('[data-testid="typing-indicator"][hidden]', { state: "attached", timeout });
  const msgLocator = (page, text) => page.locator(`[data-testid="messages"] li`, { hasText: text });
  const statusOf = async (page, text) => (await msgLocator(page, text).getAttribute("data-status")) ?? "";
  const waitStatus = (page, text, status, timeout = T) =>
    page.waitForFunction(
      ([text, status]) =>
        [...document.querySelectorAll('[data-testid="messages"] li')].some(
          (li) => li.textContent?.includes(text) && li.getAttribute("data-status") === status,
        ),
      [text, status],
      { timeout },
    );

  try {
    await step("both sign in", async () => {
      for (const u of [alice, bob]) {
        await u.page.goto(server.url + "/");
        await u.page.fill('[data-testid="signin-name"]', u.name);
        if (u.name === "bob") await u.page.check('[data-testid="signin-json"]'); // bob speaks bimip.v1.json
        await u.page.click('[data-testid="signin-submit"]');
        await sel(u.page, '[data-testid="conn-state"][data-state="connected"]');
        assert.equal(await u.page.textContent('[data-testid="me"]'), u.name);
      }
      await shot("signed-in");
    });

    await step("they add each other and see each other online", async () => {
      for (const [u, other] of [
        [alice, "bob"],
        [bob, "alice"],
      ]) {
        await u.page.fill('[data-testid="add-contact-name"]', other);
        await u.page.click('[data-testid="add-contact-submit"]');
        await sel(u.page, `[data-testid="contact-${other}"]`);
      }
      await sel(alice.page, '[data-testid="contact-bob"][data-presence="online"]');
      await sel(bob.page, '[data-testid="contact-alice"][data-presence="online"]');
      await shot("contacts-online");
    });

    await step("alice types: bob sees typing; she sends: delivered, then read when bob opens the chat", async () => {
      await alice.page.click('[data-testid="contact-bob"]');
      await alice.page.fill('[data-testid="compose"]', "Hello bob");
      await sel(bob.page, '[data-testid="contact-alice"][data-typing="true"]');
      await shot("alice-typing");
      await alice.page.press('[data-testid="compose"]', "Enter");
      await waitStatus(alice.page, "Hello bob", "delivered");
      await sel(bob.page, '[data-testid="contact-alice"][data-unread="1"]');
      await sel(bob.page, '[data-testid="contact-alice"][data-typing="false"]');
      await shot("delivered-unread");
      await bob.page.click('[data-testid="contact-alice"]');
      await sel(bob.page, '[data-testid="messages"] li:has-text("Hello bob")');
      await waitStatus(alice.page, "Hello bob", "read");
      await sel(bob.page, '[data-testid="contact-alice"][data-unread="0"]');
      await shot("read");
    });

    await step("bob replies: alice sees him typing, the indicator clears, his message is read", async () => {
      await bob.page.fill('[data-testid="compose"]', "Hi alice, how are you?");
      await sel(alice.page, '[data-testid="typing-indicator"]:not([hidden])');
      await shot("bob-typing");
      await bob.page.press('[data-testid="compose"]', "Enter");
      await sel(alice.page, '[data-testid="messages"] li:has-text("how are you")');
      await typingHidden(alice.page);
      await waitStatus(bob.page, "how are you", "read");
      // A typing indicator without a message lapses by itself after its ttl (5 s). The client
      // sends at most one TYPING per peer every 3 s, so wait that out first.
      await bob.page.waitForTimeout(3_100);
      await bob.page.fill('[data-testid="compose"]', "…");
      await sel(alice.page, '[data-testid="typing-indicator"]:not([hidden])');
      await typingHidden(alice.page, 10_000);
      await bob.page.fill('[data-testid="compose"]', "");
      await shot("chatted");
    });

    await step("alice goes away, then invisible, then back: bob sees each", async () => {
      await alice.page.selectOption('[data-testid="status-select"]', "away");
      await sel(bob.page, '[data-testid="contact-alice"][data-presence="away"]');
      await shot("alice-away");
      await alice.page.check('[data-testid="invisible-toggle"]');
      await sel(bob.page, '[data-testid="contact-alice"][data-presence="offline"]');
      await alice.page.uncheck('[data-testid="invisible-toggle"]');
      await sel(bob.page, '[data-testid="contact-alice"][data-presence="away"]');
      await alice.page.selectOption('[data-testid="status-select"]', "online");
      await sel(bob.page, '[data-testid="contact-alice"][data-presence="online"]');
    });

    await step("the server restarts: a message typed while it is down arrives once", async () => {
      serverDown = true;
      await server.stop("SIGKILL");
      for (const u of [alice, bob]) await sel(u.page, '[data-testid="conn-state"][data-state="reconnecting"]');
      await alice.page.fill('[data-testid="compose"]', "Sent while the server was down");
      await alice.page.press('[data-testid="compose"]', "Enter");
      const queued = await statusOf(alice.page, "server was down");
      assert.ok(["queued", "sent"].includes(queued), `status while down: ${queued}`);
      await shot("server-down");
      // Stay down long enough for several refused reconnects (the client then also asks the page
      // for a new token, which fails too: the server is down, not refusing).
      await alice.page.waitForTimeout(3_000);
      server = await startServer({ listen: server.addr, dataDir, logName: "chat-server.log" });
      for (const u of [alice, bob]) await sel(u.page, '[data-testid="conn-state"][data-state="connected"]', 45_000);
      serverDown = false;
      await sel(bob.page, '[data-testid="messages"] li:has-text("server was down")');
      await waitStatus(alice.page, "server was down", "read");
      await shot("reconnected");
      // Nothing doubled, nothing lost, on either side.
      await bob.page.waitForTimeout(500);
      for (const u of [alice, bob]) {
        for (const text of ["Hello bob", "how are you", "server was down"]) {
          assert.equal(await msgLocator(u.page, text).count(), 1, `${u.name} shows "${text}" once`);
        }
      }
    });

    await step("after a reload bob's history has every message once", async () => {
      await bob.page.reload();
      await sel(bob.page, '[data-testid="conn-state"][data-state="connected"]');
      await bob.page.click('[data-testid="contact-alice"]');
      await sel(bob.page, '[data-testid="messages"] li:has-text("server was down")');
      for (const text of ["Hello bob", "how are you", "server was down"]) {
        assert.equal(await msgLocator(bob.page, text).count(), 1, `history shows "${text}" once`);
      }
      await shot("history-after-reload");
    });

    await step("bob leaves; alice's messages wait; bob returns to an unread count from the summary", async () => {
      await bob.page.goto("about:blank");
      await sel(alice.page, '[data-testid="contact-bob"][data-presence="offline"]');
      for (const text of ["Are you there?", "Call me when you are back"]) {
        await alice.page.fill('[data-testid="compose"]', text);
        await alice.page.press('[data-testid="compose"]', "Enter");
        await waitStatus(alice.page, text, "acked");
      }
      await bob.page.goto(server.url + "/"); // the same tab: still signed in as bob
      await sel(bob.page, '[data-testid="contact-alice"][data-unread="2"]');
      await waitStatus(alice.page, "when you are back", "delivered");
      await shot("unread-from-summary");
      await bob.page.click('[data-testid="contact-alice"]');
      await waitStatus(alice.page, "Are you there?", "read");
      await waitStatus(alice.page, "when you are back", "read");
      await sel(bob.page, '[data-testid="contact-alice"][data-unread="0"]');
    });

    await step("a long history comes in pages of 50, older ones on demand", async () => {
      for (let i = 1; i <= 50; i++) {
        await bob.page.fill('[data-testid="compose"]', `Count ${i}.`);
        await bob.page.press('[data-testid="compose"]', "Enter");
      }
      await waitStatus(bob.page, "Count 50.", "read");
      await alice.page.reload();
      await sel(alice.page, '[data-testid="conn-state"][data-state="connected"]');
      await alice.page.click('[data-testid="contact-bob"]');
      await sel(alice.page, '[data-testid="load-older"]');
      const bubbles = alice.page.locator('[data-testid="messages"] li[data-testid^="msg-"]');
      assert.equal(await bubbles.count(), 50, "the newest page");
      await alice.page.click('[data-testid="load-older"]');
      await alice.page.waitForSelector('[data-testid="load-older"]', { state: "detached", timeout: T });
      const texts = await alice.page.locator('[data-testid="messages"] li[data-testid^="msg-"] .text').allTextContents();
      assert.equal(texts.length, 55, "the whole conversation once");
      assert.equal(texts[0], "Hello bob");
      assert.equal(texts[54], "Count 50.");
      await shot("history-pages");
    });
  } finally {
    for (const u of [alice, bob]) {
      await u.context.tracing
        .stop(ok.passed ? undefined : { path: join(ARTIFACTS, `chat-trace-${u.name}.zip`) })
        .catch(() => {});
    }
    await browser.close();
    await server.stop();
    if (ok.passed) rmSync(dataDir, { recursive: true, force: true });
  }
});
