/** Slow consumers, socket and subscription limits, realtime metrics. */
import assert from 'node:assert/strict';
import { after, before, it } from 'node:test';
import { SlowConsumerError, type Subscription } from '../core/realtime/subscription.ts';
import { decodeAnyId } from '../schema/builder.ts';
import { createTestApp, signUp, type TestApp } from './helpers.ts';
import {
  connect,
  guildWithChannel,
  metricsOf,
  send,
  sleep,
  subscribe,
  untilLive,
} from './realtime-helpers.ts';

let app: TestApp;
let url: string;
let port: number;
before(async () => {
  app = await createTestApp({ rateLimits: false });
  port = await app.start(0);
  url = `ws://127.0.0.1:${port}/graphql`;
});
after(() => app.destroy());

/** A new user with a guild, subscribed to the hub directly, with the hub's bound at `maxPending` until the test resets it. */
async function hubViewer(maxPending: number) {
  const u = await signUp(app);
  const { channelId } = await guildWithChannel(app, u.token);
  const hub = app.deps.realtime!;
  hub.configure({ maxPending });
  return { u, channelId, hub, userId: decodeAnyId(u.id).id };
}

it('cuts off a subscriber that stops reading, and it can resume by cursor', async () => {
  const { u, channelId, hub, userId } = await hubViewer(5);
  try {
    const it = await hub.subscribe({ userId }, null);
    const first = send(app, u.token, channelId, 'first');
    await first;
    const got = await it.next();
    assert.equal(got.value?.type, 'MESSAGE_CREATED');
    // Stop reading: more than 5 rows pile up.
    for (let i = 0; i < 8; i++) await send(app, u.token, channelId, `n${i}`);
    await hub.poke();
    await new Promise((r) => setTimeout(r, 300));
    let failure: unknown;
    try {
      for (;;) {
        const r = await it.next();
        if (r.done) break;
      }
    } catch (err) {
      failure = err;
    }
    assert.ok(failure instanceof SlowConsumerError, `failed with ${failure}`);
    // Resume from the last cursor read: everything after it arrives.
    const resumed = await hub.subscribe({ userId }, got.value!.cursor);
    const contents: string[] = [];
    for (let i = 0; i < 8; i++) contents.push(((await resumed.next()).value as any).payload.messageId);
    assert.equal(new Set(contents).size, 8);
    await resumed.return!();
  } finally {
    hub.configure({ maxPending: 5000 });
  }
});

it('a subscriber whose consumer throws as it is cut off costs the others nothing', async () => {
  const { u, channelId, hub, userId } = await hubViewer(1);
  try {
    // Registered first, so the tailer hands it the row first: it is over its bound at once,
    // and its consumer's close throws.
    const broken = (await hub.subscribe({ userId }, null)) as Subscription;
    let closes = 0;
    broken.attach({
      deliver() {},
      backlog: () => 10,
      close() {
        closes++;
        throw new Error('the consumer broke while closing');
      },
    });
    const good = await hub.subscribe({ userId }, null);
    await send(app, u.token, channelId, 'still delivered');
    await hub.poke();
    const next = await Promise.race([
      good.next(),
      new Promise<'timeout'>((r) => setTimeout(() => r('timeout'), 5000)),
    ]);
    assert.notEqual(next, 'timeout', 'the second subscriber got the row');
    assert.equal((next as IteratorResult<{ type: string }>).value.type, 'MESSAGE_CREATED');
    assert.equal(closes, 1);
    assert.ok(broken.closed);
    await good.return!();
  } finally {
    hub.configure({ maxPending: 5000 });
  }
});

it('limits sockets per user (4029) and operations per socket (RATE_LIMITED)', async () => {
  const u = await signUp(app);
  const conns = Array.from({ length: 21 }, () => connect(url, u.token));
  const streams = conns.map((c) => subscribe(c.client));
  const deadline = Date.now() + 5000;
  while (!conns.some((c) => c.closed()) && Date.now() < deadline) await new Promise((r) => setTimeout(r, 50));
  assert.deepEqual(conns.map((c) => c.closed()?.code).filter(Boolean), [4029]);
  for (const s of streams) s.stop();
  for (const c of conns) await c.client.dispose();

  const { client } = connect(url, u.token);
  const many = Array.from({ length: 52 }, () => subscribe(client));
  const refused = () => many.some((s) => s.errors.some((e) => e.extensions?.code === 'RATE_LIMITED'));
  const until = Date.now() + 10_000;
  while (!refused() && Date.now() < until) await sleep(50);
  const limited = many.filter((s) => s.errors.some((e) => e.extensions?.code === 'RATE_LIMITED'));
  assert.ok(limited.length >= 1, 'the operations past the limit are refused');
  await client.dispose();
});

it('an anonymous socket that authenticates in its subscribe, its user at the socket limit, is told RATE_LIMITED (not UNAUTHENTICATED: its token is fine)', async () => {
  const u = await signUp(app);
  const conns = Array.from({ length: 20 }, () => connect(url, u.token));
  const streams = conns.map((c) => subscribe(c.client));
  const anon = connect(url, undefined);
  try {
    // The user's 20 sockets are in (the limit), before the anonymous one authenticates.
    for (let i = 0; i < 100 && (await metricsOf(url))('banter_ws_open_sockets') < 20; i++) await sleep(50);
    const failures: any[] = [];
    const stop = anon.client.subscribe(
      {
        query: 'subscription { events { __typename } }',
        extensions: { headers: { authorization: `Bearer ${u.token}` } },
      },
      { next: () => {}, error: (e) => failures.push(e), complete: () => {} },
    );
    const deadline = Date.now() + 5000;
    while (!failures.length && Date.now() < deadline) await sleep(50);
    stop();
    const [e] = failures.flat() as { message: string; extensions?: Record<string, unknown> }[];
    assert.deepEqual(
      { message: e?.message, extensions: e?.extensions },
      { message: 'Too many sockets for this user', extensions: { code: 'RATE_LIMITED', retryAfter: 5 } },
    );
  } finally {
    for (const s of streams) s.stop();
    await Promise.all([...conns, anon].map((c) => c.client.dispose()));
  }
});

it('exposes realtime metrics', async () => {
  const u = await signUp(app);
  const { client } = connect(url, u.token);
  const s = subscribe(client);
  const { channelId } = await guildWithChannel(app, u.token);
  await untilLive(app, [u]);
  await send(app, u.token, channelId, 'count me');
  await s.until((e) => e.some((x) => x.__typename === 'MessageCreated'));
  const text = await (await fetch(`http://127.0.0.1:${port}/metrics`)).text();
  if (process.env.DBG)
    console.log(
      text
        .split('\n')
        .filter((l) => l.startsWith('banter_ws') || l.startsWith('banter_events'))
        .join('\n'),
    );
  assert.match(text, /banter_ws_open_sockets 1/);
  assert.match(text, /banter_ws_active_subscriptions 1/);
  assert.match(text, /banter_events_delivered_total\{shared="false"\} [1-9]/);
  assert.match(text, /banter_ws_closes_total\{code="4029"\} 1/);
  assert.match(text, /banter_events_replay_rows_count/);
  await client.dispose();
});
