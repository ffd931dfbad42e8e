/**
 * `events` without `after` is live from the moment of subscription, exactly: nothing committed
 * before it arrives, even a row the log tailer could only read later because an older
 * transaction was still open; everything committed after it does.
 */
import assert from 'node:assert/strict';
import { after, before, it } from 'node:test';
import { sql } from 'drizzle-orm';
import pg from 'pg';
import { databaseOf } from '../core/db/client.ts';
import { newId } from '../core/ids.ts';
import { decodeAnyId, decodeId } from '../schema/builder.ts';
import {
  createTestApp,
  lockWaiters,
  ok,
  onPostgres,
  signUp,
  type TestApp,
  type TestUser,
} from './helpers.ts';
import {
  connect,
  guildWithChannel,
  invite,
  metricsOf,
  send,
  subscribe,
  throughMarker,
  untilLive,
  whileReactionFails,
} from './realtime-helpers.ts';

let app: TestApp;
let url: string;
before(async () => {
  app = await createTestApp({ rateLimits: false });
  url = `ws://127.0.0.1:${await app.start(0)}/graphql`;
});
after(() => app.destroy());

/** A live events stream of `u`, once the hub has it and its snapshot is taken. */
async function liveStream(u: TestUser) {
  const c = connect(url, u.token);
  const s = subscribe(c.client);
  await untilLive(app, [u]);
  return { c, s };
}

/** The uuid inside a global id. */
const raw = (globalId: string) => decodeAnyId(globalId).id;

const contents = (events: any[]) =>
  events.filter((e) => e.__typename === 'MessageCreated').map((e) => e.message.content as string);

it('without after: only what commits after the subscription', async () => {
  const u = await signUp(app);
  const { channelId } = await guildWithChannel(app, u.token);
  await send(app, u.token, channelId, 'before');
  const { c, s } = await liveStream(u);
  await send(app, u.token, channelId, 'after');
  const [got] = await throughMarker(app, u.token, channelId, [s]);
  assert.deepEqual(contents(got), ['after']);
  await c.client.dispose();
});

it('without after: a row committed before subscribing, behind a still-open older transaction, is not delivered', {
  skip: !onPostgres,
  timeout: 20_000,
}, async () => {
  const u = await signUp(app);
  const { channelId } = await guildWithChannel(app, u.token);
  // An older transaction holds the tailer back: rows of later transactions wait behind it.
  const old = new pg.Client({ connectionString: app.config.databaseUrl });
  await old.connect();
  try {
    await old.query('begin');
    await old.query('select pg_current_xact_id()');
    await send(app, u.token, channelId, 'committed before');
    const c = connect(url, u.token);
    const s = subscribe(c.client);
    await untilLive(app, [u]);
    await old.query('commit');
    await send(app, u.token, channelId, 'committed after');
    const [got] = await throughMarker(app, u.token, channelId, [s]);
    assert.deepEqual(contents(got), ['committed after']);

    // A transaction open at subscribe time that commits after it is delivered.
    await old.query('begin');
    await old.query(
      `insert into events (type, user_id, channel_id, payload) values ('READ_STATE_UPDATED', $1, $2, '{}')`,
      [raw(u.id), raw(channelId)],
    );
    const s2 = subscribe(c.client);
    await untilLive(app, [u], 2);
    await old.query('commit');
    await send(app, u.token, channelId, 'later');
    await s2.until((e) => contents(e).includes('later'));
    assert.deepEqual(
      s2.events.map((e) => e.__typename),
      ['ReadStateUpdated', 'MessageCreated'],
    );
    await c.client.dispose();
  } finally {
    await old.end();
  }
});

