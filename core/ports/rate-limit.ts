/**
 * Rate limits: fixed windows, or a steady rate (`smooth`). In-process by default; Redis keys with
 * TTLs when REDIS_URL is set, so every instance counts together (each on its own while Redis does
 * not answer).
 */
export interface RateLimitRule {
  /** how many hits per window */
  limit: number;
  /** window length in seconds */
  windowSeconds: number;
  /**
   * A rate, not a window: up to `limit` hits at once, then one more each `windowSeconds / limit`
   * (a bucket of `limit` refilled evenly over the window: GCRA), and a refused hit takes nothing.
   * Once a fixed window is spent, everything is refused until it ends, up to `windowSeconds`
   * later, however hard it is retried. Default false (a fixed window).
   */
  smooth?: boolean;
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
  /** smooth rules: each key's theoretical arrival time (ms), GCRA's one number per key */
  const arrivals = new Map<string, number>();
  let lastSweep = now();
  return {
    async hit(key, rule) {
      const t = now();
      // Drop expired windows now and then so memory stays bounded by active keys.
      if (t - lastSweep > 60_000) {
        for (const [k, w] of windows) if (w.resetAt <= t) windows.delete(k);
        for (const [k, tat] of arrivals) if (tat <= t) arrivals.delete(k);
        lastSweep = t;
      }
      if (rule.smooth) {
        const windowMs = rule.windowSeconds * 1000;
        const next = Math.max(arrivals.get(key) ?? t, t) + windowMs / rule.limit;
        if (next - t > windowMs)
          return { ok: false, retryAfter: Math.max(1, Math.ceil((next - t - windowMs) / 1000)) };
        arrivals.set(key, next);
        return { ok: true, retryAfter: 0 };
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
      arrivals.clear();
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
  eval(script: string, numKeys: number, ...args: (string | number)[]): Promise<unknown>;
}

/**
 * GCRA for a smooth rule, in one step on the server's clock (every instance shares it): the key
 * holds the theoretical arrival time in µs. ARGV: the µs between hits, the window in µs. Returns
 * 0 when the hit is allowed (and taken), else the ms until one would be.
 */
const SMOOTH_HIT = `
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local nxt = tat + interval
if nxt - now > window then return math.ceil((nxt - now - window) / 1000) end
redis.call('SET', KEYS[1], string.format('%.0f', nxt), 'PX', math.ceil((nxt - now) / 1000))
return 0
`;

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
      if (rule.smooth) {
        // A key of its own: a fixed window's INCR on a time would count past any limit.
        const windowUs = rule.windowSeconds * 1_000_000;
        let waitMs: number;
        try {
          waitMs = Number(
            await redis.eval(
              SMOOTH_HIT,
              1,
              `${prefix}rl:rate:${key}`,
              Math.floor(windowUs / rule.limit),
              windowUs,
            ),
          );
        } catch {
          return local.hit(key, rule);
        }
        return waitMs > 0
          ? { ok: false, retryAfter: Math.max(1, Math.ceil(waitMs / 1000)) }
          : { ok: true, retryAfter: 0 };
      }
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
