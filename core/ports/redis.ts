/** What Banter adds to its ioredis clients. */
import type { RedisOptions } from 'ioredis';

/**
 * Options every Banter client sets, where ioredis 6's defaults differ from 5's and Banter relies
 * on 5's. The rest of 6's changes are taken as they come: RESP3 (`HELLO 3`, back to RESP2 on a
 * server before 6; replies keep their RESP2 shapes), TCP keep-alive after 30 s idle.
 */
export const redisClientOptions = {
  /**
   * A lost connection is retried after 50 ms more at each attempt, at most 2 s apart, as in
   * ioredis 5. 6's default backs off exponentially to 5 s; presence's RECONNECT_SETTLE_MS (3 s)
   * counts on every instance's bus subscriber being back within 2 s of Redis.
   */
  retryStrategy: (times: number) => Math.min(times * 50, 2_000),
  /**
   * No maintenance notifications (Redis Cloud/Enterprise). Within one of their windows ioredis
   * raises commandTimeout and socketTimeout to 10 s and holds writes in its offline queue, where a
   * request would wait on Redis far beyond the bound set here (the app's REDIS_COMMAND_TIMEOUT_MS).
   * A server without them (open-source Redis) refuses the handshake's CLIENT MAINT_NOTIFICATIONS.
   */
  maintNotifications: 'disabled',
} satisfies RedisOptions;
