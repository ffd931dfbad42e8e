/**
 * sendMessage load benchmark (npm run bench:send). Starts a Banter server as a child process on a
 * fresh PostgreSQL database (RATE_LIMITS=off, LOG_LEVEL=warn), signs up users into one guild with
 * a few channels, then drives sendMessage over keep-alive HTTP at each concurrency for a fixed
 * time. Reports rows persisted per second, latency percentiles and the server's CPU per 1,000
 * messages. See bench/README.md for the knobs.
 */
import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { Agent, request } from 'node:http';
import { createServer } from 'node:net';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import pg from 'pg';

const env = process.env;
const ADMIN_URL = env.BENCH_PG_ADMIN_URL ?? 'postgres://postgres@127.0.0.1:5432/postgres';
const USERS = Number(env.BENCH_USERS ?? 64);
const CHANNELS = Number(env.BENCH_CHANNELS ?? 8);
const SECONDS = Number(env.BENCH_SECONDS ?? 10);
const WARMUP = Number(env.BENCH_WARMUP ?? 3);
const LEVELS = (env.BENCH_CONCURRENCY ?? '16,64').split(',').map(Number);
/** Set to a directory to write a V8 CPU profile of the server there. */
const CPU_PROF_DIR = env.BENCH_CPU_PROF;
const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const CLK_TCK = 100; // Linux USER_HZ; /proc/<pid>/stat counts in these ticks

async function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = createServer();
    s.once('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const { port } = s.address() as { port: number };
      s.close(() => resolve(port));
    });
  });
}

/** Server CPU seconds so far (user + system), from /proc. */
function cpuSeconds(pid: number): number {
  const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
  // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
  const f = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  return (Number(f[11]) + Number(f[12])) / CLK_TCK;
}

function percentile(sorted: number[], p: number): number {
  if (!sorted.length) return Number.NaN;
  return sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))];
}

let agent = new Agent({ keepAlive: true, maxSockets: 64 });

function post(port: number, body: string, token?: string): Promise<{ status: number; text: string }> {
  return new Promise((resolve, reject) => {
    const req = request(
      {
        host: '127.0.0.1',
        port,
        path: '/graphql',
        method: 'POST',
        agent,
        headers: {
          'content-type': 'application/json',
          'content-length': Buffer.byteLength(body),
          ...(token ? { authorization: `Bearer ${token}` } : {}),
        },
      },
      (res) => {
        const chunks: Buffer[] = [];
        res.on('data', (c: Buffer) => chunks.push(c));
        res.on('end', () => resolve({ status: res.statusCode ?? 0, text: Buffer.concat(chunks).toString() }));
        res.on('error', reject);
      },
    );
    req.on('error', reject);
    req.end(body);
  });
}

async function gql<T>(port: number, query: string, variables: object, token?: string): Promise<T> {
  const r = await post(port, JSON.stringify({ query, variables }), token);
  const body = JSON.parse(r.text) as { data: T; errors?: unknown[] };
  if (body.errors?.length) throw new Error(`${query.slice(0, 40)}: ${JSON.stringify(body.errors)}`);
  return body.data;
}

async function setup(port: number) {
  const tag = randomBytes(3).toString('hex');
  const reg = (i: number) =>
    gql<{ register: { accessToken: string } }>(
      port,
      'mutation($i: RegisterInput!) { register(input: $i) { accessToken } }',
      {
        i: {
          username: `bench${tag}_${i}`,
          email: `bench${tag}_${i}@example.test`,
          password: 'bench password 1',
        },
      },
    ).then((d) => d.register.accessToken);
  const tokens: string[] = [];
  for (let i = 0; i < USERS; i += 8) {
    tokens.push(...(await Promise.all(Array.from({ length: Math.min(8, USERS - i) }, (_, j) => reg(i + j)))));
  }
  const owner = tokens[0];
  const g = await gql<{ createGuild: { id: string; channels: { id: string }[] } }>(
    port,
    'mutation { createGuild(input: { name: "Bench" }) { id channels { id } } }',
    {},
    owner,
  );
  const channels = [g.createGuild.channels[0].id];
  for (let i = 1; i < CHANNELS; i++) {
    const c = await gql<{ createChannel: { id: string } }>(
      port,
      'mutation($g: ID!, $n: String!) { createChannel(input: { guildId: $g, name: $n, type: TEXT }) { id } }',
      { g: g.createGuild.id, n: `bench-${i}` },
      owner,
    );
    channels.push(c.createChannel.id);
  }
  const inv = await gql<{ createInvite: { code: string } }>(
    port,
    'mutation($g: ID!) { createInvite(input: { guildId: $g }) { code } }',
    { g: g.createGuild.id },
    owner,
  );
  await Promise.all(
    tokens
      .slice(1)
      .map((t) =>
        gql(port, 'mutation($c: String!) { joinGuild(code: $c) { id } }', { c: inv.createInvite.code }, t),
      ),
  );
  return { tokens, channels };
}

const SEND = 'mutation($i: SendMessageInput!) { sendMessage(input: $i) { id createdAt } }';

