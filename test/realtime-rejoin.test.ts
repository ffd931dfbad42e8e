/**
 * A member who leaves and comes back while its stream is open: what a subscriber caches of its
 * standing in the guild ("out") and of a channel there (core/realtime/visibility.ts, ViewerAccess)
 * must not disagree in a way that shows it a row it may not see now.
 */
import assert from 'node:assert/strict';
import { after, before, it } from 'node:test';
import { sql } from 'drizzle-orm';
import { newId } from '../core/ids.ts';
import { Permission } from '../core/permissions.ts';
import { messageIdOf } from '../core/realtime/log.ts';
import type { Delivered } from '../core/realtime/subscription.ts';
import { decodeAnyId } from '../schema/builder.ts';
import {
  createTestApp,
  gql,
  ok,
  onPostgres,
  signUp,
  statementsOf,
  type TestApp,
  type TestUser,
} from './helpers.ts';
import {
  channelAccessHelpers,
  guildWithChannel,
  invite,
  rowsUntil,
  send,
  untilLive,
} from './realtime-helpers.ts';

let app: TestApp;
const { everyoneRole } = channelAccessHelpers(() => app);
before(async () => {
  app = await createTestApp({ rateLimits: false });
});
after(() => app.destroy());

const raw = (id: string) => decodeAnyId(id).id;
type Stream = AsyncIterableIterator<Delivered>;

/** The stream's rows until one that `pred` holds for (that one included), appended to `got`. */
const until = (s: Stream, got: Delivered[], pred: (r: Delivered) => boolean, what: string) =>
  rowsUntil(s, pred, what, got);

const subscribe = (u: TestUser, after: string | null = null) =>
  app.deps.realtime!.subscribe({ userId: raw(u.id) }, after) as Promise<Stream>;
const about = (id: string) => (r: Delivered) => messageIdOf(r) === raw(id);

/**
 * The log is read in transaction order, and a transaction with a lower xid may commit after one
 * with a higher. Here, in xid order: X (a message of the channel deleted), R (@everyone may no
 * longer view channels), M (a message in the channel), J (the viewer joins again). J commits,
 * then X: the subscriber, whose cached standing says "out" (it left, and a guild row loaded that),
 * judges X by the channel's answer loaded then, after J and before R: it may view it. R then
 * commits, and the log brings R, M, J: R is passed over for a viewer the cache says is out, and M,
 * a message of a channel it may not view now, went out on the answer loaded before R.
 */
