/**
 * Redis down or slow (REDIS_URL set, on PostgreSQL): a slow or failed Redis degrades what it
 * carries (cross-instance rings, presence, shared limits), not the server. Requests answer at
 * once, sockets connect, delivery goes on from the log, revocation still reaches other instances.
 * Postgres + its own redis-server (killed, paused and restarted here), two instances.
 */
import assert from 'node:assert/strict';
import { type ChildProcess, spawn } from 'node:child_process';
import { after, before, it } from 'node:test';
import { Redis } from 'ioredis';
import { type App, buildApp } from '../api/app.ts';
import { createDatabase } from '../core/db/client.ts';
import { createHub } from '../core/realtime/hub.ts';
import { createRedisPresence, OFFLINE_GRACE_MS } from '../core/realtime/presence.ts';
import { decodeId } from '../schema/builder.ts';
import { createTestApp, gql, ok, onPostgres, signUp, type TestApp } from './helpers.ts';
import {
  connect,
  freePort,
  guildWithChannel,
  invite,
  send,
  sleep,
  subscribe,
  untilLive,
} from './realtime-helpers.ts';

const skip = !onPostgres;

let redis: ChildProcess | undefined;
let redisPort: number;
let a: TestApp;
let b: App;
let urlA: string;
let urlB: string;

function redisCli(...args: string[]): Promise<string> {
  return new Promise((resolve) => {
    const c = spawn('redis-cli', ['-p', String(redisPort), ...args]);
    let out = '';
    c.stdout.on('data', (d) => {
      out += d;
    });
    c.on('close', () => resolve(out));
  });
}
function startRedis() {
  redis = spawn('redis-server', ['--port', String(redisPort), '--save', '', '--appendonly', 'no'], {
    stdio: 'ignore',
  });
}
async function redisUp() {
  for (let i = 0; i < 100; i++) {
    if ((await redisCli('ping')).includes('PONG')) return;
    await sleep(100);
  }
  throw new Error('redis did not start');
}
async function stopRedis() {
  const r = redis;
  redis = undefined;
  if (!r || r.exitCode !== null) return;
  await new Promise((done) => {
    r.once('exit', done);
    r.kill('SIGKILL');
  });
}

/** Runs `fn`, returns its result and how long it took. */
async function timed<T>(fn: () => Promise<T>): Promise<{ value: T; ms: number }> {
  const t = Date.now();
  const value = await fn();
  return { value, ms: Date.now() - t };
}

const SEND = `mutation($i: SendMessageInput!) { sendMessage(input: $i) { id } }`;
const LOGIN = `mutation($i: LoginInput!) { login(input: $i) { accessToken } }`;
const PRESENCE = `query($id: ID!) { user(id: $id) { presence { status } } }`;
const PRESENCE_EVENTS = `subscription { events { __typename cursor ... on PresenceChanged { user { id } status } ... on MessageCreated { message { id content } } } }`;

/** What the last PresenceChanged for user `id` among `events` says (undefined: none yet). */
const statusOf = (events: any[], id: string) =>
  events.filter((e) => e.__typename === 'PresenceChanged' && e.user.id === id).at(-1)?.status;

before(async () => {
  if (skip) return;
  redisPort = await freePort();
  startRedis();
  await redisUp();
  a = await createTestApp({}, { REDIS_URL: `redis://127.0.0.1:${redisPort}` });
  // A second instance of the same deployment (database, Redis, prefix, secret).
  b = await buildApp({ ...a.config });
  urlA = `ws://127.0.0.1:${await a.start(0)}/graphql`;
  urlB = `ws://127.0.0.1:${await b.start(0)}/graphql`;
});
after(async () => {
  if (skip) return;
  if (!redis) {
    startRedis();
    await redisUp().catch(() => {});
  }
  await b?.stop();
  await a?.destroy();
  await stopRedis();
});

