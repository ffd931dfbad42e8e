import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { after, before, describe, it } from 'node:test';
import { and, eq, isNull, sql } from 'drizzle-orm';
import { auditLog, bans, events, memberRoles, members, messages, roles } from '../core/db/tables.ts';
import { idAtTime, newId } from '../core/ids.ts';
import { permissionsFromNames } from '../core/permissions.ts';
import { loadChannelAccess } from '../core/services/access.service.ts';
import { BAN_PURGE_BATCH, banMember } from '../core/services/moderation.service.ts';
import { decodeAnyId, encodeId } from '../schema/builder.ts';
import { createTestApp, fails, gql, ok, signUp, type TestApp, type TestUser } from './helpers.ts';

let app: TestApp;
let owner: TestUser;
before(async () => {
  app = await createTestApp();
  owner = await signUp(app);
});
after(() => app.destroy());

const raw = (globalId: string) => decodeAnyId(globalId).id;
const gid = encodeId;

/** A guild owned by `owner` with #general; members and roles are seeded directly. */
async function makeGuild(owner: TestUser) {
  const d = await ok(
    app,
    `mutation { createGuild(input: { name: "Mods" }) { id channels { id } } }`,
    {},
    owner.token,
  );
  return {
    id: d.createGuild.id as string,
    raw: raw(d.createGuild.id),
    channel: raw(d.createGuild.channels[0].id),
  };
}
async function join(guildRaw: string, u: TestUser) {
  await app.deps.db.insert(members).values({ guildId: guildRaw, userId: raw(u.id) });
}
async function giveRole(guildRaw: string, u: TestUser, position: number, perms: string[]) {
  const id = newId();
  await app.deps.db.insert(roles).values({
    id,
    guildId: guildRaw,
    name: `r${position}`,
    position,
    permissions: permissionsFromNames(perms),
  });
  await app.deps.db.insert(memberRoles).values({ guildId: guildRaw, userId: raw(u.id), roleId: id });
  return id;
}
/** @everyone given `perms` in the guild, and `allow` by an overwrite on its #general. */
async function everyoneThroughOverwrite(g: { id: string; channel: string }, perms: string, allow: string) {
  const everyone = (
    await ok(app, `query($g: ID!) { guild(id: $g) { roles { id isEveryone } } }`, { g: g.id }, owner.token)
  ).guild.roles.find((r: { isEveryone: boolean }) => r.isEveryone).id;
  await ok(
    app,
    `mutation($r: ID!) { updateRole(input: { id: $r, permissions: [${perms}] }) { id } }`,
    { r: everyone },
    owner.token,
  );
  await ok(
    app,
    `mutation($c: ID!, $r: ID!) { setChannelOverwrite(input: { channelId: $c, targetType: ROLE, targetId: $r,
      allow: [${allow}], deny: [] }) { allow } }`,
    { c: gid('Channel', g.channel), r: everyone },
    owner.token,
  );
}
/** A message written `ageMs` ago (its UUIDv7 id carries that time, as a real one would). */
async function postMessage(channelRaw: string, guildRaw: string, u: TestUser, content: string, ageMs = 0) {
  const at = Date.now() - ageMs;
  const id = `${idAtTime(at).slice(0, 24)}${randomBytes(6).toString('hex')}`;
  await app.deps.db.insert(messages).values({
    id,
    channelId: channelRaw,
    guildId: guildRaw,
    authorId: raw(u.id),
    content,
    createdAt: new Date(at),
  });
  return id;
}
/** The app's database, with `then` run after each transaction it commits (a writer beside it). */
function afterEachTransaction(then: () => Promise<void>) {
  return new Proxy(app.deps.db, {
    get(target, key) {
      if (key === 'transaction') {
        return async (...args: Parameters<typeof target.transaction>) => {
          const out = await target.transaction(...args);
          await then();
          return out;
        };
      }
      const v = Reflect.get(target, key, target);
      return typeof v === 'function' ? v.bind(target) : v;
    },
  });
}
const isMember = async (guildRaw: string, u: TestUser) =>
  (
    await app.deps.db
      .select()
      .from(members)
      .where(and(eq(members.guildId, guildRaw), eq(members.userId, raw(u.id))))
  ).length === 1;