it('a message of a channel hidden from a member who left and came back is not delivered on the channel answer loaded before it was hidden (a lower xid committing later; Postgres)', {
  skip: !onPostgres && 'needs transactions open at once on several connections (PGlite has one)',
  timeout: 60_000,
}, async () => {
  const pg = (await import('pg')).default;
  const [owner, viewer] = await Promise.all([signUp(app), signUp(app)]);
  const { guildId, channelId } = await guildWithChannel(app, owner.token);
  // A guild the viewer stays in: its messages say how far the stream has got.
  const home = await guildWithChannel(app, owner.token);
  await invite(app, owner.token, guildId, viewer.token);
  await invite(app, owner.token, home.guildId, viewer.token);
  const everyone = await everyoneRole(owner.token, guildId);
  const old = await send(app, owner.token, channelId, 'old');
  const hub = app.deps.realtime!;
  const stream = await subscribe(viewer);
  const got: Delivered[] = [];
  const [x, r] = [0, 1].map(() => new pg.Client({ connectionString: app.config.databaseUrl }));
  await x.connect();
  await r.connect();
  try {
    await untilLive(app, [viewer]);
    await ok(app, `mutation($g: ID!) { leaveGuild(guildId: $g) }`, { g: guildId }, viewer.token);
    // A guild row while it is out: its standing there is loaded, "out", and kept.
    await ok(
      app,
      `mutation($g: ID!) { updateGuild(input: { id: $g, name: "renamed" }) { id } }`,
      { g: guildId },
      owner.token,
    );
    const mark = await send(app, owner.token, home.channelId, 'mark');
    await until(stream, got, about(mark), 'mark');

    const [g, c, e] = [raw(guildId), raw(channelId), raw(everyone)];
    await x.query('begin');
    await x.query('select pg_current_xact_id()');
    // updateRole's writes (role.service), its transaction left open.
    await r.query('begin');
    await r.query('update roles set permissions = $1 where id = $2::uuid', [
      String(Permission.SEND_MESSAGES | Permission.READ_HISTORY),
      e,
    ]);
    await r.query(
      `insert into events (type, guild_id, payload) values ('ROLE_UPDATED', $1::uuid,
        jsonb_build_object('roleId', $2::text, 'changes', jsonb_build_array('permissions')))`,
      [g, e],
    );
    const secret = await send(app, owner.token, channelId, 'secret');
    await invite(app, owner.token, guildId, viewer.token);
    // deleteMessage's writes (message-edit.service), committed after the join.
    await x.query('update messages set deleted_at = now() where id = $1::uuid', [raw(old)]);
    await x.query(
      `insert into events (type, guild_id, channel_id, payload) values ('MESSAGE_DELETED', $1::uuid, $2::uuid,
        jsonb_build_object('messageId', $3::text, 'channelId', $2::text))`,
      [g, c, raw(old)],
    );
    await x.query('commit');
    await hub.poke();
    // In again (J committed): the deletion of a message of a channel it may view now.
    await until(
      stream,
      got,
      (row) => row.type === 'MESSAGE_DELETED' && row.payload.messageId === raw(old),
      'X',
    );
    await r.query('commit');
    await hub.poke();
    await until(
      stream,
      got,
      (row) => row.type === 'MEMBER_JOINED' && row.payload.userId === raw(viewer.id),
      'its join',
    );
    // Now: @everyone may view no channel, the viewer has no other role.
    const now = await gql(
      app,
      `query($c: ID!) { channel(id: $c) { id } }`,
      { c: channelId },
      { token: viewer.token },
    );
    assert.equal(now.errors?.[0]?.extensions?.code, 'NOT_FOUND', JSON.stringify(now));
    assert.deepEqual(
      got.filter(about(secret)).map((row) => row.type),
      [],
      'a message of a channel it may not view now',
    );
  } finally {
    await x.query('rollback').catch(() => {});
    await r.query('rollback').catch(() => {});
    await x.end();
    await r.end();
    await stream.return!();
  }
});

/**
 * A shared replay page (hub.ts, sharedPage) has its GUILD_DELETED rows' former members read for
 * the viewers subscribed when it was read; a viewer resuming from the same cursor later shares the
 * page, and is looked up for itself. One statement for the page, not one for each deleted guild.
 */
