/**
 * An `events` subscription over HTTP that yoga answers without a stream: a request that does not
 * accept `text/event-stream` (`Accept: application/json`, a client that POSTs every operation
 * alike) gets 406 Not Acceptable, and nothing ever reads, returns or aborts the subscription it
 * set up. It must not stay registered: its hub subscriber, and its place in the user's limit.
 */
import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import { decodeAnyId } from '../schema/builder.ts';
import { createTestApp, signUp, type TestApp } from './helpers.ts';
import { EVENTS, sleep, sseStream, untilLive } from './realtime-helpers.ts';

let app: TestApp;
let httpUrl: string;
before(async () => {
  app = await createTestApp({
    rateLimits: false,
    ws: {
      socketsPerUser: 3,
      operationsPerSocket: 4,
      connectionsPerIpPerMinute: 1000,
      initTimeoutMs: 2000,
      keepAliveMs: 12_000,
    },
  });
  httpUrl = `http://127.0.0.1:${await app.start(0)}/graphql`;
});
after(() => app.destroy());

/** Waits (bounded) until `pred` holds; returns whether it did. */
async function until(pred: () => boolean, ms = 5000) {
  const deadline = Date.now() + ms;
  while (!pred() && Date.now() < deadline) await sleep(20);
  return pred();
}

describe('a subscription answered 406 (no event stream accepted)', () => {
  it('lets its subscriber go and takes no place in the per-user limit', { timeout: 60_000 }, async () => {
    const u = await signUp(app);
    const id = decodeAnyId(u.id).id;
    const hub = app.deps.realtime!;
    for (let i = 0; i < 3; i++) {
      const res = await fetch(httpUrl, {
        method: 'POST',
        headers: {
          'content-type': 'application/json',
          accept: 'application/json',
          authorization: `Bearer ${u.token}`,
        },
        body: JSON.stringify({ query: EVENTS }),
        signal: AbortSignal.timeout(10_000),
      });
      assert.equal(res.status, 406);
      await res.arrayBuffer();
    }
    // The user's three places are all free: a stream gets in.
    const s = sseStream(httpUrl, u.token, { method: 'GET' });
    await until(() => s.ended || hub.liveCount(id) === 1, 10_000);
    assert.deepEqual(
      s.errors.map((e) => e.extensions?.code),
      [],
      'not refused as past the limit',
    );
    await untilLive(app, [u], 1);
    s.stop();
    assert.ok(await until(() => hub.liveCount(id) === 0), `subscribers left: ${hub.liveCount(id)}`);
  });
});
