/**
 * The graphql-transport-ws protocol as Banter speaks it (api/realtime/protocol.ts), with a bare
 * `ws` client: every message type, the close codes graphql-ws clients rely on, and the push
 * path's frames.
 */
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { connect as netConnect } from 'node:net';
import type { Writable } from 'node:stream';
import { after, before, describe, it } from 'node:test';
import WebSocket, * as wsModule from 'ws';
import { nextFrame } from '../api/realtime/protocol.ts';
import { decodeAnyId } from '../schema/builder.ts';
import { createTestApp, signUp, type TestApp, type TestUser } from './helpers.ts';
import { guildWithChannel, metricsOf, rawSocket, send, sleep, untilLive } from './realtime-helpers.ts';

let app: TestApp;
let url: string;
let u: TestUser;

before(async () => {
  app = await createTestApp({
    rateLimits: false,
    ws: {
      socketsPerUser: 20,
      operationsPerSocket: 3,
      connectionsPerIpPerMinute: 1000,
      initTimeoutMs: 300,
      keepAliveMs: 12_000,
    },
  });
  url = `ws://127.0.0.1:${await app.start(0)}/graphql`;
  u = await signUp(app);
});
after(() => app.destroy());

/** A raw socket (rawSocket) to this file's server, with an init as `u` and a wait for a message. */
function open(protocol: string | null = 'graphql-transport-ws') {
  const s = rawSocket(url, protocol);
  return Object.assign(s, {
    /** until a `next` frame carries a new message with this content */
    untilMessage: (content: string) =>
      s.until(() => s.messages.some((m) => m.payload?.data?.events?.message?.content === content), content),
    async init(token = u.token) {
      await s.send({ type: 'connection_init', payload: { authorization: `Bearer ${token}` } });
      await s.until(() => s.messages.some((m) => m.type === 'connection_ack'), 'connection_ack');
    },
  });
}

/**
 * How many subscriptions of `u` are live once those of earlier tests are gone (their sockets
 * close asynchronously; bounded): a test waits for `liveNow() + n` after opening `n` more.
 */
async function liveNow() {
  const live = () => app.deps.realtime!.liveCount(decodeAnyId(u.id).id);
  for (let i = 0; i < 100 && live() > 0; i++) await sleep(20);
  return live();
}

