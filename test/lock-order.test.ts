/**
 * Lock order beside deleteGuild and channel moves: an overwrite change whose chain a move changed
 * (lockOverwriteChain lets its locks go and locks again, outermost first), a pin and a kick (the
 * guild first, holdGuild). Each deadlocked before its fix (a review of 2026-12-06's changes).
 * Real Postgres, a second connection holding locks.
 */
import assert from 'node:assert/strict';
import { after, before, it } from 'node:test';
import { queuedSends } from '../core/services/message-batch.ts';
import { decodeAnyId } from '../schema/builder.ts';
import { blockedBy, createTestApp, gql, lockWaiters, ok, signUp, type TestApp } from './helpers.ts';
import { channelAccessHelpers, guildWithChannel, invite, send, sleep } from './realtime-helpers.ts';

let app: TestApp;
before(async () => {
  app = await createTestApp({ rateLimits: false });
  await app.start(0);
});
after(() => app.destroy());

const { everyoneRole, createChannel } = channelAccessHelpers(() => app);
type R = { errors?: { message?: string; extensions?: { code?: string } }[] };

/** The operation may have found its subject gone (NOT_FOUND), not failed (deadlock detected). */
function assertNotInternal(what: string, r: R) {
  assert.ok(
    !(r.errors ?? []).some((e) => e.extensions?.code === 'INTERNAL_SERVER_ERROR'),
    `${what}: ${JSON.stringify(r.errors)}`,
  );
}

it('an overwrite change whose chain a move changed, beside the deletion of the category moved into, does not deadlock', {
  skip: process.env.BANTER_TEST_DB !== 'postgres',
  timeout: 60_000,
}, async () => {
  const pg = (await import('pg')).default;
  const o = await signUp(app);
  const { guildId } = await guildWithChannel(app, o.token);
  // B made before A: its id (UUIDv7) sorts first, so the move locks B, then waits on A.
  const b = await createChannel(o.token, guildId, 'b', 'CATEGORY');
  const a = await createChannel(o.token, guildId, 'a', 'CATEGORY');
  const c = await createChannel(o.token, guildId, 'c', 'TEXT', a);
  const everyone = await everyoneRole(o.token, guildId);
  const stall = new pg.Client({ connectionString: app.config.databaseUrl });
  await stall.connect();
  try {
    await stall.query('begin');
    await stall.query('select 1 from channels where id = $1::uuid for update', [decodeAnyId(a).id]);
    // The move of c from a into b: locks b, waits on a.
    const moving = gql(
      app,
      `mutation($i: UpdateChannelInput!) { updateChannel(input: $i) { id } }`,
      { i: { id: c, parentId: b } },
      { token: o.token },
    ) as Promise<R>;
    assert.equal(await lockWaiters(stall, 1), 1, 'the move waits on a');
    // An overwrite change on c: its chain is (a, c) as its statement began; waits on a.
    const changing = gql(
      app,
      `mutation($i: SetChannelOverwriteInput!) { setChannelOverwrite(input: $i) { targetId } }`,
      { i: { channelId: c, targetType: 'ROLE', targetId: everyone, allow: [], deny: ['ADD_REACTIONS'] } },
      { token: o.token },
    ) as Promise<R>;
    assert.equal(await lockWaiters(stall, 2), 2, 'the overwrite change waits on a');
    // b's deletion: waits on b (the move holds it), then sets its channels (c by then) uncategorized.
    const deleting = gql(
      app,
      `mutation($id: ID!) { deleteChannel(id: $id) }`,
      { id: b },
      { token: o.token },
    ) as Promise<R>;
    assert.equal(await lockWaiters(stall, 3), 3, 'the deletion waits on b');
    await stall.query('rollback');
    const [m, ch, d] = await Promise.all([moving, changing, deleting]);
    assert.deepEqual(m.errors, undefined, `move: ${JSON.stringify(m.errors)}`);
    // Either way round, both succeed (an INTERNAL_SERVER_ERROR here is Postgres' deadlock detected).
    assert.deepEqual(ch.errors, undefined, `setChannelOverwrite: ${JSON.stringify(ch.errors)}`);
    assert.deepEqual(d.errors, undefined, `deleteChannel: ${JSON.stringify(d.errors)}`);
  } finally {
    await stall.query('rollback').catch(() => {});
    await stall.end();
  }
});

