// Receipt coalescing. Receipts are cumulative, so only the highest offset per (partition, peer, kind)
// matters: many marks between two flushes become one frame, and a mark at or below what was already
// sent is dropped. Receipts in flight when the link drops are sent again after the reconnect.

export type ReceiptPartition = "chat" | "notification" | "receipt";
export type ReceiptKindName = "delivered" | "read";

export interface PendingReceipt {
  partition: ReceiptPartition;
  /** The sender of the messages (chat); "" for partition acknowledgements. */
  peer: string;
  kind: ReceiptKindName;
  upTo: bigint;
}

const keyOf = (r: { partition: ReceiptPartition; peer: string; kind: ReceiptKindName }) =>
  `${r.partition}\u0000${r.peer}\u0000${r.kind}`;

export class ReceiptCoalescer {
  private readonly pending = new Map<string, PendingReceipt>();
  private readonly inflight = new Map<string, PendingReceipt>();
  private readonly done = new Map<string, bigint>();

  /** Records a receipt; returns false when it adds nothing (an equal or higher one is known). */
  mark(r: PendingReceipt): boolean {
    if (r.upTo <= 0n) return false;
    const k = keyOf(r);
    const highest = [this.pending.get(k)?.upTo, this.inflight.get(k)?.upTo, this.done.get(k)].reduce<bigint>(
      (a, b) => (b !== undefined && b > a ? b : a),
      0n,
    );
    if (r.upTo <= highest) return false;
    this.pending.set(k, { ...r });
    return true;
  }

  get hasPending(): boolean {
    return this.pending.size > 0;
  }

  /** The receipts to send now, in the order they were first marked; they become in flight. */
  take(): PendingReceipt[] {
    const out = [...this.pending.values()];
    this.pending.clear();
    for (const r of out) this.inflight.set(keyOf(r), r);
    return out;
  }

  /** The server acknowledged (or refused) this receipt: it is not sent again. */
  settle(r: PendingReceipt): void {
    const k = keyOf(r);
    if (this.inflight.get(k) === r) this.inflight.delete(k);
    const prev = this.done.get(k) ?? 0n;
    if (r.upTo > prev) this.done.set(k, r.upTo);
  }

  /** The link dropped: receipts in flight go back to pending unless a higher one is pending. */
  requeue(): void {
    for (const [k, r] of this.inflight) {
      const p = this.pending.get(k);
      if (!p || p.upTo < r.upTo) this.pending.set(k, r);
    }
    this.inflight.clear();
  }
}
