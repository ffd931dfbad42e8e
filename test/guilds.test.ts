import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { after, before, describe, it } from 'node:test';
import { sql } from 'drizzle-orm';
import { pruneEvents } from '../core/realtime/log.ts';
import { recordFormerMembers } from '../core/services/purge.service.ts';
import { decodeAnyId } from '../schema/builder.ts';
import {
  createTestApp,
  fails,
  gql,
  ok,
  signUp,
  statementsOf,
  type TestApp,
  type TestUser,
} from './helpers.ts';

let app: TestApp;
before(async () => {
  app = await createTestApp();
});
after(() => app.destroy());

const raw = (id: string) => decodeAnyId(id).id;
async function rows<T = Record<string, unknown>>(q: ReturnType<typeof sql>): Promise<T[]> {
  return ((await app.deps.db.execute(q)) as unknown as { rows: T[] }).rows;
}

async function makeGuild(owner: TestUser, name = 'Guild') {
  const d = await ok(
    app,
    `mutation($n: String!) { createGuild(input: { name: $n }) { id channels { id } } }`,
    { n: name },
    owner.token,
  );
  return { id: d.createGuild.id as string, general: d.createGuild.channels[0].id as string };
}

async function join(user: TestUser, inviter: TestUser, guildId: string) {
  const i = await ok(
    app,
    `mutation($g: ID!) { createInvite(input: { guildId: $g }) { code } }`,
    { g: guildId },
    inviter.token,
  );
  await ok(
    app,
    `mutation($c: String!) { joinGuild(code: $c) { id } }`,
    { c: i.createInvite.code },
    user.token,
  );
}

const UPDATE_GUILD = `mutation($i: UpdateGuildInput!) { updateGuild(input: $i) { id name description iconUrl } }`;
const UPDATE_CHANNEL = `mutation($i: UpdateChannelInput!) { updateChannel(input: $i) { id name topic position slowmodeSeconds nsfw parent { id } } }`;
const CREATE_CHANNEL = `mutation($g: ID!, $n: String!, $t: ChannelType!, $p: ID) { createChannel(input: { guildId: $g, name: $n, type: $t, parentId: $p }) { id type } }`;

