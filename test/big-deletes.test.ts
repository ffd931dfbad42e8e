/**
 * Deleting a big channel or guild must not hold up the realtime delivery of every other guild.
 * The log delivers nothing committed after a transaction still in progress (core/realtime/log.ts,
 * Horizon), so one long statement holding an xid (the cascade over all of a guild's messages)
 * held every stream of every guild for its whole length. Postgres only: PGlite runs one
 * statement at a time anyway.
 */
import assert from 'node:assert/strict';
import { after, before, it } from 'node:test';
import pg from 'pg';
import { newId } from '../core/ids.ts';
import { decodeAnyId } from '../schema/builder.ts';
import { createTestApp, gql, onPostgres, signUp, type TestApp, type TestUser } from './helpers.ts';
import { connect, guildWithChannel, send, sleep, subscribe, untilLive } from './realtime-helpers.ts';

const skip = !onPostgres;
/** Enough that the deletion takes seconds here (the cascade: ~2 s per 50k on these VMs). */
const BIG = 50_000;
let app: TestApp;
let wsUrl: string;

/** One connection of the test's own, outside the app (its pool would cut a long insert). */
let direct: pg.Client;
before(async () => {
  if (skip) return;
  app = await createTestApp({ rateLimits: false });
  wsUrl = `ws://127.0.0.1:${await app.start(0)}/graphql`;
  direct = new pg.Client({ connectionString: app.config.databaseUrl });
  await direct.connect();
});
after(async () => {
  await direct?.end();
  await app?.destroy();
});

/** BIG messages in the channel, written directly (one statement, not through the app). */
async function fill(channelId: string, guildId: string, author: TestUser, n = BIG) {
  await direct.query(
    `insert into messages (id, channel_id, guild_id, author_id, content)
     select gen_random_uuid(), $1, $2, $3, 'm' || i from generate_series(1, ${n}) i`,
    [decodeAnyId(channelId).id, decodeAnyId(guildId).id, decodeAnyId(author.id).id],
  );
}

async function count(q: string, id: string): Promise<number> {
  return (await direct.query(q, [decodeAnyId(id).id])).rows[0].n;
}

/**
 * Starts `deletion`, sends a message in another guild while it runs, and returns whether the
 * deleted thing still existed when that message arrived (it was delivered during the deletion),
 * with the deletion's result.
 */
async function deliveredMeanwhile(
  deletion: () => Promise<any>,
  stillThere: () => Promise<number>,
  /** rows the deletion removes or records in batches, each committed: a count that moves once it is under way */
  rows: () => Promise<number>,
) {
  const bystander = await signUp(app);
  const elsewhere = await guildWithChannel(app, bystander.token);
  const c = connect(wsUrl, bystander.token);
  const s = subscribe(c.client, null);
  try {
    await untilLive(app, [bystander]);
    const all = await rows();
    let settled = false;
    const deleting = deletion().finally(() => {
      settled = true;
    });
    // Under way: its first batch gone.
    for (let i = 0; i < 500 && !settled && (await rows()) === all; i++) await sleep(20);
    await send(app, bystander.token, elsewhere.channelId, 'meanwhile');
    await s.until(
      (e) => e.some((x) => x.__typename === 'MessageCreated' && x.message.content === 'meanwhile'),
      60_000,
    );
    const there = await stillThere();
    const r = await deleting;
    return { there, r };
  } finally {
    s.stop();
    await c.client.dispose();
  }
}

it('a message sent elsewhere while a big guild is deleted arrives during the deletion, not after it', {
  skip,
  timeout: 180_000,
}, async () => {
  const owner = await signUp(app);
  const { guildId, channelId } = await guildWithChannel(app, owner.token);
  await fill(channelId, guildId, owner);
  // Its audit log and read states go in batches too.
  await direct.query(
    `insert into audit_log (id, guild_id, actor_id, action)
     select gen_random_uuid(), $1, $2, 'CHANNEL_UPDATE' from generate_series(1, 20000)`,
    [decodeAnyId(guildId).id, decodeAnyId(owner.id).id],
  );
  await direct.query(`insert into read_states (user_id, channel_id) values ($1, $2)`, [
    decodeAnyId(owner.id).id,
    decodeAnyId(channelId).id,
  ]);
  const { there, r } = await deliveredMeanwhile(
    () => gql(app, `mutation($id: ID!) { deleteGuild(id: $id) }`, { id: guildId }, { token: owner.token }),
    () => count('select count(*)::int as n from guilds where id = $1', guildId),
    () => count('select count(*)::int as n from messages where guild_id = $1', guildId),
  );
  assert.deepEqual(r.errors, undefined);
  assert.equal(there, 1, 'delivered only once the deletion had committed');
  assert.equal(await count('select count(*)::int as n from messages where guild_id = $1', guildId), 0);
  assert.equal(await count('select count(*)::int as n from audit_log where guild_id = $1', guildId), 0);
  assert.equal(await count('select count(*)::int as n from read_states where channel_id = $1', channelId), 0);
});