it("a viewer sharing a replay page read before it subscribed looks up the page's deleted guilds it was in with one statement, not one per guild (Postgres: a lock holds the page's read)", {
  skip: !onPostgres && 'needs a second connection holding a lock (PGlite has one)',
  timeout: 120_000,
}, async () => {
  const pg = (await import('pg')).default;
  const [owner, early, late] = await Promise.all([signUp(app), signUp(app), signUp(app)]);
  const home = await guildWithChannel(app, owner.token);
  for (const u of [early, late]) await invite(app, owner.token, home.guildId, u.token);
  const watch = await subscribe(owner);
  const seen: Delivered[] = [];
  const streams: Stream[] = [];
  const stall = new pg.Client({ connectionString: app.config.databaseUrl });
  await stall.connect();
  try {
    await untilLive(app, [owner]);
    const first = await send(app, owner.token, home.channelId, 'cursor');
    const cursor = (await until(watch, seen, about(first), 'cursor')).find(about(first))!.cursor!;
    // N guilds deleted (as deleteGuild records and logs them): the owner was in each, `late` in
    // every other one, `early` in none.
    const N = 200;
    const guilds = (
      await stall.query<{ id: string }>('select gen_random_uuid()::text as id from generate_series(1, $1)', [
        N,
      ])
    ).rows.map((r) => r.id);
    const wasIn = guilds.filter((_, i) => i % 2 === 0);
    await stall.query(
      `insert into former_members (guild_id, user_id) select g::uuid, $2::uuid from unnest($1::text[]) g
       union all select g::uuid, $3::uuid from unnest($4::text[]) g`,
      [guilds, raw(owner.id), raw(late.id), wasIn],
    );
    await stall.query(
      `insert into events (type, guild_id, payload)
         select 'GUILD_DELETED', g::uuid, jsonb_build_object('guildId', g, 'actorId', $2::text)
         from unnest($1::text[]) with ordinality as t(g, i) order by i`,
      [guilds, raw(owner.id)],
    );
    const last = await send(app, owner.token, home.channelId, 'the last');
    await until(watch, seen, about(last), 'the last, tailed');

    // `early` resumes: its page's former members wait on the lock, read for the viewers here
    // then. `late` resumes from the same cursor meanwhile, and shares that page.
    await stall.query('begin');
    await stall.query('lock table former_members in access exclusive mode');
    streams.push(await subscribe(early, cursor));
    let waiting = false;
    for (let k = 0; k < 200 && !waiting; k++) {
      await stall.query('select pg_stat_clear_snapshot()');
      const q = await stall.query(
        `select 1 from pg_stat_activity where datname = current_database() and wait_event_type = 'Lock'
           and query like '%former_members%'`,
      );
      waiting = q.rows.length > 0;
      if (!waiting) await new Promise((r) => setTimeout(r, 50));
    }
    assert.ok(waiting, "the page's former members wait on the lock");
    const before = app.deps.database.queryCount;
    const started = Date.now();
    streams.push(await subscribe(late, cursor));
    await stall.query('rollback');
    const [e, l] = [[], []] as Delivered[][];
    await until(streams[0], e, about(last), 'the last (early)');
    await until(streams[1], l, about(last), 'the last (late)');
    const used = app.deps.database.queryCount - before;
    console.log(
      `resuming past ${N} deleted guilds on a shared page read before: ${used} statements, ${Date.now() - started} ms`,
    );
    const deleted = (rows: Delivered[]) =>
      rows.filter((r) => r.type === 'GUILD_DELETED').map((r) => r.guildId);
    assert.deepEqual(deleted(e), [], 'in none of them');
    assert.deepEqual(deleted(l), wasIn, 'the deletions of the guilds it was in, each once, in order');
    // Both replays' scopes, messages and a few loads: a handful. One lookup per guild: N more.
    assert.ok(used < 40, `statements: ${used}`);
  } finally {
    await stall.query('rollback').catch(() => {});
    await stall.end();
    await watch.return!();
    for (const s of streams) await s.return!();
  }
});

it("ViewerAccess.lookUpDeletions answers a page's deletions read for other viewers as wasFormerMember would, each, in one statement (recorded, named in an older row's payload, neither)", async () => {
  const { ViewerAccess } = await import('../core/realtime/visibility.ts');
  const { headPosition, loadFormerMembers, readRangeAll, wasFormerMember } = await import(
    '../core/realtime/log.ts'
  );
  const db = app.deps.db;
  const [other, viewer] = await Promise.all([signUp(app), signUp(app)]);
  const [o, v] = [raw(other.id), raw(viewer.id)];
  const from = await headPosition(db);
  const ids = Array.from({ length: 6 }, () => newId());
  // 0-2 recorded with the viewer in 0 and 2; 3 recorded without it; 4 an older instance's row
  // naming it in its payload; 5 recorded for nobody.
  for (const [i, g] of ids.entries()) {
    const users = i === 5 ? [] : i === 0 || i === 2 ? [o, v] : [o];
    for (const u of users)
      await db.execute(sql`insert into former_members (guild_id, user_id) values (${g}::uuid, ${u}::uuid)`);
    const payload = i === 4 ? { guildId: g, memberIds: [o, v] } : { guildId: g, actorId: o };
    await db.execute(
      sql`insert into events (type, guild_id, payload) values ('GUILD_DELETED', ${g}::uuid, ${JSON.stringify(payload)}::jsonb)`,
    );
  }
  const rows = (await readRangeAll(db, from, await headPosition(db), 1000)).filter((r) =>
    ids.includes(r.guildId ?? ''),
  );
  assert.equal(rows.length, ids.length);
  // As a shared page has them when read before the viewer subscribed.
  await loadFormerMembers(db, rows, [o]);
  const expected: boolean[] = [];
  for (const r of rows) expected.push(await wasFormerMember(db, r, v));
  const access = new ViewerAccess(db, v);
  const { n, result } = await statementsOf(app, async () => {
    await access.lookUpDeletions(rows);
    const out: boolean[] = [];
    for (const r of rows) out.push(await access.canSee(r, true));
    return out;
  });
  assert.deepEqual(result, [true, false, true, false, true, false]);
  assert.deepEqual(result, expected, 'as wasFormerMember answers each');
  assert.equal(n, 1, 'one statement for the page');
});