it('a crowd going live together: one snapshot statement per round, one access load per user, each gets every message once', async () => {
  const hub = app.deps.realtime!;
  const owner = await signUp(app);
  const { channelId, guildId } = await guildWithChannel(app, owner.token);
  const others = [await signUp(app), await signUp(app)];
  for (const o of others) await invite(app, owner.token, guildId, o.token);
  await send(app, owner.token, channelId, 'before the crowd');
  const database = databaseOf(app.deps.db)!;
  const viewers = [owner, ...others].map((u) => ({ userId: decodeId(u.id, 'User', 'id') }));
  // 3 users × 10 subscriptions, all asking at once.
  const q0 = database.queryCount;
  const subs = await Promise.all(Array.from({ length: 30 }, (_, i) => hub.subscribe(viewers[i % 3], null)));
  const setup = database.queryCount - q0;
  assert.ok(setup <= 4, `30 live subscriptions took ${setup} statements`);
  const q1 = database.queryCount;
  await send(app, owner.token, channelId, 'to the crowd');
  const got = await Promise.all(
    subs.map(async (s) => {
      const r = await Promise.race([
        s.next(),
        new Promise<never>((_, no) => setTimeout(() => no(new Error('nothing delivered')), 10_000)),
      ]);
      return (r.value as { message?: { content: string } }).message?.content;
    }),
  );
  assert.deepEqual(new Set(got), new Set(['to the crowd']));
  // The send's own statements, the tail read, and one access load per user (not per subscription).
  const delivery = database.queryCount - q1;
  assert.ok(delivery <= 3 + 3 + 3, `delivering to 30 subscriptions of 3 users took ${delivery} statements`);
  for (const s of subs) await s.return!();
});

it('a send to a live subscriber goes out from its own result: no log read, and the ring starts none', async () => {
  const u = await signUp(app);
  const { channelId } = await guildWithChannel(app, u.token);
  const { c, s } = await liveStream(u);
  const counts = async () => {
    const count = await metricsOf(url);
    return {
      fromWrite: count('banter_log_writes_dispatched_total'),
      follow: count('banter_log_reads_total{via="follow"}'),
      ring: count('banter_log_reads_total{via="ring"}'),
    };
  };
  // Any transaction holding an xid anywhere in the cluster as the send begins (the test files
  // running beside this one share it) makes it read the log instead: try again.
  let direct = false;
  for (let attempt = 0; attempt < 20 && !direct; attempt++) {
    const before = await counts();
    await send(app, u.token, channelId, `message ${attempt}`);
    await s.until((e) => contents(e).includes(`message ${attempt}`));
    // Longer than a ring waits for a read out when it came (FOLLOW_WAIT_MS). A pause: what it
    // waits out is a timer of the hub's, not a delivery, and no stream event marks a read.
    await new Promise((r) => setTimeout(r, 100));
    const now = await counts();
    if (now.fromWrite - before.fromWrite !== 1) continue;
    direct = true;
    assert.equal(now.follow - before.follow, 0, 'a send delivered from its result also read the log');
    assert.equal(now.ring - before.ring, 0, 'the ring of a row already delivered started a read');
  }
  assert.ok(direct, 'no send was delivered from its own result');
  const sent = contents(s.events);
  assert.deepEqual(sent, [...new Set(sent)]);
  await c.client.dispose();
});

it('a send made while an older transaction is open goes out after it, not from its own result', {
  skip: !onPostgres,
  timeout: 30_000,
}, async () => {
  const u = await signUp(app);
  const { channelId, guildId } = await guildWithChannel(app, u.token);
  const { c, s } = await liveStream(u);
  const fromWrites = async () => (await metricsOf(url))('banter_log_writes_dispatched_total');
  // An older transaction writes a message and its event, and stays open across the send.
  const old = new pg.Client({ connectionString: app.config.databaseUrl });
  await old.connect();
  try {
    await old.query('begin');
    const id = newId();
    await old.query(
      `insert into messages (id, channel_id, guild_id, author_id, content) values ($1, $2, $3, $4, 'older')`,
      [id, raw(channelId), raw(guildId), raw(u.id)],
    );
    await old.query(
      `insert into events (type, guild_id, channel_id, payload) values ('MESSAGE_CREATED', $1, $2, $3)`,
      [raw(guildId), raw(channelId), JSON.stringify({ messageId: id })],
    );
    const before = await fromWrites();
    await send(app, u.token, channelId, 'newer');
    // A pause: nothing can mark this. Every later row waits behind `old` as `newer` must, and
    // typing waits for the same read of the log; presence is not ordered with the log at all.
    await new Promise((r) => setTimeout(r, 300));
    // Its row sorts after the open transaction's: nothing may go out before that one is decided.
    assert.deepEqual(contents(s.events), []);
    assert.equal(await fromWrites(), before, 'the send was delivered from its own result');
    await old.query('commit');
  } finally {
    await old.end();
  }
  const [got] = await throughMarker(app, u.token, channelId, [s]);
  assert.deepEqual(contents(got), ['older', 'newer']);
  await c.client.dispose();
});

