/**
 * Replays share their reads of the log (core/realtime/hub.ts, sharedPage) and so their executions
 * (api/realtime/shared-execution.ts): many subscribers resuming at once, from the same and from
 * different cursors, with different permissions, must each get exactly their own view: every
 * message they may read after their cursor, once, in log order, and nothing else.
 *
 * The viewers: the owner (everything), a member holding a role that may see a private channel, a
 * member without it, a member of another guild only, a member of both guilds. One channel hides
 * its history from @everyone (view, but no READ_HISTORY): a replay must leave its messages out
 * for everyone but the owner, as it would live rows it could not have held.
 */
import assert from 'node:assert/strict';
import { after, before, it } from 'node:test';
import type pg from 'pg';
import { comparePos, decodeCursor } from '../core/realtime/cursor.ts';
import {
  cancelStatement,
  createTestApp,
  ok,
  onPostgres,
  signUp,
  type TestApp,
  type TestUser,
} from './helpers.ts';
import {
  channelAccessHelpers,
  connect,
  guildWithChannel,
  invite,
  metricsOf,
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

const { createChannel, hideFromEveryone, denyToEveryone, overwrite } = channelAccessHelpers(() => app);

it('many subscribers resuming at once from different cursors, with different permissions, each get exactly their own view', {
  timeout: 120_000,
}, async () => {
  const owner = await signUp(app);
  const withRole = await signUp(app);
  const plain = await signUp(app);
  const otherOnly = await signUp(app);
  const both = await signUp(app);
  const g = await guildWithChannel(app, owner.token);
  const g2 = await guildWithChannel(app, otherOnly.token);
  for (const u of [withRole, plain, both]) await invite(app, owner.token, g.guildId, u.token);
  await invite(app, otherOnly.token, g2.guildId, both.token);
  const secret = await createChannel(owner.token, g.guildId, 'secret');
  await hideFromEveryone(owner.token, g.guildId, secret);
  await overwrite(owner.token, {
    channelId: secret,
    targetType: 'MEMBER',
    targetId: withRole.id,
    allow: ['VIEW_CHANNEL', 'READ_HISTORY'],
    deny: [],
  });
  const noHistory = await createChannel(owner.token, g.guildId, 'no-history');
  await denyToEveryone(owner.token, g.guildId, noHistory, 'READ_HISTORY');

  // Who may read each channel's history (what a replay gives).
  const readers = new Map<string, TestUser[]>([
    [g.channelId, [owner, withRole, plain, both]],
    [secret, [owner, withRole]],
    [noHistory, [owner]],
    [g2.channelId, [otherOnly, both]],
  ]);
  const channels = [g.channelId, secret, noHistory, g2.channelId];
  const senderOf = (c: string) => (c === g2.channelId ? otherOnly : owner);

  // A stream that sees every message (the two guilds' owners together) gives the cursors.
  const watchers = [owner, otherOnly].map((u) => {
    const c = connect(url, u.token);
    return { c, s: subscribe(c.client, null) };
  });
  // Both live (a probe each reaches them: one sent before the stream registered is not news to
  // it) before the messages that count.
  for (const [i, w] of watchers.entries()) {
    for (let k = 0; ; k++) {
      const probe = await send(
        app,
        [owner, otherOnly][i].token,
        [g.channelId, g2.channelId][i],
        `probe ${i}`,
      );
      try {
        await w.s.until((es) => es.some((e) => e.message?.id === probe), 1000, 'probe');
        break;
      } catch (err) {
        if (k >= 30) throw err;
      }
    }
  }

  const MESSAGES = 40;
  /** message id -> its channel, in the order sent (one sender per guild, sends one at a time) */
  const sent: { id: string; channel: string }[] = [];
  for (let i = 0; i < MESSAGES; i++) {
    const channel = channels[i % channels.length];
    sent.push({ id: await send(app, senderOf(channel).token, channel, `m${i}`), channel });
  }
  const ids = new Set(sent.map((m) => m.id));
  await watchers[0].s.until(
    (es) => es.filter((e) => ids.has(e.message?.id)).length === MESSAGES - MESSAGES / 4,
    20_000,
    'guild 1',
  );
  await watchers[1].s.until(
    (es) => es.filter((e) => ids.has(e.message?.id)).length === MESSAGES / 4,
    20_000,
    'guild 2',
  );
  // The log's order of the messages, and the cursor right after each (from either watcher).
  const cursorAfter = new Map<string, string>();
  const logged: { id: string; cursor: string }[] = [];
  for (const w of watchers)
    for (const e of w.s.events)
      if (ids.has(e.message?.id)) logged.push({ id: e.message.id, cursor: e.cursor });
  logged.sort((a, b) => comparePos(decodeCursor(a.cursor), decodeCursor(b.cursor)));
  for (const l of logged) cursorAfter.set(l.id, l.cursor);
  const channelOf = new Map(sent.map((m) => [m.id, m.channel]));

  // Cursors: before the first message (the last probe's), and after a few of them; several
  // subscribers per (viewer, cursor), and every viewer at the shared ones.
  const start = [...watchers[0].s.events, ...watchers[1].s.events]
    .filter((e) => e.message && !ids.has(e.message.id))
    .map((e) => e.cursor)
    .sort((a, b) => comparePos(decodeCursor(a), decodeCursor(b)))
    .at(-1) as string;
  const points = [start, logged[4].cursor, logged[17].cursor, logged[30].cursor, logged[MESSAGES - 1].cursor];
  const viewers = [owner, withRole, plain, otherOnly, both];
  const resumes: { viewer: TestUser; from: number; copy: number }[] = [];
  for (const viewer of viewers)
    for (let from = 0; from < points.length; from++)
      for (let copy = 0; copy < 3; copy++) resumes.push({ viewer, from, copy });

  const skipOf = [0, 5, 18, 31, MESSAGES];
  /** What a viewer may read after a cursor, in log order. */
  const wanted = (viewer: TestUser, from: number) =>
    logged
      .slice(skipOf[from])
      .filter((l) => readers.get(channelOf.get(l.id)!)!.includes(viewer))
      .map((l) => l.id);
  const before = await metricsOf(url);
  const streams = resumes.map((r) => {
    const c = connect(url, r.viewer.token);
    return { ...r, c, s: subscribe(c.client, points[r.from]) };
  });
  try {
    let replayed = 0;
    for (const r of streams) {
      const want = wanted(r.viewer, r.from).length;
      replayed += want;
      await r.s.until(
        (es) => es.filter((e) => ids.has(e.message?.id)).length >= want,
        30_000,
        `replay of ${want}`,
      );
    }
    // The replays' executions were shared: far fewer executions than rows sent (each its own
    // before; a few more are presence rows of the viewers coming online, shared live rows).
    const now = await metricsOf(url);
    const own = (m: (s: string) => number) => m('banter_events_delivered_total{shared="false"}');
    assert.ok(
      own(now) - own(before) < replayed / 2,
      `replayed rows executed once for several subscribers: ${own(now) - own(before)} executions for ${replayed} rows`,
    );
    // Every stream registered (its replay ends before the tail): the tail is live for all of them.
    const hub = app.deps.realtime!;
    for (let k = 0; k < 600 && hub.subscriberCount < streams.length + watchers.length; k++) await sleep(50);
    assert.ok(hub.subscriberCount >= streams.length + watchers.length, 'every stream registered');
    // Nothing late or extra: a last message to every channel, seen live by those who may view it.
    const tail: string[] = [];
    for (const c of channels) tail.push(await send(app, senderOf(c).token, c, 'tail'));
    for (const r of streams) {
      const mayView = (c: string) =>
        readers.get(c)!.includes(r.viewer) || (c === noHistory && r.viewer !== otherOnly);
      const lastTail = tail.filter((_, i) => mayView(channels[i])).at(-1)!;
      await r.s.until((es) => es.some((e) => e.message?.id === lastTail), 30_000, 'tail');
      const want = wanted(r.viewer, r.from);
      const got = r.s.events.filter((e) => ids.has(e.message?.id)).map((e) => e.message.id);
      assert.deepEqual(
        got,
        want,
        `viewer ${viewers.indexOf(r.viewer)} from point ${r.from} (copy ${r.copy})`,
      );
      assert.deepEqual(r.s.errors, []);
      // Live after the replay: the tail messages it may view, once each, in the order sent.
      const gotTail = r.s.events.filter((e) => tail.includes(e.message?.id)).map((e) => e.message.id);
      assert.deepEqual(
        gotTail,
        tail.filter((_, i) => mayView(channels[i])),
      );
    }
  } finally {
    for (const r of streams) {
      r.s.stop();
      await r.c.client.dispose();
    }
    for (const w of watchers) {
      w.s.stop();
      await w.c.client.dispose();
    }
  }
});

it('a prune committing while a shared page loads its messages: the page fails CURSOR_EXPIRED, never a GuildDeleted lost with its former members (Postgres: a lock holds the page between its reads)', {
  skip: !onPostgres && 'needs a second connection holding a lock (PGlite has one)',
  timeout: 60_000,
}, async () => {
  const pg = (await import('pg')).default;
  const [owner, member, other] = await Promise.all([signUp(app), signUp(app), signUp(app)]);
  const g = await guildWithChannel(app, owner.token);
  const g2 = await guildWithChannel(app, other.token);
  await invite(app, owner.token, g.guildId, member.token);
  await invite(app, other.token, g2.guildId, member.token);
  const Q = `subscription($after: String) { events(after: $after) { __typename cursor
    ... on GuildDeleted { guildId } ... on MessageCreated { message { id } } } }`;
  const cm = connect(url, member.token);
  const live = subscribe(cm.client, null, Q);
  await untilLive(app, [member]);
  await send(app, owner.token, g.channelId, 'cursor');
  await live.until((e) => e.length > 0, 10_000, 'the cursor message');
  const cursor = live.events.at(-1).cursor as string;
  await ok(app, `mutation($g: ID!) { deleteGuild(id: $g) }`, { g: g.guildId }, owner.token);
  const after = await send(app, other.token, g2.channelId, 'after the deletion');
  await live.until((e) => e.some((x) => x.message?.id === after), 10_000, 'live');
  live.stop();
  const stall = new pg.Client({ connectionString: app.config.databaseUrl });
  await stall.connect();
  try {
    // The page's rows are read and the watermark checked; its messages' read waits here.
    await stall.query('begin');
    await stall.query('lock table messages in access exclusive mode');
    const replay = subscribe(cm.client, cursor, Q);
    const waiting = await lockWaiter(stall, ['%"messages"."id" in%'], 200);
    assert.ok(waiting, "the page's read of its messages waits on the lock");
    // Every row so far expires: the deleted guild's former members go with the last batch.
    const { pruneEvents } = await import('../core/realtime/log.ts');
    await pruneEvents(app.deps.db, 7, new Date(Date.now() + 8 * 86_400_000));
    await stall.query('rollback');
    // Either the replay ends CURSOR_EXPIRED (its rows were pruned while it read them), or it
    // brings the deletion: never the message after it without it.
    for (
      let k = 0;
      k < 200 && !replay.errors.length && !replay.events.some((x) => x.message?.id === after);
      k++
    )
      await sleep(50);
    if (!replay.errors.length) {
      assert.deepEqual(
        replay.events.map((x) => x.__typename),
        ['GuildDeleted', 'MessageCreated'],
        'the deletion is replayed before the message after it',
      );
    } else assert.equal(replay.errors[0].extensions?.code, 'CURSOR_EXPIRED');
    replay.stop();
  } finally {
    await stall.end();
    await cm.client.dispose();
  }
});

/** The replays finished so far (catchUp's end: every round of them). */
async function replaysDone(): Promise<number> {
  return (await metricsOf(url))('banter_events_replay_rows_count');
}

/**
 * The pid of a backend of this database waiting on a lock with a query like every pattern, asked
 * every 50 ms up to `tries` times; undefined if none came.
 */
async function lockWaiter(client: pg.Client, patterns: string[], tries: number) {
  const like = patterns.map((_, i) => `and query like $${i + 1}`).join(' ');
  for (let t = 0; t < tries; t++) {
    await sleep(50);
    // A client inside a transaction sees pg_stat_activity as at its first read there, unless cleared.
    await client.query('select pg_stat_clear_snapshot()');
    const q = await client.query<{ pid: number }>(
      `select pid from pg_stat_activity where datname = current_database() and wait_event_type = 'Lock' ${like}`,
      patterns,
    );
    if (q.rows[0]) return q.rows[0].pid;
  }
  return undefined;
}

/**
 * The viewer's cursor: a live stream's last event, a message of `channelId`. The owner's live
 * stream (`watch`, on `co`) stays open: it says when later rows are tailed (one resuming would
 * share the viewer's pages).
 */
async function cursorAndWatch(owner: TestUser, viewer: TestUser, channelId: string) {
  const cv = connect(url, viewer.token);
  const live = subscribe(cv.client, null);
  const co = connect(url, owner.token);
  const watch = subscribe(co.client, null);
  await untilLive(app, [viewer, owner]);
  const first = await send(app, owner.token, channelId, 'cursor');
  for (const s of [live, watch])
    await s.until((e) => e.some((x) => x.message?.id === first), 10_000, 'cursor');
  const cursor = live.events.find((e) => e.message?.id === first)?.cursor as string;
  assert.ok(cursor, "the viewer's live stream has a message");
  live.stop();
  await cv.client.dispose();
  return { cursor, watch, co };
}

it("a resuming viewer passes over a shared page's rows of guilds and DMs it is not in without an access load for each (readRange's prefilter, in memory)", {
  timeout: 120_000,
}, async () => {
  const [owner, viewer, stranger] = await Promise.all([signUp(app), signUp(app), signUp(app)]);
  const g = await guildWithChannel(app, owner.token);
  await invite(app, owner.token, g.guildId, viewer.token);
  const { cursor, watch, co } = await cursorAndWatch(owner, viewer, g.channelId);

  // Noise after the cursor: a message in each of OTHER guilds and OTHER DMs the viewer is not in.
  const OTHER = 12;
  const others = await Promise.all(Array.from({ length: OTHER }, () => signUp(app)));
  for (const o of others) {
    const og = await guildWithChannel(app, o.token);
    await send(app, o.token, og.channelId, 'noise in a guild');
    const dm = await ok(
      app,
      `mutation($u: [ID!]!) { openDirectChannel(userIds: $u) { id } }`,
      { u: [stranger.id] },
      o.token,
    );
    await send(app, o.token, dm.openDirectChannel.id, 'noise in a DM');
  }
  const last = await send(app, owner.token, g.channelId, 'the last');
  // Everything is tailed (the owner's stream has the last message) before counting.
  await watch.until((es) => es.some((e) => e.message?.id === last), 20_000, 'the last, for the owner');
  watch.stop();
  await co.client.dispose();

  const done = await replaysDone();
  const before = app.deps.database.queryCount;
  const c = connect(url, viewer.token);
  const replay = subscribe(c.client, cursor);
  try {
    await replay.until((es) => es.some((e) => e.message?.id === last), 20_000, 'the replay');
    for (let k = 0; k < 200 && (await replaysDone()) === done; k++) await sleep(50);
    const used = app.deps.database.queryCount - before;
    console.log(`statements while resuming past ${2 * OTHER} unrelated channels: ${used}`);
    assert.deepEqual(
      replay.events.filter((e) => e.message).map((e) => e.message.id),
      [last],
      'the replay holds its own guild message and no noise',
    );
    // Its connection, presence, resume bounds, the page and its messages, the viewer's scope and
    // its guild's access: a fixed handful (9 to 11 here). Checking each unrelated guild's and DM's
    // row against the viewer's access costs a load each: 2 x OTHER statements more (45 in all).
    assert.ok(used < 2 * OTHER, `statements while resuming past ${2 * OTHER} unrelated channels: ${used}`);
  } finally {
    replay.stop();
    await c.client.dispose();
  }
});

it("a viewer joining a guild while its shared replay is under way gets that guild's rows after the join (its scope is read again for rows past it; Postgres: a lock holds the replay between its pages)", {
  skip: !onPostgres && 'needs a second connection holding a lock (PGlite has one)',
  timeout: 120_000,
}, async () => {
  const pg = (await import('pg')).default;
  const [owner, viewer, quiet, doomed] = await Promise.all([
    signUp(app),
    signUp(app),
    signUp(app),
    signUp(app),
  ]);
  const home = await guildWithChannel(app, owner.token);
  const later = await guildWithChannel(app, owner.token);
  const gone = await guildWithChannel(app, doomed.token);
  await invite(app, owner.token, home.guildId, viewer.token);
  const { cursor, watch, co } = await cursorAndWatch(owner, viewer, home.channelId);

  // More than a page (REPLAY_PAGE, 500) of rows that are another user's own, then a guild's
  // deletion (the second page loads its former members) and a message of the viewer's guild.
  const stall = new pg.Client({ connectionString: app.config.databaseUrl });
  await stall.connect();
  const hub = app.deps.realtime!;
  try {
    await stall.query(
      `insert into events (type, user_id, payload)
         select 'READ_STATE_UPDATED', $1::uuid, '{}'::jsonb from generate_series(1, 520)`,
      // A global id: base64 of `User:<uuid>`.
      [Buffer.from(quiet.id, 'base64').toString().split(':').at(-1)],
    );
    await ok(app, `mutation($g: ID!) { deleteGuild(id: $g) }`, { g: gone.guildId }, doomed.token);
    const mine = await send(app, owner.token, home.channelId, 'before the join');
    await watch.until((es) => es.some((e) => e.message?.id === mine), 20_000, 'tailed');
    watch.stop();
    await co.client.dispose();

    // The first page is read and filtered (the viewer's scope read then); the second waits for
    // its former members. Rows that come live meanwhile overflow the replay's hold (maxPending
    // 16: it holds 4), so they come from the log in a second round, with the join among them.
    hub.configure({ maxPending: 16 });
    await stall.query('begin');
    await stall.query('lock table former_members in access exclusive mode');
    const c = connect(url, viewer.token);
    const replay = subscribe(c.client, cursor);
    try {
      const waiting = await lockWaiter(stall, ['%former_members%'], 400);
      assert.ok(
        waiting,
        `the second page's read of its former members waits on the lock (stream: ${JSON.stringify(replay.events.map((e) => e.__typename))}, ${JSON.stringify(replay.errors)})`,
      );
      await invite(app, owner.token, later.guildId, viewer.token);
      const after: string[] = [];
      for (let i = 0; i < 6; i++) after.push(await send(app, owner.token, later.channelId, `after ${i}`));
      await stall.query('rollback');
      await replay.until(
        (es) => es.some((e) => e.message?.id === after[5]),
        20_000,
        "the joined guild's messages",
      );
      const got = replay.events.filter((e) => e.message).map((e) => e.message.id);
      assert.deepEqual(got, [mine, ...after]);
      assert.deepEqual(replay.errors, []);
    } finally {
      await stall.query('rollback').catch(() => {});
      replay.stop();
      await c.client.dispose();
    }
  } finally {
    hub.configure({ maxPending: 5000 });
    await stall.end();
  }
});

it("a viewer's scope read that fails (cancelled, as a statement_timeout would) closes its stream to resume (1013), never going on without the rows it was to filter; the resume gets them (Postgres: locks hold the page and the read)", {
  skip: !onPostgres && 'needs a second connection holding a lock (PGlite has one)',
  timeout: 120_000,
}, async () => {
  const pg = (await import('pg')).default;
  const [owner, viewer, doomed] = await Promise.all([signUp(app), signUp(app), signUp(app)]);
  const home = await guildWithChannel(app, owner.token);
  const gone = await guildWithChannel(app, doomed.token);
  await invite(app, owner.token, home.guildId, viewer.token);
  const cv = connect(url, viewer.token);
  const live = subscribe(cv.client, null);
  const co = connect(url, owner.token);
  const watch = subscribe(co.client, null);
  await untilLive(app, [viewer, owner]);
  const first = await send(app, owner.token, home.channelId, 'cursor');
  for (const s of [live, watch])
    await s.until((e) => e.some((x) => x.message?.id === first), 10_000, 'cursor');
  const cursor = live.events.find((e) => e.message?.id === first)?.cursor as string;
  assert.ok(cursor, "the viewer's live stream has a message");
  live.stop();
  await cv.client.dispose();
  // The page holds a guild's deletion (it loads its former members) and the viewer's messages.
  await ok(app, `mutation($g: ID!) { deleteGuild(id: $g) }`, { g: gone.guildId }, doomed.token);
  const missed = [
    await send(app, owner.token, home.channelId, 'missed 1'),
    await send(app, owner.token, home.channelId, 'missed 2'),
  ];
  await watch.until((es) => es.some((e) => e.message?.id === missed[1]), 20_000, 'tailed');
  watch.stop();
  await co.client.dispose();

  const stall = new pg.Client({ connectionString: app.config.databaseUrl });
  const stall2 = new pg.Client({ connectionString: app.config.databaseUrl });
  await stall.connect();
  await stall2.connect();
  const r = connect(url, viewer.token);
  let rs: ReturnType<typeof subscribe> | undefined;
  try {
    // The page waits for its former members (the socket's own setup done by then); meanwhile the
    // scope's tables are locked, so the scope read, the next statement, waits in its turn.
    await stall.query('begin');
    await stall.query('lock table former_members in access exclusive mode');
    rs = subscribe(r.client, cursor);
    const held = await lockWaiter(stall2, ['%former_members%'], 400);
    assert.ok(held, "the page's read of its former members waits on the lock");
    await stall2.query('begin');
    await stall2.query('lock table channel_recipients in access exclusive mode');
    await stall.query('rollback');
    const waiting = await lockWaiter(stall, ['%union all%', '%from members where user_id = any%'], 200);
    assert.ok(waiting !== undefined, "the viewer's scope read waits on the lock");
    assert.ok(await cancelStatement(stall, waiting), 'the cancelled scope read ended');
    await stall2.query('rollback');
    const done = () => missed.every((id) => rs!.events.some((e) => e.message?.id === id));
    for (let k = 0; k < 100 && !r.closed() && !done(); k++) await sleep(50);
    const got = rs.events.filter((e) => e.message).map((e) => e.message.id);
    // Closed to resume, before any of the rows it was to filter: never live past them.
    assert.deepEqual(got, [], 'the failed replay delivered nothing');
    assert.equal(
      r.closed()?.code,
      1013,
      `closed ${JSON.stringify(r.closed())}, errors ${JSON.stringify(rs.errors)}`,
    );
  } finally {
    await stall.query('rollback').catch(() => {});
    await stall2.query('rollback').catch(() => {});
    await stall.end();
    await stall2.end();
    rs?.stop();
    await r.client.dispose();
  }
  const c2 = connect(url, viewer.token);
  const s2 = subscribe(c2.client, cursor);
  try {
    await s2.until((es) => es.some((e) => e.message?.id === missed[1]), 20_000, 'the resume');
    assert.deepEqual(
      s2.events.filter((e) => e.message).map((e) => e.message.id),
      missed,
    );
  } finally {
    s2.stop();
    await c2.client.dispose();
  }
});
