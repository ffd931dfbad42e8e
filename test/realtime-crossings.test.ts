/**
 * Where two rules meet: a thread started while its guild is deleted (lock order), a member without
 * READ_HISTORY resuming or racing a send, an SSE stream served to any Accept (curl), an anonymous
 * socket told RATE_LIMITED then waiting for a slot. Each failed on the code before its fix (a
 * review of 2026-12-06's changes); real Postgres, PGlite, sockets.
 */
import assert from 'node:assert/strict';
import { after, before, it } from 'node:test';
import { decodeAnyId } from '../schema/builder.ts';
import { blockedBy, createTestApp, gql, lockWaiters, ok, signUp, type TestApp } from './helpers.ts';
import {
  channelAccessHelpers,
  connect,
  guildWithChannel,
  invite,
  rawSocket,
  send,
  sleep,
  subscribe,
  untilLive,
} from './realtime-helpers.ts';

let app: TestApp;
let url: string;
before(async () => {
  app = await createTestApp({ rateLimits: false });
  url = `ws://127.0.0.1:${await app.start(0)}/graphql`;
});
after(() => app.destroy());

const { denyToEveryone } = channelAccessHelpers(() => app);

const Q = `subscription($after: String) { events(after: $after) { __typename cursor
  ... on MessageCreated { message { id content } }
  ... on MessageUpdated { message { id content } }
} }`;
const contents = (events: any[]) =>
  events.filter((e) => e.__typename === 'MessageCreated').map((e) => e.message.content as string);

it('startThread holding its channel while the guild is deleted does not deadlock the deletion', {
  skip: process.env.BANTER_TEST_DB !== 'postgres',
  timeout: 60_000,
}, async () => {
  const pg = (await import('pg')).default;
  const o = await signUp(app);
  const { guildId, channelId } = await guildWithChannel(app, o.token);
  const m = await send(app, o.token, channelId, 'start a thread here');
  const stall = new pg.Client({ connectionString: app.config.databaseUrl });
  await stall.connect();
  try {
    // An uncommitted row with the same source message (no guild: no lock on the guild row) makes
    // startThread's insert wait, after holdChannel took its share lock on the channel.
    await stall.query('begin');
    await stall.query(
      `insert into channels (id, type, source_message_id) values (gen_random_uuid(), 'THREAD', $1::uuid)`,
      [decodeAnyId(m).id],
    );
    const starting = gql(
      app,
      `mutation($m: ID!) { startThread(messageId: $m, name: "t") { id } }`,
      { m },
      { token: o.token },
    );
    assert.equal(await blockedBy(stall, 1), 1, "startThread's insert waits on the row held");
    // The guild's deletion locks the guild row, then its cascade waits for the channel.
    const deleting = gql(
      app,
      `mutation($g: ID!) { deleteGuild(id: $g) }`,
      { g: guildId },
      { token: o.token },
    );
    assert.equal(await lockWaiters(stall, 2), 2, 'the deletion waits on the channel');
    // startThread's insert goes on and checks its guild (KEY SHARE on the row deleteGuild holds).
    await stall.query('rollback');
    const [d, s] = await Promise.all([deleting, starting]);
    const codes = (r: { errors?: { extensions?: { code?: string } }[] }) =>
      (r.errors ?? []).map((e) => e.extensions?.code);
    assert.deepEqual(codes(d), [], `deleteGuild failed: ${JSON.stringify(d.errors)}`);
    assert.ok(
      !codes(s).includes('INTERNAL_SERVER_ERROR') || !JSON.stringify(s).includes('deadlock'),
      JSON.stringify(s.errors),
    );
  } finally {
    await stall.query('rollback').catch(() => {});
    await stall.end();
  }
});

