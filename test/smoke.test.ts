import assert from 'node:assert/strict';
import { after, before, it } from 'node:test';
import { createTestApp, fails, ok, signUp, type TestApp } from './helpers.ts';

let app: TestApp;
before(async () => {
  app = await createTestApp();
});
after(() => app.destroy());

it('creates a guild with #general, and a stranger cannot see it', async () => {
  const owner = await signUp(app);
  const stranger = await signUp(app);
  const g = await ok(
    app,
    `mutation { createGuild(input: { name: "Cats" }) { id name owner { id } channels { id name type } } }`,
    {},
    owner.token,
  );
  assert.equal(g.createGuild.name, 'Cats');
  assert.equal(g.createGuild.owner.id, owner.id);
  assert.deepEqual(
    g.createGuild.channels.map((c: any) => c.name),
    ['general'],
  );
  const c = await ok(
    app,
    `mutation($g: ID!) { createChannel(input: { guildId: $g, name: "memes", type: TEXT }) { id name guild { id } } }`,
    { g: g.createGuild.id },
    owner.token,
  );
  assert.equal(c.createChannel.guild.id, g.createGuild.id);
  await fails(
    app,
    'NOT_FOUND',
    `query($id: ID!) { guild(id: $id) { id } }`,
    { id: g.createGuild.id },
    stranger.token,
  );
  await fails(
    app,
    'NOT_FOUND',
    `query($id: ID!) { channel(id: $id) { id } }`,
    { id: c.createChannel.id },
    stranger.token,
  );
  await fails(
    app,
    'BAD_USER_INPUT',
    `query($id: ID!) { channel(id: $id) { id } }`,
    { id: g.createGuild.id },
    owner.token,
  );
  await fails(
    app,
    'BAD_USER_INPUT',
    `query($id: ID!) { channel(id: $id) { id } }`,
    { id: 'nope' },
    owner.token,
  );
  const info = await ok(app, '{ serverInfo { name version features } }');
  assert.equal(info.serverInfo.name, 'Banter');
});

it('node(id) answers as the type query does: content for those who may see it, NOT_FOUND otherwise', async () => {
  const owner = await signUp(app);
  const stranger = await signUp(app);
  const g = await ok(
    app,
    `mutation { createGuild(input: { name: "Secret" }) { id channels { id } } }`,
    {},
    owner.token,
  );
  const NODE = `query($id: ID!) { node(id: $id) { id ... on Guild { name } ... on Channel { channelName: name } ... on User { username } } }`;
  const seen = await ok(app, NODE, { id: g.createGuild.id }, owner.token);
  assert.equal(seen.node.name, 'Secret');
  const ch = await ok(app, NODE, { id: g.createGuild.channels[0].id }, owner.token);
  assert.equal(ch.node.channelName, 'general');
  await fails(app, 'NOT_FOUND', NODE, { id: g.createGuild.id }, stranger.token);
  await fails(app, 'NOT_FOUND', NODE, { id: g.createGuild.channels[0].id }, stranger.token);
  await fails(app, 'UNAUTHENTICATED', NODE, { id: g.createGuild.id });
  await fails(app, 'BAD_USER_INPUT', NODE, { id: 'not-an-id' }, owner.token);
  const me = await ok(app, NODE, { id: owner.id }, stranger.token);
  assert.equal(me.node.username, owner.username);
});

it('a bad enum or DateTime variable answers BAD_USER_INPUT, not a masked internal error', async () => {
  const owner = await signUp(app);
  const g = await ok(app, `mutation { createGuild(input: { name: "Vars" }) { id } }`, {}, owner.token);
  await fails(
    app,
    'BAD_USER_INPUT',
    `mutation($g: ID!, $t: ChannelType!) { createChannel(input: { guildId: $g, name: "x", type: $t }) { id } }`,
    { g: g.createGuild.id, t: 'NOPE' },
    owner.token,
  );
  await fails(
    app,
    'BAD_USER_INPUT',
    `mutation($g: ID!, $u: ID!, $until: DateTime) { timeoutMember(guildId: $g, userId: $u, until: $until) }`,
    { g: g.createGuild.id, u: owner.id, until: 'tomorrow' },
    owner.token,
  );
});
