import assert from 'node:assert/strict';
import { after, before, it, mock } from 'node:test';
import { Redis } from 'ioredis';
import { createDatabase } from '../core/db/client.ts';
import type { Bus } from '../core/ports/bus.ts';
import { createHub } from '../core/realtime/hub.ts';
import {
  CONNECTION_TTL_MS,
  createMemoryPresence,
  createPresenceTracker,
  createRedisPresence,
  OFFLINE_GRACE_MS,
} from '../core/realtime/presence.ts';
import { presenceAudience } from '../core/realtime/visibility.ts';
import { decodeId } from '../schema/builder.ts';
import { createTestApp, ok, onPostgres, signUp, TEST_REDIS_URL, type TestApp } from './helpers.ts';
import {
  connect,
  guildWithChannel,
  invite,
  subscribe,
  tcpProxy,
  throughPresenceMarker,
  untilLive,
} from './realtime-helpers.ts';

let app: TestApp;
let url: string;
before(async () => {
  app = await createTestApp({ rateLimits: false });
  url = `ws://127.0.0.1:${await app.start(0)}/graphql`;
});
after(() => app.destroy());

const Q = `subscription { events { __typename cursor ... on PresenceChanged { user { id } status } } }`;
const statuses = (events: any[], id: string) =>
  events.filter((e) => e.__typename === 'PresenceChanged' && e.user.id === id).map((e) => e.status);

it('presence: online with a socket, invisible shown offline, offline after the last socket plus grace; only to people who share a guild', {
  timeout: 30_000,
}, async () => {
  const [a, b, stranger] = await Promise.all([signUp(app), signUp(app), signUp(app)]);
  const { guildId } = await guildWithChannel(app, a.token);
  await invite(app, a.token, guildId, b.token);
  const cb = connect(url, b.token);
  const cs = connect(url, stranger.token);
  const sb = subscribe(cb.client, null, Q);
  const ss = subscribe(cs.client, null, Q);
  // a's ONLINE is not replayed to a stream started later.
  await untilLive(app, [b, stranger]);

  const ca = connect(url, a.token);
  const sa = subscribe(ca.client, null, Q);
  await sb.until((e) => statuses(e, a.id).includes('ONLINE'), 5000, 'A online');
  const q = `query($id: ID!) { user(id: $id) { presence { status } } }`;
  assert.equal((await ok(app, q, { id: a.id }, b.token)).user.presence.status, 'ONLINE');

  await ok(app, `mutation { setPresence(status: INVISIBLE) }`, {}, a.token);
  await sb.until((e) => statuses(e, a.id).at(-1) === 'OFFLINE', 5000, 'A invisible');
  assert.equal((await ok(app, q, { id: a.id }, b.token)).user.presence.status, 'OFFLINE');
  await ok(app, `mutation { setPresence(status: DND) }`, {}, a.token);
  await sb.until((e) => statuses(e, a.id).at(-1) === 'DND', 5000, 'A dnd');

  sa.stop();
  await ca.client.dispose();
  await sb.until((e) => statuses(e, a.id).at(-1) === 'OFFLINE', 10_000, 'A offline after grace');
  assert.deepEqual(statuses(sb.events, a.id), ['ONLINE', 'OFFLINE', 'DND', 'OFFLINE']);
  assert.equal(statuses(ss.events, a.id).length, 0, 'a stranger sees nothing');
  assert.ok(sb.events.every((e) => e.cursor === null));
  await cb.client.dispose();
  await cs.client.dispose();
});

