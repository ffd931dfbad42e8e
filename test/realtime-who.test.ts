/**
 * Who is told what on the stream, beyond realtime-access: DMs and group DMs, blocks, threads,
 * read state, reactions and pins in hidden channels, roles against overwrites, history a member
 * may not read, and what a subscription's fields resolve.
 */
import assert from 'node:assert/strict';
import { after, before, it } from 'node:test';
import { createTestApp, fails, gql, ok, signUp, type TestApp, type TestUser } from './helpers.ts';
import {
  channelAccessHelpers,
  connect,
  guildWithChannel,
  invite,
  send,
  subscribe,
  throughMarker,
  throughTypingMarker,
  untilLive,
  withoutMarkers,
} from './realtime-helpers.ts';

let app: TestApp;
let url: string;
before(async () => {
  app = await createTestApp({ rateLimits: false });
  url = `ws://127.0.0.1:${await app.start(0)}/graphql`;
});
after(() => app.destroy());

const { everyoneRole, overwrite, createChannel, hideFromEveryone, denyToEveryone } = channelAccessHelpers(
  () => app,
);

const Q = `subscription($after: String) { events(after: $after) { __typename cursor
  ... on MessageCreated { message { id content channel { id } replyTo { id content } } }
  ... on MessageUpdated { message { id content } }
  ... on MessageDeleted { messageId channelId }
  ... on ReactionAdded { emoji message { id content } }
  ... on MessagePinned { message { id content } }
  ... on ChannelCreated { channel { id name } }
  ... on ChannelUpdated { channel { id name } }
  ... on PermissionsChanged { guildId pcChannel: channelId }
  ... on ReadStateUpdated { channelId lastReadMessageId }
  ... on DirectChannelCreated { channel { id } }
  ... on TypingStarted { channelId user { id } }
  ... on MemberUpdated { guildId user { id } }
  ... on RoleUpdated { roleId }
} }`;

const contents = (events: any[]) =>
  events.filter((e) => e.__typename === 'MessageCreated').map((e) => e.message.content as string);

/** Opens a socket and subscribes; `close` disposes of it. */
function streamOf(u: TestUser, after: string | null = null, query = Q) {
  const c = connect(url, u.token);
  const s = subscribe(c.client, after, query);
  return Object.assign(s, { close: () => c.client.dispose() });
}

async function createRole(token: string, guildId: string, name: string, permissions: string[]) {
  const r = await ok(
    app,
    `mutation($i: CreateRoleInput!) { createRole(input: $i) { id } }`,
    { i: { guildId, name, permissions } },
    token,
  );
  return r.createRole.id as string;
}
async function assignRole(token: string, guildId: string, roleId: string, userId: string, on = true) {
  await ok(
    app,
    `mutation($g: ID!, $r: ID!, $u: ID!) { ${on ? 'assignRole' : 'unassignRole'}(guildId: $g, roleId: $r, userId: $u) }`,
    { g: guildId, r: roleId, u: userId },
    token,
  );
}
async function openDm(token: string, ids: string[]) {
  const r = await ok(
    app,
    `mutation($u: [ID!]!) { openDirectChannel(userIds: $u) { id } }`,
    { u: ids },
    token,
  );
  return r.openDirectChannel.id as string;
}
async function sendReply(token: string, channelId: string, content: string, replyToId: string) {
  const r = await ok(
    app,
    `mutation($i: SendMessageInput!) { sendMessage(input: $i) { id } }`,
    { i: { channelId, content, replyToId } },
    token,
  );
  return r.sendMessage.id as string;
}

