/**
 * Fixes from the API review: links to channels the viewer cannot see, batched guild list fields,
 * input bounds checked before any work, and malformed ids or cursors refused as BAD_USER_INPUT.
 */
import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import { and, eq } from 'drizzle-orm';
import { GraphQLNonNull } from 'graphql';
import { roles } from '../core/db/tables.ts';
import { Permission } from '../core/permissions.ts';
import { encodeId } from '../schema/builder.ts';
import { buildSchema } from '../schema/index.ts';
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
import { addMember, addRole, type GuildFixture, overwrite, setupGuild, uuidOf } from './message-fixtures.ts';

let app: TestApp;
before(async () => {
  app = await createTestApp();
});
after(() => app.destroy());

const MB = 'x'.repeat(1_000_000);
const CREATE_CHANNEL = `mutation($i: CreateChannelInput!) { createChannel(input: $i) { id } }`;

async function everyoneRole(guildId: string): Promise<string> {
  const [r] = await app.deps.db
    .select({ id: roles.id })
    .from(roles)
    .where(and(eq(roles.guildId, uuidOf(guildId)), eq(roles.isEveryone, true)));
  return r.id;
}

async function channelIn(g: GuildFixture, type: string, parentId?: string): Promise<string> {
  const d = await ok(
    app,
    CREATE_CHANNEL,
    { i: { guildId: g.guildId, name: type.toLowerCase(), type, ...(parentId ? { parentId } : {}) } },
    g.owner.token,
  );
  return d.createChannel.id;
}

describe('links to hidden channels', () => {
  let g: GuildFixture;
  let member: TestUser;
  let category: string;
  let child: string;
  before(async () => {
    g = await setupGuild(app);
    member = await signUp(app);
    await addMember(app, g.guildId, member);
    const everyone = await everyoneRole(g.guildId);
    category = await channelIn(g, 'CATEGORY');
    child = await channelIn(g, 'TEXT', category);
    // The category is hidden from @everyone; the channel inside it is shown again.
    await overwrite(app, category, { roleId: everyone }, 0n, Permission.VIEW_CHANNEL);
    await overwrite(app, child, { roleId: everyone }, Permission.VIEW_CHANNEL, 0n);
  });

  it('Channel.parent is null when the viewer cannot see the category, its id otherwise', async () => {
    const Q = `query($id: ID!) { channel(id: $id) { id parent { id name } } }`;
    await fails(
      app,
      'NOT_FOUND',
      `query($id: ID!) { channel(id: $id) { id } }`,
      { id: category },
      member.token,
    );
    const m = await ok(app, Q, { id: child }, member.token);
    assert.equal(m.channel.id, child);
    assert.equal(m.channel.parent, null);
    const o = await ok(app, Q, { id: child }, g.owner.token);
    assert.equal(o.channel.parent.id, category);
  });

  it('Guild.channels lists the visible child without revealing its hidden category', async () => {
    const Q = `query($id: ID!) { guild(id: $id) { channels { id parent { id } } } }`;
    const d = await ok(app, Q, { id: g.guildId }, member.token);
    const ids = d.guild.channels.map((c: any) => c.id);
    assert.ok(ids.includes(child));
    assert.ok(!ids.includes(category));
    assert.equal(d.guild.channels.find((c: any) => c.id === child).parent, null);
  });

  it('Invite.channel is null for a MANAGE_GUILD holder who cannot see the channel', async () => {
    const secret = await channelIn(g, 'TEXT');
    const everyone = await everyoneRole(g.guildId);
    await overwrite(app, secret, { roleId: everyone }, 0n, Permission.VIEW_CHANNEL);
    const INVITE = `mutation($i: CreateInviteInput!) { createInvite(input: $i) { code channel { id } } }`;
    const toSecret = await ok(app, INVITE, { i: { guildId: g.guildId, channelId: secret } }, g.owner.token);
    assert.equal(toSecret.createInvite.channel.id, secret);
    const toGeneral = await ok(
      app,
      INVITE,
      { i: { guildId: g.guildId, channelId: g.channelId } },
      g.owner.token,
    );
    const manager = await signUp(app);
    await addMember(app, g.guildId, manager);
    await addRole(app, g.guildId, {
      name: 'managers',
      permissions: Permission.MANAGE_GUILD,
      users: [manager],
    });
    const d = await ok(
      app,
      `query($id: ID!) { guild(id: $id) { invites { code channel { id } } } }`,
      { id: g.guildId },
      manager.token,
    );
    const byCode = new Map(d.guild.invites.map((i: any) => [i.code, i.channel]));
    assert.equal(byCode.get(toSecret.createInvite.code), null);
    assert.deepEqual(byCode.get(toGeneral.createInvite.code), { id: g.channelId });
  });
});

