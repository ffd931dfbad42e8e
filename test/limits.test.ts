/** Rate limits (schema/limits.ts): per IP, per user, per key; Retry-After; off switch; shared in Redis. */
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { connect as netConnect } from 'node:net';
import { after, before, describe, it } from 'node:test';
import { eq } from 'drizzle-orm';
import { type Client, createClient } from 'graphql-ws';
import WebSocket from 'ws';
import { users } from '../core/db/tables.ts';
import { RULES } from '../schema/limits.ts';
import { createTestApp, gql, onPostgres, signUp, type TestApp } from './helpers.ts';
import { metricsOf } from './realtime-helpers.ts';

const REGISTER = `mutation($i: RegisterInput!) { register(input: $i) { accessToken } }`;
const LOGIN = `mutation($i: LoginInput!) { login(input: $i) { accessToken } }`;
const CREATE_CHANNEL = `mutation($g: ID!) { createChannel(input: { guildId: $g, name: "x", type: TEXT }) { id } }`;

const register = (app: TestApp, ip: string, name = `rl_${randomBytes(4).toString('hex')}`) =>
  gql(
    app,
    REGISTER,
    { i: { username: name, email: `${name}@example.test`, password: 'correct horse battery' } },
    { ip },
  );

function assertLimited(r: { errors?: { extensions?: Record<string, any> }[] }) {
  const e = r.errors?.[0];
  assert.equal(e?.extensions?.code, 'RATE_LIMITED', JSON.stringify(r.errors));
  assert.equal(typeof e.extensions.retryAfter, 'number');
  assert.ok(e.extensions.retryAfter >= 1);
}

let app: TestApp;
before(async () => {
  app = await createTestApp();
});
after(() => app.destroy());

