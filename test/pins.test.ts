import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import { and, eq, inArray, isNotNull, sql } from 'drizzle-orm';
import {
  auditLog,
  events,
  memberRoles,
  members,
  messages,
  permissionOverwrites,
  roles,
} from '../core/db/tables.ts';
import { newId } from '../core/ids.ts';
import { Permission } from '../core/permissions.ts';
import { decodeAnyId, encodeId } from '../schema/builder.ts';
import { createTestApp, fails, gql, ok, signUp, type TestApp, type TestUser } from './helpers.ts';

let app: TestApp;
let owner: TestUser;
let member: TestUser;
let pinner: TestUser;
let stranger: TestUser;
let guildId: string;
let channelId: string;
let everyoneRoleId: string;

const uuid = (gid: string) => decodeAnyId(gid).id;
const db = () => app.deps.db;

async function post(author: TestUser, chId = channelId): Promise<string> {
  const r = await ok(
    app,
    `mutation($i: SendMessageInput!) { sendMessage(input: $i) { id } }`,
    { i: { channelId: chId, content: 'pin me' } },
    author.token,
  );
  return r.sendMessage.id;
}

async function newChannel(deny = 0n): Promise<string> {
  const c = await ok(
    app,
    `mutation($g: ID!) { createChannel(input: { guildId: $g, name: "c${newId().slice(-6)}", type: TEXT }) { id } }`,
    { g: encodeId('Guild', guildId) },
    owner.token,
  );
  if (deny) {
    await db()
      .insert(permissionOverwrites)
      .values({ channelId: uuid(c.createChannel.id), targetType: 'ROLE', targetId: everyoneRoleId, deny });
  }
  return c.createChannel.id;
}

const PIN = `mutation($m: ID!) { pinMessage(messageId: $m) { id pinned } }`;
const UNPIN = `mutation($m: ID!) { unpinMessage(messageId: $m) { id pinned } }`;
const PINS = `query($c: ID!) { channel(id: $c) { pinnedMessages { id pinned } } }`;

async function pinCount(chId: string): Promise<number> {
  const [r] = await db()
    .select({ n: sql<number>`count(*)::int` })
    .from(messages)
    .where(and(eq(messages.channelId, uuid(chId)), isNotNull(messages.pinnedAt)));
  return Number(r.n);
}

async function eventsFor(type: string, messageId: string) {
  return db()
    .select()
    .from(events)
    .where(and(eq(events.type, type), sql`${events.payload}->>'messageId' = ${uuid(messageId)}`));
}

before(async () => {
  app = await createTestApp();
  owner = await signUp(app);
  member = await signUp(app);
  pinner = await signUp(app);
  stranger = await signUp(app);
  const g = await ok(
    app,
    `mutation { createGuild(input: { name: "Pins" }) { id channels { id } } }`,
    {},
    owner.token,
  );
  guildId = uuid(g.createGuild.id);
  channelId = g.createGuild.channels[0].id;
  await db()
    .insert(members)
    .values([
      { guildId, userId: uuid(member.id) },
      { guildId, userId: uuid(pinner.id) },
    ]);
  const [everyone] = await db()
    .select()
    .from(roles)
    .where(and(eq(roles.guildId, guildId), eq(roles.isEveryone, true)));
  everyoneRoleId = everyone.id;
  const roleId = newId();
  await db()
    .insert(roles)
    .values({ id: roleId, guildId, name: 'pinners', position: 1, permissions: Permission.PIN_MESSAGES });
  await db()
    .insert(memberRoles)
    .values({ guildId, userId: uuid(pinner.id), roleId });
});
after(() => app.destroy());

