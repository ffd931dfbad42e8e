/**
 * The transports as a demanding client meets them: sockets and subscriptions opened and closed
 * many times (limits and metrics come back), operations over the socket, an SSE stream whose
 * session ends, and an api instance that stops under its open sockets and SSE streams.
 */
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { after, before, describe, it } from 'node:test';
import { sql } from 'drizzle-orm';
import { decodeAnyId } from '../schema/builder.ts';
import { createTestApp, ok, signUp, type TestApp } from './helpers.ts';
import {
  connect,
  EVENTS,
  guildWithChannel,
  metricsOf,
  rawSocket,
  SMALL_WS_LIMITS,
  send,
  sleep,
  sseStream,
  subscribe,
  untilLive,
} from './realtime-helpers.ts';

let app: TestApp;
let url: string;
let httpUrl: string;
before(async () => {
  app = await createTestApp({
    rateLimits: false,
    ws: SMALL_WS_LIMITS,
  });
  const port = await app.start(0);
  url = `ws://127.0.0.1:${port}/graphql`;
  httpUrl = `http://127.0.0.1:${port}/graphql`;
});
after(() => app.destroy());

/** A subscription over SSE (GET, as an EventSource sends it), read as it arrives. */
const sse = (base: string, token: string, cursor?: string | null, headers: Record<string, string> = {}) =>
  sseStream(base, token, { cursor, method: 'GET', headers });

/**
 * A graphql-ws reader in a process of its own: resumes `events` from `after`, reads nothing for
 * `pauseMs`, then reads until it has `want` events or the socket closes.
 */
function replayReader(wsUrl: string, token: string, after: string, want: number, pauseMs: number) {
  const script = `
    const WebSocket = require('ws');
    const [url, token, query, after, want, pauseMs] = process.argv.slice(1);
    const ws = new WebSocket(url, 'graphql-transport-ws');
    let got = 0;
    const done = (closed) => { console.log(JSON.stringify({ got, closed })); process.exit(0); };
    ws.on('open', () => ws.send(JSON.stringify({ type: 'connection_init', payload: { authorization: 'Bearer ' + token } })));
    ws.on('message', (d) => {
      const m = JSON.parse(d);
      if (m.type === 'connection_ack') {
        ws.send(JSON.stringify({ id: 'r', type: 'subscribe', payload: { query, variables: { after } } }));
        ws.pause();
        setTimeout(() => ws.resume(), Number(pauseMs));
      } else if (m.type === 'next' && ++got >= Number(want)) done(null);
    });
    ws.on('close', (code) => done(code));
    setTimeout(() => done('timeout'), 60000);`;
  return new Promise<{ got: number; closed: number | string | null }>((resolve, reject) => {
    execFile(
      process.execPath,
      ['-e', script, wsUrl, token, EVENTS, after, String(want), String(pauseMs)],
      { timeout: 70_000 },
      (err, out) => (err ? reject(err) : resolve(JSON.parse(out))),
    );
  });
}

/** A graphql-ws client in a process of its own that subscribes to `events`, then reads nothing more. */
function stalledReader(wsUrl: string, token: string) {
  const script = `
    const WebSocket = require('ws');
    const [url, token, query] = process.argv.slice(1);
    const ws = new WebSocket(url, 'graphql-transport-ws');
    ws.on('open', () => ws.send(JSON.stringify({ type: 'connection_init', payload: { authorization: 'Bearer ' + token } })));
    ws.on('message', (d) => {
      if (JSON.parse(d).type !== 'connection_ack') return;
      ws.send(JSON.stringify({ id: 's', type: 'subscribe', payload: { query } }));
      ws.pause();
    });
    setTimeout(() => process.exit(0), 60000);`;
  return execFile(process.execPath, ['-e', script, wsUrl, token, EVENTS], { timeout: 70_000 });
}

/** Waits (bounded) for the hub to hold `n` subscribers. */
async function subscribers(a: TestApp, n: number, ms = 5000) {
  const deadline = Date.now() + ms;
  while (a.deps.realtime!.subscriberCount !== n && Date.now() < deadline) await sleep(20);
  return a.deps.realtime!.subscriberCount;
}