describe('rate limits', () => {
  it('register is limited per IP, and a refused register writes nothing', async () => {
    const ip = `reg-${randomBytes(3).toString('hex')}`;
    for (let i = 0; i < RULES.register.perIp.limit; i++) {
      const r = await register(app, ip);
      assert.equal(r.errors, undefined, JSON.stringify(r.errors));
    }
    const name = `rl_refused_${randomBytes(3).toString('hex')}`;
    const r = await register(app, ip, name);
    assertLimited(r);
    assert.equal(r.headers.get('retry-after'), String(r.errors![0].extensions!.retryAfter));
    const rows = await app.deps.db.select().from(users).where(eq(users.username, name));
    assert.equal(rows.length, 0);
    // Another address is not affected.
    assert.equal((await register(app, `${ip}-other`)).errors, undefined);
  });

  it('login is limited per key (across addresses) and per IP', async () => {
    const u = await signUp(app);
    const wrong = { login: u.username, password: 'not the password' };
    for (let i = 0; i < RULES.login.perKey.limit; i++) {
      const r = await gql(app, LOGIN, { i: wrong }, { ip: `login-${i}` });
      assert.equal(r.errors?.[0].extensions?.code, 'UNAUTHENTICATED', JSON.stringify(r.errors));
    }
    // Even the right password is refused now: the key is the account, whoever asks.
    const right = { login: u.username.toUpperCase(), password: 'correct horse battery' };
    assertLimited(await gql(app, LOGIN, { i: right }, { ip: 'login-fresh' }));

    const ip = `login-ip-${randomBytes(3).toString('hex')}`;
    for (let i = 0; i < RULES.login.perIp.limit; i++) {
      const r = await gql(app, LOGIN, { i: { login: `nobody${i}`, password: 'x' } }, { ip });
      assert.equal(r.errors?.[0].extensions?.code, 'UNAUTHENTICATED');
    }
    assertLimited(await gql(app, LOGIN, { i: { login: 'nobody-else', password: 'x' } }, { ip }));
  });

  it('mutations are limited per user and per IP', async () => {
    const u = await signUp(app);
    const g = { g: 'bm9wZQ' };
    // The limit is taken before the (failing) work, so cheap calls exhaust it.
    for (let i = 0; i < RULES.mutation.perUser.limit; i++) {
      const r = await gql(app, CREATE_CHANNEL, g, { token: u.token });
      assert.equal(r.errors?.[0].extensions?.code, 'BAD_USER_INPUT', JSON.stringify(r.errors));
    }
    assertLimited(await gql(app, CREATE_CHANNEL, g, { token: u.token }));

    const ip = `mut-ip-${randomBytes(3).toString('hex')}`;
    const perUser = RULES.mutation.perUser.limit;
    const crowd = await Promise.all(
      Array.from({ length: Math.ceil(RULES.mutation.perIp.limit / perUser) + 1 }, () => signUp(app)),
    );
    let sent = 0;
    for (const c of crowd) {
      const batch = Math.min(perUser, RULES.mutation.perIp.limit - sent);
      if (batch <= 0) break;
      await Promise.all(
        Array.from({ length: batch }, async () => {
          const r = await gql(app, CREATE_CHANNEL, g, { token: c.token, ip });
          assert.equal(r.errors?.[0].extensions?.code, 'BAD_USER_INPUT');
        }),
      );
      sent += batch;
    }
    const fresh = crowd[crowd.length - 1];
    assertLimited(await gql(app, CREATE_CHANNEL, g, { token: fresh.token, ip }));
    // The same user from elsewhere is fine.
    const r = await gql(app, CREATE_CHANNEL, g, { token: fresh.token });
    assert.equal(r.errors?.[0].extensions?.code, 'BAD_USER_INPUT');
  });

  it('search and searchUsers share the search rule per user; another user is not affected', async () => {
    const u = await signUp(app);
    const SEARCH_USERS = `query($p: String!) { searchUsers(prefix: $p) { id } }`;
    const SEARCH = `query($t: String!) { search(input: { text: $t }) { edges { cursor } } }`;
    const half = RULES.search.perUser.limit / 2;
    for (let i = 0; i < RULES.search.perUser.limit; i++) {
      // Every call from its own address: the per-user count is the subject.
      const r =
        i < half
          ? await gql(app, SEARCH_USERS, { p: 'user' }, { token: u.token })
          : await gql(app, SEARCH, { t: 'hello' }, { token: u.token });
      assert.equal(r.errors, undefined, JSON.stringify(r.errors));
    }
    assertLimited(await gql(app, SEARCH_USERS, { p: 'user' }, { token: u.token }));
    assertLimited(await gql(app, SEARCH, { t: 'hello' }, { token: u.token }));
    const other = await signUp(app);
    assert.equal((await gql(app, SEARCH, { t: 'hello' }, { token: other.token })).errors, undefined);
  });

  it('search is limited per IP across users', async () => {
    const ip = `search-${randomBytes(3).toString('hex')}`;
    const users = await Promise.all(
      Array.from({ length: RULES.search.perIp.limit / RULES.search.perUser.limit }, () => signUp(app)),
    );
    const SEARCH_USERS = `query($p: String!) { searchUsers(prefix: $p) { id } }`;
    for (const u of users) {
      const rs = await Promise.all(
        Array.from({ length: RULES.search.perUser.limit }, () =>
          gql(app, SEARCH_USERS, { p: 'x' }, { token: u.token, ip }),
        ),
      );
      for (const r of rs) assert.equal(r.errors, undefined, JSON.stringify(r.errors));
    }
    const fresh = await signUp(app);
    assertLimited(await gql(app, SEARCH_USERS, { p: 'x' }, { token: fresh.token, ip }));
    assert.equal((await gql(app, SEARCH_USERS, { p: 'x' }, { token: fresh.token })).errors, undefined);
  });

  it('over real HTTP, RATE_LIMITED carries a Retry-After header', async () => {
    const base = `http://127.0.0.1:${await app.start(0)}`;
    const statuses: number[] = [];
    let last: Response | undefined;
    // All from 127.0.0.1: the real socket address is the key.
    for (let i = 0; i <= RULES.register.perIp.limit; i++) {
      const name = `http_${randomBytes(4).toString('hex')}`;
      last = await fetch(`${base}/graphql`, {
        method: 'POST',
        headers: { 'content-type': 'application/json' },
        body: JSON.stringify({
          query: REGISTER,
          variables: {
            i: { username: name, email: `${name}@example.test`, password: 'correct horse battery' },
          },
        }),
      });
      statuses.push(last.status);
      if (i < RULES.register.perIp.limit) await last.body?.cancel();
    }
    const body = (await last!.json()) as { errors: { extensions: Record<string, any> }[] };
    assertLimited(body);
    const header = last!.headers.get('retry-after');
    assert.ok(header && Number(header) >= 1, `Retry-After ${header}`);
    assert.equal(Number(header), body.errors[0].extensions.retryAfter);
  });
});

