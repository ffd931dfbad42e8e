/**
 * `eventsCursor`: where a client starts its stream before it loads the state it keeps up to date.
 * Without it, a client that subscribed live and dropped before its first durable event (or that
 * fetched its state, then subscribed) missed what was committed between: it had no cursor to
 * resume from (seen by a client audit: 5 of 350 messages missing after socket cuts at start-up).
 */
import assert from 'node:assert/strict';
import { after, before, it } from 'node:test';
import { sql } from 'drizzle-orm';
import { resultRows } from '../core/db/client.ts';
import { encodeCursor } from '../core/realtime/cursor.ts';
import { discardRowsFromAnotherCluster } from '../core/realtime/log.ts';
import { decodeAnyId } from '../schema/builder.ts';
import { createTestApp, gql, ok, onPostgres, signUp, type TestApp } from './helpers.ts';
import {
  connect,
  guildWithChannel,
  logWriteLeftOpen,
  rowFromAnotherCluster,
  rowsUntil,
  send,
  subscribe,
} from './realtime-helpers.ts';

let app: TestApp;
let url: string;
before(async () => {
  app = await createTestApp({ rateLimits: false });
  url = `ws://127.0.0.1:${await app.start(0)}/graphql`;
});
after(() => app.destroy());

const raw = (id: string) => decodeAnyId(id).id;
const cursorOf = async (token: string) =>
  (await ok(app, '{ eventsCursor }', {}, token)).eventsCursor as string;

it('a client reads eventsCursor, loads its state, then subscribes after it: what was sent between is replayed, what its state had is not lost, then live', async () => {
  const u = await signUp(app);
  const { channelId } = await guildWithChannel(app, u.token);
  const before = await send(app, u.token, channelId, 'before the cursor');
  const cursor = await cursorOf(u.token);
  // The state the client loads, then a message it misses (sent before it subscribes).
  const history = await ok(
    app,
    `query($c: ID!) { channel(id: $c) { messages(last: 10) { edges { node { id } } } } }`,
    { c: channelId },
    u.token,
  );
  assert.deepEqual(
    history.channel.messages.edges.map((e: any) => e.node.id),
    [before],
  );
  const between = await send(app, u.token, channelId, 'between the state and the subscribe');
  const { client } = connect(url, u.token);
  try {
    const s = subscribe(client, cursor);
    await s.until((ev) => ev.some((e) => e.message?.id === between), 10_000, 'the message sent between');
    const live = await send(app, u.token, channelId, 'live');
    await s.until((ev) => ev.some((e) => e.message?.id === live), 10_000, 'the live message');
    // Each once, in order; the message already in the state may come again (a write of the
    // database in progress as the cursor was read, e.g. a job's, puts the start before it).
    const created = s.events.filter((e) => e.__typename === 'MessageCreated').map((e) => e.message.content);
    assert.deepEqual(
      created.filter((c) => c !== 'before the cursor'),
      ['between the state and the subscribe', 'live'],
    );
    assert.ok(created.filter((c) => c === 'before the cursor').length <= 1, `${created}`);
  } finally {
    client.dispose();
  }
});

it('a cursor read with nothing written since is resumable at once (not CURSOR_EXPIRED as at the snapshot xmax)', async () => {
  const u = await signUp(app);
  const { channelId } = await guildWithChannel(app, u.token);
  await send(app, u.token, channelId, 'something');
  const cursor = await cursorOf(u.token);
  const s = await app.deps.realtime!.subscribe({ userId: raw(u.id) }, cursor);
  await s.return!();
  // and the field needs a signed-in viewer, as the stream does
  const anon = await gql(app, '{ eventsCursor }');
  assert.equal(anon.errors?.[0]?.extensions?.code, 'UNAUTHENTICATED');
});

it('a write in progress when the cursor is read (an earlier transaction id, committed after) is replayed from it; the last committed row would have skipped it', {
  skip: !onPostgres && 'one session in PGlite: no transaction can stay open beside the others',
}, async () => {
  const hub = app.deps.realtime!;
  await hub.start();
  const u = await signUp(app);
  const { guildId, channelId } = await guildWithChannel(app, u.token);
  const first = raw(await send(app, u.token, channelId, 'first'));
  const long = await logWriteLeftOpen(app, raw(guildId), raw(channelId), first);
  try {
    // A message committed while it is open: its xid is later, its row final before the cursor.
    const committed = raw(await send(app, u.token, channelId, 'committed while it was open'));
    const cursor = await cursorOf(u.token);
    // What a naive "head" would be: the last row committed when the cursor was read.
    const [last] = resultRows<{ xid: string; seq: string }>(
      await app.deps.db.execute(
        sql`select xid::text as xid, seq from events order by xid desc, seq desc limit 1`,
      ),
    );
    const naive = encodeCursor({ xid: String(last.xid), seq: Number(last.seq) });
    await long.query('commit');
    const marker = raw(await send(app, u.token, channelId, 'after it'));
    const types = async (from: string) => {
      const s = await hub.subscribe({ userId: raw(u.id) }, from);
      try {
        const got = await rowsUntil(
          s,
          (r) => r.type === 'MESSAGE_CREATED' && r.payload.messageId === marker,
          'the marker',
        );
        return got.map((r) =>
          r.payload.messageId === committed
            ? 'committed'
            : r.payload.messageId === marker
              ? 'marker'
              : r.type,
        );
      } finally {
        await s.return!();
      }
    };
    // From the cursor: the open transaction's row, once it commits; the message committed before
    // the cursor is in the state the client loads after it, and may come again (matched by id).
    const fromCursor = await types(cursor);
    assert.ok(fromCursor.includes('MESSAGE_UPDATED'), `from eventsCursor: ${fromCursor}`);
    assert.equal(fromCursor.at(-1), 'marker');
    // From the naive head, the open transaction's row is lost.
    assert.deepEqual(await types(naive), ['marker']);
  } finally {
    await long.query('rollback').catch(() => {});
    await long.end();
  }
});

