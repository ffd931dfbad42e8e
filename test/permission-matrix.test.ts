/**
 * The permission matrix: every operation that touches guild content, run by each kind of actor,
 * with the exact outcome expected. One table row per operation; `setup` makes fresh targets
 * (a message to delete, a member to kick) so cells never depend on each other.
 *
 * Actors: the owner; a member with an ADMINISTRATOR role; a plain member; a member denied
 * VIEW_CHANNEL on #general by a member overwrite; a timed-out member; a banned ex-member; a
 * signed-in stranger; an anonymous client.
 */
import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import { createTestApp, gql, ok, signUp, type TestApp, type TestUser } from './helpers.ts';

const ACTORS = ['owner', 'admin', 'member', 'denied', 'timedOut', 'banned', 'stranger', 'anon'] as const;
type Actor = (typeof ACTORS)[number];
type Outcome = 'ok' | 'UNAUTHENTICATED' | 'NOT_FOUND' | 'FORBIDDEN' | 'BAD_USER_INPUT';

/**
 * The usual shape: `allowed` succeed; anonymous is UNAUTHENTICATED; banned and strangers are
 * NOT_FOUND; the denied member is NOT_FOUND when the operation is about the hidden channel
 * (scope 'channel') and FORBIDDEN when it is guild-wide; any other member is FORBIDDEN.
 */
function expect(
  scope: 'guild' | 'channel',
  allowed: Actor[],
  overrides: Partial<Record<Actor, Outcome>> = {},
): Record<Actor, Outcome> {
  const out = {} as Record<Actor, Outcome>;
  for (const a of ACTORS) {
    if (allowed.includes(a)) out[a] = 'ok';
    else if (a === 'anon') out[a] = 'UNAUTHENTICATED';
    else if (a === 'banned' || a === 'stranger') out[a] = 'NOT_FOUND';
    else if (a === 'denied' && scope === 'channel') out[a] = 'NOT_FOUND';
    else out[a] = 'FORBIDDEN';
  }
  return { ...out, ...overrides };
}
const MEMBERS: Actor[] = ['owner', 'admin', 'member', 'denied', 'timedOut'];
const VIEWERS: Actor[] = ['owner', 'admin', 'member', 'timedOut'];
const ACTIVE: Actor[] = ['owner', 'admin', 'member'];
const MODS: Actor[] = ['owner', 'admin'];

interface Fixture {
  guild: string;
  /** #general: hidden from `denied` */
  channel: string;
  /** a message in #general by `author` (a plain member who is not an actor) */
  message: string;
  users: Record<Exclude<Actor, 'anon'> | 'author', TestUser>;
  inviteCode: string;
  /** a role below the admin role, for assignRole */
  lowRole: string;
}

interface Row {
  name: string;
  query: string;
  /** variables for one cell; may create fresh targets (as the owner or the author) */
  vars: (f: Fixture, actor: Actor) => Record<string, unknown> | Promise<Record<string, unknown>>;
  expected: Record<Actor, Outcome>;
}

let app: TestApp;
let f: Fixture;

const asOwner = (q: string, v: Record<string, unknown> = {}) => ok(app, q, v, f.users.owner.token);
const send = async (who: TestUser, content = 'hello') =>
  (
    await ok(
      app,
      `mutation($c: ID!, $t: String!) { sendMessage(input: { channelId: $c, content: $t }) { id } }`,
      { c: f.channel, t: content },
      who.token,
    )
  ).sendMessage.id as string;
/** A fresh plain member to act on. */
async function victim(): Promise<string> {
  const u = await signUp(app);
  await ok(app, `mutation($c: String!) { joinGuild(code: $c) { id } }`, { c: f.inviteCode }, u.token);
  return u.id;
}