it('presence respects blocks: a blocker turns OFFLINE to the blocked user, who hears nothing more of it until unblocked', {
  timeout: 30_000,
}, async () => {
  const [a, blocked, friend] = await Promise.all([signUp(app), signUp(app), signUp(app)]);
  const { guildId } = await guildWithChannel(app, a.token);
  await invite(app, a.token, guildId, blocked.token);
  await invite(app, a.token, guildId, friend.token);
  const cv = connect(url, blocked.token);
  const cf = connect(url, friend.token);
  const sv = subscribe(cv.client, null, Q);
  const sf = subscribe(cf.client, null, Q);
  await untilLive(app, [blocked, friend]);
  // The blocked user's subscription has already looked a up (shown), so the block must reach
  // its cache, not only fresh lookups.
  const cb0 = connect(url, a.token);
  const sa0 = subscribe(cb0.client, null, Q);
  await sv.until((e) => statuses(e, a.id).includes('ONLINE'), 5000, 'A online before the block');
  await ok(app, `mutation($u: ID!) { blockUser(userId: $u) { kind } }`, { u: blocked.id }, a.token);
  await sv.until((e) => statuses(e, a.id).at(-1) === 'OFFLINE', 5000, 'A offline to the blocked user');

  await ok(app, `mutation { setPresence(status: DND) }`, {}, a.token);
  await sf.until((e) => statuses(e, a.id).at(-1) === 'DND', 5000, 'friend sees DND');
  // The marker: the friend's own change, chosen on the same instance after a's DND.
  const [heard] = await throughPresenceMarker(app, friend, 'IDLE', [sv]);
  assert.deepEqual(statuses(heard, a.id), ['ONLINE', 'OFFLINE'], 'no PresenceChanged to the blocked user');

  const q = `query($id: ID!) { user(id: $id) { presence { status } } }`;
  assert.equal((await ok(app, q, { id: a.id }, friend.token)).user.presence.status, 'DND');
  assert.equal((await ok(app, q, { id: a.id }, blocked.token)).user.presence.status, 'OFFLINE');
  // The blocker still sees the blocked user's presence (the block is one-way).
  assert.equal((await ok(app, q, { id: blocked.id }, a.token)).user.presence.status, 'ONLINE');

  // Unblocked: the stream shows the status again, without waiting for it to change.
  await ok(app, `mutation($u: ID!) { unblockUser(userId: $u) { kind } }`, { u: blocked.id }, a.token);
  await sv.until((e) => statuses(e, a.id).at(-1) === 'DND', 5000, 'A shown again after the unblock');
  assert.deepEqual(statuses(sv.events, a.id), ['ONLINE', 'OFFLINE', 'DND']);
  assert.equal((await ok(app, q, { id: a.id }, blocked.token)).user.presence.status, 'DND');
  sa0.stop();
  await Promise.all([cb0.client.dispose(), cv.client.dispose(), cf.client.dispose()]);
});

it('an invisible user coming and going announces nothing; the next visible arrival is what members hear', {
  timeout: 30_000,
}, async () => {
  const [a, b, c] = await Promise.all([signUp(app), signUp(app), signUp(app)]);
  const { guildId } = await guildWithChannel(app, a.token);
  await invite(app, a.token, guildId, b.token);
  await invite(app, a.token, guildId, c.token);
  await ok(app, `mutation { setPresence(status: INVISIBLE) }`, {}, a.token);
  // (the choice itself is signalled; presence batches leave within 100 ms)
  await new Promise((r) => setTimeout(r, 300));
  const cb = connect(url, b.token);
  const sb = subscribe(cb.client, null, Q);
  await untilLive(app, [b]);
  for (let i = 0; i < 3; i++) {
    const ca = connect(url, a.token);
    const sa = subscribe(ca.client, null, Q);
    await new Promise((r) => setTimeout(r, 200));
    sa.stop();
    await ca.client.dispose();
  }
  await new Promise((r) => setTimeout(r, OFFLINE_GRACE_MS + 300));
  const cc = connect(url, c.token);
  const sc = subscribe(cc.client, null, Q);
  await sb.until((e) => statuses(e, c.id).includes('ONLINE'), 5000, 'C online');
  assert.deepEqual(statuses(sb.events, a.id), [], 'nothing of the invisible user');
  sc.stop();
  await cc.client.dispose();
  await cb.client.dispose();
});