describe('graphql-transport-ws', () => {
  it('acknowledges connection_init, answers ping with pong, ignores pong', async () => {
    const s = open();
    await s.init();
    await s.send({ type: 'pong' });
    await s.send({ type: 'ping', payload: { x: 1 } });
    await s.until(() => s.messages.some((m) => m.type === 'pong'), 'pong');
    assert.equal(s.closed(), undefined);
    s.ws.close();
  });

  it('runs a query over the socket: next, then complete', async () => {
    const s = open();
    await s.init();
    await s.send({ id: 'q1', type: 'subscribe', payload: { query: '{ viewer { user { id username } } }' } });
    await s.until(() => s.messages.some((m) => m.type === 'complete'), 'complete');
    const [next, complete] = s.messages.filter((m) => m.id === 'q1');
    assert.equal(next.type, 'next');
    assert.equal(next.payload.data.viewer.user.username, u.username);
    assert.deepEqual(complete, { id: 'q1', type: 'complete' });
    s.ws.close();
  });

  /** A socket subscribed as `id` to new messages' content, and a new channel to send them in. */
  async function messageStream(id: string) {
    const { channelId } = await guildWithChannel(app, u.token);
    const had = await liveNow();
    const s = open();
    await s.init();
    const query = 'subscription { events { ... on MessageCreated { message { content } } } }';
    await s.send({ id, type: 'subscribe', payload: { query } });
    await untilLive(app, [u], had + 1);
    return { s, channelId };
  }

  it('streams events as next frames with the operation id, and stops after complete', async () => {
    const { s, channelId } = await messageStream('ev "quoted" id');
    await send(app, u.token, channelId, 'first');
    await s.untilMessage('first');
    const frame = s.messages.find((m) => m.type === 'next');
    assert.equal(frame.id, 'ev "quoted" id');
    await s.send({ id: 'ev "quoted" id', type: 'complete' });
    const hub = app.deps.realtime!;
    for (let i = 0; i < 250 && hub.subscriberCount > 0; i++) await sleep(20);
    assert.equal(hub.subscriberCount, 0);
    const before = s.messages.length;
    await send(app, u.token, channelId, 'second');
    // The marker: another operation on the same socket, live after 'second' committed, gets a
    // message sent after it. What the completed one would have got of 'second' was handed over
    // before 'third' was written (the hub hands each row to every subscriber at once, in log order).
    const query = 'subscription { events { ... on MessageCreated { message { content } } } }';
    await s.send({ id: 'marker', type: 'subscribe', payload: { query } });
    await untilLive(app, [u], 1);
    await send(app, u.token, channelId, 'third');
    await s.untilMessage('third');
    assert.deepEqual(
      s.messages.slice(before).filter((m) => m.id !== 'marker'),
      [],
      'nothing after the client completed the operation',
    );
    s.ws.close();
  });

  it('writes long and multi-byte results as valid frames (16-bit length, UTF-8 bytes)', async () => {
    const { s, channelId } = await messageStream('long');
    const content = `${'ünïcødé 🎉 '.repeat(363)}end`; // 3,996 UTF-16 units, under the 4,000 limit
    await send(app, u.token, channelId, content);
    await s.untilMessage(content);
    s.ws.close();
  });

  it('answers validation failures with an error message, socket kept', async () => {
    const s = open();
    await s.init();
    await s.send({ id: 'bad', type: 'subscribe', payload: { query: 'subscription { nope }' } });
    await s.until(() => s.messages.some((m) => m.type === 'error'), 'error');
    const e = s.messages.find((m) => m.type === 'error');
    assert.equal(e.id, 'bad');
    assert.ok(Array.isArray(e.payload) && e.payload.length >= 1);
    assert.equal(s.closed(), undefined);
    s.ws.close();
  });

  it('a document whose operation cannot be picked, or that fails validation, is answered as over HTTP, with its code (none for the first, before; validation errors for an anonymous operation beside a named one, before)', async () => {
    const docs = [
      { query: 'query A { __typename } query B { __typename }' },
      { query: 'query A { __typename }', operationName: 'Z' },
      { query: 'subscription { nope }' },
      // An anonymous operation beside a named one, and no operation at all: over HTTP the
      // operation is picked before validation (OPERATION_RESOLUTION_FAILURE); over the socket
      // they were validation errors (GRAPHQL_VALIDATION_FAILED) before.
      { query: '{ __typename } query B { __typename }' },
      { query: '{ __typename } query B { __typename }', operationName: 'B' },
      { query: 'fragment F on Query { __typename }' },
    ];
    const s = open();
    await s.init();
    for (const [i, payload] of docs.entries()) {
      const res = await app.fetch(
        '/graphql',
        {
          method: 'POST',
          headers: { 'content-type': 'application/json', authorization: `Bearer ${u.token}` },
          body: JSON.stringify(payload),
        },
        { ip: 'test-ip-protocol' },
      );
      const overHttp = (
        (await res.json()) as { errors: { message: string; extensions?: { code?: string } }[] }
      ).errors[0];
      await s.send({ id: `d${i}`, type: 'subscribe', payload });
      await s.until(() => s.messages.some((m) => m.id === `d${i}`), `an answer to d${i}`);
      const overWs = s.messages.find((m) => m.id === `d${i}`);
      assert.equal(overWs.type, 'error');
      assert.deepEqual(
        [overWs.payload[0].message, overWs.payload[0].extensions?.code],
        [overHttp.message, overHttp.extensions?.code],
        JSON.stringify(payload),
      );
      assert.ok(overHttp.extensions?.code, 'HTTP gives it a code');
    }
    assert.equal(s.closed(), undefined);
    s.ws.close();
  });

  it('a document whose operation cannot be picked is counted in banter_graphql_errors_total under OPERATION_RESOLUTION_FAILURE over the socket as over HTTP (the socket did not count it)', async () => {
    const docs = [
      { query: '{ __typename } query B { __typename }' },
      { query: 'query A { __typename } query B { __typename }' },
      { query: 'query A { __typename }', operationName: 'Z' },
      { query: 'fragment F on Query { __typename }' },
    ];
    const counted = async () =>
      (await metricsOf(url))('banter_graphql_errors_total{code="OPERATION_RESOLUTION_FAILURE"}');
    const s = open();
    await s.init();
    for (const [i, payload] of docs.entries()) {
      const before = await counted();
      const res = await fetch(url.replace('ws:', 'http:'), {
        method: 'POST',
        headers: { 'content-type': 'application/json', authorization: `Bearer ${u.token}` },
        body: JSON.stringify(payload),
      });
      await res.text();
      const overHttp = await counted();
      await s.send({ id: `c${i}`, type: 'subscribe', payload });
      await s.until(() => s.messages.some((m) => m.id === `c${i}`), `an answer to c${i}`);
      assert.equal(
        s.messages.find((m) => m.id === `c${i}`).payload[0].extensions.code,
        'OPERATION_RESOLUTION_FAILURE',
      );
      const overWs = await counted();
      assert.deepEqual(
        { http: overHttp - before, ws: overWs - overHttp },
        { http: 1, ws: 1 },
        JSON.stringify(payload),
      );
    }
    s.ws.close();
  });

  it("a syntax error, a validation error and a bad variable answer over the socket with the extensions HTTP answers, whichever transport saw the document first (a syntax error was BAD_USER_INPUT over the socket, then over HTTP too; the socket's carried yoga's internal `http` status)", async () => {
    // Documents of this test alone: yoga caches a document's parse error for both transports.
    const tag = `t${Date.now()}`;
    const docs = [
      { query: `subscription { events { ${tag} ` },
      { query: `subscription { events { ${tag} } }` },
      { query: `subscription { events(after: 5) { ${tag}: __typename } }` },
      { query: `query($id: ID!) { message(id: $id) { ${tag}: id } }`, variables: { id: 5.5 } },
    ];
    const httpUrl = url.replace('ws:', 'http:');
    const overHttp = async (payload: object) => {
      const res = await fetch(httpUrl, {
        method: 'POST',
        headers: {
          'content-type': 'application/json',
          accept: 'application/graphql-response+json',
          authorization: `Bearer ${u.token}`,
        },
        body: JSON.stringify(payload),
      });
      const body = (await res.json()) as { errors: { extensions?: Record<string, unknown> }[] };
      return { status: res.status, extensions: body.errors.map((e) => e.extensions) };
    };
    const s = open();
    await s.init();
    for (const [i, payload] of docs.entries()) {
      // Over the socket first, then over HTTP, then over HTTP a document the socket never saw.
      await s.send({ id: `x${i}`, type: 'subscribe', payload });
      await s.until(() => s.messages.some((m) => m.id === `x${i}`), `an answer to x${i}`);
      const answer = s.messages.find((m) => m.id === `x${i}`);
      // A document refused before execution is an `error` message; a query's variables are
      // checked at execution, so theirs is a result with errors (then complete), as graphql-ws does.
      const overWs: { extensions?: Record<string, unknown> }[] =
        answer.type === 'error' ? answer.payload : answer.payload.errors;
      const afterWs = await overHttp(payload);
      const fresh = await overHttp({ ...payload, query: `${payload.query}\n` });
      assert.deepEqual(
        { ws: overWs.map((e) => e.extensions), afterWs },
        { ws: fresh.extensions, afterWs: fresh },
        JSON.stringify(payload),
      );
    }
    assert.deepEqual(
      s.messages.filter((m) => m.id?.startsWith('x')).map((m) => m.payload?.[0]?.extensions?.code ?? m.type),
      ['GRAPHQL_PARSE_FAILED', 'GRAPHQL_VALIDATION_FAILED', 'GRAPHQL_VALIDATION_FAILED', 'next', 'complete'],
    );
    s.ws.close();
  });

  it('a syntax error says where it is (locations: line and column), over HTTP and over the socket, as graphql-js reports it (the mask rebuilt it from its nodes, which a syntax error has none of)', async () => {
    const query = `subscription {\n  events { t${Date.now()} `;
    const res = await fetch(url.replace('ws:', 'http:'), {
      method: 'POST',
      headers: {
        'content-type': 'application/json',
        accept: 'application/graphql-response+json',
        authorization: `Bearer ${u.token}`,
      },
      body: JSON.stringify({ query }),
    });
    const overHttp = ((await res.json()) as { errors: { locations?: unknown }[] }).errors;
    const s = open();
    await s.init();
    await s.send({ id: 'loc', type: 'subscribe', payload: { query } });
    await s.until(() => s.messages.some((m) => m.id === 'loc'), 'an answer to loc');
    const overWs = s.messages.find((m) => m.id === 'loc').payload as { locations?: unknown }[];
    const expected = [{ line: 2, column: query.length - query.indexOf('\n') }];
    assert.deepEqual(
      { http: overHttp.map((e) => e.locations), ws: overWs.map((e) => e.locations) },
      { http: [expected], ws: [expected] },
    );
    s.ws.close();
  });

  it('a subscription whose root field is under @skip or @include is refused as invalid, over the socket as over HTTP: it was an INTERNAL_SERVER_ERROR (logged as a server error), and with a variable it closed the socket with 4500', async () => {
    const docs = [
      { query: 'subscription { events @skip(if: true) { __typename } }' },
      {
        query: 'subscription($x: Boolean!) { events @include(if: $x) { __typename } }',
        variables: { x: true },
      },
      {
        query:
          'subscription S($x: Boolean!) { ...Root } fragment Root on Subscription { events @skip(if: $x) { cursor } }',
        variables: { x: false },
      },
    ];
    const s = open();
    await s.init();
    for (const [i, payload] of docs.entries()) {
      const res = await fetch(url.replace('ws:', 'http:'), {
        method: 'POST',
        headers: { 'content-type': 'application/json', authorization: `Bearer ${u.token}` },
        body: JSON.stringify(payload),
      });
      const overHttp = ((await res.json()) as { errors: { message: string; extensions?: object }[] }).errors;
      await s.send({ id: `c${i}`, type: 'subscribe', payload });
      await s.until(() => s.messages.some((m) => m.id === `c${i}`) || !!s.closed(), `an answer to c${i}`);
      assert.equal(s.closed(), undefined, `the socket is kept: ${JSON.stringify(payload)}`);
      const answer = s.messages.find((m) => m.id === `c${i}`);
      assert.equal(answer.type, 'error');
      const overWs = answer.payload as { message: string; extensions?: object }[];
      assert.deepEqual(overWs, overHttp);
      assert.deepEqual(
        overWs.map((e) => [e.message, e.extensions]),
        [
          [
            `${i === 2 ? 'Subscription "S"' : 'Anonymous Subscription'} must not use \`@skip\` or \`@include\` directives in the top level selection.`,
            { code: 'GRAPHQL_VALIDATION_FAILED' },
          ],
        ],
      );
    }
    s.ws.close();
  });

  it('limits operations per socket (RATE_LIMITED)', async () => {
    const s = open();
    await s.init();
    const query = 'subscription { events { cursor } }';
    for (let i = 0; i < 6; i++) await s.send({ id: `op${i}`, type: 'subscribe', payload: { query } });
    await s.until(() => s.messages.some((m) => m.type === 'error'), 'an error');
    const refused = s.messages.filter((m) => m.type === 'error');
    assert.ok(refused.every((m) => m.payload[0].extensions.code === 'RATE_LIMITED'));
    assert.ok(refused.length >= 2, `refused ${refused.length}`);
    s.ws.close();
  });

  it('subscribes that arrive together (a page opening its subscriptions at once) run up to the limit; only those past it are refused (all were before)', async () => {
    // graphql-ws's client sends every subscribe made before the ack at once, when it comes: the
    // server reads them in one chunk. Four of them here, the limit 3: one is over it.
    const s = open();
    await s.init();
    const query = 'subscription { events { cursor } }';
    const tcp = (s.ws as unknown as { _socket: import('node:net').Socket })._socket;
    tcp.cork();
    for (let i = 0; i < 4; i++)
      s.ws.send(JSON.stringify({ id: `op${i}`, type: 'subscribe', payload: { query } }));
    tcp.uncork();
    await s.until(() => s.messages.some((m) => m.type === 'error'), 'an error');
    // The three the limit allows are set up (running: counted in the gauge), none refused.
    for (let i = 0; i < 100 && (await metricsOf(url))('banter_ws_active_subscriptions') < 3; i++)
      await new Promise((r) => setTimeout(r, 50));
    const refused = s.messages.filter((m) => m.type === 'error');
    assert.deepEqual(
      refused.map((m) => [m.id, m.payload[0].extensions.code]),
      [['op3', 'RATE_LIMITED']],
    );
    assert.equal((await metricsOf(url))('banter_ws_active_subscriptions'), 3);
    s.ws.close();
  });

  it('closes with 4409 when an id is reused while its operation runs', async () => {
    const s = open();
    await s.init();
    const query = 'subscription { events { cursor } }';
    await s.send({ id: 'dup', type: 'subscribe', payload: { query } });
    await s.send({ id: 'dup', type: 'subscribe', payload: { query } });
    assert.equal(await s.closedWith(), 4409);
  });

  /**
   * One batch: subscribe 1 with `first`, complete 1, subscribe 1 again selecting the cursor too.
   * Legal: the id is free once the client completed it.
   */
  const reuseId = (s: ReturnType<typeof open>, first: string) => {
    const subscribe = (query: string) =>
      s.ws.send(JSON.stringify({ id: '1', type: 'subscribe', payload: { query } }));
    subscribe(first);
    s.ws.send(JSON.stringify({ id: '1', type: 'complete' }));
    subscribe('subscription { events { __typename cursor } }');
  };

  it('an id completed and reused while its first setup is pending names the new operation only (it got the old one before)', async () => {
    const { channelId } = await guildWithChannel(app, u.token);
    const had = await liveNow();
    const s = open();
    await s.init();
    reuseId(s, 'subscription { events { __typename } }');
    await untilLive(app, [u], had + 1);
    await send(app, u.token, channelId, 'hello');
    const created = () =>
      s.messages.filter((m) => m.type === 'next' && m.payload?.data?.events?.__typename === 'MessageCreated');
    await s.until(() => created().length > 0, 'MessageCreated');
    // The marker: a second message, which the new operation gets. The completed one's frame for
    // 'hello' was handed over with the new one's, before 'bye' was written.
    const byNew = () => created().filter((m) => 'cursor' in m.payload.data.events);
    await send(app, u.token, channelId, 'bye');
    await s.until(() => byNew().length > 1, 'the marker');
    assert.deepEqual(created(), byNew(), `served by the completed operation: ${JSON.stringify(created())}`);
    assert.equal(created().length, 2);
    s.ws.close();
  });

  it("an id completed and reused: the first setup's error does not end the new operation (it did before)", async () => {
    const { channelId } = await guildWithChannel(app, u.token);
    const had = await liveNow();
    const s = open();
    await s.init();
    reuseId(s, 'subscription { events(after: "garbage") { __typename } }');
    await untilLive(app, [u], had + 1);
    await send(app, u.token, channelId, 'hello');
    await s.until(
      () =>
        s.messages.some((m) => m.type === 'next' && m.payload?.data?.events?.__typename === 'MessageCreated'),
      'MessageCreated',
    );
    assert.deepEqual(
      s.messages.filter((m) => m.type === 'error' || m.type === 'complete'),
      [],
      'nothing of the completed operation reaches the client',
    );
    s.ws.close();
  });

  it('a query the client completed before its result gets no next frame (it got one before)', async () => {
    const s = open();
    await s.init();
    s.ws.send(
      JSON.stringify({ id: 'q', type: 'subscribe', payload: { query: '{ viewer { user { id } } }' } }),
    );
    s.ws.send(JSON.stringify({ id: 'q', type: 'complete' }));
    s.ws.send(
      JSON.stringify({ id: 'r', type: 'subscribe', payload: { query: '{ viewer { user { id } } }' } }),
    );
    await s.until(() => s.messages.some((m) => m.id === 'r' && m.type === 'complete'), 'r complete');
    // A pause: queries run side by side, so r's answer does not mark q's (which may take longer).
    await new Promise((r) => setTimeout(r, 200));
    assert.deepEqual(
      s.messages.filter((m) => m.id === 'q'),
      [],
    );
    s.ws.close();
  });

  it('closes with 4401 on subscribe before connection_ack', async () => {
    const s = open();
    await s.send({ id: 'early', type: 'subscribe', payload: { query: '{ serverInfo { name } }' } });
    assert.equal(await s.closedWith(), 4401);
  });

  it('closes with 4429 on a second connection_init', async () => {
    const s = open();
    await s.init();
    await s.send({ type: 'connection_init', payload: {} });
    assert.equal(await s.closedWith(), 4429);
  });

  it('closes with 4400 on malformed messages', async () => {
    for (const bad of [
      'not json',
      '[1,2]',
      { type: 'subscribe', id: '', payload: { query: '{ a }' } },
      { type: 'subscribe', id: 'x', payload: { query: 42 } },
      { type: 'subscribe', id: 'x', payload: { query: '{ a }', variables: 'no' } },
      { type: 'connection_init', payload: 'no' },
      { type: 'next', id: 'x', payload: {} },
    ]) {
      const s = open();
      await s.send(bad);
      assert.equal(await s.closedWith(), 4400, JSON.stringify(bad));
    }
  });

  it('closes with 4408 when connection_init does not come in time', async () => {
    const s = open();
    assert.equal(await s.closedWith(), 4408);
  });

  it('closes with 4401 an anonymous socket that sends no token in time (connection_init without one, and no subscribe with one)', async () => {
    const s = rawSocket(url);
    await s.send({ type: 'connection_init', payload: {} });
    await s.until(() => s.messages.some((m) => m.type === 'connection_ack'), 'the ack');
    const started = Date.now();
    assert.equal(await s.closedWith(), 4401);
    assert.ok(Date.now() - started < 2000, `closed after ${Date.now() - started} ms`);
  });

  it('closes with 4406 without the graphql-transport-ws subprotocol', async () => {
    const s = open(null);
    assert.equal(await s.closedWith(), 4406);
  });

  it('pings every socket once per WS_KEEPALIVE_MS, spread over the interval, and terminates one that does not answer', async () => {
    // A server of its own, WS_KEEPALIVE_MS=1000: four slices, one visited every 250 ms, empty at first.
    const app2 = await createTestApp({ rateLimits: false }, { WS_KEEPALIVE_MS: '1000' });
    try {
      const url2 = `ws://127.0.0.1:${await app2.start(0)}/graphql`;
      const v = await signUp(app2);
      const socket = (autoPong: boolean) => {
        const ws = new WebSocket(url2, 'graphql-transport-ws', { autoPong });
        const pings: number[] = [];
        let closedAt: number | undefined;
        let code: number | undefined;
        ws.on('ping', () => pings.push(Date.now()));
        ws.on('close', (c) => {
          closedAt = Date.now();
          code = c;
        });
        ws.on('error', () => {});
        ws.once('open', () =>
          ws.send(
            JSON.stringify({ type: 'connection_init', payload: { authorization: `Bearer ${v.token}` } }),
          ),
        );
        return { ws, pings, closed: () => closedAt, code: () => code };
      };
      const mute = Array.from({ length: 8 }, () => socket(false));
      const answering = socket(true);
      const deadline = Date.now() + 5000;
      while (mute.some((m) => m.closed() === undefined) && Date.now() < deadline)
        await new Promise((r) => setTimeout(r, 20));
      for (const m of mute) {
        assert.equal(m.pings.length, 1, 'pinged once, then terminated at its next turn');
        assert.equal(m.code(), 1006, 'terminated, no close frame');
        // At its slice's next visit, an interval later (timers are never early; under load they are
        // late, so no upper bound: a socket left for a further visit would have been pinged again).
        const waited = m.closed()! - m.pings[0];
        assert.ok(waited >= 800, `terminated ${waited} ms after its ping`);
      }
      const firsts = mute.map((m) => m.pings[0]);
      const spread = Math.max(...firsts) - Math.min(...firsts);
      assert.ok(spread >= 400, `first pings ${spread} ms apart: the sockets are spread over the interval`);
      await new Promise((r) => setTimeout(r, 1200));
      assert.ok(answering.pings.length >= 2, 'the answering socket is pinged every interval');
      assert.equal(answering.closed(), undefined, 'a socket that answers stays open');
      answering.ws.close();
    } finally {
      await app2.destroy();
    }
  });

  it('banter_events_delivered_total counts frames written, not those for a socket already closing (its client sent its close): they were counted, never sent', async () => {
    const v = await signUp(app);
    const { channelId } = await guildWithChannel(app, v.token);
    const query = 'subscription { events { ... on MessageCreated { message { content } } } }';
    const port = Number(new URL(url).port);
    const normal = open();
    await normal.init(v.token);
    await normal.send({ id: '1', type: 'subscribe', payload: { query } });
    const closing = halfClosingSocket(port);
    await closing.send({ type: 'connection_init', payload: { authorization: `Bearer ${v.token}` } });
    await closing.until('connection_ack');
    await closing.send({ id: '1', type: 'subscribe', payload: { query } });
    try {
      await untilLive(app, [v], 2);
      await send(app, v.token, channelId, 'both');
      await normal.untilMessage('both');
      await closing.until('"both"');
      // The client's close frame, answered by the server's (it is closing from then on): the
      // client does not end its TCP connection, so the server's socket stays in CLOSING.
      closing.sendClose();
      await closing.until('close frame');
      const delivered = async () => {
        const m = await metricsOf(url);
        return (
          m('banter_events_delivered_total{shared="true"}') +
          m('banter_events_delivered_total{shared="false"}')
        );
      };
      const nexts = () => normal.messages.filter((m) => m.type === 'next').length;
      const [before, framesBefore] = [await delivered(), nexts()];
      for (const content of ['two', 'three', 'four']) await send(app, v.token, channelId, content);
      await normal.untilMessage('four');
      // Written: the normal socket's frames; the closing socket's were never written.
      assert.equal((await delivered()) - before, nexts() - framesBefore);
      assert.equal(nexts() - framesBefore, 3);
    } finally {
      closing.destroy();
      normal.ws.close();
    }
  });

  it('shares one execution between subscribers resuming from different cursors once live', async () => {
    const { channelId } = await guildWithChannel(app, u.token);
    const query =
      'subscription($after: String) { events(after: $after) { cursor ... on MessageCreated { message { content } } } }';
    // Subscriber a is live; b and c resume from two different cursors of a's stream.
    const had = await liveNow();
    const a = open();
    await a.init();
    await a.send({ id: '1', type: 'subscribe', payload: { query } });
    await untilLive(app, [u], had + 1);
    await send(app, u.token, channelId, 'mark one');
    await send(app, u.token, channelId, 'mark two');
    // Only the marks: a presence event (u coming online again) may come first, cursor null.
    const marks = () => a.messages.filter((m) => m.type === 'next' && m.payload.data.events.message);
    await a.until(() => marks().length >= 2, 'two marks');
    const [one, two] = marks().map((m) => m.payload.data.events.cursor);
    const metric = async () => (await metricsOf(url))('banter_events_delivered_total{shared="true"}');
    const b = open();
    const c = open();
    await b.init();
    await c.init();
    await b.send({ id: '1', type: 'subscribe', payload: { query, variables: { after: one } } });
    await c.send({ id: '1', type: 'subscribe', payload: { query, variables: { after: two } } });
    await b.untilMessage('mark two');
    // b and c are through their replays: 'live for all' reaches all three live.
    await untilLive(app, [u], had + 3);
    const shared0 = await metric();
    await send(app, u.token, channelId, 'live for all');
    for (const s of [a, b, c]) await s.untilMessage('live for all');
    assert.equal((await metric()) - shared0, 2, 'two of the three subscribers reused the first execution');
    for (const s of [a, b, c]) s.ws.close();
  });
});