it('DMs and group DMs: messages, reactions and the opening go to their recipients only, live and in replay', async () => {
  const [a, b, c, stranger] = await Promise.all([signUp(app), signUp(app), signUp(app), signUp(app)]);
  // Each user's own guild, for the markers that end the negative checks (see throughMarker).
  const own = new Map<TestUser, string>();
  for (const u of [a, b, c, stranger]) own.set(u, (await guildWithChannel(app, u.token)).channelId);
  const sa = streamOf(a);
  const sb = streamOf(b);
  const sc = streamOf(c);
  const ss = streamOf(stranger);
  try {
    await untilLive(app, [a, b, c, stranger]);
    const dm = await openDm(a.token, [b.id]);
    const group = await openDm(a.token, [b.id, c.id]);
    await send(app, a.token, dm, 'dm-1');
    await send(app, b.token, group, 'group-1');
    const m = await send(app, a.token, dm, 'dm-2');
    await ok(app, `mutation($m: ID!) { addReaction(messageId: $m, emoji: "👍") { id } }`, { m }, b.token);
    const [[la], [lb], [lc], [ls]] = await Promise.all(
      (
        [
          [a, sa],
          [b, sb],
          [c, sc],
          [stranger, ss],
        ] as const
      ).map(([u, s]) => throughMarker(app, u.token, own.get(u)!, [s])),
    );
    const opened = (events: any[]) =>
      events.filter((x) => x.__typename === 'DirectChannelCreated').map((x) => x.channel.id);
    assert.deepEqual(opened(la), [dm, group]);
    assert.deepEqual(opened(lb), [dm, group]);
    assert.deepEqual(opened(lc), [group], 'c is told of the group only');
    assert.deepEqual(contents(lb), ['dm-1', 'group-1', 'dm-2']);
    assert.deepEqual(contents(lc), ['group-1'], 'c sees nothing of the 1:1 DM');
    assert.deepEqual(ls, [], 'a stranger hears nothing');
    // A replay from the start of it all: the same, read from the log.
    const first = sa.events[0].cursor;
    const rc = streamOf(c, first);
    const rs = streamOf(stranger, first);
    const [[replayedC], [replayedS]] = await Promise.all([
      throughMarker(app, c.token, own.get(c)!, [rc]),
      throughMarker(app, stranger.token, own.get(stranger)!, [rs]),
    ]);
    assert.deepEqual(contents(replayedC), ['group-1']);
    assert.ok(!replayedC.some((x) => x.__typename === 'ReactionAdded'));
    assert.deepEqual(replayedS, []);
    await Promise.all([rc.close(), rs.close()]);
  } finally {
    await Promise.all([sa.close(), sb.close(), sc.close(), ss.close()]);
  }
});

it("read state goes to the reader's other devices only, live and in replay", async () => {
  const [o, m] = await Promise.all([signUp(app), signUp(app)]);
  const { guildId, channelId } = await guildWithChannel(app, o.token);
  await invite(app, o.token, guildId, m.token);
  const own1 = streamOf(m);
  const own2 = streamOf(m);
  const other = streamOf(o);
  try {
    await untilLive(app, [m], 2);
    await untilLive(app, [o]);
    const msg = await send(app, o.token, channelId, 'read me');
    await ok(
      app,
      `mutation($c: ID!, $m: ID!) { markRead(channelId: $c, messageId: $m) { id } }`,
      { c: channelId, m: msg },
      m.token,
    );
    await send(app, o.token, channelId, 'end');
    for (const s of [own1, own2, other]) await s.until((e) => contents(e).includes('end'));
    const reads = (s: { events: any[] }) =>
      s.events.filter((x) => x.__typename === 'ReadStateUpdated').length;
    assert.equal(reads(own1), 1);
    assert.equal(reads(own2), 1);
    assert.equal(reads(other), 0, 'the owner is not told what m read');
    const replay = streamOf(o, other.events[0].cursor);
    await replay.until((e) => contents(e).includes('end'));
    assert.equal(reads(replay), 0);
    await replay.close();
  } finally {
    await Promise.all([own1.close(), own2.close(), other.close()]);
  }
});

