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
import { createTestApp, ok, signUp, type TestApp } from './helpers.ts';
import {
  EVENTS,
  guildWithChannel,
  holdsWithin,
  invite,
  metricsOf,
  rawSocket,
  SMALL_WS_LIMITS,
  type SseStream,
  send,
  sseStream,
  untilLive,
} from './realtime-helpers.ts';

let app: TestApp;
let httpUrl: string;
before(async () => {
  app = await createTestApp({ rateLimits: false });
  httpUrl = `http://127.0.0.1:${await app.start(0)}/graphql`;
});
after(() => app.destroy());

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
    const released = await holdsWithin(() => hub.liveCount(id) === 0);
    assert.equal(hub.liveCount(id), 0, 'every subscriber of the closed streams released');
    assert.ok(released);
  });
});

describe('a malformed Last-Event-ID', () => {
  it('is refused naming the header (BAD_USER_INPUT, field Last-Event-ID), not `after`, which the request may not even have', async () => {
    const u = await signUp(app);
    const res = await fetch(`${httpUrl}?${new URLSearchParams({ query: EVENTS })}`, {
      headers: {
        accept: 'text/event-stream',
        authorization: `Bearer ${u.token}`,
        'last-event-id': 'not-a-cursor',
      },
      signal: AbortSignal.timeout(10_000),
    });
    const text = await res.text();
    const items = text
      .split('\n\n')
      .filter((b) => b.startsWith('event: next'))
      .map((b) => JSON.parse(b.slice(b.indexOf('data:') + 5)));
    assert.equal(items.length, 1, text);
    const [err] = items[0].errors;
    assert.deepEqual(
      [err.extensions.code, err.extensions.field, err.message],
      ['BAD_USER_INPUT', 'Last-Event-ID', 'Last-Event-ID: not a valid events cursor.'],
    );
    assert.ok(text.includes('event: complete'));
  });
});

/** An SSE `events` request read to its end (a refused one ends at once): its status, Retry-After and items. */
async function refusal(url: string, token: string) {
  const res = await fetch(`${url}?${new URLSearchParams({ query: EVENTS })}`, {
    headers: { accept: 'text/event-stream', authorization: `Bearer ${token}` },
    signal: AbortSignal.timeout(10_000),
  });
  const text = await res.text();
  const items = text
    .split('\n\n')
    .filter((b) => b.startsWith('event: next'))
    .map((b) => JSON.parse(b.slice(b.indexOf('data:') + 5)));
  return {
    status: res.status,
    retryAfter: res.headers.get('retry-after'),
    items,
    complete: text.includes('event: complete'),
  };
}

describe('the per-user limit', () => {
  let small: TestApp;
  let smallHttp: string;
  before(async () => {
    small = await createTestApp({
      rateLimits: false,
      ws: SMALL_WS_LIMITS,
    });
    smallHttp = `http://127.0.0.1:${await small.start(0)}/graphql`;
  });
  after(() => small.destroy());

  it('counts SSE streams with the sockets (WS_MAX_SOCKETS_PER_USER): one past it is refused RATE_LIMITED, and a socket past it is closed with 4029', {
    timeout: 60_000,
  }, async () => {
    const u = await signUp(small);
    const id = decodeAnyId(u.id).id;
    const hub = small.deps.realtime!;
    const streams = [0, 1, 2].map(() => sseStream(smallHttp, u.token, { method: 'GET' }));
    await untilLive(small, [u], 3);
    const fourth = sseStream(smallHttp, u.token, { method: 'GET' });
    await holdsWithin(() => fourth.ended || hub.liveCount(id) > 3, 10_000);
    assert.equal(hub.liveCount(id), 3, 'no fourth subscriber');
    assert.deepEqual(
      fourth.errors.map((e) => [e.extensions?.code, e.extensions?.retryAfter]),
      [['RATE_LIMITED', 5]],
    );
    assert.equal(fourth.completed, true, 'one error item, then complete (an EventSource retries)');
    const again = await refusal(smallHttp, u.token);
    assert.equal(again.status, 200);
    assert.equal(again.retryAfter, '5', 'the Retry-After header');
    assert.equal(again.items.length, 1);
    // A socket is refused as the fourth socket would be.
    const sock = rawSocket(smallHttp.replace('http:', 'ws:'));
    await sock.send({ type: 'connection_init', payload: { authorization: `Bearer ${u.token}` } });
    assert.equal(await sock.closedWith(), 4029);
    // A stream closed gives its place back.
    streams[0].stop();
    assert.ok(await holdsWithin(() => hub.liveCount(id) === 2), 'the closed stream let go');
    const fifth = sseStream(smallHttp, u.token, { method: 'GET' });
    await untilLive(small, [u], 3);
    assert.deepEqual(fifth.errors, []);
    for (const s of [...streams, fifth]) s.stop();
    assert.ok(await holdsWithin(() => hub.liveCount(id) === 0), 'all let go');
    // Three sockets take every place: an SSE stream is refused.
    const socks = [0, 1, 2].map(() => rawSocket(smallHttp.replace('http:', 'ws:')));
    for (const s of socks) {
      await s.send({ type: 'connection_init', payload: { authorization: `Bearer ${u.token}` } });
      await s.until(() => s.messages.some((m) => m.type === 'connection_ack'), 'ack');
    }
    const past = await refusal(smallHttp, u.token);
    assert.equal(past.items[0]?.errors?.[0]?.extensions?.code, 'RATE_LIMITED');
    assert.equal(hub.liveCount(id), 0);
    for (const s of socks) s.ws.close();
  });
});

