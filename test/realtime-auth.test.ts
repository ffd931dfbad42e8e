/** Socket auth, cursor errors, revocation, typing. */
import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import pg from 'pg';
import { pruneEvents } from '../core/realtime/log.ts';
import { decodeAnyId } from '../schema/builder.ts';
import { createTestApp, gql, ok, onPostgres, signUp, type TestApp, type TestUser } from './helpers.ts';
import {
  connect,
  guildWithChannel,
  invite,
  metricsOf,
  rawSocket,
  send,
  sseStream,
  subscribe,
  throughMarker,
  throughTypingMarker,
  untilLive,
} from './realtime-helpers.ts';

let app: TestApp;
let url: string;
before(async () => {
  app = await createTestApp({ rateLimits: false });
  url = `ws://127.0.0.1:${await app.start(0)}/graphql`;
});
after(() => app.destroy());

async function closeCode(token: string | undefined): Promise<number> {
  const c = connect(url, token);
  const s = subscribe(c.client);
  // A bound, not a speed check: disposing of a client whose socket is still connecting rethrows
  // its close (a first connection on a loaded machine took over 5 s; the test then failed with
  // the very 4401 it asserts).
  const deadline = Date.now() + 30_000;
  while (!c.closed() && Date.now() < deadline) await new Promise((r) => setTimeout(r, 50));
  s.stop();
  await c.client.dispose();
  return c.closed()?.code ?? -1;
}

it('closes sockets whose connection_init carries a bad token with 4401', async () => {
  assert.equal(await closeCode('not-a-jwt'), 4401);
});

it('accepts an anonymous socket; its subscribe gets UNAUTHENTICATED unless it carries a token in extensions.headers (as GraphiQL sends it)', async () => {
  const u = await signUp(app);
  const { client, closed } = connect(url, undefined);
  const anon = subscribe(client);
  await assert.rejects(
    anon.until(() => false, 5000),
    /UNAUTHENTICATED|Unauthorized/,
  );
  assert.equal(closed(), undefined);
  const got: any[] = [];
  const failures: unknown[] = [];
  const stop = client.subscribe(
    {
      query: 'subscription { events { __typename ... on MessageCreated { message { content } } } }',
      extensions: { headers: { authorization: `Bearer ${u.token}` } },
    },
    { next: (v) => got.push(v), error: (e) => failures.push(e), complete: () => {} },
  );
  const { channelId } = await guildWithChannel(app, u.token);
  await untilLive(app, [u]);
  await send(app, u.token, channelId, 'via extensions');
  const deadline = Date.now() + 5000;
  while (!got.some((v) => v.data?.events?.message?.content === 'via extensions') && Date.now() < deadline)
    await new Promise((r) => setTimeout(r, 50));
  assert.deepEqual(failures, []);
  assert.ok(got.some((v) => v.data?.events?.message?.content === 'via extensions'));
  stop();
  await client.dispose();
});

it('takes an authorization value with whitespace around it as HTTP does (a token read from a file with its newline, a header pasted into GraphiQL): 4401 before', async () => {
  const u = await signUp(app);
  const padded = [`Bearer ${u.token}\n`, ` Bearer ${u.token} `];
  for (const authorization of padded) {
    // HTTP takes it (a header's value is trimmed)...
    const res = await fetch(url.replace('ws:', 'http:'), {
      method: 'POST',
      headers: { 'content-type': 'application/json', authorization },
      body: JSON.stringify({ query: '{ viewer { user { id } } }' }),
    });
    const body = (await res.json()) as { data?: { viewer?: { user: { id: string } } } };
    assert.equal(body.data?.viewer?.user.id, u.id, 'over HTTP');
    // ...and so does connection_init,
    const s = rawSocket(url);
    await s.send({ type: 'connection_init', payload: { authorization } });
    await s.until(() => s.messages.some((m) => m.type === 'connection_ack') || !!s.closed(), 'ack or close');
    assert.equal(s.closed(), undefined, JSON.stringify(authorization));
    s.ws.close();
    // ...and an anonymous socket's subscribe (GraphiQL's headers).
    const a = rawSocket(url);
    await a.send({ type: 'connection_init', payload: {} });
    await a.until(() => a.messages.some((m) => m.type === 'connection_ack'), 'ack');
    await a.send({
      id: '1',
      type: 'subscribe',
      payload: { query: '{ viewer { user { id } } }', extensions: { headers: { authorization } } },
    });
    await a.until(() => a.messages.some((m) => m.id === '1'), 'an answer');
    assert.equal(a.messages.find((m) => m.id === '1').payload.data?.viewer?.user.id, u.id);
    a.ws.close();
  }
});