const contents = (events: any[]) =>
  events.filter((e) => e.__typename === 'MessageCreated').map((e) => e.message.content as string);

describe('churn', () => {
  it('sockets and subscriptions opened and closed many times give back their slots, and the gauges return to zero', {
    timeout: 60_000,
  }, async () => {
    const u = await signUp(app);
    const { channelId } = await guildWithChannel(app, u.token);
    const base = app.deps.realtime!.subscriberCount;
    for (let round = 0; round < 5; round++) {
      // Up to the per-user limit (3), each with as many operations as allowed (4), some
      // completed by the client, then the sockets closed every way a client closes them.
      const socks = Array.from({ length: 3 }, () => rawSocket(url));
      for (const s of socks) {
        await s.send({ type: 'connection_init', payload: { authorization: `Bearer ${u.token}` } });
        await s.until(() => s.messages.some((m) => m.type === 'connection_ack'), 'ack');
        for (let i = 0; i < 4; i++)
          await s.send({ id: `op${i}`, type: 'subscribe', payload: { query: EVENTS } });
      }
      assert.equal(await subscribers(app, base + 12), base + 12, `round ${round}: 12 subscribers`);
      // Live, each of them: the send below reaches every one still open.
      await untilLive(app, [u], 12);
      await socks[0].send({ id: 'op0', type: 'complete' });
      await send(app, u.token, channelId, `r${round}`);
      for (const s of socks)
        await s.until(
          () =>
            s.messages.filter((m) => m.payload?.data?.events?.message?.content === `r${round}`).length >= 3,
          `r${round} on each live operation`,
        );
      socks[0].ws.close(1000);
      socks[1].ws.terminate();
      socks[2].ws.close(4000, 'client going');
      for (const s of socks) await s.until(() => !!s.closed(), 'close');
      assert.equal(await subscribers(app, base), base, `round ${round}: every subscriber released`);
    }
    // Slots are free: three new sockets get in, a fourth is refused with 4029.
    const again = Array.from({ length: 4 }, () => rawSocket(url));
    for (const s of again.slice(0, 3)) {
      await s.send({ type: 'connection_init', payload: { authorization: `Bearer ${u.token}` } });
      await s.until(() => s.messages.some((m) => m.type === 'connection_ack'), 'ack after churn');
    }
    await again[3].send({ type: 'connection_init', payload: { authorization: `Bearer ${u.token}` } });
    assert.equal(await again[3].closedWith(), 4029);
    for (const s of again) s.ws.close();
    for (const s of again) await s.until(() => !!s.closed(), 'close');
    // A close is counted when the server has handled it, which may come after the client saw it.
    let m = await metricsOf(url);
    for (let i = 0; i < 100 && m('banter_ws_open_sockets') > 0; i++) {
      await sleep(50);
      m = await metricsOf(url);
    }
    assert.equal(m('banter_ws_open_sockets'), 0);
    assert.equal(m('banter_ws_active_subscriptions'), 0);
    assert.equal(m('banter_ws_closes_total{code="4029"}'), 1);
    assert.equal(m('banter_ws_closes_total{code="1006"}'), 5, 'the terminated sockets');
  });
});

