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
import { EVENTS, holdsWithin, SMALL_WS_LIMITS, sleep, sseStream, untilLive } from './realtime-helpers.ts';

let app: TestApp;
let httpUrl: string;
before(async () => {
  app = await createTestApp({
    rateLimits: false,
    ws: SMALL_WS_LIMITS,
  });
  httpUrl = `http://127.0.0.1:${await app.start(0)}/graphql`;
});
after(() => app.destroy());

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
    await holdsWithin(() => s.ended || hub.liveCount(id) === 1, 10_000);
    assert.deepEqual(
      s.errors.map((e) => e.extensions?.code),
      [],
      'not refused as past the limit',
    );
    await untilLive(app, [u], 1);
    s.stop();
    assert.ok(await holdsWithin(() => hub.liveCount(id) === 0), `subscribers left: ${hub.liveCount(id)}`);
  });
});

describe('streams whose client goes away while they are set up', () => {
  it('give their places back, whenever the abort comes', { timeout: 60_000 }, async () => {
    const u = await signUp(app);
    const id = decodeAnyId(u.id).id;
    const hub = app.deps.realtime!;
    // Aborted from before the request is sent to after it is live, on a spread of moments.
    for (let i = 0; i < 40; i++) {
      const ac = new AbortController();
      const res = fetch(`${httpUrl}?${new URLSearchParams({ query: EVENTS })}`, {
        headers: { accept: 'text/event-stream', authorization: `Bearer ${u.token}` },
        signal: ac.signal,
      }).catch(() => undefined);
      if (i % 4 === 0) await new Promise((r) => setImmediate(r));
      else if (i % 4 === 1) await sleep(i % 7);
      else if (i % 4 === 2) await res;
      ac.abort();
      await res;
    }
    assert.ok(await holdsWithin(() => hub.liveCount(id) === 0), `subscribers left: ${hub.liveCount(id)}`);
    // The three places are free: three streams get in, none refused.
    const streams = [0, 1, 2].map(() => sseStream(httpUrl, u.token, { method: 'GET' }));
    await holdsWithin(() => streams.some((s) => s.ended) || hub.liveCount(id) === 3, 10_000);
    assert.deepEqual(
      streams.flatMap((s) => s.errors.map((e) => e.extensions?.code)),
      [],
    );
    assert.ok(
      await holdsWithin(() => hub.liveCount(id) === 3, 30_000),
      `live ${hub.liveCount(id)}; ended ${streams.map((s) => s.ended)}; errors ${JSON.stringify(streams.map((s) => s.errors))}`,
    );
    for (const s of streams) s.stop();
    assert.ok(await holdsWithin(() => hub.liveCount(id) === 0), 'let go');
  });
});
