/**
 * Review stress: transactions that commit out of xid order (a long transaction with a low xid
 * committing after later ones, in several channels) while sends take the fast path, edits,
 * deletes and reactions go on, Redis is killed and restarted, and a subscriber resumes over and
 * over with its last cursor on one instance and then the other. Its view must equal the log:
 * every row it may see exactly once, in log order, and the messages as they are in the database.
 * Postgres + its own Redis (two instances; PGlite has one connection, no overlapping transactions).
 */
import assert from 'node:assert/strict';
import { type ChildProcess, spawn } from 'node:child_process';
import { after, before, it } from 'node:test';
import pg from 'pg';
import { type App, buildApp } from '../api/app.ts';
import { newId } from '../core/ids.ts';
import { comparePos, decodeCursor } from '../core/realtime/cursor.ts';
import { pruneEvents } from '../core/realtime/log.ts';
import type { Delivered } from '../core/realtime/subscription.ts';
import { decodeAnyId, encodeId } from '../schema/builder.ts';
import { createTestApp, ok, onPostgres, signUp, type TestApp } from './helpers.ts';
import { freePort, guildWithChannel, send, sleep, within } from './realtime-helpers.ts';

let a: TestApp;
let b: App;
let redis: ChildProcess | undefined;
let redisPort: number;
let pool: pg.Pool;

function startRedis() {
  redis = spawn('redis-server', ['--port', String(redisPort), '--save', '', '--appendonly', 'no'], {
    stdio: 'ignore',
  });
}
async function redisUp() {
  for (let i = 0; i < 100; i++) {
    const pong = await new Promise<boolean>((resolve) => {
      const c = spawn('redis-cli', ['-p', String(redisPort), 'ping']);
      let out = '';
      c.stdout.on('data', (d) => {
        out += d;
      });
      c.on('close', () => resolve(out.includes('PONG')));
    });
    if (pong) return;
    await sleep(100);
  }
  throw new Error('redis did not start');
}

before(async () => {
  if (!onPostgres) {
    a = await createTestApp({ rateLimits: false });
    await a.deps.realtime!.start();
    return;
  }
  redisPort = await freePort();
  startRedis();
  await redisUp();
  a = await createTestApp({ rateLimits: false }, { REDIS_URL: `redis://127.0.0.1:${redisPort}` });
  // Same database, Redis, prefix and secret: a second instance of the same deployment.
  b = await buildApp({ ...a.config });
  await a.deps.realtime!.start();
  await b.deps.realtime!.start();
  pool = new pg.Pool({ connectionString: a.config.databaseUrl, max: 8 });
  pool.on('error', () => {});
  pool.on('connect', (c) => c.on('error', () => {}));
});
after(async () => {
  await pool?.end();
  await b?.stop();
  await a?.destroy();
  redis?.kill('SIGKILL');
});

const gid = (g: string) => decodeAnyId(g).id;

interface Got {
  seq: number;
  cursor: string;
  type: string;
  channelId: string | null;
  messageId: string | null;
  content: string | undefined;
  session: number;
}

