// Helpers for the browser tests: a `bimip serve --dev` process and a headless Chromium.
import { spawn } from "node:child_process";
import { createWriteStream, existsSync, mkdirSync, readFileSync } from "node:fs";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";

const root = resolve(dirname(fileURLToPath(import.meta.url)), "../../..");

/** The server binary: $BIMIP_BIN, else the debug build in the cargo target dir. */
export const BIMIP_BIN =
  process.env.BIMIP_BIN ?? join(process.env.CARGO_TARGET_DIR ?? join(root, "target"), "debug", "bimip");

/** Screenshots, server logs and traces go here (gitignored). */
export const ARTIFACTS = resolve(process.env.E2E_ARTIFACTS ?? join(root, "target", "e2e-artifacts"));

/**
 * For working on the demo without rebuilding the server: with E2E_DEMO_DIR set (e.g. to
 * crates/bimip-server/web/dist after `npm run demo:build`), the browser gets the script and the
 * style sheet from that folder instead of the ones embedded in the server binary. (The page
 * itself still comes from the server: Chromium blocks loopback requests from a page whose
 * document was made up by the test.)
 */
const DEMO_DIR = process.env.E2E_DEMO_DIR ? resolve(process.env.E2E_DEMO_DIR) : undefined;

async function serveDemoFromDisk(context) {
  const html = readFileSync(join(DEMO_DIR, "index.html"), "utf8");
  const files = {};
  for (const m of html.matchAll(/"\/(assets\/[^"]+\.(js|css))"/g)) files[`.${m[2]}`] = m[1];
  await context.route(
    (url) => url.pathname.startsWith("/assets/"),
    (route) => {
      const path = new URL(route.request().url()).pathname;
      const ext = path.slice(path.lastIndexOf("."));
      const file = files[ext];
      if (!file) return route.continue();
      return route.fulfill({ path: join(DEMO_DIR, file), contentType: ext === ".js" ? "text/javascript" : "text/css" });
    },
  );
}

/** Debian's chromium; playwright-core never downloads a browser here. */
export const CHROMIUM = process.env.CHROMIUM_PATH ?? "/usr/bin/chromium";

/**
 * Starts `bimip serve --dev` on `listen` with `dataDir` and resolves once it prints its address.
 * The output goes to `<ARTIFACTS>/<logName>`.
 */
export async function startServer({ listen = "127.0.0.1:0", dataDir, logName = "server.log" }) {
  if (!existsSync(BIMIP_BIN)) {
    throw new Error(`no server binary at ${BIMIP_BIN}: run \`cargo build -p bimip\` or set BIMIP_BIN`);
  }
  mkdirSync(ARTIFACTS, { recursive: true });
  const log = createWriteStream(join(ARTIFACTS, logName), { flags: "a" });
  const proc = spawn(BIMIP_BIN, ["serve", "--dev", "--listen", listen, "--data-dir", dataDir], {
    stdio: ["ignore", "pipe", "pipe"],
    env: { ...process.env, RUST_LOG: process.env.RUST_LOG ?? "info" },
  });
  proc.stderr.pipe(log, { end: false });
  const addr = await new Promise((resolveAddr, reject) => {
    let buf = "";
    const timer = setTimeout(() => reject(new Error("the server did not start within 20 s")), 20_000);
    proc.on("exit", (code, sig) => {
      clearTimeout(timer);
      reject(new Error(`the server exited at start-up (code ${code}, signal ${sig}); see ${join(ARTIFACTS, logName)}`));
    });
    proc.stdout.on("data", (chunk) => {
      log.write(chunk);
      buf += chunk;
      const m = /bimip listening on https?:\/\/(\S+)/.exec(buf);
      if (m) {
        clearTimeout(timer);
        resolveAddr(m[1]);
      }
    });
  });
  proc.removeAllListeners("exit");
  proc.stdout.on("data", (chunk) => log.write(chunk));
  const exited = new Promise((r) => proc.on("exit", r));
  return {
    addr,
    url: `http://${addr}`,
    /** SIGKILL (a crash) or SIGTERM (a graceful shutdown); resolves once the process is gone. */
    async stop(signal = "SIGTERM") {
      if (proc.exitCode === null && proc.signalCode === null) proc.kill(signal);
      await exited;
      log.end();
    },
  };
}

/** Flags from the project's notes on running Debian's chromium under playwright-core. */
export function launchBrowser() {
  return chromium.launch({
    executablePath: CHROMIUM,
    args: [
      "--disable-gpu",
      "--disable-dev-shm-usage",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
      "--no-first-run",
      "--disable-quic",
    ],
  });
}

/**
 * A browser context for one user, whose page errors and console errors are collected.
 * `allow(text)` decides whether a console error is expected (e.g. refused WebSockets while the
 * server is down).
 */
export async function newUserPage(browser, name, errors, allow = () => false) {
  const context = await browser.newContext({ viewport: { width: 900, height: 560 } });
  if (DEMO_DIR) await serveDemoFromDisk(context);
  await context.tracing.start({ screenshots: true, snapshots: true });
  const page = await context.newPage();
  page.on("pageerror", (e) => errors.push(`${name}: page error: ${e.message}`));
  page.on("console", (m) => {
    if (m.type() === "error" && !allow(m.text())) errors.push(`${name}: console.error: ${m.text()}`);
  });
  return { name, context, page };
}