describe('operations over the socket', () => {
  it('a mutation over the socket runs once, answers next then complete, and its event reaches the stream', async () => {
    const u = await signUp(app);
    const { channelId } = await guildWithChannel(app, u.token);
    const s = rawSocket(url);
    await s.send({ type: 'connection_init', payload: { authorization: `Bearer ${u.token}` } });
    await s.until(() => s.messages.some((m) => m.type === 'connection_ack'), 'ack');
    await s.send({ id: 'ev', type: 'subscribe', payload: { query: EVENTS } });
    await untilLive(app, [u]);
    await s.send({
      id: 'm',
      type: 'subscribe',
      payload: {
        query: 'mutation($i: SendMessageInput!) { sendMessage(input: $i) { id content } }',
        variables: { i: { channelId, content: 'over the socket' } },
      },
    });
    await s.until(() => s.messages.some((m) => m.id === 'm' && m.type === 'complete'), 'the mutation');
    const next = s.messages.filter((m) => m.id === 'm' && m.type === 'next');
    assert.equal(next.length, 1);
    assert.equal(next[0].payload.data.sendMessage.content, 'over the socket');
    await s.until(
      () =>
        s.messages.some(
          (m) => m.id === 'ev' && m.payload?.data?.events?.message?.content === 'over the socket',
        ),
      'the event',
    );
    s.ws.close();
  });

  it('a frame over the 256 KiB payload bound closes the socket with 1009, and its slot is released', async () => {
    const u = await signUp(app);
    const s = rawSocket(url);
    await s.send({ type: 'connection_init', payload: { authorization: `Bearer ${u.token}` } });
    await s.until(() => s.messages.some((m) => m.type === 'connection_ack'), 'ack');
    await s.send({
      id: 'big',
      type: 'subscribe',
      payload: { query: `{ __typename }${' '.repeat(300_000)}` },
    });
    assert.equal(await s.closedWith(), 1009);
    const fresh = Array.from({ length: 3 }, () => rawSocket(url));
    for (const f of fresh) {
      await f.send({ type: 'connection_init', payload: { authorization: `Bearer ${u.token}` } });
      await f.until(() => f.messages.some((m) => m.type === 'connection_ack'), 'ack');
      f.ws.close();
    }
  });

  it('a frame ws refuses is counted in banter_ws_closes_total under the code its client saw (1009 too big, 1007 not UTF-8), not as a dead socket (1006 before)', async () => {
    const u = await signUp(app);
    const closes = async () => {
      const m = await metricsOf(url);
      return ['1006', '1007', '1009'].map((code) => m(`banter_ws_closes_total{code="${code}"}`));
    };
    const before = await closes();
    const seen: number[] = [];
    for (const frame of [
      Buffer.from(`{"type":"ping","payload":{"x":"${'x'.repeat(300_000)}"}}`),
      Buffer.from([0x7b, 0xff, 0x7d]),
    ]) {
      const s = rawSocket(url);
      await s.send({ type: 'connection_init', payload: { authorization: `Bearer ${u.token}` } });
      await s.until(() => s.messages.some((m) => m.type === 'connection_ack'), 'ack');
      // A Buffer sent as text goes as it is: ws's sender does not check it is UTF-8.
      s.ws.send(frame, { binary: false });
      seen.push(await s.closedWith());
    }
    assert.deepEqual(seen, [1009, 1007]);
    const after = await closes();
    assert.deepEqual(
      after.map((n, i) => n - before[i]),
      [0, 1, 1],
      'closes by code (1006, 1007, 1009) since the test began',
    );
  });

  it('a close code the client chose (3000-4999, not one the server sends) is counted under code="other": a series of its own each was kept for good', async () => {
    const u = await signUp(app);
    const codes = [3000, 3999, 4001, 4998];
    const count = async () => {
      const m = await metricsOf(url);
      return [
        ...codes.map((c) => m(`banter_ws_closes_total{code="${c}"}`)),
        m('banter_ws_closes_total{code="other"}'),
      ];
    };
    const before = await count();
    for (const code of codes) {
      const s = rawSocket(url);
      await s.send({ type: 'connection_init', payload: { authorization: `Bearer ${u.token}` } });
      await s.until(() => s.messages.some((m) => m.type === 'connection_ack'), 'ack');
      s.ws.close(code);
      await s.closedWith();
    }
    // The server counts a close once its socket is gone: wait for the last one (bounded).
    let after = await count();
    for (
      let i = 0;
      i < 50 && after.reduce((a, b) => a + b) - before.reduce((a, b) => a + b) < codes.length;
      i++
    ) {
      await sleep(100);
      after = await count();
    }
    assert.deepEqual(
      after.map((n, i) => n - before[i]),
      [0, 0, 0, 0, codes.length],
      'closes since the test began: 3000, 3999, 4001, 4998 each, then other',
    );
  });
  it("a client's close with one of the server's own codes (4401, 4403, 4029, 1013) is counted as code=\"other\", not as if the server had closed the socket so; a client's 1000 stays 1000", async () => {
    const u = await signUp(app);
    const codes = [4401, 4403, 4029, 1013, 1000];
    const count = async () => {
      const m = await metricsOf(url);
      return [
        ...codes.map((c) => m(`banter_ws_closes_total{code="${c}"}`)),
        m('banter_ws_closes_total{code="other"}'),
      ];
    };
    const before = await count();
    for (const code of codes) {
      const s = rawSocket(url);
      await s.send({ type: 'connection_init', payload: { authorization: `Bearer ${u.token}` } });
      await s.until(() => s.messages.some((m) => m.type === 'connection_ack'), 'ack');
      s.ws.close(code);
      await s.closedWith();
    }
    // The server counts a close once its socket is gone: wait for the last one (bounded).
    let after = await count();
    for (
      let i = 0;
      i < 50 && after.reduce((a, b) => a + b) - before.reduce((a, b) => a + b) < codes.length;
      i++
    ) {
      await sleep(100);
      after = await count();
    }
    // Before: [1, 1, 1, 1, 1, 0], each under the server's code (a 4401 read as tokens expiring).
    assert.deepEqual(
      after.map((n, i) => n - before[i]),
      [0, 0, 0, 0, 1, 4],
      'closes since the test began: 4401, 4403, 4029, 1013, 1000, then other',
    );
  });
});