it('out-of-xid-order commits, fast-path sends, edits, deletes and a Redis restart, resumed on both instances: the log exactly once, in order', {
  skip: !onPostgres,
  timeout: 180_000,
}, async () => {
  const u = await signUp(a);
  const userId = gid(u.id);
  const { guildId, channelId } = await guildWithChannel(a, u.token);
  const more: string[] = [];
  for (const name of ['two', 'three']) {
    const r = await ok(
      a,
      `mutation($g: ID!, $n: String!) { createChannel(input: { guildId: $g, name: $n, type: TEXT }) { id } }`,
      { g: guildId, n: name },
      u.token,
    );
    more.push(r.createChannel.id as string);
  }
  const channels = [channelId, ...more].map(gid);
  const guild = gid(guildId);
  const apps = [a, b];
  let fromWrite = 0;
  for (const app of apps) app.deps.realtime!.observe({ fromWrite: () => fromWrite++ });

  const [top] = (
    await pool.query(
      `select xid::text as xid, seq from events order by xid::text::bigint desc, seq desc limit 1`,
    )
  ).rows;
  const head = Number(top.seq);
  let cursor: string | null = Buffer.from(`e1.${top.xid}.${top.seq}`).toString('base64url');

  let failure: unknown;
  const SENDS = 240;
  const LONG = 30;
  let sent = 0;
  let longDone = 0;
  const ids: string[] = [];
  const pick = () => ids[Math.floor(Math.random() * ids.length)];
  const gone = (e: unknown) => {
    if (!/NOT_FOUND|FORBIDDEN/.test(String((e as Error).message))) throw e;
  };
  const sender = async (w: number) => {
    while (!failure) {
      const n = sent++;
      if (n >= SENDS) return;
      const app = apps[n % 2];
      const r = await ok(
        app,
        `mutation($i: SendMessageInput!) { sendMessage(input: $i) { id } }`,
        { i: { channelId: [channelId, ...more][n % 3], content: `s${n} w${w}` } },
        u.token,
      );
      ids.push(r.sendMessage.id);
      if (n % 4 === 1)
        await ok(
          apps[(n + 1) % 2],
          `mutation($i: EditMessageInput!) { editMessage(input: $i) { id } }`,
          { i: { id: pick(), content: `edit ${n}` } },
          u.token,
        ).catch(gone);
      if (n % 6 === 2)
        await ok(
          app,
          `mutation($m: ID!, $e: String!) { addReaction(messageId: $m, emoji: $e) { id } }`,
          { m: pick(), e: n % 2 ? '👍' : '🎉' },
          u.token,
        ).catch(gone);
      if (n % 9 === 3)
        await ok(
          apps[(n + 1) % 2],
          `mutation($m: ID!) { deleteMessage(id: $m) }`,
          { m: pick() },
          u.token,
        ).catch(gone);
    }
  };
  // A transaction that takes its xid first, then waits while later ones commit, then writes a
  // message (and sometimes an edit of another) and commits: its rows sort before theirs.
  const longWriter = async (w: number) => {
    while (longDone < LONG && !failure) {
      longDone++;
      const c = await pool.connect();
      try {
        await c.query('begin');
        await c.query('select pg_current_xact_id()');
        await sleep(30 + Math.random() * 400);
        const id = newId();
        const ch = channels[Math.floor(Math.random() * 3)];
        await c.query(
          `insert into messages (id, channel_id, guild_id, author_id, content) values ($1, $2, $3, $4, $5)`,
          [id, ch, guild, userId, `long ${w} ${id}`],
        );
        const ev = await c.query(
          `insert into events (type, guild_id, channel_id, payload) values ('MESSAGE_CREATED', $1, $2, $3) returning seq`,
          [guild, ch, JSON.stringify({ messageId: id })],
        );
        const target = ids.length ? gid(pick()) : undefined;
        let edited: { seq: number; channelId: string } | undefined;
        if (target && Math.random() < 0.5) {
          const m = await c.query(
            `update messages set content = $2, edited_at = now() where id = $1 and deleted_at is null returning channel_id`,
            [target, `long edit ${w} ${newId()}`],
          );
          if (m.rows.length) {
            const e2 = await c.query(
              `insert into events (type, guild_id, channel_id, payload) values ('MESSAGE_UPDATED', $1, $2, $3) returning seq`,
              [guild, m.rows[0].channel_id, JSON.stringify({ messageId: target })],
            );
            edited = { seq: Number(e2.rows[0].seq), channelId: m.rows[0].channel_id };
          }
        }
        await c.query('commit');
        ids.push(encodeId('Message', id));
        const refs = [
          {
            seq: Number(ev.rows[0].seq),
            type: 'MESSAGE_CREATED',
            guildId: guild,
            channelId: ch,
            userId: null,
          },
        ];
        if (edited)
          refs.push({
            seq: edited.seq,
            type: 'MESSAGE_UPDATED',
            guildId: guild,
            channelId: edited.channelId,
            userId: null,
          });
        // The ring, as transact() rings after its commit (lost while Redis is down).
        await apps[w % 2].deps.bus.announce(refs);
      } catch (e) {
        await c.query('rollback').catch(() => {});
        // A deadlock with a concurrent edit or delete of the same message: that transaction is gone.
        if (!/deadlock/.test(String(e))) throw e;
      } finally {
        c.release();
      }
    }
  };

  let writing = true;
  const writers = Promise.all([
    ...Array.from({ length: 4 }, (_, w) => sender(w)),
    longWriter(0),
    longWriter(1),
    (async () => {
      // Redis away for a while in the middle, then back.
      await sleep(1500);
      redis?.kill('SIGKILL');
      await sleep(1200);
      startRedis();
      await redisUp();
    })(),
  ]).finally(() => {
    writing = false;
  });

  const got: Got[] = [];
  let session = 0;
  const read = async (app: App, stayMs: number) => {
    const sub = await app.deps.realtime!.subscribe({ userId }, cursor);
    const s = session++;
    const t = setTimeout(() => void sub.return!(), stayMs);
    try {
      for (;;) {
        const r = await sub.next!();
        if (r.done) break;
        const row = r.value as Delivered;
        if (row.cursor === null) continue;
        got.push({
          seq: row.seq,
          cursor: row.cursor,
          type: row.type,
          channelId: row.channelId,
          messageId: (row.payload.messageId as string | undefined) ?? null,
          content: row.message?.content,
          session: s,
        });
        cursor = row.cursor;
      }
    } finally {
      clearTimeout(t);
    }
  };
  writers.catch((e) => {
    failure = e;
  });
  while (writing) await read(apps[session % 2], 50 + Math.random() * 400);
  await writers;
  if (failure) throw failure;
  // Drain on each instance until the last row of the log has been seen (or nothing more comes).
  const [{ last }] = (await pool.query(`select max(seq)::bigint as last from events`)).rows;
  for (let i = 0; i < 4 && !got.some((g) => g.seq === Number(last)); i++) await read(apps[i % 2], 1500);

  // Exactly once, in log order.
  const cursors = got.map((g) => g.cursor);
  assert.equal(new Set(cursors).size, cursors.length, 'no event delivered twice');
  for (let i = 1; i < got.length; i++) {
    assert.ok(
      comparePos(decodeCursor(got[i - 1].cursor), decodeCursor(got[i].cursor)) < 0,
      `log order kept at ${i}: ${JSON.stringify([got[i - 1], got[i]])}`,
    );
  }
  // None lost: every row in these channels after the start, except changes to messages deleted by now.
  const rows = (
    await pool.query(
      `select e.seq::bigint as seq, e.type, e.payload->>'messageId' as mid, m.deleted_at is not null as gone
       from events e left join messages m on m.id = (e.payload->>'messageId')::uuid
       where e.seq > $1 and e.channel_id = any($2::uuid[]) order by e.seq`,
      [head, channels],
    )
  ).rows;
  const seen = new Set(got.map((g) => g.seq));
  const missing = rows.filter((r) => !seen.has(Number(r.seq)) && !(r.gone && r.type !== 'MESSAGE_DELETED'));
  assert.deepEqual(missing, [], 'no event lost');
  // The view: each message's last delivered state is the database's.
  const view = new Map<string, string | null>();
  for (const g of got)
    if (g.messageId) view.set(g.messageId, g.type === 'MESSAGE_DELETED' ? null : g.content!);
  const db = (
    await pool.query(
      `select id::text, content, deleted_at is not null as gone from messages where channel_id = any($1::uuid[])`,
      [channels],
    )
  ).rows;
  for (const m of db) {
    if (!view.has(m.id)) {
      assert.ok(m.gone, `message ${m.id} never seen`);
      continue;
    }
    assert.equal(view.get(m.id), m.gone ? null : m.content, `message ${m.id}`);
  }
  if (process.env.DBG) console.log({ sessions: session, got: got.length, rows: rows.length, fromWrite });
});

