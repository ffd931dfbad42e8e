/** Authorization on the stream: strangers, kicked, banned and channel-denied users, live and in replay. */
import assert from 'node:assert/strict';
import { after, before, it } from 'node:test';
import { sql } from 'drizzle-orm';
import type { Hub } from '../core/realtime/hub.ts';
import type { Delivered, Subscription } from '../core/realtime/subscription.ts';
import { decodeAnyId } from '../schema/builder.ts';
import {
  blockedBy,
  createTestApp,
  fails,
  gql,
  lockWaiters,
  ok,
  signUp,
  type TestApp,
  type TestUser,
} from './helpers.ts';
import {
  channelAccessHelpers,
  connect,
  guildWithChannel,
  invite,
  send,
  sleep,
  subscribe,
  throughMarker,
  untilLive,
  within,
  withoutMarkers,
} from './realtime-helpers.ts';

let app: TestApp;
let url: string;
before(async () => {
  app = await createTestApp({ rateLimits: false });
  url = `ws://127.0.0.1:${await app.start(0)}/graphql`;
});
after(() => app.destroy());

const contents = (events: any[]) =>
  events.filter((e) => e.__typename === 'MessageCreated').map((e) => e.message.content as string);

it('delivers only what each user may see now, live and in replay; a join starts delivery', async () => {
  const [owner, member, stranger, kicked, banned, denied, joiner] = await Promise.all(
    Array.from({ length: 7 }, () => signUp(app)),
  );
  const { guildId, channelId: general } = await guildWithChannel(app, owner.token);
  const secret = await createChannel(owner.token, guildId, 'secret');
  for (const u of [member, kicked, banned, denied]) await invite(app, owner.token, guildId, u.token);
  // Each user's own guild, for the markers that end the negative checks (see throughMarker).
  const own: Record<string, string> = {};
  for (const [name, u] of Object.entries({ member, stranger, kicked, banned, denied, joiner }))
    own[name] = (await guildWithChannel(app, u.token)).channelId;
  const c0Msg = await send(app, owner.token, general, 'before');
  assert.ok(c0Msg);

  const users = { member, stranger, kicked, banned, denied, joiner };
  const streams: Record<string, ReturnType<typeof subscribe>> = {};
  const clients: any[] = [];
  for (const [name, u] of Object.entries(users)) {
    const { client } = connect(url, u.token);
    clients.push(client);
    streams[name] = subscribe(client);
  }
  // The owner's stream gives the cursor to replay from.
  const { client: oc } = connect(url, owner.token);
  clients.push(oc);
  const os = subscribe(oc);
  await untilLive(app, [...Object.values(users), owner]);
  await send(app, owner.token, general, 'm1');
  await os.until((e) => contents(e).includes('m1'));
  const c1 = os.events.at(-1).cursor;
  // m1 reaches each member's stream before the kick, ban and overwrite below, whose access it is
  // checked with when it is delivered.
  for (const name of ['member', 'kicked', 'banned', 'denied'])
    await streams[name].until((e) => contents(e).includes('m1'), 10_000, `m1 live: ${name}`);

  await ok(
    app,
    `mutation($g: ID!, $u: ID!) { kickMember(guildId: $g, userId: $u) }`,
    { g: guildId, u: kicked.id },
    owner.token,
  );
  await ok(
    app,
    `mutation($g: ID!, $u: ID!) { banMember(guildId: $g, userId: $u) }`,
    { g: guildId, u: banned.id },
    owner.token,
  );
  await ok(
    app,
    `mutation($i: SetChannelOverwriteInput!) { setChannelOverwrite(input: $i) { targetId } }`,
    {
      i: { channelId: secret, targetType: 'MEMBER', targetId: denied.id, allow: [], deny: ['VIEW_CHANNEL'] },
    },
    owner.token,
  );
  await send(app, owner.token, general, 'm2');
  await send(app, owner.token, secret, 's1');
  await invite(app, owner.token, guildId, joiner.token);
  await send(app, owner.token, general, 'm3');
  await os.until((e) => contents(e).includes('m3'));
  for (const name of ['member', 'denied', 'joiner'])
    await streams[name].until((e) => contents(e).includes('m3'), 10_000, `m3 live: ${name}`);
  const live: Record<string, any[]> = {};
  for (const [name, u] of Object.entries(users))
    [live[name]] = await throughMarker(app, u.token, own[name], [streams[name]]);

  const expected: Record<string, string[]> = {
    member: ['m1', 'm2', 's1', 'm3'],
    stranger: [],
    kicked: ['m1'],
    banned: ['m1'],
    denied: ['m1', 'm2', 'm3'],
    joiner: ['m3'],
  };
  // Visibility is decided at delivery: rows the tailer hands out after the join commits may
  // reach the joiner, which may read that history anyway. The join must not need a reconnect.
  const j = contents(live.joiner);
  assert.equal(j.at(-1), 'm3');
  assert.ok(
    j.every((c) => ['m2', 's1', 'm3'].includes(c)),
    `joiner: ${j}`,
  );
  delete expected.joiner;
  for (const [name, want] of Object.entries(expected)) {
    assert.deepEqual(contents(live[name]), want, `live: ${name}`);
  }
  assert.ok(
    live.kicked.some((e) => e.__typename === 'MemberKicked'),
    'the kicked user hears it',
  );
  assert.ok(
    live.banned.some((e) => e.__typename === 'MemberBanned'),
    'the banned user hears it',
  );
  assert.equal(live.stranger.length, 0);

  // Replay from c1 (after m1): the same rules, applied now.
  const replayWant: Record<string, string[]> = {
    member: ['m2', 's1', 'm3'],
    stranger: [],
    kicked: [],
    banned: [],
    denied: ['m2', 'm3'],
    joiner: ['m2', 's1', 'm3'],
  };
  for (const [name, u] of Object.entries(users)) {
    const { client } = connect(url, u.token);
    clients.push(client);
    const r = subscribe(client, c1);
    const [replayed] = await throughMarker(app, u.token, own[name], [r]);
    assert.deepEqual(contents(replayed), replayWant[name], `replay: ${name}`);
    assert.ok(!r.errors.length);
  }
  for (const c of clients) await c.dispose();
});