it('a member without READ_HISTORY that resumes from the cursor of a message it got live gets that message’s later edit, as its live stream does', async () => {
  const [o, v] = await Promise.all([signUp(app), signUp(app)]);
  const { guildId, channelId } = await guildWithChannel(app, o.token);
  await denyToEveryone(o.token, guildId, channelId, 'READ_HISTORY');
  await invite(app, o.token, guildId, v.token);
  const c1 = connect(url, v.token);
  const c2 = connect(url, v.token);
  try {
    const live = subscribe(c1.client, null, Q);
    await untilLive(app, [v]);
    const fresh = await send(app, o.token, channelId, 'fresh');
    await live.until((e) => e.some((x) => x.message?.id === fresh), 10_000, 'fresh');
    const cursor = live.events.find((x) => x.message?.id === fresh).cursor as string;
    // The client reconnects (a network change, a new tab) and resumes from its last cursor.
    const resumed = subscribe(c2.client, cursor, Q);
    // Its replay is over: the edit comes to it live, as to the live stream.
    await untilLive(app, [v], 2);
    await ok(
      app,
      `mutation($i: EditMessageInput!) { editMessage(input: $i) { id } }`,
      { i: { id: fresh, content: 'fresh, edited' } },
      o.token,
    );
    const marker = await send(app, o.token, channelId, 'marker');
    await live.until((e) => e.some((x) => x.message?.id === marker), 10_000, 'live marker');
    await resumed.until((e) => e.some((x) => x.message?.id === marker), 10_000, 'resumed marker');
    const after = (evs: any[]) => {
      const i = evs.findIndex((x) => x.cursor === cursor);
      return evs.slice(i + 1).map((x) => `${x.__typename} ${x.message?.content}`);
    };
    assert.deepEqual(
      {
        live: after(live.events),
        resumed: resumed.events.map((x) => `${x.__typename} ${x.message?.content}`),
      },
      { live: ['MessageUpdated fresh, edited', 'MessageCreated marker'], resumed: after(live.events) },
    );
  } finally {
    await c1.client.dispose();
    await c2.client.dispose();
  }
});

it('an SSE stream served to a client that accepts anything (curl, Accept: */*) carries its cursors as ids too', {
  timeout: 30_000,
}, async () => {
  const u = await signUp(app);
  const { channelId } = await guildWithChannel(app, u.token);
  const ac = new AbortController();
  const query = `subscription { events { __typename cursor ... on MessageCreated { message { content } } } }`;
  const res = await fetch(`${url.replace('ws:', 'http:')}?${new URLSearchParams({ query })}`, {
    headers: { accept: '*/*', authorization: `Bearer ${u.token}` },
    signal: ac.signal,
  });
  try {
    assert.match(res.headers.get('content-type') ?? '', /text\/event-stream/);
    const reader = res.body!.getReader();
    const decoder = new TextDecoder();
    let text = '';
    await untilLive(app, [u]);
    await send(app, u.token, channelId, 'hello');
    const deadline = Date.now() + 10_000;
    while (!text.includes('hello') && Date.now() < deadline) {
      const { done, value } = await reader.read();
      if (done) break;
      text += decoder.decode(value, { stream: true });
    }
    const block = text.split('\n\n').find((b) => b.includes('hello')) ?? '';
    assert.match(block, /^id: /m, `the event has no id:\n${block}`);
  } finally {
    ac.abort();
  }
});

it('a member without READ_HISTORY whose live stream got a MessageCreated gets that message’s edit, though the send began before the stream', {
  skip: process.env.BANTER_TEST_DB !== 'postgres',
  timeout: 60_000,
}, async () => {
  const pg = (await import('pg')).default;
  const [o, v] = await Promise.all([signUp(app), signUp(app)]);
  const { guildId, channelId } = await guildWithChannel(app, o.token);
  await denyToEveryone(o.token, guildId, channelId, 'READ_HISTORY');
  await invite(app, o.token, guildId, v.token);
  const stall = new pg.Client({ connectionString: app.config.databaseUrl });
  await stall.connect();
  const c = connect(url, v.token);
  try {
    // The send (its id made, its row inserted) waits on its channel's row for its foreign key.
    await stall.query('begin');
    await stall.query('select 1 from channels where id = $1::uuid for update', [decodeAnyId(channelId).id]);
    const sending = send(app, o.token, channelId, 'slow send');
    assert.equal(await blockedBy(stall, 1), 1, 'the send waits on the channel row');
    const live = subscribe(c.client, null, Q);
    await untilLive(app, [v]);
    await stall.query('commit');
    const id = await sending;
    // It committed after the stream began: the stream delivers it.
    await live.until((e) => e.some((x) => x.message?.id === id), 10_000, 'the MessageCreated');
    await ok(
      app,
      `mutation($i: EditMessageInput!) { editMessage(input: $i) { id } }`,
      { i: { id, content: 'slow send, edited' } },
      o.token,
    );
    const marker = await send(app, o.token, channelId, 'marker');
    await live.until((e) => e.some((x) => x.message?.id === marker), 10_000, 'marker');
    assert.deepEqual(
      live.events.map((x) => `${x.__typename} ${x.message?.content}`),
      ['MessageCreated slow send', 'MessageUpdated slow send, edited', 'MessageCreated marker'],
    );
  } finally {
    await stall.query('rollback').catch(() => {});
    await stall.end();
    await c.client.dispose();
  }
});

