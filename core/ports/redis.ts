/** What Banter adds to its ioredis clients. */
import type { Redis } from 'ioredis';

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