it('GuildDeleted reaches every member subscribed at deletion, and members replaying later; nobody else', async () => {
  const [owner, quiet, away, stranger] = await Promise.all(Array.from({ length: 4 }, () => signUp(app)));
  const { guildId, channelId } = await guildWithChannel(app, owner.token);
  const strangers = (await guildWithChannel(app, stranger.token)).channelId;
  for (const u of [quiet, away]) await invite(app, owner.token, guildId, u.token);
  const Q = `subscription($after: String) { events(after: $after) { __typename cursor
    ... on GuildDeleted { guildId } ... on MessageCreated { message { id content } } } }`;
  // `away` takes a cursor, then leaves before the deletion.
  const ca = connect(url, away.token);
  const sa = subscribe(ca.client, null, Q);
  await untilLive(app, [away]);
  await send(app, owner.token, channelId, 'hello');
  await sa.until((e) => e.length > 0);
  const cursor = sa.events.at(-1).cursor;
  sa.stop();
  await ca.client.dispose();
  // `quiet` subscribes now and has seen nothing of this guild on its stream when it is deleted.
  const cq = connect(url, quiet.token);
  const cs = connect(url, stranger.token);
  const sq = subscribe(cq.client, null, Q);
  const ss = subscribe(cs.client, null, Q);
  await untilLive(app, [quiet, stranger]);
  const r = await ok(app, `mutation($g: ID!) { deleteGuild(id: $g) }`, { g: guildId }, owner.token);
  assert.equal(r.deleteGuild, guildId);
  await sq.until((e) => e.some((x) => x.__typename === 'GuildDeleted'), 5000, 'GuildDeleted live');
  assert.deepEqual(sq.events, [{ __typename: 'GuildDeleted', cursor: sq.events[0].cursor, guildId }]);
  const replay = subscribe(cq.client, cursor, Q);
  await replay.until((e) => e.some((x) => x.__typename === 'GuildDeleted'), 5000, 'GuildDeleted replayed');
  const ra = connect(url, away.token);
  const ar = subscribe(ra.client, cursor, Q);
  await ar.until(
    (e) => e.some((x) => x.__typename === 'GuildDeleted'),
    5000,
    'GuildDeleted replayed to away',
  );
  assert.deepEqual(
    ar.events.map((x) => x.__typename),
    ['GuildDeleted'],
  );
  const rs = subscribe(cs.client, cursor, Q);
  const [live, replayed] = await throughMarker(app, stranger.token, strangers, [ss, rs]);
  assert.deepEqual(live, [], 'a stranger hears nothing live');
  assert.deepEqual(replayed, [], 'nor in replay');
  await Promise.all([cq.client.dispose(), cs.client.dispose(), ra.client.dispose()]);
});

it('a GUILD_DELETED written the old way (members in its payload, by an instance not yet upgraded) reaches its members live and in replay; nobody else', async () => {
  const [member, stranger] = await Promise.all([signUp(app), signUp(app)]);
  const Q = `subscription($after: String) { events(after: $after) { __typename cursor ... on GuildDeleted { guildId }
    ... on MessageCreated { message { id } } } }`;
  const { guildId, channelId } = await guildWithChannel(app, member.token);
  const strangers = (await guildWithChannel(app, stranger.token)).channelId;
  const cm = connect(url, member.token);
  const cs = connect(url, stranger.token);
  const sm = subscribe(cm.client, null, Q);
  const ss = subscribe(cs.client, null, Q);
  const before = subscribe(cm.client, null);
  await untilLive(app, [member], 2);
  await untilLive(app, [stranger]);
  await send(app, member.token, channelId, 'a cursor');
  await before.until((e) => e.length > 0);
  const cursor = before.events.at(-1).cursor;
  // No former_members rows: the guild still exists here, only the old row says it was deleted.
  const gid = decodeAnyId(guildId).id;
  await app.deps.db.execute(
    sql`insert into events (type, guild_id, payload) values ('GUILD_DELETED', ${gid}::uuid, ${JSON.stringify({ guildId: gid, actorId: '0193f1a2-0000-7000-8000-00000000a0a0', memberIds: [decodeAnyId(member.id).id] })}::jsonb)`,
  );
  await app.deps.realtime!.poke();
  await sm.until((e) => e.some((x) => x.__typename === 'GuildDeleted'), 5000, 'old-format GuildDeleted live');
  const replay = subscribe(cm.client, cursor, Q);
  await replay.until(
    (e) => e.some((x) => x.__typename === 'GuildDeleted'),
    5000,
    'old-format GuildDeleted replayed',
  );
  const strangerReplay = subscribe(cs.client, cursor, Q);
  const [live, replayed] = await throughMarker(app, stranger.token, strangers, [ss, strangerReplay]);
  assert.deepEqual(live, []);
  assert.deepEqual(replayed, []);
  await Promise.all([cm.client.dispose(), cs.client.dispose()]);
});

const ACCESS_Q = `subscription($after: String) { events(after: $after) { __typename cursor
  ... on MessageCreated { message { id content channel { id } } }
  ... on MessageUpdated { message { id content } }
  ... on MessageDeleted { messageId channelId }
  ... on ChannelUpdated { channel { id name } }
  ... on PermissionsChanged { guildId pcChannel: channelId }
} }`;

const { everyoneRole, overwrite, createChannel, hideFromEveryone, denyToEveryone } = channelAccessHelpers(
  () => app,
);

