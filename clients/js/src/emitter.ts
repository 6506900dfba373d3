// A small typed event emitter. A listener that throws is reported through `onListenerError` and
// never breaks the client.

export class Emitter<E extends object> {
  private readonly listeners = new Map<keyof E, Set<(e: any) => void>>();
  private readonly anyListeners = new Set<(type: keyof E, e: unknown) => void>();

  constructor(private readonly onListenerError: (err: unknown) => void) {}

  on<K extends keyof E>(type: K, fn: (e: E[K]) => void): () => void {
    let set = this.listeners.get(type);
    if (!set) this.listeners.set(type, (set = new Set()));
    // Wrap so the same function can be added twice and removed independently.
    const wrapped = (e: E[K]) => fn(e);
    set.add(wrapped);
    return () => {
      set!.delete(wrapped);
    };
  }

  onAny(fn: (type: keyof E, e: unknown) => void): () => void {
    const wrapped = (t: keyof E, e: unknown) => fn(t, e);
    this.anyListeners.add(wrapped);
    return () => {
      this.anyListeners.delete(wrapped);
    };
  }

  emit<K extends keyof E>(type: K, e: E[K]): void {
    const set = this.listeners.get(type);
    if (set) {
      for (const fn of [...set]) {
        try {
          fn(e);
        } catch (err) {
          this.onListenerError(err);
        }
      }
    }
    for (const fn of [...this.anyListeners]) {
      try {
        fn(type, e);
      } catch (err) {
        this.onListenerError(err);
      }
    }
  }
}

/**
 * Async iteration over pushed values. `push` never blocks: values wait in a queue until the consumer
 * pulls them. `end` finishes the iteration (after the queued values); `fail` makes the next pull throw.
 */
export class AsyncQueue<T> implements AsyncIterableIterator<T> {
  private readonly items: T[] = [];
  private waiter: { resolve: (r: IteratorResult<T>) => void; reject: (e: unknown) => void } | undefined;
  private done = false;
  private error: unknown = undefined;
  private failed = false;
  private returned = false;

  constructor(private readonly onReturn?: () => void) {}

  push(v: T): void {
    if (this.done) return;
    if (this.waiter) {
      const w = this.waiter;
      this.waiter = undefined;
      w.resolve({ value: v, done: false });
    } else {
      this.items.push(v);
    }
  }

  end(): void {
    if (this.done) return;
    this.done = true;
    if (this.waiter && this.items.length === 0) {
      const w = this.waiter;
      this.waiter = undefined;
      w.resolve({ value: undefined, done: true });
    }
  }

  fail(e: unknown): void {
    if (this.done) return;
    this.failed = true;
    this.error = e;
    this.done = true;
    if (this.waiter && this.items.length === 0) {
      const w = this.waiter;
      this.waiter = undefined;
      w.reject(e);
    }
  }

  get closed(): boolean {
    return this.done;
  }

  next(): Promise<IteratorResult<T>> {
    if (this.items.length > 0) return Promise.resolve({ value: this.items.shift() as T, done: false });
    if (this.done) {
      if (this.failed) {
        this.failed = false; // throw once, then report done
        return Promise.reject(this.error);
      }
      return Promise.resolve({ value: undefined, done: true });
    }
    return new Promise((resolve, reject) => {
      this.waiter = { resolve, reject };
    });
  }

  return(): Promise<IteratorResult<T>> {
    this.done = true;
    this.failed = false;
    this.items.length = 0;
    if (this.waiter) {
      const w = this.waiter;
      this.waiter = undefined;
      w.resolve({ value: undefined, done: true });
    }
    if (!this.returned) {
      this.returned = true;
      this.onReturn?.();
    }
    return Promise.resolve({ value: undefined, done: true });
  }

  [Symbol.asyncIterator](): AsyncIterableIterator<T> {
    return this;
  }
}
