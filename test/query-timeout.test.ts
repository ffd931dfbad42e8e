/**
 * DATABASE_QUERY_TIMEOUT_MS is when a statement's connection is checked, not a bound on the
 * statement: statements that legitimately take longer must still work.
 * Postgres only. The bound here is 1 s.
 */
import assert from 'node:assert/strict';
import { after, before, it } from 'node:test';
import { sql } from 'drizzle-orm';
import { createTestApp, onPostgres, type TestApp } from './helpers.ts';

const skip = !onPostgres;
let app: TestApp;

before(async () => {
  if (skip) return;
  app = await createTestApp({ rateLimits: false, databaseQueryTimeoutMs: 1000 });
});
after(() => app?.destroy());

// A statement longer than the bound whose backend is at work goes on. Deleting a big guild was
// such a statement (its cascade: 400k messages took ~7 s here, ~2M at the default 30 s), cut at
// the bound every time it was tried, so the guild could never be deleted; its messages now go in
// batches first (big-deletes.test.ts), but any statement may be long.
it('a statement that takes longer than the query timeout, its backend at work, still completes', {
  skip,
  timeout: 120_000,
}, async () => {
  const t = Date.now();
  const r = await app.deps.db.execute(sql`select pg_sleep(2.5), 42 as answer`);
  const ms = Date.now() - t;
  assert.ok(ms >= 2400, `answered after ${ms} ms`);
  assert.equal((r as unknown as { rows: { answer: number }[] }).rows[0].answer, 42);
});

// The check's own connection can be refused while the statement's is fine: a role (or server) at
// its connection limit, as a pool sized to it is under load. A refusal says the server is there;
// cutting then killed a healthy statement (its backend went on, holding its slot, while the pool
// opened another connection to replace it).
it('a long statement goes on when the check cannot get a connection (the role at its limit)', {
  skip,
  timeout: 60_000,
}, async () => {
  const { createDatabase } = await import('../core/db/client.ts');
  const { createTestDatabase, PG_ADMIN_URL } = await import('./helpers.ts');
  const pg = (await import('pg')).default;
  const tdb = await createTestDatabase();
  const role = `banter_lim_${Math.random().toString(36).slice(2, 8)}`;
  const admin = new pg.Client({ connectionString: PG_ADMIN_URL });
  await admin.connect();
  await admin.query(`create role ${role} login connection limit 1`);
  const url = new URL(tdb.url);
  url.username = role;
  const database = await createDatabase({
    url: url.toString(),
    dataDir: '',
    poolSize: 1,
    queryTimeoutMs: 300,
  });
  try {
    const t = Date.now();
    await database.db.execute(sql`select pg_sleep(1.5)`);
    assert.ok(Date.now() - t >= 1400);
  } finally {
    await database.close();
    await tdb.drop();
    await admin.query(`drop role if exists ${role}`);
    await admin.end();
  }
});

// Many statements past the bound at once (a lock storm): their checks share one connection at a
// time. One each would open as many connections again as the pool holds, every period, crowding
// other instances' pools out of max_connections.
it('statements held past the bound by a lock are checked over one connection at a time, and go on', {
  skip,
  timeout: 60_000,
}, async () => {
  const { createDatabase } = await import('../core/db/client.ts');
  const { createTestDatabase } = await import('./helpers.ts');
  const pg = (await import('pg')).default;
  const tdb = await createTestDatabase();
  const database = await createDatabase({ url: tdb.url, dataDir: '', poolSize: 6, queryTimeoutMs: 200 });
  const holder = new pg.Client({ connectionString: tdb.url });
  await holder.connect();
  try {
    await database.db.execute(sql`create table storm (n int)`);
    await holder.query('begin');
    await holder.query('lock table storm in access exclusive mode');
    // (drizzle runs a query when it is awaited: then() starts them now)
    const waiting = Array.from({ length: 5 }, () =>
      database.db.execute(sql`select count(*) from storm`).then(() => {}),
    );
    // Held 1.5 s: 7 periods of 200 ms, for 5 statements (35 checks, one connection each, before).
    await new Promise((r) => setTimeout(r, 1500));
    await holder.query('commit');
    await Promise.all(waiting);
    const { checks } = database.poolStats();
    assert.ok(checks > 0, 'the statements were checked');
    assert.ok(checks <= 8, `${checks} check connections for 5 statements over 7 periods`);
  } finally {
    await holder.end();
    await database.close();
    await tdb.drop();
  }
});
