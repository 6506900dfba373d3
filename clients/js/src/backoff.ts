// Full-jitter exponential backoff: a uniform delay in [0, min(max, min * 2^attempt)).
// Spreading reconnects over the whole window keeps a restarted server from being hit by every
// client at once.

export interface BackoffConfig {
  minMs: number;
  maxMs: number;
}

export const DEFAULT_BACKOFF = { minMs: 500, maxMs: 30_000, stableMs: 10_000 } as const;

/** The delay before reconnect attempt `attempt` (0 = the first retry). */
export function backoffDelay(attempt: number, cfg: BackoffConfig, random: () => number = Math.random): number {
  const exp = Math.min(attempt, 30); // 2^30 * minMs is far past any cap; avoids Infinity
  const ceiling = Math.min(cfg.maxMs, cfg.minMs * 2 ** exp);
  return Math.floor(random() * ceiling);
}