it('an ownership transfer moves a channel hidden from @everyone from the old owner to the new one at once', async () => {
  const [o, n] = await Promise.all([signUp(app), signUp(app)]);
  const { guildId, channelId: general } = await guildWithChannel(app, o.token);
  await invite(app, o.token, guildId, n.token);
  const secret = await createChannel(o.token, guildId, 'secret');
  await hideFromEveryone(o.token, guildId, secret);
  const oc = connect(url, o.token);
  const nc = connect(url, n.token);
  const os = subscribe(oc.client, null, ACCESS_Q);
  const ns = subscribe(nc.client, null, ACCESS_Q);
  await untilLive(app, [o, n]);
  // Each stream decides on the secret channel once: its answer is cached from here on.
  await send(app, o.token, secret, 's0');
  await send(app, o.token, general, 'g0');
  await os.until((e) => contents(e).includes('g0'));
  await ns.until((e) => contents(e).includes('g0'));
  await ok(
    app,
    `mutation($g: ID!, $u: ID!) { transferGuildOwnership(guildId: $g, userId: $u) { id } }`,
    { g: guildId, u: n.id },
    o.token,
  );
  await send(app, n.token, secret, 's1');
  await send(app, n.token, general, 'g1');
  await os.until((e) => contents(e).includes('g1'));
  await ns.until((e) => contents(e).includes('g1'));
  const got = { oldOwner: contents(os.events), newOwner: contents(ns.events) };
  await Promise.all([oc.client.dispose(), nc.client.dispose()]);
  assert.deepEqual(got, { oldOwner: ['s0', 'g0', 'g1'], newOwner: ['g0', 's1', 'g1'] });
});

it('a member who may view a channel but not read its history gets its deletes and renames in a replay, not its history', async () => {
  const [o, v] = await Promise.all([signUp(app), signUp(app)]);
  const { guildId, channelId: general } = await guildWithChannel(app, o.token);
  const own = (await guildWithChannel(app, v.token)).channelId;
  await invite(app, o.token, guildId, v.token);
  await overwrite(o.token, {
    channelId: general,
    targetType: 'MEMBER',
    targetId: v.id,
    allow: [],
    deny: ['READ_HISTORY'],
  });
  const vc = connect(url, v.token);
  const vs = subscribe(vc.client, null, ACCESS_Q);
  // A second device stays connected throughout: what live delivery sends for the same changes.
  const lc = connect(url, v.token);
  const ls = subscribe(lc.client, null, ACCESS_Q);
  await untilLive(app, [v], 2);
  const m1 = await send(app, o.token, general, 'm1');
  const m0 = await send(app, o.token, general, 'm0');
  await vs.until((e) => contents(e).includes('m0'));
  const cursor = vs.events.at(-1).cursor;
  await vc.client.dispose();
  // While it is away: a message and an edit (history), a deletion and a rename (not history).
  await send(app, o.token, general, 'm2');
  await ok(
    app,
    `mutation($i: EditMessageInput!) { editMessage(input: $i) { id } }`,
    { i: { id: m0, content: 'm0 edited' } },
    o.token,
  );
  await ok(app, `mutation($id: ID!) { deleteMessage(id: $id) }`, { id: m1 }, o.token);
  await ok(
    app,
    `mutation($i: UpdateChannelInput!) { updateChannel(input: $i) { id } }`,
    { i: { id: general, name: 'renamed' } },
    o.token,
  );
  await ls.until((e) => e.some((x) => x.__typename === 'ChannelUpdated'));
  const rc = connect(url, v.token);
  const rs = subscribe(rc.client, cursor, ACCESS_Q);
  const [, replayed] = await throughMarker(app, v.token, own, [ls, rs]);
  const live = withoutMarkers(ls.events).map((e) => e.__typename);
  await Promise.all([lc.client.dispose(), rc.client.dispose()]);
  assert.deepEqual(live.slice(-5), [
    'MessageCreated',
    'MessageCreated',
    'MessageUpdated',
    'MessageDeleted',
    'ChannelUpdated',
  ]);
  assert.deepEqual(
    replayed.map((e) => e.__typename),
    ['MessageDeleted', 'ChannelUpdated'],
  );
  assert.equal(replayed[0].messageId, m1);
  assert.equal(replayed[1].channel.name, 'renamed');
});

it('a channel overwrite change is told to who may see the channel or is its target, not to other members', async () => {
  const [o, a, b] = await Promise.all([signUp(app), signUp(app), signUp(app)]);
  const { guildId, channelId: general } = await guildWithChannel(app, o.token);
  for (const u of [a, b]) await invite(app, o.token, guildId, u.token);
  const secret = await createChannel(o.token, guildId, 'secret');
  const ac = connect(url, a.token);
  const bc = connect(url, b.token);
  const as = subscribe(ac.client, null, ACCESS_Q);
  const bs = subscribe(bc.client, null, ACCESS_Q);
  await untilLive(app, [a, b]);
  // For @everyone: every member may have lost sight of it, and is told.
  await hideFromEveryone(o.token, guildId, secret);
  const told = (e: any[]) => e.filter((x) => x.__typename === 'PermissionsChanged').length;
  await as.until((e) => told(e) === 1);
  await bs.until((e) => told(e) === 1);
  const cursor = bs.events.at(-1).cursor;
  // For `a` alone: `a` is told (it gains, then loses sight of it); `b` never saw it and still does not.
  await overwrite(o.token, {
    channelId: secret,
    targetType: 'MEMBER',
    targetId: a.id,
    allow: ['VIEW_CHANNEL'],
    deny: [],
  });
  await overwrite(o.token, {
    channelId: secret,
    targetType: 'MEMBER',
    targetId: a.id,
    allow: [],
    deny: ['VIEW_CHANNEL'],
  });
  await send(app, o.token, general, 'end');
  await as.until((e) => contents(e).includes('end'));
  await bs.until((e) => contents(e).includes('end'));
  const replay = subscribe(bc.client, cursor, ACCESS_Q);
  await replay.until((e) => contents(e).includes('end'));
  const types = (s: { events: any[] }) => s.events.map((x) => x.__typename);
  const got = { a: types(as), b: types(bs), bReplay: types(replay) };
  await Promise.all([ac.client.dispose(), bc.client.dispose()]);
  // The allow reaches `a` if it is checked before the deny commits. Checked after (a loaded
  // machine), `a` could not see the channel before it and cannot now, so it is not told (the
  // rule above); the deny, which took away what `a` could see before it, always is.
  const withAllow = ['PermissionsChanged', 'PermissionsChanged', 'PermissionsChanged', 'MessageCreated'];
  const withoutAllow = ['PermissionsChanged', 'PermissionsChanged', 'MessageCreated'];
  assert.deepEqual(got, {
    a: got.a.length === withoutAllow.length ? withoutAllow : withAllow,
    b: ['PermissionsChanged', 'MessageCreated'],
    bReplay: ['MessageCreated'],
  });
});