/**
 * `during` runs while `hold` (a statement on a second connection) holds its lock; then deleteGuild
 * is begun, the lock released: both must succeed.
 */
async function besideDeleteGuild(
  guildId: string,
  token: string,
  hold: string,
  params: unknown[],
  op: () => Promise<R>,
) {
  const pg = (await import('pg')).default;
  const stall = new pg.Client({ connectionString: app.config.databaseUrl });
  await stall.connect();
  try {
    await stall.query('begin');
    await stall.query(hold, params);
    const doing = op();
    assert.equal(await blockedBy(stall, 1), 1, 'the operation waits on the row held');
    const deleting = gql(
      app,
      `mutation($g: ID!) { deleteGuild(id: $g) }`,
      { g: guildId },
      { token },
    ) as Promise<R>;
    assert.equal(await lockWaiters(stall, 2), 2, 'the deletion waits on the operation');
    await stall.query('rollback');
    const [x, d] = await Promise.all([doing, deleting]);
    assert.deepEqual(d.errors, undefined, `deleteGuild: ${JSON.stringify(d.errors)}`);
    // The operation may find the guild gone (NOT_FOUND), not fail (Postgres' deadlock detected).
    assertNotInternal('operation', x);
  } finally {
    await stall.query('rollback').catch(() => {});
    await stall.end();
  }
}

it('a pin holding its channel while the guild is deleted does not deadlock (its audit row checks the guild)', {
  skip: process.env.BANTER_TEST_DB !== 'postgres',
  timeout: 60_000,
}, async () => {
  const o = await signUp(app);
  const { guildId, channelId } = await guildWithChannel(app, o.token);
  const m = await send(app, o.token, channelId, 'pin me');
  // The pin locks its channel (NO KEY UPDATE), then waits for the message's row held here.
  await besideDeleteGuild(
    guildId,
    o.token,
    'select 1 from messages where id = $1::uuid for update',
    [decodeAnyId(m).id],
    () =>
      gql(
        app,
        `mutation($m: ID!) { pinMessage(messageId: $m) { id } }`,
        { m },
        { token: o.token },
      ) as Promise<R>,
  );
});

/** An owner's guild with a member `v` who holds a role (a member_roles row to hold). */
async function memberWithARole() {
  const [o, v] = await Promise.all([signUp(app), signUp(app)]);
  const { guildId } = await guildWithChannel(app, o.token);
  await invite(app, o.token, guildId, v.token);
  const r = await ok(
    app,
    `mutation($g: ID!) { createRole(input: { guildId: $g, name: "r" }) { id } }`,
    { g: guildId },
    o.token,
  );
  await ok(
    app,
    `mutation($g: ID!, $u: ID!, $r: ID!) { assignRole(guildId: $g, userId: $u, roleId: $r) }`,
    { g: guildId, u: v.id, r: r.createRole.id },
    o.token,
  );
  return { o, v, guildId };
}

it('a kick holding the member row while the guild is deleted does not deadlock (its audit row checks the guild)', {
  skip: process.env.BANTER_TEST_DB !== 'postgres',
  timeout: 60_000,
}, async () => {
  const { o, v, guildId } = await memberWithARole();
  // The kick deletes the member row, then waits for its role assignment's row held here.
  await besideDeleteGuild(
    guildId,
    o.token,
    'select 1 from member_roles where user_id = $1::uuid for update',
    [decodeAnyId(v.id).id],
    () =>
      gql(
        app,
        `mutation($g: ID!, $u: ID!) { kickMember(guildId: $g, userId: $u) }`,
        { g: guildId, u: v.id },
        { token: o.token },
      ) as Promise<R>,
  );
});

