/**
 * `events` without `after` is live from the moment of subscription, exactly: nothing committed
 * before it arrives, even a row the log tailer could only read later because an older
 * transaction was still open; everything committed after it does.
 */
import assert from 'node:assert/strict';
import { after, before, it } from 'node:test';
import pg from 'pg';
import { databaseOf } from '../core/db/client.ts';
import { decodeAnyId, decodeId } from '../schema/builder.ts';
import { createTestApp, ok, onPostgres, signUp, type TestApp } from './helpers.ts';
import { connect, guildWithChannel, invite, send, subscribe } from './realtime-helpers.ts';

let app: TestApp;
let url: string;
before(async () => {
  app = await createTestApp({ rateLimits: false });
  url = `ws://127.0.0.1:${await app.start(0)}/graphql`;
});
after(() => app.destroy());

/** A live events stream of `token`'s user, once the hub has it and its snapshot is taken. */
async function liveStream(token: string) {
  const c = connect(url, token);
  const s = subscribe(c.client);
  // The protocol does not acknowledge a subscription: wait until the hub has it, then a moment
  // for its snapshot (a loaded machine can take longer than a fixed pause).
  for (let i = 0; i < 100 && app.deps.realtime!.subscriberCount < 1; i++)
    await new Promise((r) => setTimeout(r, 20));
  await new Promise((r) => setTimeout(r, 300));
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
  const { c, s } = await liveStream(u.token);
  await send(app, u.token, channelId, 'after');
  await s.until((e) => contents(e).includes('after'));
  await new Promise((r) => setTimeout(r, 300));
  assert.deepEqual(contents(s.events), ['after']);
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
    await new Promise((r) => setTimeout(r, 500));
    await old.query('commit');
    await send(app, u.token, channelId, 'committed after');
    await s.until((e) => contents(e).includes('committed after'));
    await new Promise((r) => setTimeout(r, 500));
    assert.deepEqual(contents(s.events), ['committed after']);

    // A transaction open at subscribe time that commits after it is delivered.
    await old.query('begin');
    await old.query(
      `insert into events (type, user_id, channel_id, payload) values ('READ_STATE_UPDATED', $1, $2, '{}')`,
      [raw(u.id), raw(channelId)],
    );
    const s2 = subscribe(c.client);
    await new Promise((r) => setTimeout(r, 300));
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

it('a send to a live subscriber: the log read queues behind the insert on its connection, and the ring starts no other read', async () => {
  const u = await signUp(app);
  const { channelId } = await guildWithChannel(app, u.token);
  const { c, s } = await liveStream(u.token);
  const reads = async () => {
    const text = await (await fetch(url.replace('ws:', 'http:').replace('/graphql', '/metrics'))).text();
    const count = (via: string) =>
      Number(new RegExp(`^banter_log_reads_total\\{via="${via}"\\} (\\d+)`, 'm').exec(text)?.[1] ?? 0);
    return { follow: count('follow'), ring: count('ring') };
  };
  // A poll read out at the moment of the send takes its place (rare): try again.
  let followed = false;
  for (let attempt = 0; attempt < 5 && !followed; attempt++) {
    const before = await reads();
    await send(app, u.token, channelId, `message ${attempt}`);
    await s.until((e) => contents(e).includes(`message ${attempt}`));
    // Longer than a ring waits for the read out when it came (FOLLOW_WAIT_MS).
    await new Promise((r) => setTimeout(r, 100));
    const now = await reads();
    if (now.follow - before.follow !== 1) continue;
    followed = true;
    assert.equal(now.ring - before.ring, 0, 'the ring of a row already read started another read');
  }
  assert.ok(followed, 'no send was followed by its log read');
  const sent = contents(s.events);
  assert.deepEqual(sent, [...new Set(sent)]);
  await c.client.dispose();
});

it('a connection lost while a send and its queued log read are out fails that send, not the process', {
  skip: !onPostgres,
  timeout: 30_000,
}, async () => {
  const u = await signUp(app);
  const { channelId } = await guildWithChannel(app, u.token);
  const { c, s } = await liveStream(u.token);
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
    await locker.query('rollback');
  } finally {
    await locker.end();
  }
  // Still serving: the next send is stored and delivered, the lost one never was.
  await send(app, u.token, channelId, 'after the loss');
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