describe('the per-address rate', () => {
  let limited: TestApp;
  let limitedHttp: string;
  before(async () => {
    limited = await createTestApp({
      rateLimits: true,
      ws: {
        socketsPerUser: 20,
        operationsPerSocket: 50,
        connectionsPerIpPerMinute: 3,
        initTimeoutMs: 2000,
        keepAliveMs: 12_000,
      },
    });
    limitedHttp = `http://127.0.0.1:${await limited.start(0)}/graphql`;
  });
  after(() => limited.destroy());

  it('counts new SSE streams with new sockets (WS_CONNECTIONS_PER_IP_PER_MINUTE): one past it is refused RATE_LIMITED, saying when to retry', {
    timeout: 60_000,
  }, async () => {
    const users = [
      await signUp(limited),
      await signUp(limited),
      await signUp(limited),
      await signUp(limited),
    ];
    const hub = limited.deps.realtime!;
    const streams = users.slice(0, 3).map((u) => sseStream(limitedHttp, u.token, { method: 'GET' }));
    await untilLive(limited, users.slice(0, 3));
    const last = users[3];
    const id = decodeAnyId(last.id).id;
    const fourth = sseStream(limitedHttp, last.token, { method: 'GET' });
    await holdsWithin(() => fourth.ended || hub.liveCount(id) > 0, 10_000);
    assert.equal(hub.liveCount(id), 0, 'not subscribed');
    assert.equal(fourth.errors[0]?.extensions?.code, 'RATE_LIMITED');
    assert.ok(fourth.errors[0]?.extensions?.retryAfter > 0);
    assert.match(fourth.errors[0]?.message, /Too many connections from this address/);
    const sock = rawSocket(limitedHttp.replace('http:', 'ws:'));
    assert.equal(await sock.closedWith(), 4029, 'and a socket, on the same count');
    for (const s of streams) s.stop();
  });
});