// presenceAudience counted a shared guild or DM only: friends with neither (the usual case: a
// request accepted, no DM opened yet) read each other OFFLINE for good, and their streams told
// nothing, so a friends list showed everyone offline.
it('friends who share no guild nor DM see each other, in queries and on the stream; a pending request does not', {
  timeout: 30_000,
}, async () => {
  const [f1, f2, asker, g1, g2] = await Promise.all([
    signUp(app),
    signUp(app),
    signUp(app),
    signUp(app),
    signUp(app),
  ]);
  const befriend = async (from: { id: string; token: string }, to: { id: string; token: string }) => {
    await ok(app, `mutation($u: ID!) { sendFriendRequest(userId: $u) { kind } }`, { u: to.id }, from.token);
    await ok(app, `mutation($u: ID!) { acceptFriendRequest(userId: $u) { kind } }`, { u: from.id }, to.token);
  };
  await befriend(f1, f2);
  await ok(app, `mutation($u: ID!) { sendFriendRequest(userId: $u) { kind } }`, { u: f2.id }, asker.token);
  const c1 = connect(url, f1.token);
  const ca = connect(url, asker.token);
  const s1 = subscribe(c1.client, null, Q);
  const sa = subscribe(ca.client, null, Q);
  await untilLive(app, [f1, asker]);
  const c2 = connect(url, f2.token);
  const s2 = subscribe(c2.client, null, Q);
  const cg1 = connect(url, g1.token);
  const cg2 = connect(url, g2.token);
  const sg1 = subscribe(cg1.client, null, Q);
  const sg2 = subscribe(cg2.client, null, Q);
  try {
    await s1.until((e) => statuses(e, f2.id).at(-1) === 'ONLINE', 5000, 'the friend online on the stream');
    const q = `query($id: ID!) { user(id: $id) { presence { status } } }`;
    assert.equal((await ok(app, q, { id: f2.id }, f1.token)).user.presence.status, 'ONLINE');
    assert.equal((await ok(app, q, { id: f1.id }, f2.token)).user.presence.status, 'ONLINE');
    assert.equal((await ok(app, q, { id: f2.id }, asker.token)).user.presence.status, 'OFFLINE');
    // Two users already online become friends: each is told the other's status at once.
    await untilLive(app, [g1, g2]);
    await befriend(g1, g2);
    await sg1.until((e) => statuses(e, g2.id).at(-1) === 'ONLINE', 5000, 'g2 shown to g1');
    await sg2.until((e) => statuses(e, g1.id).at(-1) === 'ONLINE', 5000, 'g1 shown to g2');
    // The marker: the asker's own change, told after f2's arrival (batches leave in order).
    const [heard] = await throughPresenceMarker(app, asker, 'IDLE', [sa]);
    assert.deepEqual(statuses(heard, f2.id), [], 'nothing of f2 to a pending request');
  } finally {
    for (const s of [s1, sa, s2, sg1, sg2]) s.stop();
    await Promise.all([c1, ca, c2, cg1, cg2].map((c) => c.client.dispose()));
  }
});

// What a user chose could not be read back: its own presence is what others see, OFFLINE while
// INVISIBLE and before its socket is open (a client starting up), so a status picker could not
// show DND or INVISIBLE until the user changed it again.
it('the viewer reads back the status it chose, with no socket open, INVISIBLE included', async () => {
  const u = await signUp(app);
  const q = `{ viewer { presenceChoice user { presence { status } } } }`;
  assert.deepEqual((await ok(app, q, {}, u.token)).viewer, {
    presenceChoice: 'ONLINE',
    user: { presence: { status: 'OFFLINE' } },
  });
  for (const status of ['INVISIBLE', 'DND', 'IDLE', 'ONLINE']) {
    await ok(app, `mutation($s: PresenceChoice!) { setPresence(status: $s) }`, { s: status }, u.token);
    assert.equal((await ok(app, q, {}, u.token)).viewer.presenceChoice, status);
  }
});

