/**
 * Review of the day's realtime changes (the server's closes releasing at once, SSE sharing
 * executions, 1013 for a token that could not be checked): each test here failed before its fix.
 * Postgres only: the app reaches its database through a TCP proxy (tcpProxy) that can cut it
 * off (the database away) and let it through again, or hold it (a database hung).
 */
import assert from 'node:assert/strict';
import { after, before, it } from 'node:test';
import { sql } from 'drizzle-orm';
import { decodeAnyId } from '../schema/builder.ts';
import { createTestApp, createTestDatabase, ok, onPostgres, signUp, type TestApp } from './helpers.ts';
import {
  connect,
  guildWithChannel,
  invite,
  rawSocket,
  send,
  sleep,
  subscribe,
  subscribeFrame,
  tcpProxy,
  untilLive,
} from './realtime-helpers.ts';

const skip = !onPostgres;
const INIT_WAIT_MS = 1000;

let db: { url: string; drop(): Promise<void> };
let proxy: Awaited<ReturnType<typeof tcpProxy>>;
let app: TestApp;
let wsUrl: string;

before(async () => {
  if (skip) return;
  db = await createTestDatabase();
  proxy = await tcpProxy(db.url);
  app = await createTestApp(
    { rateLimits: false },
    {
      DATABASE_URL: proxy.url,
      WS_CONNECTION_INIT_TIMEOUT_MS: String(INIT_WAIT_MS),
      WS_MAX_SOCKETS_PER_USER: '1',
    },
  );
  const p = await app.start(0);
  wsUrl = `ws://127.0.0.1:${p}/graphql`;
});

after(async () => {
  if (skip) return;
  try {
    await app?.destroy();
  } finally {
    proxy?.close();
    await db?.drop();
  }
});

it('an anonymous socket whose token could not be checked (the database away) is not closed as Unauthorized (4401) at its deadline', {
  skip,
  timeout: 30_000,
}, async () => {
  // Never used yet: its session is not cached, authenticating it needs the database.
  const u = await signUp(app);
  const anon = rawSocket(wsUrl);
  proxy.cut();
  try {
    await anon.send({ type: 'connection_init', payload: {} });
    await anon.until(() => anon.messages.some((m) => m.type === 'connection_ack'), 'ack');
    await anon.send(subscribeFrame(u.token));
    await anon.until(() => anon.messages.some((m) => m.type === 'error'), 'the refusal', 10_000);
    assert.equal(
      anon.messages.find((m) => m.type === 'error').payload[0].extensions.code,
      'INTERNAL_SERVER_ERROR',
    );
    // The client was told to try again later: its deadline must not then tell it its token is bad.
    // It may try again, and is then closed to reconnect later (1013), as a socket whose
    // connection_init token could not be checked is.
    await anon.until(() => !!anon.closed(), 'the close', 4 * INIT_WAIT_MS + 3000);
    assert.equal(anon.closed()!.code, 1013, `closed with ${JSON.stringify(anon.closed())}`);
  } finally {
    proxy.mend();
    anon.ws.close();
  }
});

it('an anonymous socket told to try again, whose next token is bad, is closed at its deadline as Unauthorized (4401), not to try again', {
  skip,
  timeout: 30_000,
}, async () => {
  const u = await signUp(app);
  const anon = rawSocket(wsUrl);
  const sub = (id: string, token: string) => anon.send(subscribeFrame(token, id));
  const refusal = async (id: string) => {
    await anon.until(
      () => anon.messages.some((m) => m.type === 'error' && m.id === id),
      `refusal ${id}`,
      10_000,
    );
    return anon.messages.find((m) => m.type === 'error' && m.id === id).payload[0].extensions.code;
  };
  try {
    await anon.send({ type: 'connection_init', payload: {} });
    await anon.until(() => anon.messages.some((m) => m.type === 'connection_ack'), 'ack');
    proxy.cut();
    try {
      await sub('1', u.token);
      assert.equal(await refusal('1'), 'INTERNAL_SERVER_ERROR');
    } finally {
      proxy.mend();
    }
    await sub('2', 'not-a-token');
    assert.equal(await refusal('2'), 'UNAUTHENTICATED');
    await anon.until(() => !!anon.closed(), 'the close', 4 * INIT_WAIT_MS + 3000);
    assert.equal(anon.closed()!.code, 4401, `closed with ${JSON.stringify(anon.closed())}`);
  } finally {
    anon.ws.close();
  }
});

/**
 * An `events` subscription over SSE served in process (app.fetch): real yoga, plugin and event
 * stream, read only when the test asks, so that its subscriber pulls its next event only then
 * (as a reader that is behind does; over TCP the socket's buffers would have to fill first).
 */
async function pulledSse(token: string, query: string) {
  const hub = app.deps.realtime!;
  const had = hub.subscriberCount;
  const res = await app.fetch('/graphql', {
    method: 'POST',
    headers: {
      accept: 'text/event-stream',
      authorization: `Bearer ${token}`,
      'content-type': 'application/json',
    },
    body: JSON.stringify({ query }),
  });
  for (let i = 0; i < 100 && hub.subscriberCount <= had; i++) await sleep(20);
  const reader = res.body!.getReader();
  const decoder = new TextDecoder();
  const items: any[] = [];
  let buf = '';
  let ended = false;
  return {
    items,
    ended: () => ended,
    /** reads until `pred` holds for the items or the stream ends; bounded by `ms` */
    async readUntil(pred: (items: any[]) => boolean, ms = 10_000) {
      const deadline = Date.now() + ms;
      while (!ended && !pred(items)) {
        const left = deadline - Date.now();
        if (left <= 0) throw new Error(`timed out reading: ${JSON.stringify(items)}`);
        const r = await Promise.race([reader.read(), sleep(left).then(() => 'timeout' as const)]);
        if (r === 'timeout') continue;
        if (r.done) {
          ended = true;
          break;
        }
        buf += decoder.decode(r.value, { stream: true });
        for (let i = buf.indexOf('\n\n'); i >= 0; i = buf.indexOf('\n\n')) {
          const block = buf.slice(0, i);
          buf = buf.slice(i + 2);
          if (!block.startsWith('event: next')) continue;
          items.push(JSON.parse(block.slice(block.indexOf('data:') + 5)));
        }
      }
    },
    stop: () => reader.cancel().catch(() => {}),
  };
}