it('a message sent elsewhere while a big channel is deleted arrives during the deletion, not after it', {
  skip,
  timeout: 180_000,
}, async () => {
  const owner = await signUp(app);
  const { guildId, channelId } = await guildWithChannel(app, owner.token);
  await fill(channelId, guildId, owner);
  const { there, r } = await deliveredMeanwhile(
    () =>
      gql(app, `mutation($id: ID!) { deleteChannel(id: $id) }`, { id: channelId }, { token: owner.token }),
    () => count('select count(*)::int as n from channels where id = $1', channelId),
    () => count('select count(*)::int as n from messages where channel_id = $1', channelId),
  );
  assert.deepEqual(r.errors, undefined);
  assert.equal(there, 1, 'delivered only once the deletion had committed');
  assert.equal(await count('select count(*)::int as n from messages where channel_id = $1', channelId), 0);
});

it('an ownership transferred while a guild is being deleted does not leave the heir a gutted guild', {
  skip,
  timeout: 180_000,
}, async () => {
  const owner = await signUp(app);
  const heir = await signUp(app);
  const { guildId, channelId } = await guildWithChannel(app, owner.token);
  const g = decodeAnyId(guildId).id;
  await direct.query('insert into members (guild_id, user_id) values ($1, $2)', [g, decodeAnyId(heir.id).id]);
  await fill(channelId, guildId, owner, 30000);
  const left = () => count('select count(*)::int as n from messages where guild_id = $1', guildId);
  const deleting = gql(
    app,
    `mutation($id: ID!) { deleteGuild(id: $id) }`,
    { id: guildId },
    { token: owner.token },
  );
  // The purge under way (its first batches gone), the owner hands the guild over.
  for (let i = 0; i < 500 && (await left()) === 30000; i++) await sleep(10);
  await gql(
    app,
    `mutation($g: ID!, $u: ID!) { transferGuildOwnership(guildId: $g, userId: $u) { id } }`,
    { g: guildId, u: heir.id },
    { token: owner.token },
  );
  const r = await deleting;
  const there = (await direct.query('select 1 from guilds where id = $1', [g])).rows.length;
  // Before: the deletion refused (NOT_FOUND, the owner no longer the owner) after its purge,
  // and the heir got the guild with no messages.
  assert.deepEqual({ errors: r.errors, there }, { errors: undefined, there: 0 });
  assert.equal(await left(), 0);
});

it("a message sent elsewhere while a ban purges a spammer's many messages arrives during the purge, not after it", {
  skip,
  timeout: 180_000,
}, async () => {
  const owner = await signUp(app);
  const spammer = await signUp(app);
  const { guildId, channelId } = await guildWithChannel(app, owner.token);
  const g = decodeAnyId(guildId).id;
  const u = decodeAnyId(spammer.id).id;
  await direct.query('insert into members (guild_id, user_id) values ($1, $2)', [g, u]);
  // Sent within the hour (ids are time-ordered: the purge selects by id), as a spam bot's are.
  const N = 40_000;
  const ids = Array.from({ length: N }, () => newId());
  await direct.query(
    `insert into messages (id, channel_id, guild_id, author_id, content)
     select i, $1, $2, $3, 'spam' from unnest($4::uuid[]) i`,
    [decodeAnyId(channelId).id, g, u, ids],
  );
  const { there, r } = await deliveredMeanwhile(
    () =>
      gql(
        app,
        `mutation($g: ID!, $u: ID!) { banMember(guildId: $g, userId: $u, deleteMessageHours: 1) }`,
        { g: guildId, u: spammer.id },
        { token: owner.token },
      ),
    () => count('select count(*)::int as n from bans where guild_id = $1', guildId),
    () =>
      count(
        'select count(*)::int as n from messages where author_id = $1 and deleted_at is null',
        spammer.id,
      ),
  );
  assert.deepEqual(r.errors, undefined);
  // Before: one transaction wiped them all and logged a MessageDeleted each, and nothing else was
  // delivered to anyone until it committed (the ban with it).
  assert.equal(there, 0, 'delivered only once the ban and its purge had committed');
  const left = await direct.query(
    'select count(*)::int as n from messages where author_id = $1 and deleted_at is null',
    [u],
  );
  assert.equal(left.rows[0].n, 0);
  const logged = await direct.query(
    `select type, payload->>'messageId' as id from events
     where guild_id = $1 and type in ('MESSAGE_DELETED', 'MEMBER_BANNED') order by xid::text::bigint, seq`,
    [g],
  );
  // Each once, in the messages' order, and the ban after them.
  assert.deepEqual(
    logged.rows.map((x) => x.id ?? x.type),
    [...[...ids].sort(), 'MEMBER_BANNED'],
  );
  const audit = await direct.query(
    `select changes from audit_log where guild_id = $1 and action = 'MEMBER_BAN'`,
    [g],
  );
  assert.deepEqual(audit.rows[0].changes, { wasMember: true, deleteMessageHours: 1, deletedMessages: N });
});

