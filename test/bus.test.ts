/**
 * The Redis bus (core/ports/bus.ts) against the local Redis: an instance hears its own rings at
 * once and exactly once (not again as Redis's echo), others hear them through Redis.
 */
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { after, before, describe, it } from 'node:test';
import { Redis } from 'ioredis';
import { type Bus, createRedisBus, type LoggedEventRef, type SignalTopics } from '../core/ports/bus.ts';
import { onPostgres, TEST_REDIS_URL } from './helpers.ts';

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
const ref: LoggedEventRef = { seq: 1, type: 'MESSAGE_CREATED', guildId: null, channelId: null, userId: null };

describe('Redis bus', { skip: !onPostgres && 'needs the postgres run (REDIS_URL)' }, () => {
  const prefix = `banter-test-bus:${randomBytes(4).toString('hex')}:`;
  const clients: Redis[] = [];
  const redis = () => {
    const c = new Redis(TEST_REDIS_URL, { lazyConnect: false, maxRetriesPerRequest: 1 });
    clients.push(c);
    return c;
  };
  let a: Bus;
  let b: Bus;
  const heard = { a: [] as unknown[], b: [] as unknown[] };

  before(async () => {
    a = createRedisBus(redis(), redis(), prefix);
    b = createRedisBus(redis(), redis(), prefix);
    for (const [name, bus] of [
      ['a', a],
      ['b', b],
    ] as const) {
      bus.onAnnounce((e) => heard[name].push(e));
      bus.onSignal((t, p) => heard[name].push({ t, p }));
    }
    // Both subscribed (a late subscription would also ring its listeners with [] on 'ready').
    const probe = redis();
    for (let i = 0; i < 100; i++) {
      const [, n] = (await probe.pubsub('NUMSUB', `${prefix}bus:events`)) as [string, number];
      if (Number(n) >= 2) break;
      await sleep(50);
    }
    await sleep(100);
    heard.a = [];
    heard.b = [];
  });
  after(async () => {
    await a.close();
    await b.close();
    for (const c of clients) c.disconnect();
  });

  it('rings its own listeners before Redis answers, once; the other instance hears it once', async () => {
    await a.announce([ref]);
    await Promise.resolve(); // a microtask later: no round trip to Redis
    assert.deepEqual(heard.a, [[ref]], 'heard locally at once');
    await sleep(300);
    assert.deepEqual(heard.a, [[ref]], 'no second ring from the echo');
    assert.deepEqual(heard.b, [[ref]]);
    heard.a = [];
    heard.b = [];
  });

  it('signals likewise: once here at once, once there', async () => {
    const typing: SignalTopics['typing'] = { channelId: 'c', guildId: null, userId: 'u', at: 1 };
    await b.signal('typing', typing);
    await sleep(300);
    assert.deepEqual(heard.b, [{ t: 'typing', p: typing }]);
    assert.deepEqual(heard.a, [{ t: 'typing', p: typing }]);
    heard.a = [];
    heard.b = [];
  });

  it("hears an older instance's bare array of events", async () => {
    const raw = redis();
    await raw.publish(`${prefix}bus:events`, JSON.stringify([ref]));
    await sleep(300);
    assert.deepEqual(heard.a, [[ref]]);
    assert.deepEqual(heard.b, [[ref]]);
    heard.a = [];
    heard.b = [];
  });

  it('neither waits on a Redis that does not answer nor fails to ring its own listeners', async () => {
    // A publisher whose commands never complete (Redis hung, or reconnecting with a queue).
    const hung = { publish: () => new Promise<number>(() => {}) } as unknown as Redis;
    const sub = redis();
    const c = createRedisBus(hung, sub, `${prefix}hung:`);
    const got: unknown[] = [];
    c.onAnnounce((e) => got.push(e));
    c.onSignal((t, p) => got.push({ t, p }));
    const settled = await Promise.race([
      (async () => {
        await c.announce([ref]);
        await c.signal('presence', { userId: 'u', status: 'ONLINE' });
        return true;
      })(),
      sleep(1000).then(() => false),
    ]);
    assert.ok(settled, 'announce and signal returned without Redis');
    await sleep(20);
    assert.deepEqual(
      got.filter((x) => !(Array.isArray(x) && !x.length)),
      [[ref], { t: 'presence', p: { userId: 'u', status: 'ONLINE' } }],
    );
    await c.close();
  });
});
