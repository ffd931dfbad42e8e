/**
 * Two api processes sharing Postgres and a Redis of their own: subscribe on one, mutate on the
 * other, resume on either; Redis is killed and restarted mid-way and nothing is lost. Postgres
 * only (PGlite is one process by construction); the embedded run is realtime-resume.test.ts.
 */
import assert from 'node:assert/strict';
import { type ChildProcess, spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { after, before, it } from 'node:test';
import pg from 'pg';
import { createTestDatabase, onPostgres } from './helpers.ts';
import { connect, freePort, type Stream, subscribe } from './realtime-helpers.ts';
import { resumeUnderLoad } from './realtime-scenario.ts';

const root = path.resolve(import.meta.dirname, '..');

async function waitFor(fn: () => Promise<boolean>, ms: number, what: string) {
  const deadline = Date.now() + ms;
  while (Date.now() < deadline) {
    if (await fn().catch(() => false)) return;
    await new Promise((r) => setTimeout(r, 100));
  }
  throw new Error(`timed out waiting for ${what}`);
}

/**
 * Resolves once `s`, a stream on another process (its hub is out of reach), is live: it received
 * a marker message sent to `channelId` (through `port`) after it went live. A marker committed
 * before is rightly never delivered (a stream without a cursor starts from its snapshot), so one
 * is sent every second until one arrives, at most 30.
 */
async function untilLiveRemote(s: Stream, port: number, token: string, channelId: string) {
  const marker = (x: any) => String(x.message?.content ?? '').startsWith('live? ');
  for (let i = 0; i < 30; i++) {
    await http(
      port,
      `mutation($i: SendMessageInput!) { sendMessage(input: $i) { id } }`,
      { i: { channelId, content: `live? ${i}` } },
      token,
    );
    try {
      await s.until((e) => e.some(marker), 1000, 'a marker');
      return;
    } catch (err) {
      if (s.errors.length) throw err;
    }
  }
  throw new Error('the stream received no marker: not live');
}

let db: Awaited<ReturnType<typeof createTestDatabase>>;
let redis: ChildProcess | undefined;
let redisPort: number;
const apis: { proc: ChildProcess; port: number }[] = [];
const dataDir = mkdtempSync(path.join(tmpdir(), 'banter-cluster-'));
let env: NodeJS.ProcessEnv;

async function spawnApi() {
  const port = await freePort();
  const proc = spawn(process.execPath, ['--import', 'tsx', 'api/main.ts'], {
    cwd: root,
    env: { ...env, PORT: String(port) },
    stdio: ['ignore', 'ignore', 'inherit'],
  });
  return { proc, port };
}

function startRedis() {
  redis = spawn('redis-server', ['--port', String(redisPort), '--save', '', '--appendonly', 'no'], {
    stdio: 'ignore',
  });
}
async function redisUp() {
  await waitFor(
    () =>
      new Promise((resolve) => {
        const c = spawn('redis-cli', ['-p', String(redisPort), 'ping']);
        let out = '';
        c.stdout.on('data', (d) => {
          out += d;
        });
        c.on('close', () => resolve(out.includes('PONG')));
      }),
    10_000,
    'redis',
  );
}

async function http(port: number, query: string, variables: Record<string, unknown>, token?: string) {
  const res = await fetch(`http://127.0.0.1:${port}/graphql`, {
    method: 'POST',
    headers: { 'content-type': 'application/json', ...(token ? { authorization: `Bearer ${token}` } : {}) },
    body: JSON.stringify({ query, variables }),
  });
  const body = (await res.json()) as {
    data: any;
    errors?: { message: string; extensions?: { code?: string } }[];
  };
  if (body.errors?.length) throw new Error(`${body.errors[0].extensions?.code}: ${body.errors[0].message}`);
  return body.data;
}

before(async () => {
  if (!onPostgres) return;
  db = await createTestDatabase();
  redisPort = await freePort();
  startRedis();
  await redisUp();
  env = {
    ...process.env,
    NODE_ENV: 'test',
    LOG_LEVEL: process.env.TEST_LOG_LEVEL ?? 'silent',
    DATABASE_URL: db.url,
    REDIS_URL: `redis://127.0.0.1:${redisPort}`,
    REDIS_PREFIX: `banter-cluster:${randomBytes(3).toString('hex')}:`,
    JWT_SECRET: randomBytes(32).toString('hex'),
    RATE_LIMITS: 'off',
    DATA_DIR: dataDir,
  };
  for (let i = 0; i < 2; i++) apis.push(await spawnApi());
  for (const a of apis) {
    await waitFor(async () => (await fetch(`http://127.0.0.1:${a.port}/readyz`)).ok, 60_000, 'api ready');
  }
});

after(async () => {
  for (const a of apis) a.proc.kill('SIGTERM');
  await Promise.all(
    apis.map((a) => new Promise((r) => (a.proc.exitCode !== null ? r(null) : a.proc.once('exit', r)))),
  );
  redis?.kill('SIGKILL');
  await db?.drop();
  rmSync(dataDir, { recursive: true, force: true });
});

async function setup() {
  const [a, b] = apis;
  const reg = `mutation($i: RegisterInput!) { register(input: $i) { accessToken user { id } } }`;
  const name = `c${randomBytes(4).toString('hex')}`;
  const u = await http(a.port, reg, {
    i: { username: name, email: `${name}@example.test`, password: 'correct horse battery' },
  });
  const token = u.register.accessToken as string;
  const g = await http(
    b.port,
    `mutation { createGuild(input: { name: "C" }) { id channels { id } } }`,
    {},
    token,
  );
  return { token, guildId: g.createGuild.id as string, channelId: g.createGuild.channels[0].id as string };
}

it('subscribe on one instance, mutate on the other, resume on the other', {
  skip: !onPostgres,
  timeout: 60_000,
}, async () => {
  const [a, b] = apis;
  const { token, channelId } = await setup();
  const ca = connect(`ws://127.0.0.1:${a.port}/graphql`, token);
  const sa = subscribe(ca.client);
  await untilLiveRemote(sa, a.port, token, channelId);
  const send = (content: string, port: number) =>
    http(
      port,
      `mutation($i: SendMessageInput!) { sendMessage(input: $i) { id } }`,
      { i: { channelId, content } },
      token,
    );
  const t0 = Date.now();
  await send('from b', b.port);
  await sa.until((e) => e.some((x) => x.message?.content === 'from b'));
  const latency = Date.now() - t0;
  const cursor = sa.events.at(-1).cursor;
  sa.stop();
  await ca.client.dispose();
  await send('while away 1', a.port);
  await send('while away 2', b.port);
  const cb = connect(`ws://127.0.0.1:${b.port}/graphql`, token);
  const sb = subscribe(cb.client, cursor);
  // Anything more (a repeat) comes before a marker sent after it all, from the other instance.
  const end = (await send('end', a.port)).sendMessage.id;
  await sb.until((e) => e.some((x) => x.message?.id === end), 10_000, 'the marker');
  assert.deepEqual(
    sb.events.map((x) => x.message?.content),
    ['while away 1', 'while away 2', 'end'],
  );
  await cb.client.dispose();
  assert.ok(latency < 2000, `cross-instance delivery took ${latency} ms`);
});

it('resume under load across instances with a Redis restart in the middle', {
  skip: !onPostgres,
  timeout: 180_000,
}, async () => {
  const [a, b] = apis;
  const { token, channelId } = await setup();
  const pool = new pg.Pool({ connectionString: db.url });
  let turn = 0;
  try {
    await resumeUnderLoad(
      {
        mutate: (q, v, t) => http(apis[turn++ % 2].port, q, v, t),
        sql: async (text, params = []) => (await pool.query(text, params)).rows,
        wsUrls: [`ws://127.0.0.1:${a.port}/graphql`, `ws://127.0.0.1:${b.port}/graphql`],
        async midway() {
          redis?.kill('SIGKILL');
          await new Promise((r) => setTimeout(r, 1000));
          startRedis();
          await redisUp();
        },
      },
      { token, channelIds: [channelId], messages: 300, reconnects: 10 },
    );
  } finally {
    await pool.end();
  }
});

it('logout on one instance closes the session’s sockets on the other at once, and it cannot reconnect', {
  skip: !onPostgres,
  timeout: 30_000,
}, async () => {
  const [a, b] = apis;
  const { token, channelId } = await setup();
  const ca = connect(`ws://127.0.0.1:${a.port}/graphql`, token);
  const sa = subscribe(ca.client);
  // The socket is authenticated and its stream live on a before the logout.
  await untilLiveRemote(sa, a.port, token, channelId);
  assert.equal(ca.closed(), undefined);
  await http(b.port, 'mutation { logout }', {}, token);
  const t0 = Date.now();
  while (!ca.closed() && Date.now() - t0 < 5000) await new Promise((r) => setTimeout(r, 20));
  assert.equal(ca.closed()?.code, 4403);
  // The periodic re-check runs every 10 s: this fast, it was the bus signal.
  assert.ok(Date.now() - t0 < 1500, `closed after ${Date.now() - t0} ms`);
  await ca.client.dispose();
  // Instance a had the session cached as alive; the signal dropped that too.
  const again = connect(`ws://127.0.0.1:${a.port}/graphql`, token);
  subscribe(again.client);
  const t1 = Date.now();
  while (!again.closed() && Date.now() - t1 < 5000) await new Promise((r) => setTimeout(r, 20));
  assert.equal(again.closed()?.code, 4403);
  await again.client.dispose();
});

it('users of an instance killed outright (no socket closed, no OFFLINE told) are told OFFLINE once their entries run out, as queries show them (never told, before)', {
  skip: !onPostgres,
  timeout: 180_000,
}, async () => {
  const [a] = apis;
  const doomed = await spawnApi();
  try {
    await waitFor(
      async () => (await fetch(`http://127.0.0.1:${doomed.port}/readyz`)).ok,
      60_000,
      'api ready',
    );
    const { token, guildId } = await setup();
    const reg = `mutation($i: RegisterInput!) { register(input: $i) { accessToken user { id } } }`;
    const name = `k${randomBytes(4).toString('hex')}`;
    const other = await http(a.port, reg, {
      i: { username: name, email: `${name}@example.test`, password: 'correct horse battery' },
    });
    const code = await http(
      a.port,
      'mutation($g: ID!) { createInvite(input: { guildId: $g }) { code } }',
      { g: guildId },
      token,
    );
    await http(
      a.port,
      'mutation($c: String!) { joinGuild(code: $c) { id } }',
      { c: code.createInvite.code },
      other.register.accessToken,
    );
    const otherId = other.register.user.id as string;
    const watcher = connect(`ws://127.0.0.1:${a.port}/graphql`, token);
    const seen = subscribe(
      watcher.client,
      undefined,
      'subscription { events { __typename ... on PresenceChanged { user { id } status } } }',
    );
    const shown = () => seen.events.filter((e) => e.user?.id === otherId).map((e) => e.status);
    await new Promise((r) => setTimeout(r, 500));
    const gone = connect(`ws://127.0.0.1:${doomed.port}/graphql`, other.register.accessToken);
    subscribe(gone.client);
    await seen.until(() => shown().at(-1) === 'ONLINE', 10_000, 'ONLINE');
    doomed.proc.kill('SIGKILL');
    // Its entries live CONNECTION_TTL_MS (60 s) unless refreshed; the survivors look every 20 s.
    await seen.until(() => shown().at(-1) === 'OFFLINE', 120_000, 'OFFLINE');
    const q = await http(
      a.port,
      'query($id: ID!) { node(id: $id) { ... on User { presence { status } } } }',
      { id: otherId },
      token,
    );
    assert.equal(q.node.presence.status, 'OFFLINE');
    seen.stop();
    await watcher.client.dispose();
    await Promise.resolve(gone.client.dispose()).catch(() => {});
  } finally {
    doomed.proc.kill('SIGKILL');
  }
});