// Only the target of a change was looked at, for a block and only when it still shared a guild or
// DM with the actor: friends who shared neither, once the friendship ended (removed, or by a
// block), kept showing each other as they last were on their streams, while queries read OFFLINE.
it('friends who share nothing else are told each other OFFLINE once the friendship ends, removed or by a block', {
  timeout: 30_000,
}, async () => {
  const [f1, f2, g1, g2] = await Promise.all([signUp(app), signUp(app), signUp(app), signUp(app)]);
  for (const [x, y] of [
    [f1, f2],
    [g1, g2],
  ]) {
    await ok(app, `mutation($u: ID!) { sendFriendRequest(userId: $u) { kind } }`, { u: y.id }, x.token);
    await ok(app, `mutation($u: ID!) { acceptFriendRequest(userId: $u) { kind } }`, { u: x.id }, y.token);
  }
  const conns = [f1, f2, g1, g2].map((u) => connect(url, u.token));
  const [s1, s2, t1, t2] = conns.map((c) => subscribe(c.client, null, Q));
  try {
    const shown = async (s: typeof s1, u: { id: string }, status: string, what: string) =>
      s.until((e) => statuses(e, u.id).at(-1) === status, 5000, what);
    await shown(s1, f2, 'ONLINE', 'f2 to f1');
    await shown(s2, f1, 'ONLINE', 'f1 to f2');
    await shown(t1, g2, 'ONLINE', 'g2 to g1');
    await shown(t2, g1, 'ONLINE', 'g1 to g2');
    await ok(app, `mutation($u: ID!) { removeFriend(userId: $u) { kind } }`, { u: f2.id }, f1.token);
    await shown(s1, f2, 'OFFLINE', 'f2 offline to f1 once removed');
    await shown(s2, f1, 'OFFLINE', 'f1 offline to f2 once removed');
    await ok(app, `mutation($u: ID!) { blockUser(userId: $u) { kind } }`, { u: g2.id }, g1.token);
    await shown(t2, g1, 'OFFLINE', 'the blocker offline to the blocked ex-friend');
    await shown(t1, g2, 'OFFLINE', 'the blocked ex-friend offline to the blocker');
    const q = `query($id: ID!) { user(id: $id) { presence { status } } }`;
    for (const [viewer, other] of [
      [f1, f2],
      [f2, f1],
      [g1, g2],
      [g2, g1],
    ])
      assert.equal((await ok(app, q, { id: other.id }, viewer.token)).user.presence.status, 'OFFLINE');
  } finally {
    for (const s of [s1, s2, t1, t2]) s.stop();
    await Promise.all(conns.map((c) => c.client.dispose()));
  }
});

it('one statement decides who may see a batch of presence changes: guild members and DM partners, not strangers, not whom the subject blocked', async () => {
  const [a, member, dmPartner, stranger, blockedMember] = await Promise.all([
    signUp(app),
    signUp(app),
    signUp(app),
    signUp(app),
    signUp(app),
  ]);
  const { guildId } = await guildWithChannel(app, a.token);
  await invite(app, a.token, guildId, member.token);
  await invite(app, a.token, guildId, blockedMember.token);
  await ok(
    app,
    `mutation($u: [ID!]!) { openDirectChannel(userIds: $u) { id } }`,
    { u: [dmPartner.id] },
    a.token,
  );
  await ok(app, `mutation($u: ID!) { blockUser(userId: $u) { kind } }`, { u: blockedMember.id }, a.token);
  const id = (u: { id: string }) => decodeId(u.id, 'User', 'id');
  const viewers = [member, dmPartner, stranger, blockedMember].map(id);
  const audience = await presenceAudience(app.deps.db, [id(a), id(member)], viewers);
  assert.deepEqual([...audience.get(id(a))!].sort(), [id(member), id(dmPartner)].sort());
  // member shares the guild with blockedMember (and with itself: a viewer's own presence is decided before)
  assert.deepEqual([...audience.get(id(member))!].sort(), [id(member), id(blockedMember)].sort());
});