const audits = (guildRaw: string, action: string) =>
  app.deps.db
    .select()
    .from(auditLog)
    .where(and(eq(auditLog.guildId, guildRaw), eq(auditLog.action, action)));
const eventsOf = (guildRaw: string, type: string) =>
  app.deps.db
    .select()
    .from(events)
    .where(and(eq(events.guildId, guildRaw), eq(events.type, type)));

const KICK = `mutation($g: ID!, $u: ID!, $r: String) { kickMember(guildId: $g, userId: $u, reason: $r) }`;
const BAN = `mutation($g: ID!, $u: ID!, $r: String, $h: Int) { banMember(guildId: $g, userId: $u, reason: $r, deleteMessageHours: $h) }`;
const UNBAN = `mutation($g: ID!, $u: ID!) { unbanMember(guildId: $g, userId: $u) }`;
const TIMEOUT = `mutation($g: ID!, $u: ID!, $t: DateTime, $r: String) { timeoutMember(guildId: $g, userId: $u, until: $t, reason: $r) }`;
const BANS = `query($g: ID!) { guild(id: $g) { bans { user { id } reason actor { id } createdAt } } }`;
const AUDIT = `query($g: ID!, $f: Int, $a: String, $act: String, $actor: ID) { guild(id: $g) {
  auditLog(first: $f, after: $a, action: $act, actorId: $actor) {
    edges { cursor node { id action actor { id } targetType targetId reason changes createdAt } }
    pageInfo { hasNextPage hasPreviousPage endCursor } } } }`;

describe('kickMember', () => {
  it('removes the member and their roles, audits and logs MEMBER_KICKED', async () => {
    const g = await makeGuild(owner);
    const m = await signUp(app);
    await join(g.raw, m);
    await giveRole(g.raw, m, 1, ['VIEW_CHANNEL']);
    assert.equal((await ok(app, KICK, { g: g.id, u: m.id, r: ' spam ' }, owner.token)).kickMember, true);
    assert.equal(await isMember(g.raw, m), false);
    const left = await app.deps.db
      .select()
      .from(memberRoles)
      .where(eq(memberRoles.userId, raw(m.id)));
    assert.equal(left.length, 0);
    const [a] = await audits(g.raw, 'MEMBER_KICK');
    assert.equal(a.actorId, raw(owner.id));
    assert.equal(a.targetId, raw(m.id));
    assert.equal(a.reason, 'spam');
    const [e] = await eventsOf(g.raw, 'MEMBER_KICKED');
    assert.deepEqual(e.payload, { userId: raw(m.id) });
    await fails(app, 'NOT_FOUND', `query($g: ID!) { guild(id: $g) { id } }`, { g: g.id }, m.token);
  });

  it('refuses with the right code and writes nothing', async () => {
    const g = await makeGuild(owner);
    const [mod, peer, plain, victim, stranger] = await Promise.all([1, 2, 3, 4, 5].map(() => signUp(app)));
    for (const u of [mod, peer, plain, victim]) await join(g.raw, u);
    await giveRole(g.raw, mod, 2, ['KICK_MEMBERS']);
    await giveRole(g.raw, peer, 2, []);
    await fails(app, 'UNAUTHENTICATED', KICK, { g: g.id, u: victim.id });
    await fails(app, 'NOT_FOUND', KICK, { g: g.id, u: victim.id }, stranger.token);
    await fails(app, 'FORBIDDEN', KICK, { g: g.id, u: victim.id }, plain.token);
    await fails(app, 'FORBIDDEN', KICK, { g: g.id, u: peer.id }, mod.token); // same position
    await fails(app, 'FORBIDDEN', KICK, { g: g.id, u: owner.id }, mod.token);
    await fails(app, 'FORBIDDEN', KICK, { g: g.id, u: mod.id }, mod.token); // self
    await fails(app, 'FORBIDDEN', KICK, { g: g.id, u: owner.id }, owner.token); // owner on self
    await fails(app, 'NOT_FOUND', KICK, { g: g.id, u: stranger.id }, mod.token);
    await fails(app, 'NOT_FOUND', KICK, { g: gid('Guild', newId()), u: victim.id }, owner.token);
    await fails(app, 'BAD_USER_INPUT', KICK, { g: g.id, u: g.id }, mod.token);
    await fails(app, 'BAD_USER_INPUT', KICK, { g: 'nope', u: victim.id }, mod.token);
    await fails(app, 'BAD_USER_INPUT', KICK, { g: g.id, u: victim.id, r: 'x'.repeat(513) }, mod.token);
    for (const u of [mod, peer, plain, victim]) assert.equal(await isMember(g.raw, u), true);
    assert.equal((await audits(g.raw, 'MEMBER_KICK')).length, 0);
    assert.equal((await eventsOf(g.raw, 'MEMBER_KICKED')).length, 0);
    // A lower-ranked member is fair game for the moderator.
    await ok(app, KICK, { g: g.id, u: victim.id }, mod.token);
  });
});