describe('Viewer.guilds costs a fixed number of statements', () => {
  const Q = `{ viewer { guilds { id viewerPermissions roles { id name } channels { id parent { id } viewerPermissions } } } }`;

  async function statements(token: string): Promise<{ n: number; guilds: any[] }> {
    const { n, result: d } = await statementsOf(app, () => ok(app, Q, {}, token));
    return { n, guilds: d.viewer.guilds };
  }

  it('whatever the number of guilds, with the same answers as the per-guild queries', async () => {
    const u = await signUp(app);
    const make = async () => {
      const d = await ok(app, `mutation { createGuild(input: { name: "N" }) { id } }`, {}, u.token);
      const g = { owner: u, guildId: d.createGuild.id, channelId: '' };
      const cat = await channelIn(g, 'CATEGORY');
      await channelIn(g, 'TEXT', cat);
    };
    await make();
    await make();
    const two = await statements(u.token);
    for (let i = 0; i < 4; i++) await make();
    const six = await statements(u.token);
    assert.equal(two.guilds.length, 2);
    assert.equal(six.guilds.length, 6);
    assert.equal(six.n, two.n, `2 guilds: ${two.n} statements, 6 guilds: ${six.n}`);
    for (const g of six.guilds) {
      assert.equal(g.channels.length, 3);
      assert.equal(g.roles.length, 1);
      assert.ok(g.viewerPermissions.includes('ADMINISTRATOR'));
      assert.equal(g.channels.filter((c: any) => c.parent).length, 1);
    }
  });

  it('Guild.roles and viewerPermissions stay NOT_FOUND for strangers', async () => {
    const g = await setupGuild(app);
    const stranger = await signUp(app);
    await fails(
      app,
      'NOT_FOUND',
      `query($id: ID!) { guild(id: $id) { roles { id } } }`,
      { id: g.guildId },
      stranger.token,
    );
    // Reaching a guild through another path must not open it: node(id) answers as guild(id).
    await fails(
      app,
      'NOT_FOUND',
      `query($id: ID!) { node(id: $id) { ... on Guild { channels { id } roles { id } viewerPermissions } } }`,
      { id: g.guildId },
      stranger.token,
    );
  });
});

describe('Channel.viewerPermissions in lists', () => {
  it('Viewer.directChannels costs the same for 2 and 5 DMs, with the per-channel answers', async () => {
    const u = await signUp(app);
    const Q = `{ viewer { directChannels { id viewerPermissions unreadCount } } }`;
    const open = async () => {
      const other = await signUp(app);
      await ok(
        app,
        `mutation($ids: [ID!]!) { openDirectChannel(userIds: $ids) { id } }`,
        { ids: [other.id] },
        u.token,
      );
    };
    const cost = async () => {
      const { n, result: d } = await statementsOf(app, () => ok(app, Q, {}, u.token));
      return { n, list: d.viewer.directChannels };
    };
    await open();
    await open();
    const two = await cost();
    for (let i = 0; i < 3; i++) await open();
    const five = await cost();
    assert.equal(five.list.length, 5);
    assert.equal(five.n, two.n, `2 DMs: ${two.n} statements, 5 DMs: ${five.n}`);
    const one = await ok(
      app,
      `query($id: ID!) { channel(id: $id) { viewerPermissions } }`,
      { id: five.list[0].id },
      u.token,
    );
    assert.deepEqual(five.list[0].viewerPermissions, one.channel.viewerPermissions);
    assert.ok(one.channel.viewerPermissions.includes('SEND_MESSAGES'));
  });

  it('a guild channel reached through a message answers as channel(id) does', async () => {
    const g = await setupGuild(app);
    const member = await signUp(app);
    await addMember(app, g.guildId, member);
    const everyone = await everyoneRole(g.guildId);
    await overwrite(app, g.channelId, { roleId: everyone }, 0n, Permission.SEND_MESSAGES);
    const sent = await ok(
      app,
      `mutation($i: SendMessageInput!) { sendMessage(input: $i) { id } }`,
      { i: { channelId: g.channelId, content: 'hi' } },
      g.owner.token,
    );
    const viaMessage = await ok(
      app,
      `query($id: ID!) { message(id: $id) { channel { viewerPermissions } } }`,
      { id: sent.sendMessage.id },
      member.token,
    );
    const direct = await ok(
      app,
      `query($id: ID!) { channel(id: $id) { viewerPermissions } }`,
      { id: g.channelId },
      member.token,
    );
    assert.deepEqual(viaMessage.message.channel.viewerPermissions, direct.channel.viewerPermissions);
    assert.ok(!direct.channel.viewerPermissions.includes('SEND_MESSAGES'));
    assert.ok(direct.channel.viewerPermissions.includes('VIEW_CHANNEL'));
  });
});