it('a member who loses sight of a channel moved into a category hidden from it is told, as for an overwrite', async () => {
  const [o, v] = await Promise.all([signUp(app), signUp(app)]);
  const { guildId, channelId: general } = await guildWithChannel(app, o.token);
  await invite(app, o.token, guildId, v.token);
  const cat = await createChannel(o.token, guildId, 'staff', 'CATEGORY');
  await hideFromEveryone(o.token, guildId, cat);
  const vc = connect(url, v.token);
  const vs = subscribe(vc.client, null, ACCESS_Q);
  await untilLive(app, [v]);
  await ok(
    app,
    `mutation($i: UpdateChannelInput!) { updateChannel(input: $i) { id } }`,
    { i: { id: general, parentId: cat } },
    o.token,
  );
  const r = await gql(app, `query($c: ID!) { channel(id: $c) { id } }`, { c: general }, { token: v.token });
  assert.equal(r.errors?.[0]?.extensions?.code, 'NOT_FOUND', 'queries hide the moved channel');
  try {
    await vs.until(
      (e) => e.some((x) => x.__typename === 'PermissionsChanged' && x.pcChannel === general),
      3000,
    );
  } finally {
    await vc.client.dispose();
  }
});

it('moving a channel hidden from a member tells that member nothing (its id included); one who can see it hears of the move', async () => {
  const [o, blind, seer] = await Promise.all([signUp(app), signUp(app), signUp(app)]);
  const { guildId, channelId: general } = await guildWithChannel(app, o.token);
  for (const u of [blind, seer]) await invite(app, o.token, guildId, u.token);
  const secret = await createChannel(o.token, guildId, 'secret');
  await hideFromEveryone(o.token, guildId, secret);
  await overwrite(o.token, {
    channelId: secret,
    targetType: 'MEMBER',
    targetId: seer.id,
    allow: ['VIEW_CHANNEL'],
    deny: [],
  });
  const cat = await createChannel(o.token, guildId, 'lounge', 'CATEGORY');
  const bc = connect(url, blind.token);
  const sc = connect(url, seer.token);
  const bs = subscribe(bc.client, null, ACCESS_Q);
  const ss = subscribe(sc.client, null, ACCESS_Q);
  try {
    await untilLive(app, [blind, seer]);
    await ok(
      app,
      `mutation($i: UpdateChannelInput!) { updateChannel(input: $i) { id } }`,
      { i: { id: secret, parentId: cat } },
      o.token,
    );
    await send(app, o.token, general, 'after the move');
    await ss.until(
      (e) => e.some((x) => x.__typename === 'PermissionsChanged' && x.pcChannel === secret),
      5000,
    );
    await bs.until((e) => contents(e).includes('after the move'), 5000);
    assert.deepEqual(
      bs.events.filter(
        (x) => JSON.stringify(x).includes(decodeAnyId(secret).id) || JSON.stringify(x).includes(secret),
      ),
      [],
    );
  } finally {
    await Promise.all([bc.client.dispose(), sc.client.dispose()]);
  }
});

const DELETED_Q = `subscription($after: String) { events(after: $after) { __typename cursor
  ... on MessageCreated { message { id content channel { id } } }
  ... on ChannelDeleted { channelId guildId }
} }`;
/** The ids of the channels a stream was told were deleted, in order. */
const deleted = (events: any[]) =>
  events.filter((e) => e.__typename === 'ChannelDeleted').map((e) => e.channelId as string);

/** A role with `permissions`, given to `userIds`. */
async function roleFor(token: string, guildId: string, permissions: string[], userIds: string[]) {
  const r = await ok(
    app,
    `mutation($g: ID!, $p: [Permission!]) { createRole(input: { guildId: $g, name: "mods", permissions: $p }) { id } }`,
    { g: guildId, p: permissions },
    token,
  );
  const roleId = r.createRole.id as string;
  for (const u of userIds) {
    await ok(
      app,
      'mutation($g: ID!, $r: ID!, $u: ID!) { assignRole(guildId: $g, roleId: $r, userId: $u) }',
      { g: guildId, r: roleId, u },
      token,
    );
  }
  return roleId;
}

/**
 * Each of `users` with a stream open, `deleter` deletes `ids` in order: the channel ids each was
 * told were deleted, live and in a replay from before the deletions (`beforeReplay` runs between).
 * `owner` sends the messages that mark where the deletions begin and end, in `general`.
 */
async function deletionsTold(o: {
  users: Record<string, TestUser>;
  owner: TestUser;
  general: string;
  deleter: TestUser;
  ids: string[];
  beforeReplay?: () => Promise<unknown>;
}) {
  const conns = Object.fromEntries(Object.entries(o.users).map(([n, u]) => [n, connect(url, u.token)]));
  const live = Object.fromEntries(
    Object.entries(conns).map(([n, c]) => [n, subscribe(c.client, null, DELETED_Q)]),
  );
  await untilLive(app, Object.values(o.users));
  await send(app, o.owner.token, o.general, 'cursor');
  const first = Object.values(live)[0];
  await first.until((e) => contents(e).includes('cursor'));
  const cursor = first.events.find((e) => e.message?.content === 'cursor').cursor;
  for (const id of o.ids)
    await ok(app, `mutation($c: ID!) { deleteChannel(id: $c) }`, { c: id }, o.deleter.token);
  await send(app, o.owner.token, o.general, 'end');
  for (const s of Object.values(live)) await s.until((e) => contents(e).includes('end'));
  await o.beforeReplay?.();
  const replayed: Record<string, string[]> = {};
  for (const [n, c] of Object.entries(conns)) {
    const r = subscribe(c.client, cursor, DELETED_Q);
    await r.until((e) => contents(e).includes('end'), 5000, `${n}'s replay`);
    replayed[n] = deleted(r.events);
  }
  const got = Object.fromEntries(Object.entries(live).map(([n, s]) => [n, deleted(s.events)]));
  await Promise.all(Object.values(conns).map((c) => c.client.dispose()));
  return { live: got, replayed };
}