it('a thread of a channel hidden from a member, and reactions and pins there, reach who sees the channel only', async () => {
  const [o, seer, denied] = await Promise.all([signUp(app), signUp(app), signUp(app)]);
  const { guildId, channelId: general } = await guildWithChannel(app, o.token);
  for (const u of [seer, denied]) await invite(app, o.token, guildId, u.token);
  const secret = await createChannel(o.token, guildId, 'secret');
  await overwrite(o.token, {
    channelId: secret,
    targetType: 'MEMBER',
    targetId: denied.id,
    allow: [],
    deny: ['VIEW_CHANNEL'],
  });
  const src = await send(app, o.token, secret, 'thread source');
  const ss = streamOf(seer);
  const ds = streamOf(denied);
  try {
    await untilLive(app, [seer, denied]);
    const t = await ok(
      app,
      `mutation($m: ID!) { startThread(messageId: $m, name: "t") { id } }`,
      { m: src },
      o.token,
    );
    const thread = t.startThread.id as string;
    await send(app, o.token, thread, 'in thread');
    await ok(
      app,
      `mutation($m: ID!) { addReaction(messageId: $m, emoji: "🎉") { id } }`,
      { m: src },
      o.token,
    );
    await ok(app, `mutation($m: ID!) { pinMessage(messageId: $m) { id } }`, { m: src }, o.token);
    await send(app, o.token, general, 'end');
    await ss.until((e) => contents(e).includes('end'));
    await ds.until((e) => contents(e).includes('end'));
    assert.deepEqual(
      ss.events.map((x) => x.__typename),
      ['ChannelCreated', 'MessageCreated', 'ReactionAdded', 'MessagePinned', 'MessageCreated'],
    );
    assert.deepEqual(
      ds.events.map((x) => x.__typename),
      ['MessageCreated'],
      'the denied member hears only of general',
    );
    const replay = streamOf(denied, ss.events[0].cursor);
    await replay.until((e) => contents(e).includes('end'));
    assert.deepEqual(contents(replay.events), ['end']);
    await replay.close();
  } finally {
    await Promise.all([ss.close(), ds.close()]);
  }
});

it('@everyone denied, a role allowed: the role starts and stops delivery at once; ADMINISTRATOR and the owner see it', async () => {
  const [o, r, admin, plain] = await Promise.all([signUp(app), signUp(app), signUp(app), signUp(app)]);
  const { guildId, channelId: general } = await guildWithChannel(app, o.token);
  for (const u of [r, admin, plain]) await invite(app, o.token, guildId, u.token);
  const staff = await createChannel(o.token, guildId, 'staff');
  await hideFromEveryone(o.token, guildId, staff);
  const role = await createRole(o.token, guildId, 'staff', []);
  await overwrite(o.token, {
    channelId: staff,
    targetType: 'ROLE',
    targetId: role,
    allow: ['VIEW_CHANNEL'],
    deny: [],
  });
  const adminRole = await createRole(o.token, guildId, 'admin', ['ADMINISTRATOR']);
  await assignRole(o.token, guildId, adminRole, admin.id);
  const streams = { o: streamOf(o), r: streamOf(r), admin: streamOf(admin), plain: streamOf(plain) };
  try {
    await untilLive(app, [o, r, admin, plain]);
    await send(app, o.token, staff, 's0');
    // Access is judged when a row is delivered: s0 must be (to the owner, and judged for r) before
    // r gets the role, which would let it read s0 then.
    // r has judged s0 once its marker, logged after s0, has reached it.
    await streams.o.until((e) => contents(e).includes('s0'));
    await throughMarker(app, o.token, general, [streams.r]);
    await assignRole(o.token, guildId, role, r.id);
    await send(app, o.token, staff, 's1');
    // Delivery checks access when a row is delivered: s1 must reach r before the role goes.
    await streams.r.until((e) => contents(e).includes('s1'));
    await assignRole(o.token, guildId, role, r.id, false);
    await send(app, o.token, staff, 's2');
    await send(app, o.token, general, 'end');
    for (const s of Object.values(streams)) await s.until((e) => contents(e).includes('end'));
    const got = Object.entries(streams).map(([k, s]) => [k, contents(withoutMarkers(s.events))]);
    assert.deepEqual(Object.fromEntries(got), {
      o: ['s0', 's1', 's2', 'end'],
      r: ['s1', 'end'],
      admin: ['s0', 's1', 's2', 'end'],
      plain: ['end'],
    });
  } finally {
    await Promise.all(Object.values(streams).map((s) => s.close()));
  }
});

