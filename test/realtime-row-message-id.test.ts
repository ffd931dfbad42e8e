/**
 * The message a logged row is about was read two ways: by the tailer in SQL (live rows) and by
 * loadMessages in code (replays), and the two disagreed on rows the writers never make (a hand
 * edit, a restore, a writer's bug): a `messageId` that is a JSON number or boolean was the id in
 * SQL, no message, so the row was dropped live, while the replay took `id`; an id in upper case
 * found its message in SQL but not in the replay's lookup, so the replay dropped what was
 * delivered live. A stream resumed from a cursor must bring what the live stream brought: both now
 * read the id alike.
 */
import assert from 'node:assert/strict';
import { after, before, it } from 'node:test';
import { sql } from 'drizzle-orm';
import { decodeAnyId } from '../schema/builder.ts';
import { createTestApp, signUp, type TestApp } from './helpers.ts';
import { connect, guildWithChannel, send, subscribe, untilLive } from './realtime-helpers.ts';

let app: TestApp;
let wsUrl: string;
before(async () => {
  app = await createTestApp({ rateLimits: false });
  wsUrl = `ws://127.0.0.1:${await app.start(0)}/graphql`;
});
after(() => app.destroy());

const raw = (globalId: string) => decodeAnyId(globalId).id;
const QUERY = `subscription($after: String) { events(after: $after) { __typename cursor
  ... on MessageCreated { message { content } }
  ... on MessageUpdated { message { content } }
  ... on ReactionAdded { emoji message { content } }
} }`;
const seen = (events: any[]) => events.map((e) => `${e.__typename} ${e.message?.content}`);

const cases = [
  {
    what: 'a messageId that is a number',
    type: 'MESSAGE_UPDATED',
    payload: (id: string) => ({ id, messageId: 5 }),
  },
  {
    what: 'a messageId in upper case',
    type: 'REACTION_ADDED',
    payload: (id: string) => ({ messageId: id.toUpperCase(), emoji: '👍' }),
  },
  {
    what: 'an id in upper case',
    type: 'MESSAGE_UPDATED',
    payload: (id: string) => ({ id: id.toUpperCase() }),
  },
];

for (const c of cases) {
  it(`a row with ${c.what} is delivered alike live and replayed`, async () => {
    const u = await signUp(app);
    const { channelId } = await guildWithChannel(app, u.token);
    const cu = connect(wsUrl, u.token);
    const s = subscribe(cu.client, null, QUERY);
    await untilLive(app, [u]);
    const id = raw(await send(app, u.token, channelId, 'before'));
    await s.until((e) => seen(e).includes('MessageCreated before'));
    const from = s.events[0].cursor as string;
    await app.deps.db.execute(sql`insert into events (type, guild_id, channel_id, payload)
      select ${c.type}, guild_id, id, ${JSON.stringify(c.payload(id))}::jsonb from channels where id = ${raw(channelId)}::uuid`);
    await send(app, u.token, channelId, 'after');
    await app.deps.realtime!.poke();
    await s.until((e) => seen(e).includes('MessageCreated after'), 5000, 'after, live');
    const cr = connect(wsUrl, u.token);
    const r = subscribe(cr.client, from, QUERY);
    await r.until((e) => seen(e).includes('MessageCreated after'), 5000, 'after, replayed');
    const kind = c.type === 'REACTION_ADDED' ? 'ReactionAdded' : 'MessageUpdated';
    assert.deepEqual(seen(s.events), ['MessageCreated before', `${kind} before`, 'MessageCreated after']);
    assert.deepEqual(seen(r.events), [`${kind} before`, 'MessageCreated after']);
    for (const x of [s, r]) x.stop();
    await Promise.all([cu.client.dispose(), cr.client.dispose()]);
  });
}
