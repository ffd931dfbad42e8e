/**
 * Banter's ioredis clients (core/ports/redis.ts), against the local Redis through a TCP proxy
 * (tcpProxy), which resets the connection with a command in flight. Postgres mode only, where
 * the suite has Redis. The first case failed on ioredis 5 (redis/ioredis#2147) without the
 * workaround Banter then had (clearSocketTimeoutOnClose); ioredis 6 passes it alone.
 */
import assert from 'node:assert/strict';
import { after, it } from 'node:test';
import { Redis } from 'ioredis';
import { redisClientOptions } from '../core/ports/redis.ts';
import { RECONNECT_SETTLE_MS } from '../core/realtime/presence.ts';
import { onPostgres } from './helpers.ts';
import { sleep, tcpProxy } from './realtime-helpers.ts';

const REDIS = process.env.TEST_REDIS_URL ?? 'redis://127.0.0.1:6379';
const SOCKET_TIMEOUT_MS = 1_000;
const closers: (() => void)[] = [];
after(() => {
  for (const c of closers) c();
});

/** A client through a fresh proxy; counts the connections it lost. */
async function clientThroughProxy() {
  const proxy = await tcpProxy(REDIS);
  const client = new Redis(proxy.url, {
    ...redisClientOptions,
    socketTimeout: SOCKET_TIMEOUT_MS,
    maxRetriesPerRequest: 5,
  });
  client.on('error', () => {});
  const seen = { closes: 0 };
  client.on('close', () => seen.closes++);
  closers.push(() => {
    client.disconnect();
    proxy.close();
  });
  await client.ping();
  return { client, proxy, seen };
}

/** A reset with a PING unanswered; waits until the client is back and its PING answered. */
async function resetWithCommandInFlight(c: Awaited<ReturnType<typeof clientThroughProxy>>) {
  c.proxy.hold();
  const inFlight = c.client.ping();
  await sleep(100);
  c.proxy.cut();
  c.proxy.release();
  c.proxy.mend();
  assert.equal(await inFlight, 'PONG');
  assert.equal(c.seen.closes, 1);
}

it('a reset with a command in flight costs one reconnect, not two', { skip: !onPostgres }, async () => {
  const c = await clientThroughProxy();
  await resetWithCommandInFlight(c);
  // Past the socket timeout armed before the reset: the new connection is kept.
  await sleep(SOCKET_TIMEOUT_MS * 1.5);
  assert.equal(c.seen.closes, 1);
  assert.equal(c.client.status, 'ready');
  assert.equal(await c.client.ping(), 'PONG');
});

it('the socket timeout still replaces a connection gone silent after a reset', {
  skip: !onPostgres,
}, async () => {
  const c = await clientThroughProxy();
  await resetWithCommandInFlight(c);
  c.proxy.hold();
  const unanswered = c.client.ping().catch((err: Error) => err);
  await sleep(SOCKET_TIMEOUT_MS * 1.5);
  assert.equal(c.seen.closes, 2, 'the silent connection was replaced');
  c.proxy.release();
  // Resent on the new connection (maxRetriesPerRequest), or failed with the old one: not lost in a queue.
  const r = await unanswered;
  assert.ok(r === 'PONG' || r instanceof Error);
  assert.equal(await c.client.ping(), 'PONG');
});

it('reconnect attempts stay at most 2 s apart, within what presence waits for the bus', () => {
  // ioredis 6's default retryStrategy backs off to 5 s; presence's RECONNECT_SETTLE_MS assumes 2 s.
  let max = 0;
  for (let times = 1; times <= 1_000; times++) max = Math.max(max, redisClientOptions.retryStrategy(times));
  assert.equal(max, 2_000);
  assert.ok(max < RECONNECT_SETTLE_MS);
});
