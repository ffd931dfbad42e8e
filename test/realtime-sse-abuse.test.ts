/**
 * `events` over SSE as a demanding or abusive client uses it, held to what a socket guarantees:
 * a client that goes away gives its subscriber back at once, SSE streams count toward the
 * per-user and per-address limits sockets have, and an EventSource that reconnects again and
 * again under a writer (Last-Event-ID, its first URL's `after` left stale) loses and repeats
 * nothing.
 */
import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import { decodeAnyId } from '../schema/builder.ts';
import { createTestApp, signUp, type TestApp } from './helpers.ts';
import { guildWithChannel, type SseStream, send, sleep, sseStream, untilLive } from './realtime-helpers.ts';

let app: TestApp;
let httpUrl: string;
before(async () => {
  app = await createTestApp({ rateLimits: false });
  httpUrl = `http://127.0.0.1:${await app.start(0)}/graphql`;
});
after(() => app.destroy());

/** Waits (bounded) until `pred` holds; returns whether it did. */
async function until(pred: () => boolean, ms = 5000) {
  const deadline = Date.now() + ms;
  while (!pred() && Date.now() < deadline) await sleep(20);
  return pred();
}

const contents = (events: any[]) =>
  events.filter((e) => e.__typename === 'MessageCreated').map((e) => e.message.content as string);

describe('a client that goes away', () => {
  it('gives back its SSE subscriber at once, with no event to send it, as a closed socket does', {
    timeout: 30_000,
  }, async () => {
    // A user nothing happens to: no event will be written to its dead connections.
    const u = await signUp(app);
    const hub = app.deps.realtime!;
    const id = decodeAnyId(u.id).id;
    const streams: SseStream[] = [];
    for (let i = 0; i < 20; i++) streams.push(sseStream(httpUrl, u.token, { method: 'GET' }));
    await untilLive(app, [u], 20);
    for (const s of streams) s.stop();
    const released = await until(() => hub.liveCount(id) === 0);
    assert.equal(hub.liveCount(id), 0, 'every subscriber of the closed streams released');
    assert.ok(released);
  });
});
