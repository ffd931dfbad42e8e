/**
 * `events(after)` over Server-Sent Events (yoga's HTTP subscriptions, POST or GET with
 * `Accept: text/event-stream`), read by a real HTTP client (fetch) on the real server: events
 * arrive in order with their cursors and resume by cursor, and an event whose execution failed
 * for a reason of the server's is not sent: the stream ends with a resume error instead, as the
 * socket closes with 1013, so that the client's last cursor still precedes it.
 */
import assert from 'node:assert/strict';
import { after, before, it } from 'node:test';
import { sql } from 'drizzle-orm';
import { decodeAnyId } from '../schema/builder.ts';
import { createTestApp, signUp, type TestApp } from './helpers.ts';
import {
  EVENTS,
  guildWithChannel,
  invite,
  metricsOf,
  type SseStream,
  send,
  sseStream,
  throughMarker,
  untilLive,
  whileReactionFails,
} from './realtime-helpers.ts';

let app: TestApp;
let httpUrl: string;
before(async () => {
  app = await createTestApp({ rateLimits: false });
  httpUrl = `http://127.0.0.1:${await app.start(0)}/graphql`;
});
after(() => app.destroy());

/** The message of the item that ends a stream for its client to resume (api/realtime/sse.ts). */
const RESUME = 'An event could not be delivered: resume from your last cursor.';

/** A subscription over SSE to this file's server: POST (JSON body) or GET (query string). */
const sse = (token: string, cursor?: string | null, method: 'POST' | 'GET' = 'POST') =>
  sseStream(httpUrl, token, { cursor, method });

/** A live SSE stream of `u`'s, once it is live (one more than `u` had) and its response began. */
async function liveSse(u: { id: string; token: string }) {
  const had = app.deps.realtime!.liveCount(decodeAnyId(u.id).id);
  const s = sse(u.token);
  await untilLive(app, [u], had + 1);
  await s.until((x) => x.status !== undefined || x.ended, 'the response');
  return s;
}

const contents = (events: any[]) =>
  events.filter((e) => e.__typename === 'MessageCreated').map((e) => e.message.content as string);
const cursorOf = (s: SseStream, content: string) =>
  s.events.find((e) => e.message?.content === content).cursor as string;

/** Ends each stream it is given and waits (bounded) until the hub has let their subscribers go. */
async function stopAll(...streams: SseStream[]) {
  for (const s of streams) s.stop();
  const deadline = Date.now() + 5000;
  while (streams.some((s) => !s.ended) && Date.now() < deadline) await new Promise((r) => setTimeout(r, 20));
}

it('over SSE, events arrive in order with their cursors, none repeated; a resume (GET) from a cursor gets what followed it, then goes live', {
  timeout: 30_000,
}, async () => {
  const u = await signUp(app);
  const { channelId } = await guildWithChannel(app, u.token);
  const s = await liveSse(u);
  assert.equal(s.status, 200);
  for (const c of ['a', 'b', 'c']) await send(app, u.token, channelId, c);
  await s.until((x) => contents(x.events).includes('c'), 'c');
  assert.deepEqual(contents(s.events), ['a', 'b', 'c']);
  const cursors = s.events.map((e) => e.cursor);
  assert.ok(
    cursors.every((c) => typeof c === 'string' && c.length > 0),
    'every durable event has a cursor',
  );
  assert.equal(new Set(cursors).size, cursors.length, 'no cursor repeated');

  // A client that got only 'a' resumes with its cursor, over GET this time.
  const r = sse(u.token, cursorOf(s, 'a'), 'GET');
  await r.until((x) => contents(x.events).includes('c'), 'the replay');
  await send(app, u.token, channelId, 'd');
  await r.until((x) => contents(x.events).includes('d'), 'd after the replay');
  await s.until((x) => contents(x.events).includes('d'), 'd live');
  // Anything repeated comes before a marker sent after it all.
  const [replayed, live] = await throughMarker(app, u.token, channelId, [r, s]);
  assert.deepEqual(contents(replayed), ['b', 'c', 'd']);
  assert.deepEqual(
    r.events.slice(0, 2).map((e) => e.cursor),
    [cursorOf(s, 'b'), cursorOf(s, 'c')],
    'replayed with the cursors they had live',
  );
  assert.deepEqual(contents(live), ['a', 'b', 'c', 'd']);
  assert.deepEqual(s.errors, []);
  assert.deepEqual(r.errors, []);
  assert.equal(s.ended, false, 'a healthy stream goes on');
  await stopAll(s, r);
});

