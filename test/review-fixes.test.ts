/**
 * Fixes for findings the API review reported but left open: list arguments bounded before any
 * work, and one page-size rule (BAD_USER_INPUT above 100) for every connection.
 */
import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import { eq } from 'drizzle-orm';
import { messages } from '../core/db/tables.ts';
import { newId } from '../core/ids.ts';
import { encodeId } from '../schema/builder.ts';
import { createTestApp, fails, ok, signUp, type TestApp, type TestUser } from './helpers.ts';
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
