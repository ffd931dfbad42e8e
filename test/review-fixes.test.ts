/**
 * Fixes for findings the API review reported but left open: list arguments bounded before any
 * work, and one page-size rule (default 50, BAD_USER_INPUT outside 0-100) for every connection.
 */
import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import { eq } from 'drizzle-orm';
import { messages } from '../core/db/tables.ts';
import { newId } from '../core/ids.ts';
import { encodeId } from '../schema/builder.ts';
import { createTestApp, fails, gql, ok, signUp, type TestApp, type TestUser } from './helpers.ts';
import { addMember, type GuildFixture, SEND, setupGuild, uuidOf } from './message-fixtures.ts';

let app: TestApp;
let g: GuildFixture;
let member: TestUser;
before(async () => {
  app = await createTestApp();
  g = await setupGuild(app);
  member = await signUp(app);
  await addMember(app, g.guildId, member);
});
after(() => app.destroy());

const countMessages = async () =>
  (
    await app.deps.db
      .select()
      .from(messages)
      .where(eq(messages.channelId, uuidOf(g.channelId)))
  ).length;

describe('sendMessage attachmentIds', () => {
  it('refuses more than 10 ids before decoding any of them, and writes nothing', async () => {
    const before = await countMessages();
    // 100k malformed ids: refused for their number, not for the first bad id.
    const huge = Array.from({ length: 100_000 }, () => 'x');
    const e = await fails(
      app,
      'BAD_USER_INPUT',
      SEND,
      { i: { channelId: g.channelId, content: 'x', attachmentIds: huge } },
      member.token,
    );
    assert.equal(e.extensions?.field, 'attachmentIds');
    assert.match(e.message, /At most 10/);
    const eleven = Array.from({ length: 11 }, () => encodeId('Attachment', newId()));
    const e11 = await fails(
      app,
      'BAD_USER_INPUT',
      SEND,
      { i: { channelId: g.channelId, content: 'x', attachmentIds: eleven } },
      member.token,
    );
    assert.match(e11.message, /At most 10/);
    // Ten pass the bound and reach the service, which refuses unknown uploads.
    const ten = eleven.slice(0, 10);
    const e10 = await fails(
      app,
      'BAD_USER_INPUT',
      SEND,
      { i: { channelId: g.channelId, content: 'x', attachmentIds: ten } },
      member.token,
    );
    assert.doesNotMatch(e10.message, /At most 10/);
    assert.equal(await countMessages(), before);
  });
});

describe('one page-size rule', () => {
  const PAGES: [string, string, (d: any) => any][] = [
    [
      'Channel.messages',
      `query($id: ID!, $f: Int) { channel(id: $id) { messages(first: $f) { edges { cursor } } } }`,
      (d) => d.channel.messages,
    ],
    [
      'Guild.members',
      `query($id: ID!, $f: Int) { guild(id: $id) { members(first: $f) { edges { cursor } } } }`,
      (d) => d.guild.members,
    ],
    [
      'Guild.auditLog',
      `query($id: ID!, $f: Int) { guild(id: $id) { auditLog(first: $f) { edges { cursor } } } }`,
      (d) => d.guild.auditLog,
    ],
    [
      'reports',
      `query($id: ID!, $f: Int) { reports(guildId: $id, first: $f) { edges { cursor } } }`,
      (d) => d.reports,
    ],
  ];
  for (const [name, q, pick] of PAGES) {
    it(`${name}: 0-100 accepted, above 100 or negative is BAD_USER_INPUT`, async () => {
      const vars = { id: name === 'Channel.messages' ? g.channelId : g.guildId };
      for (const f of [0, 1, 100]) {
        const d = await ok(app, q, { ...vars, f }, g.owner.token);
        assert.ok(pick(d).edges.length <= f);
      }
      for (const f of [101, 100_000, -1]) {
        const e = await fails(app, 'BAD_USER_INPUT', q, { ...vars, f }, g.owner.token);
        assert.equal(e.extensions?.field, 'first');
      }
    });
  }

  it('Guild.members no longer offers last or before (forward only, as CONTRACT.md has it)', async () => {
    for (const arg of ['last: 1', 'before: "x"']) {
      const r = await gql(
        app,
        `query($g: ID!) { guild(id: $g) { members(${arg}) { edges { cursor } } } }`,
        { g: g.guildId },
        { token: g.owner.token },
      );
      assert.equal(r.data, undefined);
      assert.match(r.errors?.[0]?.message ?? '', /Unknown argument/);
    }
  });
});
