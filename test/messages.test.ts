import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import { and, eq, sql } from 'drizzle-orm';
import type { GraphQLInputObjectType } from 'graphql';
import { attachments, auditLog, events, members, messageEdits, messages } from '../core/db/tables.ts';
import { newId } from '../core/ids.ts';
import { Permission } from '../core/permissions.ts';
import { encodeId } from '../schema/builder.ts';
import { buildSchema } from '../schema/index.ts';
import { createTestApp, fails, gql, ok, signUp, type TestApp, type TestUser } from './helpers.ts';
import {
  addMember,
  addRole,
  block,
  createChannel,
  type GuildFixture,
  overwrite,
  SEND,
  send,
  setupGuild,
  uuidOf,
} from './message-fixtures.ts';

let app: TestApp;
let g: GuildFixture;
let member: TestUser;
let stranger: TestUser;

const countMessages = async (channelId: string) =>
  (
    await app.deps.db
      .select()
      .from(messages)
      .where(eq(messages.channelId, uuidOf(channelId)))
  ).length;
const countEvents = async (type: string, messageUuid: string) =>
  (
    await app.deps.db
      .select()
      .from(events)
      .where(and(eq(events.type, type), sql`${events.payload}->>'messageId' = ${messageUuid}`))
  ).length;

/** Moves the app's clock; returns a function that restores it. */
function shiftClock(ms: number): () => void {
  const real = app.deps.now;
  app.deps.now = () => new Date(Date.now() + ms);
  return () => {
    app.deps.now = real;
  };
}

before(async () => {
  app = await createTestApp();
  g = await setupGuild(app);
  member = await signUp(app);
  stranger = await signUp(app);
  await addMember(app, g.guildId, member);
});
after(() => app.destroy());