it('a send right after a row this process has not read yet: both go out, in log order', async () => {
  const u = await signUp(app);
  const { channelId, guildId } = await guildWithChannel(app, u.token);
  const { c, s } = await liveStream(u);
  for (let i = 0; i < 5; i++) {
    // Written behind the hub's back (no ring): the send's result names it as the row before its own.
    const id = newId();
    await app.deps.db.execute(
      sql`with m as (insert into messages (id, channel_id, guild_id, author_id, content)
        values (${id}::uuid, ${raw(channelId)}::uuid, ${raw(guildId)}::uuid, ${raw(u.id)}::uuid, ${`quiet ${i}`}) returning id)
        insert into events (type, guild_id, channel_id, payload)
        select 'MESSAGE_CREATED', ${raw(guildId)}::uuid, ${raw(channelId)}::uuid, json_build_object('messageId', m.id) from m`,
    );
    await send(app, u.token, channelId, `loud ${i}`);
  }
  const [got] = await throughMarker(app, u.token, channelId, [s]);
  assert.deepEqual(contents(got), Array.from({ length: 5 }, (_, i) => [`quiet ${i}`, `loud ${i}`]).flat());
  await c.client.dispose();
});

it('a connection lost while a send and its queued log read are out fails that send, not the process', {
  skip: !onPostgres,
  timeout: 30_000,
}, async () => {
  const u = await signUp(app);
  const { channelId } = await guildWithChannel(app, u.token);
  const { c, s } = await liveStream(u);
  // The channel row locked: the insert waits on its foreign key check, its log read queued behind.
  const locker = new pg.Client({ connectionString: app.config.databaseUrl });
  await locker.connect();
  try {
    await locker.query('begin');
    await locker.query('select 1 from channels where id = $1 for update', [raw(channelId)]);
    const sending = send(app, u.token, channelId, 'doomed').then(
      () => 'sent',
      () => 'failed',
    );
    await terminateWaiting(locker, '%insert into messages%');
    assert.equal(await sending, 'failed');
    // Still serving: the next send, at once (while the lost connection may still be closing), is
    // stored and delivered once the lock goes; the lost one never was.
    const next = send(app, u.token, channelId, 'after the loss');
    assert.equal(
      await lockWaiters(locker, 1, '%insert into messages%'),
      1,
      'the next send waits on the lock',
    );
    await locker.query('rollback');
    await next;
  } finally {
    await locker.end();
  }
  await s.until((e) => contents(e).includes('after the loss'));
  assert.deepEqual(contents(s.events), ['after the loss']);
  await c.client.dispose();
});

/** Terminates the backend waiting on a lock while running a statement like `pattern`. */
async function terminateWaiting(admin: pg.Client, pattern: string) {
  for (let i = 0; i < 200; i++) {
    // Inside a transaction, pg_stat_activity is read once and kept: look again each time.
    await admin.query('select pg_stat_clear_snapshot()');
    const r = await admin.query(
      `select pid from pg_stat_activity where datname = current_database() and wait_event_type = 'Lock'
        and query ilike $1`,
      [pattern],
    );
    if (r.rows[0]) {
      await admin.query('select pg_terminate_backend($1)', [r.rows[0].pid]);
      return;
    }
    await new Promise((r) => setTimeout(r, 20));
  }
  const seen = await admin.query(
    `select state, wait_event_type, left(query, 120) as q from pg_stat_activity where datname = current_database()`,
  );
  assert.fail(`no statement like ${pattern} waited on the lock: ${JSON.stringify(seen.rows)}`);
}

it('a connection lost inside a transaction fails that request, not the process', {
  skip: !onPostgres,
  timeout: 30_000,
}, async () => {
  const u = await signUp(app);
  const { channelId } = await guildWithChannel(app, u.token);
  const id = await send(app, u.token, channelId, 'first');
  const edit = (content: string) =>
    ok(
      app,
      'mutation($i: EditMessageInput!) { editMessage(input: $i) { content } }',
      { i: { id, content } },
      u.token,
    );
  const locker = new pg.Client({ connectionString: app.config.databaseUrl });
  await locker.connect();
  try {
    await locker.query('begin');
    await locker.query('select 1 from messages where id = $1 for update', [raw(id)]);
    const editing = edit('lost').then(
      () => 'edited',
      () => 'failed',
    );
    await terminateWaiting(locker, '%from "messages"%for update%');
    assert.equal(await editing, 'failed');
    await locker.query('rollback');
  } finally {
    await locker.end();
  }
  assert.equal((await edit('second')).editMessage.content, 'second');
});