describe('banMember / unbanMember', () => {
  it('bans a member, purges their recent messages in this guild only, and lists the ban', async () => {
    const g = await makeGuild(owner);
    const other = await makeGuild(owner);
    const m = await signUp(app);
    await join(g.raw, m);
    await join(other.raw, m);
    const recent1 = await postMessage(g.channel, g.raw, m, 'buy now', 10 * 60_000);
    const recent2 = await postMessage(g.channel, g.raw, m, 'buy now!!');
    const old = await postMessage(g.channel, g.raw, m, 'hello from yesterday', 3 * 3600_000);
    const elsewhere = await postMessage(other.channel, other.raw, m, 'elsewhere');
    const bystander = await postMessage(g.channel, g.raw, owner, 'owner speaks');
    await ok(app, BAN, { g: g.id, u: m.id, r: 'spam', h: 1 }, owner.token);
    assert.equal(await isMember(g.raw, m), false);
    assert.equal(await isMember(other.raw, m), true);
    const rows = new Map((await app.deps.db.select().from(messages)).map((r) => [r.id, r]));
    for (const id of [recent1, recent2]) {
      assert.ok(rows.get(id)?.deletedAt);
      assert.equal(rows.get(id)?.content, '');
    }
    for (const id of [old, elsewhere, bystander]) assert.equal(rows.get(id)?.deletedAt, null);
    const deletedEvents = await eventsOf(g.raw, 'MESSAGE_DELETED');
    assert.deepEqual(
      deletedEvents.map((e) => (e.payload as { messageId: string }).messageId).sort(),
      [recent1, recent2].sort(),
    );
    assert.equal(deletedEvents[0].channelId, g.channel);
    assert.equal((await eventsOf(g.raw, 'MEMBER_BANNED')).length, 1);
    const [a] = await audits(g.raw, 'MEMBER_BAN');
    assert.equal(a.reason, 'spam');
    assert.deepEqual(a.changes, { wasMember: true, deleteMessageHours: 1, deletedMessages: 2 });
    const list = await ok(app, BANS, { g: g.id }, owner.token);
    assert.equal(list.guild.bans.length, 1);
    assert.equal(list.guild.bans[0].user.id, m.id);
    assert.equal(list.guild.bans[0].actor.id, owner.id);
    assert.equal(list.guild.bans[0].reason, 'spam');
    // The bans row is what joinGuild checks.
    const [ban] = await app.deps.db.select().from(bans).where(eq(bans.guildId, g.raw));
    assert.equal(ban.userId, raw(m.id));
    await fails(app, 'CONFLICT', BAN, { g: g.id, u: m.id }, owner.token);
  });

  it('two bans of the same member at once: one wins, and every message either purged is audited once', async () => {
    const g = await makeGuild(owner);
    const m = await signUp(app);
    await join(g.raw, m);
    const N = 3_000;
    const ids = Array.from({ length: N }, () => newId());
    await app.deps.db.execute(sql`insert into messages (id, channel_id, guild_id, author_id, content)
      select i, ${g.channel}::uuid, ${g.raw}::uuid, ${raw(m.id)}::uuid, 'spam'
      from unnest(${`{${ids.join(',')}}`}::uuid[]) i`);
    const both = await Promise.all(
      [0, 1].map(() => gql(app, BAN, { g: g.id, u: m.id, h: 1 }, { token: owner.token })),
    );
    assert.deepEqual(both.map((r) => (r.errors ? r.errors[0].extensions?.code : 'ok')).sort(), [
      'CONFLICT',
      'ok',
    ]);
    // The refused one may have purged some before it was refused: those are its deletions too.
    // Before, only the winner's count was audited (4,000 of 5,000 in a review's run).
    const counted = [...(await audits(g.raw, 'MEMBER_BAN')), ...(await audits(g.raw, 'MESSAGE_BULK_DELETE'))]
      .map((a) => (a.changes as { deletedMessages: number }).deletedMessages)
      .reduce((x, y) => x + y, 0);
    assert.equal(counted, N);
    assert.equal((await eventsOf(g.raw, 'MESSAGE_DELETED')).length, N);
  });

  it('purges more messages than one statement can carry parameters for (14,000), each logged once in order', async () => {
    const g = await makeGuild(owner);
    const m = await signUp(app);
    await join(g.raw, m);
    const N = 14_000;
    const ids = Array.from({ length: N }, () => newId());
    await app.deps.db.execute(sql`insert into messages (id, channel_id, guild_id, author_id, content)
      select i, ${g.channel}::uuid, ${g.raw}::uuid, ${raw(m.id)}::uuid, 'spam'
      from unnest(${`{${ids.join(',')}}`}::uuid[]) i`);
    // One MESSAGE_DELETED per message: 5 parameters each, past the protocol's 65,535 in one insert
    // (INTERNAL_SERVER_ERROR before).
    await ok(app, BAN, { g: g.id, u: m.id, h: 1 }, owner.token);
    const logged = (await eventsOf(g.raw, 'MESSAGE_DELETED'))
      .sort((x, y) => x.seq - y.seq)
      .map((e) => (e.payload as { messageId: string }).messageId);
    assert.equal(logged.length, N);
    assert.deepEqual(logged, [...ids].sort());
    const [a] = await audits(g.raw, 'MEMBER_BAN');
    assert.equal((a.changes as { deletedMessages: number }).deletedMessages, N);
  });

  it('wipes a message committed while the purge ran whose id is older than the last one a batch wiped', async () => {
    const g = await makeGuild(owner);
    const m = await signUp(app);
    await join(g.raw, m);
    await postMessage(g.channel, g.raw, m, 'sent, committed');
    // A send takes its id before its insert (sendMessage: access check, then the grouped insert,
    // which may wait behind a stalled statement; or another instance's clock a little behind):
    // this one commits right after the purge's batch, its id 5 s older than what the batch wiped.
    let late: string | undefined;
    let txns = 0;
    const db = afterEachTransaction(async () => {
      if (++txns === 1) late = await postMessage(g.channel, g.raw, m, 'in flight', 5_000);
    });
    const viewer = { userId: raw(owner.id), sessionId: 'test', isAdmin: false };
    await banMember({ ...app.deps, db }, viewer, {
      guildId: g.raw,
      userId: raw(m.id),
      deleteMessageHours: 1,
    });
    assert.equal(txns, 2, 'one batch, then the ban');
    const left = await app.deps.db
      .select({ id: messages.id })
      .from(messages)
      .where(and(eq(messages.guildId, g.raw), isNull(messages.deletedAt)));
    assert.deepEqual(left, [], 'a message of the banned member sent before the ban survived its purge');
    const logged = (await eventsOf(g.raw, 'MESSAGE_DELETED')).map(
      (e) => (e.payload as { messageId: string }).messageId,
    );
    assert.equal(logged.filter((id) => id === late).length, 1);
    const [a] = await audits(g.raw, 'MEMBER_BAN');
    assert.equal((a.changes as { deletedMessages: number }).deletedMessages, 2);
  });

  it('ends its purge while the member sends faster than a batch wipes, and wipes what came meanwhile', async () => {
    const g = await makeGuild(owner);
    const m = await signUp(app);
    await join(g.raw, m);
    const sendMany = (n: number) =>
      app.deps.db
        .insert(messages)
        .values(
          Array.from({ length: n }, (_, i) => ({
            id: `${idAtTime(Date.now()).slice(0, 24)}${randomBytes(6).toString('hex')}`,
            channelId: g.channel,
            guildId: g.raw,
            authorId: raw(m.id),
            content: `spam ${i}`,
          })),
        )
        .returning({ id: messages.id });
    await sendMany(BAN_PURGE_BATCH);
    // A bot (RATE_LIMITS=off): a full batch's worth more after each of the purge's transactions, up
    // to CAP of them (so the code before, which chased them, ends too), nothing after the ban's.
    const CAP = 12;
    let txns = 0;
    let sentAfterBan = 0;
    const db = afterEachTransaction(async () => {
      if (++txns > CAP) return;
      const banned = await app.deps.db.select().from(bans).where(eq(bans.guildId, g.raw));
      const sent = await sendMany(BAN_PURGE_BATCH);
      if (banned.length) sentAfterBan += sent.length;
    });
    const viewer = { userId: raw(owner.id), sessionId: 'test', isAdmin: false };
    await banMember({ ...app.deps, db }, viewer, {
      guildId: g.raw,
      userId: raw(m.id),
      deleteMessageHours: 1,
    });
    // One full batch, one that finds nothing sent before the ban began, then the ban, which wipes
    // the two batches' worth sent meanwhile. Before: a full batch after every batch, until the
    // sender stopped (here at CAP).
    assert.equal(txns, 3);
    const left = await app.deps.db
      .select({ id: messages.id })
      .from(messages)
      .where(and(eq(messages.guildId, g.raw), isNull(messages.deletedAt)));
    assert.equal(left.length, sentAfterBan, 'only what was sent after the ban survived');
    const [a] = await audits(g.raw, 'MEMBER_BAN');
    assert.equal((a.changes as { deletedMessages: number }).deletedMessages, 3 * BAN_PURGE_BATCH);
  });

  it('bans a non-member pre-emptively (joinGuild then refuses them) and unbans', async () => {
    const g = await makeGuild(owner);
    const outsider = await signUp(app);
    await ok(app, BAN, { g: g.id, u: outsider.id }, owner.token);
    const [a] = await audits(g.raw, 'MEMBER_BAN');
    assert.deepEqual(a.changes, { wasMember: false, deleteMessageHours: 0, deletedMessages: 0 });
    const inv = await ok(
      app,
      `mutation($g: ID!) { createInvite(input: { guildId: $g }) { code } }`,
      { g: g.id },
      owner.token,
    );
    const JOIN = `mutation($c: String!) { joinGuild(code: $c) { id } }`;
    await fails(app, 'FORBIDDEN', JOIN, { c: inv.createInvite.code }, outsider.token);
    assert.equal(await isMember(g.raw, outsider), false);
    assert.equal((await ok(app, UNBAN, { g: g.id, u: outsider.id }, owner.token)).unbanMember, true);
    await ok(app, JOIN, { c: inv.createInvite.code }, outsider.token);
    assert.equal(await isMember(g.raw, outsider), true);
    assert.equal((await app.deps.db.select().from(bans).where(eq(bans.guildId, g.raw))).length, 0);
    assert.equal((await audits(g.raw, 'MEMBER_UNBAN')).length, 1);
    await fails(app, 'NOT_FOUND', UNBAN, { g: g.id, u: outsider.id }, owner.token);
  });

  it('refuses with the right code and writes nothing', async () => {
    const g = await makeGuild(owner);
    const [mod, senior, plain, victim, stranger] = await Promise.all([1, 2, 3, 4, 5].map(() => signUp(app)));
    for (const u of [mod, senior, plain, victim]) await join(g.raw, u);
    await giveRole(g.raw, mod, 2, ['BAN_MEMBERS']);
    await giveRole(g.raw, senior, 3, []);
    const msg = await postMessage(g.channel, g.raw, victim, 'keep me');
    await fails(app, 'UNAUTHENTICATED', BAN, { g: g.id, u: victim.id });
    await fails(app, 'NOT_FOUND', BAN, { g: g.id, u: victim.id }, stranger.token);
    await fails(app, 'FORBIDDEN', BAN, { g: g.id, u: victim.id }, plain.token);
    await fails(app, 'FORBIDDEN', BAN, { g: g.id, u: senior.id }, mod.token);
    await fails(app, 'FORBIDDEN', BAN, { g: g.id, u: owner.id }, mod.token);
    await fails(app, 'FORBIDDEN', BAN, { g: g.id, u: mod.id }, mod.token);
    await fails(app, 'NOT_FOUND', BAN, { g: g.id, u: gid('User', newId()) }, mod.token);
    await fails(app, 'BAD_USER_INPUT', BAN, { g: g.id, u: victim.id, h: 169 }, mod.token);
    await fails(app, 'BAD_USER_INPUT', BAN, { g: g.id, u: victim.id, h: -1 }, mod.token);
    await fails(app, 'BAD_USER_INPUT', BAN, { g: g.id, u: victim.id, r: 'x'.repeat(513) }, mod.token);
    await fails(app, 'FORBIDDEN', BANS, { g: g.id }, plain.token);
    await fails(app, 'NOT_FOUND', BANS, { g: g.id }, stranger.token);
    await fails(app, 'FORBIDDEN', UNBAN, { g: g.id, u: victim.id }, plain.token);
    await fails(app, 'UNAUTHENTICATED', UNBAN, { g: g.id, u: victim.id });
    assert.equal((await app.deps.db.select().from(bans).where(eq(bans.guildId, g.raw))).length, 0);
    assert.equal(await isMember(g.raw, victim), true);
    const [kept] = await app.deps.db.select().from(messages).where(eq(messages.id, msg));
    assert.equal(kept.deletedAt, null);
    assert.equal((await audits(g.raw, 'MEMBER_BAN')).length, 0);
    await ok(app, BAN, { g: g.id, u: victim.id, h: 168 }, mod.token);
    const [gone] = await app.deps.db.select().from(messages).where(eq(messages.id, msg));
    assert.ok(gone.deletedAt);
  });
});