describe('sendMessage', () => {
  it('sends, trims, returns the message and logs MESSAGE_CREATED', async () => {
    const m = await send(app, member, g.channelId, '  hello there  ');
    assert.equal(m.content, 'hello there');
    assert.equal(m.author.id, member.id);
    assert.equal(m.channel.id, g.channelId);
    assert.deepEqual(m.attachments, []);
    assert.deepEqual(m.embeds, []);
    assert.equal(await countEvents('MESSAGE_CREATED', uuidOf(m.id)), 1);
    const long = await send(app, member, g.channelId, 'x'.repeat(4000));
    assert.equal(long.content.length, 4000);
  });

  it('refuses bad input with BAD_USER_INPUT and writes nothing', async () => {
    const before = await countMessages(g.channelId);
    for (const i of [
      { channelId: g.channelId, content: '' },
      { channelId: g.channelId, content: '   \n ' },
      { channelId: g.channelId },
      { channelId: g.channelId, content: 'x'.repeat(4001) },
      { channelId: g.channelId, content: 'hi', nonce: 'n'.repeat(65) },
      { channelId: g.channelId, content: 'hi', nonce: '' },
      { channelId: g.guildId, content: 'hi' },
      { channelId: 'garbage', content: 'hi' },
      { channelId: g.channelId, content: 'hi', replyToId: g.channelId },
    ]) {
      await fails(app, 'BAD_USER_INPUT', SEND, { i }, member.token);
    }
    assert.equal(await countMessages(g.channelId), before);
  });

  it('needs a signed-in user who can see the channel', async () => {
    await fails(app, 'UNAUTHENTICATED', SEND, { i: { channelId: g.channelId, content: 'hi' } });
    await fails(app, 'NOT_FOUND', SEND, { i: { channelId: g.channelId, content: 'hi' } }, stranger.token);
    const hidden = await createChannel(app, g.owner, g.guildId);
    await overwrite(app, hidden, { user: member }, 0n, Permission.VIEW_CHANNEL);
    await fails(app, 'NOT_FOUND', SEND, { i: { channelId: hidden, content: 'hi' } }, member.token);
    await fails(
      app,
      'NOT_FOUND',
      SEND,
      { i: { channelId: encodeId('Channel', newId()), content: 'hi' } },
      member.token,
    );
    assert.equal(await countMessages(hidden), 0);
  });

  it('FORBIDDEN without SEND_MESSAGES, and for timed-out members', async () => {
    const readOnly = await createChannel(app, g.owner, g.guildId);
    await overwrite(app, readOnly, { user: member }, 0n, Permission.SEND_MESSAGES);
    await fails(app, 'FORBIDDEN', SEND, { i: { channelId: readOnly, content: 'hi' } }, member.token);
    const timedOut = await signUp(app);
    await addMember(app, g.guildId, timedOut);
    await app.deps.db
      .update(members)
      .set({ timeoutUntil: new Date(Date.now() + 60_000) })
      .where(eq(members.userId, uuidOf(timedOut.id)));
    await fails(app, 'FORBIDDEN', SEND, { i: { channelId: g.channelId, content: 'hi' } }, timedOut.token);
    assert.equal(await countMessages(readOnly), 0);
  });

  it('refuses categories and voice channels', async () => {
    for (const type of ['CATEGORY', 'VOICE']) {
      const c = await createChannel(app, g.owner, g.guildId, { type });
      await fails(app, 'BAD_USER_INPUT', SEND, { i: { channelId: c, content: 'hi' } }, g.owner.token);
    }
  });

  it('ANNOUNCEMENT channels need MANAGE_MESSAGES on top of SEND_MESSAGES', async () => {
    const ann = await createChannel(app, g.owner, g.guildId, { type: 'ANNOUNCEMENT' });
    await fails(app, 'FORBIDDEN', SEND, { i: { channelId: ann, content: 'news' } }, member.token);
    await send(app, g.owner, ann, 'news from the owner');
    const writer = await signUp(app);
    await addMember(app, g.guildId, writer);
    const role = await addRole(app, g.guildId, { name: 'writers', users: [writer] });
    await overwrite(app, ann, { roleId: role }, Permission.MANAGE_MESSAGES, 0n);
    await send(app, writer, ann, 'news from a writer');
    assert.equal(await countMessages(ann), 2);
  });

  it('slow mode: RATE_LIMITED with retryAfter; moderators bypass; it lapses', async () => {
    const slow = await createChannel(app, g.owner, g.guildId, { slowmodeSeconds: 30 });
    await send(app, member, slow, 'first');
    const e = await fails(
      app,
      'RATE_LIMITED',
      SEND,
      { i: { channelId: slow, content: 'second' } },
      member.token,
    );
    assert.ok(e.extensions?.retryAfter > 0 && e.extensions?.retryAfter <= 30, JSON.stringify(e));
    const http = await gql(app, SEND, { i: { channelId: slow, content: 'third' } }, { token: member.token });
    assert.ok(Number(http.headers.get('retry-after')) > 0);
    assert.equal(await countMessages(slow), 1);
    await send(app, g.owner, slow, 'owner 1');
    await send(app, g.owner, slow, 'owner 2');
    const restore = shiftClock(31_000);
    try {
      await send(app, member, slow, 'later');
    } finally {
      restore();
    }
    assert.equal(await countMessages(slow), 4);
  });

  it('slow mode holds for concurrent sends: one of them lands, the others wait', async () => {
    const slow = await createChannel(app, g.owner, g.guildId, { slowmodeSeconds: 30 });
    const results = await Promise.all(
      Array.from({ length: 5 }, (_, i) =>
        gql(app, SEND, { i: { channelId: slow, content: `burst ${i}` } }, { token: member.token }),
      ),
    );
    const codes = results.map((r) => r.errors?.[0]?.extensions?.code ?? 'OK').sort();
    assert.deepEqual(codes, ['OK', 'RATE_LIMITED', 'RATE_LIMITED', 'RATE_LIMITED', 'RATE_LIMITED']);
    assert.equal(await countMessages(slow), 1);
  });

  it('nonce: a retry returns the first message; concurrent retries make one; new after 10 minutes', async () => {
    const c = await createChannel(app, g.owner, g.guildId);
    const a = await send(app, member, c, 'once', { nonce: 'n-1' });
    const b = await send(app, member, c, 'once', { nonce: 'n-1' });
    assert.equal(b.id, a.id);
    assert.equal(a.nonce, 'n-1');
    const racing = await Promise.all(
      Array.from({ length: 6 }, () => send(app, member, c, 'race', { nonce: 'n-race' })),
    );
    assert.equal(new Set(racing.map((m) => m.id)).size, 1);
    assert.equal(await countEvents('MESSAGE_CREATED', uuidOf(racing[0].id)), 1);
    // Another user's nonce is their own.
    const other = await send(app, g.owner, c, 'once', { nonce: 'n-1' });
    assert.notEqual(other.id, a.id);
    await fails(
      app,
      'CONFLICT',
      SEND,
      { i: { channelId: g.channelId, content: 'x', nonce: 'n-1' } },
      member.token,
    );
    assert.equal(await countMessages(c), 3);
    const restore = shiftClock(11 * 60_000);
    try {
      const fresh = await send(app, member, c, 'once', { nonce: 'n-1' });
      assert.notEqual(fresh.id, a.id);
    } finally {
      restore();
    }
    assert.equal(await countMessages(c), 4);
    // Only the author sees the nonce.
    const seen = await ok(app, `query($id: ID!) { message(id: $id) { nonce } }`, { id: a.id }, g.owner.token);
    assert.equal(seen.message.nonce, null);
  });

  it("nonce: a retry after the first message was deleted sends a new message, and the field's description says so (it said a retry returns the first message)", async () => {
    const c = await createChannel(app, g.owner, g.guildId);
    const a = await send(app, member, c, 'gone soon', { nonce: 'n-del' });
    await ok(app, DELETE, { id: a.id }, member.token);
    const b = await send(app, member, c, 'gone soon', { nonce: 'n-del' });
    assert.notEqual(b.id, a.id);
    assert.equal(b.nonce, 'n-del');
    const again = await send(app, member, c, 'gone soon', { nonce: 'n-del' });
    assert.equal(again.id, b.id);
    const nonce = (buildSchema().getType('SendMessageInput') as GraphQLInputObjectType).getFields().nonce;
    assert.match(String(nonce.description), /deleted.*new message/s);
  });

  it('nonce retry under slow mode answers the first message, not RATE_LIMITED', async () => {
    const slow = await createChannel(app, g.owner, g.guildId, { slowmodeSeconds: 60 });
    const a = await send(app, member, slow, 'hi', { nonce: 'slow-1' });
    const b = await send(app, member, slow, 'hi', { nonce: 'slow-1' });
    assert.equal(b.id, a.id);
    await fails(
      app,
      'RATE_LIMITED',
      SEND,
      { i: { channelId: slow, content: 'hi', nonce: 'slow-2' } },
      member.token,
    );
  });

  it('replies: same channel, not deleted', async () => {
    const c = await createChannel(app, g.owner, g.guildId);
    const target = await send(app, member, c, 'question');
    const reply = await send(app, g.owner, c, 'answer', { replyToId: target.id });
    assert.equal(reply.replyTo.id, target.id);
    const elsewhere = await send(app, member, g.channelId, 'elsewhere');
    await fails(
      app,
      'NOT_FOUND',
      SEND,
      { i: { channelId: c, content: 'x', replyToId: elsewhere.id } },
      member.token,
    );
    await fails(
      app,
      'NOT_FOUND',
      SEND,
      { i: { channelId: c, content: 'x', replyToId: encodeId('Message', newId()) } },
      member.token,
    );
    await ok(app, `mutation($id: ID!) { deleteMessage(id: $id) }`, { id: target.id }, member.token);
    await fails(
      app,
      'NOT_FOUND',
      SEND,
      { i: { channelId: c, content: 'x', replyToId: target.id } },
      member.token,
    );
    const after = await ok(
      app,
      `query($id: ID!) { message(id: $id) { replyTo { id } } }`,
      { id: reply.id },
      member.token,
    );
    assert.equal(after.message.replyTo, null);
  });

  it('forwards from a readable channel, content may be empty; hidden sources are NOT_FOUND', async () => {
    const src = await send(app, g.owner, g.channelId, 'worth sharing');
    const dest = await createChannel(app, g.owner, g.guildId);
    const fwd = await send(app, member, dest, '', { forwardedFromId: src.id });
    assert.equal(fwd.content, '');
    assert.equal(fwd.forwardedFrom.id, src.id);
    const secret = await createChannel(app, g.owner, g.guildId);
    await overwrite(app, secret, { user: member }, 0n, Permission.READ_HISTORY);
    const hiddenSrc = await send(app, g.owner, secret, 'secret');
    await fails(
      app,
      'NOT_FOUND',
      SEND,
      { i: { channelId: dest, content: '', forwardedFromId: hiddenSrc.id } },
      member.token,
    );
    await fails(app, 'BAD_USER_INPUT', SEND, { i: { channelId: dest, content: '' } }, member.token);
  });

  it('mentions: members by @username, roles by @name, @everyone only with MENTION_EVERYONE', async () => {
    const c = await createChannel(app, g.owner, g.guildId);
    const role = await addRole(app, g.guildId, { name: 'Helpers', mentionable: true });
    const quiet = await addRole(app, g.guildId, { name: 'staff', mentionable: false });
    const m = await send(
      app,
      member,
      c,
      `hi @${g.owner.username}. and @${stranger.username} @everyone @helpers @staff @${g.owner.username}`,
    );
    assert.deepEqual(
      m.mentions.map((u: any) => u.id),
      [g.owner.id],
    );
    assert.equal(m.mentionEveryone, false);
    assert.deepEqual(m.mentionRoleIds, [encodeId('Role', role)]);
    const byOwner = await send(app, g.owner, c, `@here @staff @${member.username}`);
    assert.equal(byOwner.mentionEveryone, true);
    assert.deepEqual(byOwner.mentionRoleIds, [encodeId('Role', quiet)]);
    assert.deepEqual(
      byOwner.mentions.map((u: any) => u.id),
      [member.id],
    );
    const plain = await send(app, member, c, 'mail me at someone@example.com');
    assert.deepEqual(plain.mentions, []);
  });

  it('attachments: only own, unsent uploads; needs ATTACH_FILES', async () => {
    const c = await createChannel(app, g.owner, g.guildId);
    const mine = newId();
    const theirs = newId();
    await app.deps.db.insert(attachments).values([
      {
        id: mine,
        uploaderId: uuidOf(member.id),
        filename: 'a.png',
        contentType: 'image/png',
        size: 10,
        storageKey: 'k1',
      },
      {
        id: theirs,
        uploaderId: uuidOf(g.owner.id),
        filename: 'b.png',
        contentType: 'image/png',
        size: 10,
        storageKey: 'k2',
      },
    ]);
    const aid = (id: string) => encodeId('Attachment', id);
    await fails(
      app,
      'BAD_USER_INPUT',
      SEND,
      { i: { channelId: c, content: 'x', attachmentIds: [aid(theirs)] } },
      member.token,
    );
    await fails(
      app,
      'BAD_USER_INPUT',
      SEND,
      { i: { channelId: c, content: 'x', attachmentIds: [aid(newId())] } },
      member.token,
    );
    assert.equal(await countMessages(c), 0);
    const m = await send(app, member, c, 'see file', { attachmentIds: [aid(mine)] });
    assert.deepEqual(m.attachments, [{ id: aid(mine) }]);
    await fails(
      app,
      'BAD_USER_INPUT',
      SEND,
      { i: { channelId: c, content: 'again', attachmentIds: [aid(mine)] } },
      member.token,
    );
    const noFiles = await createChannel(app, g.owner, g.guildId);
    await overwrite(app, noFiles, { user: member }, 0n, Permission.ATTACH_FILES);
    await fails(
      app,
      'FORBIDDEN',
      SEND,
      { i: { channelId: noFiles, content: 'x', attachmentIds: [aid(mine)] } },
      member.token,
    );
  });

  it('DMs: recipients send and mention each other; a block forbids sending', async () => {
    const a = await signUp(app);
    const b = await signUp(app);
    const d = await ok(
      app,
      `mutation($u: [ID!]!) { openDirectChannel(userIds: $u) { id } }`,
      { u: [b.id] },
      a.token,
    );
    const dm = d.openDirectChannel.id;
    const m = await send(app, a, dm, `hey @${b.username} @${member.username}`);
    assert.deepEqual(
      m.mentions.map((u: any) => u.id),
      [b.id],
    );
    await fails(app, 'NOT_FOUND', SEND, { i: { channelId: dm, content: 'hi' } }, member.token);
    await block(app, b, a);
    await fails(app, 'FORBIDDEN', SEND, { i: { channelId: dm, content: 'hi' } }, a.token);
    await send(app, b, dm, 'I can still write');
  });
});