it('a connection whose first presence write fails still gets an id, refreshed while open and released at close (ONLINE forever before)', async () => {
  mock.timers.enable({ apis: ['setInterval', 'setTimeout'] });
  try {
    const memory = createMemoryPresence();
    let down = true;
    const touched: string[][] = [];
    const dropped: string[] = [];
    const store = {
      ...memory,
      async touch(userId: string, ids: string[]) {
        if (down) throw new Error('presence store unreachable');
        touched.push(ids);
        await memory.touch(userId, ids);
      },
      async drop(userId: string, id: string) {
        dropped.push(id);
        await memory.drop(userId, id);
      },
    };
    const bus = { signal: async () => {} } as unknown as Bus;
    const tracker = createPresenceTracker(store, bus, 'i1');
    try {
      // The store is down when the socket connects: the caller still gets the id to release.
      const id = await tracker.connected('u1');
      assert.ok(id, 'an id for the caller to release');
      down = false;
      // The store is back: the refresh writes the entry while the socket is open.
      mock.timers.tick(CONNECTION_TTL_MS / 3);
      await new Promise((r) => setImmediate(r));
      assert.deepEqual(touched, [[id]]);
      assert.equal((await memory.shown(['u1'])).get('u1'), 'ONLINE');
      // The socket closes: the id is dropped after the grace and refreshed no more.
      tracker.disconnected('u1', id);
      mock.timers.tick(OFFLINE_GRACE_MS);
      await new Promise((r) => setImmediate(r));
      assert.deepEqual(dropped, [id]);
      mock.timers.tick(CONNECTION_TTL_MS);
      await new Promise((r) => setImmediate(r));
      assert.deepEqual(touched, [[id]], 'not refreshed after its socket closed');
      assert.equal((await memory.shown(['u1'])).get('u1'), 'OFFLINE');
    } finally {
      tracker.stop();
    }
  } finally {
    mock.timers.reset();
  }
});

// Two instances: the user chooses INVISIBLE on A while a socket of theirs connects on B. B read
// the choice (ONLINE) from the database before A saved it, and its write of that copy, with the
// connection's entries, reached Redis after A's: the stale ONLINE stayed in the store (the
// refresh touches without a choice), shown to queries and announced to streams, while the
// database said INVISIBLE.
it('a status chosen on one instance while a socket connects on another is not overwritten with the old one', {
  skip: !onPostgres,
}, async () => {
  const user = await signUp(app);
  const uid = decodeId(user.id, 'User');
  const dbB = await createDatabase({ url: app.config.databaseUrl, dataDir: '' });
  const redisB = new Redis(TEST_REDIS_URL);
  const storeB = createRedisPresence(redisB, app.config.redisPrefix);
  // B's write of the entries (with the choice it read) is where it stands once it has read it.
  const touch = storeB.touch.bind(storeB);
  let writing!: () => void;
  let wrote = false;
  const written = new Promise<void>((r) => {
    writing = r;
  });
  storeB.touch = (...args) => {
    wrote = true;
    writing();
    return touch(...args);
  };
  const hubB = createHub({ ...app.deps, db: dbB.db }, { presence: storeB });
  // B's Redis connection is busy (a blocking pop), as a loaded instance's is: what B sends
  // meanwhile reaches Redis after it. Busy until A's choice is written, not for a fixed second: a
  // read of B's (or A's mutation) that outlasted it let B's write through first, and the test
  // passed without the race.
  const wake = `${app.config.redisPrefix}wake-${uid}`;
  const waker = new Redis(TEST_REDIS_URL);
  const busy = redisB.blpop(wake, 60);
  try {
    const entering = hubB.presence.connected(uid);
    // B has read the choice; its write waits. Bounded: a connected() that ends without writing
    // (it does not throw: a failure is left to the refresh) would otherwise leave this waiting.
    await Promise.race([
      written,
      entering.then(() => {
        if (!wrote) throw new Error('B connected without writing its entries');
      }),
    ]);
    await ok(app, 'mutation { setPresence(status: INVISIBLE) }', {}, user.token);
    await waker.lpush(wake, 'go');
    assert.deepEqual(await busy, [wake, 'go'], "B's connection was busy until A's choice was written");
    const conn = await entering;
    const shown = await app.deps.realtime!.presence.store.shown([uid]);
    hubB.presence.disconnected(uid, conn);
    assert.equal(shown.get(uid), 'OFFLINE', 'an invisible user shown to others');
  } finally {
    // A failure before the wake: B's pop ends now, not after its 60 s.
    await waker.lpush(wake, 'go');
    await busy.catch(() => {});
    await waker.del(wake);
    waker.disconnect();
    await hubB.stop();
    redisB.disconnect();
    await dbB.close();
  }
});

