/**
 * The event log's retention at its edges: what the prune may delete (rows final before any
 * transaction still open, aged by the database's clock), and resumes at the watermark.
 */
import assert from 'node:assert/strict';
import { after, before, it, mock } from 'node:test';
import { sql } from 'drizzle-orm';
import pg from 'pg';
import { createDatabase, resultRows } from '../core/db/client.ts';
import { encodeCursor, type Position } from '../core/realtime/cursor.ts';
import { PRUNE_BATCH, prunedThrough, pruneEvents } from '../core/realtime/log.ts';
import type { Delivered } from '../core/realtime/subscription.ts';
import { decodeAnyId } from '../schema/builder.ts';
import { createTestApp, onPostgres, signUp, type TestApp } from './helpers.ts';
import { guildWithChannel, send, within } from './realtime-helpers.ts';

let app: TestApp;
before(async () => {
  app = await createTestApp({ rateLimits: false });
  await app.deps.realtime!.start();
});
after(() => app.destroy());

const raw = (id: string) => decodeAnyId(id).id;

/** Rows of `stream` until one about message `messageId` (a uuid) comes; bounded. */
async function until(stream: AsyncIterator<Delivered>, messageId: string, what: string) {
  const got: Delivered[] = [];
  for (let i = 0; i < 100; i++) {
    await app.deps.realtime!.poke();
    const r = await within(stream.next(), 10_000);
    if (r === 'timeout' || r.done) break;
    got.push(r.value);
    if (r.value.type === 'MESSAGE_CREATED' && r.value.payload.messageId === messageId) return got;
  }
  throw new Error(`${what} never came (got ${got.map((r) => r.type)})`);
}

async function rowOf(messageId: string): Promise<Position & { type: string }> {
  const [r] = resultRows<{ xid: string; seq: string; type: string }>(
    await app.deps.db.execute(sql`select xid::text as xid, seq, type from events
      where type = 'MESSAGE_CREATED' and payload->>'messageId' = ${messageId}`),
  );
  return r && { xid: String(r.xid), seq: Number(r.seq), type: r.type };
}

it('a write transaction open past the retention: the prune leaves the rows committed after it began, and a live subscriber gets them once it commits', {
  skip: !onPostgres && 'one session in PGlite: no transaction can stay open beside the others',
}, async () => {
  const hub = app.deps.realtime!;
  const owner = await signUp(app);
  const { guildId, channelId } = await guildWithChannel(app, owner.token);
  const live = await hub.subscribe({ userId: raw(owner.id) }, null);
  const first = raw(await send(app, owner.token, channelId, 'first'));
  await until(live, first, 'the first message');
  const long = new pg.Client({ connectionString: app.config.databaseUrl });
  await long.connect();
  try {
    // A transaction that writes the log and stays open (a session left in a transaction, a
    // forgotten prepared one): every row committed after it waits for it to end.
    await long.query('begin');
    await long.query(
      `insert into events (type, guild_id, channel_id, payload) values ('MESSAGE_UPDATED', $1, $2, $3)`,
      [raw(guildId), raw(channelId), { messageId: first }],
    );
    const waiting = raw(await send(app, owner.token, channelId, 'committed while it was open'));
    assert.ok(await rowOf(waiting), 'the send committed');
    // Days go by: every committed row is past the retention.
    await app.deps.db.execute(sql`update events set created_at = created_at - interval '8 days'`);
    await pruneEvents(app.deps.db, 7);
    await long.query('commit');
    const marker = raw(await send(app, owner.token, channelId, 'after it'));
    const got = await until(live, marker, 'the message sent after the transaction ended');
    assert.deepEqual(
      got.map((r) =>
        r.payload.messageId === waiting ? 'waiting' : r.payload.messageId === marker ? 'marker' : r.type,
      ),
      ['MESSAGE_UPDATED', 'waiting', 'marker'],
    );
  } finally {
    await long.query('rollback').catch(() => {});
    await long.end();
    await live.return!();
  }
});

it("the database's clock decides a row's age: an app whose clock runs ahead (the clock is mocked: it cannot be set here) prunes no row the database dates within the retention", {
  skip: !onPostgres && "PGlite runs in this process, on its clock: the app's clock is the database's",
}, async () => {
  const owner = await signUp(app);
  const { channelId } = await guildWithChannel(app, owner.token);
  const recent = raw(await send(app, owner.token, channelId, 'a minute old'));
  await app.deps.db.execute(sql`update events set created_at = now() - interval '1 minute'
    where type = 'MESSAGE_CREATED' and payload->>'messageId' = ${recent}`);
  const row = await rowOf(recent);
  mock.timers.enable({ apis: ['Date'], now: Date.now() + 8 * 86_400_000 });
  try {
    await pruneEvents(app.deps.db, 7);
  } finally {
    mock.timers.reset();
  }
  assert.ok(await rowOf(recent), 'the row is still there');
  // and a cursor before it is still resumable
  await app.deps
    .realtime!.subscribe({ userId: raw(owner.id) }, encodeCursor({ xid: row.xid, seq: row.seq - 1 }))
    .then((s) => s.return!());
});