describe('RATE_LIMITS=off', () => {
  it('turns every limit off', async () => {
    const off = await createTestApp({}, { RATE_LIMITS: 'off' });
    try {
      assert.equal(off.config.rateLimits, false);
      for (let i = 0; i <= RULES.register.perIp.limit + 2; i++) {
        const r = await register(off, 'one-address');
        assert.equal(r.errors, undefined, JSON.stringify(r.errors));
      }
    } finally {
      await off.destroy();
    }
  });
});

describe('Redis-backed limits', { skip: !onPostgres && 'needs the postgres run (REDIS_URL)' }, () => {
  it('two app instances sharing a prefix share the count', async () => {
    const prefix = `banter-test-shared:${randomBytes(4).toString('hex')}:`;
    const a = await createTestApp({ redisPrefix: prefix });
    const b = await createTestApp({ redisPrefix: prefix });
    try {
      assert.ok(a.config.redisUrl);
      const ip = 'shared-address';
      const n = RULES.register.perIp.limit;
      for (let i = 0; i < n; i++) {
        const r = await register(i % 2 ? a : b, ip);
        assert.equal(r.errors, undefined, JSON.stringify(r.errors));
      }
      assertLimited(await register(a, ip));
      assertLimited(await register(b, ip));
      // A third instance with another prefix counts on its own.
      const c = await createTestApp();
      try {
        assert.equal((await register(c, ip)).errors, undefined);
      } finally {
        await c.destroy();
      }
    } finally {
      await a.destroy();
      await b.destroy();
    }
  });
});

describe('the per-IP connection rate in Redis', {
  skip: !onPostgres && 'needs the postgres run (REDIS_URL)',
}, () => {
  /** 101 for a socket let in (it answers a ping), else the close code it got. */
  const upgrade = (port: number) =>
    new Promise<number>((resolve, reject) => {
      const ws = new WebSocket(`ws://127.0.0.1:${port}/graphql`, 'graphql-transport-ws');
      ws.on('open', () => ws.send('{"type":"ping"}'));
      ws.on('message', () => {
        resolve(101);
        ws.terminate();
      });
      ws.on('close', (code) => resolve(code));
      ws.on('error', reject);
    });

  // The rate is one step on Redis's clock (a Lua script), counted once for every instance.
  it('two instances sharing a prefix share one rate', async () => {
    const prefix = `banter-test-shared:${randomBytes(4).toString('hex')}:`;
    const env = { WS_CONNECTIONS_PER_IP_PER_MINUTE: '3' };
    const a = await createTestApp({ redisPrefix: prefix }, env);
    const b = await createTestApp({ redisPrefix: prefix }, env);
    try {
      const [pa, pb] = [await a.start(0), await b.start(0)];
      const codes = [];
      for (const port of [pa, pb, pa, pb, pa]) codes.push(await upgrade(port));
      assert.deepEqual(codes, [101, 101, 101, 4029, 4029]);
    } finally {
      await a.destroy();
      await b.destroy();
    }
  });
});

