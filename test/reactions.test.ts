import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import { and, eq, sql } from 'drizzle-orm';
import { events, members, permissionOverwrites, reactions, roles } from '../core/db/tables.ts';
import { newId } from '../core/ids.ts';
import { Permission } from '../core/permissions.ts';
import { reactionsForMessages } from '../core/services/reaction.service.ts';
import { decodeAnyId, encodeId } from '../schema/builder.ts';
import { createTestApp, fails, ok, signUp, statementsOf, type TestApp, type TestUser } from './helpers.ts';

let app: TestApp;
let owner: TestUser;
let member: TestUser;
let stranger: TestUser;
let guildId: string;
let channelId: string;
let everyoneRoleId: string;

const uuid = (gid: string) => decodeAnyId(gid).id;
const db = () => app.deps.db;

async function post(author: TestUser, chId = channelId, content = 'hello'): Promise<string> {
  const r = await ok(
    app,
    `mutation($i: SendMessageInput!) { sendMessage(input: $i) { id } }`,
    { i: { channelId: chId, content } },
    author.token,
  );
  return r.sendMessage.id;
}

async function eventCount(type: string, messageId: string): Promise<number> {
  const [r] = await db()
    .select({ n: sql<number>`count(*)::int` })
    .from(events)
    .where(and(eq(events.type, type), sql`${events.payload}->>'messageId' = ${uuid(messageId)}`));
  return Number(r.n);
}

/** A text channel in the guild where @everyone has `deny` taken away. */
async function channelDenying(deny: bigint): Promise<string> {
  const c = await ok(
    app,
    `mutation($g: ID!) { createChannel(input: { guildId: $g, name: "c${newId().slice(-6)}", type: TEXT }) { id } }`,
    { g: encodeId('Guild', guildId) },
    owner.token,
  );
  await db()
    .insert(permissionOverwrites)
    .values({ channelId: uuid(c.createChannel.id), targetType: 'ROLE', targetId: everyoneRoleId, deny });
  return c.createChannel.id;
}

const ADD = `mutation($m: ID!, $e: String!) { addReaction(messageId: $m, emoji: $e) { id reactions { emoji count me } } }`;
const REMOVE = `mutation($m: ID!, $e: String!) { removeReaction(messageId: $m, emoji: $e) { id reactions { emoji count me } } }`;
const READ = `query($m: ID!) { node(id: $m) { ... on Message { reactions { emoji count me } } } }`;

before(async () => {
  app = await createTestApp();
  owner = await signUp(app);
  member = await signUp(app);
  stranger = await signUp(app);
  const g = await ok(
    app,
    `mutation { createGuild(input: { name: "Reactors" }) { id channels { id } } }`,
    {},
    owner.token,
  );
  guildId = uuid(g.createGuild.id);
  channelId = g.createGuild.channels[0].id;
  await db()
    .insert(members)
    .values({ guildId, userId: uuid(member.id) });
  const [everyone] = await db()
    .select()
    .from(roles)
    .where(and(eq(roles.guildId, guildId), eq(roles.isEveryone, true)));
  everyoneRoleId = everyone.id;
});
after(() => app.destroy());