describe('a long replay to a slow reader', () => {
  it('is paced by the reading, not cut off with 1013 before going live (README: the slow-consumer close applies once live)', {
    timeout: 90_000,
  }, async () => {
    const u = await signUp(app);
    const { channelId } = await guildWithChannel(app, u.token);
    const long = 'x'.repeat(4000);
    const lc = connect(url, u.token);
    const live = subscribe(lc.client);
    await untilLive(app, [u]);
    const longId = await send(app, u.token, channelId, long);
    await live.until((e) => e.length >= 1, 10_000, 'the long message');
    await lc.client.dispose();
    const cursor = live.events[0].cursor as string;
    // ~12 MB of backlog after it: 3,000 events of the 4,000-character message (the log is the
    // truth; the rows are what 3,000 sends would have written).
    await app.deps.db.execute(sql`insert into events (type, guild_id, channel_id, payload)
      select 'MESSAGE_CREATED', m.guild_id, m.channel_id, jsonb_build_object('messageId', m.id::text)
      from messages m, generate_series(1, 3000) where m.id = ${decodeAnyId(longId).id}::uuid`);
    // Read by the tailer once this resolves (no pause needed: nothing else is waited for).
    await app.deps.realtime!.poke();

    // The reader is another process (here the server's own event loop would hold its reads
    // back): a client on a slow link, which reads nothing for 4 s, then everything.
    const r = await replayReader(url, u.token, cursor, 3000, 4000);
    assert.deepEqual(r, { got: 3000, closed: null }, 'the whole replay, socket open');
  });
});

describe('a slow consumer', () => {
  it('closed with 1013, gives back its socket slot at once, and is cut if its close frame has not got through in 10 s (ws would wait 30 s)', {
    timeout: 60_000,
  }, async () => {
    const u = await signUp(app);
    const { channelId } = await guildWithChannel(app, u.token);
    const base = app.deps.realtime!.subscriberCount;
    // Two sockets that read, and a third (another process) that stops reading once subscribed:
    // the user is at its limit of 3.
    const readers = Array.from({ length: 2 }, () => rawSocket(url));
    for (const s of readers) {
      await s.send({ type: 'connection_init', payload: { authorization: `Bearer ${u.token}` } });
      await s.until(() => s.messages.some((m) => m.type === 'connection_ack'), 'ack');
    }
    const stalled = stalledReader(url, u.token);
    try {
      assert.equal(await subscribers(app, base + 1), base + 1, 'the stalled reader subscribed');
      // Live: the rows below are its to choke on.
      await untilLive(app, [u]);
      const before = (await metricsOf(url))('banter_ws_closes_total{code="1013"}');
      // ~20 MB for it, live: more than the kernel's buffers and the 4 MiB bound hold.
      const id = await send(app, u.token, channelId, 'x'.repeat(4000));
      await app.deps.db.execute(sql`insert into events (type, guild_id, channel_id, payload)
        select 'MESSAGE_CREATED', m.guild_id, m.channel_id, jsonb_build_object('messageId', m.id::text)
        from messages m, generate_series(1, 5000) where m.id = ${decodeAnyId(id).id}::uuid`);
      await app.deps.realtime!.poke();
      // Its close frame waits behind megabytes it will not read; the server is done with it anyway.
      assert.equal(await subscribers(app, base, 20_000), base, 'its subscription stopped');
      const fresh = rawSocket(url);
      await fresh.send({ type: 'connection_init', payload: { authorization: `Bearer ${u.token}` } });
      await fresh.until(
        () => fresh.messages.some((m) => m.type === 'connection_ack'),
        'a new socket in its slot',
        2000,
      );
      fresh.ws.close();
      assert.equal(
        (await metricsOf(url))('banter_ws_closes_total{code="1013"}'),
        before + 1,
        'closed as a slow consumer',
      );
      // What it did not read is let go within the grace (10 s), not ws's 30 s: the socket is cut.
      const cut = Date.now() + 15_000;
      while ((await metricsOf(url))('banter_ws_open_sockets') > 2) {
        assert.ok(Date.now() < cut, 'the stalled socket is cut within 15 s');
        await sleep(250);
      }
    } finally {
      stalled.kill();
      for (const s of readers) s.ws.close();
    }
  });
});