it('an anonymous socket told RATE_LIMITED (its user at the socket limit, its token fine) may retry: it is not closed with 4401 as one with no token', {
  timeout: 30_000,
}, async () => {
  const app2 = await createTestApp({
    rateLimits: false,
    ws: {
      socketsPerUser: 1,
      operationsPerSocket: 3,
      connectionsPerIpPerMinute: 1000,
      initTimeoutMs: 1000,
      keepAliveMs: 12_000,
    },
  });
  try {
    const url2 = `ws://127.0.0.1:${await app2.start(0)}/graphql`;
    const u = await signUp(app2);
    const first = connect(url2, u.token);
    const s1 = subscribe(first.client, null, Q);
    await untilLive(app2, [u]);
    const anon = rawSocket(url2);
    await anon.send({ type: 'connection_init', payload: {} });
    await anon.until(() => anon.messages.some((m) => m.type === 'connection_ack'), 'the ack');
    const payload = {
      query: 'subscription { events { __typename } }',
      extensions: { headers: { authorization: `Bearer ${u.token}` } },
    };
    await anon.send({ id: 'a', type: 'subscribe', payload });
    await anon.until(() => anon.messages.some((m) => m.type === 'error'), 'the refusal');
    assert.equal(anon.messages.find((m) => m.type === 'error').payload[0].extensions.code, 'RATE_LIMITED');
    // The user closes its other socket; the anonymous one retries after retryAfter.
    s1.stop();
    await first.client.dispose();
    await sleep(1500);
    assert.equal(anon.closed(), undefined, `closed: ${JSON.stringify(anon.closed())}`);
    // Not retrying, it is closed once that wait is over, told it was at the limit (4029), not
    // to sign in again (4401).
    await anon.until(() => !!anon.closed(), 'the close', 10_000);
    assert.equal(anon.closed()?.code, 4029);
  } finally {
    await app2.destroy();
  }
});

it('a member without READ_HISTORY who joins is not shown a message sent before it joined that the log was late to bring (behind an older open transaction)', {
  skip: process.env.BANTER_TEST_DB !== 'postgres',
  timeout: 30_000,
}, async () => {
  const pg = (await import('pg')).default;
  const [o, v] = await Promise.all([signUp(app), signUp(app)]);
  const { guildId, channelId } = await guildWithChannel(app, o.token);
  await denyToEveryone(o.token, guildId, channelId, 'READ_HISTORY');
  const vc = connect(url, v.token);
  const vs = subscribe(vc.client, null, Q);
  const old = new pg.Client({ connectionString: app.config.databaseUrl });
  await old.connect();
  try {
    await untilLive(app, [v]);
    // An older transaction of this database stays open: the log is read up to it only.
    await old.query('begin');
    await old.query('select pg_current_xact_id()');
    await send(app, o.token, channelId, 'before the join');
    await invite(app, o.token, guildId, v.token);
    // The scenario: the hub has read the log while `old` holds both rows back (no pause: a read
    // of its own, awaited), so it brings them only after `old` ends, the join committed by then.
    await app.deps.realtime!.poke();
    await old.query('commit');
    await app.deps.realtime!.poke();
    await send(app, o.token, channelId, 'after the join');
    await vs.until((e) => contents(e).includes('after the join'), 10_000, 'after the join');
    assert.deepEqual(contents(vs.events), ['after the join']);
  } finally {
    await old.query('rollback').catch(() => {});
    await old.end();
    await vc.client.dispose();
  }
});