/** ws's frame parser (not in its type definitions). */
const { Receiver } = wsModule as unknown as {
  Receiver: new (o: { isServer: boolean; skipUTF8Validation: boolean }) => Writable;
};

describe('nextFrame', () => {
  it("builds frames that ws's own parser reads back, at each length encoding", async () => {
    // Payload sizes at each side of the 7-, 16- and 64-bit length encodings.
    for (const n of [8, 9, 125, 126, 65535, 65536, 70_000]) {
      // A valid UTF-8 body: 2-byte characters, then an ASCII byte if its length is odd.
      const body = Buffer.alloc(n - 8, 'é');
      if (body.length % 2) body[body.length - 1] = 0x61;
      const prefix = Buffer.from('{"x":"');
      const payload = Buffer.concat([body, Buffer.from('"')]);
      const frame = nextFrame(prefix, payload);
      const got = await new Promise<string>((resolve, reject) => {
        const r = new Receiver({ isServer: false, skipUTF8Validation: false });
        r.on('message', (data: Buffer, isBinary: boolean) =>
          isBinary ? reject(new Error('binary')) : resolve(String(data)),
        );
        r.on('error', reject);
        r.write(frame);
      });
      assert.equal(got, `${prefix}${payload}}`, `${n} bytes`);
    }
  });
});

