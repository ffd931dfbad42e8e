/**
 * Writes whose one transaction grew with a community's size (see big-deletes.test.ts for the
 * deletions batched before). The realtime log delivers nothing written after a transaction still
 * in progress (core/realtime/log.ts, Horizon): one such transaction held every stream of every
 * guild. Asserted on the transaction's size (statements, rows read), not on time.
 */
import assert from 'node:assert/strict';
import { after, before, it } from 'node:test';
import { type SQL, sql } from 'drizzle-orm';
import { resultRows, type Tx } from '../core/db/client.ts';
import { PRUNE_BATCH, pruneEvents } from '../core/realtime/log.ts';
import { decodeAnyId } from '../schema/builder.ts';
import { createTestApp, gql, ok, signUp, statementsOf, type TestApp } from './helpers.ts';
import { channelAccessHelpers, guildWithChannel, invite } from './realtime-helpers.ts';

let app: TestApp;
const { hiddenCategoryOf } = channelAccessHelpers(() => app);
before(async () => {
  app = await createTestApp({ rateLimits: false });
});
after(async () => {
  await app?.destroy();
});

const raw = (id: string) => decodeAnyId(id).id;

it("a category's deletion takes as many statements for 300 channels as for 3 (one event insert, not one per channel)", {
  timeout: 120_000,
}, async () => {
  const owner = await signUp(app);
  const counts: number[] = [];
  for (const n of [3, 300]) {
    const { guildId } = await guildWithChannel(app, owner.token);
    const cat = await hiddenCategoryOf(owner.token, guildId, n);
    const { n: statements } = await statementsOf(app, () =>
      ok(app, `mutation($id: ID!) { deleteChannel(id: $id) }`, { id: cat }, owner.token),
    );
    counts.push(statements);
    // Each channel told once, in the deletion's transaction, and keeps the category's overwrite.
    const told = resultRows<{ n: number; xids: number }>(
      await app.deps.db.execute(sql`select count(*)::int as n, count(distinct xid::text)::int as xids from events
        where guild_id = ${raw(guildId)}::uuid and type = 'PERMISSIONS_CHANGED' and payload ? 'parentId'`),
    );
    assert.deepEqual(told[0], { n, xids: 1 });
    const kept = resultRows<{ n: number }>(
      await app.deps.db.execute(sql`select count(*)::int as n from permission_overwrites o
        join channels c on c.id = o.channel_id where c.guild_id = ${raw(guildId)}::uuid`),
    );
    assert.equal(kept[0].n, n);
  }
  // Before: one insert per channel (a round trip each in the deletion's transaction: 500 channels
  // held it ~0.4 s, 2,000 ~1.1 s).
  assert.equal(counts[1], counts[0], `statements for 3 channels, then 300: ${counts}`);
});

/**
 * Runs `op`, and what `probe` (a count, column n) grew by inside each transaction the app commits
 * meanwhile (db.transaction wrapped, the same connection and transaction: instrumentation, nothing
 * replaced), read as it begins and just before its commit. A backend's transaction statistics
 * hold its earlier statements' counts until they are flushed (at most once a second).
 */
async function insideEachTransaction<T>(probe: SQL, op: () => Promise<T>) {
  type Run = (fn: (tx: Tx) => Promise<unknown>, config?: unknown) => Promise<unknown>;
  const db = app.deps.db as unknown as { transaction: Run };
  const original = db.transaction;
  const seen: number[] = [];
  db.transaction = function (this: unknown, fn, config) {
    return original.call(
      this,
      async (tx: Tx) => {
        const read = async () => Number(resultRows<{ n: unknown }>(await tx.execute(probe))[0].n);
        const before = await read();
        const r = await fn(tx);
        seen.push((await read()) - before);
        return r;
      },
      config,
    );
  };
  try {
    return { result: await op(), seen };
  } finally {
    db.transaction = original;
  }
}

