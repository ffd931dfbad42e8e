/**
 * Test harness: every test file builds its own app on real parts. BANTER_TEST_DB=postgres runs
 * on a fresh database on the local PostgreSQL server plus the local Redis (own key prefix);
 * otherwise on in-memory PGlite with the in-process ports. The same suite runs on both.
 */
import { createHash, randomBytes } from 'node:crypto';
import { mkdtempSync, readdirSync, readFileSync, renameSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import pg from 'pg';
import { type App, buildApp } from '../api/app.ts';
import { type Config, loadConfig } from '../api/config.ts';
import { createDatabase, migrationsFolder } from '../core/db/client.ts';
import { forgetAllCachedSessions } from '../core/services/auth.service.ts';

export const PG_ADMIN_URL = process.env.TEST_PG_ADMIN_URL ?? 'postgres://postgres@127.0.0.1:5432/postgres';
export const TEST_REDIS_URL = process.env.TEST_REDIS_URL ?? 'redis://127.0.0.1:6379';
export const onPostgres = process.env.BANTER_TEST_DB === 'postgres';

/** Creates a fresh database on the local server; returns its URL and a function that drops it. */
export async function createTestDatabase(): Promise<{ url: string; drop(): Promise<void> }> {
  const name = `banter_test_${Date.now().toString(36)}_${randomBytes(4).toString('hex')}`;
  const admin = new pg.Client({ connectionString: PG_ADMIN_URL });
  await admin.connect();
  await admin.query(`create database ${name}`);
  await admin.end();
  const url = new URL(PG_ADMIN_URL);
  url.pathname = `/${name}`;
  return {
    url: url.toString(),
    async drop() {
      const c = new pg.Client({ connectionString: PG_ADMIN_URL });
      await c.connect();
      await c.query(`drop database if exists ${name} with (force)`);
      await c.end();
    },
  };
}

let template: Promise<Blob> | undefined;
/**
 * The PGlite run's starting point: an embedded database with every migration applied, dumped once
 * and kept in the temp dir under a hash of the migrations and the PGlite version (starting PGlite
 * empty costs ~2 s of CPU in initdb, from the dump ~0.7 s; the suite starts ~80 of them). Each
 * test app still gets its own database, and createTestApp still runs migrate() on it.
 */
function pgliteTemplate(): Promise<Blob> {
  template ??= (async () => {
    const hash = createHash('sha256');
    const pkg = readFileSync(new URL('../node_modules/@electric-sql/pglite/package.json', import.meta.url));
    hash.update(JSON.parse(pkg.toString()).version);
    const walk = (dir: string) => {
      for (const e of readdirSync(dir, { withFileTypes: true }).sort((x, y) => (x.name < y.name ? -1 : 1))) {
        const p = path.join(dir, e.name);
        hash.update(p.slice(migrationsFolder.length));
        if (e.isDirectory()) walk(p);
        else hash.update(readFileSync(p));
      }
    };
    walk(migrationsFolder);
    const file = path.join(tmpdir(), `banter-test-pglite-${hash.digest('hex').slice(0, 16)}.tar`);
    try {
      return new Blob([readFileSync(file)]);
    } catch {
      const database = await createDatabase({ dataDir: 'memory://' });
      await database.migrate();
      const client = (database.db as unknown as { $client: { dumpDataDir(c: 'none'): Promise<Blob> } })
        .$client;
      const dump = await client.dumpDataDir('none');
      await database.close();
      // Written whole under another name first: other test files may be reading it at once.
      const part = `${file}.${process.pid}.part`;
      writeFileSync(part, Buffer.from(await dump.arrayBuffer()));
      renameSync(part, file);
      return dump;
    }
  })();
  return template;
}

export interface TestApp extends App {
  /** Drops the test database and temp dir after stopping. */
  destroy(): Promise<void>;
}

export async function createTestApp(
  overrides: Partial<Config> = {},
  env: Record<string, string> = {},
): Promise<TestApp> {
  const dataDir = mkdtempSync(path.join(tmpdir(), 'banter-test-'));
  const db = onPostgres ? await createTestDatabase() : undefined;
  const config = loadConfig(
    {
      NODE_ENV: 'test',
      LOG_LEVEL: process.env.TEST_LOG_LEVEL ?? 'silent',
      ...(db ? { DATABASE_URL: db.url, REDIS_URL: TEST_REDIS_URL } : {}),
      ...env,
    },
    {
      dataDir: onPostgres ? dataDir : 'memory://',
      jwtSecret: randomBytes(32).toString('hex'),
      redisPrefix: `banter-test:${randomBytes(4).toString('hex')}:`,
      // scrypt's N = 2^10 rather than 2^14 for the users the suite signs up (over 800 a run).
      passwordHashCost: 10,
      ...overrides,
    },
  );
  const app = await buildApp(config, onPostgres ? {} : { pgliteFrom: await pgliteTemplate() });
  await app.deps.database.migrate();
  return Object.assign(app, {
    async destroy() {
      await app.stop();
      await db?.drop();
      rmSync(dataDir, { recursive: true, force: true });
    },
  });
}

/**
 * Looks (every 50 ms, for at most `ms`) until `n` backends of this database wait on a lock, with
 * a query like `like` if given; returns how many did at the last look. `client` may be inside a
 * transaction: pg_stat_activity is then read once and kept unless cleared, which is done here.
 */
export async function lockWaiters(client: pg.Client, n: number, like = '%', ms = 10_000) {
  return await countUntil(
    client,
    n,
    ms,
    `select count(*)::int as n from pg_stat_activity
      where datname = current_database() and wait_event_type = 'Lock' and query like $1`,
    [like],
  );
}

/** As lockWaiters: until `n` backends wait on a lock `client` holds. */
export async function blockedBy(client: pg.Client, n: number, ms = 10_000) {
  return await countUntil(
    client,
    n,
    ms,
    'select count(*)::int as n from pg_stat_activity where pg_backend_pid() = any(pg_blocking_pids(pid))',
  );
}

/**
 * Cancels backend `pid`'s statement (as a statement_timeout or lock_timeout would) and looks
 * (every 20 ms, for at most `ms`) until that statement is over; whether it was. A cancel is
 * handled by the backend when it gets to it: a lock let go before then is taken, and the
 * statement goes on.
 */
export async function cancelStatement(client: pg.Client, pid: number, ms = 10_000) {
  const running = async () => {
    await client.query('select pg_stat_clear_snapshot()');
    const q = await client.query<{ started: string }>(
      `select query_start::text as started from pg_stat_activity where pid = $1 and state = 'active'`,
      [pid],
    );
    return q.rows[0]?.started;
  };
  const started = await running();
  await client.query('select pg_cancel_backend($1)', [pid]);
  const deadline = Date.now() + ms;
  for (let t = 0; t < 1000 && started !== undefined && Date.now() < deadline; t++) {
    if ((await running()) !== started) return true;
    await new Promise((r) => setTimeout(r, 20));
  }
  return started === undefined;
}

async function countUntil(client: pg.Client, n: number, ms: number, q: string, params: unknown[] = []) {
  const deadline = Date.now() + ms;
  let seen = 0;
  for (let t = 0; t < 1000; t++) {
    await client.query('select pg_stat_clear_snapshot()');
    seen = (await client.query<{ n: number }>(q, params)).rows[0].n;
    if (seen >= n || Date.now() > deadline) break;
    await new Promise((r) => setTimeout(r, 50));
  }
  return seen;
}

/**
 * The statements the app sends while `run` runs, for tests that prove there is no N+1. Every
 * session check is counted: the session cache (auth.service, 5 s) is emptied first, so the
 * request reads its session whether or not the test took longer than that since the session was
 * last read (a loaded machine does; then the count was one more, or one fewer, at random).
 */
export async function statementsOf<T>(app: App, run: () => Promise<T>): Promise<{ n: number; result: T }> {
  forgetAllCachedSessions();
  const before = app.deps.database.queryCount;
  const result = await run();
  return { n: app.deps.database.queryCount - before, result };
}

let ipCounter = 0;

export interface GqlResult<T = any> {
  status: number;
  data: T;
  errors?: { message: string; path?: (string | number)[]; extensions?: Record<string, any> }[];
  headers: Headers;
}

/** Runs one GraphQL operation in process. */
export async function gql<T = any>(
  app: App,
  query: string,
  variables: Record<string, unknown> = {},
  opts: { token?: string; ip?: string } = {},
): Promise<GqlResult<T>> {
  const res = await app.fetch(
    '/graphql',
    {
      method: 'POST',
      headers: {
        'content-type': 'application/json',
        accept: 'application/graphql-response+json',
        ...(opts.token ? { authorization: `Bearer ${opts.token}` } : {}),
      },
      body: JSON.stringify({ query, variables }),
    },
    // A fresh address per call unless given, so per-IP limits only bite tests that ask for them.
    { ip: opts.ip ?? `test-ip-${++ipCounter}` },
  );
  const body = (await res.json()) as { data: T; errors?: GqlResult['errors'] };
  return { status: res.status, data: body.data, errors: body.errors, headers: res.headers };
}

/** Like gql, but fails the test on any error. */
export async function ok<T = any>(
  app: App,
  query: string,
  variables: Record<string, unknown> = {},
  token?: string,
  ip?: string,
): Promise<T> {
  const r = await gql<T>(app, query, variables, { token, ip });
  if (r.errors?.length) throw new Error(`GraphQL errors: ${JSON.stringify(r.errors)}`);
  return r.data;
}

/** Asserts the operation failed with exactly this code; returns the error. */
export async function fails(
  app: App,
  code: string,
  query: string,
  variables: Record<string, unknown> = {},
  token?: string,
) {
  const r = await gql(app, query, variables, { token });
  const e = r.errors?.[0];
  if (!e || e.extensions?.code !== code) {
    throw new Error(`expected ${code}, got ${JSON.stringify(r.errors ?? r.data)}`);
  }
  return e;
}

export interface TestUser {
  id: string;
  username: string;
  token: string;
  refreshToken: string;
}

let userCounter = 0;
/** Registers a user (unique name unless given) and returns its tokens. */
export async function signUp(app: App, username?: string): Promise<TestUser> {
  const name = username ?? `user${++userCounter}_${randomBytes(3).toString('hex')}`;
  const d = await ok(
    app,
    `mutation($i: RegisterInput!) { register(input: $i) { accessToken refreshToken user { id username } } }`,
    { i: { username: name, email: `${name}@example.test`, password: 'correct horse battery' } },
    undefined,
    // Each test user signs up from its own address so register's per-IP limit is not the subject.
    `signup-${name}`,
  );
  return {
    id: d.register.user.id,
    username: d.register.user.username,
    token: d.register.accessToken,
    refreshToken: d.register.refreshToken,
  };
}
