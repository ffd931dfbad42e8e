import assert from 'node:assert/strict';
import { after, before, it } from 'node:test';
import { sql } from 'drizzle-orm';
import { databaseOf } from '../core/db/client.ts';
import { encodeCursor, type Position } from '../core/realtime/cursor.ts';
import { headPosition, loadMessages, readAfter, readAfterWithMessages } from '../core/realtime/log.ts';
import { loadedAuthors } from '../core/services/message-history.service.ts';
import { decodeId } from '../schema/builder.ts';
import { createTestApp, ok, signUp, type TestApp } from './helpers.ts';
import { connect, guildWithChannel, send, subscribe } from './realtime-helpers.ts';

let app: TestApp;
let url: string;
before(async () => {
  app = await createTestApp({ rateLimits: false });
  const port = await app.start(0);
  url = `ws://127.0.0.1:${port}/graphql`;
});
after(() => app.destroy());

it('delivers created, updated, deleted live and replays them after a cursor', async () => {
  const owner = await signUp(app);
  const { channelId } = await guildWithChannel(app, owner.token);
  const { client } = connect(url, owner.token);
  const s = subscribe(client);
  await new Promise((r) => setTimeout(r, 300));
  const id = await send(app, owner.token, channelId, 'hello');
  await s.until((e) => e.some((x) => x.__typename === 'MessageCreated'));
  await ok(
    app,
    `mutation($i: EditMessageInput!) { editMessage(input: $i) { id } }`,
    { i: { id, content: 'hi' } },
    owner.token,
  );
  // Each event is awaited before the next change: an edit or reaction the tailer first reads
  // after the message is deleted is skipped (its MessageDeleted follows), as in replay below.
  await s.until((e) => e.some((x) => x.__typename === 'MessageUpdated'));
  await ok(
    app,
    `mutation($m: ID!) { addReaction(messageId: $m, emoji: "👍") { id } }`,
    { m: id },
    owner.token,
  );
  await s.until((e) => e.some((x) => x.__typename === 'ReactionAdded'));
  await ok(app, `mutation($m: ID!) { deleteMessage(id: $m) }`, { m: id }, owner.token);
  await s.until((e) => e.some((x) => x.__typename === 'MessageDeleted'));
  assert.deepEqual(
    s.events.map((e) => e.__typename),
    ['MessageCreated', 'MessageUpdated', 'ReactionAdded', 'MessageDeleted'],
  );
  assert.equal(s.events[0].message.content, 'hello');
  assert.equal(s.events[1].message.content, 'hi');
  assert.equal(s.events[3].messageId, id);
  const first = s.events[0].cursor;
  s.stop();
  // Replay after the first: the edit and reaction refer to a deleted message and are skipped.
  const r = subscribe(client, first);
  await r.until((e) => e.some((x) => x.__typename === 'MessageDeleted'));
  assert.deepEqual(
    r.events.map((e) => e.__typename),
    ['MessageDeleted'],
  );
  r.stop();
  await client.dispose();
});

it("the tailer's read brings each row's message and author in one statement; deleted messages mark their rows gone; a malformed id is no id", async () => {
  const owner = await signUp(app);
  const { channelId } = await guildWithChannel(app, owner.token);
  const db = app.deps.db;
  const from: Position = await headPosition(db);
  const kept = decodeId(await send(app, owner.token, channelId, 'kept'), 'Message', 'id');
  const gone = await send(app, owner.token, channelId, 'gone');
  await ok(
    app,
    `mutation($m: ID!) { addReaction(messageId: $m, emoji: "👍") { id } }`,
    { m: gone },
    owner.token,
  );
  await ok(app, `mutation($m: ID!) { deleteMessage(id: $m) }`, { m: gone }, owner.token);
  // Not uuids at all, and 36 characters of the uuid alphabet that still are not one.
  for (const id of ['not-a-uuid', '-'.repeat(36)]) {
    await db.execute(
      sql`insert into events (type, payload) values ('MESSAGE_UPDATED', ${JSON.stringify({ id })}::jsonb)`,
    );
  }
  // Rows are read once every transaction older than theirs has finished, cluster-wide: under
  // load that can take a moment. The malformed row is the last one written.
  let plain = await readAfter(db, from, 100);
  for (let i = 0; i < 100 && plain.filter((r) => r.type === 'MESSAGE_UPDATED').length < 2; i++) {
    await new Promise((r) => setTimeout(r, 50));
    plain = await readAfter(db, from, 100);
  }
  const database = databaseOf(db)!;
  // The count is the whole process's: a poll of the hub's landing in the window adds one (try again).
  let rows: Awaited<ReturnType<typeof readAfterWithMessages>> = [];
  let statements = 0;
  for (let i = 0; i < 5 && statements !== 1; i++) {
    const before = database.queryCount;
    rows = await readAfterWithMessages(db, from, plain.length);
    statements = database.queryCount - before;
  }
  assert.equal(statements, 1);
  // The same rows, in the same order, as the plain read.
  assert.deepEqual(
    rows.map((r) => encodeCursor(r)),
    plain.map((r) => encodeCursor(r)),
  );
  const byType = (t: string) => rows.filter((r) => r.type === t);
  const [createdKept, createdGone] = byType('MESSAGE_CREATED');
  assert.equal(createdKept.message?.id, kept);
  assert.equal(createdKept.message?.content, 'kept');
  assert.equal(createdKept.gone, undefined);
  assert.equal(loadedAuthors.get(createdKept.message!)?.id, decodeId(owner.id, 'User', 'id'));
  // Created and reacted to, then deleted: both rows are gone; the deletion itself is delivered.
  assert.equal(createdGone.gone, true);
  assert.equal(byType('REACTION_ADDED')[0].gone, true);
  assert.equal(byType('MESSAGE_DELETED')[0].gone, undefined);
  // Not a message anyone can load: skipped like a deleted one, and the read did not fail.
  assert.equal(byType('MESSAGE_UPDATED').length, 2);
  for (const malformed of byType('MESSAGE_UPDATED')) {
    assert.equal(malformed.message, undefined);
    assert.equal(malformed.gone, true);
  }
  // The separate read (replay's) skips them the same way.
  const reread = await readAfter(db, from, plain.length);
  await loadMessages(db, reread);
  assert.deepEqual(
    reread.filter((r) => r.type === 'MESSAGE_UPDATED').map((r) => r.gone),
    [true, true],
  );
});