it("a guild's deletion settles who was in by who joined or left while it recorded them, not by comparing every member again", {
  timeout: 120_000,
}, async () => {
  const owner = await signUp(app);
  const { guildId } = await guildWithChannel(app, owner.token);
  const g = raw(guildId);
  const M = 5_000;
  await app.deps.db.execute(sql`insert into users (id, username, email, password_hash)
    select gen_random_uuid(), 'fm' || i || '_' || ${g.slice(0, 8)}, 'fm' || i || '_' || ${g.slice(0, 8)} || '@test', 'x'
    from generate_series(1, ${M}) i`);
  await app.deps.db.execute(sql`insert into members (guild_id, user_id)
    select ${g}::uuid, id from users where username like ${`fm%\\_${g.slice(0, 8)}`}`);
  // Rows an earlier deletion that failed left for users who are no longer members, their ids
  // spread over every batch's range: forgotten by the recording.
  await app.deps.db.execute(sql`insert into users (id, username, email, password_hash)
    select gen_random_uuid(), 'fx' || i || '_' || ${g.slice(0, 8)}, 'fx' || i || '_' || ${g.slice(0, 8)} || '@test', 'x'
    from generate_series(1, 300) i`);
  await app.deps.db.execute(sql`insert into former_members (guild_id, user_id, deleted_at)
    select ${g}::uuid, id, now() - interval '1 day' from users where username like ${`fx%_${g.slice(0, 8)}`}`);
  // former_members rows read by each transaction: its sequential and index reads.
  const reads = sql`select pg_stat_get_xact_tuples_returned('former_members'::regclass) + (
      select coalesce(sum(pg_stat_get_xact_tuples_returned(indexrelid)), 0) from pg_index
      where indrelid = 'former_members'::regclass) as n`;
  const { result, seen } = await insideEachTransaction(reads, () =>
    ok(app, `mutation($id: ID!) { deleteGuild(id: $id) }`, { id: guildId }, owner.token),
  );
  assert.equal(result.deleteGuild, guildId);
  const was = resultRows<{ n: number }>(
    await app.deps.db.execute(sql`select count(*)::int as n from former_members where guild_id = ${g}::uuid`),
  );
  assert.equal(was[0].n, M + 1);
  // The deletion's own transaction (the only one it runs through transact). Before: it compared
  // every recorded member with every member, twice (~0.35-0.5 s for 300k members, every realtime
  // stream held meanwhile).
  assert.equal(seen.length, 1);
  assert.ok(seen[0] < 100, `former_members rows read in the deletion's transaction: ${seen[0]}`);
});

it("who joined, left or was kicked after a guild's deletion recorded its members is settled by the deletion's own transaction", {
  timeout: 120_000,
}, async () => {
  const [owner, stayer, leaver, kicked, joiner] = await Promise.all([1, 2, 3, 4, 5].map(() => signUp(app)));
  const { guildId } = await guildWithChannel(app, owner.token);
  for (const u of [stayer, leaver, kicked]) await invite(app, owner.token, guildId, u.token);
  // Between the recording (deleteGuild's first phase) and its own transaction, the first
  // transaction it begins: a join, a leave and a kick, each committed before it.
  type Run = (fn: unknown, config?: unknown) => Promise<unknown>;
  const db = app.deps.db as unknown as { transaction: Run };
  const original = db.transaction;
  let armed = true;
  db.transaction = async function (this: unknown, fn, config) {
    if (armed) {
      armed = false;
      await invite(app, owner.token, guildId, joiner.token);
      await ok(app, `mutation($g: ID!) { leaveGuild(guildId: $g) }`, { g: guildId }, leaver.token);
      await ok(
        app,
        `mutation($g: ID!, $u: ID!) { kickMember(guildId: $g, userId: $u) }`,
        { g: guildId, u: kicked.id },
        owner.token,
      );
    }
    return original.call(this, fn, config);
  };
  try {
    await ok(app, `mutation($id: ID!) { deleteGuild(id: $id) }`, { id: guildId }, owner.token);
  } finally {
    db.transaction = original;
  }
  assert.equal(armed, false);
  const was = resultRows<{ user_id: string }>(
    await app.deps.db.execute(
      sql`select user_id from former_members where guild_id = ${raw(guildId)}::uuid order by user_id`,
    ),
  );
  assert.deepEqual(
    was.map((w) => w.user_id),
    [owner, stayer, joiner].map((u) => raw(u.id)).sort(),
  );
});

it("the log's retention forgets a big deleted guild's former members in batches, not in one transaction", {
  timeout: 120_000,
}, async () => {
  const owner = await signUp(app);
  const { guildId } = await guildWithChannel(app, owner.token);
  const g = raw(guildId);
  const M = 12_000;
  await app.deps.db.execute(sql`insert into users (id, username, email, password_hash)
    select gen_random_uuid(), 'px' || i || '_' || ${g.slice(0, 8)}, 'px' || i || '_' || ${g.slice(0, 8)} || '@test', 'x'
    from generate_series(1, ${M}) i`);
  // Recorded by a deletion 10 days ago (its GUILD_DELETED row expired with it).
  await app.deps.db.execute(sql`insert into former_members (guild_id, user_id, deleted_at)
    select ${g}::uuid, id, now() - interval '10 days' from users where username like ${`px%\\_${g.slice(0, 8)}`}`);
  const deletes = sql`select pg_stat_get_xact_tuples_deleted('former_members'::regclass) as n`;
  const { seen } = await insideEachTransaction(deletes, () => pruneEvents(app.deps.db, 7));
  const left = resultRows<{ n: number }>(
    await app.deps.db.execute(sql`select count(*)::int as n from former_members where guild_id = ${g}::uuid`),
  );
  assert.equal(left[0].n, 0);
  assert.equal(
    seen.reduce((a, b) => a + b, 0),
    M,
  );
  // Before: all in the prune's last transaction (300k rows: ~0.5 s, every realtime stream held).
  assert.ok(Math.max(...seen) <= PRUNE_BATCH, `former_members rows deleted per transaction: ${seen}`);
});