describe('timeoutMember', () => {
  it('times out (send and react stripped, reading kept), then clears with null or a past time', async () => {
    const g = await makeGuild(owner);
    const m = await signUp(app);
    await join(g.raw, m);
    const until = new Date(Date.now() + 3600_000).toISOString();
    await ok(app, TIMEOUT, { g: g.id, u: m.id, t: until, r: 'cool off' }, owner.token);
    const [row] = await app.deps.db
      .select()
      .from(members)
      .where(eq(members.userId, raw(m.id)));
    assert.equal(row.timeoutUntil?.toISOString(), until);
    const access = await loadChannelAccess(app.deps.db, raw(m.id), g.channel);
    const names = (await import('../core/permissions.ts')).permissionNames(access?.permissions ?? 0n);
    assert.deepEqual(names, ['VIEW_CHANNEL', 'READ_HISTORY']);
    const [a] = await audits(g.raw, 'MEMBER_TIMEOUT');
    assert.deepEqual(a.changes, { timeoutUntil: { old: null, new: until } });
    assert.equal(a.reason, 'cool off');
    const [e] = await eventsOf(g.raw, 'MEMBER_UPDATED');
    assert.deepEqual(e.payload, { userId: raw(m.id), timeoutUntil: until });

    await ok(app, TIMEOUT, { g: g.id, u: m.id, t: null }, owner.token);
    const [cleared] = await app.deps.db
      .select()
      .from(members)
      .where(eq(members.userId, raw(m.id)));
    assert.equal(cleared.timeoutUntil, null);
    await ok(app, TIMEOUT, { g: g.id, u: m.id, t: until }, owner.token);
    await ok(app, TIMEOUT, { g: g.id, u: m.id, t: new Date(Date.now() - 1000).toISOString() }, owner.token);
    const [cleared2] = await app.deps.db
      .select()
      .from(members)
      .where(eq(members.userId, raw(m.id)));
    assert.equal(cleared2.timeoutUntil, null);
    assert.equal((await audits(g.raw, 'MEMBER_TIMEOUT_CLEAR')).length, 2);
  });

  it('keeps a member reading a channel only an overwrite shows it (its roles give no VIEW_CHANNEL in the guild), and stops its sending there', async () => {
    const g = await makeGuild(owner);
    // @everyone may send and react in the guild, see nothing: the channel's overwrite shows it.
    await everyoneThroughOverwrite(g, 'SEND_MESSAGES, ADD_REACTIONS', 'VIEW_CHANNEL, READ_HISTORY');
    const m = await signUp(app);
    await join(g.raw, m);
    await postMessage(g.channel, g.raw, owner, 'before the timeout');
    const read = `query($c: ID!) { channel(id: $c) { id viewerPermissions messages(first: 5) { edges { node { content } } } } }`;
    const c = gid('Channel', g.channel);
    const free = await ok(app, read, { c }, m.token);
    assert.deepEqual(free.channel.viewerPermissions.slice().sort(), [
      'ADD_REACTIONS',
      'READ_HISTORY',
      'SEND_MESSAGES',
      'VIEW_CHANNEL',
    ]);
    const until = new Date(Date.now() + 3600_000).toISOString();
    await ok(app, TIMEOUT, { g: g.id, u: m.id, t: until }, owner.token);
    const timedOut = await ok(app, read, { c }, m.token);
    assert.deepEqual(timedOut.channel.viewerPermissions.slice().sort(), ['READ_HISTORY', 'VIEW_CHANNEL']);
    assert.deepEqual(
      timedOut.channel.messages.edges.map((e: { node: { content: string } }) => e.node.content),
      ['before the timeout'],
    );
    await fails(
      app,
      'FORBIDDEN',
      `mutation($c: ID!) { sendMessage(input: { channelId: $c, content: "muted?" }) { id } }`,
      { c },
      m.token,
    );
  });

  it('shows a member whose roles give nothing in the guild a channel an overwrite opens to it, as Discord does', async () => {
    const g = await makeGuild(owner);
    await everyoneThroughOverwrite(g, '', 'VIEW_CHANNEL, READ_HISTORY, SEND_MESSAGES');
    const m = await signUp(app);
    await join(g.raw, m);
    const c = gid('Channel', g.channel);
    const got = await ok(app, `query($c: ID!) { channel(id: $c) { viewerPermissions } }`, { c }, m.token);
    assert.deepEqual(got.channel.viewerPermissions.slice().sort(), [
      'READ_HISTORY',
      'SEND_MESSAGES',
      'VIEW_CHANNEL',
    ]);
    await ok(
      app,
      `mutation($c: ID!) { sendMessage(input: { channelId: $c, content: "hello" }) { id } }`,
      { c },
      m.token,
    );
  });

  it('refuses with the right code and writes nothing', async () => {
    const g = await makeGuild(owner);
    const [mod, admin, plain, victim, stranger] = await Promise.all([1, 2, 3, 4, 5].map(() => signUp(app)));
    for (const u of [mod, admin, plain, victim]) await join(g.raw, u);
    await giveRole(g.raw, mod, 5, ['MODERATE_MEMBERS']);
    await giveRole(g.raw, admin, 1, ['ADMINISTRATOR']);
    const soon = new Date(Date.now() + 60_000).toISOString();
    await fails(app, 'UNAUTHENTICATED', TIMEOUT, { g: g.id, u: victim.id, t: soon });
    await fails(app, 'NOT_FOUND', TIMEOUT, { g: g.id, u: victim.id, t: soon }, stranger.token);
    await fails(app, 'FORBIDDEN', TIMEOUT, { g: g.id, u: victim.id, t: soon }, plain.token);
    await fails(app, 'FORBIDDEN', TIMEOUT, { g: g.id, u: owner.id, t: soon }, mod.token);
    await fails(app, 'FORBIDDEN', TIMEOUT, { g: g.id, u: mod.id, t: soon }, mod.token);
    await fails(app, 'FORBIDDEN', TIMEOUT, { g: g.id, u: admin.id, t: soon }, mod.token);
    await fails(app, 'NOT_FOUND', TIMEOUT, { g: g.id, u: stranger.id, t: soon }, mod.token);
    const tooLong = new Date(Date.now() + 29 * 24 * 3600_000).toISOString();
    await fails(app, 'BAD_USER_INPUT', TIMEOUT, { g: g.id, u: victim.id, t: tooLong }, mod.token);
    const rows = await app.deps.db.select().from(members).where(eq(members.guildId, g.raw));
    assert.ok(rows.every((r) => r.timeoutUntil === null));
    assert.equal((await eventsOf(g.raw, 'MEMBER_UPDATED')).length, 0);
    await ok(app, TIMEOUT, { g: g.id, u: victim.id, t: soon }, mod.token);
  });
});

