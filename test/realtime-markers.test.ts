/**
 * The markers of realtime-helpers (throughPresenceMarker, throughTypingMarker, throughMarker) end
 * a negative check at the marker that call caused: one like it that the stream got before the
 * call (the same user's same status earlier, the same typist's typing in the channel more than
 * the throttle ago) is not it, and the events between the two are not left out.
 */
import assert from 'node:assert/strict';
import { after, before, it } from 'node:test';
import { createTestApp, ok, signUp, type TestApp } from './helpers.ts';
import {
  connect,
  guildWithChannel,
  invite,
  subscribe,
  throughPresenceMarker,
  untilLive,
} from './realtime-helpers.ts';

let app: TestApp;
let url: string;
before(async () => {
  app = await createTestApp({ rateLimits: false });
  url = `ws://127.0.0.1:${await app.start(0)}/graphql`;
});
after(() => app.destroy());

const Q = `subscription { events { __typename ... on PresenceChanged { user { id } status } } }`;

it('throughPresenceMarker waits for the change it chose, not an earlier one of the same status', async () => {
  const [viewer, user, other] = await Promise.all([signUp(app), signUp(app), signUp(app)]);
  const { guildId } = await guildWithChannel(app, viewer.token);
  for (const u of [user, other]) await invite(app, viewer.token, guildId, u.token);
  const cv = connect(url, viewer.token);
  const sv = subscribe(cv.client, null, Q);
  await untilLive(app, [viewer]);
  const cu = connect(url, user.token);
  const co = connect(url, other.token);
  const su = subscribe(cu.client, null, Q);
  const so = subscribe(co.client, null, Q);
  try {
    await untilLive(app, [user, other]);
    await throughPresenceMarker(app, user, 'IDLE', [sv]);
    await ok(app, 'mutation { setPresence(status: ONLINE) }', {}, user.token);
    // What the second marker must not leave out: a change signalled before it.
    await ok(app, 'mutation { setPresence(status: DND) }', {}, other.token);
    const [before] = await throughPresenceMarker(app, user, 'IDLE', [sv]);
    assert.ok(
      before.some((e) => e.user?.id === other.id && e.status === 'DND'),
      `the events before the first IDLE, not the second: ${JSON.stringify(before.map((e) => e.status))}`,
    );
  } finally {
    for (const s of [sv, su, so]) s.stop();
    await Promise.all([cv.client.dispose(), cu.client.dispose(), co.client.dispose()]);
  }
});