describe('behind proxies (TRUST_PROXY_HOPS)', () => {
  const registerVia = (port: number, xff: string | undefined) => {
    const name = `px_${randomBytes(4).toString('hex')}`;
    return fetch(`http://127.0.0.1:${port}/graphql`, {
      method: 'POST',
      headers: { 'content-type': 'application/json', ...(xff ? { 'x-forwarded-for': xff } : {}) },
      body: JSON.stringify({
        query: REGISTER,
        variables: {
          i: { username: name, email: `${name}@example.test`, password: 'correct horse battery' },
        },
      }),
    }).then((r) => r.json() as Promise<{ errors?: { extensions?: Record<string, any> }[] }>);
  };
  /** 101 for a socket let in (it answers a ping), else the close code or HTTP status it got. */
  const upgrade = (port: number, xff: string) =>
    new Promise<number>((resolve, reject) => {
      const ws = new WebSocket(`ws://127.0.0.1:${port}/graphql`, 'graphql-transport-ws', {
        headers: { 'x-forwarded-for': xff },
      });
      ws.on('open', () => ws.send('{"type":"ping"}'));
      ws.on('message', () => {
        resolve(101);
        ws.terminate();
      });
      ws.on('close', (code) => resolve(code));
      ws.on('unexpected-response', (_req, res) => {
        res.resume();
        resolve(res.statusCode ?? 0);
        ws.terminate();
      });
      ws.on('error', reject);
    });

  it("with one proxy, limits count the address it saw (the header's last entry), not the proxy's nor a forged one", async () => {
    const app = await createTestApp({}, { TRUST_PROXY_HOPS: '1', WS_CONNECTIONS_PER_IP_PER_MINUTE: '2' });
    try {
      const port = await app.start(0);
      const n = RULES.register.perIp.limit;
      // The client forges entries on the left; the proxy appends the address it saw.
      for (let i = 0; i < n; i++) {
        const r = await registerVia(port, `10.9.9.${i}, 203.0.113.7`);
        assert.equal(r.errors, undefined, JSON.stringify(r.errors));
      }
      assertLimited(await registerVia(port, '203.0.113.7'));
      // Another client behind the same proxy (the same peer address) has its own count.
      assert.equal((await registerVia(port, '203.0.113.8')).errors, undefined);
      // The socket connection rate, per client too.
      assert.deepEqual(
        [
          await upgrade(port, '198.51.100.1'),
          await upgrade(port, '198.51.100.1'),
          await upgrade(port, '198.51.100.1'),
          await upgrade(port, '198.51.100.2'),
        ],
        [101, 101, 4029, 101],
      );
    } finally {
      await app.destroy();
    }
  });

  it('with none (the default), X-Forwarded-For is not believed', async () => {
    const app = await createTestApp({}, { WS_CONNECTIONS_PER_IP_PER_MINUTE: '2' });
    try {
      const port = await app.start(0);
      assert.deepEqual(
        [
          await upgrade(port, '198.51.100.1'),
          await upgrade(port, '198.51.100.2'),
          await upgrade(port, '198.51.100.3'),
        ],
        [101, 101, 4029],
      );
    } finally {
      await app.destroy();
    }
  });
});

