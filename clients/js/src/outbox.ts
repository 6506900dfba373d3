// Messages on their way out. Every send gets its id before it touches the wire and stays in the
// outbox until the server's Ack; after a reconnect every unacknowledged message is sent again, in
// the original order, with the same id (the server stores a resent id only once).

import type { AckInfo, Offset, OutboxRecord, OutboxStore, Outgoing, OutgoingStatus } from "./types.js";

/** The default store: memory only, so unacknowledged messages are lost on a reload. */
export class MemoryOutbox implements OutboxStore {
  private readonly items = new Map<string, OutboxRecord>();
  async load(): Promise<OutboxRecord[]> {
    return [...this.items.values()].sort((a, b) => a.createdAt - b.createdAt);
  }
  async put(m: OutboxRecord): Promise<void> {
    this.items.set(m.id, { ...m });
  }
  async remove(id: string): Promise<void> {
    this.items.delete(id);
  }
}

const RANK: Record<OutgoingStatus, number> = { queued: 0, sent: 1, acked: 2, delivered: 3, read: 4, failed: 5 };

export class OutgoingMessage implements Outgoing {
  status: OutgoingStatus = "queued";
  offset?: Offset;
  readonly acked: Promise<AckInfo>;
  /** The ref of the frame that carries it on the current connection, while waiting for the Ack. */
  ref?: bigint;
  /** The server acknowledged it. */
  isAcked = false;
  /** When it was last written to a socket (for the ack timeout). */
  sentAt = 0;
  private resolveAck!: (a: AckInfo) => void;
  private rejectAck!: (e: unknown) => void;
  private settled = false;

  constructor(
    readonly id: string,
    readonly to: string,
    readonly payload: Uint8Array,
    readonly partition: "chat" | "notification",
    readonly createdAt: number,
  ) {
    this.acked = new Promise<AckInfo>((res, rej) => {
      this.resolveAck = res;
      this.rejectAck = rej;
    });
    // An app that never awaits `acked` must not see an unhandled rejection.
    this.acked.catch(() => {});
  }

  record(): OutboxRecord {
    return { id: this.id, to: this.to, payload: this.payload, partition: this.partition, createdAt: this.createdAt };
  }

  /** Moves the status forward; returns false when `s` is not ahead of the current status. */
  advance(s: OutgoingStatus): boolean {
    if (this.status === "failed") return false;
    if (s !== "failed" && RANK[s] <= RANK[this.status]) return false;
    this.status = s;
    return true;
  }

  /** Waiting to be written (again): not acknowledged and not on the current connection. */
  get needsSend(): boolean {
    return !this.isAcked && this.status !== "failed" && this.ref === undefined;
  }

  /** After a lost link or a temporary refusal: to be written again (the status goes back from `sent`). */
  requeue(): void {
    if (this.status === "sent") this.status = "queued";
    this.ref = undefined;
  }

  resolve(a: AckInfo): void {
    if (this.settled) return;
    this.settled = true;
    this.resolveAck(a);
  }

  reject(e: unknown): void {
    if (this.settled) return;
    this.settled = true;
    this.rejectAck(e);
  }
}