it('refuses malformed cursors with BAD_USER_INPUT as a GraphQL error, socket kept', async () => {
  const u = await signUp(app);
  const { client } = connect(url, u.token);
  for (const bad of ['nope', Buffer.from('e1.x.1').toString('base64url'), 'a'.repeat(500)]) {
    const s = subscribe(client, bad);
    await assert.rejects(
      s.until(() => false, 5000),
      /BAD_USER_INPUT/,
    );
  }
  // The same socket still works.
  const s = subscribe(client);
  const { channelId } = await guildWithChannel(app, u.token);
  await untilLive(app, [u]);
  await send(app, u.token, channelId, 'still here');
  await s.until((e) => e.some((x) => x.message?.content === 'still here'));
  await client.dispose();
});

// CONTRACT.md: without `after` the stream is live; a bad `after` is refused with its code. An empty
// string is no cursor the server hands out: it started live, so a client whose stored cursor came
// back empty (a default, a failed read) silently missed what happened while it was away.
it('an empty `after` is refused with BAD_USER_INPUT as a malformed cursor is, over the socket and SSE (it started live before)', async () => {
  const u = await signUp(app);
  const { client } = connect(url, u.token);
  try {
    const s = subscribe(client, '');
    await assert.rejects(
      s.until(() => false, 5000),
      /BAD_USER_INPUT/,
    );
    assert.match(s.errors[0]?.message ?? '', /^after: /);
  } finally {
    await client.dispose();
  }
  const overSse = sseStream(url.replace('ws:', 'http:'), u.token, { cursor: '' });
  try {
    await overSse.until((x) => x.ended, 'the end of the response');
    assert.deepEqual(
      overSse.errors.map((e) => e.extensions?.code),
      ['BAD_USER_INPUT'],
    );
  } finally {
    overSse.stop();
  }
});

it('closes the sockets of a session that logs out (4403)', async () => {
  const u = await signUp(app);
  const c = connect(url, u.token);
  const s = subscribe(c.client);
  await untilLive(app, [u]);
  await ok(app, 'mutation { logout }', {}, u.token);
  const deadline = Date.now() + 15_000;
  while (!c.closed() && Date.now() < deadline) await new Promise((r) => setTimeout(r, 100));
  assert.equal(c.closed()?.code, 4403);
  s.stop();
  await c.client.dispose();
});

