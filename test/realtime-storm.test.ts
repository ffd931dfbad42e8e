/**
 * The deploy storm: an instance with many subscribed clients stops, and they all come back at
 * once (here to the other instance, as behind a load balancer), each resuming from its last
 * cursor while messages go on. The clients are graphql-ws's own with its default retry settings,
 * all from one address (an office behind one NAT). Two instances share Postgres and Redis (and so
 * the per-IP connection count): Postgres only, as realtime-cluster.test.ts.
 */
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { after, before, it } from 'node:test';
import { createClient } from 'graphql-ws';
import WebSocket from 'ws';
import { type App, buildApp } from '../api/app.ts';
import { loadConfig } from '../api/config.ts';
import { comparePos, decodeCursor, type Position } from '../core/realtime/cursor.ts';
import { createTestDatabase, onPostgres, signUp, TEST_REDIS_URL, type TestUser } from './helpers.ts';
import { guildWithChannel, invite, send, sleep } from './realtime-helpers.ts';

const CLIENTS = 100;
const USERS = 10;
const QUERY = `subscription($after: String) { events(after: $after) { __typename cursor
  ... on MessageCreated { message { id } } } }`;

let db: Awaited<ReturnType<typeof createTestDatabase>>;
const dataDir = mkdtempSync(path.join(tmpdir(), 'banter-storm-'));
const apps: App[] = [];
const ports: number[] = [];

before(async () => {
  if (!onPostgres) return;
  db = await createTestDatabase();
  const secret = randomBytes(32).toString('hex');
  const prefix = `banter-storm:${randomBytes(4).toString('hex')}:`;
  for (let i = 0; i < 2; i++) {
    // The configuration an operator gets by default (rate limits on), as `npm start` reads it.
    const config = loadConfig(
      {
        NODE_ENV: 'test',
        LOG_LEVEL: process.env.TEST_LOG_LEVEL ?? 'silent',
        DATABASE_URL: db.url,
        REDIS_URL: TEST_REDIS_URL,
      },
      { dataDir, jwtSecret: secret, redisPrefix: prefix },
    );
    const app = await buildApp(config);
    if (i === 0) await app.deps.database.migrate();
    apps.push(app);
    ports.push(await app.start(0));
  }
});

after(async () => {
  for (const app of apps) await app.stop();
  await db?.drop();
  rmSync(dataDir, { recursive: true, force: true });
});

interface Client {
  ids: string[];
  dupes: number;
  disorder: number;
  connected: number;
  gaveUp?: string;
}

/**
 * A client as an app would write one: graphql-ws's defaults (5 retries with its backoff), an `after`
 * that follows what arrived (graphql-ws sends the same payload again when it reconnects), and a
 * url that moves to the next instance on each attempt, as a load balancer would.
 */
function openClient(token: string, urls: string[]): Client {
  const c: Client = { ids: [], dupes: 0, disorder: 0, connected: 0 };
  let attempt = 0;
  let last: Position | undefined;
  const client = createClient({
    url: () => urls[attempt++ % urls.length],
    webSocketImpl: WebSocket,
    connectionParams: { authorization: `Bearer ${token}` },
    on: { connected: () => c.connected++ },
  });
  const variables: { after: string | null } = { after: null };
  client.subscribe(
    { query: QUERY, variables },
    {
      next: (r: any) => {
        const ev = r.data?.events;
        if (!ev?.cursor) return;
        const pos = decodeCursor(ev.cursor);
        if (last && comparePos(pos, last) <= 0) c.disorder++;
        last = pos;
        variables.after = ev.cursor;
        const id = ev.message?.id;
        if (!id) return;
        if (c.ids.includes(id)) c.dupes++;
        else c.ids.push(id);
      },
      error: (e: any) => {
        c.gaveUp = String(e?.message ?? e?.code ?? JSON.stringify(e));
      },
      complete: () => {
        c.gaveUp ??= 'complete';
      },
    },
  );
  disposers.push(() => client.dispose());
  return c;
}
const disposers: (() => unknown)[] = [];

async function until(pred: () => boolean, ms: number, what: () => string) {
  const deadline = Date.now() + ms;
  while (!pred()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what()}`);
    await sleep(100);
  }
}

it(`${CLIENTS} clients behind one address come back after their instance stops, each with every message once and in order`, {
  skip: !onPostgres,
  timeout: 90_000,
}, async () => {
  const [a, b] = apps;
  try {
    const users: TestUser[] = [];
    for (let i = 0; i < USERS; i++) users.push(await signUp(a));
    const { guildId, channelId } = await guildWithChannel(a, users[0].token);
    for (const u of users.slice(1)) await invite(a, users[0].token, guildId, u.token);
    const urls = ports.map((p) => `ws://127.0.0.1:${p}/graphql`);
    const clients = Array.from({ length: CLIENTS }, (_, i) => openClient(users[i % USERS].token, urls));
    const summary = () => {
      const gaveUp = clients.filter((c) => c.gaveUp);
      return `${clients.filter((c) => c.connected).length} connected, ${gaveUp.length} gave up (${[...new Set(gaveUp.map((c) => c.gaveUp))].join('; ')})`;
    };
    await until(() => clients.every((c) => c.connected || c.gaveUp), 30_000, summary);
    assert.equal(clients.filter((c) => c.connected).length, CLIENTS, summary());
    // every subscription is live once a message sent now reaches all of them
    const sent = [await send(a, users[1].token, channelId, 'before')];
    await until(() => clients.every((c) => c.ids.length === 1 || c.gaveUp), 20_000, summary);

    // The deploy: A stops (its sockets closed with 1001), messages go on through B meanwhile.
    const stopping = a.stop();
    for (let i = 0; i < 5; i++) {
      sent.push(await send(b, users[i % USERS].token, channelId, `during ${i}`));
      await sleep(200);
    }
    await stopping;
    const back = () => clients.filter((c) => c.connected >= 2).length;
    await until(() => back() + clients.filter((c) => c.gaveUp).length >= CLIENTS, 45_000, summary);
    sent.push(await send(b, users[2].token, channelId, 'after'));
    await until(
      () => clients.every((c) => c.gaveUp || c.ids.length >= sent.length),
      20_000,
      () => `${summary()}; short: ${clients.filter((c) => c.ids.length < sent.length).length}`,
    );
    // A marker after it all: a repeat of any of them comes before it (each stream is in log order).
    sent.push(await send(b, users[3 % USERS].token, channelId, 'end'));
    await until(
      () => clients.every((c) => c.gaveUp || c.ids.includes(sent.at(-1)!)),
      20_000,
      () =>
        `${summary()}; without the marker: ${clients.filter((c) => !c.ids.includes(sent.at(-1)!)).length}`,
    );
    assert.equal(back(), CLIENTS, summary());
    for (const c of clients) {
      assert.deepEqual(c.ids, sent);
      assert.equal(c.dupes, 0);
      assert.equal(c.disorder, 0);
    }
  } finally {
    await Promise.all(disposers.map((d) => d()));
  }
});