it("a role's deletion reads its own guild's overwrites, not every overwrite on the server", {
  timeout: 120_000,
}, async () => {
  const owner = await signUp(app);
  const { guildId, channelId } = await guildWithChannel(app, owner.token);
  const r = await ok(
    app,
    `mutation($g: ID!) { createRole(input: { guildId: $g, name: "muted" }) { id } }`,
    { g: guildId },
    owner.token,
  );
  const role = r.createRole.id as string;
  await ok(
    app,
    `mutation($c: ID!, $t: ID!) { setChannelOverwrite(input: { channelId: $c, targetType: ROLE, targetId: $t, allow: [], deny: [SEND_MESSAGES] }) { allow } }`,
    { c: channelId, t: role },
    owner.token,
  );
  // Other guilds' overwrites: 20k on 400 channels of another guild.
  const other = await guildWithChannel(app, owner.token);
  await app.deps.db.execute(sql`insert into channels (id, guild_id, type, name)
    select gen_random_uuid(), ${raw(other.guildId)}::uuid, 'TEXT', 'o' || i from generate_series(1, 400) i`);
  await app.deps.db.execute(sql`insert into permission_overwrites (channel_id, target_type, target_id, allow, deny)
    select c.id, 'ROLE', gen_random_uuid(), 0, 1024 from channels c cross join generate_series(1, 50)
    where c.guild_id = ${raw(other.guildId)}::uuid and c.name like 'o%'`);
  await app.deps.db.execute(sql`analyze permission_overwrites`);
  const reads = sql`select pg_stat_get_xact_tuples_returned('permission_overwrites'::regclass) + (
      select coalesce(sum(pg_stat_get_xact_tuples_returned(indexrelid)), 0) from pg_index
      where indrelid = 'permission_overwrites'::regclass) as n`;
  const { seen } = await insideEachTransaction(reads, () =>
    ok(app, `mutation($id: ID!) { deleteRole(id: $id) }`, { id: role }, owner.token),
  );
  const left = resultRows<{ n: number }>(
    await app.deps.db.execute(
      sql`select count(*)::int as n from permission_overwrites where target_id = ${raw(role)}::uuid`,
    ),
  );
  assert.equal(left[0].n, 0);
  // Before: target_id has no index of its own; every overwrite on the server was read (1M: ~0.18 s
  // in the deletion's transaction, every realtime stream held).
  assert.equal(seen.length, 1);
  assert.ok(seen[0] < 1000, `permission_overwrites rows read in the deletion's transaction: ${seen[0]}`);
});

// Two deletions of one guild (a double submit, two tabs): the second passed its owner check while
// the guild was there, and its recording ran after the first had committed. The recording's
// batches forget the rows of users who are not members (left from a deletion that failed): with
// the guild gone, that was every row the first deletion had kept of who was in it, and no member
// replaying the log could hear of the deletion (only former_members says who may).
it('a second deletion of a guild, begun before the first committed, keeps who was in it', {
  timeout: 120_000,
}, async () => {
  const [owner, m1, m2] = await Promise.all([1, 2, 3].map(() => signUp(app)));
  const { guildId } = await guildWithChannel(app, owner.token);
  for (const u of [m1, m2]) await invite(app, owner.token, guildId, u.token);
  type Exec = (q: unknown) => Promise<unknown>;
  const db = app.deps.db as unknown as { execute: Exec };
  const original = db.execute;
  let armed = true;
  let first: Promise<unknown> | undefined;
  const deleting = `mutation($id: ID!) { deleteGuild(id: $id) }`;
  // The second deletion's purge begins (its owner check passed): the first runs to its commit.
  db.execute = async function (this: unknown, q) {
    const text = (q as { queryChunks?: { value?: unknown }[] })?.queryChunks
      ?.map((c) => (Array.isArray(c?.value) ? c.value.join('') : ''))
      .join('');
    if (armed && text?.includes('select id from channels where guild_id')) {
      armed = false;
      first = ok(app, deleting, { id: guildId }, owner.token);
      await first;
    }
    return original.call(this, q);
  };
  let second: Awaited<ReturnType<typeof gql>>;
  try {
    second = await gql(app, deleting, { id: guildId }, { token: owner.token });
  } finally {
    db.execute = original;
  }
  assert.equal(armed, false);
  assert.equal(((await first) as { deleteGuild: string }).deleteGuild, guildId);
  // Refused: the guild is gone.
  assert.equal(second.errors?.[0]?.extensions?.code, 'NOT_FOUND');
  const was = resultRows<{ user_id: string }>(
    await app.deps.db.execute(
      sql`select user_id from former_members where guild_id = ${raw(guildId)}::uuid order by user_id`,
    ),
  );
  assert.deepEqual(
    was.map((w) => w.user_id),
    [owner, m1, m2].map((u) => raw(u.id)).sort(),
  );
});
