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
    probe = redis();
    for (let i = 0; i < 100; i++) {
      const [, n] = (await probe.pubsub('NUMSUB', `${prefix}bus:events`)) as [string, number];
      if (Number(n) >= 2) break;
      await sleep(50);
    }
    await heardAll();
    heard.a = [];
    heard.b = [];
  });

  /**
   * Redis sends a subscriber what it published in the order it published it: once a marker
   * published now has reached both instances, so has everything Redis took before it (an echo, a
   * second copy), heard or skipped. The marker is taken out of what they heard.
   */
  let probe: Redis;
  let marks = 0;
  const isMark = (x: unknown) => Array.isArray(x) && x.length === 1 && x[0].seq < 0;
  async function heardAll() {
    const mark = { ...ref, seq: -++marks };
    await probe.publish(`${prefix}bus:events`, JSON.stringify([mark]));
    const has = (xs: unknown[]) => xs.some((x) => isMark(x) && (x as LoggedEventRef[])[0].seq === mark.seq);
    for (let i = 0; i < 500 && !(has(heard.a) && has(heard.b)); i++) await sleep(20);
    assert.ok(has(heard.a) && has(heard.b), 'the marker reached both instances');
    heard.a = heard.a.filter((x) => !isMark(x));
    heard.b = heard.b.filter((x) => !isMark(x));
  }

  /** Until `pred` holds of what the instances heard (bounded). */
  async function until(pred: () => boolean, what: string) {
    for (let i = 0; i < 500 && !pred(); i++) await sleep(20);
    assert.ok(pred(), `${what}: ${JSON.stringify(heard)}`);
  }
  after(async () => {
    await a.close();
    await b.close();
    for (const c of clients) c.disconnect();
  });

  it('rings its own listeners before Redis answers, once; the other instance hears it once', async () => {
    await a.announce([ref]);
    await Promise.resolve(); // a microtask later: no round trip to Redis
    assert.deepEqual(heard.a, [[ref]], 'heard locally at once');
    // Redis has taken it once b hears it: its echo to a comes before the marker.
    await until(() => heard.b.length > 0, 'b hears it');
    await heardAll();
    assert.deepEqual(heard.a, [[ref]], 'no second ring from the echo');
    assert.deepEqual(heard.b, [[ref]]);
    heard.a = [];
    heard.b = [];
  });

  it('signals likewise: once here at once, once there', async () => {
    const typing: SignalTopics['typing'] = { channelId: 'c', guildId: null, userId: 'u', at: 1 };
    await b.signal('typing', typing);
    await until(() => heard.a.length > 0, 'a hears it');
    await heardAll();
    assert.deepEqual(heard.b, [{ t: 'typing', p: typing }]);
    assert.deepEqual(heard.a, [{ t: 'typing', p: typing }]);
    heard.a = [];
    heard.b = [];
  });

  it("hears an older instance's bare array of events", async () => {
    const raw = redis();
    await raw.publish(`${prefix}bus:events`, JSON.stringify([ref]));
    await heardAll();
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
    // Their listeners are rung in microtasks: all run before the next turn of the event loop.
    await new Promise((r) => setImmediate(r));
    assert.deepEqual(
      got.filter((x) => !(Array.isArray(x) && !x.length)),
      [[ref], { t: 'presence', p: { userId: 'u', status: 'ONLINE' } }],
    );
    await c.close();
  });
});
