/**
 * A logged row about a message (created, edited, a reaction, a pin) shows that message as it is,
 * loaded by the id in its payload. Who may see the row was judged by the row's own columns: a row
 * whose message is in another channel than its channel_id says, or that has no channel_id, or that
 * is addressed to one user (user_id), showed the message to whoever passed that check, a message
 * of a channel (another guild's) they may not see. Rows the writers never make (a hand edit, a
 * restore, a writer's bug; found by realtime-fuzz): the message is now shown only to who may see
 * its own channel.
 */
import assert from 'node:assert/strict';
import { after, before, it } from 'node:test';
import { sql } from 'drizzle-orm';
import { decodeAnyId } from '../schema/builder.ts';
import { createTestApp, signUp, type TestApp } from './helpers.ts';
import { connect, guildWithChannel, invite, send, subscribe, untilLive } from './realtime-helpers.ts';

let app: TestApp;
let wsUrl: string;
before(async () => {
  app = await createTestApp({ rateLimits: false });
  wsUrl = `ws://127.0.0.1:${await app.start(0)}/graphql`;
});
after(() => app.destroy());

const raw = (globalId: string) => decodeAnyId(globalId).id;
const contents = (events: any[]) => events.map((e) => e.message?.content).filter(Boolean);

const cases = [
  { what: "another guild's message, on a channel the viewer sees", type: 'MESSAGE_CREATED', column: 'mine' },
  { what: 'a message, on no channel (its guild the viewer’s)', type: 'MESSAGE_UPDATED', column: 'none' },
  { what: 'a message, addressed to the viewer', type: 'MESSAGE_CREATED', column: 'addressed' },
] as const;

for (const c of cases) {
  it(`a row about ${c.what} shows it only to who may see its channel, live and replayed`, async () => {
    const owner = await signUp(app);
    const member = await signUp(app);
    const stranger = await signUp(app);
    const mine = await guildWithChannel(app, owner.token);
    await invite(app, owner.token, mine.guildId, member.token);
    const theirs = await guildWithChannel(app, stranger.token);
    const secret = raw(await send(app, stranger.token, theirs.channelId, 'SECRET'));
    const cm = connect(wsUrl, member.token);
    const s = subscribe(cm.client);
    const cs = connect(wsUrl, stranger.token);
    const ss = subscribe(cs.client);
    await untilLive(app, [member, stranger]);
    await send(app, owner.token, mine.channelId, 'before');
    await s.until((e) => contents(e).includes('before'));
    const from = s.events.find((e) => e.message?.content === 'before').cursor as string;
    const channel =
      c.column === 'mine' ? raw(mine.channelId) : c.column === 'addressed' ? raw(theirs.channelId) : null;
    const userId = c.column === 'addressed' ? raw(member.id) : null;
    await app.deps.db.execute(sql`insert into events (type, guild_id, channel_id, user_id, payload)
      values (${c.type}, ${raw(mine.guildId)}::uuid, ${channel}::uuid, ${userId}::uuid,
        ${JSON.stringify({ id: secret, messageId: secret, emoji: '👍', userId: raw(member.id) })}::jsonb)`);
    await send(app, owner.token, mine.channelId, 'after');
    await send(app, stranger.token, theirs.channelId, 'theirs after');
    await app.deps.realtime!.poke();
    await s.until((e) => contents(e).includes('after'), 5000, 'after, live');
    await ss.until((e) => contents(e).includes('theirs after'), 5000, 'the stranger’s stream goes on');
    const cr = connect(wsUrl, member.token);
    const r = subscribe(cr.client, from);
    await r.until((e) => contents(e).includes('after'), 5000, 'after, replayed');
    assert.deepEqual(contents(s.events), ['before', 'after']);
    assert.deepEqual(contents(r.events), ['after']);
    for (const x of [s, ss, r]) x.stop();
    await Promise.all([cm.client.dispose(), cs.client.dispose(), cr.client.dispose()]);
  });
}