describe('input bounds and malformed values', () => {
  it('1 MB strings are BAD_USER_INPUT on register, login, profile, sessions', async () => {
    const u = await signUp(app);
    const REGISTER = `mutation($i: RegisterInput!) { register(input: $i) { accessToken } }`;
    for (const i of [
      { username: MB, email: 'a@b.test', password: 'correct horse battery' },
      { username: 'fine_name', email: MB, password: 'correct horse battery' },
      { username: 'fine_name', email: 'a@b.test', password: MB },
    ]) {
      await fails(app, 'BAD_USER_INPUT', REGISTER, { i });
    }
    await fails(app, 'BAD_USER_INPUT', `mutation($i: LoginInput!) { login(input: $i) { accessToken } }`, {
      i: { login: MB, password: 'x' },
    });
    for (const field of ['displayName', 'bio', 'avatarUrl']) {
      await fails(
        app,
        'BAD_USER_INPUT',
        `mutation($i: UpdateProfileInput!) { updateProfile(input: $i) { id } }`,
        { i: { [field]: MB } },
        u.token,
      );
    }
    await fails(
      app,
      'BAD_USER_INPUT',
      `mutation($id: String!) { revokeSession(id: $id) }`,
      { id: MB },
      u.token,
    );
    // Nothing was written: the profile is untouched and the session still works.
    const me = await ok(
      app,
      '{ viewer { user { displayName bio avatarUrl } sessions { id } } }',
      {},
      u.token,
    );
    assert.deepEqual(me.viewer.user, { displayName: null, bio: null, avatarUrl: null });
    assert.equal(me.viewer.sessions.length, 1);
  });

  it('updateProfile still clears with null under the new bounds', async () => {
    const u = await signUp(app);
    const UPDATE = `mutation($i: UpdateProfileInput!) { updateProfile(input: $i) { displayName bio } }`;
    await ok(app, UPDATE, { i: { displayName: 'Ada', bio: 'hi' } }, u.token);
    const d = await ok(app, UPDATE, { i: { displayName: null, bio: null } }, u.token);
    assert.deepEqual(d.updateProfile, { displayName: null, bio: null });
  });

  it('revokeSession with a malformed id is BAD_USER_INPUT (not a masked error); unknown is NOT_FOUND', async () => {
    const u = await signUp(app);
    const R = `mutation($id: String!) { revokeSession(id: $id) }`;
    await fails(app, 'BAD_USER_INPUT', R, { id: 'not-a-session' }, u.token);
    await fails(app, 'NOT_FOUND', R, { id: '0190a0a0-0000-7000-8000-000000000000' }, u.token);
    await fails(app, 'UNAUTHENTICATED', R, { id: 'not-a-session' });
    await ok(app, '{ viewer { user { id } } }', {}, u.token);
  });

  it('Guild.members refuses forged cursors with BAD_USER_INPUT', async () => {
    const g = await setupGuild(app);
    const Q = `query($id: ID!, $a: String) { guild(id: $id) { members(first: 1, after: $a) { edges { cursor } } } }`;
    const real = await ok(app, Q, { id: g.guildId }, g.owner.token);
    const cursor = real.guild.members.edges[0].cursor;
    const [joined, userId] = JSON.parse(Buffer.from(cursor, 'base64url').toString());
    await ok(app, Q, { id: g.guildId, a: cursor }, g.owner.token);
    const forge = (v: unknown) => Buffer.from(JSON.stringify(v)).toString('base64url');
    for (const bad of [
      forge(['1', userId]),
      forge([joined, '------------------------------------']),
      forge(['2024-02-31 00:00:00+00', userId]),
      forge([joined, 5]),
      'x'.repeat(300),
      '!!!',
    ]) {
      await fails(app, 'BAD_USER_INPUT', Q, { id: g.guildId, a: bad }, g.owner.token);
    }
  });

  it('ids of another type are BAD_USER_INPUT on guild and channel', async () => {
    const u = await signUp(app);
    await fails(app, 'BAD_USER_INPUT', `query($id: ID!) { guild(id: $id) { id } }`, { id: u.id }, u.token);
    await fails(
      app,
      'BAD_USER_INPUT',
      `query($id: ID!) { channel(id: $id) { id } }`,
      { id: encodeId('Guild', uuidOf(u.id)) },
      u.token,
    );
  });
});

describe('contract shapes', () => {
  it('guild(id) and channel(id) are nullable as CONTRACT.md has them (hidden still NOT_FOUND)', async () => {
    const q = buildSchema().getQueryType()!.getFields();
    assert.ok(!(q.guild.type instanceof GraphQLNonNull));
    assert.ok(!(q.channel.type instanceof GraphQLNonNull));
    const g = await setupGuild(app);
    const stranger = await signUp(app);
    const r = await gql(
      app,
      `query($id: ID!) { guild(id: $id) { id } }`,
      { id: g.guildId },
      { token: stranger.token },
    );
    assert.equal(r.errors?.[0]?.extensions?.code, 'NOT_FOUND');
    assert.equal(r.data?.guild ?? null, null);
  });
});