// A choose() whose store write failed (Redis unreachable, its data kept) leaves the store with
// the status it replaced: the redo once Redis is back writes the kept one over it. (Passed before
// the fix above too; it guards that path.)
it('a status chosen while Redis is unreachable (its data kept) replaces the old one there once it is back', {
  skip: !onPostgres,
  timeout: 60_000,
}, async () => {
  const proxy = await tcpProxy(TEST_REDIS_URL);
  const app2 = await createTestApp({ rateLimits: false }, { REDIS_URL: proxy.url });
  const direct = new Redis(TEST_REDIS_URL);
  const store = createRedisPresence(direct, app2.config.redisPrefix);
  try {
    const url2 = `ws://127.0.0.1:${await app2.start(0)}/graphql`;
    const user = await signUp(app2);
    const uid = decodeId(user.id, 'User');
    await ok(app2, `mutation { setPresence(status: DND) }`, {}, user.token);
    const c = connect(url2, user.token);
    const sub = subscribe(c.client, null, Q);
    try {
      const shown = async () => (await store.shown([uid])).get(uid);
      for (let i = 0; i < 50 && (await shown()) !== 'DND'; i++) await new Promise((r) => setTimeout(r, 100));
      assert.equal(await shown(), 'DND');
      proxy.cut();
      await ok(app2, `mutation { setPresence(status: INVISIBLE) }`, {}, user.token);
      proxy.mend();
      for (let i = 0; i < 100 && (await shown()) !== 'OFFLINE'; i++)
        await new Promise((r) => setTimeout(r, 100));
      assert.equal(await shown(), 'OFFLINE', 'the invisible user still shown with the status it replaced');
    } finally {
      sub.stop();
      await c.client.dispose();
    }
  } finally {
    direct.disconnect();
    await app2.destroy();
    proxy.close();
  }
});

// Two instances. The user moves from A to B (its socket on B opens before A's closes, as a
// reconnect through a load balancer does): A's drop, after the grace, finds B's entry and says
// nothing, and A keeps ONLINE as what it showed last. B then tells OFFLINE (the user left; or the
// lapsed sweep, B having died). The user comes back on A: A's announce compared with its stale
// ONLINE and said nothing, and the user stayed OFFLINE to every stream while connected.
it('a user back on an instance that last showed it ONLINE, after another instance told it OFFLINE, is told ONLINE', {
  skip: !onPostgres,
  timeout: 60_000,
}, async () => {
  const [user, watcher] = await Promise.all([signUp(app), signUp(app)]);
  const { guildId } = await guildWithChannel(app, user.token);
  await invite(app, user.token, guildId, watcher.token);
  const uid = decodeId(user.id, 'User');
  const dbB = await createDatabase({ url: app.config.databaseUrl, dataDir: '' });
  const redisB = new Redis(TEST_REDIS_URL);
  const hubB = createHub(
    { ...app.deps, db: dbB.db },
    { presence: createRedisPresence(redisB, app.config.redisPrefix) },
  );
  const A = app.deps.realtime!.presence;
  const cw = connect(url, watcher.token);
  const sw = subscribe(cw.client, null, Q);
  try {
    await untilLive(app, [watcher]);
    const a1 = await A.connected(uid);
    await sw.until((e) => statuses(e, user.id).at(-1) === 'ONLINE', 5000, 'online on A');
    const b1 = await hubB.presence.connected(uid);
    A.disconnected(uid, a1);
    // A's drop, after the grace: B's entry is there, nothing to tell.
    const entries = `${app.config.redisPrefix}presence:${uid}`;
    for (let i = 0; i < 100 && (await redisB.hexists(entries, a1)); i++)
      await new Promise((r) => setTimeout(r, 100));
    assert.equal(await redisB.hexists(entries, a1), 0, "A's entry dropped");
    hubB.presence.disconnected(uid, b1);
    await sw.until((e) => statuses(e, user.id).at(-1) === 'OFFLINE', 10_000, 'offline once gone from B');
    const a2 = await A.connected(uid);
    const q = `query($id: ID!) { user(id: $id) { presence { status } } }`;
    assert.equal((await ok(app, q, { id: user.id }, watcher.token)).user.presence.status, 'ONLINE');
    await sw.until((e) => statuses(e, user.id).at(-1) === 'ONLINE', 5000, 'told ONLINE back on A');
    A.disconnected(uid, a2);
  } finally {
    sw.stop();
    await cw.client.dispose();
    await hubB.stop();
    redisB.disconnect();
    await dbB.close();
  }
});