describe('Guild.auditLog', () => {
  it('pages newest first with global target ids, filters, and pages of at most 100', async () => {
    const g = await makeGuild(owner);
    const m = await signUp(app);
    await join(g.raw, m);
    await ok(app, TIMEOUT, { g: g.id, u: m.id, t: new Date(Date.now() + 60_000).toISOString() }, owner.token);
    await ok(app, KICK, { g: g.id, u: m.id, r: 'bye' }, owner.token);
    const d = await ok(app, AUDIT, { g: g.id, f: 2 }, owner.token);
    const c = d.guild.auditLog;
    assert.deepEqual(
      c.edges.map((e: any) => e.node.action),
      ['MEMBER_KICK', 'MEMBER_TIMEOUT'],
    );
    const kick = c.edges[0].node;
    assert.equal(kick.actor.id, owner.id);
    assert.equal(kick.targetType, 'USER');
    assert.equal(kick.targetId, m.id);
    assert.equal(kick.reason, 'bye');
    assert.equal(kick.changes, null);
    assert.ok(JSON.parse(c.edges[1].node.changes).timeoutUntil.new);
    assert.equal(c.pageInfo.hasNextPage, true);
    const p2 = await ok(app, AUDIT, { g: g.id, f: 2, a: c.pageInfo.endCursor }, owner.token);
    assert.deepEqual(
      p2.guild.auditLog.edges.map((e: any) => e.node.action),
      ['GUILD_CREATE'],
    );
    assert.equal(p2.guild.auditLog.pageInfo.hasNextPage, false);
    assert.equal(p2.guild.auditLog.pageInfo.hasPreviousPage, true);
    const kicks = await ok(app, AUDIT, { g: g.id, act: 'MEMBER_KICK' }, owner.token);
    assert.equal(kicks.guild.auditLog.edges.length, 1);
    const byOther = await ok(app, AUDIT, { g: g.id, actor: m.id }, owner.token);
    assert.equal(byOther.guild.auditLog.edges.length, 0);

    await app.deps.db.insert(auditLog).values(
      Array.from({ length: 120 }, () => ({
        id: newId(),
        guildId: g.raw,
        actorId: raw(owner.id),
        action: 'TEST',
      })),
    );
    const big = await ok(app, AUDIT, { g: g.id, f: 100 }, owner.token);
    assert.equal(big.guild.auditLog.edges.length, 100);
    await fails(app, 'BAD_USER_INPUT', AUDIT, { g: g.id, f: 101 }, owner.token);
    const dflt = await ok(app, AUDIT, { g: g.id }, owner.token);
    assert.equal(dflt.guild.auditLog.edges.length, 50);
  });

  it('is VIEW_AUDIT_LOG only: FORBIDDEN for members, NOT_FOUND for strangers', async () => {
    const g = await makeGuild(owner);
    const [auditor, plain, stranger] = await Promise.all([1, 2, 3].map(() => signUp(app)));
    await join(g.raw, auditor);
    await join(g.raw, plain);
    await giveRole(g.raw, auditor, 1, ['VIEW_AUDIT_LOG']);
    assert.equal((await ok(app, AUDIT, { g: g.id }, auditor.token)).guild.auditLog.edges.length, 1);
    await fails(app, 'FORBIDDEN', AUDIT, { g: g.id }, plain.token);
    await fails(app, 'NOT_FOUND', AUDIT, { g: g.id }, stranger.token);
    await fails(app, 'UNAUTHENTICATED', AUDIT, { g: g.id });
    await fails(app, 'BAD_USER_INPUT', AUDIT, { g: g.id, a: 'garbage' }, owner.token);
    await fails(app, 'BAD_USER_INPUT', AUDIT, { g: g.id, f: -1 }, owner.token);
    await fails(app, 'BAD_USER_INPUT', AUDIT, { g: g.id, actor: g.id }, owner.token);
    const r = await gql(app, AUDIT, { g: g.id }, { token: plain.token });
    assert.equal(r.data?.guild ?? null, null);
  });
});