it('kicked, then invited again: delivery stops, then starts again on the same socket', async () => {
  const [o, k] = await Promise.all([signUp(app), signUp(app)]);
  const { guildId, channelId } = await guildWithChannel(app, o.token);
  await invite(app, o.token, guildId, k.token);
  const own = (await guildWithChannel(app, k.token)).channelId;
  const ks = streamOf(k);
  const os = streamOf(o);
  try {
    await untilLive(app, [k, o]);
    await send(app, o.token, channelId, 'k1');
    await ks.until((e) => contents(e).includes('k1'));
    await ok(
      app,
      `mutation($g: ID!, $u: ID!) { kickMember(guildId: $g, userId: $u) }`,
      { g: guildId, u: k.id },
      o.token,
    );
    await send(app, o.token, channelId, 'gap');
    // Access is judged when a row is delivered: 'gap' must be delivered (to the owner, and judged
    // for k) before k is a member again, who may read it then. A log held back by a transaction
    // of another suite on the server delivered it after the invite once. k has judged it once its
    // marker, logged after it, has reached it.
    await os.until((e) => contents(e).includes('gap'));
    await throughMarker(app, k.token, own, [ks]);
    await invite(app, o.token, guildId, k.token);
    await send(app, o.token, channelId, 'k2');
    await ks.until((e) => contents(e).includes('k2'));
    assert.deepEqual(contents(withoutMarkers(ks.events)), ['k1', 'k2']);
  } finally {
    await Promise.all([ks.close(), os.close()]);
  }
});

// ---- defects ----

it('a member who may view a channel but not read its history is not shown old messages through live reactions, pins, replies or a thread', async () => {
  const [o, v] = await Promise.all([signUp(app), signUp(app)]);
  const { guildId, channelId } = await guildWithChannel(app, o.token);
  await denyToEveryone(o.token, guildId, channelId, 'READ_HISTORY');
  // Sent before v joined: v never saw it, and may not read it (message(id) refuses).
  const old = await send(app, o.token, channelId, 'old secret');
  await invite(app, o.token, guildId, v.token);
  await fails(app, 'FORBIDDEN', `query($m: ID!) { message(id: $m) { content } }`, { m: old }, v.token);
  const vs = streamOf(v);
  try {
    await untilLive(app, [v]);
    await ok(
      app,
      `mutation($m: ID!) { addReaction(messageId: $m, emoji: "🔥") { id } }`,
      { m: old },
      o.token,
    );
    await ok(app, `mutation($m: ID!) { pinMessage(messageId: $m) { id } }`, { m: old }, o.token);
    await sendReply(o.token, channelId, 'a reply', old);
    const t = await ok(
      app,
      `mutation($m: ID!) { startThread(messageId: $m, name: "t") { id } }`,
      { m: old },
      o.token,
    );
    await vs.until(
      (e) => contents(e).includes('a reply') && e.some((x) => x.__typename === 'ChannelCreated'),
    );
    const shown = vs.events.filter((x) => JSON.stringify(x).includes('old secret')).map((x) => x.__typename);
    // The same load (MessageRef: visible is enough) serves a thread's sourceMessage to queries.
    const q = `query($c: ID!) { channel(id: $c) { sourceMessage { content } } }`;
    const source = (await ok(app, q, { c: t.startThread.id }, v.token)).channel.sourceMessage;
    assert.deepEqual({ shown, source }, { shown: [], source: null }, 'the old message is shown');
  } finally {
    await vs.close();
  }
});

it('a member who may view a channel but not read its history gets the edits, reactions and pins of messages sent since it joined', async () => {
  const [o, v] = await Promise.all([signUp(app), signUp(app)]);
  const { guildId, channelId } = await guildWithChannel(app, o.token);
  await denyToEveryone(o.token, guildId, channelId, 'READ_HISTORY');
  await invite(app, o.token, guildId, v.token);
  const vs = streamOf(v);
  try {
    await untilLive(app, [v]);
    const fresh = await send(app, o.token, channelId, 'fresh');
    // Delivered before the edit is made: a row read after it would carry the message as it is
    // then (edited), which is allowed, and not what this test is about.
    await vs.until((e) => e.some((x) => x.__typename === 'MessageCreated' && x.message.id === fresh));
    await ok(
      app,
      `mutation($i: EditMessageInput!) { editMessage(input: $i) { id } }`,
      { i: { id: fresh, content: 'fresh, edited' } },
      o.token,
    );
    await ok(
      app,
      `mutation($m: ID!) { addReaction(messageId: $m, emoji: "👍") { id } }`,
      { m: fresh },
      o.token,
    );
    await ok(app, `mutation($m: ID!) { pinMessage(messageId: $m) { id } }`, { m: fresh }, o.token);
    await vs.until((e) => e.some((x) => x.__typename === 'MessagePinned'));
    assert.deepEqual(
      vs.events.filter((x) => x.message?.id === fresh).map((x) => `${x.__typename} ${x.message.content}`),
      [
        'MessageCreated fresh',
        'MessageUpdated fresh, edited',
        'ReactionAdded fresh, edited',
        'MessagePinned fresh, edited',
      ],
    );
  } finally {
    await vs.close();
  }
});