// The lapsed sweep claimed each due user with a bare ZREM after reading the due ones: a user who
// reconnected (on a healthy instance) between the read and the ZREM was taken out of the set with
// its new deadline, and if that instance then died before its next refresh, no sweep ever found
// the user again: ONLINE to every stream for good, the defect the sweep was made for.
it('the lapsed sweep does not forget a user written again between its read of the due ones and its claim', async () => {
  const prefix = `banter-test:lapsed-${Math.random().toString(36).slice(2, 10)}:`;
  const sweeper = new Redis(TEST_REDIS_URL);
  const other = new Redis(TEST_REDIS_URL);
  const a = createRedisPresence(sweeper, prefix);
  const b = createRedisPresence(other, prefix);
  const u = 'u-lapsed';
  try {
    // Left by an instance that died: its entry and its deadline run out.
    const past = String(Date.now() - 1000);
    await other
      .multi()
      .hset(`${prefix}presence:${u}`, 'x:1', past)
      .zadd(`${prefix}presence-deadlines`, past, u)
      .exec();
    // The user reconnects on a healthy instance just after the sweep read the due users.
    const read = sweeper.zrangebyscore.bind(sweeper) as (...a: unknown[]) => Promise<string[]>;
    let raced = false;
    (sweeper as unknown as { zrangebyscore: unknown }).zrangebyscore = async (...args: unknown[]) => {
      const due = await read(...args);
      if (!raced && due.includes(u)) {
        raced = true;
        await b.touch(u, ['b:1']);
      }
      return due;
    };
    assert.deepEqual(await a.lapsed!(), [], 'connected: not lapsed');
    assert.ok(raced);
    assert.notEqual(
      await other.zscore(`${prefix}presence-deadlines`, u),
      null,
      'its new deadline left in the set',
    );
    // That instance dies before its next refresh: once its entry runs out, the sweep finds the user.
    mock.timers.enable({ apis: ['Date'], now: Date.now() + CONNECTION_TTL_MS + 1000 });
    try {
      assert.deepEqual(await a.lapsed!(), [u], 'lapsed once its last instance died');
    } finally {
      mock.timers.reset();
    }
  } finally {
    const keys = await other.keys(`${prefix}*`);
    if (keys.length) await other.del(...keys);
    sweeper.disconnect();
    other.disconnect();
  }
});

// A socket closed normally drops its entry; the user stayed in the sweep's set until its deadline
// came, and every sweep then read it again for nothing: the sweep's rounds (a bounded number of
// users per 20 s) went to users who had simply left, and a dead instance's users waited behind
// them, their entries' hash expiring before any sweep reached them (never told OFFLINE).
it("a user whose last entry is dropped (its sockets closed) leaves the sweep's set; one with an entry left stays", async () => {
  const prefix = `banter-test:dropped-${Math.random().toString(36).slice(2, 10)}:`;
  const redis = new Redis(TEST_REDIS_URL);
  const store = createRedisPresence(redis, prefix);
  const set = `${prefix}presence-deadlines`;
  try {
    await store.touch('u1', ['a:1', 'a:2']);
    await store.drop('u1', 'a:1');
    assert.notEqual(await redis.zscore(set, 'u1'), null, 'one socket left: still in the set');
    await store.drop('u1', 'a:2');
    assert.equal(await redis.zscore(set, 'u1'), null, 'no socket left: out of the set');
    // A drop of an entry already gone (a second close) leaves a user written meanwhile alone.
    await store.touch('u1', ['b:1']);
    await store.drop('u1', 'a:2');
    assert.notEqual(await redis.zscore(set, 'u1'), null);
  } finally {
    const keys = await redis.keys(`${prefix}*`);
    if (keys.length) await redis.del(...keys);
    redis.disconnect();
  }
});