/** Keeps `inFlight` sendMessage requests going until `until`; returns per-request latencies (ms). */
async function drive(
  port: number,
  inFlight: number,
  until: number,
  users: { tokens: string[]; channels: string[] },
) {
  const latencies: number[] = [];
  let errors = 0;
  let firstError: string | undefined;
  let seq = 0;
  const worker = async (w: number) => {
    while (Date.now() < until) {
      const n = seq++;
      const token = users.tokens[(w + n) % users.tokens.length];
      const channelId = users.channels[n % users.channels.length];
      const body = JSON.stringify({
        query: SEND,
        variables: { i: { channelId, content: `bench message ${n} from worker ${w}: hello there` } },
      });
      const t0 = performance.now();
      const r = await post(port, body, token);
      latencies.push(performance.now() - t0);
      if (r.status !== 200 || r.text.includes('"errors"')) {
        errors++;
        firstError ??= r.text.slice(0, 300);
      }
    }
  };
  await Promise.all(Array.from({ length: inFlight }, (_, w) => worker(w)));
  return { latencies, errors, firstError };
}

async function countMessages(url: string): Promise<number> {
  const c = new pg.Client({ connectionString: url });
  await c.connect();
  try {
    const r = await c.query('select count(*)::int as n from messages');
    return r.rows[0].n as number;
  } finally {
    await c.end();
  }
}

async function main() {
  const dbName = `banter_bench_${Date.now().toString(36)}_${randomBytes(3).toString('hex')}`;
  const admin = new pg.Client({ connectionString: ADMIN_URL });
  await admin.connect();
  await admin.query(`create database ${dbName}`);
  await admin.end();
  const dbUrl = new URL(ADMIN_URL);
  dbUrl.pathname = `/${dbName}`;
  const port = await freePort();
  const nodeArgs = ['--import', 'tsx'];
  if (CPU_PROF_DIR) nodeArgs.push('--cpu-prof', `--cpu-prof-dir=${path.resolve(CPU_PROF_DIR)}`);
  const server = spawn(process.execPath, [...nodeArgs, 'api/main.ts'], {
    cwd: root,
    env: {
      ...env,
      NODE_ENV: 'production',
      JWT_SECRET: randomBytes(32).toString('hex'),
      DATABASE_URL: dbUrl.toString(),
      DATABASE_POOL_SIZE: env.BENCH_POOL_SIZE ?? '20',
      PORT: String(port),
      RATE_LIMITS: 'off',
      LOG_LEVEL: 'warn',
      DATA_DIR: path.join(root, 'data', 'bench'),
    },
    stdio: ['ignore', 'inherit', 'inherit'],
  });
  const exited = new Promise<number | null>((r) => server.once('exit', (code) => r(code)));
  const cleanup = async () => {
    if (server.exitCode === null) {
      server.kill('SIGTERM');
      await Promise.race([exited, new Promise((r) => setTimeout(r, 15_000))]);
    }
    agent.destroy();
    const c = new pg.Client({ connectionString: ADMIN_URL });
    await c.connect();
    await c.query(`drop database if exists ${dbName} with (force)`);
    await c.end();
  };
  try {
    for (let i = 0; ; i++) {
      if (server.exitCode !== null) throw new Error(`server exited with ${server.exitCode}`);
      const ok = await fetch(`http://127.0.0.1:${port}/readyz`).then(
        (r) => r.ok,
        () => false,
      );
      if (ok) break;
      if (i > 300) throw new Error('server did not become ready in 30 s');
      await new Promise((r) => setTimeout(r, 100));
    }
    const users = await setup(port);
    console.log(
      `banter bench:send — ${USERS} users, ${CHANNELS} channels in one guild, ${SECONDS} s per level after ${WARMUP} s warm-up, PostgreSQL, server pid ${server.pid}`,
    );
    console.log(
      'in flight | msg/s persisted | requests | errors | p50 ms | p90 ms | p99 ms | max ms | server CPU s / 1k msgs',
    );
    const rows: Record<string, number>[] = [];
    for (const inFlight of LEVELS) {
      agent.destroy();
      agent = new Agent({ keepAlive: true, maxSockets: inFlight });
      await drive(port, inFlight, Date.now() + WARMUP * 1000, users);
      const before = await countMessages(dbUrl.toString());
      const cpu0 = cpuSeconds(server.pid!);
      const t0 = performance.now();
      const r = await drive(port, inFlight, Date.now() + SECONDS * 1000, users);
      const elapsed = (performance.now() - t0) / 1000;
      const cpu = cpuSeconds(server.pid!) - cpu0;
      const persisted = (await countMessages(dbUrl.toString())) - before;
      const lat = r.latencies.sort((a, b) => a - b);
      const row = {
        inFlight,
        msgPerSec: persisted / elapsed,
        requests: lat.length,
        errors: r.errors,
        p50: percentile(lat, 50),
        p90: percentile(lat, 90),
        p99: percentile(lat, 99),
        max: lat[lat.length - 1],
        cpuPer1k: (cpu / Math.max(1, persisted)) * 1000,
      };
      rows.push(row);
      console.log(
        [
          String(inFlight).padStart(9),
          row.msgPerSec.toFixed(0).padStart(15),
          String(row.requests).padStart(8),
          String(row.errors).padStart(6),
          row.p50.toFixed(1).padStart(6),
          row.p90.toFixed(1).padStart(6),
          row.p99.toFixed(1).padStart(6),
          row.max.toFixed(1).padStart(6),
          row.cpuPer1k.toFixed(2).padStart(22),
        ].join(' | '),
      );
      if (r.firstError) console.log(`  first error: ${r.firstError}`);
    }
    if (env.BENCH_JSON) console.log(JSON.stringify(rows));
  } finally {
    await cleanup();
  }
  if (CPU_PROF_DIR) console.log(`server CPU profile written to ${path.resolve(CPU_PROF_DIR)}`);
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