it('startTyping reaches other members only, with a null cursor, throttled, never replayed', async () => {
  const [a, b, stranger, typist] = await Promise.all([signUp(app), signUp(app), signUp(app), signUp(app)]);
  const { guildId, channelId } = await guildWithChannel(app, a.token);
  await invite(app, a.token, guildId, b.token);
  // Where `typist` types the marker that ends the negative checks (see throughTypingMarker):
  // a guild of the stranger's that b is in too.
  const side = await guildWithChannel(app, stranger.token);
  for (const u of [b, typist]) await invite(app, stranger.token, side.guildId, u.token);
  const cb = connect(url, b.token);
  const cs = connect(url, stranger.token);
  const sb = subscribe(cb.client);
  const ss = subscribe(cs.client);
  await untilLive(app, [b, stranger]);
  const m = `mutation($c: ID!) { startTyping(channelId: $c) }`;
  assert.equal((await ok(app, m, { c: channelId }, a.token)).startTyping, true);
  assert.equal((await ok(app, m, { c: channelId }, a.token)).startTyping, true);
  const [seen, strangerSaw] = await throughTypingMarker(app, typist, side.channelId, [sb, ss]);
  const typing = seen.filter((x) => x.__typename === 'TypingStarted');
  assert.equal(typing.length, 1, 'throttled');
  assert.equal(typing[0].cursor, null);
  assert.equal(typing[0].user.id, a.id);
  assert.equal(strangerSaw.length, 0);
  const r = await gql(app, m, { c: channelId }, { token: stranger.token });
  assert.equal(r.errors?.[0].extensions?.code, 'NOT_FOUND');
  const r2 = await gql(app, m, { c: channelId });
  assert.equal(r2.errors?.[0].extensions?.code, 'UNAUTHENTICATED');
  // Replay from before: typing is not in the log.
  await send(app, a.token, channelId, 'x');
  await sb.until((e) => e.some((x) => x.__typename === 'MessageCreated'));
  const replay = subscribe(cb.client, sb.events.find((x) => x.cursor)?.cursor);
  const [replayed] = await throughMarker(app, a.token, channelId, [replay]);
  assert.ok(replayed.every((x) => x.__typename !== 'TypingStarted'));
  await cb.client.dispose();
  await cs.client.dispose();
});

it('refuses a cursor from before the retention watermark with CURSOR_EXPIRED', async () => {
  const u = await signUp(app);
  const { channelId } = await guildWithChannel(app, u.token);
  const { client } = connect(url, u.token);
  const s = subscribe(client);
  await untilLive(app, [u]);
  await send(app, u.token, channelId, 'old');
  await s.until((e) => e.length > 0);
  const old = s.events[0].cursor;
  s.stop();
  await send(app, u.token, channelId, 'newer');
  const pruned = await pruneEvents(app.deps.db, 7, new Date(Date.now() + 8 * 86_400_000));
  assert.ok(pruned >= 2);
  const r = subscribe(client, old);
  await assert.rejects(
    r.until(() => false, 5000),
    /CURSOR_EXPIRED/,
  );
  await client.dispose();
});