const EDIT = `mutation($i: EditMessageInput!) { editMessage(input: $i) { id content editedAt mentions { id } editHistory { content editedAt } } }`;
const DELETE = `mutation($id: ID!) { deleteMessage(id: $id) }`;

describe('editMessage', () => {
  it('lets the author edit, keeps history, re-parses mentions, logs MESSAGE_UPDATED', async () => {
    const m = await send(app, member, g.channelId, 'draft');
    const e1 = await ok(app, EDIT, { i: { id: m.id, content: `final @${g.owner.username}` } }, member.token);
    assert.equal(e1.editMessage.content, `final @${g.owner.username}`);
    assert.ok(e1.editMessage.editedAt);
    assert.deepEqual(
      e1.editMessage.mentions.map((u: any) => u.id),
      [g.owner.id],
    );
    const e2 = await ok(app, EDIT, { i: { id: m.id, content: 'final, really' } }, member.token);
    assert.deepEqual(
      e2.editMessage.editHistory.map((h: any) => h.content),
      ['draft', `final @${g.owner.username}`],
    );
    assert.deepEqual(e2.editMessage.mentions, []);
    assert.equal(await countEvents('MESSAGE_UPDATED', uuidOf(m.id)), 2);
  });

  it('FORBIDDEN for others who see it, NOT_FOUND for strangers and deleted, BAD_USER_INPUT for empty', async () => {
    const m = await send(app, member, g.channelId, 'mine');
    await fails(app, 'FORBIDDEN', EDIT, { i: { id: m.id, content: 'hijack' } }, g.owner.token);
    await fails(app, 'NOT_FOUND', EDIT, { i: { id: m.id, content: 'hijack' } }, stranger.token);
    await fails(app, 'BAD_USER_INPUT', EDIT, { i: { id: m.id, content: '  ' } }, member.token);
    await fails(app, 'UNAUTHENTICATED', EDIT, { i: { id: m.id, content: 'x' } });
    const rows = await app.deps.db
      .select()
      .from(messageEdits)
      .where(eq(messageEdits.messageId, uuidOf(m.id)));
    assert.equal(rows.length, 0);
    await ok(app, DELETE, { id: m.id }, member.token);
    await fails(app, 'NOT_FOUND', EDIT, { i: { id: m.id, content: 'x' } }, member.token);
  });
});