describe('SSE and the session', () => {
  it('an SSE stream ends when its session logs out, as its socket would (4403); it went on receiving before', {
    timeout: 30_000,
  }, async () => {
    const owner = await signUp(app);
    const u = await signUp(app);
    const { guildId, channelId } = await guildWithChannel(app, owner.token);
    const i = await ok(
      app,
      `mutation($g: ID!) { createInvite(input: { guildId: $g }) { code } }`,
      { g: guildId },
      owner.token,
    );
    await ok(
      app,
      `mutation($c: String!) { joinGuild(code: $c) { id } }`,
      { c: i.createInvite.code },
      u.token,
    );
    const s = sse(httpUrl, u.token);
    await untilLive(app, [u]);
    await send(app, owner.token, channelId, 'before logout');
    await s.until((x) => contents(x.events).includes('before logout'), 'before logout');
    assert.equal((await ok(app, 'mutation { logout }', {}, u.token)).logout, true);
    await sleep(1500);
    await send(app, owner.token, channelId, 'after logout');
    await sleep(1000);
    const got = contents(s.events);
    s.stop();
    assert.deepEqual(got, ['before logout'], 'the logged-out session got nothing more');
    assert.equal(s.ended, true, 'the stream of the ended session is over');
    assert.equal(s.items.at(-1)?.errors?.[0]?.extensions?.code, 'UNAUTHENTICATED', 'its last item says why');
  });
});

describe('SSE and a session ended without the bus', () => {
  it('an SSE stream whose session was revoked where no signal reached this instance ends within the periodic check (10 s), as a socket does', {
    timeout: 30_000,
  }, async () => {
    const u = await signUp(app);
    const had = app.deps.realtime!.subscriberCount;
    const s = sse(httpUrl, u.token);
    await subscribers(app, had + 1);
    // Revoked straight in the database: no disconnect signal is sent, as when Redis was down.
    await app.deps.db.execute(
      sql`update sessions set revoked_at = now() where user_id = ${decodeAnyId(u.id).id}::uuid`,
    );
    const started = Date.now();
    await s.until((x) => x.ended, 'the end of the stream', 15_000);
    const took = Date.now() - started;
    s.stop();
    assert.ok(took <= 11_000, `ended after ${took} ms`);
    assert.equal(s.items.at(-1)?.errors?.[0]?.extensions?.code, 'UNAUTHENTICATED', 'its last item says why');
  });
});

