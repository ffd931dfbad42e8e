/** What Banter adds to its ioredis clients. */
import type { Redis, RedisOptions } from 'ioredis';

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

/**
 * ioredis 5 arms its `socketTimeout` timer when a command is written and clears it when data
 * arrives, but not when the connection closes (redis/ioredis#2147, fixed in 6.0.0). After a reset
 * with a command in flight, the timer outlives the connection and, when it fires, destroys the
 * one that replaced it, healthy or not: one more reconnect after every Redis blip, with what it
 * costs (commands failed or resent, the bus's subscriber deaf until it resubscribes). Cleared
 * here when the connection closes; a command resent on the next one arms a fresh timer.
 */
export function clearSocketTimeoutOnClose(client: Redis): Redis {
  const c = client as unknown as { socketTimeoutTimer?: ReturnType<typeof setTimeout> };
  client.on('close', () => {
    if (c.socketTimeoutTimer === undefined) return;
    clearTimeout(c.socketTimeoutTimer);
    c.socketTimeoutTimer = undefined;
  });
  return client;
}