/** Raw SQL on the app's database (pg pool or PGlite). */
async function query(text: string, params: unknown[] = []): Promise<any[]> {
  if (pool) return (await pool.query(text, params)).rows;
  const client = (
    a.deps.db as unknown as { $client: { query(t: string, p: unknown[]): Promise<{ rows: any[] }> } }
  ).$client;
  return (await client.query(text, params)).rows;
}

it('sends from their own results racing other sends, polls and rings: a live stream and a resuming one get each row once, in order', {
  timeout: 120_000,
}, async () => {
  const u = await signUp(a);
  const userId = gid(u.id);
  const { guildId, channelId } = await guildWithChannel(a, u.token);
  const r2 = await ok(
    a,
    `mutation($g: ID!) { createChannel(input: { guildId: $g, name: "two", type: TEXT }) { id } }`,
    { g: guildId },
    u.token,
  );
  const chans = [channelId, r2.createChannel.id as string];
  const hub = a.deps.realtime!;
  let fromWrite = 0;
  const reads = { follow: 0, ring: 0, poll: 0 };
  hub.observe({ fromWrite: () => fromWrite++, read: (via) => reads[via]++ });
  const collect = (sub: AsyncIterableIterator<Delivered>, into: Delivered[]) =>
    (async () => {
      for (;;) {
        const r = await sub.next!();
        if (r.done) return;
        if (r.value.cursor !== null) into.push(r.value);
      }
    })();
  const liveRows: Delivered[] = [];
  const live = await hub.subscribe({ userId }, null);
  const liveDone = collect(live, liveRows);
  const [top] = await query(
    `select xid::text as xid, seq from events order by xid::text::bigint desc, seq desc limit 1`,
  );
  let cursor: string | null = Buffer.from(`e1.${top.xid}.${top.seq}`).toString('base64url');
  const head = Number(top.seq);

  const SENDS = onPostgres ? 300 : 150;
  let sent = 0;
  let writing = true;
  const ids: string[] = [];
  const sender = async () => {
    while (sent < SENDS) {
      const n = sent++;
      const r = await ok(
        a,
        `mutation($i: SendMessageInput!) { sendMessage(input: $i) { id } }`,
        { i: { channelId: chans[n % 2], content: `f${n}` } },
        u.token,
      );
      ids.push(r.sendMessage.id);
      if (n % 10 === 5)
        await ok(
          a,
          `mutation($i: EditMessageInput!) { editMessage(input: $i) { id } }`,
          { i: { id: ids[ids.length - 2], content: `e${n}` } },
          u.token,
        ).catch(() => {});
    }
  };
  const poker = async () => {
    while (writing) {
      await hub.poke();
      await sleep(Math.random() * 5);
    }
  };
  const writers = Promise.all([sender(), sender(), sender(), sender()]).finally(() => {
    writing = false;
  });
  const pokes = poker();
  const resumed: Delivered[] = [];
  while (writing) {
    const sub = await hub.subscribe({ userId }, cursor);
    const t = setTimeout(() => void sub.return!(), 20 + Math.random() * 200);
    const got: Delivered[] = [];
    await collect(sub, got);
    clearTimeout(t);
    resumed.push(...got);
    if (got.length) cursor = got[got.length - 1].cursor;
  }
  await writers;
  await pokes;
  const [{ last }] = await query(`select max(seq)::bigint as last from events`);
  for (let i = 0; i < 3 && !resumed.some((g) => g.seq === Number(last)); i++) {
    const sub = await hub.subscribe({ userId }, cursor);
    const t = setTimeout(() => void sub.return!(), 1000);
    const got: Delivered[] = [];
    await collect(sub, got);
    clearTimeout(t);
    resumed.push(...got);
    if (got.length) cursor = got[got.length - 1].cursor;
  }
  const t0 = Date.now();
  while (!liveRows.some((g) => g.seq === Number(last)) && Date.now() - t0 < 5000) await sleep(50);
  // A send goes out from its own result only when no transaction anywhere in the cluster held an
  // xid as it began: other suites on this server (a bulk insert, say) can hold one all along the
  // burst. Then sends more, one at a time, in a channel outside the checks below, for up to 15 s:
  // another suite's test may hold a transaction open for a second or more (lock-order's do).
  if (fromWrite === 0) {
    const r3 = await ok(
      a,
      `mutation($g: ID!) { createChannel(input: { guildId: $g, name: "three", type: TEXT }) { id } }`,
      { g: guildId },
      u.token,
    );
    for (let i = 0; i < 150 && fromWrite === 0; i++) {
      await send(a, u.token, r3.createChannel.id, `x${i}`);
      await sleep(100);
    }
  }
  await live.return!();
  await liveDone;

  const rows = await query(
    `select e.seq::bigint as seq, e.type from events e where e.seq > $1 and e.channel_id = any($2::uuid[]) order by e.seq`,
    [head, chans.map(gid)],
  );
  for (const [name, got] of [
    ['live', liveRows],
    ['resumed', resumed],
  ] as const) {
    const cursors = got.map((g) => g.cursor!);
    assert.equal(new Set(cursors).size, cursors.length, `${name}: no event delivered twice`);
    for (let i = 1; i < got.length; i++)
      assert.ok(comparePos(got[i - 1], got[i]) < 0, `${name}: log order kept at ${i}`);
    const seen = new Set(got.map((g) => g.seq));
    // Edits are of live messages (none deleted here): every row arrives.
    assert.deepEqual(
      rows.filter((r) => !seen.has(Number(r.seq))).map((r) => `${r.seq} ${r.type}`),
      [],
      `${name}: no event lost`,
    );
  }
  if (process.env.DBG) console.log({ fromWrite, reads, live: liveRows.length, resumed: resumed.length });
  assert.ok(fromWrite > 0, 'some sends went out from their own results');
});