it('a message sent elsewhere while a guild of many members is deleted arrives during the deletion, not after it', {
  skip,
  timeout: 180_000,
}, async () => {
  const owner = await signUp(app);
  const { guildId } = await guildWithChannel(app, owner.token);
  const g = decodeAnyId(guildId).id;
  // Members written directly: who was in is recorded for each (former_members), ~30 us a row.
  const M = 60_000;
  await direct.query(
    `insert into users (id, username, email, password_hash)
     select gen_random_uuid(), 'm' || i || '_' || $1, 'm' || i || '_' || $1 || '@test', 'x'
     from generate_series(1, ${M}) i`,
    [g.slice(0, 8)],
  );
  await direct.query(
    `insert into members (guild_id, user_id) select $1, id from users where username like 'm%\\_' || $2`,
    [g, g.slice(0, 8)],
  );
  const { there, r } = await deliveredMeanwhile(
    () => gql(app, `mutation($id: ID!) { deleteGuild(id: $id) }`, { id: guildId }, { token: owner.token }),
    () => count('select count(*)::int as n from guilds where id = $1', guildId),
    () => count('select count(*)::int as n from former_members where guild_id = $1', guildId),
  );
  assert.deepEqual(r.errors, undefined);
  // Before: the deletion's transaction recorded every member (former_members) for seconds, and
  // nothing else was delivered to anyone until it committed.
  assert.equal(there, 1, 'delivered only once the deletion had committed');
  assert.equal(
    await count('select count(*)::int as n from former_members where guild_id = $1', guildId),
    M + 1,
  );
  assert.equal(await count('select count(*)::int as n from members where guild_id = $1', guildId), 0);
});

it('a message sent elsewhere while a channel of many threads is deleted arrives during the deletion, not after it', {
  skip,
  timeout: 180_000,
}, async () => {
  const owner = await signUp(app);
  const { guildId, channelId } = await guildWithChannel(app, owner.token);
  const g = decodeAnyId(guildId).id;
  const T = 20_000;
  await direct.query(
    `insert into channels (id, guild_id, parent_id, type, name)
     select gen_random_uuid(), $1, $2, 'THREAD', 't' || i from generate_series(1, ${T}) i`,
    [g, decodeAnyId(channelId).id],
  );
  const { there, r } = await deliveredMeanwhile(
    () =>
      gql(app, `mutation($id: ID!) { deleteChannel(id: $id) }`, { id: channelId }, { token: owner.token }),
    () => count('select count(*)::int as n from channels where id = $1', channelId),
    () => count('select count(*)::int as n from channels where parent_id = $1', channelId),
  );
  assert.deepEqual(r.errors, undefined);
  // Before: its threads and their events went in the deletion's one transaction, and nothing
  // else was delivered to anyone until it committed.
  assert.equal(there, 1, 'delivered only once the deletion had committed');
  assert.equal(await count('select count(*)::int as n from channels where guild_id = $1', guildId), 0);
  // Each thread told deleted once, before the channel.
  const told = await direct.query(
    `select channel_id from events where guild_id = $1 and type = 'CHANNEL_DELETED' order by xid::text::bigint, seq`,
    [g],
  );
  assert.equal(told.rows.length, T + 1);
  assert.equal(new Set(told.rows.map((x) => x.channel_id)).size, T + 1);
  assert.equal(told.rows.at(-1).channel_id, decodeAnyId(channelId).id);
});
