/**
 * Typing. The throttle is shared by every instance on the same Redis: two api instances do not
 * both announce the same user typing in the same channel within the window (Postgres + Redis
 * only: with the embedded ports there is one instance; realtime-auth.test.ts covers the throttle).
 * Who is shown typing: both modes, signalled by a second instance on Postgres + Redis.
 */
import assert from 'node:assert/strict';
import { after, before, it } from 'node:test';
import { type App, buildApp } from '../api/app.ts';
import { createTestApp, ok, onPostgres, signUp, type TestApp } from './helpers.ts';
import {
  connect,
  guildWithChannel,
  invite,
  subscribe,
  throughTypingMarker,
  untilLive,
} from './realtime-helpers.ts';

let a: TestApp;
let b: App | undefined;
let url: string;
/** where typing is signalled: another instance than the subscribers' when there is one */
let other: App;
before(async () => {
  a = await createTestApp({ rateLimits: false });
  url = `ws://127.0.0.1:${await a.start(0)}/graphql`;
  other = a;
  if (!onPostgres) return;
  // Same database, Redis, prefix and secret: a second instance of the same deployment.
  b = await buildApp({ ...a.config });
  await b.start(0);
  other = b;
});
after(async () => {
  await b?.stop();
  await a?.destroy();
});

const TYPE = `mutation($c: ID!) { startTyping(channelId: $c) }`;
const SEND = `mutation($c: ID!) { sendMessage(input: { channelId: $c, content: "hi" }) { id } }`;
const typing = (events: any[], id: string) =>
  events.filter((e) => e.__typename === 'TypingStarted' && e.user.id === id);

// Typing went to everyone who could view the channel: the user someone blocked was shown
// "blocker is typing" while its presence read OFFLINE to them, and the blocker was shown the
// typing of the user it blocked.
it('typing is not shown between two users one of whom blocked the other, either way', {
  timeout: 30_000,
}, async () => {
  const [owner, blocker, blocked, watcher, marker] = await Promise.all([
    signUp(a),
    signUp(a),
    signUp(a),
    signUp(a),
    signUp(a),
  ]);
  const { guildId, channelId } = await guildWithChannel(a, owner.token);
  for (const u of [blocker, blocked, watcher, marker]) await invite(a, owner.token, guildId, u.token);
  await ok(a, `mutation($u: ID!) { blockUser(userId: $u) { kind } }`, { u: blocked.id }, blocker.token);
  const conns = [blocker, blocked, watcher].map((u) => connect(url, u.token));
  const [sr, sd, sw] = conns.map((c) => subscribe(c.client));
  try {
    await untilLive(a, [blocker, blocked, watcher]);
    assert.equal((await ok(other, TYPE, { c: channelId }, blocked.token)).startTyping, true);
    assert.equal((await ok(other, TYPE, { c: channelId }, blocker.token)).startTyping, true);
    const [toBlocker, toBlocked, toWatcher] = await throughTypingMarker(other, marker, channelId, [
      sr,
      sd,
      sw,
    ]);
    assert.equal(typing(toWatcher, blocked.id).length, 1, 'the others see both typing');
    assert.equal(typing(toWatcher, blocker.id).length, 1, 'the others see both typing');
    assert.deepEqual(typing(toBlocker, blocked.id), [], 'the blocker is not shown the blocked user typing');
    assert.deepEqual(typing(toBlocked, blocker.id), [], 'the blocked user is not shown the blocker typing');
  } finally {
    for (const s of [sr, sd, sw]) s.stop();
    await Promise.all(conns.map((c) => c.client.dispose()));
  }
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
  const m = TYPE;
  for (const app of [a, b!, b!, a])
    assert.equal((await ok(app, m, { c: channelId }, owner.token)).startTyping, true);
  // Another user in the same channel is throttled separately.
  assert.equal((await ok(b!, m, { c: channelId }, member.token)).startTyping, true);
  // The member's typing, signalled last and by b as the owner's on b were, is the marker: a repeat
  // of the owner's (on a, or on b through the same Redis connection) comes before it.
  await s.until((e) => e.some((x) => x.__typename === 'TypingStarted' && x.user.id === member.id));
  const typing = s.events.filter((x) => x.__typename === 'TypingStarted').map((x) => x.user.id);
  assert.deepEqual(typing.sort(), [owner.id, member.id].sort());
  await c.client.dispose();
});

// The throttle let one TypingStarted through per user and channel every 5 s, a message sent in
// between or not: a client drops the indicator when the message arrives (as Discord's does), and
// the author's next startTyping, as it went on writing, was dropped, so the others saw nothing
// for up to 5 s after each message.
it('a message sent ends its author typing there: its next startTyping is shown at once', {
  timeout: 30_000,
}, async () => {
  const [owner, typist, watcher, marker] = await Promise.all([signUp(a), signUp(a), signUp(a), signUp(a)]);
  const { guildId, channelId } = await guildWithChannel(a, owner.token);
  for (const u of [typist, watcher, marker]) await invite(a, owner.token, guildId, u.token);
  const c = connect(url, watcher.token);
  const s = subscribe(c.client);
  try {
    await untilLive(a, [watcher]);
    assert.equal((await ok(other, TYPE, { c: channelId }, typist.token)).startTyping, true);
    // Sent through the other instance than the typing, where there are two (one Redis claim).
    await ok(a, SEND, { c: channelId }, typist.token);
    assert.equal((await ok(other, TYPE, { c: channelId }, typist.token)).startTyping, true);
    // Within the window, without a message between: throttled as before.
    assert.equal((await ok(other, TYPE, { c: channelId }, typist.token)).startTyping, true);
    // Everything signalled before the marker has arrived once it has (its events from the start).
    await throughTypingMarker(other, marker, channelId, [s]);
    assert.equal(typing(s.events, typist.id).length, 2, 'typing, the message, typing again: shown twice');
  } finally {
    s.stop();
    await c.client.dispose();
  }
});