describe('guilds', () => {
  it('updates a guild with MANAGE_GUILD, records audit and event, validates input', async () => {
    const owner = await signUp(app);
    const member = await signUp(app);
    const stranger = await signUp(app);
    const g = await makeGuild(owner, 'Before');
    await join(member, owner, g.id);
    const d = await ok(
      app,
      UPDATE_GUILD,
      { i: { id: g.id, name: ' After ', description: 'A place', iconUrl: 'https://x.test/i.png' } },
      owner.token,
    );
    assert.deepEqual(d.updateGuild, {
      id: g.id,
      name: 'After',
      description: 'A place',
      iconUrl: 'https://x.test/i.png',
    });
    const cleared = await ok(app, UPDATE_GUILD, { i: { id: g.id, description: null } }, owner.token);
    assert.equal(cleared.updateGuild.description, null);
    assert.equal(cleared.updateGuild.name, 'After');
    const audit = await rows(
      sql`select action from audit_log where guild_id = ${raw(g.id)}::uuid and action = 'GUILD_UPDATE'`,
    );
    assert.equal(audit.length, 2);
    const ev = await rows(
      sql`select type from events where guild_id = ${raw(g.id)}::uuid and type = 'GUILD_UPDATED'`,
    );
    assert.equal(ev.length, 2);

    await fails(app, 'FORBIDDEN', UPDATE_GUILD, { i: { id: g.id, name: 'Hacked' } }, member.token);
    await fails(app, 'NOT_FOUND', UPDATE_GUILD, { i: { id: g.id, name: 'Hacked' } }, stranger.token);
    await fails(app, 'UNAUTHENTICATED', UPDATE_GUILD, { i: { id: g.id, name: 'Hacked' } });
    await fails(app, 'BAD_USER_INPUT', UPDATE_GUILD, { i: { id: g.id, name: '  ' } }, owner.token);
    await fails(
      app,
      'BAD_USER_INPUT',
      UPDATE_GUILD,
      { i: { id: g.id, iconUrl: 'javascript:x' } },
      owner.token,
    );
    await fails(app, 'BAD_USER_INPUT', UPDATE_GUILD, { i: { id: g.general, name: 'x' } }, owner.token);
    const after = await ok(app, `query($id: ID!) { guild(id: $id) { name } }`, { id: g.id }, owner.token);
    assert.equal(after.guild.name, 'After');
  });

  it('lists the viewer guilds and their viewerPermissions', async () => {
    const owner = await signUp(app);
    const member = await signUp(app);
    const a = await makeGuild(owner, 'A');
    const b = await makeGuild(owner, 'B');
    await join(member, owner, b.id);
    const mine = await ok(app, `{ viewer { guilds { id name viewerPermissions } } }`, {}, owner.token);
    assert.deepEqual(
      mine.viewer.guilds.map((g: any) => g.id),
      [a.id, b.id],
    );
    assert.ok(mine.viewer.guilds[0].viewerPermissions.includes('ADMINISTRATOR'));
    const theirs = await ok(app, `{ viewer { guilds { id viewerPermissions } } }`, {}, member.token);
    assert.deepEqual(
      theirs.viewer.guilds.map((g: any) => g.id),
      [b.id],
    );
    assert.ok(theirs.viewer.guilds[0].viewerPermissions.includes('SEND_MESSAGES'));
    assert.ok(!theirs.viewer.guilds[0].viewerPermissions.includes('MANAGE_GUILD'));
  });

  it('transfers ownership to a member only, by the owner only', async () => {
    const owner = await signUp(app);
    const member = await signUp(app);
    const stranger = await signUp(app);
    const g = await makeGuild(owner);
    await join(member, owner, g.id);
    const T = `mutation($g: ID!, $u: ID!) { transferGuildOwnership(guildId: $g, userId: $u) { id owner { id } } }`;
    await fails(app, 'NOT_FOUND', T, { g: g.id, u: stranger.id }, owner.token);
    await fails(app, 'FORBIDDEN', T, { g: g.id, u: member.id }, member.token);
    await fails(app, 'NOT_FOUND', T, { g: g.id, u: owner.id }, stranger.token);
    await fails(app, 'BAD_USER_INPUT', T, { g: g.id, u: owner.id }, owner.token);
    await fails(app, 'BAD_USER_INPUT', T, { g: g.id, u: g.id }, owner.token);
    const d = await ok(app, T, { g: g.id, u: member.id }, owner.token);
    assert.equal(d.transferGuildOwnership.owner.id, member.id);
    // The old owner is now an ordinary member and can leave; the new one cannot.
    await fails(app, 'FORBIDDEN', T, { g: g.id, u: owner.id }, owner.token);
    const audit = await rows(
      sql`select target_id from audit_log where guild_id = ${raw(g.id)}::uuid and action = 'GUILD_OWNER_TRANSFER'`,
    );
    assert.equal(audit.length, 1);
  });

  it('lets members leave but not the owner (CONFLICT)', async () => {
    const owner = await signUp(app);
    const member = await signUp(app);
    const stranger = await signUp(app);
    const g = await makeGuild(owner);
    await join(member, owner, g.id);
    const L = `mutation($g: ID!) { leaveGuild(guildId: $g) }`;
    await fails(app, 'CONFLICT', L, { g: g.id }, owner.token);
    await fails(app, 'NOT_FOUND', L, { g: g.id }, stranger.token);
    assert.equal((await ok(app, L, { g: g.id }, member.token)).leaveGuild, true);
    await fails(app, 'NOT_FOUND', `query($id: ID!) { guild(id: $id) { id } }`, { id: g.id }, member.token);
    await fails(app, 'NOT_FOUND', L, { g: g.id }, member.token);
    const ev = await rows(
      sql`select payload from events where guild_id = ${raw(g.id)}::uuid and type = 'MEMBER_LEFT'`,
    );
    assert.deepEqual(ev[0].payload, { userId: raw(member.id) });
    const owners = await rows(sql`select 1 from members where guild_id = ${raw(g.id)}::uuid`);
    assert.equal(owners.length, 1);
  });

  it('deletes a guild: owner only, FORBIDDEN for members, NOT_FOUND for strangers', async () => {
    const owner = await signUp(app);
    const member = await signUp(app);
    const stranger = await signUp(app);
    const g = await makeGuild(owner);
    await join(member, owner, g.id);
    const D = `mutation($id: ID!) { deleteGuild(id: $id) }`;
    await fails(app, 'FORBIDDEN', D, { id: g.id }, member.token);
    await fails(app, 'NOT_FOUND', D, { id: g.id }, stranger.token);
    await fails(app, 'UNAUTHENTICATED', D, { id: g.id });
    await ok(app, `query($id: ID!) { guild(id: $id) { id } }`, { id: g.id }, member.token);
    const d = await ok(app, D, { id: g.id }, owner.token);
    assert.equal(d.deleteGuild, g.id);
    await fails(app, 'NOT_FOUND', `query($id: ID!) { guild(id: $id) { id } }`, { id: g.id }, owner.token);
    await fails(
      app,
      'NOT_FOUND',
      `query($id: ID!) { channel(id: $id) { id } }`,
      { id: g.general },
      owner.token,
    );
    const ev = await rows<{ payload: Record<string, unknown> | string }>(
      sql`select payload from events where guild_id = ${raw(g.id)}::uuid and type = 'GUILD_DELETED'`,
    );
    assert.equal(ev.length, 1);
    // Who was in is kept beside the log, not in the event every replay reads.
    const payload = typeof ev[0].payload === 'string' ? JSON.parse(ev[0].payload) : ev[0].payload;
    assert.deepEqual(payload, { guildId: raw(g.id), actorId: raw(owner.id) });
    const was = await rows<{ user_id: string }>(
      sql`select user_id from former_members where guild_id = ${raw(g.id)}::uuid order by user_id`,
    );
    assert.deepEqual(
      was.map((w) => w.user_id),
      [raw(owner.id), raw(member.id)].sort(),
    );
    await fails(app, 'NOT_FOUND', D, { id: g.id }, owner.token);
    // The record goes with the log's retention.
    await pruneEvents(app.deps.db, 7, new Date(Date.now() + 8 * 86_400_000));
    assert.deepEqual(await rows(sql`select 1 from former_members where guild_id = ${raw(g.id)}::uuid`), []);
  });

  it('who was in a deleted guild is who was a member as it was deleted: one who left while its members were recorded is not, one who joined is', async () => {
    const owner = await signUp(app);
    const leaver = await signUp(app);
    const stayer = await signUp(app);
    const joiner = await signUp(app);
    const g = await makeGuild(owner);
    await join(leaver, owner, g.id);
    await join(stayer, owner, g.id);
    // The deletion's first phase (as deleteGuild runs it) records the members then...
    await recordFormerMembers(app.deps.db, raw(g.id));
    // ...and meanwhile one leaves and one joins, before the deletion's own transaction.
    await ok(app, `mutation($id: ID!) { leaveGuild(guildId: $id) }`, { id: g.id }, leaver.token);
    await join(joiner, owner, g.id);
    await ok(app, `mutation($id: ID!) { deleteGuild(id: $id) }`, { id: g.id }, owner.token);
    const was = await rows<{ user_id: string }>(
      sql`select user_id from former_members where guild_id = ${raw(g.id)}::uuid order by user_id`,
    );
    assert.deepEqual(
      was.map((w) => w.user_id),
      [raw(owner.id), raw(stayer.id), raw(joiner.id)].sort(),
    );
  });

  it('who was recorded by a deletion that failed long ago still hears of the deletion that succeeds, after retention pruned', async () => {
    const owner = await signUp(app);
    const member = await signUp(app);
    const g = await makeGuild(owner);
    await join(member, owner, g.id);
    // A deletion 10 days ago recorded the members (its first phase, as deleteGuild runs it), then
    // failed before its own transaction committed (a crash, a timeout): its rows stay behind.
    await recordFormerMembers(app.deps.db, raw(g.id));
    await app.deps.db.execute(
      sql`update former_members set deleted_at = now() - interval '10 days' where guild_id = ${raw(g.id)}::uuid`,
    );
    // Deleted now, then a 7-day retention runs: the GUILD_DELETED row is today's and stays...
    await ok(app, `mutation($id: ID!) { deleteGuild(id: $id) }`, { id: g.id }, owner.token);
    await pruneEvents(app.deps.db, 7);
    const ev = await rows(
      sql`select 1 from events where guild_id = ${raw(g.id)}::uuid and type = 'GUILD_DELETED'`,
    );
    assert.equal(ev.length, 1);
    // ...and so do who was in, whom its replay is shown to (log.ts, readRange's wasIn).
    const was = await rows<{ user_id: string }>(
      sql`select user_id from former_members where guild_id = ${raw(g.id)}::uuid order by user_id`,
    );
    assert.deepEqual(
      was.map((w) => w.user_id),
      [raw(owner.id), raw(member.id)].sort(),
    );
  });

  it('migration 0001 moves the members of GUILD_DELETED rows written before it into former_members', async () => {
    const a = await signUp(app);
    const b = await signUp(app);
    const guildId = '0193f1a2-0000-7000-8000-00000000d001';
    // The row as earlier versions wrote it, with one member id that is no user (any more).
    await app.deps.db.execute(sql`insert into events (type, guild_id, payload) values ('GUILD_DELETED',
      ${guildId}::uuid, ${JSON.stringify({ guildId, actorId: raw(a.id), memberIds: [raw(a.id), raw(b.id), '0193f1a2-0000-7000-8000-00000000d0ff'] })}::jsonb)`);
    const file = readFileSync(new URL('../migrations/0001_former_members.sql', import.meta.url), 'utf8');
    const moves = file
      .split('--> statement-breakpoint')
      .filter((st) => /^\s*(--.*\n)*\s*(INSERT|UPDATE)/.test(st));
    assert.equal(moves.length, 2);
    for (const st of moves) await app.deps.db.execute(sql.raw(st));
    const was = await rows<{ user_id: string }>(
      sql`select user_id from former_members where guild_id = ${guildId}::uuid order by user_id`,
    );
    assert.deepEqual(
      was.map((w) => w.user_id),
      [raw(a.id), raw(b.id)].sort(),
    );
    const [left] = await rows<{ payload: Record<string, unknown> | string }>(
      sql`select payload from events where guild_id = ${guildId}::uuid`,
    );
    const payload = typeof left.payload === 'string' ? JSON.parse(left.payload) : left.payload;
    assert.deepEqual(payload, { guildId, actorId: raw(a.id) });
  });
});

