// A scripted stand-in for the WebSocket constructor: tests drive open/messages/close by hand, so
// timers can be mocked and every step is deterministic.
import { binaryCodec, jsonCodec, makeFrame } from "../dist/proto.js";

export function fakeSocketClass() {
  const instances = [];
  class FakeSocket {
    constructor(url, protocols) {
      this.url = new URL(url);
      this.protocols = protocols;
      this.protocol = Array.isArray(protocols) ? protocols[0] : protocols;
      this.codec = this.protocol === "bimip.v1.json" ? jsonCodec : binaryCodec;
      this.readyState = 0;
      this.binaryType = "blob";
      this.sent = [];
      this.closedByClient = undefined;
      this.onopen = this.onclose = this.onerror = this.onmessage = null;
      instances.push(this);
    }
    send(data) {
      if (this.readyState !== 1) throw new Error("send on a socket that is not open");
      this.sent.push(data);
    }
    close(code, reason) {
      if (this.readyState === 3) return;
      this.readyState = 3;
      this.closedByClient = { code, reason };
      const cb = this.onclose;
      queueMicrotask(() => cb?.({ code: code ?? 1005, reason: reason ?? "", wasClean: true }));
    }
    // --- test side
    get token() {
      return this.url.searchParams.get("token");
    }
    get isLive() {
      return this.readyState < 2;
    }
    open() {
      this.readyState = 1;
      this.onopen?.({});
    }
    recv(init) {
      this.onmessage?.({ data: this.codec.encode(makeFrame(init)) });
    }
    welcome(user = "alice", device = "d1", heartbeatMs = 20000) {
      if (this.readyState === 0) this.open();
      this.recv({ body: { case: "welcome", value: { user, device, session: "s", heartbeatMs, maxFrameBytes: 65536, node: "n" } } });
    }
    serverClose(code, reason = "") {
      this.readyState = 3;
      this.onclose?.({ code, reason, wasClean: true });
    }
    /** Frames the client sent, decoded. */
    frames() {
      return this.sent.map((d) => this.codec.decode(d));
    }
    framesOf(kind) {
      return this.frames().filter((f) => f.body.case === kind);
    }
  }
  return { FakeSocket, instances, live: () => instances.filter((s) => s.isLive) };
}

/** Lets pending promise callbacks (the client's async connect steps) run. */
export async function flush(rounds = 5) {
  for (let i = 0; i < rounds; i++) await new Promise((r) => setImmediate(r));
}