it('a leave holding its member row while the guild is deleted does not deadlock (its audit row checks the guild)', {
  skip: process.env.BANTER_TEST_DB !== 'postgres',
  timeout: 60_000,
}, async () => {
  const { o, v, guildId } = await memberWithARole();
  // The leave deletes the member row, then waits for its role assignment's row held here.
  await besideDeleteGuild(
    guildId,
    o.token,
    'select 1 from member_roles where user_id = $1::uuid for update',
    [decodeAnyId(v.id).id],
    () =>
      gql(
        app,
        `mutation($g: ID!) { leaveGuild(guildId: $g) }`,
        { g: guildId },
        { token: v.token },
      ) as Promise<R>,
  );
});

/**
 * deleteGuild is begun while a second connection holds the guild FOR UPDATE: its purge done, it
 * waits to lock the guild. `op` then runs until it waits on a lock (on the current code: its
 * audit row's key check on the guild, having changed one of the guild's rows first); the guild is
 * let go, and the deletion's cascade reaches what `op` holds. Both must succeed, `op` perhaps
 * with NOT_FOUND (the guild gone), not INTERNAL_SERVER_ERROR (Postgres' deadlock detected).
 * `first` runs once the deletion waits, before `op` (a message sent after the purge).
 */
async function underDeleteGuild(
  guildId: string,
  token: string,
  op: (made: string | undefined) => Promise<R>,
  first?: () => Promise<string>,
) {
  const pg = (await import('pg')).default;
  const stall = new pg.Client({ connectionString: app.config.databaseUrl });
  await stall.connect();
  try {
    await stall.query('begin');
    await stall.query('select 1 from guilds where id = $1::uuid for update', [decodeAnyId(guildId).id]);
    const deleting = gql(
      app,
      `mutation($g: ID!) { deleteGuild(id: $g) }`,
      { g: guildId },
      { token },
    ) as Promise<R>;
    assert.equal(await lockWaiters(stall, 1), 1, 'the deletion waits for the guild');
    const made = first ? await first() : undefined;
    const doing = op(made);
    assert.equal(await lockWaiters(stall, 2), 2, 'the operation waits for the guild');
    await stall.query('rollback');
    const [x, d] = await Promise.all([doing, deleting]);
    assert.deepEqual(d.errors, undefined, `deleteGuild: ${JSON.stringify(d.errors)}`);
    assertNotInternal('operation', x);
  } finally {
    await stall.query('rollback').catch(() => {});
    await stall.end();
  }
}

it('a nickname change beside the guild deletion does not deadlock (it changes the member row, then its audit row checks the guild)', {
  skip: process.env.BANTER_TEST_DB !== 'postgres',
  timeout: 60_000,
}, async () => {
  const o = await signUp(app);
  const { guildId } = await guildWithChannel(app, o.token);
  await underDeleteGuild(
    guildId,
    o.token,
    () =>
      gql(
        app,
        `mutation($g: ID!, $u: ID!) { setNickname(guildId: $g, userId: $u, nickname: "n") { nickname } }`,
        { g: guildId, u: o.id },
        { token: o.token },
      ) as Promise<R>,
  );
});

it('a channel update beside the guild deletion does not deadlock (it changes the channel row, then its audit row checks the guild)', {
  skip: process.env.BANTER_TEST_DB !== 'postgres',
  timeout: 60_000,
}, async () => {
  const o = await signUp(app);
  const { guildId, channelId } = await guildWithChannel(app, o.token);
  await underDeleteGuild(
    guildId,
    o.token,
    () =>
      gql(
        app,
        `mutation($i: UpdateChannelInput!) { updateChannel(input: $i) { id } }`,
        { i: { id: channelId, topic: 't' } },
        { token: o.token },
      ) as Promise<R>,
  );
});

it('an invite revoked beside the guild deletion does not deadlock (it changes the invite row, then its audit row checks the guild)', {
  skip: process.env.BANTER_TEST_DB !== 'postgres',
  timeout: 60_000,
}, async () => {
  const o = await signUp(app);
  const { guildId } = await guildWithChannel(app, o.token);
  const i = await ok(
    app,
    `mutation($g: ID!) { createInvite(input: { guildId: $g }) { code } }`,
    { g: guildId },
    o.token,
  );
  await underDeleteGuild(
    guildId,
    o.token,
    () =>
      gql(
        app,
        `mutation($c: String!) { revokeInvite(code: $c) }`,
        { c: i.createInvite.code },
        { token: o.token },
      ) as Promise<R>,
  );
});