it('without after, then resumed from its own cursor: each resume brings exactly what the live stream brought after that cursor, a row committed before it began behind an older open transaction included', {
  skip: !onPostgres,
  timeout: 30_000,
}, async () => {
  const u = await signUp(a);
  const userId = gid(u.id);
  const { channelId } = await guildWithChannel(a, u.token);
  const hub = a.deps.realtime!;
  const take = async (sub: AsyncIterableIterator<Delivered>, ms: number) => {
    const got: Delivered[] = [];
    const t = setTimeout(() => void sub.return!(), ms);
    for (;;) {
      const r = await sub.next!();
      if (r.done) break;
      if (r.value.cursor !== null) got.push(r.value);
    }
    clearTimeout(t);
    return got;
  };
  const send = (content: string) =>
    ok(
      a,
      `mutation($i: SendMessageInput!) { sendMessage(input: $i) { id } }`,
      { i: { channelId, content } },
      u.token,
    );
  // An older transaction with a row of its own is open: 'before' commits behind it, ahead of the subscription.
  const old = await pool.connect();
  try {
    await old.query('begin');
    await old.query(
      `insert into events (type, user_id, channel_id, payload) values ('READ_STATE_UPDATED', $1, $2, '{}')`,
      [userId, gid(channelId)],
    );
    await send('before');
    const live = await hub.subscribe({ userId }, null);
    const liveGot = take(live, 1500);
    await sleep(200);
    await old.query('commit');
    await hub.poke();
    const got = await liveGot;
    const shown = (rows: Delivered[]) => rows.map((r) => `${r.type} ${r.message?.content ?? ''}`);
    // Live: the older transaction's row (it committed after the subscription), then 'before',
    // which comes after it in the log: the stream is the log from its first row on.
    assert.deepEqual(shown(got), ['READ_STATE_UPDATED ', 'MESSAGE_CREATED before']);
    // Resumed from each cursor it was given: exactly what the live stream brought after it.
    for (const [i, r] of got.entries()) {
      const again = await take(await hub.subscribe({ userId }, r.cursor), 800);
      assert.deepEqual(shown(again), shown(got.slice(i + 1)), `resumed after live row ${i}`);
    }
  } finally {
    old.release();
  }
});

