import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import { newId } from '../core/ids.ts';
import { Permission } from '../core/permissions.ts';
import { encodeId } from '../schema/builder.ts';
import { createTestApp, fails, gql, ok, signUp, type TestApp, type TestUser } from './helpers.ts';
import {
  addMember,
  createChannel,
  type GuildFixture,
  overwrite,
  send,
  setupGuild,
} from './message-fixtures.ts';

let app: TestApp;
let g: GuildFixture;
let member: TestUser;
let channel: string;
/** ids of the 25 messages, oldest first */
let ids: string[];

const HISTORY = `query($c: ID!, $first: Int, $after: String, $last: Int, $before: String, $around: ID) {
  channel(id: $c) { messages(first: $first, after: $after, last: $last, before: $before, around: $around) {
    edges { cursor node { id content } }
    pageInfo { hasNextPage hasPreviousPage startCursor endCursor } } } }`;

async function page(vars: Record<string, unknown>, user = member) {
  const d = await ok(app, HISTORY, { c: channel, ...vars }, user.token);
  const conn = d.channel.messages;
  return { ids: conn.edges.map((e: any) => e.node.id) as string[], info: conn.pageInfo, edges: conn.edges };
}

before(async () => {
  app = await createTestApp();
  g = await setupGuild(app);
  member = await signUp(app);
  await addMember(app, g.guildId, member);
  channel = await createChannel(app, g.owner, g.guildId);
  ids = [];
  for (let i = 0; i < 25; i++) ids.push((await send(app, i % 2 ? member : g.owner, channel, `m${i}`)).id);
});
after(() => app.destroy());

describe('Channel.messages', () => {
  it('defaults to the newest 50, oldest first', async () => {
    const p = await page({});
    assert.deepEqual(p.ids, ids);
    assert.equal(p.info.hasPreviousPage, false);
  });

  it('pages forward with first/after', async () => {
    const p1 = await page({ first: 10 });
    assert.deepEqual(p1.ids, ids.slice(0, 10));
    assert.equal(p1.info.hasNextPage, true);
    const p2 = await page({ first: 10, after: p1.info.endCursor });
    assert.deepEqual(p2.ids, ids.slice(10, 20));
    const p3 = await page({ first: 10, after: p2.info.endCursor });
    assert.deepEqual(p3.ids, ids.slice(20));
    assert.equal(p3.info.hasNextPage, false);
    assert.equal(p3.info.endCursor, p3.edges.at(-1).cursor);
  });

  it('pages backward with last/before', async () => {
    const p1 = await page({ last: 10 });
    assert.deepEqual(p1.ids, ids.slice(15));
    assert.equal(p1.info.hasPreviousPage, true);
    const p2 = await page({ last: 10, before: p1.info.startCursor });
    assert.deepEqual(p2.ids, ids.slice(5, 15));
    const p3 = await page({ last: 10, before: p2.info.startCursor });
    assert.deepEqual(p3.ids, ids.slice(0, 5));
    assert.equal(p3.info.hasPreviousPage, false);
  });

  it('centers on a message with around', async () => {
    const p = await page({ around: ids[12], first: 6 });
    assert.deepEqual(p.ids, ids.slice(9, 15));
    assert.equal(p.info.hasPreviousPage, true);
    assert.equal(p.info.hasNextPage, true);
    const edge = await page({ around: ids[1], last: 6 });
    assert.deepEqual(edge.ids, ids.slice(0, 4));
    assert.equal(edge.info.hasPreviousPage, false);
    const def = await page({ around: ids[24] });
    assert.deepEqual(def.ids, ids.slice(0));
  });

  it('skips deleted messages', async () => {
    await ok(app, `mutation($id: ID!) { deleteMessage(id: $id) }`, { id: ids[3] }, g.owner.token);
    const p = await page({ first: 5 });
    assert.deepEqual(p.ids, [ids[0], ids[1], ids[2], ids[4], ids[5]]);
    ids.splice(3, 1);
  });

  it('refuses bad arguments with BAD_USER_INPUT', async () => {
    for (const vars of [
      { first: 101 },
      { last: 101 },
      { first: -1 },
      { first: 5, last: 5 },
      { after: 'nonsense' },
      { before: encodeId('Message', newId()) },
      { around: ids[0], after: (await page({ first: 1 })).info.endCursor },
      { around: channel },
    ]) {
      await fails(app, 'BAD_USER_INPUT', HISTORY, { c: channel, ...vars }, member.token);
    }
    assert.deepEqual((await page({ first: 0 })).ids, []);
    assert.equal((await page({ first: 100 })).ids.length, ids.length);
  });

  it('needs READ_HISTORY (FORBIDDEN) and a visible channel (NOT_FOUND)', async () => {
    const noHistory = await signUp(app);
    await addMember(app, g.guildId, noHistory);
    await overwrite(app, channel, { user: noHistory }, 0n, Permission.READ_HISTORY);
    const r = await gql(app, HISTORY, { c: channel }, { token: noHistory.token });
    assert.equal(r.errors?.[0]?.extensions?.code, 'FORBIDDEN');
    const stranger = await signUp(app);
    await fails(app, 'NOT_FOUND', HISTORY, { c: channel }, stranger.token);
  });
});

describe('message(id) and node(id)', () => {
  it('returns a visible message with its fields', async () => {
    const d = await ok(
      app,
      `query($id: ID!) { message(id: $id) { id content createdAt editedAt author { id } channel { id } thread { id } editHistory { content } } }`,
      { id: ids[0] },
      member.token,
    );
    assert.equal(d.message.content, 'm0');
    assert.equal(d.message.author.id, g.owner.id);
    assert.equal(d.message.channel.id, channel);
    assert.equal(d.message.thread, null);
    assert.deepEqual(d.message.editHistory, []);
  });

  it('NOT_FOUND for strangers, unknown ids and hidden channels; FORBIDDEN without READ_HISTORY', async () => {
    const q = `query($id: ID!) { message(id: $id) { id content } }`;
    const stranger = await signUp(app);
    await fails(app, 'NOT_FOUND', q, { id: ids[0] }, stranger.token);
    await fails(app, 'NOT_FOUND', q, { id: encodeId('Message', newId()) }, member.token);
    await fails(app, 'BAD_USER_INPUT', q, { id: channel }, member.token);
    await fails(app, 'UNAUTHENTICATED', q, { id: ids[0] });
    const secret = await createChannel(app, g.owner, g.guildId);
    const hidden = await send(app, g.owner, secret, 'secret');
    await overwrite(app, secret, { user: member }, 0n, Permission.VIEW_CHANNEL);
    await fails(app, 'NOT_FOUND', q, { id: hidden.id }, member.token);
    const node = await gql(
      app,
      `query($id: ID!) { node(id: $id) { id ... on Message { content } } }`,
      { id: hidden.id },
      { token: member.token },
    );
    assert.equal(node.data?.node ?? null, null);
    assert.equal(JSON.stringify(node).includes('secret'), false);
    const noHistory = await signUp(app);
    await addMember(app, g.guildId, noHistory);
    await overwrite(app, secret, { user: noHistory }, 0n, Permission.READ_HISTORY);
    await fails(app, 'FORBIDDEN', q, { id: hidden.id }, noHistory.token);
  });
});
