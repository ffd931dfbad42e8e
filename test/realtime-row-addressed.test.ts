/**
 * A logged row addressed to one user (user_id: read state, a relationship, a DM opened) went to
 * that user whatever it was about: a row addressed to a user about a channel or a guild it may not
 * see showed that channel or guild (its name, topic, owner...). Rows the writers never make (a hand
 * edit, a restore, a writer's bug; found reading what realtime-fuzz delivered): user_id now narrows
 * who hears of a row and grants nothing; about a channel or a guild, the user must see it too.
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

const QUERY = `subscription($after: String) { events(after: $after) { __typename cursor
  ... on MessageCreated { message { content } }
  ... on ChannelCreated { channel { name } }
  ... on ChannelUpdated { channel { name } }
  ... on DirectChannelCreated { channel { name } }
  ... on GuildUpdated { guild { name } }
} }`;

const raw = (globalId: string) => decodeAnyId(globalId).id;
const contents = (events: any[]) => events.map((e) => e.message?.content).filter(Boolean);

for (const type of ['CHANNEL_CREATED', 'CHANNEL_UPDATED', 'DIRECT_CHANNEL_CREATED', 'GUILD_UPDATED']) {
  it(`a ${type} row addressed to a user about another guild's channel does not show it that channel`, async () => {
    const owner = await signUp(app);
    const member = await signUp(app);
    const stranger = await signUp(app);
    const mine = await guildWithChannel(app, owner.token);
    await invite(app, owner.token, mine.guildId, member.token);
    const theirs = await guildWithChannel(app, stranger.token);
    const cm = connect(wsUrl, member.token);
    const s = subscribe(cm.client, null, QUERY);
    await untilLive(app, [member]);
    await send(app, owner.token, mine.channelId, 'before');
    await s.until((e) => contents(e).includes('before'));
    const from = s.events.find((e) => e.message?.content === 'before').cursor as string;
    await app.deps.db.execute(sql`insert into events (type, guild_id, channel_id, user_id, payload)
      values (${type}, ${raw(theirs.guildId)}::uuid, ${raw(theirs.channelId)}::uuid, ${raw(member.id)}::uuid,
        ${JSON.stringify({ channelId: raw(theirs.channelId), changes: { name: 'x' } })}::jsonb)`);
    await send(app, owner.token, mine.channelId, 'after');
    await app.deps.realtime!.poke();
    await s.until((e) => contents(e).includes('after'), 5000, 'after, live');
    const cr = connect(wsUrl, member.token);
    const r = subscribe(cr.client, from, QUERY);
    await r.until((e) => contents(e).includes('after'), 5000, 'after, replayed');
    const names = (events: any[]) => events.map((e) => e.__typename);
    assert.deepEqual(names(s.events), ['MessageCreated', 'MessageCreated']);
    assert.deepEqual(names(r.events), ['MessageCreated']);
    for (const x of [s, r]) x.stop();
    await Promise.all([cm.client.dispose(), cr.client.dispose()]);
  });
}