it("a moderator's message deletion beside the guild deletion does not deadlock (it changes the message row, then its audit row checks the guild)", {
  skip: process.env.BANTER_TEST_DB !== 'postgres',
  timeout: 60_000,
}, async () => {
  const [o, v] = await Promise.all([signUp(app), signUp(app)]);
  const { guildId, channelId } = await guildWithChannel(app, o.token);
  await invite(app, o.token, guildId, v.token);
  await underDeleteGuild(
    guildId,
    o.token,
    (m) => gql(app, `mutation($m: ID!) { deleteMessage(id: $m) }`, { m }, { token: o.token }) as Promise<R>,
    // Sent after the deletion's purge, so it goes with the cascade.
    () => send(app, v.token, channelId, 'after the purge'),
  );
});

it('an invite created beside the guild deletion is NOT_FOUND, not an error (its key check waited on the deletion)', {
  skip: process.env.BANTER_TEST_DB !== 'postgres',
  timeout: 60_000,
}, async () => {
  const o = await signUp(app);
  const { guildId } = await guildWithChannel(app, o.token);
  await underDeleteGuild(
    guildId,
    o.token,
    () =>
      gql(
        app,
        `mutation($g: ID!) { createInvite(input: { guildId: $g }) { code } }`,
        { g: guildId },
        { token: o.token },
      ) as Promise<R>,
  );
});

it('a join beside the guild deletion is NOT_FOUND, not an error (its member row waited on the deletion)', {
  skip: process.env.BANTER_TEST_DB !== 'postgres',
  timeout: 60_000,
}, async () => {
  const [o, v] = await Promise.all([signUp(app), signUp(app)]);
  const { guildId } = await guildWithChannel(app, o.token);
  const i = await ok(
    app,
    `mutation($g: ID!) { createInvite(input: { guildId: $g }) { code } }`,
    { g: guildId },
    o.token,
  );
  await underDeleteGuild(
    guildId,
    o.token,
    () =>
      gql(
        app,
        `mutation($c: String!) { joinGuild(code: $c) { id } }`,
        { c: i.createInvite.code },
        { token: v.token },
      ) as Promise<R>,
  );
});

it('a channel created beside the guild deletion is NOT_FOUND, not an error (its key check waited on the deletion)', {
  skip: process.env.BANTER_TEST_DB !== 'postgres',
  timeout: 60_000,
}, async () => {
  const o = await signUp(app);
  const { guildId } = await guildWithChannel(app, o.token);
  await underDeleteGuild(
    guildId,
    o.token,
    () =>
      gql(
        app,
        `mutation($g: ID!) { createChannel(input: { guildId: $g, name: "c", type: TEXT }) { id } }`,
        { g: guildId },
        { token: o.token },
      ) as Promise<R>,
  );
});

/**
 * deleteChannel is held at two points by two more connections: first at its guild (its purge
 * done), while `first` sends a message there; then in its own transaction, the channel deleted and
 * its cascade waiting on `inviteCode`'s row (invites go before messages). `op` then waits on the
 * channel the deletion holds; let go, the deletion commits. `op` may find the channel gone
 * (NOT_FOUND), not fail (INTERNAL_SERVER_ERROR: a foreign key violation).
 */