describe('deleteMessage', () => {
  it('author deletes: content wiped, NOT_FOUND afterwards, MESSAGE_DELETED logged', async () => {
    const m = await send(app, member, g.channelId, 'oops', { nonce: 'del-1' });
    await ok(app, EDIT, { i: { id: m.id, content: 'oops, edited' } }, member.token);
    const d = await ok(app, DELETE, { id: m.id }, member.token);
    assert.equal(d.deleteMessage, m.id);
    const [row] = await app.deps.db
      .select()
      .from(messages)
      .where(eq(messages.id, uuidOf(m.id)));
    assert.equal(row.content, '');
    assert.ok(row.deletedAt);
    assert.equal(
      (await app.deps.db.select().from(messageEdits).where(eq(messageEdits.messageId, row.id))).length,
      0,
    );
    await fails(app, 'NOT_FOUND', `query($id: ID!) { message(id: $id) { id } }`, { id: m.id }, member.token);
    await fails(app, 'NOT_FOUND', `query($id: ID!) { message(id: $id) { id } }`, { id: m.id }, g.owner.token);
    await fails(app, 'NOT_FOUND', DELETE, { id: m.id }, member.token);
    assert.equal(await countEvents('MESSAGE_DELETED', row.id), 1);
  });

  it("moderators delete others' messages (audited); members cannot; strangers get NOT_FOUND", async () => {
    const m = await send(app, member, g.channelId, 'rude');
    const other = await signUp(app);
    await addMember(app, g.guildId, other);
    await fails(app, 'FORBIDDEN', DELETE, { id: m.id }, other.token);
    await fails(app, 'NOT_FOUND', DELETE, { id: m.id }, stranger.token);
    await fails(app, 'BAD_USER_INPUT', DELETE, { id: g.channelId }, member.token);
    await ok(app, DELETE, { id: m.id }, g.owner.token);
    const audit = await app.deps.db
      .select()
      .from(auditLog)
      .where(and(eq(auditLog.action, 'MESSAGE_DELETE'), eq(auditLog.targetId, uuidOf(m.id))));
    assert.equal(audit.length, 1);
  });

  it('a moderator with MANAGE_MESSAGES by role can delete', async () => {
    const mod = await signUp(app);
    await addMember(app, g.guildId, mod);
    await addRole(app, g.guildId, { name: 'mods', permissions: Permission.MANAGE_MESSAGES, users: [mod] });
    const m = await send(app, member, g.channelId, 'spam');
    const r = await gql(app, DELETE, { id: m.id }, { token: mod.token });
    assert.equal(r.errors, undefined);
  });
});