it('a ChannelDeleted is told to who could view the channel, live and in replay, and to its deleter; a public one to every member', async () => {
  const [o, mod, seer, blind] = await Promise.all(Array.from({ length: 4 }, () => signUp(app)));
  const { guildId, channelId: general } = await guildWithChannel(app, o.token);
  for (const u of [mod, seer, blind]) await invite(app, o.token, guildId, u.token);
  // `mod` sees `secret` through its role, `seer` through its own overwrite; `blind` never did.
  const modRole = await roleFor(o.token, guildId, ['MANAGE_CHANNELS'], [mod.id]);
  const secret = await createChannel(o.token, guildId, 'secret');
  const pub = await createChannel(o.token, guildId, 'public');
  await hideFromEveryone(o.token, guildId, secret);
  const allowView = { allow: ['VIEW_CHANNEL'], deny: [] };
  await overwrite(o.token, { channelId: secret, targetType: 'ROLE', targetId: modRole, ...allowView });
  await overwrite(o.token, { channelId: secret, targetType: 'MEMBER', targetId: seer.id, ...allowView });
  const told = await deletionsTold({
    users: { o, mod, seer, blind },
    owner: o,
    general,
    deleter: mod,
    ids: [secret, pub],
    // Taken from the deleter after the deletion: it is told of its own deletion in a replay all the same.
    beforeReplay: () =>
      ok(
        app,
        'mutation($g: ID!, $r: ID!, $u: ID!) { unassignRole(guildId: $g, roleId: $r, userId: $u) }',
        { g: guildId, r: modRole, u: mod.id },
        o.token,
      ),
  });
  const all = [secret, pub];
  const want = { o: all, mod: all, seer: all, blind: [pub] };
  assert.deepEqual(told, { live: want, replayed: want });
});

it("a channel's threads are deleted with it: each is told deleted before it, to who could view that thread, live and in replay", async () => {
  const [o, seer, blind] = await Promise.all(Array.from({ length: 3 }, () => signUp(app)));
  const { guildId, channelId: general } = await guildWithChannel(app, o.token);
  for (const u of [seer, blind]) await invite(app, o.token, guildId, u.token);
  const secret = await createChannel(o.token, guildId, 'secret');
  const pub = await createChannel(o.token, guildId, 'public');
  await hideFromEveryone(o.token, guildId, secret);
  const allowView = { allow: ['VIEW_CHANNEL'], deny: [] };
  await overwrite(o.token, { channelId: secret, targetType: 'MEMBER', targetId: seer.id, ...allowView });
  const thread = async (channelId: string, name: string) => {
    const m = await send(app, o.token, channelId, `${name} source`);
    const r = await ok(
      app,
      `mutation($m: ID!, $n: String!) { startThread(messageId: $m, name: $n) { id } }`,
      { m, n: name },
      o.token,
    );
    return r.startThread.id as string;
  };
  const secretThread = await thread(secret, 'hidden talk');
  const pubThread = await thread(pub, 'open talk');
  // A thread's own overwrite counts too: this one of the public channel is hidden from `blind`.
  const pubHidden = await thread(pub, 'not for blind');
  await overwrite(o.token, {
    channelId: pubHidden,
    targetType: 'MEMBER',
    targetId: blind.id,
    allow: [],
    deny: ['VIEW_CHANNEL'],
  });
  const told = await deletionsTold({
    users: { o, seer, blind },
    owner: o,
    general,
    deleter: o,
    ids: [secret, pub],
  });
  // Threads in the order they were started, then their channel.
  const all = [secretThread, secret, pubThread, pubHidden, pub];
  const want = { o: all, seer: all, blind: [pubThread, pub] };
  assert.deepEqual(told, { live: want, replayed: want });
  const query = `query($c: ID!) { channel(id: $c) { id } }`;
  for (const id of [secretThread, pubThread]) await fails(app, 'NOT_FOUND', query, { c: id }, o.token);
});

it('a channel hidden by its category, and the category itself, are deleted without telling the members they were hidden from', async () => {
  const [o, mod, blind] = await Promise.all(Array.from({ length: 3 }, () => signUp(app)));
  const { guildId, channelId: general } = await guildWithChannel(app, o.token);
  for (const u of [mod, blind]) await invite(app, o.token, guildId, u.token);
  const modRole = await roleFor(o.token, guildId, ['MANAGE_CHANNELS'], [mod.id]);
  const cat = await createChannel(o.token, guildId, 'staff', 'CATEGORY');
  await hideFromEveryone(o.token, guildId, cat);
  await overwrite(o.token, {
    channelId: cat,
    targetType: 'ROLE',
    targetId: modRole,
    allow: ['VIEW_CHANNEL'],
    deny: [],
  });
  const inCategory = async (name: string) => {
    const r = await ok(
      app,
      `mutation($g: ID!, $n: String!, $p: ID!) { createChannel(input: { guildId: $g, name: $n, type: TEXT, parentId: $p }) { id } }`,
      { g: guildId, n: name, p: cat },
      o.token,
    );
    return r.createChannel.id as string;
  };
  const inner = await inCategory('inner');
  const left = await inCategory('left');
  const mc = connect(url, mod.token);
  const bc = connect(url, blind.token);
  const ms = subscribe(mc.client, null, DELETED_Q);
  const bs = subscribe(bc.client, null, DELETED_Q);
  await untilLive(app, [mod, blind]);
  await send(app, o.token, general, 'cursor');
  await bs.until((e) => contents(e).includes('cursor'));
  const cursor = bs.events.at(-1).cursor;
  for (const id of [inner, cat])
    await ok(app, `mutation($c: ID!) { deleteChannel(id: $c) }`, { c: id }, mod.token);
  // The category's other channel stays, uncategorized, and its messages still reach who may see it.
  await send(app, o.token, left, 'still here');
  await send(app, o.token, general, 'end');
  await ms.until((e) => contents(e).includes('end'));
  await bs.until((e) => contents(e).includes('end'));
  const br = subscribe(bc.client, cursor, DELETED_Q);
  await br.until((e) => contents(e).includes('end'), 5000, 'the replay');
  const got = { mod: deleted(ms.events), blind: deleted(bs.events), blindReplay: deleted(br.events) };
  const saw = { mod: contents(ms.events), blind: contents(bs.events), blindReplay: contents(br.events) };
  // Uncategorized, the channel keeps the category's overwrites (copied to it): still hidden.
  const query = `query($c: ID!) { channel(id: $c) { id } }`;
  await fails(app, 'NOT_FOUND', query, { c: left }, blind.token);
  assert.equal((await ok(app, query, { c: left }, mod.token)).channel.id, left);
  await Promise.all([mc.client.dispose(), bc.client.dispose()]);
  assert.deepEqual(got, { mod: [inner, cat], blind: [], blindReplay: [] });
  assert.deepEqual(saw, {
    mod: ['cursor', 'still here', 'end'],
    blind: ['cursor', 'end'],
    blindReplay: ['end'],
  });
});

