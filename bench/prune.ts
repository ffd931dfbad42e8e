/**
 * The event log's prune on a server that was down past the retention (bench/README.md): a
 * fresh PostgreSQL database, a Banter server on it (child process) to set up users and a guild,
 * then BENCH_ROWS log rows dated 8 days ago (generate_series), then the server started again:
 * its hub prunes at start while this process keeps BENCH_CONCURRENCY sendMessage requests in
 * flight. Prints one JSON object: how long the prune ran (the first and last moment a backend of
 * the database was seen running its DELETE), the transactions committed meanwhile, the WAL it
 * wrote, the longest wait on a lock seen in the database, and sendMessage latency percentiles
 * during the prune and after it.
 *
 *   BENCH_ROWS=2000000 npm run bench:prune
 */
import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import os from 'node:os';
import path from 'node:path';
import pg from 'pg';
import { ADMIN_URL, env, gql, machineLine, post, serverDir, signup, sleep } from './common.ts';

const ROWS = Number(env.BENCH_ROWS ?? 1_000_000);
const CONCURRENCY = Number(env.BENCH_CONCURRENCY ?? 4);
const PORT = Number(env.BENCH_PORT ?? 4740);
const AFTER_SECONDS = Number(env.BENCH_AFTER_SECONDS ?? 5);
/** Longest the prune may run before the bench gives up. */
const LIMIT_MS = Number(env.BENCH_LIMIT_SECONDS ?? 900) * 1000;

const dbName = `banter_prune_${Date.now().toString(36)}_${randomBytes(3).toString('hex')}`;
const dbUrl = new URL(ADMIN_URL);
dbUrl.pathname = `/${dbName}`;
const dataDir = path.join(os.tmpdir(), `banter-${dbName}`);

function startServer() {
  const child = spawn(process.execPath, ['--import', 'tsx', 'api/main.ts'], {
    cwd: serverDir,
    env: {
      ...env,
      PORT: String(PORT),
      DATABASE_URL: dbUrl.toString(),
      REDIS_URL: '',
      RATE_LIMITS: 'off',
      LOG_LEVEL: 'warn',
      NODE_ENV: 'production',
      JWT_SECRET: 'x'.repeat(64),
      DATA_DIR: dataDir,
    },
    stdio: ['ignore', 'ignore', 'inherit'],
  });
  const exit = new Promise((r) => child.once('exit', r));
  process.once('exit', () => child.kill('SIGKILL'));
  return {
    child,
    async ready() {
      for (let i = 0; ; i++) {
        try {
          await post(PORT, '/graphql', JSON.stringify({ query: '{ serverInfo { name } }' }));
          return;
        } catch {
          if (i > 600) throw new Error('banter did not start in 60 s');
          await sleep(100);
        }
      }
    },
    async stop() {
      child.kill('SIGTERM');
      await exit;
    },
  };
}

const pct = (xs: number[], p: number) => {
  if (!xs.length) return null;
  const s = [...xs].sort((a, b) => a - b);
  return Math.round(s[Math.min(s.length - 1, Math.floor((p / 100) * s.length))] * 10) / 10;
};
const summary = (xs: number[]) => ({ n: xs.length, p50: pct(xs, 50), p99: pct(xs, 99), max: pct(xs, 100) });