const ROWS: Row[] = [
  // Queries
  {
    name: 'guild',
    query: `query($g: ID!) { guild(id: $g) { id name } }`,
    vars: (f) => ({ g: f.guild }),
    expected: expect('guild', MEMBERS),
  },
  {
    name: 'Guild.channels',
    query: `query($g: ID!) { guild(id: $g) { channels { id } } }`,
    vars: (f) => ({ g: f.guild }),
    expected: expect('guild', MEMBERS),
  },
  {
    name: 'Guild.members',
    query: `query($g: ID!) { guild(id: $g) { members(first: 5) { edges { node { nickname } } } } }`,
    vars: (f) => ({ g: f.guild }),
    expected: expect('guild', MEMBERS),
  },
  {
    name: 'Guild.auditLog',
    query: `query($g: ID!) { guild(id: $g) { auditLog(first: 5) { edges { node { action } } } } }`,
    vars: (f) => ({ g: f.guild }),
    expected: expect('guild', MODS),
  },
  {
    name: 'Guild.bans',
    query: `query($g: ID!) { guild(id: $g) { bans { reason } } }`,
    vars: (f) => ({ g: f.guild }),
    expected: expect('guild', MODS),
  },
  {
    name: 'Guild.invites',
    query: `query($g: ID!) { guild(id: $g) { invites { code } } }`,
    vars: (f) => ({ g: f.guild }),
    expected: expect('guild', MODS),
  },
  {
    name: 'reports(guildId)',
    query: `query($g: ID!) { reports(guildId: $g) { edges { node { id } } } }`,
    vars: (f) => ({ g: f.guild }),
    expected: expect('guild', MODS),
  },
  {
    name: 'channel',
    query: `query($c: ID!) { channel(id: $c) { id name } }`,
    vars: (f) => ({ c: f.channel }),
    expected: expect('channel', VIEWERS),
  },
  {
    name: 'Channel.messages',
    query: `query($c: ID!) { channel(id: $c) { messages(first: 5) { edges { node { id content } } } } }`,
    vars: (f) => ({ c: f.channel }),
    expected: expect('channel', VIEWERS),
  },
  {
    name: 'Channel.pinnedMessages',
    query: `query($c: ID!) { channel(id: $c) { pinnedMessages { id } } }`,
    vars: (f) => ({ c: f.channel }),
    expected: expect('channel', VIEWERS),
  },
  {
    name: 'Channel.overwrites',
    query: `query($c: ID!) { channel(id: $c) { overwrites { targetType } } }`,
    vars: (f) => ({ c: f.channel }),
    expected: expect('channel', MODS),
  },
  {
    name: 'message',
    query: `query($m: ID!) { message(id: $m) { id content } }`,
    vars: (f) => ({ m: f.message }),
    expected: expect('channel', VIEWERS),
  },

  {
    name: 'Guild.roles',
    query: `query($g: ID!) { guild(id: $g) { roles { name } } }`,
    vars: (f) => ({ g: f.guild }),
    expected: expect('guild', MEMBERS),
  },
  {
    name: 'node (Guild)',
    query: `query($id: ID!) { node(id: $id) { id } }`,
    vars: (f) => ({ id: f.guild }),
    expected: expect('guild', MEMBERS),
  },
  {
    name: 'node (Channel)',
    query: `query($id: ID!) { node(id: $id) { id } }`,
    vars: (f) => ({ id: f.channel }),
    expected: expect('channel', VIEWERS),
  },
  {
    name: 'node (Message)',
    query: `query($id: ID!) { node(id: $id) { id } }`,
    vars: (f) => ({ id: f.message }),
    expected: expect('channel', VIEWERS),
  },

  // Message mutations
  {
    name: 'sendMessage',
    query: `mutation($c: ID!) { sendMessage(input: { channelId: $c, content: "hi" }) { id } }`,
    vars: (f) => ({ c: f.channel }),
    expected: expect('channel', ACTIVE),
  },
  {
    name: "editMessage (someone else's)",
    query: `mutation($m: ID!) { editMessage(input: { id: $m, content: "edited" }) { id } }`,
    vars: async () => ({ m: await send(f.users.author) }),
    expected: expect('channel', []),
  },
  {
    name: "deleteMessage (someone else's)",
    query: `mutation($m: ID!) { deleteMessage(id: $m) }`,
    vars: async () => ({ m: await send(f.users.author) }),
    expected: expect('channel', MODS),
  },
  {
    name: 'addReaction',
    query: `mutation($m: ID!) { addReaction(messageId: $m, emoji: "👍") { id } }`,
    vars: (f) => ({ m: f.message }),
    expected: expect('channel', ACTIVE),
  },
  {
    name: 'removeReaction',
    query: `mutation($m: ID!) { removeReaction(messageId: $m, emoji: "👍") { id } }`,
    vars: (f) => ({ m: f.message }),
    expected: expect('channel', VIEWERS),
  },
  {
    name: 'pinMessage',
    query: `mutation($m: ID!) { pinMessage(messageId: $m) { id } }`,
    vars: async () => ({ m: await send(f.users.author) }),
    expected: expect('channel', MODS),
  },
  {
    name: 'unpinMessage',
    query: `mutation($m: ID!) { unpinMessage(messageId: $m) { id } }`,
    vars: (f) => ({ m: f.message }),
    expected: expect('channel', MODS),
  },
  {
    name: 'startThread',
    query: `mutation($m: ID!) { startThread(messageId: $m, name: "t") { id } }`,
    vars: async () => ({ m: await send(f.users.author) }),
    expected: expect('channel', ACTIVE),
  },
  {
    name: 'markRead',
    query: `mutation($c: ID!, $m: ID!) { markRead(channelId: $c, messageId: $m) { id } }`,
    vars: (f) => ({ c: f.channel, m: f.message }),
    expected: expect('channel', VIEWERS),
  },
  {
    name: 'startTyping',
    query: `mutation($c: ID!) { startTyping(channelId: $c) }`,
    vars: (f) => ({ c: f.channel }),
    expected: expect('channel', ACTIVE),
  },
  {
    name: 'reportMessage',
    query: `mutation($m: ID!) { reportMessage(messageId: $m, reason: "spam") { id } }`,
    vars: async () => ({ m: await send(f.users.author) }),
    expected: expect('channel', VIEWERS),
  },
  {
    name: 'resolveReport',
    query: `mutation($r: ID!) { resolveReport(id: $r, resolution: "done") { id } }`,
    vars: async () => {
      const m = await send(f.users.owner);
      const r = await ok(
        app,
        `mutation($m: ID!) { reportMessage(messageId: $m, reason: "x") { id } }`,
        { m },
        f.users.author.token,
      );
      return { r: r.reportMessage.id };
    },
    // Reports are invisible to non-moderators: NOT_FOUND rather than FORBIDDEN.
    expected: expect('guild', MODS, { member: 'NOT_FOUND', denied: 'NOT_FOUND', timedOut: 'NOT_FOUND' }),
  },

  // Guild and channel configuration
  {
    name: 'updateGuild',
    query: `mutation($g: ID!) { updateGuild(input: { id: $g, description: "d" }) { id } }`,
    vars: (f) => ({ g: f.guild }),
    expected: expect('guild', MODS),
  },
  {
    name: 'createChannel',
    query: `mutation($g: ID!) { createChannel(input: { guildId: $g, name: "new", type: TEXT }) { id } }`,
    vars: (f) => ({ g: f.guild }),
    expected: expect('guild', MODS),
  },
  {
    name: 'updateChannel',
    query: `mutation($c: ID!) { updateChannel(input: { id: $c, topic: "t" }) { id } }`,
    vars: (f) => ({ c: f.channel }),
    expected: expect('channel', MODS),
  },
  {
    name: 'deleteChannel (a visible one)',
    query: `mutation($c: ID!) { deleteChannel(id: $c) }`,
    vars: async (f) => ({
      c: (
        await asOwner(
          `mutation($g: ID!) { createChannel(input: { guildId: $g, name: "tmp", type: TEXT }) { id } }`,
          { g: f.guild },
        )
      ).createChannel.id,
    }),
    expected: expect('guild', MODS),
  },
  {
    name: 'setChannelOverwrite',
    query: `mutation($c: ID!, $u: ID!) { setChannelOverwrite(input: { channelId: $c, targetType: MEMBER, targetId: $u, allow: [], deny: [ATTACH_FILES] }) { targetType } }`,
    vars: (f) => ({ c: f.channel, u: f.users.author.id }),
    expected: expect('channel', MODS),
  },
  {
    name: 'createRole',
    query: `mutation($g: ID!) { createRole(input: { guildId: $g, name: "r" }) { id } }`,
    vars: (f) => ({ g: f.guild }),
    expected: expect('guild', MODS),
  },
  {
    name: 'assignRole',
    query: `mutation($g: ID!, $r: ID!, $u: ID!) { assignRole(guildId: $g, roleId: $r, userId: $u) }`,
    vars: async (f) => ({ g: f.guild, r: f.lowRole, u: await victim() }),
    expected: expect('guild', MODS),
  },
  {
    name: 'updateRole',
    query: `mutation($r: ID!) { updateRole(input: { id: $r, color: 255 }) { id } }`,
    vars: (f) => ({ r: f.lowRole }),
    expected: expect('guild', MODS),
  },
  {
    name: 'deleteRole',
    query: `mutation($r: ID!) { deleteRole(id: $r) }`,
    vars: async (f) => ({
      r: (
        await asOwner(`mutation($g: ID!) { createRole(input: { guildId: $g, name: "tmp" }) { id } }`, {
          g: f.guild,
        })
      ).createRole.id,
    }),
    expected: expect('guild', MODS),
  },
  {
    name: 'unassignRole',
    query: `mutation($g: ID!, $r: ID!, $u: ID!) { unassignRole(guildId: $g, roleId: $r, userId: $u) }`,
    vars: async (f) => {
      const u = await victim();
      await asOwner(
        `mutation($g: ID!, $r: ID!, $u: ID!) { assignRole(guildId: $g, roleId: $r, userId: $u) }`,
        { g: f.guild, r: f.lowRole, u },
      );
      return { g: f.guild, r: f.lowRole, u };
    },
    expected: expect('guild', MODS),
  },
  {
    name: 'removeChannelOverwrite',
    query: `mutation($c: ID!, $u: ID!) { removeChannelOverwrite(channelId: $c, targetId: $u) }`,
    vars: async (f) => {
      const v = { c: f.channel, u: f.users.author.id };
      await asOwner(
        `mutation($c: ID!, $u: ID!) { setChannelOverwrite(input: { channelId: $c, targetType: MEMBER, targetId: $u, allow: [], deny: [ATTACH_FILES] }) { targetType } }`,
        v,
      );
      return v;
    },
    expected: expect('channel', MODS),
  },
  {
    name: "setNickname (someone else's)",
    query: `mutation($g: ID!, $u: ID!) { setNickname(guildId: $g, userId: $u, nickname: "nick") { nickname } }`,
    vars: async (f) => ({ g: f.guild, u: await victim() }),
    expected: expect('guild', MODS),
  },
  {
    name: 'setNickname (own)',
    query: `mutation($g: ID!, $u: ID!) { setNickname(guildId: $g, userId: $u, nickname: "me") { nickname } }`,
    vars: (f, actor) => ({ g: f.guild, u: f.users[actor === 'anon' ? 'author' : actor].id }),
    expected: expect('guild', ['owner', 'admin', 'member', 'denied']),
  },
  {
    name: "revokeInvite (someone else's)",
    query: `mutation($c: String!) { revokeInvite(code: $c) }`,
    vars: async (f) => ({
      c: (
        await asOwner(`mutation($g: ID!) { createInvite(input: { guildId: $g }) { code } }`, { g: f.guild })
      ).createInvite.code,
    }),
    expected: expect('guild', MODS),
  },
  {
    name: 'createInvite',
    query: `mutation($g: ID!) { createInvite(input: { guildId: $g }) { code } }`,
    vars: (f) => ({ g: f.guild }),
    expected: expect('guild', ['owner', 'admin', 'member', 'denied']),
  },

  // Moderation
  {
    name: 'kickMember',
    query: `mutation($g: ID!, $u: ID!) { kickMember(guildId: $g, userId: $u) }`,
    vars: async (f) => ({ g: f.guild, u: await victim() }),
    expected: expect('guild', MODS),
  },
  {
    name: 'banMember',
    query: `mutation($g: ID!, $u: ID!) { banMember(guildId: $g, userId: $u) }`,
    vars: async (f) => ({ g: f.guild, u: await victim() }),
    expected: expect('guild', MODS),
  },
  {
    name: 'unbanMember',
    query: `mutation($g: ID!, $u: ID!) { unbanMember(guildId: $g, userId: $u) }`,
    vars: async (f) => {
      const u = (await signUp(app)).id;
      await asOwner(`mutation($g: ID!, $u: ID!) { banMember(guildId: $g, userId: $u) }`, { g: f.guild, u });
      return { g: f.guild, u };
    },
    expected: expect('guild', MODS),
  },
  {
    name: 'timeoutMember',
    query: `mutation($g: ID!, $u: ID!, $t: DateTime) { timeoutMember(guildId: $g, userId: $u, until: $t) }`,
    vars: async (f) => ({ g: f.guild, u: await victim(), t: new Date(Date.now() + 3600_000).toISOString() }),
    expected: expect('guild', MODS),
  },
];