it('over SSE, a refused subscription (malformed cursor) answers its code and completes: not a resume', {
  timeout: 30_000,
}, async () => {
  const u = await signUp(app);
  const s = sse(u.token, 'not-a-cursor');
  await s.until((x) => x.ended, 'the end of the response');
  assert.equal(s.completed, true);
  assert.equal(s.errors.length, 1);
  assert.equal(s.errors[0].extensions?.code, 'BAD_USER_INPUT');
});

it('over SSE, an event whose execution fails is not sent: the stream ends with a resume error, and a resume from the last cursor gets it, once', {
  timeout: 30_000,
}, async () => {
  const u = await signUp(app);
  const { channelId } = await guildWithChannel(app, u.token);
  const s = await liveSse(u);
  const m1 = await send(app, u.token, channelId, 'one');
  await s.until((x) => contents(x.events).includes('one'), 'one');
  const last = cursorOf(s, 'one');
  // The log at error level: once for the execution, with the event's cursor.
  const logged = await whileReactionFails(app, decodeAnyId(m1).id, async () => {
    const deadline = Date.now() + 5000;
    while (!s.ended && s.items.length < 2 && Date.now() < deadline)
      await new Promise((r) => setTimeout(r, 50));
  });
  assert.deepEqual(
    s.items.slice(1),
    [{ errors: [{ message: RESUME, extensions: { code: 'INTERNAL_SERVER_ERROR' } }] }],
    'the failed event is not sent: one last item tells the client to resume',
  );
  await s.until((x) => x.ended, 'the end of the stream', 5000);
  assert.equal(s.completed, true, 'the stream ends');
  assert.deepEqual(contents(s.events), ['one']);

  // The client resumes from the last cursor it got, which precedes the failed event.
  const s2 = sse(u.token, last);
  await s2.until((x) => x.events.some((e) => e.__typename === 'ReactionAdded'), 'the failed event');
  await send(app, u.token, channelId, 'two');
  await s2.until((x) => contents(x.events).includes('two'), 'two');
  const reactions = s2.events.filter((e) => e.__typename === 'ReactionAdded');
  assert.equal(reactions.length, 1, 'the failed event comes back exactly once');
  assert.equal(reactions[0].emoji, 'x');
  assert.ok(reactions[0].cursor, 'with its cursor');
  assert.deepEqual(contents(s2.events), ['two']);
  assert.deepEqual(s2.errors, []);
  assert.deepEqual(
    logged.map((l) => l.cursor),
    [reactions[0].cursor],
    'logged once, with its cursor',
  );
  await stopAll(s2);
});

it('over SSE, an event that fails every time ends the stream for a few rounds, then goes out with its error and the stream goes on', {
  timeout: 60_000,
}, async () => {
  const u = await signUp(app);
  const { guildId, channelId } = await guildWithChannel(app, u.token);
  const s = await liveSse(u);
  await send(app, u.token, channelId, 'one');
  await s.until((x) => contents(x.events).includes('one'), 'one');
  const last = cursorOf(s, 'one');
  // A row whose resolution fails the same way every time (a payload without a valid userId:
  // loading the user fails on the uuid cast).
  await app.deps.db.execute(sql`insert into events (type, guild_id, payload)
    values ('MEMBER_JOINED', ${decodeAnyId(guildId).id}::uuid, jsonb_build_object('userId', 'x'))`);
  await send(app, u.token, channelId, 'two');
  await app.deps.realtime!.poke();
  const silence = app.log.error;
  app.log.error = (() => {}) as typeof app.log.error;
  /** per round: 'resume' (the stream ended so), or what the round's stream got */
  const rounds: string[][] = [];
  const hasTwo = (x: SseStream) => contents(x.events).includes('two');
  try {
    await s.until((x) => x.ended || hasTwo(x), 'the live stream to end', 5000);
    rounds.push(s.completed && s.errors.at(-1)?.message === RESUME ? ['resume'] : s.items);
    // Clients resume from their last cursor, a round a second or more apart.
    for (let i = 0; i < 4 && rounds.at(-1)?.[0] === 'resume'; i++) {
      await new Promise((r) => setTimeout(r, 1_100));
      const si = sse(u.token, last);
      await si.until((x) => x.ended || hasTwo(x), 'the stream to end or two', 5000);
      if (si.completed && si.errors.at(-1)?.message === RESUME) {
        assert.deepEqual(si.items.length, 1, 'nothing but the resume item');
        rounds.push(['resume']);
      } else {
        rounds.push(
          si.items.map((item) =>
            item.errors
              ? `${item.errors[0].extensions?.code}: ${item.errors[0].message}`
              : (item.data.events.message?.content ?? item.data.events.__typename),
          ),
        );
        assert.equal(si.ended, false, 'the stream goes on');
        assert.equal(si.items[0].data, null, 'the failed event: no data, its error');
      }
      await stopAll(si);
    }
  } finally {
    app.log.error = silence;
  }
  // Live, then one resume: ended both times; at the third round it is sent with its error and
  // 'two' follows.
  assert.deepEqual(rounds, [['resume'], ['resume'], ['INTERNAL_SERVER_ERROR: Unexpected error.', 'two']]);
});