it('Redis down: sends, queries, login, typing, setPresence and new sockets answer within a second or two; delivery goes on', {
  skip,
  timeout: 60_000,
}, async () => {
  const [owner, member] = await Promise.all([signUp(a), signUp(a)]);
  const { guildId, channelId } = await guildWithChannel(a, owner.token);
  await invite(a, owner.token, guildId, member.token);
  await stopRedis();
  // ioredis backs off between reconnects (up to 2 s): what waits on it waits longer later on.
  await sleep(4000);
  try {
    const sent = await timed(() =>
      gql(a, SEND, { i: { channelId, content: 'while down' } }, { token: owner.token }),
    );
    assert.deepEqual(sent.value.errors, undefined, 'sendMessage works without Redis (limits fail open)');
    assert.ok(sent.ms < 1500, `sendMessage took ${sent.ms} ms`);

    const q = await timed(() => gql(a, PRESENCE, { id: owner.id }, { token: member.token }));
    assert.ok(q.ms < 1500, `presence query took ${q.ms} ms`);
    assert.deepEqual(q.value.errors, undefined, 'a query that reads presence still answers');

    const login = await timed(() =>
      gql(a, LOGIN, { i: { login: owner.username, password: 'correct horse battery' } }),
    );
    assert.deepEqual(login.value.errors, undefined, 'login works without Redis');
    assert.ok(login.ms < 1500, `login took ${login.ms} ms`);

    const typing = await timed(() =>
      gql(a, `mutation($c: ID!) { startTyping(channelId: $c) }`, { c: channelId }, { token: owner.token }),
    );
    assert.deepEqual(typing.value.errors, undefined, 'startTyping works without Redis');
    assert.ok(typing.ms < 1500, `startTyping took ${typing.ms} ms`);

    const choose = await timed(() =>
      gql(a, `mutation { setPresence(status: DND) }`, {}, { token: owner.token }),
    );
    assert.ok(choose.ms < 1500, `setPresence took ${choose.ms} ms`);
    // The choice is kept in the database: it is taken, and reaches Redis once Redis is back.
    assert.deepEqual(choose.value.errors, undefined, 'setPresence works without Redis');

    // A new socket on the other instance connects and hears a send made on this one.
    const c = connect(urlB, member.token);
    const s = subscribe(c.client, null, PRESENCE_EVENTS);
    try {
      // (its presence entry waits out the command timeout before the subscription starts)
      await untilLive(b, [member]);
      const t = Date.now();
      const id = await send(a, owner.token, channelId, 'heard on b');
      await s.until((e) => e.some((x) => x.message?.id === id), 5000, 'the send on the other instance');
      assert.ok(Date.now() - t < 1500, `delivery took ${Date.now() - t} ms`);
    } finally {
      s.stop();
      await c.client.dispose();
    }
  } finally {
    startRedis();
    await redisUp();
  }
  // The choice made while Redis was down shows once the owner is online.
  const co = connect(urlB, owner.token);
  const so = subscribe(co.client, null, PRESENCE_EVENTS);
  try {
    const deadline = Date.now() + 10_000;
    let status: string | undefined;
    while (status !== 'DND' && Date.now() < deadline) {
      await sleep(250);
      status = (await gql(a, PRESENCE, { id: owner.id }, { token: member.token })).data?.user?.presence
        ?.status;
    }
    assert.equal(status, 'DND', 'the choice made while Redis was down');
  } finally {
    so.stop();
    await co.client.dispose();
  }
});

