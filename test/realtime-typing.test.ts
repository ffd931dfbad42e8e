/**
 * The typing throttle is shared by every instance on the same Redis: two api instances do not
 * both announce the same user typing in the same channel within the window. Postgres + Redis
 * only (with the embedded ports there is one instance; realtime-auth.test.ts covers the throttle).
 */
import assert from 'node:assert/strict';
import { after, before, it } from 'node:test';
import { type App, buildApp } from '../api/app.ts';
import { createTestApp, ok, onPostgres, signUp, type TestApp } from './helpers.ts';
import { connect, guildWithChannel, invite, subscribe, untilLive } from './realtime-helpers.ts';

let a: TestApp;
let b: App;
let url: string;
before(async () => {
  if (!onPostgres) return;
  a = await createTestApp({ rateLimits: false });
  // Same database, Redis, prefix and secret: a second instance of the same deployment.
  b = await buildApp({ ...a.config });
  url = `ws://127.0.0.1:${await a.start(0)}/graphql`;
  await b.start(0);
});
after(async () => {
  await b?.stop();
  await a?.destroy();
});

it('one TypingStarted per user and channel per window, whichever instance is called', {
  skip: !onPostgres,
  timeout: 30_000,
}, async () => {
  const [owner, member, watcher] = await Promise.all([signUp(a), signUp(a), signUp(a)]);
  const { guildId, channelId } = await guildWithChannel(a, owner.token);
  await invite(a, owner.token, guildId, member.token);
  await invite(a, owner.token, guildId, watcher.token);
  const c = connect(url, watcher.token);
  const s = subscribe(c.client);
  await untilLive(a, [watcher]);
  const m = `mutation($c: ID!) { startTyping(channelId: $c) }`;
  for (const app of [a, b, b, a])
    assert.equal((await ok(app, m, { c: channelId }, owner.token)).startTyping, true);
  // Another user in the same channel is throttled separately.
  assert.equal((await ok(b, m, { c: channelId }, member.token)).startTyping, true);
  // The member's typing, signalled last and by b as the owner's on b were, is the marker: a repeat
  // of the owner's (on a, or on b through the same Redis connection) comes before it.
  await s.until((e) => e.some((x) => x.__typename === 'TypingStarted' && x.user.id === member.id));
  const typing = s.events.filter((x) => x.__typename === 'TypingStarted').map((x) => x.user.id);
  assert.deepEqual(typing.sort(), [owner.id, member.id].sort());
  await c.client.dispose();
});