it('over SSE, a reader too far behind gets a last item telling it to resume, then complete, with every event before it in order', async () => {
  const u = await signUp(app);
  const { channelId } = await guildWithChannel(app, u.token);
  const hub = app.deps.realtime!;
  hub.configure({ maxPending: 20 });
  try {
    // In process (app.fetch): a body nobody reads stops yoga pulling at once, with no socket
    // buffers in between to fill first.
    // Its own subscriber (a new user's), not a count of all: one a test before let go may still be
    // on its way out.
    const alive = () => hub.liveCount(decodeAnyId(u.id).id) > 0;
    const res = await app.fetch(httpUrl, {
      method: 'POST',
      headers: {
        accept: 'text/event-stream',
        authorization: `Bearer ${u.token}`,
        'content-type': 'application/json',
      },
      body: JSON.stringify({ query: EVENTS }),
    });
    await untilLive(app, [u]);
    // Sent until it is cut off: yoga pulls a varying number of items into the response's buffer
    // before it stops (40 sends were once not enough, at maxPending 20, on a loaded machine).
    for (let i = 0; i < 200 && alive(); i++) await send(app, u.token, channelId, `m${i}`);
    // The sends are in; their delivery may still be on its way on a loaded machine (bounded wait).
    for (let i = 0; i < 100 && alive(); i++) await new Promise((r) => setTimeout(r, 50));
    assert.equal(alive(), false, 'cut off');
    const text = await Promise.race([
      res.text(),
      new Promise<string>((_, reject) =>
        setTimeout(() => reject(new Error('the stream did not end')), 10_000),
      ),
    ]);
    const blocks = text.split('\n\n').filter((b) => b.startsWith('event:'));
    const items = blocks
      .filter((b) => b.startsWith('event: next'))
      .map((b) => JSON.parse(b.slice(b.indexOf('data:') + 5)));
    assert.ok(blocks.at(-1)!.startsWith('event: complete'));
    const last = items.at(-1);
    assert.deepEqual(
      last.errors.map((e: any) => [e.message, e.extensions.code]),
      [
        [
          'Slow consumer: you are not reading your events fast enough; resume from your last cursor.',
          'INTERNAL_SERVER_ERROR',
        ],
      ],
    );
    const got = items
      .slice(0, -1)
      .map((x) => x.data.events)
      .filter((e) => e.__typename === 'MessageCreated')
      .map((e) => e.message.content);
    assert.deepEqual(
      got,
      got.map((_: string, i: number) => `m${i}`),
    );
  } finally {
    hub.configure({ maxPending: 5000 });
  }
});

it('over SSE, subscribers with the same query share one execution of a live event where its result does not depend on the viewer, and each gets it whole', {
  timeout: 30_000,
}, async () => {
  const owner = await signUp(app);
  const others = [await signUp(app), await signUp(app)];
  const { guildId, channelId } = await guildWithChannel(app, owner.token);
  for (const o of others) await invite(app, owner.token, guildId, o.token);
  const streams = [await liveSse(owner), await liveSse(others[0]), await liveSse(others[1])];
  const url = httpUrl.replace('http:', 'ws:');
  const shared = async () => (await metricsOf(url))('banter_events_delivered_total{shared="true"}');
  const own = async () => (await metricsOf(url))('banter_events_delivered_total{shared="false"}');
  const [shared0, own0] = [await shared(), await own()];
  await send(app, owner.token, channelId, 'for all three');
  for (const s of streams) await s.until((x) => contents(x.events).includes('for all three'), 'the message');
  assert.equal((await shared()) - shared0, 2, 'two of the three streams reused the first execution');
  assert.equal((await own()) - own0, 1, 'one execution');
  const items = streams.map((s) => s.events.find((e) => e.message?.content === 'for all three'));
  for (const i of items) assert.deepEqual(i, items[0], 'the same event, whole, for each');
  await stopAll(...streams);
});