async function underDeleteChannel(
  guildId: string,
  channelId: string,
  inviteCode: string,
  token: string,
  first: () => Promise<string>,
  op: (made: string) => Promise<R>,
) {
  const pg = (await import('pg')).default;
  const [atGuild, atInvite] = [
    new pg.Client({ connectionString: app.config.databaseUrl }),
    new pg.Client({ connectionString: app.config.databaseUrl }),
  ];
  await Promise.all([atGuild.connect(), atInvite.connect()]);
  try {
    await atGuild.query('begin');
    await atGuild.query('select 1 from guilds where id = $1::uuid for update', [decodeAnyId(guildId).id]);
    const deleting = gql(
      app,
      `mutation($c: ID!) { deleteChannel(id: $c) }`,
      { c: channelId },
      { token },
    ) as Promise<R>;
    assert.equal(await lockWaiters(atGuild, 1), 1, 'the deletion waits for the guild');
    const made = await first();
    await atInvite.query('begin');
    await atInvite.query('select 1 from invites where code = $1 for update', [inviteCode]);
    await atGuild.query('rollback');
    assert.equal(
      await lockWaiters(atInvite, 1, '%delete from "channels"%'),
      1,
      "the deletion's cascade waits for the invite",
    );
    const doing = op(made);
    assert.equal(await lockWaiters(atInvite, 2), 2, 'the operation waits for the channel');
    await atInvite.query('rollback');
    const [x, d] = await Promise.all([doing, deleting]);
    assert.deepEqual(d.errors, undefined, `deleteChannel: ${JSON.stringify(d.errors)}`);
    assertNotInternal('operation', x);
  } finally {
    await atGuild.query('rollback').catch(() => {});
    await atInvite.query('rollback').catch(() => {});
    await Promise.all([atGuild.end(), atInvite.end()]);
  }
}

/** A guild with a second channel (the one deleted) and an invite to it. */
async function channelWithInvite(token: string) {
  const { guildId } = await guildWithChannel(app, token);
  const r = await ok(
    app,
    `mutation($g: ID!) { createChannel(input: { guildId: $g, name: "doomed", type: TEXT }) { id } }`,
    { g: guildId },
    token,
  );
  const channelId = r.createChannel.id as string;
  const i = await ok(
    app,
    `mutation($g: ID!, $c: ID!) { createInvite(input: { guildId: $g, channelId: $c }) { code } }`,
    { g: guildId, c: channelId },
    token,
  );
  return { guildId, channelId, code: i.createInvite.code as string };
}

it('an invite to a channel created beside its deletion is NOT_FOUND, not an error (its key check waited on the deletion)', {
  skip: process.env.BANTER_TEST_DB !== 'postgres',
  timeout: 60_000,
}, async () => {
  const o = await signUp(app);
  const { guildId, channelId, code } = await channelWithInvite(o.token);
  await underDeleteChannel(
    guildId,
    channelId,
    code,
    o.token,
    async () => '',
    () =>
      gql(
        app,
        `mutation($g: ID!, $c: ID!) { createInvite(input: { guildId: $g, channelId: $c }) { code } }`,
        { g: guildId, c: channelId },
        { token: o.token },
      ) as Promise<R>,
  );
});

it("a read marker moved beside its channel's deletion is NOT_FOUND, not an error (its key check waited on the deletion)", {
  skip: process.env.BANTER_TEST_DB !== 'postgres',
  timeout: 60_000,
}, async () => {
  const [o, v] = await Promise.all([signUp(app), signUp(app)]);
  const { guildId, channelId, code } = await channelWithInvite(o.token);
  await invite(app, o.token, guildId, v.token);
  await underDeleteChannel(
    guildId,
    channelId,
    code,
    o.token,
    // Sent after the deletion's purge: still there while the deletion's cascade waits.
    () => send(app, o.token, channelId, 'after the purge'),
    (m) =>
      gql(
        app,
        `mutation($c: ID!, $m: ID!) { markRead(channelId: $c, messageId: $m) { id } }`,
        { c: channelId, m },
        { token: v.token },
      ) as Promise<R>,
  );
});

/** Sends waiting for a group statement (the queue is in memory), looked at until `n` (bounded). */
async function queued(n: number, ms = 10_000) {
  const deadline = Date.now() + ms;
  for (let t = 0; t < 1000 && queuedSends(app.deps.database) < n && Date.now() < deadline; t++)
    await sleep(20);
  return queuedSends(app.deps.database);
}

/**
 * Whether a grouped send's statement (`insert into messages`) waits on a lock for longer than
 * Postgres' deadlock check (deadlock_timeout) and was not failed by it: a wait that comes after
 * it and closes a cycle is then the one Postgres finds (and fails).
 */