it('Redis paused (CLIENT PAUSE 4 s): sends, queries and delivery on both instances do not wait for it', {
  skip,
  timeout: 60_000,
}, async () => {
  await redisUp();
  const [owner, member] = await Promise.all([signUp(a), signUp(a)]);
  const { guildId, channelId } = await guildWithChannel(a, owner.token);
  await invite(a, owner.token, guildId, member.token);
  const ca = connect(urlA, member.token);
  const cb = connect(urlB, member.token);
  const sa = subscribe(ca.client, null, PRESENCE_EVENTS);
  const sb = subscribe(cb.client, null, PRESENCE_EVENTS);
  try {
    await untilLive(a, [member]);
    await untilLive(b, [member]);
    const paused = Date.now();
    await redisCli('client', 'pause', '4000', 'ALL');
    const sent = await timed(() =>
      gql(a, SEND, { i: { channelId, content: 'while paused' } }, { token: owner.token }),
    );
    assert.deepEqual(sent.value.errors, undefined);
    assert.ok(sent.ms < 1500, `sendMessage took ${sent.ms} ms`);
    const id = sent.value.data.sendMessage.id;
    await sa.until((e) => e.some((x) => x.message?.id === id), 5000, 'the send on this instance');
    await sb.until((e) => e.some((x) => x.message?.id === id), 5000, 'the send on the other instance');
    assert.ok(Date.now() - paused < 3000, `delivered ${Date.now() - paused} ms after the pause began`);
    const q = await timed(() => gql(a, PRESENCE, { id: owner.id }, { token: member.token }));
    assert.deepEqual(q.value.errors, undefined);
    assert.ok(q.ms < 1500, `presence query took ${q.ms} ms`);
    const login = await timed(() =>
      gql(b, LOGIN, { i: { login: member.username, password: 'correct horse battery' } }),
    );
    assert.deepEqual(login.value.errors, undefined);
    assert.ok(login.ms < 1500, `login took ${login.ms} ms`);
    // Once Redis answers again (the ring it held comes late, with the log read since): once each.
    await sleep(4000);
    await redisUp();
    const after = await send(a, owner.token, channelId, 'after the pause');
    for (const s of [sa, sb]) {
      await s.until((e) => e.some((x) => x.message?.id === after), 5000, 'a send after the pause');
      const ids = s.events.filter((x) => x.__typename === 'MessageCreated').map((x) => x.message.id);
      assert.deepEqual(ids, [id, after], 'each message once, in order');
    }
  } finally {
    sa.stop();
    sb.stop();
    await ca.client.dispose();
    await cb.client.dispose();
    await redisCli('client', 'unpause');
  }
});

it('started while Redis is down: it listens, /readyz says redis is down, requests work, it stops', {
  skip,
  timeout: 60_000,
}, async () => {
  const c = await buildApp({ ...a.config, redisUrl: `redis://127.0.0.1:${await freePort()}` });
  try {
    const port = await Promise.race([
      c.start(0),
      sleep(10_000).then(() => {
        throw new Error('start() did not finish within 10 s');
      }),
    ]);
    const ready = await fetch(`http://127.0.0.1:${port}/readyz`);
    const body = (await ready.json()) as { checks: Record<string, string> };
    assert.equal(ready.status, 503);
    assert.equal(body.checks.database, 'ok');
    assert.match(body.checks.redis, /^down/);
    const owner = await signUp(c);
    const { channelId } = await guildWithChannel(c, owner.token);
    const sent = await timed(() => send(c, owner.token, channelId, 'no redis'));
    assert.ok(sent.ms < 1500, `sendMessage took ${sent.ms} ms`);
  } finally {
    const stop = await timed(() => c.stop());
    assert.ok(stop.ms < 5000, `stop() took ${stop.ms} ms`);
  }
});