describe('reactions', () => {
  it('adds, counts per emoji, marks the viewer, and is idempotent', async () => {
    const m = await post(owner);
    const a = await ok(app, ADD, { m, e: '👍' }, owner.token);
    assert.deepEqual(a.addReaction.reactions, [{ emoji: '👍', count: 1, me: true }]);
    const again = await ok(app, ADD, { m, e: '👍' }, owner.token);
    assert.deepEqual(again.addReaction.reactions, [{ emoji: '👍', count: 1, me: true }]);
    assert.equal(await eventCount('REACTION_ADDED', m), 1, 'adding twice writes one event');
    await ok(app, ADD, { m, e: '👍' }, member.token);
    const b = await ok(app, ADD, { m, e: '🇺🇸' }, member.token);
    assert.deepEqual(b.addReaction.reactions, [
      { emoji: '👍', count: 2, me: true },
      { emoji: '🇺🇸', count: 1, me: true },
    ]);
    const seen = await ok(app, READ, { m }, owner.token);
    assert.deepEqual(seen.node.reactions, [
      { emoji: '👍', count: 2, me: true },
      { emoji: '🇺🇸', count: 1, me: false },
    ]);
    const [ev] = await db()
      .select()
      .from(events)
      .where(and(eq(events.type, 'REACTION_ADDED'), sql`${events.payload}->>'emoji' = '🇺🇸'`));
    assert.deepEqual(ev.payload, { messageId: uuid(m), emoji: '🇺🇸', userId: uuid(member.id) });
    assert.equal(ev.channelId, uuid(channelId));
    assert.equal(ev.guildId, guildId);
  });

  it('accepts ZWJ sequences, skin tones, keycaps and flags; refuses anything else with BAD_USER_INPUT', async () => {
    const m = await post(owner);
    for (const e of ['👨‍👩‍👧‍👦', '👍🏽', '1️⃣', '🏴󠁧󠁢󠁳󠁣󠁴󠁿', '❤️']) await ok(app, ADD, { m, e }, owner.token);
    for (const e of ['a', '1', '', ' 👍', '👍👍', '🇺', ':smile:', 'x'.repeat(100), '🏽']) {
      await fails(app, 'BAD_USER_INPUT', ADD, { m, e }, owner.token);
      await fails(app, 'BAD_USER_INPUT', REMOVE, { m, e }, owner.token);
    }
    await fails(app, 'BAD_USER_INPUT', ADD, { m: channelId, e: '👍' }, owner.token);
    await fails(app, 'BAD_USER_INPUT', ADD, { m: 'garbage', e: '👍' }, owner.token);
    const [r] = await db()
      .select({ n: sql<number>`count(*)::int` })
      .from(reactions)
      .where(eq(reactions.messageId, uuid(m)));
    assert.equal(Number(r.n), 5);
  });

  it('removes only the viewer’s reaction; removing twice is a no-op', async () => {
    const m = await post(owner);
    await ok(app, ADD, { m, e: '🎉' }, owner.token);
    await ok(app, ADD, { m, e: '🎉' }, member.token);
    const r = await ok(app, REMOVE, { m, e: '🎉' }, member.token);
    assert.deepEqual(r.removeReaction.reactions, [{ emoji: '🎉', count: 1, me: false }]);
    const again = await ok(app, REMOVE, { m, e: '🎉' }, member.token);
    assert.deepEqual(again.removeReaction.reactions, [{ emoji: '🎉', count: 1, me: false }]);
    assert.equal(await eventCount('REACTION_REMOVED', m), 1);
    const last = await ok(app, REMOVE, { m, e: '🎉' }, owner.token);
    assert.deepEqual(last.removeReaction.reactions, []);
  });

  it('answers NOT_FOUND for strangers, hidden channels, deleted and unknown messages', async () => {
    const m = await post(owner);
    await fails(app, 'NOT_FOUND', ADD, { m, e: '👍' }, stranger.token);
    await fails(app, 'NOT_FOUND', REMOVE, { m, e: '👍' }, stranger.token);
    const hidden = await channelDenying(Permission.VIEW_CHANNEL);
    const hm = await post(owner, hidden);
    await fails(app, 'NOT_FOUND', ADD, { m: hm, e: '👍' }, member.token);
    await ok(app, ADD, { m: hm, e: '👍' }, owner.token);
    const gone = await post(owner);
    await ok(app, ADD, { m: gone, e: '👍' }, owner.token);
    await ok(app, `mutation($id: ID!) { deleteMessage(id: $id) }`, { id: gone }, owner.token);
    await fails(app, 'NOT_FOUND', ADD, { m: gone, e: '👍' }, owner.token);
    await fails(app, 'NOT_FOUND', REMOVE, { m: gone, e: '👍' }, owner.token);
    await fails(app, 'NOT_FOUND', ADD, { m: encodeId('Message', newId()), e: '👍' }, owner.token);
    assert.equal(await eventCount('REACTION_ADDED', m), 0);
  });

  it('answers FORBIDDEN without ADD_REACTIONS or READ_HISTORY; removing needs only READ_HISTORY', async () => {
    const noReact = await channelDenying(Permission.ADD_REACTIONS);
    const m = await post(owner, noReact);
    await ok(app, ADD, { m, e: '👍' }, owner.token);
    // The member reacted before the overwrite landed; they may still take it back.
    await db()
      .insert(reactions)
      .values({ messageId: uuid(m), emoji: '🔥', userId: uuid(member.id) });
    await fails(app, 'FORBIDDEN', ADD, { m, e: '👍' }, member.token);
    const r = await ok(app, REMOVE, { m, e: '🔥' }, member.token);
    assert.deepEqual(r.removeReaction.reactions, [{ emoji: '👍', count: 1, me: false }]);
    const noHistory = await channelDenying(Permission.READ_HISTORY);
    const h = await post(owner, noHistory);
    await fails(app, 'FORBIDDEN', ADD, { m: h, e: '👍' }, member.token);
    await fails(app, 'FORBIDDEN', REMOVE, { m: h, e: '👍' }, member.token);
    const [n] = await db()
      .select({ n: sql<number>`count(*)::int` })
      .from(reactions)
      .where(
        and(eq(reactions.userId, uuid(member.id)), sql`${reactions.messageId} in (${uuid(m)}, ${uuid(h)})`),
      );
    assert.equal(Number(n.n), 0, 'nothing written by refused mutations');
  });

  it('answers UNAUTHENTICATED when signed out', async () => {
    const m = await post(owner);
    await fails(app, 'UNAUTHENTICATED', ADD, { m, e: '👍' });
    await fails(app, 'UNAUTHENTICATED', REMOVE, { m, e: '👍' });
  });

  it('caps a message at 20 distinct emoji with CONFLICT; existing emoji still take more users', async () => {
    const m = await post(owner);
    const emoji = [...'😀😁😂🤣😃😄😅😆😉😊😋😎😍😘🥰😗😙😚🙂🤗'];
    assert.equal(emoji.length, 20);
    for (const e of emoji) await ok(app, ADD, { m, e }, owner.token);
    const err = await fails(app, 'CONFLICT', ADD, { m, e: '🤔' }, member.token);
    assert.match(err.message, /20/);
    const r = await ok(app, ADD, { m, e: '😀' }, member.token);
    assert.equal(r.addReaction.reactions.length, 20);
    assert.deepEqual(r.addReaction.reactions[0], { emoji: '😀', count: 2, me: true });
  });

  it('loads reactions for 50 messages in one statement', async () => {
    const c = await ok(
      app,
      `mutation($g: ID!) { createChannel(input: { guildId: $g, name: "batch", type: TEXT }) { id } }`,
      { g: encodeId('Guild', guildId) },
      owner.token,
    );
    const ids: string[] = [];
    for (let i = 0; i < 50; i++) ids.push(await post(owner, c.createChannel.id));
    await db()
      .insert(reactions)
      .values(ids.map((m) => ({ messageId: uuid(m), emoji: '👀', userId: uuid(member.id) })));
    await db()
      .insert(reactions)
      .values(ids.slice(0, 10).map((m) => ({ messageId: uuid(m), emoji: '👍', userId: uuid(owner.id) })));
    const cost = async (first: number) => {
      const { n, result: r } = await statementsOf(app, () =>
        ok(
          app,
          `query($c: ID!, $n: Int) { channel(id: $c) { messages(first: $n) { edges { node { id reactions { emoji count me } } } } } }`,
          { c: c.createChannel.id, n: first },
          member.token,
        ),
      );
      const edges = r.channel.messages.edges;
      assert.equal(edges.length, first);
      for (const e of edges) {
        assert.deepEqual(e.node.reactions[0], { emoji: '👀', count: 1, me: true });
      }
      return n;
    };
    const without = async (first: number) =>
      (
        await statementsOf(app, () =>
          ok(
            app,
            `query($c: ID!, $n: Int) { channel(id: $c) { messages(first: $n) { edges { node { id } } } } }`,
            { c: c.createChannel.id, n: first },
            member.token,
          ),
        )
      ).n;
    const fifty = await cost(50);
    assert.equal(fifty, await cost(5), 'cost does not grow with the page');
    assert.equal(fifty - (await without(50)), 1, 'reactions for 50 messages cost one statement');
    const lists = await reactionsForMessages(db(), uuid(owner.id), ids.map(uuid));
    assert.equal(lists.length, 50);
    assert.deepEqual(lists[0], [
      { emoji: '👀', count: 1, me: false },
      { emoji: '👍', count: 1, me: true },
    ]);
  });
});