it('a prune that commits while a slow replay is paused between pages ends it with CURSOR_EXPIRED, never a hole', {
  timeout: 60_000,
}, async () => {
  const u = await signUp(a);
  const userId = gid(u.id);
  const { channelId } = await guildWithChannel(a, u.token);
  const hub = a.deps.realtime!;
  const [top] = await query(
    `select xid::text as xid, seq from events order by xid::text::bigint desc, seq desc limit 1`,
  );
  const start = Buffer.from(`e1.${top.xid}.${top.seq}`).toString('base64url');
  // More than one replay page (500) of rows only this viewer may see.
  await query(
    `insert into events (type, user_id, channel_id, payload)
     select 'READ_STATE_UPDATED', $1::uuid, $2::uuid, '{}'::jsonb from generate_series(1, 700)`,
    [userId, gid(channelId)],
  );
  // Read by the tailer first: the rows are the replay's, not live.
  await hub.poke();
  hub.configure({ maxPending: 40 });
  const got: Delivered[] = [];
  let error: unknown;
  try {
    const sub = await hub.subscribe({ userId }, start);
    // The replay pauses between its first page's rows (window 10): the prune comes meanwhile.
    for (let i = 0; i < 5; i++) {
      const r = await sub.next!();
      got.push(r.value);
    }
    // Everything older than a day from now: every row above.
    await pruneEvents(a.deps.db, 0, new Date(Date.now() + 86_400_000));
    try {
      for (;;) {
        const r = await within(sub.next!(), 3000);
        if (r === 'timeout' || r.done) break;
        got.push(r.value);
      }
    } catch (e) {
      error = e;
    }
    await sub.return!();
  } finally {
    hub.configure({ maxPending: 5000 });
  }
  const seqs = got.map((r) => r.seq);
  for (let i = 1; i < seqs.length; i++) assert.equal(seqs[i], seqs[i - 1] + 1, 'no hole');
  if (seqs.length < 700)
    assert.equal((error as { code?: string })?.code, 'CURSOR_EXPIRED', `after ${seqs.length} rows`);
});
