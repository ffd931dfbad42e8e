/**
 * The api process as operators run it: `node --import tsx api/main.ts` with an environment.
 * Config errors, production defaults, migrations, concurrent starts and graceful shutdown.
 */
import assert from 'node:assert/strict';
import { type ChildProcess, spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdtempSync, rmSync } from 'node:fs';
import { connect as netConnect } from 'node:net';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { after, describe, it } from 'node:test';
import { fileURLToPath } from 'node:url';
import pg from 'pg';
import { createTestDatabase, onPostgres, TEST_REDIS_URL } from './helpers.ts';
import { connect, freePort, subscribe, tcpProxy } from './realtime-helpers.ts';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const SECRET = randomBytes(32).toString('hex');
const cleanups: (() => Promise<void> | void)[] = [];
after(async () => {
  for (const c of cleanups.reverse()) await c();
});

/** A place for the database: a fresh Postgres database on the postgres run, a PGlite dir otherwise. */
async function storage(): Promise<Record<string, string>> {
  const dataDir = mkdtempSync(path.join(tmpdir(), 'banter-proc-'));
  cleanups.push(() => rmSync(dataDir, { recursive: true, force: true }));
  if (!onPostgres) return { DATA_DIR: dataDir };
  const db = await createTestDatabase();
  cleanups.push(() => db.drop());
  return { DATA_DIR: dataDir, DATABASE_URL: db.url };
}

interface Proc {
  child: ChildProcess;
  output: () => string;
  exited: Promise<number | null>;
}

