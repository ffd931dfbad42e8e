/**
 * Fixed-window rate limits. In-process by default; Redis keys with TTLs when REDIS_URL is set,
 * so every instance counts together (each on its own while Redis does not answer).
 */
export interface RateLimitRule {
  /** how many hits per window */
  limit: number;
  /** window length in seconds */
  windowSeconds: number;
}

export interface RateLimitResult {
  ok: boolean;
  /** seconds until the window resets (when !ok) */
  retryAfter: number;
}

export interface RateLimiter {
  hit(key: string, rule: RateLimitRule): Promise<RateLimitResult>;
  close(): Promise<void>;
}

export function createMemoryRateLimiter(now: () => number = Date.now): RateLimiter {
  const windows = new Map<string, { count: number; resetAt: number }>();
  let lastSweep = now();
  return {
    async hit(key, rule) {
      const t = now();
      // Drop expired windows now and then so memory stays bounded by active keys.
      if (t - lastSweep > 60_000) {
        for (const [k, w] of windows) if (w.resetAt <= t) windows.delete(k);
        lastSweep = t;
      }
      let w = windows.get(key);
      if (!w || w.resetAt <= t) {
        w = { count: 0, resetAt: t + rule.windowSeconds * 1000 };
        windows.set(key, w);
      }
      w.count++;
      if (w.count > rule.limit)
        return { ok: false, retryAfter: Math.max(1, Math.ceil((w.resetAt - t) / 1000)) };
      return { ok: true, retryAfter: 0 };
    },
    async close() {
      windows.clear();
    },
  };
}

interface RedisMulti {
  incr(key: string): RedisMulti;
  pexpire(key: string, ms: number, mode: 'NX'): RedisMulti;
  pttl(key: string): RedisMulti;
  exec(): Promise<[Error | null, unknown][] | null>;
}

/** A subset of ioredis' client, so core does not depend on ioredis itself. */
export interface RedisLike {
  multi(): RedisMulti;
}

/**
 * While Redis fails (down, or slower than the client's command timeout) each instance counts in
 * process: refusing every request would take the server down with Redis, and not counting at
 * all would lift the limits.
 */
export function createRedisRateLimiter(redis: RedisLike, prefix: string): RateLimiter {
  const local = createMemoryRateLimiter();
  return {
    async hit(key, rule) {
      const k = `${prefix}rl:${key}`;
      let res: Awaited<ReturnType<RedisMulti['exec']>>;
      try {
        res = await redis
          .multi()
          .incr(k)
          .pexpire(k, rule.windowSeconds * 1000, 'NX')
          .pttl(k)
          .exec();
      } catch {
        return local.hit(key, rule);
      }
      const count = Number(res?.[0]?.[1] ?? 0);
      const ttl = Number(res?.[2]?.[1] ?? rule.windowSeconds * 1000);
      if (count > rule.limit) return { ok: false, retryAfter: Math.max(1, Math.ceil(ttl / 1000)) };
      return { ok: true, retryAfter: 0 };
    },
    async close() {
      await local.close();
    },
  };
}