it('an eventsCursor handed out before a restore (rows from another cluster discarded) is refused, also once this cluster counts past its transaction id', async () => {
  const hub = app.deps.realtime!;
  await hub.start();
  const u = await signUp(app);
  const { channelId } = await guildWithChannel(app, u.token);
  await send(app, u.token, channelId, 'before the move');
  const db = app.deps.db;
  // What a restore leaves: a row whose xid this cluster has not reached (written here by hand, 40
  // ahead); the other cluster's eventsCursor read after it: one below a horizon past it.
  const top = await rowFromAnotherCluster(app, 40);
  // Its seq drawn from the log's sequence then (and as eventsCursor gave it before it had one).
  const [n] = resultRows<{ n: string }>(
    await db.execute(sql`select nextval(pg_get_serial_sequence('events', 'seq'))::text as n`),
  );
  const staleCursors = [
    encodeCursor({ xid: top, seq: Number(n.n) }),
    encodeCursor({ xid: top, seq: Number.MAX_SAFE_INTEGER }),
  ];
  try {
    assert.equal(await discardRowsFromAnotherCluster(db), 1);
    for (const stale of staleCursors)
      await assert.rejects(hub.subscribe({ userId: raw(u.id) }, stale), { code: 'CURSOR_EXPIRED' });
    // This cluster's own, read after the restore with nothing written since, resumes at once.
    await (await hub.subscribe({ userId: raw(u.id) }, await cursorOf(u.token))).return!();
    // This cluster writes on (a message, its xid below the other cluster's), and its counter
    // passes the stale cursor's xid (bounded: 200 transactions).
    const missed = raw(await send(app, u.token, channelId, 'after the move'));
    for (let i = 0; ; i++) {
      assert.ok(i < 200, 'the counter passed the stale xid');
      const [r] = resultRows<{ x: string }>(await db.execute(sql`select pg_current_xact_id()::text as x`));
      if (BigInt(r.x) > BigInt(top)) break;
    }
    for (const stale of staleCursors) {
      let replayed: string[] | undefined;
      try {
        const s = await hub.subscribe({ userId: raw(u.id) }, stale);
        try {
          const marker = raw(await send(app, u.token, channelId, 'marker'));
          const got = await rowsUntil(
            s,
            (r) => r.type === 'MESSAGE_CREATED' && r.payload.messageId === marker,
            'the marker',
          );
          replayed = got.map((r) =>
            r.payload.messageId === missed
              ? 'after the move'
              : r.payload.messageId === marker
                ? 'marker'
                : r.type,
          );
        } finally {
          await s.return!();
        }
      } catch (err) {
        assert.equal((err as { code?: string }).code, 'CURSOR_EXPIRED', String(err));
      }
      // Before: accepted, and the message written after the move, below the cursor's xid, never
      // came (['marker']): a gap with no CURSOR_EXPIRED to say so.
      assert.equal(
        replayed,
        undefined,
        `the stale cursor was accepted; replayed: ${JSON.stringify(replayed)}`,
      );
    }
  } finally {
    await db.execute(sql`delete from instance_settings where key = 'events.restored_at'`);
  }
});

it('after a restore whose watermark came from the other cluster (its xid ahead of this one), an eventsCursor read here resumes', async () => {
  const hub = app.deps.realtime!;
  await hub.start();
  const u = await signUp(app);
  const { channelId } = await guildWithChannel(app, u.token);
  await send(app, u.token, channelId, 'before the move');
  const db = app.deps.db;
  const [was] = resultRows<{ value: unknown }>(
    await db.execute(sql`select value from instance_settings where key = 'events.pruned_through'`),
  );
  // What a restore leaves: a row whose xid this cluster has not reached, and the other cluster's
  // watermark, a week behind it there and still ahead of this cluster's counter.
  const top = await rowFromAnotherCluster(app, 1000);
  const watermark = { xid: String(BigInt(top) - 500n), seq: 1 };
  await db.execute(sql`insert into instance_settings (key, value) values ('events.pruned_through', ${JSON.stringify(watermark)}::jsonb)
    on conflict (key) do update set value = excluded.value`);
  try {
    assert.equal(await discardRowsFromAnotherCluster(db), 1);
    const cursor = await cursorOf(u.token);
    // Before: CURSOR_EXPIRED, for this cursor and every one read after it (a client doing as
    // the field says, reading it afresh after CURSOR_EXPIRED, was refused again and again).
    const s = await hub.subscribe({ userId: raw(u.id) }, cursor);
    try {
      const m = raw(await send(app, u.token, channelId, 'after the move'));
      await rowsUntil(s, (r) => r.type === 'MESSAGE_CREATED' && r.payload.messageId === m, 'the message');
    } finally {
      await s.return!();
    }
  } finally {
    await db.execute(sql`delete from instance_settings where key = 'events.restored_at'`);
    if (was)
      await db.execute(
        sql`update instance_settings set value = ${JSON.stringify(was.value)}::jsonb where key = 'events.pruned_through'`,
      );
    else await db.execute(sql`delete from instance_settings where key = 'events.pruned_through'`);
  }
});
