/**
 * The event log's retention at its edges: what the prune may delete (rows final before any
 * transaction still open, aged by the database's clock), and resumes at the watermark.
 */
import assert from 'node:assert/strict';
import { after, before, it, mock } from 'node:test';
import { sql } from 'drizzle-orm';
import pg from 'pg';
import { Registry } from 'prom-client';
import { createRealtimeMetrics } from '../api/realtime/metrics.ts';
import { createDatabase, resultRows } from '../core/db/client.ts';
import type { Log } from '../core/deps.ts';
import { createNullBus } from '../core/ports/bus.ts';
import { encodeCursor, type Position } from '../core/realtime/cursor.ts';
import { createHub } from '../core/realtime/hub.ts';
import { PRUNE_BATCH, prunedThrough, pruneEvents } from '../core/realtime/log.ts';
import type { Delivered } from '../core/realtime/subscription.ts';
import { decodeAnyId } from '../schema/builder.ts';
import { createTestApp, onPostgres, signUp, type TestApp } from './helpers.ts';
import { guildWithChannel, logWriteLeftOpen, rowsUntil, send, sleep, within } from './realtime-helpers.ts';

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
  // A transaction that writes the log and stays open: every row committed after it waits for it.
  const long = await logWriteLeftOpen(app, raw(guildId), raw(channelId), first);
  try {
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

/** A Log that keeps what is logged at warn level (the rest goes nowhere). */
function warnings() {
  const warned: { obj: Record<string, unknown>; msg?: string }[] = [];
  const log: Log = {
    info() {},
    debug() {},
    error() {},
    warn(obj, msg) {
      warned.push({ obj: typeof obj === 'string' ? {} : (obj as Record<string, unknown>), msg });
    },
  };
  return { log, warned };
}

it('a transaction of this database left open past the retention holds the prune back: the hub says so (a warn log naming its pid, application_name and age) and exports it (banter_event_log_prune_held_back_seconds); neither once it ends', {
  skip: !onPostgres && 'one session in PGlite: no transaction can stay open beside the others',
}, async () => {
  const db = app.deps.db;
  const other = await createDatabase({ url: app.config.databaseUrl, dataDir: 'memory://' });
  const idle = new pg.Client({
    connectionString: app.config.databaseUrl,
    application_name: 'retention-idle',
  });
  await idle.connect();
  const { log, warned } = warnings();
  // Its own database handle and a bus nobody rings: the test app's hub is left alone.
  const hub = createHub({ ...app.deps, db: other.db, bus: createNullBus(), log }, { pollMs: 3_600_000 });
  try {
    await db.execute(sql`insert into events (type, payload) values ('HELD_BEFORE', '{}'::jsonb)`);
    const [{ pid }] = (await idle.query('select pg_backend_pid() as pid')).rows;
    // A session that wrote and was left idle in its transaction (a psql window, a leaked client).
    await idle.query('begin');
    await idle.query(`insert into events (type, payload) values ('HELD_OPEN', '{}'::jsonb)`);
    await db.execute(sql`insert into events (type, payload) values ('HELD_AFTER', '{}'::jsonb)`);
    // Days go by: every committed row is past the retention (a day past it).
    await db.execute(sql`update events set created_at = created_at - interval '8 days'`);
    await hub.start(); // prunes at start
    const held = () => warned.find((w) => w.msg?.includes('prune held back'));
    for (let i = 0; i < 300 && !held(); i++) await sleep(50);
    const types = resultRows<{ type: string }>(
      await db.execute(sql`select type from events where type like 'HELD_%' order by seq`),
    ).map((r) => r.type);
    assert.deepEqual(
      types,
      ['HELD_AFTER'],
      'the prune ran: the row before the transaction went, the one after stays',
    );
    assert.ok(held(), `a warning that the prune is held back (warnings: ${JSON.stringify(warned)})`);
    const holder = held()!.obj.holder as Record<string, unknown>;
    assert.deepEqual(
      { pid: holder.pid, applicationName: holder.applicationName, state: holder.state },
      { pid, applicationName: 'retention-idle', state: 'idle in transaction' },
    );
    const registry = new Registry();
    createRealtimeMetrics(registry, {
      sockets: () => 0,
      subscriptions: () => 0,
      delivered: () => ({ shared: 0, own: 0 }),
      prune: () => hub.pruneStatus,
    });
    const sample = async (name: string) => {
      const line = (await registry.metrics()).split('\n').find((l) => l.startsWith(`${name} `));
      return line === undefined ? undefined : Number(line.slice(name.length + 1));
    };
    const heldBack = await sample('banter_event_log_prune_held_back_seconds');
    assert.ok(
      heldBack !== undefined && heldBack > 86_000 && heldBack < 87_000,
      `held back by a day: ${heldBack}`,
    );
    assert.ok((await sample('banter_event_log_oldest_row_age_seconds'))! > 8 * 86_400 - 60);
    // Once it ends, the next prune takes what it held and nothing is said.
    await idle.query('commit');
    const before = warned.length;
    await hub.stop();
    const again = createHub({ ...app.deps, db: other.db, bus: createNullBus(), log }, { pollMs: 3_600_000 });
    try {
      await again.start();
      for (let i = 0; i < 300 && !again.pruneStatus; i++) await sleep(50);
      assert.equal(again.pruneStatus?.heldBackSeconds, 0);
      assert.deepEqual(warned.slice(before), []);
    } finally {
      await again.stop();
    }
  } finally {
    await idle.query('rollback').catch(() => {});
    await idle.end();
    await hub.stop();
    await other.close();
  }
});

/**
 * An app of its own, its hub not started: the hub under test is the only one on its database, and
 * reads only when poked (no bus rings, no poll), as an instance that is paused would. `fromWrite()`:
 * how many writes' rows went out from their result (no other transaction in progress on the server
 * as they ran: always on PGlite, most often on Postgres) rather than by a read of the log.
 */
async function pokedHub() {
  const own = await createTestApp({ rateLimits: false });
  const { log, warned } = warnings();
  const hub = createHub({ ...own.deps, bus: createNullBus(), log }, { pollMs: 3_600_000 });
  let writes = 0;
  hub.observe({ fromWrite: () => writes++ });
  return { own, hub, warned, fromWrite: () => writes };
}

for (const via of ['a read of the log', 'a write dispatched from its result'] as const) {
  it(`a tailer that the prune passed (a paused instance) ends its streams CURSOR_EXPIRED rather than with a gap, the next row coming by ${via}`, {
    timeout: 60_000,
  }, async () => {
    const { own, hub, warned, fromWrite } = await pokedHub();
    try {
      const owner = await signUp(own);
      const { guildId, channelId } = await guildWithChannel(own, owner.token);
      const first = raw(await send(own, owner.token, channelId, 'first'));
      await hub.start();
      const live = await hub.subscribe({ userId: raw(owner.id) }, null);
      const row = (type: string, age: string) =>
        own.deps.db.execute(sql`insert into events (type, guild_id, channel_id, payload, created_at)
          values (${type}, ${raw(guildId)}::uuid, ${raw(channelId)}::uuid, jsonb_build_object('messageId', ${first}::text),
            now() - ${age}::interval)`);
      // A row the tailer has not read (its instance paused), then a week goes by: the prune takes it
      // (this one, or the hub's own at its start if that runs after the insert).
      await row('MESSAGE_UPDATED', '8 days');
      await pruneEvents(own.deps.db, 7);
      const left = resultRows<{ n: number }>(
        await own.deps.db.execute(sql`select count(*)::int as n from events where type = 'MESSAGE_UPDATED'`),
      );
      assert.equal(left[0].n, 0, 'the unread row was pruned');
      let marker: string | undefined;
      if (via === 'a write dispatched from its result')
        marker = raw(await send(own, owner.token, channelId, 'after'));
      await row('MESSAGE_PINNED', '0 seconds');
      await hub.poke();
      const got: string[] = [];
      let error: unknown;
      for (let i = 0; i < 10; i++) {
        const r = await within(
          live.next().catch((err) => ({ err })),
          10_000,
        );
        if (r === 'timeout') break;
        if ('err' in r) {
          error = r.err;
          break;
        }
        if (r.done) break;
        got.push(r.value.payload.messageId === marker ? 'marker' : r.value.type);
        if (r.value.type === 'MESSAGE_PINNED') break;
      }
      assert.deepEqual(
        { code: (error as { code?: string } | undefined)?.code, got: got.filter((t) => t !== 'marker') },
        { code: 'CURSOR_EXPIRED', got: [] },
        `the stream ends CURSOR_EXPIRED, the row after the pruned one never delivered without it (got ${got}; writes dispatched from their result: ${fromWrite()})`,
      );
      assert.ok(warned.some((w) => w.msg?.includes('pruned past rows this instance had not read')));
      // A stream begun now (after the prune) is not expired by it.
      const later = await hub.subscribe({ userId: raw(owner.id) }, null);
      try {
        await row('MESSAGE_UNPINNED', '0 seconds');
        await hub.poke();
        const r = await within(later.next(), 10_000);
        assert.equal(r !== 'timeout' && !r.done && r.value.type, 'MESSAGE_UNPINNED');
      } finally {
        await later.return!();
      }
    } finally {
      await hub.stop();
      await own.destroy();
    }
  });
}

it('an instance left without subscribers for longer than the retention, after a write went out from its result, raises no alarm of rows pruned unread when someone subscribes again', {
  timeout: 60_000,
}, async () => {
  const { own, hub, warned, fromWrite } = await pokedHub();
  try {
    const owner = await signUp(own);
    const { channelId } = await guildWithChannel(own, owner.token);
    await hub.start();
    const first = await hub.subscribe({ userId: raw(owner.id) }, null);
    const sent = raw(await send(own, owner.token, channelId, 'the last before everyone left'));
    await rowsUntil(first, (r) => r.payload.messageId === sent, 'the message');
    // The last subscriber leaves; the instance reads on (polls) with no one to deliver to.
    await first.return!();
    await hub.poke();
    // More than a week goes by: every row is past the retention, and the prune takes them.
    await own.deps.db.execute(sql`update events set created_at = created_at - interval '8 days'`);
    await pruneEvents(own.deps.db, 7);
    const again = await hub.subscribe({ userId: raw(owner.id) }, null);
    try {
      const next = raw(await send(own, owner.token, channelId, 'someone is back'));
      await hub.poke();
      await rowsUntil(again, (r) => r.payload.messageId === next, 'the message sent after coming back');
      assert.deepEqual(
        warned.filter((w) => w.msg?.includes('pruned past rows')).map((w) => w.obj),
        [],
        `no rows were lost to anyone (writes dispatched from their result: ${fromWrite()})`,
      );
    } finally {
      await again.return!();
    }
  } finally {
    await hub.stop();
    await own.destroy();
  }
});