it('a session ended while Redis is down: its socket on the other instance is closed by the periodic check', {
  skip,
  timeout: 60_000,
}, async () => {
  await redisUp();
  const member = await signUp(a);
  const cb = connect(urlB, member.token);
  const sb = subscribe(cb.client, null, PRESENCE_EVENTS);
  try {
    await untilLive(b, [member]);
    assert.equal(cb.closed(), undefined);
    await stopRedis();
    await ok(a, `mutation { logout }`, {}, member.token);
    const t = Date.now();
    // SESSION_CHECK_MS (10 s) plus slack
    while (!cb.closed() && Date.now() - t < 15_000) await sleep(200);
    assert.equal(cb.closed()?.code, 4403, `closed: ${JSON.stringify(cb.closed())}`);
    const r = await gql(b, `query { viewer { __typename } }`, {}, { token: member.token });
    assert.equal(r.errors?.[0]?.extensions?.code, 'UNAUTHENTICATED');
  } finally {
    sb.stop();
    await cb.client.dispose();
    if (!redis) {
      startRedis();
      await redisUp();
    }
  }
});

it('after Redis returns: who connected or left while it was down is shown as they are, to queries and streams', {
  skip,
  timeout: 60_000,
}, async () => {
  await redisUp();
  const [owner, watcher, comer, leaver] = await Promise.all([signUp(a), signUp(a), signUp(a), signUp(a)]);
  const { guildId } = await guildWithChannel(a, owner.token);
  for (const u of [watcher, comer, leaver]) await invite(a, owner.token, guildId, u.token);
  const cw = connect(urlA, watcher.token);
  const sw = subscribe(cw.client, null, PRESENCE_EVENTS);
  const co = connect(urlB, owner.token);
  const so = subscribe(co.client, null, PRESENCE_EVENTS);
  const cl = connect(urlB, leaver.token);
  const sl = subscribe(cl.client, null, PRESENCE_EVENTS);
  const cc = connect(urlB, comer.token);
  let sc: ReturnType<typeof subscribe> | undefined;
  try {
    await sw.until(
      (e) => statusOf(e, owner.id) === 'ONLINE' && statusOf(e, leaver.id) === 'ONLINE',
      5000,
      'owner and leaver online',
    );
    await stopRedis();
    await sleep(500);
    // While Redis is down one comes online and one leaves (for longer than the offline grace).
    sc = subscribe(cc.client, null, PRESENCE_EVENTS);
    sl.stop();
    await cl.client.dispose();
    await sleep(OFFLINE_GRACE_MS + 1500);
    startRedis();
    await redisUp();
    const t = Date.now();
    const q = async (id: string) =>
      (await ok(a, PRESENCE, { id }, watcher.token)).user.presence.status as string;
    const want = { [owner.id]: 'ONLINE', [comer.id]: 'ONLINE', [leaver.id]: 'OFFLINE' };
    const now = async () =>
      Object.fromEntries(await Promise.all(Object.keys(want).map(async (id) => [id, await q(id)])));
    let seen = await now();
    while (Date.now() - t < 10_000 && JSON.stringify(seen) !== JSON.stringify(want)) {
      await sleep(200);
      seen = await now();
    }
    assert.deepEqual(seen, want, `queries ${Date.now() - t} ms after Redis came back`);
    await sw.until(
      (e) => statusOf(e, comer.id) === 'ONLINE' && statusOf(e, leaver.id) === 'OFFLINE',
      8000,
      'the stream: comer online, leaver offline',
    );
    assert.equal(statusOf(sw.events, owner.id), 'ONLINE');
  } finally {
    sw.stop();
    so.stop();
    sc?.stop();
    await cw.client.dispose();
    await co.client.dispose();
    await cc.client.dispose();
  }
});