describe('channels', () => {
  it('updates a channel with MANAGE_CHANNELS, including moving it into a category', async () => {
    const owner = await signUp(app);
    const member = await signUp(app);
    const stranger = await signUp(app);
    const g = await makeGuild(owner);
    await join(member, owner, g.id);
    const cat = await ok(app, CREATE_CHANNEL, { g: g.id, n: 'Text', t: 'CATEGORY' }, owner.token);
    const ann = await ok(
      app,
      CREATE_CHANNEL,
      { g: g.id, n: 'news', t: 'ANNOUNCEMENT', p: cat.createChannel.id },
      owner.token,
    );
    assert.equal(ann.createChannel.type, 'ANNOUNCEMENT');
    const d = await ok(
      app,
      UPDATE_CHANNEL,
      {
        i: {
          id: g.general,
          name: 'lobby',
          topic: 'hi',
          position: 3,
          slowmodeSeconds: 10,
          nsfw: true,
          parentId: cat.createChannel.id,
        },
      },
      owner.token,
    );
    assert.deepEqual(d.updateChannel, {
      id: g.general,
      name: 'lobby',
      topic: 'hi',
      position: 3,
      slowmodeSeconds: 10,
      nsfw: true,
      parent: { id: cat.createChannel.id },
    });
    const out = await ok(
      app,
      UPDATE_CHANNEL,
      { i: { id: g.general, parentId: null, topic: null } },
      owner.token,
    );
    assert.equal(out.updateChannel.parent, null);
    assert.equal(out.updateChannel.topic, null);
    assert.equal(out.updateChannel.name, 'lobby');

    await fails(app, 'FORBIDDEN', UPDATE_CHANNEL, { i: { id: g.general, topic: 'mine' } }, member.token);
    await fails(app, 'NOT_FOUND', UPDATE_CHANNEL, { i: { id: g.general, topic: 'mine' } }, stranger.token);
    await fails(app, 'UNAUTHENTICATED', UPDATE_CHANNEL, { i: { id: g.general, topic: 'mine' } });
    for (const i of [
      { id: g.general, name: '' },
      { id: g.general, name: null },
      { id: g.general, topic: 'x'.repeat(1025) },
      { id: g.general, slowmodeSeconds: -1 },
      { id: g.general, slowmodeSeconds: 21_601 },
      { id: g.general, parentId: ann.createChannel.id },
      { id: cat.createChannel.id, parentId: cat.createChannel.id },
      { id: g.id, name: 'x' },
    ]) {
      await fails(app, 'BAD_USER_INPUT', UPDATE_CHANNEL, { i }, owner.token);
    }
    // A category of another guild is refused.
    const other = await makeGuild(owner);
    const otherCat = await ok(app, CREATE_CHANNEL, { g: other.id, n: 'C', t: 'CATEGORY' }, owner.token);
    await fails(
      app,
      'BAD_USER_INPUT',
      UPDATE_CHANNEL,
      { i: { id: g.general, parentId: otherCat.createChannel.id } },
      owner.token,
    );
    const after = await ok(
      app,
      `query($id: ID!) { channel(id: $id) { name topic } }`,
      { id: g.general },
      owner.token,
    );
    assert.deepEqual(after.channel, { name: 'lobby', topic: null });
    const audit = await rows(
      sql`select 1 from audit_log where guild_id = ${raw(g.id)}::uuid and action = 'CHANNEL_UPDATE'`,
    );
    assert.equal(audit.length, 2);
  });

  // Its channels get copies of the category's overwrites: one insert of (channels x overwrites)
  // rows, 5 parameters each, failed past the protocol's 65,535 parameters per statement (here
  // 2 x 6,600 rows: 66,000), and the deletion answered INTERNAL_SERVER_ERROR.
  it('a category with many member overwrites is deleted, its channels keeping copies of them', {
    timeout: 60_000,
  }, async () => {
    const owner = await signUp(app);
    const g = await makeGuild(owner);
    const cat = await ok(app, CREATE_CHANNEL, { g: g.id, n: 'Cat', t: 'CATEGORY' }, owner.token);
    const kids: string[] = [];
    for (const n of ['a', 'b']) {
      const k = await ok(
        app,
        CREATE_CHANNEL,
        { g: g.id, n, t: 'TEXT', p: cat.createChannel.id },
        owner.token,
      );
      kids.push(raw(k.createChannel.id));
    }
    const OVERWRITES = 6_600;
    await app.deps.db.execute(
      sql`insert into permission_overwrites (channel_id, target_type, target_id, allow, deny)
        select ${raw(cat.createChannel.id)}::uuid, 'MEMBER', gen_random_uuid(), 0, 0
        from generate_series(1, ${OVERWRITES})`,
    );
    await ok(app, `mutation($id: ID!) { deleteChannel(id: $id) }`, { id: cat.createChannel.id }, owner.token);
    for (const k of kids) {
      const [r] = await rows<{ n: number }>(
        sql`select count(*)::int as n from permission_overwrites where channel_id = ${k}::uuid`,
      );
      assert.equal(r.n, OVERWRITES);
    }
  });

  it('deletes channels; a deleted category leaves its channels uncategorized', async () => {
    const owner = await signUp(app);
    const member = await signUp(app);
    const g = await makeGuild(owner);
    await join(member, owner, g.id);
    const cat = await ok(app, CREATE_CHANNEL, { g: g.id, n: 'Cat', t: 'CATEGORY' }, owner.token);
    const inside = await ok(
      app,
      CREATE_CHANNEL,
      { g: g.id, n: 'in', t: 'TEXT', p: cat.createChannel.id },
      owner.token,
    );
    const D = `mutation($id: ID!) { deleteChannel(id: $id) }`;
    await fails(app, 'FORBIDDEN', D, { id: cat.createChannel.id }, member.token);
    await fails(app, 'BAD_USER_INPUT', D, { id: g.id }, owner.token);
    assert.equal(
      (await ok(app, D, { id: cat.createChannel.id }, owner.token)).deleteChannel,
      cat.createChannel.id,
    );
    const c = await ok(
      app,
      `query($id: ID!) { channel(id: $id) { parent { id } } }`,
      { id: inside.createChannel.id },
      owner.token,
    );
    assert.equal(c.channel.parent, null);
    await ok(app, D, { id: inside.createChannel.id }, owner.token);
    await fails(app, 'NOT_FOUND', D, { id: inside.createChannel.id }, owner.token);
    const list = await ok(
      app,
      `query($id: ID!) { guild(id: $id) { channels { id } } }`,
      { id: g.id },
      owner.token,
    );
    assert.deepEqual(
      list.guild.channels.map((x: any) => x.id),
      [g.general],
    );
    const ev = await rows(
      sql`select 1 from events where guild_id = ${raw(g.id)}::uuid and type = 'CHANNEL_DELETED'`,
    );
    assert.equal(ev.length, 2);
  });

  it('lists channels with viewerPermissions in a fixed number of statements', async () => {
    const owner = await signUp(app);
    const member = await signUp(app);
    const g = await makeGuild(owner);
    await join(member, owner, g.id);
    const Q = `query($id: ID!) { guild(id: $id) { channels { id name viewerPermissions } } }`;
    const count = async () => {
      const { n, result: d } = await statementsOf(app, () => ok(app, Q, { id: g.id }, member.token));
      return { n, channels: d.guild.channels };
    };
    const small = await count();
    assert.equal(small.channels.length, 1);
    assert.ok(small.channels[0].viewerPermissions.includes('SEND_MESSAGES'));
    const cat = await ok(app, CREATE_CHANNEL, { g: g.id, n: 'Cat', t: 'CATEGORY' }, owner.token);
    for (let i = 0; i < 8; i++) {
      await ok(app, CREATE_CHANNEL, { g: g.id, n: `c${i}`, t: 'TEXT', p: cat.createChannel.id }, owner.token);
    }
    const big = await count();
    assert.equal(big.channels.length, 10);
    assert.equal(big.n, small.n);
  });
});