describe('a socket authenticates once, and what it registers goes with it', () => {
  // A server of its own: three sockets per user, so a leaked slot shows at once as a 4029.
  let app2: TestApp;
  let url2: string;
  before(async () => {
    app2 = await createTestApp({
      rateLimits: false,
      ws: {
        socketsPerUser: 3,
        operationsPerSocket: 10,
        connectionsPerIpPerMinute: 1000,
        initTimeoutMs: 5000,
        keepAliveMs: 12_000,
      },
    });
    url2 = `ws://127.0.0.1:${await app2.start(0)}/graphql`;
  });
  after(() => app2.destroy());

  const raw = () => rawSocket(url2);

  /** A new access token of `u`: a session of its own, so its first use reads the database. */
  async function newToken(u: TestUser) {
    const r = await ok(
      app2,
      `mutation($i: LoginInput!) { login(input: $i) { accessToken } }`,
      { i: { login: u.username, password: 'correct horse battery' } },
      undefined,
      `login-${u.username}-${Math.random()}`,
    );
    return r.login.accessToken as string;
  }

  /** Holds every read of the sessions table until the returned function is called. */
  async function stallSessions(): Promise<() => Promise<void>> {
    if (onPostgres) {
      const locker = new pg.Client({ connectionString: app2.config.databaseUrl });
      await locker.connect();
      await locker.query('begin');
      await locker.query('lock table sessions in access exclusive mode');
      return async () => {
        await locker.query('commit');
        await locker.end();
      };
    }
    // PGlite has one connection: a transaction held open holds every other query.
    let release!: () => void;
    const held = new Promise<void>((r) => {
      release = r;
    });
    let started!: () => void;
    const inside = new Promise<void>((r) => {
      started = r;
    });
    const tx = app2.deps.db.transaction(async () => {
      started();
      await held;
    });
    await inside;
    return async () => {
      release();
      await tx;
    };
  }

  async function openSockets() {
    const deadline = Date.now() + 5000;
    for (;;) {
      const n = (await metricsOf(url2))('banter_ws_open_sockets');
      if (n === 0 || Date.now() > deadline) return n;
      await new Promise((r) => setTimeout(r, 50));
    }
  }

  /** Records the presence connection ids handed out and released, for `userId`. */
  // Only `userId`'s: a socket of an earlier test may release its own connection meanwhile.
  function watchPresence(globalId: string, hold?: Promise<void>) {
    const userId = decodeAnyId(globalId).id;
    const presence = app2.deps.realtime!.presence;
    const { connected, disconnected } = presence;
    const given: string[] = [];
    const released: string[] = [];
    let entered = 0;
    presence.connected = async (user) => {
      if (user !== userId) return connected(user);
      entered++;
      await hold;
      const id = await connected(user);
      given.push(id);
      return id;
    };
    presence.disconnected = (user, id) => {
      if (user === userId) released.push(id);
      disconnected(user, id);
    };
    return {
      given,
      released,
      /** how many registrations of the user's presence have begun */
      get entered() {
        return entered;
      },
      restore() {
        presence.connected = connected;
        presence.disconnected = disconnected;
      },
    };
  }

  it('a socket closed while its connection_init authenticates holds no slot of socketsPerUser (4029 forever before)', async () => {
    const u = await signUp(app2);
    const tokens = [await newToken(u), await newToken(u), await newToken(u)];
    const release = await stallSessions();
    try {
      for (const token of tokens) {
        const s = raw();
        await s.send({ type: 'connection_init', payload: { authorization: `Bearer ${token}` } });
        await new Promise((r) => setTimeout(r, 50));
        s.ws.terminate();
      }
      assert.equal(await openSockets(), 0);
    } finally {
      await release();
    }
    await new Promise((r) => setTimeout(r, 300));
    // No socket of this user is open: a new one is accepted.
    const s = raw();
    await s.send({ type: 'connection_init', payload: { authorization: `Bearer ${u.token}` } });
    await s.until(
      () => s.closed() !== undefined || s.messages.some((m) => m.type === 'connection_ack'),
      'ack',
    );
    assert.equal(s.closed(), undefined, 'refused although the user has no socket open');
    s.ws.close();
  });

  it('a socket closed while its presence is registered releases its presence connection (ONLINE forever before)', async () => {
    const u = await signUp(app2);
    let open!: () => void;
    const watch = watchPresence(
      u.id,
      new Promise<void>((r) => {
        open = r;
      }),
    );
    try {
      const s = raw();
      await s.send({ type: 'connection_init', payload: { authorization: `Bearer ${u.token}` } });
      // Closed while its presence is being registered (held there).
      await s.until(() => watch.entered > 0, 'the presence registration', 10_000);
      s.ws.terminate();
      assert.equal(await openSockets(), 0);
      open();
      for (let i = 0; i < 250 && !watch.given.length; i++) await new Promise((r) => setTimeout(r, 20));
      // Released as soon as it is given, the socket being closed (bounded: never, before).
      for (let i = 0; i < 100 && watch.released.length < watch.given.length; i++)
        await new Promise((r) => setTimeout(r, 20));
      assert.equal(watch.given.length, 1);
      assert.deepEqual(watch.released, watch.given, 'the connection id was never released');
    } finally {
      watch.restore();
    }
  });

  it("an anonymous socket's two first subscribes with the same token authenticate it once (a second presence connection, never released, before)", async () => {
    const u = await signUp(app2);
    const watch = watchPresence(u.id);
    try {
      const s = raw();
      await s.send({ type: 'connection_init', payload: {} });
      await s.until(() => s.messages.some((m) => m.type === 'connection_ack'), 'ack');
      const headers = { authorization: `Bearer ${u.token}` };
      const query = 'subscription { events { __typename } }';
      // GraphiQL's way: the token in each subscribe's extensions.headers, both sent at once.
      s.ws.send(JSON.stringify({ id: 'a', type: 'subscribe', payload: { query, extensions: { headers } } }));
      s.ws.send(JSON.stringify({ id: 'b', type: 'subscribe', payload: { query, extensions: { headers } } }));
      const hub2 = app2.deps.realtime!;
      const uid = decodeAnyId(u.id).id;
      await s.until(
        () => s.messages.some((m) => m.type === 'error') || hub2.liveCount(uid) >= 2,
        'both subscribes',
        10_000,
      );
      assert.deepEqual(
        s.messages.filter((m) => m.type === 'error'),
        [],
        'both subscribes run',
      );
      assert.equal(watch.given.length, 1, 'one presence connection for one socket');
      s.ws.close();
      assert.equal(await openSockets(), 0);
      assert.deepEqual(watch.released, watch.given);
    } finally {
      watch.restore();
    }
  });

  it("a subscribe carrying another user's token than the one its socket authenticated with is refused (the socket sat in both users before)", async () => {
    const [u, v] = [await signUp(app2), await signUp(app2)];
    const watch = watchPresence(u.id);
    try {
      const s = raw();
      await s.send({ type: 'connection_init', payload: {} });
      await s.until(() => s.messages.some((m) => m.type === 'connection_ack'), 'ack');
      const query = 'subscription { events { __typename } }';
      const sub = (id: string, token: string) =>
        s.ws.send(
          JSON.stringify({
            id,
            type: 'subscribe',
            payload: { query, extensions: { headers: { authorization: `Bearer ${token}` } } },
          }),
        );
      sub('a', u.token);
      sub('b', v.token); // while u's token is being checked
      await s.until(() => s.messages.some((m) => m.type === 'error'), 'an error');
      sub('c', v.token); // once the socket is u's
      await s.until(() => s.messages.filter((m) => m.type === 'error').length === 2, 'two errors');
      const errors = s.messages.filter((m) => m.type === 'error');
      assert.deepEqual(
        errors.map((m) => [m.id, m.payload[0].extensions.code]),
        [
          ['b', 'BAD_USER_INPUT'],
          ['c', 'BAD_USER_INPUT'],
        ],
      );
      assert.match(errors[0].payload[0].message, /another user/);
      assert.equal(watch.given.length, 1, "only u's presence");
      assert.equal(s.closed(), undefined);
      s.ws.close();
    } finally {
      watch.restore();
    }
  });
});

it("a socket authenticated at connection_init takes a subscribe carrying the same user's refreshed token (headers sent with every operation)", async () => {
  const u = await signUp(app);
  const c = connect(url, u.token);
  try {
    await new Promise((r) => setTimeout(r, 1100)); // a later iat: another JWT
    const r = await ok(app, `mutation($t: String!) { refreshSession(refreshToken: $t) { accessToken } }`, {
      t: u.refreshToken,
    });
    const fresh = r.refreshSession.accessToken as string;
    assert.notEqual(fresh, u.token);
    const errors: unknown[] = [];
    let nexts = 0;
    await new Promise<void>((resolve) => {
      c.client.subscribe(
        {
          query: 'query { viewer { __typename } }',
          extensions: { headers: { authorization: `Bearer ${fresh}` } },
        },
        {
          next: () => void nexts++,
          error: (e) => {
            errors.push(e);
            resolve();
          },
          complete: () => resolve(),
        },
      );
    });
    assert.deepEqual({ errors, nexts }, { errors: [], nexts: 1 });
  } finally {
    await c.client.dispose();
  }
});