async function sendsWaitPastDeadlockCheck(c: import('pg').Client) {
  for (let t = 0; t < 100; t++) {
    await c.query('select pg_stat_clear_snapshot()');
    const q = await c.query<{ n: number }>(
      `select count(*)::int as n from pg_stat_activity where datname = current_database()
        and wait_event_type = 'Lock' and query like '%insert into messages%'
        and clock_timestamp() - query_start > current_setting('deadlock_timeout')::interval * 1.5`,
    );
    if (q.rows[0].n > 0) return true;
    await sleep(50);
  }
  return false;
}

it("sends grouped into one statement, to a thread and to its channel, beside the channel's deletion do not deadlock", {
  skip: process.env.BANTER_TEST_DB !== 'postgres',
  timeout: 60_000,
}, async () => {
  const pg = (await import('pg')).default;
  const o = await signUp(app);
  const { guildId, channelId: a } = await guildWithChannel(app, o.token);
  const thread = async (m: string, name: string) =>
    (
      await ok(
        app,
        `mutation($m: ID!, $n: String!) { startThread(messageId: $m, name: $n) { id } }`,
        { m, n: name },
        o.token,
      )
    ).startThread.id as string;
  // Two threads of a, in the order its deletion locks them (created first, first).
  const ta = await thread(await send(app, o.token, a, 'a'), 'ta');
  const tb = await thread(await send(app, o.token, a, 'b'), 'tb');
  const elsewhere = (
    await ok(
      app,
      `mutation($g: ID!) { createChannel(input: { guildId: $g, name: "elsewhere", type: TEXT }) { id } }`,
      { g: guildId },
      o.token,
    )
  ).createChannel.id as string;
  const sendTo = (channelId: string, content: string) =>
    gql(
      app,
      `mutation($i: SendMessageInput!) { sendMessage(input: $i) { id } }`,
      { i: { channelId, content } },
      { token: o.token },
    ) as Promise<R>;
  const [atThread, atElsewhere] = [
    new pg.Client({ connectionString: app.config.databaseUrl }),
    new pg.Client({ connectionString: app.config.databaseUrl }),
  ];
  await Promise.all([atThread.connect(), atElsewhere.connect()]);
  try {
    await atThread.query('begin');
    await atThread.query('select 1 from channels where id = $1::uuid for key share', [decodeAnyId(ta).id]);
    await atElsewhere.query('begin');
    await atElsewhere.query('select 1 from channels where id = $1::uuid for update', [
      decodeAnyId(elsewhere).id,
    ]);
    // The deletion holds a and waits on ta, the first of its threads.
    const deleting = gql(
      app,
      `mutation($c: ID!) { deleteChannel(id: $c) }`,
      { c: a },
      { token: o.token },
    ) as Promise<R>;
    assert.equal(await lockWaiters(atThread, 1), 1, 'the deletion waits for its first thread');
    // Two group statements in flight (the most there are), both waiting on `elsewhere`: the next
    // sends queue behind them and go in one statement when they end.
    const blocked = [sendTo(elsewhere, '1')];
    assert.equal(await lockWaiters(atThread, 2), 2, 'a first statement waits');
    blocked.push(sendTo(elsewhere, '2'));
    assert.equal(await lockWaiters(atThread, 3), 3, 'a second statement waits');
    // To tb, then to a: in this order of ids, so in the statement's order of rows. Both queued
    // before the statements ahead end: they go in one.
    const toThread = sendTo(tb, 'tb');
    assert.equal(await queued(1), 1, 'the send to tb queues');
    const toChannel = sendTo(a, 'a');
    assert.equal(await queued(2), 2, 'the send to a queues');
    await atElsewhere.query('rollback');
    // Their statement: tb's key share taken, waits on a. Until Postgres has checked it for a
    // deadlock (deadlock_timeout, 1 s) and found none: the deletion's wait, to come, then finds it.
    assert.ok(await sendsWaitPastDeadlockCheck(atThread), 'the grouped sends wait on a');
    await atThread.query('rollback');
    const [d, ...sent] = await Promise.all([deleting, toThread, toChannel, ...blocked]);
    assert.deepEqual(d.errors, undefined, `deleteChannel: ${JSON.stringify(d.errors)}`);
    for (const x of sent) assertNotInternal('send', x);
  } finally {
    await atThread.query('rollback').catch(() => {});
    await atElsewhere.query('rollback').catch(() => {});
    await Promise.all([atThread.end(), atElsewhere.end()]);
  }
});