describe('an EventSource that reconnects again and again', () => {
  it('under a writer, with Last-Event-ID and its first URL (a stale `after`): every message once, in order; typing items carry no id; a resume at the head is live', {
    timeout: 120_000,
  }, async () => {
    const u = await signUp(app);
    const other = await signUp(app);
    const { guildId, channelId } = await guildWithChannel(app, u.token);
    await invite(app, u.token, guildId, other.token);
    const id = decodeAnyId(u.id).id;
    const hub = app.deps.realtime!;
    // The URL's `after`: the cursor of a message from before, as the EventSource was first given.
    const first = sseStream(httpUrl, u.token, { method: 'GET' });
    await untilLive(app, [u]);
    await send(app, u.token, channelId, 'seed');
    await first.until((x) => contents(x.events).includes('seed'), 'seed');
    const stale = first.events.find((e) => e.message?.content === 'seed').cursor as string;
    first.stop();
    const N = 60;
    const writer = (async () => {
      for (let i = 0; i < N; i++) {
        await send(app, u.token, channelId, `m${i}`);
        if (i % 20 === 10)
          await ok(app, 'mutation($c: ID!) { startTyping(channelId: $c) }', { c: channelId }, other.token);
      }
    })();
    const got: string[] = [];
    let lastId: string | undefined;
    for (let round = 0; round < 300 && got.length < N; round++) {
      const s = sseStream(httpUrl, u.token, {
        method: 'GET',
        cursor: stale,
        headers: lastId ? { 'last-event-id': lastId } : {},
      });
      // A few events (fewer in some rounds), or none: cut at any point, as a network does.
      const want = round % 3;
      await s.until(
        (x) => x.items.length >= want || x.ended || got.length + contents(x.events).length >= N,
        'items',
        10_000,
      );
      s.stop();
      await holdsWithin(() => s.ended);
      assert.deepEqual(s.errors, [], `round ${round}`);
      s.items.forEach((item, i) => {
        const e = item.data.events;
        if (e.__typename === 'TypingStarted') {
          assert.equal(
            s.ids[i],
            undefined,
            'an ephemeral event has no id: the last one stays the resume point',
          );
        } else assert.equal(s.ids[i], e.cursor, 'each durable event carries its cursor as its id');
        if (s.ids[i]) lastId = s.ids[i];
      });
      got.push(...contents(s.events));
    }
    await writer;
    assert.deepEqual(
      got,
      Array.from({ length: N }, (_, i) => `m${i}`),
      'every message once, in order',
    );
    // At the head: nothing replayed, then live.
    const head = sseStream(httpUrl, u.token, {
      method: 'GET',
      cursor: stale,
      headers: { 'last-event-id': lastId! },
    });
    await untilLive(app, [u]);
    // A typing item (ephemeral: no cursor) goes out with no id, the message after it with its own.
    const typist = await signUp(app);
    await invite(app, u.token, guildId, typist.token);
    await ok(app, 'mutation($c: ID!) { startTyping(channelId: $c) }', { c: channelId }, typist.token);
    await head.until((x) => x.events.some((e) => e.__typename === 'TypingStarted'), 'typing');
    await send(app, u.token, channelId, 'tail');
    await head.until((x) => contents(x.events).includes('tail'), 'tail');
    assert.deepEqual(contents(head.events), ['tail'], 'nothing replayed from the head');
    const at = head.items.findIndex((i) => i.data?.events?.__typename === 'TypingStarted');
    assert.equal(head.ids[at], undefined, 'no id on the typing item');
    assert.equal(head.items[at].data.events.cursor, null);
    const tail = head.items.findIndex((i) => i.data?.events?.message?.content === 'tail');
    assert.equal(head.ids[tail], head.items[tail].data.events.cursor);
    head.stop();
    assert.ok(await holdsWithin(() => hub.liveCount(id) === 0));
  });
});

describe('metrics', () => {
  it('count open SSE streams and their ends by why, as the socket gauges and closes do', {
    timeout: 30_000,
  }, async () => {
    const wsUrl = httpUrl.replace('http:', 'ws:');
    const u = await signUp(app);
    const id = decodeAnyId(u.id).id;
    const hub = app.deps.realtime!;
    const read = async () => {
      const m = await metricsOf(wsUrl);
      return {
        open: m('banter_sse_open_streams'),
        closed: m('banter_sse_ends_total{reason="closed"}'),
        unauthenticated: m('banter_sse_ends_total{reason="unauthenticated"}'),
      };
    };
    const base = await read();
    const streams = [0, 1].map(() => sseStream(httpUrl, u.token, { method: 'GET' }));
    await untilLive(app, [u], 2);
    assert.equal((await read()).open - base.open, 2, 'two open');
    streams[0].stop();
    assert.ok(await holdsWithin(() => hub.liveCount(id) === 1));
    let m = await read();
    for (let i = 0; i < 100 && m.open - base.open !== 1; i++) m = await read();
    assert.deepEqual([m.open - base.open, m.closed - base.closed], [1, 1], 'one closed by its client');
    await ok(app, 'mutation { logout }', {}, u.token);
    await streams[1].until((x) => x.ended, 'the end of the stream');
    m = await read();
    assert.deepEqual([m.open - base.open, m.unauthenticated - base.unauthenticated], [0, 1], 'one cut off');
  });
});
