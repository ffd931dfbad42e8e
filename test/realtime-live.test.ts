/**
 * `events` without `after` is live from the moment of subscription, exactly: nothing committed
 * before it arrives, even a row the log tailer could only read later because an older
 * transaction was still open; everything committed after it does.
 */
import assert from 'node:assert/strict';
import { after, before, it } from 'node:test';
import pg from 'pg';
import { createTestApp, onPostgres, signUp, type TestApp } from './helpers.ts';
import { connect, guildWithChannel, send, subscribe } from './realtime-helpers.ts';

let app: TestApp;
let url: string;
before(async () => {
  app = await createTestApp({ rateLimits: false });
  url = `ws://127.0.0.1:${await app.start(0)}/graphql`;
});
after(() => app.destroy());

const contents = (events: any[]) =>
  events.filter((e) => e.__typename === 'MessageCreated').map((e) => e.message.content as string);

it('without after: only what commits after the subscription', async () => {
  const u = await signUp(app);
  const { channelId } = await guildWithChannel(app, u.token);
  await send(app, u.token, channelId, 'before');
  const c = connect(url, u.token);
  const s = subscribe(c.client);
  // The protocol does not acknowledge a subscription: wait until the hub has it, then a moment
  // for its snapshot (a loaded machine can take longer than a fixed pause).
  for (let i = 0; i < 100 && app.deps.realtime!.subscriberCount < 1; i++)
    await new Promise((r) => setTimeout(r, 20));
  await new Promise((r) => setTimeout(r, 300));
  await send(app, u.token, channelId, 'after');
  await s.until((e) => contents(e).includes('after'));
  await new Promise((r) => setTimeout(r, 300));
  assert.deepEqual(contents(s.events), ['after']);
  await c.client.dispose();
});

it('without after: a row committed before subscribing, behind a still-open older transaction, is not delivered', {
  skip: !onPostgres,
  timeout: 20_000,
}, async () => {
  const u = await signUp(app);
  const { channelId } = await guildWithChannel(app, u.token);
  // An older transaction holds the tailer back: rows of later transactions wait behind it.
  const old = new pg.Client({ connectionString: app.config.databaseUrl });
  await old.connect();
  try {
    await old.query('begin');
    await old.query('select pg_current_xact_id()');
    await send(app, u.token, channelId, 'committed before');
    const c = connect(url, u.token);
    const s = subscribe(c.client);
    await new Promise((r) => setTimeout(r, 500));
    await old.query('commit');
    await send(app, u.token, channelId, 'committed after');
    await s.until((e) => contents(e).includes('committed after'));
    await new Promise((r) => setTimeout(r, 500));
    assert.deepEqual(contents(s.events), ['committed after']);

    // A transaction open at subscribe time that commits after it is delivered.
    const raw = (g: string) => Buffer.from(g, 'base64url').toString().split(':')[1];
    await old.query('begin');
    await old.query(
      `insert into events (type, user_id, channel_id, payload) values ('READ_STATE_UPDATED', $1, $2, '{}')`,
      [raw(u.id), raw(channelId)],
    );
    const s2 = subscribe(c.client);
    await new Promise((r) => setTimeout(r, 300));
    await old.query('commit');
    await send(app, u.token, channelId, 'later');
    await s2.until((e) => contents(e).includes('later'));
    assert.deepEqual(
      s2.events.map((e) => e.__typename),
      ['ReadStateUpdated', 'MessageCreated'],
    );
    await c.client.dispose();
  } finally {
    await old.end();
  }
});