describe('the socket connection rate, as graphql-ws clients meet it', () => {
  it("a socket over the per-IP rate is closed with 4029, which graphql-ws's client retries by default (an HTTP 429 it takes as final)", async () => {
    const app = await createTestApp({}, { WS_CONNECTIONS_PER_IP_PER_MINUTE: '1' });
    const clients: Client[] = [];
    try {
      const port = await app.start(0);
      const user = await signUp(app);
      const open = () => {
        const seen = {
          connecting: 0,
          connected: 0,
          closes: [] as number[],
          reasons: [] as string[],
          errors: [] as string[],
        };
        const client = createClient({
          url: `ws://127.0.0.1:${port}/graphql`,
          webSocketImpl: WebSocket,
          connectionParams: { authorization: `Bearer ${user.token}` },
          lazy: false,
          // Its default retryWait (1 s and up): only the wait is shortened, what it retries is its own.
          retryWait: () => new Promise((r) => setTimeout(r, 50)),
          on: {
            connecting: () => seen.connecting++,
            connected: () => seen.connected++,
            closed: (e) => {
              seen.closes.push((e as { code: number }).code);
              seen.reasons.push(String((e as { reason: string }).reason));
            },
          },
          onNonLazyError: (e) =>
            seen.errors.push(String((e as Error).message ?? (e as { code: number }).code)),
        });
        clients.push(client);
        return seen;
      };
      const waitFor = async (pred: () => boolean) => {
        const deadline = Date.now() + 10_000;
        while (!pred() && Date.now() < deadline) await new Promise((r) => setTimeout(r, 20));
      };
      const first = open();
      await waitFor(() => first.connected > 0);
      assert.equal(first.connected, 1);
      const second = open();
      await waitFor(() => second.connecting >= 3 || second.errors.length > 0);
      assert.deepEqual(second.errors, []);
      assert.equal(second.connected, 0);
      assert.ok(second.connecting >= 3, `tried ${second.connecting} times`);
      assert.equal(second.closes[0], 4029);
      assert.match(second.reasons[0], /Too many connections from this address: try again in \d+ s/);
    } finally {
      // dispose awaits a connection attempt under way, and throws its close: not this test's subject
      for (const c of clients) await Promise.resolve(c.dispose()).catch(() => {});
      await app.destroy();
    }
  });

  // The metric's label is the close code, as for every other close (4029 for a socket over the
  // per-user limit too); a refused socket was counted under 429, a code no socket is closed with,
  // left from when the upgrade was refused with an HTTP 429.
  // A restart's reconnect wave from one address (a NAT, a proxy not named in TRUST_PROXY_HOPS)
  // past the rate: with a fixed minute, the address was refused everything until the minute
  // ended, and graphql-ws's client, after its default 5 retries (31 to 46 s of backoff, as it
  // ships), gave up for good (here, at 6 a minute, every socket refused up to 60 s). The rate
  // now refills evenly (one each 10 s here): it gets in on a retry, told the truth about the wait.
  it("a client refused by the per-IP rate gets in with graphql-ws's default retries (it gave up for good under a fixed minute)", {
    timeout: 90_000,
  }, async () => {
    const app = await createTestApp({}, { WS_CONNECTIONS_PER_IP_PER_MINUTE: '6' });
    const url = `ws://127.0.0.1:${await app.start(0)}/graphql`;
    const sockets: WebSocket[] = [];
    let client: Client | undefined;
    try {
      const user = await signUp(app);
      // The address's allowance spent: sockets until one is refused (the 7th). A refused socket is
      // upgraded too, then closed: an acknowledged connection_init tells one let in.
      for (let i = 0; i < 20; i++) {
        const ws = new WebSocket(url, 'graphql-transport-ws');
        ws.on('error', () => {});
        sockets.push(ws);
        const refused = await new Promise<boolean>((resolve) => {
          ws.once('open', () =>
            ws.send(
              JSON.stringify({ type: 'connection_init', payload: { authorization: `Bearer ${user.token}` } }),
            ),
          );
          ws.once('message', () => resolve(false));
          ws.once('close', (code) => resolve(code === 4029));
        });
        if (refused) break;
      }
      assert.equal(sockets.length, 7, 'six let in, the seventh refused');
      const seen = { connected: 0, closes: [] as number[], reasons: [] as string[], errors: [] as string[] };
      // As it ships: its default retryAttempts (5), retryWait and shouldRetry.
      client = createClient({
        url,
        webSocketImpl: WebSocket,
        connectionParams: { authorization: `Bearer ${user.token}` },
        lazy: false,
        on: {
          connected: () => seen.connected++,
          closed: (e) => {
            seen.closes.push((e as { code: number }).code);
            seen.reasons.push(String((e as { reason: string }).reason));
          },
        },
        onNonLazyError: (e) =>
          seen.errors.push(String((e as { code?: number }).code ?? (e as Error).message)),
      });
      const deadline = Date.now() + 75_000;
      while (!seen.connected && !seen.errors.length && Date.now() < deadline)
        await new Promise((r) => setTimeout(r, 50));
      assert.deepEqual(seen.errors, [], `gave up after ${seen.closes.length} closes: ${seen.reasons.at(-1)}`);
      assert.equal(seen.connected, 1);
      assert.equal(seen.closes[0], 4029);
      // The wait it is told is the rate's (10 s at 6 a minute), not what is left of a minute.
      const told = Number(/try again in (\d+) s/.exec(seen.reasons[0])?.[1]);
      assert.ok(told >= 1 && told <= 10, seen.reasons[0]);
    } finally {
      await Promise.resolve(client?.dispose()).catch(() => {});
      for (const ws of sockets) ws.terminate();
      await app.destroy();
    }
  });

  it('a socket refused by the per-IP rate is counted in banter_ws_closes_total under 4029, the code its client saw (under 429 before)', async () => {
    const app = await createTestApp({}, { WS_CONNECTIONS_PER_IP_PER_MINUTE: '1' });
    const url = `ws://127.0.0.1:${await app.start(0)}/graphql`;
    const sockets: WebSocket[] = [];
    const opened = () => {
      const ws = new WebSocket(url, 'graphql-transport-ws');
      ws.on('error', () => {});
      sockets.push(ws);
      return ws;
    };
    try {
      const first = opened();
      await new Promise((resolve) => first.once('open', resolve));
      // Refused sockets are upgraded too (then closed at once): their close is what tells.
      const second = opened();
      const code = await new Promise<number>((resolve) => second.once('close', resolve));
      assert.equal(code, 4029);
      const m = await metricsOf(url);
      assert.deepEqual(
        [m('banter_ws_closes_total{code="4029"}'), m('banter_ws_closes_total{code="429"}')],
        [1, 0],
      );
    } finally {
      for (const ws of sockets) ws.terminate();
      await app.destroy();
    }
  });

  // A refused socket is upgraded only to be told 4029, and lives until its client answers the
  // close (at most 2 s): it was counted in banter_ws_open_sockets meanwhile, so a flood of refused
  // upgrades read as that many open sockets.
  it('a refused socket waiting for its close is not counted as an open socket', async () => {
    const app = await createTestApp({}, { WS_CONNECTIONS_PER_IP_PER_MINUTE: '1' });
    const url = `ws://127.0.0.1:${await app.start(0)}/graphql`;
    const kept = new WebSocket(url, 'graphql-transport-ws');
    const raw = netConnect(Number(new URL(url).port), '127.0.0.1');
    raw.on('error', () => {});
    try {
      await new Promise<void>((resolve, reject) => {
        kept.once('open', () => resolve());
        kept.once('error', reject);
      });
      // Upgraded, then not a word back: its close frame (0x88) is left unanswered.
      let got = Buffer.alloc(0);
      await new Promise<void>((resolve, reject) => {
        const timer = setTimeout(
          () => reject(new Error(`no close frame: ${got.toString('latin1')}`)),
          10_000,
        );
        raw.on('data', (d) => {
          got = Buffer.concat([got, d]);
          const body = got.indexOf('\r\n\r\n');
          if (body > 0 && got[body + 4] === 0x88) {
            clearTimeout(timer);
            resolve();
          }
        });
        raw.write(
          'GET /graphql HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n' +
            `Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: ${randomBytes(16).toString('base64')}\r\n` +
            'Sec-WebSocket-Protocol: graphql-transport-ws\r\n\r\n',
        );
      });
      assert.match(got.toString('latin1'), /^HTTP\/1\.1 101/);
      assert.equal((await metricsOf(url))('banter_ws_open_sockets'), 1);
    } finally {
      kept.terminate();
      raw.destroy();
      await app.destroy();
    }
  });
});