/**
 * A graphql-transport-ws client on a bare TCP socket, for a socket left half closed: `sendClose`
 * sends its close frame, and it then never ends the connection (ws's own client would, once it
 * has the server's close frame), so the server's socket stays CLOSING. `until` waits for text
 * (or 'close frame') in what the server sent.
 */
function halfClosingSocket(port: number) {
  // Half open: it does not end its side when the server ends its own (net's default would).
  const tcp = netConnect({ port, host: '127.0.0.1', allowHalfOpen: true });
  tcp.on('error', () => {});
  let got = Buffer.alloc(0);
  tcp.on('data', (d) => {
    got = Buffer.concat([got, d]);
  });
  tcp.write(
    'GET /graphql HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n' +
      `Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: ${randomBytes(16).toString('base64')}\r\n` +
      'Sec-WebSocket-Protocol: graphql-transport-ws\r\n\r\n',
  );
  /** A masked client frame (RFC 6455 5.3) with a zero mask, which leaves the payload as it is. */
  const frame = (opcode: number, payload: Buffer) => {
    const n = payload.length;
    const head = n < 126 ? Buffer.from([0x80 | opcode, 0x80 | n]) : Buffer.alloc(4);
    if (n >= 126) {
      head[0] = 0x80 | opcode;
      head[1] = 0x80 | 126;
      head.writeUInt16BE(n, 2);
    }
    return Buffer.concat([head, Buffer.alloc(4), payload]);
  };
  /** The server's close frame: opcode 8 with FIN, unmasked, after the 101's headers. */
  const closeFrameIn = (b: Buffer) => {
    let at = b.indexOf('\r\n\r\n') + 4;
    while (at > 3 && at + 2 <= b.length) {
      if (b[at] === 0x88) return true;
      const len = b[at + 1] & 0x7f;
      const size = len < 126 ? len : len === 126 ? b.readUInt16BE(at + 2) : Number(b.readBigUInt64BE(at + 2));
      at += (len < 126 ? 2 : len === 126 ? 4 : 10) + size;
    }
    return false;
  };
  return {
    send: (m: unknown) =>
      new Promise<void>((r) => tcp.write(frame(0x1, Buffer.from(JSON.stringify(m))), () => r())),
    sendClose: () => tcp.write(frame(0x8, Buffer.from([0x03, 0xe8]))),
    async until(what: string, ms = 10_000) {
      const deadline = Date.now() + ms;
      const seen = () => (what === 'close frame' ? closeFrameIn(got) : got.includes(what));
      while (!seen()) {
        if (Date.now() > deadline)
          throw new Error(`timed out waiting for ${what}: ${got.toString('latin1')}`);
        await sleep(20);
      }
    },
    destroy: () => tcp.destroy(),
  };
}
