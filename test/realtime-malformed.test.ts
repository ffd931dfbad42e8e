/**
 * A row of the event log whose payload is not a JSON object (a hand edit, a restore, a writer's
 * bug) made every read of the log throw where its rows were parsed: the instance's tailer read it
 * again on every poll and delivered nothing more, to anyone (a member of another guild too), and
 * a replay across it failed. It is now skipped, delivered to no one, and logged at error level.
 */
import assert from 'node:assert/strict';
import { after, before, it } from 'node:test';
import { sql } from 'drizzle-orm';
import { decodeAnyId } from '../schema/builder.ts';
import { createTestApp, signUp, type TestApp } from './helpers.ts';
import { connect, errorsLogged, guildWithChannel, send, subscribe, untilLive } from './realtime-helpers.ts';

let app: TestApp;
let wsUrl: string;
before(async () => {
  app = await createTestApp({ rateLimits: false });
  wsUrl = `ws://127.0.0.1:${await app.start(0)}/graphql`;
});
after(() => app.destroy());

const raw = (globalId: string) => decodeAnyId(globalId).id;
const contents = (events: any[]) =>
  events.filter((e) => e.__typename === 'MessageCreated').map((e) => e.message.content as string);

for (const payload of ['null', '"text"', '[1, 2]']) {
  it(`a logged row whose payload is ${payload} is skipped: live and replayed streams go on, everyone's`, async () => {
    const u = await signUp(app);
    const other = await signUp(app);
    const mine = await guildWithChannel(app, u.token);
    const theirs = await guildWithChannel(app, other.token);
    const c = connect(wsUrl, u.token);
    const s = subscribe(c.client);
    const co = connect(wsUrl, other.token);
    const so = subscribe(co.client);
    await untilLive(app, [u, other]);
    await send(app, u.token, mine.channelId, 'one');
    await s.until((e) => contents(e).includes('one'));
    const last = s.events.find((e) => e.message?.content === 'one').cursor as string;
    const { logged } = await errorsLogged(app, async () => {
      await app.deps.db.execute(sql`insert into events (type, guild_id, channel_id, payload)
        values ('MEMBER_JOINED', ${raw(mine.guildId)}::uuid, ${raw(mine.channelId)}::uuid, ${payload}::jsonb)`);
      await send(app, u.token, mine.channelId, 'two');
      await send(app, other.token, theirs.channelId, 'elsewhere');
      await app.deps.realtime!.poke();
      await s.until((e) => contents(e).includes('two'), 5000, 'two, after the row');
      await so.until((e) => contents(e).includes('elsewhere'), 5000, 'a message in another guild');
    });
    assert.deepEqual(contents(s.events), ['one', 'two']);
    assert.equal(c.closed(), undefined);
    const skipped = logged.filter((l) => l.msg?.includes('not a JSON object'));
    assert.equal(skipped.length, 1, JSON.stringify(logged));
    assert.equal(skipped[0].obj.type, 'MEMBER_JOINED');
    // A resume from before the row replays across it.
    const c2 = connect(wsUrl, u.token);
    const s2 = subscribe(c2.client, last);
    await s2.until((e) => contents(e).includes('two'), 5000, 'two, replayed across the row');
    assert.deepEqual(contents(s2.events), ['two']);
    for (const x of [s, so, s2]) x.stop();
    await Promise.all([c.client.dispose(), co.client.dispose(), c2.client.dispose()]);
  });
}
