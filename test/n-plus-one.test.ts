import assert from 'node:assert/strict';
import { after, before, it } from 'node:test';
import { attachments, reactions } from '../core/db/tables.ts';
import { newId } from '../core/ids.ts';
import { createTestApp, ok, signUp, statementsOf, type TestApp, type TestUser } from './helpers.ts';
import { addMember, createChannel, type GuildFixture, send, setupGuild, uuidOf } from './message-fixtures.ts';

let app: TestApp;
let g: GuildFixture;
let member: TestUser;

const FULL_PAGE = `query($c: ID!, $n: Int) { channel(id: $c) { messages(last: $n) { edges { cursor node {
  id content createdAt editedAt nonce mentionEveryone mentionRoleIds
  author { id username }
  channel { id name }
  replyTo { id content author { id username } }
  forwardedFrom { id content }
  mentions { id username }
  reactions { emoji count me }
  attachments { id filename }
  embeds { title }
  editHistory { content }
  thread { id name }
  pinned
} } pageInfo { hasPreviousPage } } } }`;

/** A channel of n messages, each replying to the previous, mentioning, reacted to, with a file. */
async function fill(n: number): Promise<string> {
  const c = await createChannel(app, g.owner, g.guildId);
  let prev: string | undefined;
  const forwardSrc = await send(app, member, g.channelId, 'source');
  for (let i = 0; i < n; i++) {
    const author = i % 2 ? member : g.owner;
    const m = await send(app, author, c, `msg ${i} @${g.owner.username} @${member.username}`, {
      ...(prev ? { replyToId: prev } : {}),
      ...(i % 5 === 0 ? { forwardedFromId: forwardSrc.id } : {}),
    });
    const mid = uuidOf(m.id);
    await app.deps.db.insert(reactions).values([
      { messageId: mid, emoji: '👍', userId: uuidOf(member.id) },
      { messageId: mid, emoji: '🎉', userId: uuidOf(g.owner.id) },
    ]);
    await app.deps.db.insert(attachments).values({
      id: newId(),
      messageId: mid,
      uploaderId: uuidOf(author.id),
      filename: `f${i}.txt`,
      contentType: 'text/plain',
      size: 1,
      storageKey: `k${newId()}`,
    });
    if (i % 7 === 3) {
      await ok(
        app,
        `mutation($i: EditMessageInput!) { editMessage(input: $i) { id } }`,
        { i: { id: m.id, content: `edited ${i}` } },
        author.token,
      );
      await ok(
        app,
        `mutation($m: ID!) { startThread(messageId: $m, name: "t") { id } }`,
        { m: m.id },
        g.owner.token,
      );
    }
    prev = m.id;
  }
  return c;
}

async function statementsFor(channel: string, n: number): Promise<number> {
  const { n: used, result: d } = await statementsOf(app, () =>
    ok(app, FULL_PAGE, { c: channel, n }, member.token),
  );
  assert.equal(d.channel.messages.edges.length, n);
  const last = d.channel.messages.edges.at(-1).node;
  assert.equal(last.mentions.length, 2);
  assert.equal(last.reactions.length, 2);
  assert.equal(last.attachments.length, 1);
  assert.ok(last.replyTo.author.username);
  return used;
}

before(async () => {
  app = await createTestApp();
  g = await setupGuild(app);
  member = await signUp(app);
  await addMember(app, g.guildId, member);
});
after(() => app.destroy());

it('a page of 50 costs the same fixed number of statements as a page of 10', async () => {
  const small = await fill(10);
  const large = await fill(50);
  const s = await statementsFor(small, 10);
  const l = await statementsFor(large, 50);
  console.log(`statements: 10 messages ${s}, 50 messages ${l}`);
  assert.equal(l, s, `10 messages: ${s} statements, 50 messages: ${l}`);
  assert.ok(l <= 16, `expected a small fixed bound, got ${l}`);
});