it('resuming at the retention boundary: a cursor at the watermark replays everything after it, one just before it is CURSOR_EXPIRED, a row just inside the retention stays', async () => {
  const hub = app.deps.realtime!;
  const owner = await signUp(app);
  const { channelId } = await guildWithChannel(app, owner.token);
  const [a, b, c] = [
    raw(await send(app, owner.token, channelId, 'a')),
    raw(await send(app, owner.token, channelId, 'b')),
    raw(await send(app, owner.token, channelId, 'c')),
  ];
  const age = async (id: string, interval: string) =>
    app.deps.db.execute(sql`update events set created_at = now() - ${interval}::interval
      where type = 'MESSAGE_CREATED' and payload->>'messageId' = ${id}`);
  await age(a, '7 days 1 minute');
  await age(b, '7 days 1 minute');
  await age(c, '6 days 23 hours 59 minutes');
  const [pa, pb, pc] = [await rowOf(a), await rowOf(b), await rowOf(c)];
  await pruneEvents(app.deps.db, 7);
  assert.equal(await rowOf(a), undefined);
  assert.equal(await rowOf(b), undefined);
  assert.ok(await rowOf(c), 'the row just inside the retention stays');
  assert.deepEqual(await prunedThrough(app.deps.db), { xid: pb.xid, seq: pb.seq });
  const userId = raw(owner.id);
  for (const before of [pa, { xid: pb.xid, seq: pb.seq - 1 }]) {
    await assert.rejects(hub.subscribe({ userId }, encodeCursor(before)), { code: 'CURSOR_EXPIRED' });
  }
  const markers: string[] = [];
  for (const from of [pb, pc]) {
    const s = await hub.subscribe({ userId }, encodeCursor(from));
    try {
      markers.push(raw(await send(app, owner.token, channelId, 'marker')));
      const got = await until(s, markers.at(-1)!, 'the marker');
      assert.deepEqual(
        got.filter((r) => r.type === 'MESSAGE_CREATED').map((r) => r.payload.messageId),
        [...(from === pb ? [c] : []), ...markers],
        'every message after the cursor',
      );
    } finally {
      await s.return!();
    }
  }
});

it('two instances prune at once: each expired row is deleted once, neither fails, and the watermark is past the last of them', {
  skip: !onPostgres && 'PGlite is one process: no second instance',
}, async () => {
  const db = app.deps.db;
  const other = await createDatabase({ url: app.config.databaseUrl, dataDir: 'memory://' });
  try {
    const N = 12_001;
    await db.execute(sql`insert into events (type, payload, created_at)
      select 'MESSAGE_UPDATED', jsonb_build_object('n', i), now() - interval '8 days' - i * interval '1 ms'
      from generate_series(1, ${N}) i`);
    const [top] = resultRows<{ xid: string; seq: string }>(
      await db.execute(sql`select xid::text as xid, seq from events where created_at < now() - interval '7 days'
        order by xid::text::bigint desc, seq desc limit 1`),
    );
    const [n1, n2] = await Promise.all([pruneEvents(db, 7), pruneEvents(other.db, 7)]);
    assert.equal(n1 + n2, N);
    assert.deepEqual(await prunedThrough(db), { xid: String(top.xid), seq: Number(top.seq) });
  } finally {
    await other.close();
  }
});

it('a prune of several batches lets the event loop turn between them (PGlite answers in process: without a turn, a week of backlog pruned at start held every request, socket and timer of the embedded server until it ended)', async () => {
  const db = app.deps.db;
  await db.execute(sql`insert into events (type, payload, created_at)
    select 'MESSAGE_UPDATED', jsonb_build_object('n', i), now() - interval '8 days'
    from generate_series(1, ${3 * PRUNE_BATCH + 1}) i`);
  let ended = false;
  const pruning = pruneEvents(db, 7).then((n) => {
    ended = true;
    return n;
  });
  // A macrotask queued now runs at the prune's first turn of the event loop.
  const endedAtFirstTurn = await new Promise<boolean>((r) => setImmediate(() => r(ended)));
  assert.equal(await pruning, 3 * PRUNE_BATCH + 1);
  assert.equal(endedAtFirstTurn, false, 'the prune had ended before the event loop turned once');
});

it("the cutoff does not move with the session's DateStyle and TimeZone (an abbreviation such as CST read back as another zone's)", async () => {
  // One connection, so that the settings hold for every statement of the prune.
  const own = onPostgres
    ? await createDatabase({ url: app.config.databaseUrl, dataDir: 'memory://', poolSize: 1 })
    : undefined;
  const db = own?.db ?? app.deps.db;
  // Asia/Shanghai prints its offset as 'CST', which input reads as US Central (-06, not +08).
  await db.execute(sql`set datestyle = 'SQL, DMY'`);
  await db.execute(sql`set timezone = 'Asia/Shanghai'`);
  try {
    await db.execute(sql`insert into events (type, payload, created_at) values
      ('RETENTION_YOUNG', '{}'::jsonb, now() - interval '7 days' + interval '2 hours'),
      ('RETENTION_OLD', '{}'::jsonb, now() - interval '8 days')`);
    await pruneEvents(db, 7);
    const left = resultRows<{ type: string }>(
      await db.execute(sql`select type from events where type like 'RETENTION_%' order by type`),
    ).map((x) => x.type);
    assert.deepEqual(
      left,
      ['RETENTION_YOUNG'],
      'a row 2 hours short of the retention is kept, an older one goes',
    );
  } finally {
    if (own) await own.close();
    else {
      await db.execute(sql`reset datestyle`);
      await db.execute(sql`reset timezone`);
    }
  }
});