function run(script: string, env: Record<string, string>): Proc {
  const child = spawn(process.execPath, ['--import', 'tsx', script], {
    cwd: root,
    env: { PATH: process.env.PATH ?? '', LOG_LEVEL: 'warn', ...env },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let out = '';
  child.stdout!.on('data', (c) => {
    out += c;
  });
  child.stderr!.on('data', (c) => {
    out += c;
  });
  const exited = new Promise<number | null>((r) => child.once('exit', (code) => r(code)));
  cleanups.push(async () => {
    if (child.exitCode === null && child.signalCode === null) {
      child.kill('SIGKILL');
      await exited;
    }
  });
  return { child, output: () => out, exited };
}

async function startServer(env: Record<string, string>): Promise<Proc & { base: string }> {
  const port = await freePort();
  const p = run('api/main.ts', { JWT_SECRET: SECRET, PORT: String(port), ...env });
  const base = `http://127.0.0.1:${port}`;
  for (let i = 0; ; i++) {
    if (p.child.exitCode !== null) throw new Error(`server exited ${p.child.exitCode}: ${p.output()}`);
    const up = await fetch(`${base}/healthz`).then(
      (r) => r.ok,
      () => false,
    );
    if (up) break;
    if (i > 600) throw new Error(`server did not start: ${p.output()}`);
    await new Promise((r) => setTimeout(r, 100));
  }
  return { ...p, base };
}

async function gqlHttp(base: string, query: string, variables: object = {}, token?: string) {
  const res = await fetch(`${base}/graphql`, {
    method: 'POST',
    headers: { 'content-type': 'application/json', ...(token ? { authorization: `Bearer ${token}` } : {}) },
    body: JSON.stringify({ query, variables }),
  });
  return { status: res.status, body: (await res.json()) as { data?: any; errors?: any[] } };
}

describe('configuration', () => {
  it('a bad value stops the process with exit code 1 and one line naming the variable', async () => {
    for (const [name, value] of [
      ['PORT', 'eighty'],
      ['RATE_LIMITS', 'sometimes'],
      ['DATABASE_URL', 'mysql://x'],
    ]) {
      const p = run('api/main.ts', { JWT_SECRET: SECRET, [name]: value });
      assert.equal(await p.exited, 1, p.output());
      const lines = p.output().trim().split('\n');
      assert.equal(lines.length, 1, p.output());
      assert.match(lines[0], new RegExp(name));
    }
  });

  it('NODE_ENV=production without JWT_SECRET refuses to start', async () => {
    const p = run('api/main.ts', { NODE_ENV: 'production', ...(await storage()) });
    assert.equal(await p.exited, 1);
    assert.match(p.output().trim(), /^banter: configuration error: JWT_SECRET/);
    assert.equal(p.output().trim().split('\n').length, 1);
  });

  it('NODE_ENV=production turns GraphiQL off unless GRAPHIQL=true', async () => {
    const html = { accept: 'text/html' };
    const prod = await startServer({ NODE_ENV: 'production', ...(await storage()) });
    const r1 = await fetch(`${prod.base}/graphql`, { headers: html });
    assert.doesNotMatch(await r1.text(), /<html/i);
    prod.child.kill('SIGTERM');
    assert.equal(await prod.exited, 0);

    const withUi = await startServer({ NODE_ENV: 'production', GRAPHIQL: 'true', ...(await storage()) });
    const r2 = await fetch(`${withUi.base}/graphql`, { headers: html });
    assert.equal(r2.status, 200);
    const page = await r2.text();
    assert.match(page, /<html/i);
    // The assets are inlined: nothing loads from a CDN.
    assert.doesNotMatch(page, /<script[^>]+src="https?:/i);
    withUi.child.kill('SIGTERM');
    assert.equal(await withUi.exited, 0);
  });
});

describe('migrations', () => {
  it('api/migrate.ts applies migrations and is idempotent', async () => {
    const env = { JWT_SECRET: SECRET, ...(await storage()) };
    for (let i = 0; i < 2; i++) {
      const p = run('api/migrate.ts', env);
      assert.equal(await p.exited, 0, p.output());
      assert.match(p.output(), /migrations applied/);
    }
    // The server starts on the migrated database and answers.
    const s = await startServer(env);
    const r = await gqlHttp(s.base, '{ serverInfo { name } }');
    assert.equal(r.body.data.serverInfo.name, 'Banter');
    s.child.kill('SIGTERM');
    assert.equal(await s.exited, 0);
  });

  it('two processes started together on one fresh database both come up', { skip: !onPostgres }, async () => {
    const env = await storage();
    const [a, b] = await Promise.all([startServer(env), startServer(env)]);
    for (const s of [a, b]) {
      const r = await fetch(`${s.base}/readyz`);
      assert.equal(r.status, 200);
    }
    const name = `twin_${randomBytes(3).toString('hex')}`;
    const reg = await gqlHttp(
      a.base,
      'mutation($i: RegisterInput!) { register(input: $i) { accessToken } }',
      { i: { username: name, email: `${name}@example.test`, password: 'correct horse battery' } },
    );
    assert.equal(reg.body.errors, undefined);
    const v = await gqlHttp(
      b.base,
      '{ viewer { user { username } } }',
      {},
      reg.body.data.register.accessToken,
    );
    assert.equal(v.body.data.viewer.user.username, name);
    a.child.kill('SIGTERM');
    b.child.kill('SIGTERM');
    assert.deepEqual(await Promise.all([a.exited, b.exited]), [0, 0]);
  });
});

describe('graceful shutdown', () => {
  it('SIGTERM lets a blocked in-flight mutation finish, then exits 0', { skip: !onPostgres }, async () => {
    const env = await storage();
    // info: its 'shutting down' line says the signal was handled.
    const s = await startServer({ ...env, LOG_LEVEL: 'info' });
    const name = `sig_${randomBytes(3).toString('hex')}`;
    const reg = await gqlHttp(
      s.base,
      'mutation($i: RegisterInput!) { register(input: $i) { accessToken } }',
      { i: { username: name, email: `${name}@example.test`, password: 'correct horse battery' } },
    );
    const token = reg.body.data.register.accessToken as string;
    const guild = await gqlHttp(s.base, 'mutation { createGuild(input: { name: "G" }) { id } }', {}, token);
    assert.equal(guild.body.errors, undefined, JSON.stringify(guild.body.errors));

    // Hold a lock the mutation needs, so it is in flight when the signal arrives.
    const holder = new pg.Client({ connectionString: env.DATABASE_URL });
    await holder.connect();
    cleanups.push(() => holder.end().catch(() => {}));
    await holder.query('begin');
    await holder.query('lock table guilds in access exclusive mode');
    const pending = gqlHttp(
      s.base,
      'mutation { createGuild(input: { name: "Late" }) { id name } }',
      {},
      token,
    );
    for (let i = 0; ; i++) {
      // Inside a transaction, pg_stat_activity is read once and kept: look again each time.
      await holder.query('select pg_stat_clear_snapshot()');
      const w = await holder.query(
        `select count(*)::int as n from pg_stat_activity where wait_event_type = 'Lock' and datname = current_database()`,
      );
      if (w.rows[0].n > 0) break;
      if (i > 100) throw new Error('the mutation never blocked');
      await new Promise((r) => setTimeout(r, 50));
    }
    s.child.kill('SIGTERM');
    for (let i = 0; i < 250 && !s.output().includes('shutting down') && s.child.exitCode === null; i++)
      await new Promise((r) => setTimeout(r, 20));
    assert.match(s.output(), /shutting down/, 'the signal was handled');
    assert.equal(s.child.exitCode, null, 'still running while a request is in flight');
    await holder.query('commit');
    const res = await pending;
    assert.equal(res.status, 200);
    assert.equal(res.body.errors, undefined, JSON.stringify(res.body.errors));
    assert.equal(res.body.data.createGuild.name, 'Late');
    assert.equal(await s.exited, 0, s.output());
    const rows = await holder.query(`select count(*)::int as n from guilds where name = 'Late'`);
    assert.equal(rows.rows[0].n, 1);
  });
});

describe('presence across a restart', () => {
  it('a user who chose INVISIBLE is still shown OFFLINE after the server restarts (the choice is kept in the database, not only in the process)', {
    timeout: 90_000,
  }, async () => {
    const env = await storage();
    const user = async (base: string) => {
      const name = `p_${randomBytes(3).toString('hex')}`;
      const r = await gqlHttp(
        base,
        'mutation($i: RegisterInput!) { register(input: $i) { accessToken user { id } } }',
        { i: { username: name, email: `${name}@example.test`, password: 'correct horse battery' } },
      );
      return {
        token: r.body.data.register.accessToken as string,
        id: r.body.data.register.user.id as string,
      };
    };
    let s = await startServer(env);
    const [hidden, watcher] = [await user(s.base), await user(s.base)];
    const g = await gqlHttp(
      s.base,
      'mutation { createGuild(input: { name: "G" }) { id channels { id } } }',
      {},
      hidden.token,
    );
    const channelId = g.body.data.createGuild.channels[0].id as string;
    const inv = await gqlHttp(
      s.base,
      'mutation($g: ID!) { createInvite(input: { guildId: $g }) { code } }',
      { g: g.body.data.createGuild.id },
      hidden.token,
    );
    await gqlHttp(
      s.base,
      'mutation($c: String!) { joinGuild(code: $c) { id } }',
      { c: inv.body.data.createInvite.code },
      watcher.token,
    );
    const chosen = await gqlHttp(s.base, 'mutation { setPresence(status: INVISIBLE) }', {}, hidden.token);
    assert.equal(chosen.body.errors, undefined, JSON.stringify(chosen.body.errors));
    s.child.kill('SIGTERM');
    assert.equal(await s.exited, 0, s.output());

    s = await startServer(env);
    const c = connect(`${s.base.replace('http', 'ws')}/graphql`, hidden.token);
    const sub = subscribe(c.client, null);
    try {
      // Its socket is up (its own stream answers: its presence was registered before the ack),
      // then what the watcher is shown. A marker committed before the stream is live is rightly
      // never delivered: one a second until one arrives.
      for (let i = 0; i < 30 && !sub.events.length; i++) {
        await gqlHttp(
          s.base,
          'mutation($i: SendMessageInput!) { sendMessage(input: $i) { id } }',
          { i: { channelId, content: `live? ${i}` } },
          hidden.token,
        );
        await sub.until((e) => e.length > 0, 1000).catch(() => {});
      }
      assert.ok(sub.events.length, `its stream is not live: ${JSON.stringify(sub.errors)}`);
      // The hidden user's status as the holder of `token` is shown it.
      const shownTo = async (token: string) => {
        const query = 'query($id: ID!) { user(id: $id) { presence { status } } }';
        const r = await gqlHttp(s.base, query, { id: hidden.id }, token);
        return r.body.data.user.presence.status;
      };
      assert.equal(await shownTo(watcher.token), 'OFFLINE', 'invisible after the restart');
      assert.equal(await shownTo(hidden.token), 'OFFLINE', 'its own view says so too');
    } finally {
      sub.stop();
      await c.client.dispose();
      s.child.kill('SIGTERM');
      await s.exited;
    }
  });
});

describe('the per-IP socket rate', () => {
  // A socket over WS_CONNECTIONS_PER_IP_PER_MINUTE is upgraded and closed with 4029. It never
  // reached the protocol's connection handler, so it had no 'error' listener: a client that then
  // sent a bad frame (here unmasked, which RFC 6455 forbids from a client) made ws emit an error
  // nobody handled, and the process exited.
  it('a refused socket that sends a bad frame is dropped; the process stays up', {
    timeout: 60_000,
  }, async () => {
    const s = await startServer({ WS_CONNECTIONS_PER_IP_PER_MINUTE: '1', ...(await storage()) });
    try {
      const port = Number(new URL(s.base).port);
      const raw = () =>
        new Promise<string>((resolve) => {
          const sock = netConnect(port, '127.0.0.1');
          let got = '';
          let sent = false;
          const timer = setTimeout(() => {
            sock.destroy();
            resolve(got);
          }, 10_000);
          sock.on('connect', () =>
            sock.write(
              'GET /graphql HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n' +
                `Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: ${randomBytes(16).toString('base64')}\r\n` +
                'Sec-WebSocket-Protocol: graphql-transport-ws\r\n\r\n',
            ),
          );
          sock.on('data', (d) => {
            got += d.toString('latin1');
            // After the 101: a text frame "a" without a mask.
            if (!sent && got.includes('\r\n\r\n')) {
              sent = true;
              sock.write(Buffer.from([0x81, 0x01, 0x61]));
            }
          });
          sock.on('error', () => {});
          sock.on('close', () => {
            clearTimeout(timer);
            resolve(got);
          });
        });
      assert.match(await raw(), /^HTTP\/1\.1 101/, 'the first socket is let in');
      assert.match(await raw(), /^HTTP\/1\.1 101/, 'the second is upgraded, to be closed with 4029');
      // Bounded: the process would have exited within this while reading the frame.
      await new Promise((r) => setTimeout(r, 500));
      assert.equal(s.child.exitCode, null, s.output());
      const health = await fetch(`${s.base}/healthz`).then(
        (r) => r.status,
        (e) => String(e),
      );
      assert.equal(health, 200, s.output());
    } finally {
      s.child.kill('SIGTERM');
      await s.exited;
    }
  });
});

describe('an upgrade waiting on the connection rate', () => {
  // The rate is checked in Redis before the upgrade: meanwhile the socket, handed over by Node's
  // HTTP server, has no 'error' listener (the server removes its own at an upgrade, and ws adds
  // one only in handleUpgrade). A client that reset its connection then, Redis slow, ended the
  // process with an unhandled ECONNRESET.
  it('a client that resets its connection while the rate is checked does not end the process', {
    skip: !onPostgres,
    timeout: 60_000,
  }, async () => {
    const redis = await tcpProxy(TEST_REDIS_URL);
    const s = await startServer({
      REDIS_URL: redis.url,
      REDIS_PREFIX: `banter-test:${randomBytes(4).toString('hex')}:`,
      ...(await storage()),
    });
    try {
      const port = Number(new URL(s.base).port);
      redis.hold();
      await new Promise<void>((resolve) => {
        const sock = netConnect(port, '127.0.0.1', () => {
          sock.write(
            'GET /graphql HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n' +
              `Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: ${randomBytes(16).toString('base64')}\r\n` +
              'Sec-WebSocket-Protocol: graphql-transport-ws\r\n\r\n',
          );
          // The server is in the rate check by now (Redis held): the client goes, with a reset.
          setTimeout(() => {
            sock.resetAndDestroy();
            resolve();
          }, 100);
        });
        sock.on('error', () => {});
      });
      // Bounded: the reset is read at once, the rate check gives up on Redis within 500 ms.
      await new Promise((r) => setTimeout(r, 1000));
      redis.release();
      assert.equal(s.child.exitCode, null, s.output());
      const health = await fetch(`${s.base}/healthz`).then(
        (r) => r.status,
        (e) => String(e),
      );
      assert.equal(health, 200, s.output());
    } finally {
      redis.release();
      s.child.kill('SIGTERM');
      await s.exited;
      redis.close();
    }
  });
});