it('a category whose overwrites its channels cannot take exactly (they have their own) is not deleted: CONFLICT, nothing changed', async () => {
  const [o] = await Promise.all([signUp(app)]);
  const { guildId } = await guildWithChannel(app, o.token);
  const cat = await createChannel(o.token, guildId, 'staff', 'CATEGORY');
  await hideFromEveryone(o.token, guildId, cat);
  const child = await ok(
    app,
    `mutation($g: ID!, $p: ID!) { createChannel(input: { guildId: $g, name: "own", type: TEXT, parentId: $p }) { id } }`,
    { g: guildId, p: cat },
    o.token,
  );
  const id = child.createChannel.id as string;
  const everyone = await everyoneRole(o.token, guildId);
  await overwrite(o.token, {
    channelId: id,
    targetType: 'ROLE',
    targetId: everyone,
    allow: [],
    deny: ['SEND_MESSAGES'],
  });
  const e = await fails(app, 'CONFLICT', `mutation($c: ID!) { deleteChannel(id: $c) }`, { c: cat }, o.token);
  assert.match(e.message, /#own/);
  const q = `query($c: ID!) { channel(id: $c) { id parent { id } } }`;
  assert.equal((await ok(app, q, { c: id }, o.token)).channel.parent.id, cat);
  // Once its own overwrite is cleared, the category goes and the channel keeps its copies.
  await ok(
    app,
    `mutation($c: ID!, $t: ID!) { removeChannelOverwrite(channelId: $c, targetId: $t) }`,
    { c: id, t: everyone },
    o.token,
  );
  await ok(app, `mutation($c: ID!) { deleteChannel(id: $c) }`, { c: cat }, o.token);
  assert.equal((await ok(app, q, { c: id }, o.token)).channel.parent, null);
});

it('a CHANNEL_DELETED written the old way (no overwrites in its payload, by an instance not yet upgraded) reaches every member, live and in replay', async () => {
  const [o, member, stranger] = await Promise.all(Array.from({ length: 3 }, () => signUp(app)));
  const { guildId, channelId: general } = await guildWithChannel(app, o.token);
  const strangers = (await guildWithChannel(app, stranger.token)).channelId;
  await invite(app, o.token, guildId, member.token);
  const secret = await createChannel(o.token, guildId, 'secret');
  await hideFromEveryone(o.token, guildId, secret);
  const mc = connect(url, member.token);
  const sc = connect(url, stranger.token);
  const ms = subscribe(mc.client, null, DELETED_Q);
  const ss = subscribe(sc.client, null, DELETED_Q);
  await untilLive(app, [member, stranger]);
  await send(app, o.token, general, 'cursor');
  await ms.until((e) => contents(e).includes('cursor'));
  const cursor = ms.events.at(-1).cursor;
  const [gid, cid] = [decodeAnyId(guildId).id, decodeAnyId(secret).id];
  await app.deps.db.execute(
    sql`insert into events (type, guild_id, channel_id, payload) values ('CHANNEL_DELETED', ${gid}::uuid, ${cid}::uuid, ${JSON.stringify({ channelId: cid })}::jsonb)`,
  );
  await app.deps.realtime!.poke();
  await ms.until((e) => deleted(e).includes(secret), 5000, 'old-format ChannelDeleted live');
  const mr = subscribe(mc.client, cursor, DELETED_Q);
  await mr.until((e) => deleted(e).includes(secret), 5000, 'old-format ChannelDeleted replayed');
  const sr = subscribe(sc.client, cursor, DELETED_Q);
  const [live, replayed] = await throughMarker(app, stranger.token, strangers, [ss, sr]);
  const got = { stranger: live, strangerReplay: replayed };
  await Promise.all([mc.client.dispose(), sc.client.dispose()]);
  assert.deepEqual(got, { stranger: [], strangerReplay: [] });
});

// Found by a review of the 2026-12-06 changes: a deleted category's channels named to members they
// are hidden from, live rows re-read after the catch-up bound judged as replayed, and a deletion's
// recorded overwrites racing an overwrite change.
const REVIEW_Q = `subscription($after: String) { events(after: $after) { __typename cursor
  ... on MessageCreated { message { content } }
  ... on PermissionsChanged { channelId }
  ... on ChannelDeleted { deletedId: channelId }
} }`;

it('deleting a category tells no member about a channel of it that stays hidden from that member (no PermissionsChanged naming it), live or in replay', async () => {
  const [o, blind] = await Promise.all([signUp(app), signUp(app)]);
  const { guildId, channelId: general } = await guildWithChannel(app, o.token);
  await invite(app, o.token, guildId, blind.token);
  const cat = await createChannel(o.token, guildId, 'staff', 'CATEGORY');
  await overwrite(o.token, {
    channelId: cat,
    targetType: 'ROLE',
    targetId: await everyoneRole(o.token, guildId),
    allow: [],
    deny: ['VIEW_CHANNEL'],
  });
  const hidden = await createChannel(o.token, guildId, 'hidden', 'TEXT', cat);
  const bc = connect(url, blind.token);
  try {
    const live = subscribe(bc.client, null, REVIEW_Q);
    await untilLive(app, [blind]);
    await send(app, o.token, general, 'cursor');
    await live.until((e) => contents(e).includes('cursor'), 10_000, 'cursor');
    const cursor = live.events.at(-1).cursor as string;
    await ok(app, `mutation($c: ID!) { deleteChannel(id: $c) }`, { c: cat }, o.token);
    await send(app, o.token, general, 'end');
    await live.until((e) => contents(e).includes('end'), 10_000, 'end (live)');
    const replay = subscribe(bc.client, cursor, REVIEW_Q);
    await replay.until((e) => contents(e).includes('end'), 10_000, 'end (replay)');
    // The channel is still hidden from `blind` (the category's overwrites were copied to it) ...
    await fails(app, 'NOT_FOUND', `query($c: ID!) { channel(id: $c) { id } }`, { c: hidden }, blind.token);
    // ... so nothing should name it to `blind`.
    const naming = (events: any[]) =>
      events.filter((e) => e.channelId === hidden || e.deletedId === hidden).map((e) => e.__typename);
    assert.deepEqual(
      { live: naming(live.events), replay: naming(replay.events) },
      { live: [], replay: [] },
      'events naming a channel hidden from the viewer',
    );
  } finally {
    await bc.client.dispose();
  }
});

interface NoHistory {
  o: TestUser;
  v: TestUser;
  vId: string;
  general: string;
  nohist: string;
  cursor: string;
  anchor: string;
}

/** A guild where `v` may view `nohist` but not read its history; a cursor of `v`'s in `general`. */
async function noHistoryGuild(hub: Hub): Promise<NoHistory> {
  const [o, v] = await Promise.all([signUp(app), signUp(app)]);
  const { guildId, channelId: general } = await guildWithChannel(app, o.token);
  await invite(app, o.token, guildId, v.token);
  const nohist = await createChannel(o.token, guildId, 'nohist');
  await denyToEveryone(o.token, guildId, nohist, 'READ_HISTORY');
  const vId = decodeAnyId(v.id).id;
  const live = await hub.subscribe({ userId: vId }, null);
  try {
    const anchor = await send(app, o.token, general, 'anchor');
    await hub.poke();
    const r = await within(live.next(), 5000);
    assert.notEqual(r, 'timeout');
    const cursor = (r as IteratorResult<Delivered>).value.cursor as string;
    return { o, v, vId, general, nohist, cursor, anchor: decodeAnyId(anchor).id };
  } finally {
    await live.return!();
  }
}

/** Reads `sub` until the message `endId` comes (bounded): the message ids it delivered. */
async function readUntil(sub: Subscription, endId: string): Promise<string[]> {
  const got: string[] = [];
  for (let i = 0; i < 500; i++) {
    const r = await within(sub.next(), 10_000);
    assert.notEqual(r, 'timeout', `stalled after ${got.length}`);
    const step = r as IteratorResult<Delivered>;
    assert.equal(step.done, false, 'the stream ended');
    if (step.value.type === 'MESSAGE_CREATED') got.push(String(step.value.payload.messageId));
    if (step.value.payload.messageId === endId) return got;
  }
  throw new Error('no end');
}

for (const liveCount of [2, 8]) {
  it(`messages sent while a resumed subscriber replays reach it live whatever their number (${liveCount}; hold limit 4): a member who may view a channel without READ_HISTORY`, {
    timeout: 60_000,
  }, async () => {
    const hub = app.deps.realtime!;
    const s = await noHistoryGuild(hub);
    // A backlog the replay pauses in (a window of 4 rows, the consumer not reading yet).
    await app.deps.db.execute(sql`insert into events (type, guild_id, channel_id, payload)
      select 'MESSAGE_UPDATED', c.guild_id, c.id, jsonb_build_object('messageId', ${s.anchor}::text, 'n', i)
      from channels c, generate_series(1, 20) i where c.id = ${decodeAnyId(s.general).id}::uuid`);
    await hub.poke();
    hub.configure({ maxPending: 16 }); // hold limit 4, replay window 4
    let sub: Subscription | undefined;
    try {
      sub = (await hub.subscribe({ userId: s.vId }, s.cursor)) as Subscription;
      // Paused: its window (4) of replayed rows is out, the consumer not reading yet.
      for (let i = 0; i < 500 && sub.delivered < 4; i++) await sleep(20);
      assert.equal(sub.delivered, 4, 'a window of replayed rows out');
      assert.equal(sub.replaying, true, 'paused in its replay');
      // Sent while it is subscribed (after its registration), in a channel it may view.
      const liveIds: string[] = [];
      for (let i = 0; i < liveCount; i++)
        liveIds.push(decodeAnyId(await send(app, s.o.token, s.nohist, `live ${i}`)).id);
      await hub.poke();
      const end = decodeAnyId(await send(app, s.o.token, s.general, 'end')).id;
      await hub.poke();
      const got = await readUntil(sub, end);
      assert.deepEqual(
        liveIds.filter((id) => !got.includes(id)),
        [],
        `live messages in a channel the viewer may view, lost (restarts: ${sub.restarts})`,
      );
    } finally {
      await sub?.return();
      hub.configure({ maxPending: 5000 });
    }
  });
}

it('a channel deleted while an overwrite change that shows it to a member commits: the member, who could view it just before the deletion, is told of the deletion', {
  skip: process.env.BANTER_TEST_DB !== 'postgres',
  timeout: 60_000,
}, async () => {
  const pg = (await import('pg')).default;
  const [o, m] = await Promise.all([signUp(app), signUp(app)]);
  const { guildId, channelId: general } = await guildWithChannel(app, o.token);
  await invite(app, o.token, guildId, m.token);
  const secret = await createChannel(o.token, guildId, 'secret');
  const everyone = await everyoneRole(o.token, guildId);
  await overwrite(o.token, {
    channelId: secret,
    targetType: 'ROLE',
    targetId: everyone,
    allow: [],
    deny: ['VIEW_CHANNEL'],
  });
  const mc = connect(url, m.token);
  const other = new pg.Client({ connectionString: app.config.databaseUrl });
  const stall = new pg.Client({ connectionString: app.config.databaseUrl });
  await other.connect();
  await stall.connect();
  try {
    const live = subscribe(mc.client, null, REVIEW_Q);
    await untilLive(app, [m]);
    await send(app, o.token, general, 'start');
    await live.until((e) => contents(e).includes('start'), 10_000, 'start');
    const [g, c, r] = [decodeAnyId(guildId).id, decodeAnyId(secret).id, decodeAnyId(everyone).id];
    // Only to hold the deletion's transaction open after its cascade (its audit row waits).
    await stall.query('begin');
    await stall.query('lock table audit_log in share mode');
    // removeChannelOverwrite's statements (overwriteGuard's lock on the channel first), its
    // transaction still open: @everyone may view it again.
    await other.query('begin');
    await other.query('select 1 from channels where id = $1 for share', [c]);
    await other.query('delete from permission_overwrites where channel_id = $1 and target_id = $2', [c, r]);
    await other.query(
      `insert into events (type, guild_id, channel_id, payload) values ('PERMISSIONS_CHANGED', $1::uuid, $2::uuid,
        jsonb_build_object('channelId', $3::text, 'targetType', 'ROLE', 'targetId', $4::text))`,
      [g, c, c, r],
    );
    // deleteChannel reads the overwrites (the @everyone deny: not committed away yet), then waits.
    const deleting = ok(app, `mutation($c: ID!) { deleteChannel(id: $c) }`, { c: secret }, o.token);
    assert.equal(await blockedBy(other, 1), 1, 'the deletion waits on the overwrite change');
    await other.query('commit');
    assert.equal(await blockedBy(stall, 1), 1, 'the deletion waits on its audit row');
    // Just before the deletion commits, `m` may view the channel: its client now shows it.
    const seen = await ok(app, `query($c: ID!) { channel(id: $c) { id } }`, { c: secret }, m.token);
    assert.equal(seen.channel.id, secret);
    await stall.query('commit');
    await deleting;
    await send(app, o.token, general, 'end');
    await live.until((e) => contents(e).includes('end'), 10_000, 'end');
    assert.deepEqual(
      live.events.filter((e) => e.deletedId === secret).map((e) => e.__typename),
      ['ChannelDeleted'],
      'the deletion of a channel the member could view (and had just fetched)',
    );
  } finally {
    await other.query('rollback').catch(() => {});
    await stall.query('rollback').catch(() => {});
    await other.end();
    await stall.end();
    await mc.client.dispose();
  }
});

/**
 * Runs `during` while `deleteChannel(id)` is held open after its locks (a share lock on audit_log
 * stalls its audit row), then lets the deletion commit: what `during` started settles after it.
 */
async function whileDeleting<T>(token: string, id: string, during: () => Promise<T>) {
  const pg = (await import('pg')).default;
  const stall = new pg.Client({ connectionString: app.config.databaseUrl });
  await stall.connect();
  try {
    await stall.query('begin');
    await stall.query('lock table audit_log in share mode');
    const deleting = ok(app, `mutation($c: ID!) { deleteChannel(id: $c) }`, { c: id }, token);
    assert.equal(await blockedBy(stall, 1), 1, 'the deletion waits on its audit row');
    let settled = false;
    const started = during().finally(() => {
      settled = true;
    });
    // What it started waits on the deletion, or is answered (while the deletion is uncommitted).
    let waits = 0;
    for (let i = 0; i < 200 && !settled && waits < 2; i++) {
      waits = await lockWaiters(stall, 2, '%', 0);
      if (waits < 2) await sleep(50);
    }
    assert.ok(settled || waits === 2, 'what `during` started is neither answered nor waiting');
    await stall.query('commit');
    await deleting;
    return await started;
  } finally {
    await stall.query('rollback').catch(() => {});
    await stall.end();
  }
}

/** How many channels have `parentId` as their parent (Postgres: a direct query). */
async function childrenOf(parentId: string) {
  const r = await app.deps.db.execute(
    sql`select count(*)::int as n from channels where parent_id = ${decodeAnyId(parentId).id}::uuid`,
  );
  return (r as unknown as { rows: { n: number }[] }).rows[0].n;
}

const onlyPostgres = { skip: process.env.BANTER_TEST_DB !== 'postgres', timeout: 60_000 };

it(
  'a thread started while its channel is being deleted is refused, not left behind without its channel',
  onlyPostgres,
  async () => {
    const o = await signUp(app);
    const { guildId } = await guildWithChannel(app, o.token);
    const doomed = await createChannel(o.token, guildId, 'doomed');
    const source = await send(app, o.token, doomed, 'start a thread here');
    const started = await whileDeleting(o.token, doomed, () =>
      gql(
        app,
        `mutation($m: ID!, $n: String!) { startThread(messageId: $m, name: $n) { id } }`,
        { m: source, n: 'too late' },
        { token: o.token },
      ),
    );
    assert.equal(started.errors?.[0]?.extensions?.code, 'NOT_FOUND', JSON.stringify(started));
    assert.equal(await childrenOf(doomed), 0, 'threads left behind without their channel');
  },
);

it(
  'a channel created in, or moved into, a private category while it is being deleted is refused, not left public',
  onlyPostgres,
  async () => {
    const [o, blind] = await Promise.all([signUp(app), signUp(app)]);
    const { guildId } = await guildWithChannel(app, o.token);
    await invite(app, o.token, guildId, blind.token);
    const moving = await createChannel(o.token, guildId, 'moving');
    const tries = {
      create: (cat: string) =>
        gql(
          app,
          `mutation($g: ID!, $p: ID!) { createChannel(input: { guildId: $g, name: "late", type: TEXT, parentId: $p }) { id } }`,
          { g: guildId, p: cat },
          { token: o.token },
        ),
      move: (cat: string) =>
        gql(
          app,
          `mutation($c: ID!, $p: ID!) { updateChannel(input: { id: $c, parentId: $p }) { id } }`,
          { c: moving, p: cat },
          { token: o.token },
        ),
    };
    for (const [what, attempt] of Object.entries(tries)) {
      const cat = await createChannel(o.token, guildId, `staff-${what}`, 'CATEGORY');
      await hideFromEveryone(o.token, guildId, cat);
      const r = await whileDeleting(o.token, cat, () => attempt(cat));
      assert.equal(r.errors?.[0]?.extensions?.code, 'NOT_FOUND', `${what}: ${JSON.stringify(r)}`);
      assert.equal(await childrenOf(cat), 0, `${what}: a channel left in a deleted category`);
    }
    // The move was refused whole: the channel is where it was, as it was.
    const c = await ok(
      app,
      `query($c: ID!) { channel(id: $c) { id parent { id } } }`,
      { c: moving },
      blind.token,
    );
    assert.deepEqual(c.channel, { id: moving, parent: null });
  },
);
