/**
 * A server that runs for weeks keeps nothing of the subscribers that have gone: sockets that
 * subscribed, got their events and closed leave no subscription, socket or viewer state behind
 * once garbage is collected. Counted with weak references to each subscription the hub handed
 * out, after a full collection (`gc`, turned on here for the test process).
 */
import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import { setFlagsFromString } from 'node:v8';
import { runInNewContext } from 'node:vm';
import { decodeAnyId } from '../schema/builder.ts';
import { createTestApp, signUp, type TestApp } from './helpers.ts';
import { connect, guildWithChannel, send, subscribe, untilLive } from './realtime-helpers.ts';

setFlagsFromString('--expose-gc');
const gc = runInNewContext('gc') as () => void;

let app: TestApp;
let url: string;
before(async () => {
  app = await createTestApp({ rateLimits: false });
  url = `ws://127.0.0.1:${await app.start(0)}/graphql`;
});
after(() => app.destroy());

/** Subscriptions still reachable after full collections (WeakRef.deref() holds one until the turn ends). */
async function stillAlive(refs: WeakRef<object>[]) {
  for (let i = 0; i < 4; i++) {
    await new Promise((r) => setImmediate(r));
    gc();
  }
  return refs.filter((r) => r.deref() !== undefined).length;
}

async function until(pred: () => boolean, what: string, ms = 10_000) {
  const deadline = Date.now() + ms;
  while (!pred()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

describe('what closed subscribers leave behind', () => {
  it('sockets that subscribed, got an event each and closed are all collected', async () => {
    const hub = app.deps.realtime!;
    const refs: WeakRef<object>[] = [];
    const original = hub.subscribe;
    hub.subscribe = async (...a: Parameters<typeof original>) => {
      const s = await original(...a);
      refs.push(new WeakRef(s));
      return s;
    };
    try {
      const owner = await signUp(app);
      const ownerId = decodeAnyId(owner.id).id;
      const { channelId } = await guildWithChannel(app, owner.token);
      const N = 8;
      for (let i = 0; i < N; i++) {
        // One socket at a time: it subscribes, gets the message sent for it, and closes.
        const c = connect(url, owner.token);
        const s = subscribe(c.client);
        await untilLive(app, [owner]);
        await send(app, owner.token, channelId, `m${i}`);
        await s.until((ev) => ev.some((e) => e.__typename === 'MessageCreated'), 10_000, `m${i}`);
        await c.client.dispose();
        await until(() => hub.liveCount(ownerId) === 0 && hub.subscriberCount === 0, 'the socket to close');
      }
      assert.equal(refs.length, N);
      // Before: each subscription stayed reachable from the next one's starting position (the
      // hub's last row, with the shared executions that row had, whose owner was the one before):
      // a chain through every subscriber since the process started.
      assert.equal(await stillAlive(refs), 0, 'closed subscriptions still reachable');
    } finally {
      hub.subscribe = original;
    }
  });
});