it('over SSE, one failed execution shared by later readers is not counted as the event failing again: it never goes out with its errors to a reader whose own execution would work', {
  skip,
  timeout: 60_000,
}, async () => {
  // Viewer-free (so shared), and failing while the attachments table is away.
  const query = `subscription { events { __typename cursor
    ... on MessageCreated { message { id content } }
    ... on MessageUpdated { message { id attachments { id } } } } }`;
  const owner = await signUp(app);
  const others = [await signUp(app), await signUp(app)];
  const { guildId, channelId } = await guildWithChannel(app, owner.token);
  for (const o of others) await invite(app, owner.token, guildId, o.token);
  const [a, b, c] = [
    await pulledSse(owner.token, query),
    await pulledSse(others[0].token, query),
    await pulledSse(others[1].token, query),
  ];
  await untilLive(app, [owner, ...others]);
  try {
    const m1 = await send(app, owner.token, channelId, 'first');
    // B and C are not read yet (their streams pull no further than a little ahead of their
    // readers, behind these 30 messages); A reads as they come.
    for (let i = 0; i < 30; i++) await send(app, owner.token, channelId, i === 29 ? 'third' : 'second');
    const has = (content: string) => (items: any[]) =>
      items.some((i) => i.data?.events?.message?.content === content);
    await a.readUntil(has('third'));
    // The event fails to execute for A, the fast reader (its stream ends for it to resume)...
    await app.deps.db.execute(sql`alter table attachments rename to attachments_away`);
    try {
      await app.deps.db.execute(sql`insert into events (type, guild_id, channel_id, payload)
        select 'MESSAGE_UPDATED', guild_id, channel_id, jsonb_build_object('messageId', id::text)
        from messages where id = ${decodeAnyId(m1).id}::uuid`);
      await app.deps.realtime!.poke();
      await a.readUntil((items) => items.some((i) => i.errors));
    } finally {
      await app.deps.db.execute(sql`alter table attachments_away rename to attachments`);
    }
    assert.equal(
      a.items.at(-1).errors[0].message,
      'An event could not be delivered: resume from your last cursor.',
    );
    // ...and the database is fine again when B, then C, reach it, each a round (1 s) later.
    const updated = (items: any[]) =>
      items.some((i) => i.errors || i.data?.events?.__typename === 'MessageUpdated');
    await sleep(1100);
    await b.readUntil(updated);
    await sleep(1100);
    await c.readUntil(updated);
    console.log('B', JSON.stringify(b.items), 'C', JSON.stringify(c.items));
    // Each executes it again and gets it whole. Before: both took A's failed execution, each
    // counted as a further round, so B was cut off and C, the third round, got the event's errors
    // in place of its data with its stream going on past it (its next cursor would skip it).
    for (const [name, s] of [
      ['B', b],
      ['C', c],
    ] as const) {
      const last = s.items.at(-1);
      assert.equal(last.data?.events?.__typename, 'MessageUpdated', `${name} got ${JSON.stringify(last)}`);
      assert.deepEqual(last.data.events.message.attachments, []);
    }
  } finally {
    for (const s of [a, b, c]) await s.stop();
  }
});

it('a socket the server closes while its subscribe is authenticating (the database slow) registers nothing when that ends: no slot, no presence', {
  skip,
  timeout: 30_000,
}, async () => {
  const u = await signUp(app);
  const { channelId } = await guildWithChannel(app, u.token);
  const userId = decodeAnyId(u.id).id;
  // A session of theirs not used yet (not cached): checking its token needs the database.
  const fresh = (
    await ok(app, 'mutation($i: LoginInput!) { login(input: $i) { accessToken } }', {
      i: { login: u.username, password: 'correct horse battery' },
    })
  ).login.accessToken as string;
  const anon = rawSocket(wsUrl);
  await anon.send({ type: 'connection_init', payload: {} });
  await anon.until(() => anon.messages.some((m) => m.type === 'connection_ack'), 'ack');
  proxy.hold();
  try {
    await anon.send(subscribeFrame(fresh));
    await sleep(200);
    // Closed by the server (a bad message) while the token is being checked.
    await anon.send({ type: 'nonsense' });
    assert.equal(await anon.closedWith(), 4400);
  } finally {
    proxy.release();
  }
  await sleep(1000);
  const shown = await app.deps.realtime!.presence.store.shown([userId]);
  assert.equal(shown.get(userId) ?? 'OFFLINE', 'OFFLINE', 'no presence for the closed socket');
  // Its user's one slot (WS_MAX_SOCKETS_PER_USER=1) is free: a socket of theirs gets in and gets events.
  const c = connect(wsUrl, u.token);
  const s = subscribe(
    c.client,
    null,
    'subscription { events { __typename ... on MessageCreated { message { content } } } }',
  );
  try {
    await untilLive(app, [u]);
    await send(app, u.token, channelId, 'in');
    await s.until((e) => e.some((x) => x.message?.content === 'in'));
  } finally {
    s.stop();
    await c.client.dispose();
  }
});