describe('pins', () => {
  it('pins and unpins, newest pin first, with events and audit rows; repeats are no-ops', async () => {
    const a = await post(member);
    const b = await post(member);
    assert.deepEqual((await ok(app, PIN, { m: a }, owner.token)).pinMessage, { id: a, pinned: true });
    await ok(app, PIN, { m: b }, pinner.token);
    await ok(app, PIN, { m: a }, pinner.token);
    const list = await ok(app, PINS, { c: channelId }, member.token);
    assert.deepEqual(
      list.channel.pinnedMessages.map((m: { id: string }) => m.id),
      [b, a],
    );
    const [ev] = await eventsFor('MESSAGE_PINNED', a);
    assert.equal((await eventsFor('MESSAGE_PINNED', a)).length, 1, 'pinning twice writes one event');
    assert.deepEqual(ev.payload, { messageId: uuid(a), channelId: uuid(channelId), userId: uuid(owner.id) });
    assert.equal(ev.guildId, guildId);
    const audit = await db()
      .select()
      .from(auditLog)
      .where(and(eq(auditLog.targetId, uuid(a)), eq(auditLog.action, 'MESSAGE_PIN')));
    assert.equal(audit.length, 1);

    assert.deepEqual((await ok(app, UNPIN, { m: a }, pinner.token)).unpinMessage, { id: a, pinned: false });
    await ok(app, UNPIN, { m: a }, pinner.token);
    assert.equal((await eventsFor('MESSAGE_UNPINNED', a)).length, 1);
    const after1 = await ok(app, PINS, { c: channelId }, member.token);
    assert.deepEqual(
      after1.channel.pinnedMessages.map((m: { id: string }) => m.id),
      [b],
    );
    await ok(app, UNPIN, { m: b }, owner.token);
  });

  it('lets DM recipients pin; others get NOT_FOUND', async () => {
    const d = await ok(
      app,
      `mutation($u: [ID!]!) { openDirectChannel(userIds: $u) { id } }`,
      { u: [member.id] },
      owner.token,
    );
    const dm = d.openDirectChannel.id;
    const m = await post(owner, dm);
    assert.equal((await ok(app, PIN, { m }, member.token)).pinMessage.pinned, true);
    await fails(app, 'NOT_FOUND', PIN, { m }, stranger.token);
    await fails(app, 'NOT_FOUND', UNPIN, { m }, stranger.token);
    const list = await ok(app, PINS, { c: dm }, owner.token);
    assert.deepEqual(list.channel.pinnedMessages, [{ id: m, pinned: true }]);
    assert.equal((await ok(app, UNPIN, { m }, owner.token)).unpinMessage.pinned, false);
    const audit = await db()
      .select()
      .from(auditLog)
      .where(eq(auditLog.targetId, uuid(m)));
    assert.equal(audit.length, 0, 'DMs have no audit log');
  });

  it('answers FORBIDDEN without PIN_MESSAGES, and writes nothing', async () => {
    const m = await post(owner);
    await fails(app, 'FORBIDDEN', PIN, { m }, member.token);
    await ok(app, PIN, { m }, owner.token);
    await fails(app, 'FORBIDDEN', UNPIN, { m }, member.token);
    const [row] = await db()
      .select()
      .from(messages)
      .where(eq(messages.id, uuid(m)));
    assert.ok(row.pinnedAt);
    assert.equal(row.pinnedBy, uuid(owner.id));
    await ok(app, UNPIN, { m }, owner.token);
  });

  it('answers NOT_FOUND for hidden channels, deleted and unknown messages', async () => {
    const hidden = await newChannel(Permission.VIEW_CHANNEL);
    const h = await post(owner, hidden);
    await fails(app, 'NOT_FOUND', PIN, { m: h }, pinner.token);
    await fails(app, 'NOT_FOUND', PINS, { c: hidden }, pinner.token);
    const gone = await post(owner);
    await ok(app, PIN, { m: gone }, owner.token);
    await ok(app, `mutation($id: ID!) { deleteMessage(id: $id) }`, { id: gone }, owner.token);
    await fails(app, 'NOT_FOUND', PIN, { m: gone }, owner.token);
    await fails(app, 'NOT_FOUND', UNPIN, { m: gone }, owner.token);
    const list = await ok(app, PINS, { c: channelId }, owner.token);
    assert.ok(!list.channel.pinnedMessages.some((m: { id: string }) => m.id === gone));
    await fails(app, 'NOT_FOUND', PIN, { m: encodeId('Message', newId()) }, owner.token);
  });

  it('answers BAD_USER_INPUT for bad ids and UNAUTHENTICATED when signed out', async () => {
    const m = await post(owner);
    await fails(app, 'BAD_USER_INPUT', PIN, { m: channelId }, owner.token);
    await fails(app, 'BAD_USER_INPUT', UNPIN, { m: 'nope' }, owner.token);
    await fails(app, 'UNAUTHENTICATED', PIN, { m });
    await fails(app, 'UNAUTHENTICATED', UNPIN, { m });
  });

  it('shows no pins to a viewer without READ_HISTORY', async () => {
    const c = await newChannel(Permission.READ_HISTORY);
    const m = await post(owner, c);
    await ok(app, PIN, { m }, owner.token);
    const list = await ok(app, PINS, { c }, member.token);
    assert.deepEqual(list.channel.pinnedMessages, []);
  });

  it('caps a channel at 50 pins with CONFLICT, also under concurrent pins', async () => {
    const c = await newChannel();
    const ids: string[] = [];
    for (let i = 0; i < 56; i++) ids.push(await post(owner, c));
    // 45 pinned directly, then 11 racing pins for the last 5 slots.
    await db()
      .update(messages)
      .set({ pinnedAt: new Date(), pinnedBy: uuid(owner.id) })
      .where(inArray(messages.id, ids.slice(0, 45).map(uuid)));
    const results = await Promise.all(ids.slice(45).map((m) => gql(app, PIN, { m }, { token: owner.token })));
    const codes = results.map((r) => r.errors?.[0]?.extensions?.code ?? 'OK');
    assert.equal(codes.filter((x) => x === 'OK').length, 5, codes.join(','));
    assert.equal(codes.filter((x) => x === 'CONFLICT').length, 6, codes.join(','));
    assert.equal(await pinCount(c), 50);
    const pinnedIds = (await ok(app, PINS, { c }, owner.token)).channel.pinnedMessages;
    assert.equal(pinnedIds.length, 50);
    // Unpinning frees a slot.
    await ok(app, UNPIN, { m: ids[0] }, owner.token);
    const free = results.findIndex((r) => r.errors);
    await ok(app, PIN, { m: ids[45 + free] }, owner.token);
    assert.equal(await pinCount(c), 50);
  });
});