it('an event whose execution fails is not sent: the socket closes with 1013, and a resume from the last cursor gets it, once', {
  timeout: 30_000,
}, async () => {
  const u = await signUp(app);
  const { channelId } = await guildWithChannel(app, u.token);
  const { c, s } = await liveStream(u);
  const m1 = await send(app, u.token, channelId, 'one');
  await s.until((e) => contents(e).includes('one'));
  const last = s.events.find((e) => e.message?.content === 'one').cursor as string;
  // The log at error level: once for the execution, with the event's cursor.
  const logged = await whileReactionFails(app, raw(m1), async () => {
    const deadline = Date.now() + 5000;
    while (!c.closed() && !s.events.some((e) => e.__typename === 'ReactionAdded') && Date.now() < deadline)
      await new Promise((r) => setTimeout(r, 50));
  });
  assert.equal(
    c.closed()?.code,
    1013,
    `the socket was not closed to resume: errors ${JSON.stringify(s.errors)}`,
  );
  assert.deepEqual(contents(s.events), ['one'], 'nothing was sent for the failed event');
  assert.ok(
    s.errors.every((e) => !e.extensions),
    `no error result was sent for it: ${JSON.stringify(s.errors)}`,
  );
  await c.client.dispose();

  // The client resumes from the last cursor it got, which precedes the failed event.
  const c2 = connect(url, u.token);
  const s2 = subscribe(c2.client, last);
  await s2.until((e) => e.some((x) => x.__typename === 'ReactionAdded'), 10_000, 'the failed event');
  await send(app, u.token, channelId, 'two');
  await s2.until((e) => contents(e).includes('two'));
  const reactions = s2.events.filter((e) => e.__typename === 'ReactionAdded');
  assert.equal(reactions.length, 1, 'the failed event comes back exactly once');
  assert.equal(reactions[0].emoji, 'x');
  assert.deepEqual(contents(s2.events), ['two']);
  assert.deepEqual(
    logged.map((l) => l.cursor),
    [reactions[0].cursor],
    'logged once, with its cursor',
  );
  await c2.client.dispose();
});

it('an event that fails every time closes the socket (1013) for a few rounds, then goes out with its error and the stream goes on', {
  timeout: 60_000,
}, async () => {
  const u = await signUp(app);
  const { guildId, channelId } = await guildWithChannel(app, u.token);
  const c = connect(url, u.token);
  const s = subscribe(c.client);
  await untilLive(app, [u]);
  await send(app, u.token, channelId, 'one');
  await s.until((e) => e.some((x) => x.message?.content === 'one'));
  const last = s.events.find((e) => e.message?.content === 'one').cursor as string;
  // A row whose resolution fails the same way every time (a payload an older writer or an
  // operator's hand left without a valid userId: loading the user fails on the uuid cast).
  await app.deps.db.execute(sql`insert into events (type, guild_id, payload)
    values ('MEMBER_JOINED', ${decodeAnyId(guildId).id}::uuid, jsonb_build_object('userId', 'x'))`);
  await send(app, u.token, channelId, 'two');
  await app.deps.realtime!.poke();
  const closedWith = async (cc: ReturnType<typeof connect>) => {
    const deadline = Date.now() + 5000;
    while (!cc.closed() && Date.now() < deadline) await new Promise((r) => setTimeout(r, 50));
    return cc.closed()?.code;
  };
  const codes = [await closedWith(c)];
  await c.client.dispose();
  const silence = app.log.error;
  app.log.error = (() => {}) as typeof app.log.error;
  let got: string[] = [];
  try {
    // Clients resume from their last cursor, a round a second or more apart.
    for (let i = 0; i < 4 && !got.includes('two'); i++) {
      await new Promise((r) => setTimeout(r, 1_100));
      const ci = connect(url, u.token);
      const si = subscribe(ci.client, last);
      // Until the socket closes, or the message after the failing row arrives.
      const deadline = Date.now() + 5000;
      const hasTwo = () => si.events.some((e) => e.message?.content === 'two');
      while (!ci.closed() && !hasTwo() && Date.now() < deadline) await new Promise((r) => setTimeout(r, 50));
      if (!hasTwo()) codes.push(ci.closed()?.code);
      got = got.concat(si.events.map((e) => e.message?.content ?? e.__typename));
      si.stop();
      await ci.client.dispose();
    }
  } finally {
    app.log.error = silence;
  }
  // Live, then one resume: closed both times; at the third round it is sent with its error and
  // 'two' follows.
  assert.deepEqual(codes, [1013, 1013]);
  assert.ok(got.includes('two'), JSON.stringify({ codes, got }));
});