before(async () => {
  app = await createTestApp();
  const names = ['owner', 'admin', 'member', 'denied', 'timedOut', 'banned', 'stranger', 'author'] as const;
  const users = {} as Fixture['users'];
  for (const n of names) users[n] = await signUp(app);
  const tok = users.owner.token;
  const g = await ok(
    app,
    `mutation { createGuild(input: { name: "Matrix" }) { id channels { id } } }`,
    {},
    tok,
  );
  const guild = g.createGuild.id as string;
  const channel = g.createGuild.channels[0].id as string;
  const inv = await ok(
    app,
    `mutation($g: ID!) { createInvite(input: { guildId: $g }) { code } }`,
    { g: guild },
    tok,
  );
  const code = inv.createInvite.code as string;
  for (const n of ['admin', 'member', 'denied', 'timedOut', 'banned', 'author'] as const) {
    await ok(app, `mutation($c: String!) { joinGuild(code: $c) { id } }`, { c: code }, users[n].token);
  }
  const role = (name: string, perms: string[], position: number) =>
    ok(
      app,
      `mutation($g: ID!, $n: String!, $p: [Permission!], $pos: Int) { createRole(input: { guildId: $g, name: $n, permissions: $p, position: $pos }) { id } }`,
      { g: guild, n: name, p: perms, pos: position },
      tok,
    );
  const low = (await role('low', [], 1)).createRole.id as string;
  const adminRole = (await role('admin', ['ADMINISTRATOR'], 2)).createRole.id as string;
  await ok(
    app,
    `mutation($g: ID!, $r: ID!, $u: ID!) { assignRole(guildId: $g, roleId: $r, userId: $u) }`,
    { g: guild, r: adminRole, u: users.admin.id },
    tok,
  );
  await ok(
    app,
    `mutation($c: ID!, $u: ID!) { setChannelOverwrite(input: { channelId: $c, targetType: MEMBER, targetId: $u, allow: [], deny: [VIEW_CHANNEL] }) { targetType } }`,
    { c: channel, u: users.denied.id },
    tok,
  );
  await ok(
    app,
    `mutation($g: ID!, $u: ID!, $t: DateTime) { timeoutMember(guildId: $g, userId: $u, until: $t) }`,
    { g: guild, u: users.timedOut.id, t: new Date(Date.now() + 24 * 3600_000).toISOString() },
    tok,
  );
  await ok(
    app,
    `mutation($g: ID!, $u: ID!) { banMember(guildId: $g, userId: $u) }`,
    { g: guild, u: users.banned.id },
    tok,
  );
  f = { guild, channel, message: '', users, inviteCode: code, lowRole: low };
  f.message = await send(users.author, 'the shared message');
  await asOwner(`mutation($m: ID!) { pinMessage(messageId: $m) { id } }`, { m: f.message });
});
after(() => app?.destroy());

for (const row of ROWS) {
  describe(row.name, () => {
    for (const actor of ACTORS) {
      const want = row.expected[actor];
      it(`${actor} → ${want}`, async () => {
        const vars = await row.vars(f, actor);
        const token = actor === 'anon' ? undefined : f.users[actor].token;
        const r = await gql(app, row.query, vars, { token });
        const got = r.errors?.length ? String(r.errors[0].extensions?.code) : 'ok';
        assert.equal(got, want, `${row.name} as ${actor}: ${JSON.stringify(r.errors ?? r.data)}`);
        if (want === 'ok') assert.ok(r.data && Object.values(r.data).every((v) => v !== null));
      });
    }
  });
}