it('after Redis was paused: who connected or left meanwhile is told to streams (its writes timed out, no reconnect)', {
  skip,
  timeout: 90_000,
}, async () => {
  await redisUp();
  const [owner, watcher, comer, leaver] = await Promise.all([signUp(a), signUp(a), signUp(a), signUp(a)]);
  const { guildId } = await guildWithChannel(a, owner.token);
  for (const u of [watcher, comer, leaver]) await invite(a, owner.token, guildId, u.token);
  const cw = connect(urlA, watcher.token);
  const sw = subscribe(cw.client, null, PRESENCE_EVENTS);
  const cl = connect(urlB, leaver.token);
  const sl = subscribe(cl.client, null, PRESENCE_EVENTS);
  const cc = connect(urlB, comer.token);
  let sc: ReturnType<typeof subscribe> | undefined;
  try {
    await sw.until((e) => statusOf(e, leaver.id) === 'ONLINE', 5000, 'leaver online');
    // Paused past the offline grace: the comer's entry and the leaver's drop are both written
    // while Redis does not answer (each times out on the client, and is applied once it does).
    await redisCli('client', 'pause', String(OFFLINE_GRACE_MS + 2500), 'ALL');
    sc = subscribe(cc.client, null, PRESENCE_EVENTS);
    sl.stop();
    await cl.client.dispose();
    await sleep(OFFLINE_GRACE_MS + 2500);
    await redisUp();
    const q = async (id: string) =>
      (await ok(a, PRESENCE, { id }, watcher.token)).user.presence.status as string;
    const t = Date.now();
    while (Date.now() - t < 5000 && ((await q(comer.id)) !== 'ONLINE' || (await q(leaver.id)) !== 'OFFLINE'))
      await sleep(200);
    assert.deepEqual([await q(comer.id), await q(leaver.id)], ['ONLINE', 'OFFLINE'], 'queries');
    await sw.until(
      (e) => statusOf(e, comer.id) === 'ONLINE' && statusOf(e, leaver.id) === 'OFFLINE',
      30_000,
      'the stream: comer online, leaver offline',
    );
  } finally {
    await redisCli('client', 'unpause');
    sw.stop();
    sc?.stop();
    await cw.client.dispose();
    await cc.client.dispose();
  }
});

// The choice lived only in Redis (presence-choice:<user>): a restarted (empty) Redis lost it, and
// the reconnect's rewrite then told everyone the invisible user was ONLINE. It is kept in the
// database and written again before the entries.
it('after a restarted (empty) Redis, a user who chose INVISIBLE is not shown ONLINE, to queries or streams', {
  skip,
  timeout: 60_000,
}, async () => {
  await redisUp();
  const [owner, watcher, hidden] = await Promise.all([signUp(a), signUp(a), signUp(a)]);
  const { guildId } = await guildWithChannel(a, owner.token);
  for (const u of [watcher, hidden]) await invite(a, owner.token, guildId, u.token);
  await ok(a, `mutation { setPresence(status: INVISIBLE) }`, {}, hidden.token);
  const cw = connect(urlA, watcher.token);
  const sw = subscribe(cw.client, null, PRESENCE_EVENTS);
  // hidden connects once the watcher is live: an ONLINE it is wrongly shown is not missed.
  await untilLive(a, [watcher]);
  const ch = connect(urlB, hidden.token);
  const sh = subscribe(ch.client, null, PRESENCE_EVENTS);
  try {
    await untilLive(b, [hidden]);
    // Nothing of hidden's arrives meanwhile (presence batches leave within 100 ms).
    await sleep(1500);
    assert.equal(statusOf(sw.events, hidden.id) ?? 'OFFLINE', 'OFFLINE', 'invisible: shown OFFLINE');
    await stopRedis();
    await sleep(1000);
    startRedis();
    await redisUp();
    // the reconnect, its settle (RECONNECT_SETTLE_MS) and slack
    await sleep(7000);
    const q = await ok(a, PRESENCE, { id: hidden.id }, watcher.token);
    assert.deepEqual(
      { query: q.user.presence.status, stream: statusOf(sw.events, hidden.id) ?? 'OFFLINE' },
      { query: 'OFFLINE', stream: 'OFFLINE' },
    );
  } finally {
    sw.stop();
    sh.stop();
    await cw.client.dispose();
    await ch.client.dispose();
  }
});

