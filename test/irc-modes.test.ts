/**
 * IRC channel modes are not a separate feature in Banter: each one is a permission setting.
 * These tests show each mode with the mutations a guild admin would use.
 */
import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import { createTestApp, fails, ok, signUp, type TestApp, type TestUser } from './helpers.ts';

let app: TestApp;
before(async () => {
  app = await createTestApp();
});
after(() => app.destroy());

const CREATE_ROLE = `mutation($i: CreateRoleInput!) { createRole(input: $i) { id } }`;
const UPDATE_ROLE = `mutation($i: UpdateRoleInput!) { updateRole(input: $i) { id } }`;
const ASSIGN = `mutation($g: ID!, $u: ID!, $r: ID!) { assignRole(guildId: $g, userId: $u, roleId: $r) }`;
const SET_OW = `mutation($i: SetChannelOverwriteInput!) { setChannelOverwrite(input: $i) { targetId } }`;
const INVITE = `mutation($g: ID!) { createInvite(input: { guildId: $g }) { code } }`;
const PERMS = `query($id: ID!) { channel(id: $id) { viewerPermissions } }`;
const SEND = `mutation($c: ID!, $t: String!) { sendMessage(input: { channelId: $c, content: $t }) { id } }`;

/** A guild with an owner, an operator-like user holding `role` and a plain member. */
async function setup() {
  const owner = await signUp(app);
  const op = await signUp(app);
  const member = await signUp(app);
  const g = await ok(
    app,
    `mutation { createGuild(input: { name: "#irc" }) { id channels { id } roles { id isEveryone } } }`,
    {},
    owner.token,
  );
  const guildId = g.createGuild.id as string;
  const general = g.createGuild.channels[0].id as string;
  const everyone = g.createGuild.roles.find((r: any) => r.isEveryone).id as string;
  for (const u of [op, member]) {
    const code = (await ok(app, INVITE, { g: guildId }, owner.token)).createInvite.code;
    await ok(app, `mutation($c: String!) { joinGuild(code: $c) { id } }`, { c: code }, u.token);
  }
  return { owner, op, member, guildId, general, everyone };
}

async function giveRole(
  owner: TestUser,
  guildId: string,
  user: TestUser,
  name: string,
  permissions: string[],
) {
  const r = (await ok(app, CREATE_ROLE, { i: { guildId, name, permissions } }, owner.token)).createRole.id;
  await ok(app, ASSIGN, { g: guildId, u: user.id, r }, owner.token);
  return r as string;
}

describe('IRC modes as permissions', () => {
  it('+i invite-only: deny CREATE_INVITE to @everyone; a mod role can still invite', async () => {
    const { owner, op, member, guildId, everyone } = await setup();
    await giveRole(owner, guildId, op, 'Mod', ['CREATE_INVITE']);
    await ok(
      app,
      UPDATE_ROLE,
      { i: { id: everyone, permissions: ['VIEW_CHANNEL', 'SEND_MESSAGES', 'READ_HISTORY'] } },
      owner.token,
    );
    await fails(app, 'FORBIDDEN', INVITE, { g: guildId }, member.token);
    const code = (await ok(app, INVITE, { g: guildId }, op.token)).createInvite.code;
    const guest = await signUp(app);
    await ok(app, `mutation($c: String!) { joinGuild(code: $c) { id } }`, { c: code }, guest.token);
  });

  it('+m moderated: deny SEND_MESSAGES to @everyone in a channel, allow a Voice role', async () => {
    const { owner, op, member, guildId, general, everyone } = await setup();
    const voice = (await ok(app, CREATE_ROLE, { i: { guildId, name: 'Voice' } }, owner.token)).createRole.id;
    await ok(app, ASSIGN, { g: guildId, u: op.id, r: voice }, owner.token);
    await ok(
      app,
      SET_OW,
      {
        i: { channelId: general, targetType: 'ROLE', targetId: everyone, allow: [], deny: ['SEND_MESSAGES'] },
      },
      owner.token,
    );
    await ok(
      app,
      SET_OW,
      { i: { channelId: general, targetType: 'ROLE', targetId: voice, allow: ['SEND_MESSAGES'], deny: [] } },
      owner.token,
    );
    const m = await ok(app, PERMS, { id: general }, member.token);
    assert.ok(m.channel.viewerPermissions.includes('VIEW_CHANNEL'));
    assert.ok(!m.channel.viewerPermissions.includes('SEND_MESSAGES'));
    const v = await ok(app, PERMS, { id: general }, op.token);
    assert.ok(v.channel.viewerPermissions.includes('SEND_MESSAGES'));
    await fails(app, 'FORBIDDEN', SEND, { c: general, t: 'hello?' }, member.token);
    await ok(app, SEND, { c: general, t: 'I have voice' }, op.token);
  });

  it('+s secret: deny VIEW_CHANNEL to @everyone; only a role member sees the channel', async () => {
    const { owner, op, member, guildId, everyone } = await setup();
    const secret = (
      await ok(
        app,
        `mutation($g: ID!) { createChannel(input: { guildId: $g, name: "ops", type: TEXT }) { id } }`,
        { g: guildId },
        owner.token,
      )
    ).createChannel.id;
    const ops = (await ok(app, CREATE_ROLE, { i: { guildId, name: 'Ops' } }, owner.token)).createRole.id;
    await ok(app, ASSIGN, { g: guildId, u: op.id, r: ops }, owner.token);
    await ok(
      app,
      SET_OW,
      { i: { channelId: secret, targetType: 'ROLE', targetId: everyone, allow: [], deny: ['VIEW_CHANNEL'] } },
      owner.token,
    );
    await ok(
      app,
      SET_OW,
      { i: { channelId: secret, targetType: 'ROLE', targetId: ops, allow: ['VIEW_CHANNEL'], deny: [] } },
      owner.token,
    );
    const LIST = `query($id: ID!) { guild(id: $id) { channels { id } } }`;
    const seen = await ok(app, LIST, { id: guildId }, member.token);
    assert.ok(!seen.guild.channels.some((c: any) => c.id === secret));
    await fails(
      app,
      'NOT_FOUND',
      `query($id: ID!) { channel(id: $id) { id name } }`,
      { id: secret },
      member.token,
    );
    await fails(app, 'NOT_FOUND', SEND, { c: secret, t: 'knock' }, member.token);
    const opSees = await ok(app, LIST, { id: guildId }, op.token);
    assert.ok(opSees.guild.channels.some((c: any) => c.id === secret));
    const c = await ok(app, `query($id: ID!) { channel(id: $id) { name } }`, { id: secret }, op.token);
    assert.equal(c.channel.name, 'ops');
  });

  it('+t topic lock: changing the topic needs MANAGE_CHANNELS', async () => {
    const { owner, op, member, guildId, general } = await setup();
    await giveRole(owner, guildId, op, 'Chanop', ['MANAGE_CHANNELS']);
    const TOPIC = `mutation($c: ID!, $t: String) { updateChannel(input: { id: $c, topic: $t }) { topic } }`;
    await fails(app, 'FORBIDDEN', TOPIC, { c: general, t: 'mine now' }, member.token);
    const d = await ok(app, TOPIC, { c: general, t: 'set by chanop' }, op.token);
    assert.equal(d.updateChannel.topic, 'set by chanop');
    const m = await ok(app, PERMS, { id: general }, member.token);
    assert.ok(!m.channel.viewerPermissions.includes('MANAGE_CHANNELS'));
  });
});