describe('SSE and the access token', () => {
  let short: TestApp;
  let shortHttp: string;
  before(async () => {
    // Below the configurable minimum (30 s), for the test only.
    short = await createTestApp({ rateLimits: false, accessTokenTtl: 2 });
    shortHttp = `http://127.0.0.1:${await short.start(0)}/graphql`;
  });
  after(() => short.destroy());

  it('an SSE stream does not outlive its access token, as a socket does not (4401); it went on before', {
    timeout: 30_000,
  }, async () => {
    const u = await signUp(short);
    const { channelId } = await guildWithChannel(short, u.token);
    const s = sse(shortHttp, u.token);
    await untilLive(short, [u]);
    await send(short, u.token, channelId, 'before expiry');
    await s.until((x) => contents(x.events).includes('before expiry'), 'before expiry');
    await sleep(3500);
    const fresh = await ok(
      short,
      `mutation($t: String!) { refreshSession(refreshToken: $t) { accessToken } }`,
      {
        t: u.refreshToken,
      },
    );
    await send(short, fresh.refreshSession.accessToken, channelId, 'after expiry');
    await sleep(1000);
    const got = contents(s.events);
    s.stop();
    assert.deepEqual(got, ['before expiry'], 'nothing after the token expired');
    assert.equal(s.ended, true, 'the stream is over');
    assert.match(s.items.at(-1)?.errors?.[0]?.message ?? '', /Access token expired/);
  });
});

describe('SSE reconnects as an EventSource does', () => {
  it('each SSE event carries its cursor as its id, and a GET with Last-Event-ID resumes after it', {
    timeout: 30_000,
  }, async () => {
    const u = await signUp(app);
    const { channelId } = await guildWithChannel(app, u.token);
    const s = sse(httpUrl, u.token);
    await untilLive(app, [u]);
    for (const c of ['a', 'b']) await send(app, u.token, channelId, c);
    await s.until((x) => contents(x.events).includes('b'), 'b');
    s.stop();
    const created = s.items
      .map((item, i) => ({ e: item.data?.events, id: s.ids[i] }))
      .filter((x) => x.e?.__typename === 'MessageCreated');
    assert.deepEqual(
      created.map((x) => x.id),
      created.map((x) => x.e.cursor),
      'the id of each event is its cursor (an EventSource resends the last as Last-Event-ID)',
    );
    // The EventSource reconnects to the same URL (no `after`), with the last id it saw.
    await send(app, u.token, channelId, 'while away');
    const r = sse(httpUrl, u.token, null, { 'last-event-id': created[0].e.cursor });
    await r.until((x) => contents(x.events).includes('while away'), 'the replay after Last-Event-ID', 3000);
    r.stop();
    assert.deepEqual(contents(r.events), ['b', 'while away']);
  });
});

describe('an instance that stops', () => {
  it('closes its sockets with 1001 (going away: reconnect elsewhere and resume), not a bare TCP drop (1006)', {
    timeout: 30_000,
  }, async () => {
    const a = await createTestApp({ rateLimits: false });
    const aUrl = `ws://127.0.0.1:${await a.start(0)}/graphql`;
    try {
      const u = await signUp(a);
      const socks = Array.from({ length: 3 }, () => connect(aUrl, u.token));
      const streams = socks.map((c) => subscribe(c.client));
      await subscribers(a, 3);
      await a.stop();
      const deadline = Date.now() + 5000;
      while (socks.some((c) => !c.closed()) && Date.now() < deadline) await sleep(20);
      for (const s of streams) s.stop();
      assert.deepEqual(
        socks.map((c) => c.closed()?.code),
        [1001, 1001, 1001],
      );
      for (const c of socks) await c.client.dispose();
    } finally {
      await a.destroy();
    }
  });

  it('ends its SSE streams telling their clients to resume (an error item), not with a bare complete that says the stream is over', {
    timeout: 30_000,
  }, async () => {
    const a = await createTestApp({ rateLimits: false });
    const aHttp = `http://127.0.0.1:${await a.start(0)}/graphql`;
    try {
      const u = await signUp(a);
      const { channelId } = await guildWithChannel(a, u.token);
      const s = sse(aHttp, u.token);
      await untilLive(a, [u]);
      await send(a, u.token, channelId, 'before stop');
      await s.until((x) => contents(x.events).includes('before stop'), 'before stop');
      const started = Date.now();
      await a.stop();
      const took = Date.now() - started;
      await s.until((x) => x.ended, 'the end of the stream');
      const last = s.items.at(-1);
      if (process.env.DBG) console.log({ took, completed: s.completed, last: JSON.stringify(last) });
      assert.ok(
        !s.completed || last?.errors?.length,
        `the stream ended with a bare complete after ${JSON.stringify(last)}`,
      );
      assert.ok(took < 5000, `stop took ${took} ms`);
    } finally {
      await a.destroy();
    }
  });
});