describe('members', () => {
  it('pages members in join order with opaque cursors, at most 100 a page', async () => {
    const owner = await signUp(app);
    const g = await makeGuild(owner);
    const joined: TestUser[] = [owner];
    for (let i = 0; i < 4; i++) {
      const u = await signUp(app);
      await join(u, owner, g.id);
      joined.push(u);
    }
    const Q = `query($id: ID!, $first: Int, $after: String) { guild(id: $id) { members(first: $first, after: $after) {
      edges { cursor node { user { id } nickname joinedAt roles { id } timeoutUntil } }
      pageInfo { hasNextPage endCursor } } } }`;
    const seen: string[] = [];
    let after: string | null = null;
    for (;;) {
      const d: any = await ok(app, Q, { id: g.id, first: 2, after }, owner.token);
      const m = d.guild.members;
      seen.push(...m.edges.map((e: any) => e.node.user.id));
      if (!m.pageInfo.hasNextPage) break;
      after = m.pageInfo.endCursor;
    }
    assert.deepEqual(
      seen,
      joined.map((u) => u.id),
    );
    const all = await ok(app, Q, { id: g.id, first: 100 }, owner.token);
    assert.equal(all.guild.members.edges.length, 5);
    assert.equal(all.guild.members.pageInfo.hasNextPage, false);
    await fails(app, 'BAD_USER_INPUT', Q, { id: g.id, first: 101 }, owner.token);
    await fails(app, 'BAD_USER_INPUT', Q, { id: g.id, after: 'garbage' }, owner.token);
    await fails(app, 'BAD_USER_INPUT', Q, { id: g.id, first: -1 }, owner.token);
  });

  it('sets nicknames: self with CHANGE_NICKNAME, others with MANAGE_NICKNAMES and hierarchy', async () => {
    const owner = await signUp(app);
    const mod = await signUp(app);
    const member = await signUp(app);
    const stranger = await signUp(app);
    const g = await makeGuild(owner);
    await join(mod, owner, g.id);
    await join(member, owner, g.id);
    const role = await ok(
      app,
      `mutation($g: ID!) { createRole(input: { guildId: $g, name: "nick", permissions: [MANAGE_NICKNAMES] }) { id } }`,
      { g: g.id },
      owner.token,
    );
    await ok(
      app,
      `mutation($g: ID!, $u: ID!, $r: ID!) { assignRole(guildId: $g, userId: $u, roleId: $r) }`,
      { g: g.id, u: mod.id, r: role.createRole.id },
      owner.token,
    );
    const N = `mutation($g: ID!, $u: ID!, $n: String) { setNickname(guildId: $g, userId: $u, nickname: $n) { nickname user { id } } }`;
    const self = await ok(app, N, { g: g.id, u: member.id, n: ' Kitty ' }, member.token);
    assert.equal(self.setNickname.nickname, 'Kitty');
    const byMod = await ok(app, N, { g: g.id, u: member.id, n: 'Renamed' }, mod.token);
    assert.equal(byMod.setNickname.nickname, 'Renamed');
    const cleared = await ok(app, N, { g: g.id, u: member.id, n: null }, member.token);
    assert.equal(cleared.setNickname.nickname, null);
    await fails(app, 'FORBIDDEN', N, { g: g.id, u: mod.id, n: 'x' }, member.token);
    await fails(app, 'FORBIDDEN', N, { g: g.id, u: owner.id, n: 'x' }, mod.token);
    await fails(app, 'NOT_FOUND', N, { g: g.id, u: stranger.id, n: 'x' }, mod.token);
    await fails(app, 'NOT_FOUND', N, { g: g.id, u: stranger.id, n: 'x' }, stranger.token);
    await fails(app, 'BAD_USER_INPUT', N, { g: g.id, u: member.id, n: 'x'.repeat(33) }, member.token);
    // Without CHANGE_NICKNAME on @everyone, members cannot rename themselves.
    const roles = await ok(
      app,
      `query($id: ID!) { guild(id: $id) { roles { id isEveryone } } }`,
      { id: g.id },
      owner.token,
    );
    const everyone = roles.guild.roles.find((r: any) => r.isEveryone).id;
    await ok(
      app,
      `mutation($r: ID!) { updateRole(input: { id: $r, permissions: [VIEW_CHANNEL, SEND_MESSAGES, READ_HISTORY] }) { id } }`,
      { r: everyone },
      owner.token,
    );
    await fails(app, 'FORBIDDEN', N, { g: g.id, u: member.id, n: 'again' }, member.token);
    const list = await gql(
      app,
      `query($id: ID!) { guild(id: $id) { members { edges { node { nickname user { id } roles { name } } } } } }`,
      { id: g.id },
      { token: owner.token },
    );
    const m = list.data.guild.members.edges.map((e: any) => e.node);
    assert.equal(m.find((x: any) => x.user.id === member.id).nickname, null);
    assert.deepEqual(m.find((x: any) => x.user.id === mod.id).roles, [{ name: 'nick' }]);
    const ev = await rows(
      sql`select 1 from events where guild_id = ${raw(g.id)}::uuid and type = 'MEMBER_UPDATED'`,
    );
    assert.ok(ev.length >= 3);
  });
});
