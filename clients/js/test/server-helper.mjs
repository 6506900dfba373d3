// Starts the real bimip server for the integration tests: `$BIMIP_BIN serve` on 127.0.0.1 with a
// temporary data dir, an HS256 secret and an API key; the address comes from its
// `bimip listening on http://ADDR` line.
import { spawn } from "node:child_process";
import { existsSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import WebSocket from "ws";
import { BimipClient } from "../dist/index.js";
import { mintToken } from "./jwt.mjs";

export const SECRET = "js-client-test-secret-0123456789";
export const API_KEY = "js-client-test-api-key";

const repoRoot = resolve(fileURLToPath(new URL(".", import.meta.url)), "..", "..", "..");

export function serverBinary() {
  const bin = process.env.BIMIP_BIN ? resolve(process.env.BIMIP_BIN) : join(repoRoot, "target", "debug", "bimip");
  if (!existsSync(bin)) {
    throw new Error(
      `bimip server binary not found at ${bin}. Build it with \`cargo build -p bimip\` and/or set BIMIP_BIN=/path/to/bimip ` +
        "(with a custom CARGO_TARGET_DIR the binary is in $CARGO_TARGET_DIR/debug/bimip).",
    );
  }
  return bin;
}

export class TestServer {
  constructor(opts = {}) {
    this.bin = serverBinary();
    this.dataDir = opts.dataDir ?? mkdtempSync(join(tmpdir(), "bimip-js-"));
    this.extra = opts.args ?? [];
    this.addr = undefined;
    this.proc = undefined;
    this.log = [];
  }

  /** Starts the server (again on the same address and data dir when it ran before). */
  async start() {
    const listen = this.addr ?? "127.0.0.1:0";
    const env = Object.fromEntries(Object.entries(process.env).filter(([k]) => !k.startsWith("BIMIP_")));
    env.RUST_LOG = process.env.RUST_LOG ?? "warn";
    const args = ["serve", "--listen", listen, "--data-dir", this.dataDir, "--jwt-secret", SECRET, "--api-key", API_KEY, ...this.extra];
    const proc = spawn(this.bin, args, { env, stdio: ["ignore", "pipe", "pipe"] });
    this.proc = proc;
    const exited = new Promise((r) => proc.once("exit", (code, signal) => r({ code, signal })));
    this.exited = exited;
    proc.stderr.setEncoding("utf8");
    proc.stderr.on("data", (d) => this.log.push(d));
    proc.stdout.setEncoding("utf8");
    const addr = await new Promise((resolveAddr, reject) => {
      let buf = "";
      const timer = setTimeout(() => reject(new Error(`bimip did not start within 20 s:\n${this.log.join("")}`)), 20_000);
      proc.stdout.on("data", (d) => {
        buf += d;
        const m = /bimip listening on https?:\/\/(\S+)/.exec(buf);
        if (m) {
          clearTimeout(timer);
          resolveAddr(m[1]);
        }
      });
      exited.then(({ code, signal }) => {
        clearTimeout(timer);
        reject(new Error(`bimip exited (${code ?? signal}) before listening:\n${buf}\n${this.log.join("")}`));
      });
    });
    this.addr = addr;
    return this;
  }

  get wsUrl() {
    return `ws://${this.addr}/ws`;
  }

  /** SIGKILL: a crash, nothing flushed beyond what was acknowledged. */
  async kill() {
    if (!this.proc || this.proc.exitCode !== null || this.proc.signalCode !== null) return;
    this.proc.kill("SIGKILL");
    await this.exited;
  }

  async stop() {
    if (this.proc && this.proc.exitCode === null && this.proc.signalCode === null) {
      this.proc.kill("SIGTERM");
      const t = setTimeout(() => this.proc.kill("SIGKILL"), 5_000);
      await this.exited;
      clearTimeout(t);
    }
    rmSync(this.dataDir, { recursive: true, force: true });
  }

  async api(method, path, body) {
    const res = await fetch(`http://${this.addr}${path}`, {
      method,
      headers: { authorization: `Bearer ${API_KEY}`, ...(body ? { "content-type": "application/json" } : {}) },
      body: body ? JSON.stringify(body) : undefined,
    });
    const text = await res.text();
    if (!res.ok) throw new Error(`${method} ${path}: ${res.status} ${text}`);
    return text ? JSON.parse(text) : undefined;
  }

  /** Makes two users contacts of each other (mutual watchers). */
  contacts(a, b) {
    return this.api("PUT", `/v1/users/${a}/contacts/${b}`);
  }

  token(user, claims = {}) {
    return mintToken(SECRET, { sub: user, ...claims });
  }

  client(user, opts = {}) {
    const { claims, ...rest } = opts;
    return new BimipClient({
      url: this.wsUrl,
      token: this.token(user, claims),
      WebSocket,
      reconnect: { minMs: 50, maxMs: 1000, stableMs: 2000 },
      ...rest,
    });
  }
}

/** Resolves with the first `type` event of `client` that passes `pred`. */
export function nextEvent(client, type, pred = () => true, timeoutMs = 10_000) {
  return new Promise((res, rej) => {
    const t = setTimeout(() => {
      off();
      rej(new Error(`timed out waiting for a ${type} event`));
    }, timeoutMs);
    const off = client.on(type, (e) => {
      if (!pred(e)) return;
      clearTimeout(t);
      off();
      res(e);
    });
  });
}

export async function waitFor(cond, what, timeoutMs = 10_000) {
  const until = Date.now() + timeoutMs;
  while (!(await cond())) {
    if (Date.now() > until) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

/** Collects every `type` event of a client. */
export function collect(client, type) {
  const out = [];
  client.on(type, (e) => out.push(e));
  return out;
}

export { WebSocket };
