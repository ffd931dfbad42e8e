/**
 * Concurrent sends share one insert statement (core/services/message-batch.ts): each message
 * still gets exactly its own mentions and one MESSAGE_CREATED event, events follow id order, and
 * a bad row in a group fails only its own send.
 */
import assert from 'node:assert/strict';
import { after, before, it } from 'node:test';
import { eq, inArray, sql } from 'drizzle-orm';
import { events, messageMentions, messages, users } from '../core/db/tables.ts';
import { newId } from '../core/ids.ts';
import { insertGrouped } from '../core/services/message-batch.ts';
import { loadedAuthors } from '../core/services/message-history.service.ts';
import { decodeId } from '../schema/builder.ts';
import { createTestApp, ok, signUp, type TestApp } from './helpers.ts';
import { guildWithChannel, invite } from './realtime-helpers.ts';

const SEND = `mutation($c: ID!, $t: String!) { sendMessage(input: { channelId: $c, content: $t }) { id mentions { id } } }`;

let app: TestApp;
before(async () => {
  app = await createTestApp({ rateLimits: false });
});
after(async () => {
  await app?.destroy();
});

it('40 concurrent sends share statements: own mentions, one event each, id order inside one', async () => {
  const [owner, member] = await Promise.all([signUp(app), signUp(app)]);
  const { guildId, channelId } = await guildWithChannel(app, owner.token);
  await invite(app, owner.token, guildId, member.token);
  const sent = await Promise.all(
    Array.from({ length: 40 }, (_, i) =>
      ok(app, SEND, { c: channelId, t: i % 3 ? `plain ${i}` : `hi @${member.username} ${i}` }, owner.token),
    ),
  );
  const ids = sent.map((s) => decodeId(s.sendMessage.id, 'Message', 'id'));
  assert.equal(new Set(ids).size, 40);
  sent.forEach((s, i) => {
    assert.deepEqual(
      s.sendMessage.mentions.map((u: { id: string }) => u.id),
      i % 3 ? [] : [member.id],
    );
  });
  const db = app.deps.db;
  const rows = await db.select().from(messages).where(inArray(messages.id, ids));
  assert.equal(rows.length, 40);
  const mm = await db.select().from(messageMentions).where(inArray(messageMentions.messageId, ids));
  assert.equal(mm.length, sent.filter((_, i) => i % 3 === 0).length);
  const ev = await db
    .select({
      seq: events.seq,
      xid: sql<string>`${events.xid}::text`,
      id: sql<string>`${events.payload}->>'messageId'`,
    })
    .from(events)
    .where(
      sql`${events.type} = 'MESSAGE_CREATED' and ${events.payload}->>'messageId' = any(${`{${ids.join(',')}}`}::text[])`,
    )
    .orderBy(events.seq);
  assert.equal(ev.length, 40);
  // Concurrent statements interleave (as concurrent single sends always did); inside one
  // statement, events follow message id order.
  const byXid = new Map<string, string[]>();
  for (const e of ev) byXid.set(e.xid, [...(byXid.get(e.xid) ?? []), e.id]);
  for (const group of byXid.values()) assert.deepEqual(group, [...group].sort());
  assert.ok(byXid.size < 40, 'some sends shared a statement');
});

it('a bad row in a group fails alone', async () => {
  const owner = await signUp(app);
  const { channelId: channelGid } = await guildWithChannel(app, owner.token);
  const channelId = decodeId(channelGid, 'Channel', 'channelId');
  const authorId = decodeId(owner.id, 'User', 'authorId');
  const row = (channel: string) => ({
    id: newId(),
    channelId: channel,
    guildId: null,
    authorId,
    content: 'x',
    createdAt: new Date(),
    replyToId: null,
    forwardedFromId: null,
    nonce: null,
    mentionEveryone: false,
    mentionRoleIds: [],
    mentionUserIds: [],
  });
  const good = Array.from({ length: 6 }, () => row(channelId));
  const bad = row(newId());
  const results = await Promise.allSettled(
    [...good.slice(0, 3), bad, ...good.slice(3)].map((r) => insertGrouped(app.deps.database, r)),
  );
  assert.equal(results[3].status, 'rejected');
  const fulfilled = results.filter((r) => r.status === 'fulfilled');
  assert.equal(fulfilled.length, 6);
  const stored = await app.deps.db
    .select({ id: messages.id })
    .from(messages)
    .where(
      inArray(
        messages.id,
        [...good, bad].map((r) => r.id),
      ),
    );
  assert.equal(stored.length, 6);
});

it('a send gets back its row and author exactly as a select reads them', async () => {
  const owner = await signUp(app);
  const { channelId: channelGid, guildId } = await guildWithChannel(app, owner.token);
  const role = await ok(
    app,
    'mutation($g: ID!) { createRole(input: { guildId: $g, name: "pinged" }) { id } }',
    { g: guildId },
    owner.token,
  );
  const r = await insertGrouped(app.deps.database, {
    id: newId(),
    channelId: decodeId(channelGid, 'Channel', 'channelId'),
    guildId: decodeId(guildId, 'Guild', 'guildId'),
    authorId: decodeId(owner.id, 'User', 'authorId'),
    content: 'ünïcode ✓ "quoted"',
    createdAt: new Date('2026-12-03T10:11:12.345Z'),
    replyToId: null,
    forwardedFromId: null,
    nonce: 'n-1',
    mentionEveryone: true,
    mentionRoleIds: [decodeId(role.createRole.id, 'Role', 'roleId')],
    mentionUserIds: [],
  });
  assert.ok(r);
  const [stored] = await app.deps.db.select().from(messages).where(eq(messages.id, r.message.id));
  assert.deepEqual(r.message, stored);
  const [author] = await app.deps.db.select().from(users).where(eq(users.id, stored.authorId));
  assert.deepEqual(loadedAuthors.get(r.message), author);
});
