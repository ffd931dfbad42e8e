import assert from 'node:assert/strict';
import { after, before, it } from 'node:test';
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
  await ok(
    app,
    `mutation($m: ID!) { addReaction(messageId: $m, emoji: "👍") { id } }`,
    { m: id },
    owner.token,
  );
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