it("sends grouped into one statement, to two of a guild's channels, beside the guild's deletion do not deadlock", {
  skip: process.env.BANTER_TEST_DB !== 'postgres',
  timeout: 60_000,
}, async () => {
  const pg = (await import('pg')).default;
  const o = await signUp(app);
  const { guildId } = await guildWithChannel(app, o.token);
  const { createChannel } = channelAccessHelpers(() => app);
  const k = await createChannel(o.token, guildId, 'k', 'CATEGORY');
  const [x, y, z] = [
    await createChannel(o.token, guildId, 'x'),
    await createChannel(o.token, guildId, 'y'),
    await createChannel(o.token, guildId, 'z'),
  ];
  // Moved (parent_id is indexed: a new row version, new index entries), x's row now lies after
  // z's: the cascade deletes the guild's channels in that order (y, z, x), the sends' key checks
  // take them in id order (x, y).
  await ok(
    app,
    `mutation($i: UpdateChannelInput!) { updateChannel(input: $i) { id } }`,
    { i: { id: x, parentId: k } },
    o.token,
  );
  const other = await guildWithChannel(app, o.token);
  const sendTo = (channelId: string, content: string) =>
    gql(
      app,
      `mutation($i: SendMessageInput!) { sendMessage(input: $i) { id } }`,
      { i: { channelId, content } },
      { token: o.token },
    ) as Promise<R>;
  const clients = [0, 1, 2].map(() => new pg.Client({ connectionString: app.config.databaseUrl }));
  await Promise.all(clients.map((c) => c.connect()));
  const [atGuild, atZ, atOther] = clients;
  const id = (encoded: string) => decodeAnyId(encoded).id;
  try {
    for (const c of clients) await c.query('begin');
    await atGuild.query('select 1 from guilds where id = $1::uuid for update', [id(guildId)]);
    await atZ.query('select 1 from channels where id = $1::uuid for key share', [id(z)]);
    await atOther.query('select 1 from channels where id = $1::uuid for update', [id(other.channelId)]);
    const deleting = gql(
      app,
      `mutation($g: ID!) { deleteGuild(id: $g) }`,
      { g: guildId },
      { token: o.token },
    ) as Promise<R>;
    assert.equal(await lockWaiters(atGuild, 1), 1, 'the deletion waits for the guild');
    // Two group statements in flight (the most there are), waiting on the other guild's channel:
    // the next sends queue and go in one statement when they end.
    const blocked = [sendTo(other.channelId, '1')];
    assert.equal(await lockWaiters(atGuild, 2), 2, 'a first statement waits');
    blocked.push(sendTo(other.channelId, '2'));
    assert.equal(await lockWaiters(atGuild, 3), 3, 'a second statement waits');
    // Both queued before the statements ahead end: they go in one.
    const toX = sendTo(x, 'x');
    assert.equal(await queued(1), 1, 'the send to x queues');
    const toY = sendTo(y, 'y');
    assert.equal(await queued(2), 2, 'the send to y queues');
    // The deletion's cascade: y deleted, waits on z.
    await atGuild.query('rollback');
    assert.equal(await blockedBy(atZ, 1), 1, 'the deletion waits on z');
    await atOther.query('rollback');
    // Their statement: x's key share taken, waits on y. Until Postgres has checked it for a
    // deadlock (deadlock_timeout) and found none: the deletion's wait, to come, then finds it.
    assert.ok(await sendsWaitPastDeadlockCheck(atZ), 'the grouped sends wait');
    await atZ.query('rollback');
    const [d, ...sent] = await Promise.all([deleting, toX, toY, ...blocked]);
    assert.deepEqual(d.errors, undefined, `deleteGuild: ${JSON.stringify(d.errors)}`);
    for (const x of sent) assertNotInternal('send', x);
  } finally {
    for (const c of clients) await c.query('rollback').catch(() => {});
    await Promise.all(clients.map((c) => c.end()));
  }
});