async function main() {
  const admin = new pg.Client({ connectionString: ADMIN_URL });
  await admin.connect();
  await admin.query(`create database ${dbName}`);
  const db = new pg.Client({ connectionString: dbUrl.toString() });
  const out: Record<string, unknown> = { machine: machineLine(), rows: ROWS, concurrency: CONCURRENCY };
  try {
    let server = startServer();
    await server.ready();
    const tokens = await signup(PORT, CONCURRENCY, 'prune');
    const g = await gql(
      PORT,
      'mutation { createGuild(input: { name: "P" }) { id channels { id } } }',
      {},
      tokens[0],
    );
    const channelId = g.createGuild.channels[0].id as string;
    const inv = await gql(
      PORT,
      'mutation($g: ID!) { createInvite(input: { guildId: $g }) { code } }',
      { g: g.createGuild.id },
      tokens[0],
    );
    for (const t of tokens.slice(1))
      await gql(
        PORT,
        'mutation($c: String!) { joinGuild(code: $c) { id } }',
        { c: inv.createInvite.code },
        t,
      );
    await server.stop();

    await db.connect();
    const t0 = Date.now();
    await db.query(
      `insert into events (type, guild_id, channel_id, payload, created_at)
       select 'MESSAGE_CREATED', gen_random_uuid(), gen_random_uuid(),
         jsonb_build_object('id', gen_random_uuid()::text, 'content', repeat('x', 120)),
         now() - interval '8 days' - (i || ' ms')::interval from generate_series(1, $1::int) i`,
      [ROWS],
    );
    out.insertSeconds = (Date.now() - t0) / 1000;
    await db.query('vacuum analyze events');
    await db.query('checkpoint');
    const size = await db.query(`select pg_size_pretty(pg_total_relation_size('events')) as s`);
    out.tableSize = size.rows[0].s;

    // The server comes back: its hub prunes at start.
    const wal0 = (await db.query('select pg_current_wal_lsn() as l')).rows[0].l as string;
    const x0 = (
      await db.query(
        'select xact_commit::float8 as x from pg_stat_database where datname = current_database()',
      )
    ).rows[0].x as number;
    const started = Date.now();
    server = startServer();
    let pruneFrom = 0;
    let pruneTo = 0;
    let lockWaitMax = 0;
    let lockWaitSamples = 0;
    let stop = false;
    const sampler = (async () => {
      const c = new pg.Client({ connectionString: dbUrl.toString() });
      await c.connect();
      const waitSince = new Map<number, number>();
      while (!stop && Date.now() - started < LIMIT_MS) {
        const r = await c.query(
          `select pid, query, wait_event_type, state from pg_stat_activity where datname = current_database() and pid <> pg_backend_pid()`,
        );
        const now = Date.now();
        for (const a of r.rows) {
          if (a.state === 'active' && /delete from events/i.test(a.query)) {
            pruneFrom ||= now;
            pruneTo = now;
          }
          if (a.wait_event_type === 'Lock') {
            lockWaitSamples++;
            if (!waitSince.has(a.pid)) waitSince.set(a.pid, now);
            lockWaitMax = Math.max(lockWaitMax, now - waitSince.get(a.pid)!);
          } else waitSince.delete(a.pid);
        }
        await sleep(20);
      }
      await c.end();
    })();
    await server.ready();
    out.serverReadyMs = Date.now() - started;
    const lat: { at: number; ms: number }[] = [];
    let errors = 0;
    const remaining = async () =>
      (
        await db.query(
          `select exists (select 1 from events where created_at < now() - interval '7 days') as e`,
        )
      ).rows[0].e as boolean;
    let done = 0;
    const senders = tokens.map(async (token, w) => {
      for (let n = 0; Date.now() - started < LIMIT_MS; n++) {
        if (done && Date.now() - done > AFTER_SECONDS * 1000) return;
        const t = performance.now();
        const r = await post(
          PORT,
          '/graphql',
          JSON.stringify({
            query: 'mutation($i: SendMessageInput!) { sendMessage(input: $i) { id } }',
            variables: { i: { channelId, content: `m ${w} ${n}` } },
          }),
          token,
        );
        lat.push({ at: Date.now(), ms: performance.now() - t });
        if (r.includes('"errors"')) errors++;
      }
    });
    while (Date.now() - started < LIMIT_MS && (await remaining())) await sleep(200);
    done = Date.now();
    await Promise.all(senders);
    stop = true;
    await sampler;
    const wal1 = (await db.query('select pg_current_wal_lsn() as l')).rows[0].l as string;
    const walBytes = (await db.query('select pg_wal_lsn_diff($1, $2)::float8 as d', [wal1, wal0])).rows[0]
      .d as number;
    const x1 = (
      await db.query(
        'select xact_commit::float8 as x from pg_stat_database where datname = current_database()',
      )
    ).rows[0].x as number;
    const wm = await db.query(`select value from instance_settings where key = 'events.pruned_through'`);
    await server.stop();
    const during = lat.filter((l) => l.at >= pruneFrom && l.at <= pruneTo).map((l) => l.ms);
    const after = lat.filter((l) => l.at > done).map((l) => l.ms);
    Object.assign(out, {
      pruneSeconds: pruneFrom ? (pruneTo - pruneFrom) / 1000 : null,
      allExpiredGoneAfterSeconds: (done - started) / 1000,
      commitsDuringRun: x1 - x0,
      walMB: Math.round(walBytes / 1e5) / 10,
      lockWaitSamples,
      lockWaitMaxMs: lockWaitMax,
      sendDuringPrune: summary(during),
      sendAfterPrune: summary(after),
      sendErrors: errors,
      watermark: wm.rows[0]?.value ?? null,
    });
    console.log(JSON.stringify(out, null, 2));
  } finally {
    await db.end().catch(() => {});
    await admin.query(`drop database if exists ${dbName} with (force)`);
    await admin.end();
  }
}

await main();
process.exit(0);