// Redis's answers were read as they came: while it was down every entry read as missing, and
// everyone connected, on either instance, read OFFLINE to queries until it was back (a client
// loading a member list then showed them all offline). What was last shown is answered meanwhile.
it('while Redis is down, queries answer what was last shown of users connected on either instance, not OFFLINE', {
  skip,
  timeout: 60_000,
}, async () => {
  await redisUp();
  const [owner, watcher, onA, onB] = await Promise.all([signUp(a), signUp(a), signUp(a), signUp(a)]);
  const { guildId } = await guildWithChannel(a, owner.token);
  for (const u of [watcher, onA, onB]) await invite(a, owner.token, guildId, u.token);
  await ok(a, `mutation { setPresence(status: DND) }`, {}, onB.token);
  const cw = connect(urlA, watcher.token);
  const sw = subscribe(cw.client, null, PRESENCE_EVENTS);
  await untilLive(a, [watcher]);
  const ca = connect(urlA, onA.token);
  const sa = subscribe(ca.client, null, PRESENCE_EVENTS);
  const cb = connect(urlB, onB.token);
  const sb = subscribe(cb.client, null, PRESENCE_EVENTS);
  try {
    await sw.until(
      (e) => statusOf(e, onA.id) === 'ONLINE' && statusOf(e, onB.id) === 'DND',
      5000,
      'both shown before',
    );
    await stopRedis();
    const q = async (app: App, id: string) =>
      (await ok(app, PRESENCE, { id }, watcher.token)).user.presence.status as string;
    for (const [name, app] of [
      ['a', a],
      ['b', b],
    ] as const)
      assert.deepEqual([await q(app, onA.id), await q(app, onB.id)], ['ONLINE', 'DND'], `asked on ${name}`);
  } finally {
    if (!redis) {
      startRedis();
      await redisUp();
    }
    for (const s of [sw, sa, sb]) s.stop();
    await Promise.all([cw, ca, cb].map((c) => c.client.dispose()));
  }
});

// An instance died shortly before Redis restarted empty (a host restarting both): its users'
// entries went with Redis, so the lapsed sweep never found them, and no instance left told them
// OFFLINE: streams showed them as they last were, for good, while queries read OFFLINE.
it('users of an instance that died just before Redis restarted empty are told OFFLINE to streams', {
  skip,
  timeout: 60_000,
}, async () => {
  await redisUp();
  const [owner, watcher, gone] = await Promise.all([signUp(a), signUp(a), signUp(a)]);
  const { guildId } = await guildWithChannel(a, owner.token);
  for (const u of [watcher, gone]) await invite(a, owner.token, guildId, u.token);
  const cw = connect(urlA, watcher.token);
  const sw = subscribe(cw.client, null, PRESENCE_EVENTS);
  // A third instance, on connections of its own, that dies with the user's socket.
  const dbC = await createDatabase({ url: a.config.databaseUrl, dataDir: '' });
  const redisC = new Redis(`redis://127.0.0.1:${redisPort}`);
  const hubC = createHub(
    { ...a.deps, db: dbC.db },
    { presence: createRedisPresence(redisC, a.config.redisPrefix) },
  );
  try {
    await untilLive(a, [watcher]);
    await hubC.presence.connected(decodeId(gone.id, 'User'));
    await sw.until((e) => statusOf(e, gone.id) === 'ONLINE', 5000, 'online on the third instance');
    // It dies: nothing drops its entry or tells anything.
    await hubC.stop();
    redisC.disconnect();
    await stopRedis();
    startRedis();
    await redisUp();
    await sw.until((e) => statusOf(e, gone.id) === 'OFFLINE', 15_000, 'told OFFLINE once Redis is back');
    assert.equal((await ok(a, PRESENCE, { id: gone.id }, watcher.token)).user.presence.status, 'OFFLINE');
  } finally {
    if (!redis) {
      startRedis();
      await redisUp();
    }
    sw.stop();
    await cw.client.dispose();
    redisC.disconnect();
    await dbC.close();
  }
});