it('an overwrite on a channel hidden from a member by its category (for @everyone, or for a role it holds) does not name that channel to it', async () => {
  const [o, m] = await Promise.all([signUp(app), signUp(app)]);
  const { guildId, channelId: general } = await guildWithChannel(app, o.token);
  await invite(app, o.token, guildId, m.token);
  const cat = await createChannel(o.token, guildId, 'staff-cat', 'CATEGORY');
  await hideFromEveryone(o.token, guildId, cat);
  const hidden = await createChannel(o.token, guildId, 'staff-only', 'TEXT', cat);
  const role = await createRole(o.token, guildId, 'muted', []);
  await assignRole(o.token, guildId, role, m.id);
  await fails(app, 'NOT_FOUND', `query($c: ID!) { channel(id: $c) { id } }`, { c: hidden }, m.token);
  const ms = streamOf(m);
  try {
    await untilLive(app, [m]);
    const everyone = await everyoneRole(o.token, guildId);
    // Neither changes what m may see: the category hides the channel from it before and after.
    await overwrite(o.token, {
      channelId: hidden,
      targetType: 'ROLE',
      targetId: everyone,
      allow: [],
      deny: ['ADD_REACTIONS'],
    });
    await overwrite(o.token, {
      channelId: hidden,
      targetType: 'ROLE',
      targetId: role,
      allow: [],
      deny: ['SEND_MESSAGES'],
    });
    await overwrite(o.token, {
      channelId: hidden,
      targetType: 'MEMBER',
      targetId: m.id,
      allow: [],
      deny: ['ATTACH_FILES'],
    });
    await send(app, o.token, general, 'end');
    await ms.until((e) => contents(e).includes('end'));
    await fails(app, 'NOT_FOUND', `query($c: ID!) { channel(id: $c) { id } }`, { c: hidden }, m.token);
    const named = ms.events.filter((x) => x.__typename === 'PermissionsChanged');
    assert.deepEqual(named, [], 'm is told of a channel it never could see');
  } finally {
    await ms.close();
  }
});

it('a user blocked in a 1:1 DM, who may not send there, does not show the blocker that it is typing', async () => {
  const [blocker, blocked, typist] = await Promise.all([signUp(app), signUp(app), signUp(app)]);
  const dm = await openDm(blocker.token, [blocked.id]);
  // A channel of the blocker's where `typist` types the marker (see throughTypingMarker).
  const side = await guildWithChannel(app, blocker.token);
  await invite(app, blocker.token, side.guildId, typist.token);
  await ok(app, `mutation($u: ID!) { blockUser(userId: $u) { kind } }`, { u: blocked.id }, blocker.token);
  await fails(
    app,
    'FORBIDDEN',
    `mutation($i: SendMessageInput!) { sendMessage(input: $i) { id } }`,
    { i: { channelId: dm, content: 'hi' } },
    blocked.token,
  );
  const bs = streamOf(blocker);
  try {
    await untilLive(app, [blocker]);
    // Whatever it answers (the block is not revealed), nothing reaches the blocker.
    await gql(app, `mutation($c: ID!) { startTyping(channelId: $c) }`, { c: dm }, { token: blocked.token });
    const [seen] = await throughTypingMarker(app, typist, side.channelId, [bs]);
    const typing = seen.filter((x) => x.__typename === 'TypingStarted');
    assert.deepEqual(typing, [], 'the blocker sees the blocked user typing');
  } finally {
    await bs.close();
  }
});

it("a user's presence is not shown to a stranger who shares no guild or DM with it (as the stream has it)", async () => {
  const [a, stranger] = await Promise.all([signUp(app), signUp(app)]);
  const sa = streamOf(a);
  try {
    await untilLive(app, [a]);
    const q = `query($id: ID!) { user(id: $id) { presence { status } } }`;
    const r = await ok(app, q, { id: a.id }, stranger.token);
    assert.equal(r.user.presence.status, 'OFFLINE', 'a stranger reads that a is online');
  } finally {
    await sa.close();
  }
});
