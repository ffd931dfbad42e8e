import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import { sql } from 'drizzle-orm';
import { decodeAnyId } from '../schema/builder.ts';
import { createTestApp, fails, ok, signUp, type TestApp, type TestUser } from './helpers.ts';

let app: TestApp;
before(async () => {
  app = await createTestApp();
});
after(() => app.destroy());

const raw = (id: string) => decodeAnyId(id).id;
async function rows<T = Record<string, unknown>>(q: ReturnType<typeof sql>): Promise<T[]> {
  return ((await app.deps.db.execute(q)) as unknown as { rows: T[] }).rows;
}

async function makeGuild(owner: TestUser) {
  const d = await ok(
    app,
    `mutation { createGuild(input: { name: "G" }) { id channels { id } } }`,
    {},
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

const CREATE = `mutation($i: CreateRoleInput!) { createRole(input: $i) { id name color position permissions mentionable } }`;
const UPDATE = `mutation($i: UpdateRoleInput!) { updateRole(input: $i) { id name color position permissions mentionable } }`;
const DELETE = `mutation($id: ID!) { deleteRole(id: $id) }`;
const ASSIGN = `mutation($g: ID!, $u: ID!, $r: ID!) { assignRole(guildId: $g, userId: $u, roleId: $r) }`;
const UNASSIGN = `mutation($g: ID!, $u: ID!, $r: ID!) { unassignRole(guildId: $g, userId: $u, roleId: $r) }`;
const ROLES = `query($id: ID!) { guild(id: $id) { roles { id name position isEveryone } } }`;
const SET_OW = `mutation($i: SetChannelOverwriteInput!) { setChannelOverwrite(input: $i) { targetType targetId allow deny role { id } user { id } } }`;
const REMOVE_OW = `mutation($c: ID!, $t: ID!) { removeChannelOverwrite(channelId: $c, targetId: $t) }`;
const OVERWRITES = `query($id: ID!) { channel(id: $id) { overwrites { targetType targetId allow deny } } }`;

/** A guild with an owner, a moderator holding `modRole` (MANAGE_ROLES and more) and a member. */
async function setup() {
  const owner = await signUp(app);
  const mod = await signUp(app);
  const member = await signUp(app);
  const stranger = await signUp(app);
  const g = await makeGuild(owner);
  await join(mod, owner, g.id);
  await join(member, owner, g.id);
  const modRole = (
    await ok(
      app,
      CREATE,
      {
        i: {
          guildId: g.id,
          name: 'Mod',
          permissions: ['MANAGE_ROLES', 'MANAGE_CHANNELS', 'KICK_MEMBERS', 'VIEW_CHANNEL'],
        },
      },
      owner.token,
    )
  ).createRole;
  await ok(app, ASSIGN, { g: g.id, u: mod.id, r: modRole.id }, owner.token);
  const roles = await ok(app, ROLES, { id: g.id }, owner.token);
  const everyone = roles.guild.roles.find((r: any) => r.isEveryone).id as string;
  return { owner, mod, member, stranger, g, modRole, everyone };
}

describe('roles', () => {
  it('creates roles, ordered by position desc, with audit rows and events', async () => {
    const { owner, g } = await setup();
    const a = await ok(
      app,
      CREATE,
      {
        i: {
          guildId: g.id,
          name: ' Artist ',
          color: 0xff0000,
          permissions: ['ATTACH_FILES'],
          mentionable: true,
        },
      },
      owner.token,
    );
    assert.deepEqual(a.createRole, {
      id: a.createRole.id,
      name: 'Artist',
      color: 0xff0000,
      position: 1,
      permissions: ['ATTACH_FILES'],
      mentionable: true,
    });
    const top = await ok(app, CREATE, { i: { guildId: g.id, name: 'Top', position: 3 } }, owner.token);
    assert.equal(top.createRole.position, 3);
    const list = await ok(app, ROLES, { id: g.id }, owner.token);
    assert.deepEqual(
      list.guild.roles.map((r: any) => [r.name, r.position]),
      [
        ['Top', 3],
        ['Mod', 2],
        ['Artist', 1],
        ['@everyone', 0],
      ],
    );
    const audit = await rows(
      sql`select 1 from audit_log where guild_id = ${raw(g.id)}::uuid and action = 'ROLE_CREATE'`,
    );
    assert.equal(audit.length, 3);
    const ev = await rows(
      sql`select 1 from events where guild_id = ${raw(g.id)}::uuid and type = 'ROLE_CREATED'`,
    );
    assert.equal(ev.length, 3);
  });

  it('refuses bad input, strangers, members without MANAGE_ROLES, and over-reaching mods', async () => {
    const { owner, mod, member, stranger, g } = await setup();
    for (const i of [
      { guildId: g.id, name: '' },
      { guildId: g.id, name: 'x', color: -1 },
      { guildId: g.id, name: 'x', color: 0x1000000 },
      { guildId: g.id, name: 'x', position: 0 },
      { guildId: g.id, name: 'x', position: 99 },
      { guildId: g.general, name: 'x' },
    ]) {
      await fails(app, 'BAD_USER_INPUT', CREATE, { i }, owner.token);
    }
    await fails(app, 'NOT_FOUND', CREATE, { i: { guildId: g.id, name: 'x' } }, stranger.token);
    await fails(app, 'FORBIDDEN', CREATE, { i: { guildId: g.id, name: 'x' } }, member.token);
    await fails(app, 'UNAUTHENTICATED', CREATE, { i: { guildId: g.id, name: 'x' } });
    // The mod holds position 1 (Mod): creating at 2 would put the new role above it.
    await fails(app, 'FORBIDDEN', CREATE, { i: { guildId: g.id, name: 'x', position: 2 } }, mod.token);
    await fails(
      app,
      'FORBIDDEN',
      CREATE,
      { i: { guildId: g.id, name: 'x', permissions: ['BAN_MEMBERS'] } },
      mod.token,
    );
    await fails(
      app,
      'FORBIDDEN',
      CREATE,
      { i: { guildId: g.id, name: 'x', permissions: ['ADMINISTRATOR'] } },
      mod.token,
    );
    const roles = await ok(app, ROLES, { id: g.id }, owner.token);
    assert.equal(roles.guild.roles.length, 2);
    // Inserting at 1 pushes Mod up, so the new role is below the mod's.
    const ok1 = await ok(
      app,
      CREATE,
      { i: { guildId: g.id, name: 'Helper', permissions: ['KICK_MEMBERS'] } },
      mod.token,
    );
    assert.equal(ok1.createRole.position, 1);
    const after = await ok(app, ROLES, { id: g.id }, owner.token);
    assert.deepEqual(
      after.guild.roles.map((r: any) => r.name),
      ['Mod', 'Helper', '@everyone'],
    );
  });

  it('updates and moves roles within the hierarchy', async () => {
    const { owner, mod, member, stranger, g, modRole, everyone } = await setup();
    const low = (await ok(app, CREATE, { i: { guildId: g.id, name: 'Low' } }, owner.token)).createRole;
    const high = (await ok(app, CREATE, { i: { guildId: g.id, name: 'High', position: 3 } }, owner.token))
      .createRole;
    // Order now: High 3, Mod 2, Low 1.
    const u = await ok(
      app,
      UPDATE,
      { i: { id: low.id, name: 'Lower', color: 255, mentionable: true, permissions: ['KICK_MEMBERS'] } },
      mod.token,
    );
    assert.deepEqual(
      [u.updateRole.name, u.updateRole.color, u.updateRole.mentionable, u.updateRole.permissions],
      ['Lower', 255, true, ['KICK_MEMBERS']],
    );
    await fails(app, 'FORBIDDEN', UPDATE, { i: { id: modRole.id, name: 'Boss' } }, mod.token);
    await fails(app, 'FORBIDDEN', UPDATE, { i: { id: high.id, name: 'x' } }, mod.token);
    await fails(app, 'FORBIDDEN', UPDATE, { i: { id: low.id, position: 2 } }, mod.token);
    await fails(app, 'FORBIDDEN', UPDATE, { i: { id: low.id, permissions: ['BAN_MEMBERS'] } }, mod.token);
    await fails(app, 'FORBIDDEN', UPDATE, { i: { id: low.id, name: 'x' } }, member.token);
    await fails(app, 'NOT_FOUND', UPDATE, { i: { id: low.id, name: 'x' } }, stranger.token);
    await fails(app, 'BAD_USER_INPUT', UPDATE, { i: { id: low.id, name: ' ' } }, owner.token);
    await fails(app, 'BAD_USER_INPUT', UPDATE, { i: { id: low.id, position: 4 } }, owner.token);
    await fails(app, 'BAD_USER_INPUT', UPDATE, { i: { id: everyone, name: 'all' } }, owner.token);
    await fails(app, 'BAD_USER_INPUT', UPDATE, { i: { id: everyone, position: 2 } }, owner.token);
    await fails(app, 'BAD_USER_INPUT', UPDATE, { i: { id: g.id, name: 'x' } }, owner.token);
    // The mod may still drop a permission it lacks (removing is not granting).
    await ok(app, UPDATE, { i: { id: low.id, permissions: [] } }, mod.token);
    // The owner moves Low to the top: the others shift down, positions stay dense.
    await ok(app, UPDATE, { i: { id: low.id, position: 3 } }, owner.token);
    const list = await ok(app, ROLES, { id: g.id }, owner.token);
    assert.deepEqual(
      list.guild.roles.map((r: any) => [r.name, r.position]),
      [
        ['Lower', 3],
        ['High', 2],
        ['Mod', 1],
        ['@everyone', 0],
      ],
    );
    const names = await ok(
      app,
      `query($id: ID!) { guild(id: $id) { roles { name } } }`,
      { id: g.id },
      owner.token,
    );
    assert.equal(names.guild.roles.length, 4);
    const ev = await rows(
      sql`select 1 from events where guild_id = ${raw(g.id)}::uuid and type = 'ROLE_UPDATED'`,
    );
    assert.equal(ev.length, 3);
  });

  it('deletes roles below you; never @everyone', async () => {
    const { owner, mod, member, g, modRole, everyone } = await setup();
    const low = (await ok(app, CREATE, { i: { guildId: g.id, name: 'Low' } }, owner.token)).createRole;
    await ok(app, ASSIGN, { g: g.id, u: member.id, r: low.id }, owner.token);
    await fails(app, 'BAD_USER_INPUT', DELETE, { id: everyone }, owner.token);
    await fails(app, 'FORBIDDEN', DELETE, { id: modRole.id }, mod.token);
    await fails(app, 'FORBIDDEN', DELETE, { id: low.id }, member.token);
    assert.equal((await ok(app, DELETE, { id: low.id }, mod.token)).deleteRole, low.id);
    await fails(app, 'NOT_FOUND', DELETE, { id: low.id }, owner.token);
    const list = await ok(app, ROLES, { id: g.id }, owner.token);
    assert.deepEqual(
      list.guild.roles.map((r: any) => [r.name, r.position]),
      [
        ['Mod', 1],
        ['@everyone', 0],
      ],
    );
    const held = await rows(sql`select 1 from member_roles where role_id = ${raw(low.id)}::uuid`);
    assert.equal(held.length, 0);
    const ev = await rows(
      sql`select 1 from events where guild_id = ${raw(g.id)}::uuid and type = 'ROLE_DELETED'`,
    );
    assert.equal(ev.length, 1);
  });

  it('assigns and unassigns roles below you to members', async () => {
    const { owner, mod, member, stranger, g, modRole, everyone } = await setup();
    const low = (await ok(app, CREATE, { i: { guildId: g.id, name: 'Low' } }, owner.token)).createRole;
    assert.equal((await ok(app, ASSIGN, { g: g.id, u: member.id, r: low.id }, mod.token)).assignRole, true);
    assert.equal((await ok(app, ASSIGN, { g: g.id, u: member.id, r: low.id }, mod.token)).assignRole, true);
    await fails(app, 'FORBIDDEN', ASSIGN, { g: g.id, u: member.id, r: modRole.id }, mod.token);
    await fails(app, 'FORBIDDEN', ASSIGN, { g: g.id, u: member.id, r: low.id }, member.token);
    await fails(app, 'BAD_USER_INPUT', ASSIGN, { g: g.id, u: member.id, r: everyone }, owner.token);
    await fails(app, 'NOT_FOUND', ASSIGN, { g: g.id, u: stranger.id, r: low.id }, owner.token);
    await fails(app, 'NOT_FOUND', ASSIGN, { g: g.id, u: member.id, r: low.id }, stranger.token);
    const other = await makeGuild(stranger);
    const foreign = (await ok(app, CREATE, { i: { guildId: other.id, name: 'F' } }, stranger.token))
      .createRole;
    await fails(app, 'NOT_FOUND', ASSIGN, { g: g.id, u: member.id, r: foreign.id }, owner.token);
    const m = await ok(
      app,
      `query($id: ID!) { guild(id: $id) { members { edges { node { user { id } roles { name } } } } } }`,
      { id: g.id },
      owner.token,
    );
    const mine = m.guild.members.edges.find((e: any) => e.node.user.id === member.id).node;
    assert.deepEqual(mine.roles, [{ name: 'Low' }]);
    await fails(app, 'FORBIDDEN', UNASSIGN, { g: g.id, u: mod.id, r: modRole.id }, mod.token);
    assert.equal(
      (await ok(app, UNASSIGN, { g: g.id, u: member.id, r: low.id }, mod.token)).unassignRole,
      true,
    );
    const held = await rows(sql`select 1 from member_roles where role_id = ${raw(low.id)}::uuid`);
    assert.equal(held.length, 0);
    const audit = await rows(
      sql`select 1 from audit_log where guild_id = ${raw(g.id)}::uuid and action = 'MEMBER_ROLE_UPDATE'`,
    );
    assert.equal(audit.length, 3);
  });
});

describe('channel overwrites', () => {
  it('sets, lists and removes overwrites with MANAGE_ROLES, within your own permissions', async () => {
    const { owner, mod, member, stranger, g, modRole, everyone } = await setup();
    const d = await ok(
      app,
      SET_OW,
      {
        i: {
          channelId: g.general,
          targetType: 'ROLE',
          targetId: everyone,
          allow: [],
          deny: ['SEND_MESSAGES'],
        },
      },
      mod.token,
    );
    assert.deepEqual(d.setChannelOverwrite, {
      targetType: 'ROLE',
      targetId: everyone,
      allow: [],
      deny: ['SEND_MESSAGES'],
      role: { id: everyone },
      user: null,
    });
    const p = await ok(
      app,
      `query($id: ID!) { channel(id: $id) { viewerPermissions } }`,
      { id: g.general },
      member.token,
    );
    assert.ok(!p.channel.viewerPermissions.includes('SEND_MESSAGES'));
    const mine = await ok(
      app,
      SET_OW,
      {
        i: {
          channelId: g.general,
          targetType: 'MEMBER',
          targetId: member.id,
          allow: ['SEND_MESSAGES'],
          deny: [],
        },
      },
      owner.token,
    );
    assert.deepEqual(mine.setChannelOverwrite.user, { id: member.id });
    const p2 = await ok(
      app,
      `query($id: ID!) { channel(id: $id) { viewerPermissions } }`,
      { id: g.general },
      member.token,
    );
    assert.ok(p2.channel.viewerPermissions.includes('SEND_MESSAGES'));
    const list = await ok(app, OVERWRITES, { id: g.general }, mod.token);
    assert.equal(list.channel.overwrites.length, 2);
    await fails(app, 'FORBIDDEN', OVERWRITES, { id: g.general }, member.token);

    const I = (x: Record<string, unknown>) => ({
      i: { channelId: g.general, targetType: 'ROLE', targetId: everyone, allow: [], deny: [], ...x },
    });
    await fails(app, 'FORBIDDEN', SET_OW, I({ deny: ['READ_HISTORY'] }), member.token);
    await fails(app, 'NOT_FOUND', SET_OW, I({ deny: ['READ_HISTORY'] }), stranger.token);
    await fails(app, 'FORBIDDEN', SET_OW, I({ allow: ['BAN_MEMBERS'] }), mod.token);
    await fails(app, 'FORBIDDEN', SET_OW, I({ targetId: modRole.id, deny: ['VIEW_CHANNEL'] }), mod.token);
    await fails(
      app,
      'BAD_USER_INPUT',
      SET_OW,
      I({ allow: ['SEND_MESSAGES'], deny: ['SEND_MESSAGES'] }),
      owner.token,
    );
    await fails(app, 'BAD_USER_INPUT', SET_OW, I({ targetType: 'MEMBER' }), owner.token);
    await fails(app, 'NOT_FOUND', SET_OW, I({ targetType: 'MEMBER', targetId: stranger.id }), owner.token);
    const other = await makeGuild(stranger);
    const foreign = (await ok(app, CREATE, { i: { guildId: other.id, name: 'F' } }, stranger.token))
      .createRole;
    await fails(app, 'NOT_FOUND', SET_OW, I({ targetId: foreign.id }), owner.token);
    const unchanged = await ok(app, OVERWRITES, { id: g.general }, owner.token);
    assert.deepEqual(unchanged.channel.overwrites.find((o: any) => o.targetId === everyone).deny, [
      'SEND_MESSAGES',
    ]);

    await fails(app, 'FORBIDDEN', REMOVE_OW, { c: g.general, t: everyone }, member.token);
    await fails(app, 'BAD_USER_INPUT', REMOVE_OW, { c: g.general, t: g.id }, owner.token);
    assert.equal(
      (await ok(app, REMOVE_OW, { c: g.general, t: everyone }, mod.token)).removeChannelOverwrite,
      true,
    );
    await fails(app, 'NOT_FOUND', REMOVE_OW, { c: g.general, t: everyone }, mod.token);
    await ok(app, REMOVE_OW, { c: g.general, t: member.id }, owner.token);
    const ev = await rows(
      sql`select 1 from events where guild_id = ${raw(g.id)}::uuid and type = 'PERMISSIONS_CHANGED'`,
    );
    assert.equal(ev.length, 4);
    const audit = await rows(
      sql`select action from audit_log where guild_id = ${raw(g.id)}::uuid and action like 'CHANNEL_OVERWRITE_%'`,
    );
    assert.equal(audit.length, 4);
  });

  it('applies category overwrites to the channels inside', async () => {
    const { owner, member, g, everyone } = await setup();
    const cat = await ok(
      app,
      `mutation($g: ID!) { createChannel(input: { guildId: $g, name: "Staff", type: CATEGORY }) { id } }`,
      { g: g.id },
      owner.token,
    );
    const inside = await ok(
      app,
      `mutation($g: ID!, $p: ID!) { createChannel(input: { guildId: $g, name: "staff-chat", type: TEXT, parentId: $p }) { id } }`,
      { g: g.id, p: cat.createChannel.id },
      owner.token,
    );
    await ok(
      app,
      SET_OW,
      {
        i: {
          channelId: cat.createChannel.id,
          targetType: 'ROLE',
          targetId: everyone,
          allow: [],
          deny: ['VIEW_CHANNEL'],
        },
      },
      owner.token,
    );
    const seen = await ok(
      app,
      `query($id: ID!) { guild(id: $id) { channels { id } } }`,
      { id: g.id },
      member.token,
    );
    assert.deepEqual(
      seen.guild.channels.map((c: any) => c.id),
      [g.general],
    );
    await fails(
      app,
      'NOT_FOUND',
      `query($id: ID!) { channel(id: $id) { id } }`,
      { id: inside.createChannel.id },
      member.token,
    );
  });
});

describe('hierarchy on members', () => {
  /** mod (Mod, position 2 after Peer is created below it) and peer/junior at or below them. */
  async function ranks() {
    const s = await setup();
    const peer = await signUp(app);
    const junior = await signUp(app);
    await join(peer, s.owner, s.g.id);
    await join(junior, s.owner, s.g.id);
    // Same top role as the moderator: an equal.
    await ok(app, ASSIGN, { g: s.g.id, u: peer.id, r: s.modRole.id }, s.owner.token);
    const low = (await ok(app, CREATE, { i: { guildId: s.g.id, name: 'Low' } }, s.owner.token)).createRole;
    await ok(app, ASSIGN, { g: s.g.id, u: junior.id, r: low.id }, s.owner.token);
    return { ...s, peer, junior, low };
  }
  const memberRoleCount = async (u: TestUser) =>
    (await rows(sql`select 1 from member_roles where user_id = ${raw(u.id)}::uuid`)).length;
  const overwriteCount = async (channel: string) =>
    (await rows(sql`select 1 from permission_overwrites where channel_id = ${raw(channel)}::uuid`)).length;

  it('assignRole/unassignRole refuse members at or above you, the owner, and yourself', async () => {
    const { owner, mod, peer, junior, member, g, low } = await ranks();
    const before = await rows(sql`select 1 from audit_log where guild_id = ${raw(g.id)}::uuid`);
    for (const target of [peer, owner, mod]) {
      await fails(app, 'FORBIDDEN', ASSIGN, { g: g.id, u: target.id, r: low.id }, mod.token);
    }
    await fails(app, 'FORBIDDEN', UNASSIGN, { g: g.id, u: peer.id, r: low.id }, mod.token);
    assert.equal(await memberRoleCount(peer), 1);
    assert.equal(await memberRoleCount(mod), 1);
    // Taking a role off yourself can lift a deny (a muting role), so it is refused too.
    await ok(app, ASSIGN, { g: g.id, u: mod.id, r: low.id }, owner.token);
    await fails(app, 'FORBIDDEN', UNASSIGN, { g: g.id, u: mod.id, r: low.id }, mod.token);
    assert.equal(await memberRoleCount(mod), 2);
    const after = await rows(sql`select 1 from audit_log where guild_id = ${raw(g.id)}::uuid`);
    assert.equal(after.length, before.length + 1);
    // Below you (a lower role, or only @everyone): allowed both ways.
    assert.equal(
      (await ok(app, UNASSIGN, { g: g.id, u: junior.id, r: low.id }, mod.token)).unassignRole,
      true,
    );
    assert.equal((await ok(app, ASSIGN, { g: g.id, u: member.id, r: low.id }, mod.token)).assignRole, true);
    // The owner outranks everyone, themselves included.
    assert.equal((await ok(app, ASSIGN, { g: g.id, u: owner.id, r: low.id }, owner.token)).assignRole, true);
    assert.equal(
      (await ok(app, UNASSIGN, { g: g.id, u: peer.id, r: low.id }, owner.token)).unassignRole,
      true,
    );
  });

  it('member overwrites (set and remove) refuse members at or above you, the owner, and yourself', async () => {
    const { owner, mod, peer, junior, g } = await ranks();
    const set = (target: TestUser, allow: string[] = [], deny: string[] = ['SEND_MESSAGES']) => ({
      i: { channelId: g.general, targetType: 'MEMBER', targetId: target.id, allow, deny },
    });
    for (const target of [peer, owner, mod]) {
      await fails(app, 'FORBIDDEN', SET_OW, set(target), mod.token);
    }
    assert.equal(await overwriteCount(g.general), 0);
    // Below you: allowed, set and removed.
    assert.equal((await ok(app, SET_OW, set(junior), mod.token)).setChannelOverwrite.user.id, junior.id);
    assert.equal(
      (await ok(app, REMOVE_OW, { c: g.general, t: junior.id }, mod.token)).removeChannelOverwrite,
      true,
    );
    // A deny the owner put on the moderator stays: neither replaced by an empty one nor removed.
    await ok(app, SET_OW, set(mod), owner.token);
    await fails(app, 'FORBIDDEN', SET_OW, set(mod, [], []), mod.token);
    await fails(app, 'FORBIDDEN', REMOVE_OW, { c: g.general, t: mod.id }, mod.token);
    await ok(app, SET_OW, set(peer), owner.token);
    await fails(app, 'FORBIDDEN', REMOVE_OW, { c: g.general, t: peer.id }, mod.token);
    const kept = await rows<{ deny: string }>(
      sql`select deny::text from permission_overwrites where channel_id = ${raw(g.general)}::uuid`,
    );
    assert.deepEqual(
      kept.map((r) => r.deny),
      ['2', '2'],
    );
    // A user who left holds no roles: their leftover overwrite can be cleaned up.
    await ok(app, SET_OW, set(junior), owner.token);
    await rows(sql`delete from members where user_id = ${raw(junior.id)}::uuid`);
    assert.equal(
      (await ok(app, REMOVE_OW, { c: g.general, t: junior.id }, mod.token)).removeChannelOverwrite,
      true,
    );
    // The owner may act on anyone, themselves included.
    assert.equal(
      (await ok(app, REMOVE_OW, { c: g.general, t: mod.id }, owner.token)).removeChannelOverwrite,
      true,
    );
    assert.equal(
      (await ok(app, SET_OW, set(owner, ['SEND_MESSAGES'], []), owner.token)).setChannelOverwrite.user.id,
      owner.id,
    );
  });
});
