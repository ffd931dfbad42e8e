/**
 * sendMessage load benchmark (npm run bench:send). Starts a Banter server as a child process on a
 * fresh PostgreSQL database (RATE_LIMITS=off, LOG_LEVEL=warn), signs up users into one guild with
 * a few channels, then drives sendMessage over keep-alive HTTP at each concurrency for a fixed
 * time. Reports rows persisted per second, latency percentiles and the server's CPU per 1,000
 * messages. See bench/README.md for the knobs.
 */
import { readdirSync, readFileSync } from 'node:fs';
import { connect, type Socket } from 'node:net';
import path from 'node:path';
import pg from 'pg';
import { cpuSeconds, env, gql, signup, startBanter } from './common.ts';

const USERS = Number(env.BENCH_USERS ?? 64);
const CHANNELS = Number(env.BENCH_CHANNELS ?? 8);
const SECONDS = Number(env.BENCH_SECONDS ?? 10);
const WARMUP = Number(env.BENCH_WARMUP ?? 3);
const LEVELS = (env.BENCH_CONCURRENCY ?? '16,64').split(',').map(Number);
/** Set to a directory to write a V8 CPU profile of the server there (startBanter reads it). */
const CPU_PROF_DIR = env.BENCH_CPU_PROF;
const CLK_TCK = 100; // Linux USER_HZ; /proc/<pid>/stat counts in these ticks

/** CPU seconds of every process named `postgres` (the server and its backends), from /proc. */
function postgresCpuSeconds(): number {
  let ticks = 0;
  for (const d of readdirSync('/proc')) {
    if (!/^\d+$/.test(d)) continue;
    try {
      const stat = readFileSync(`/proc/${d}/stat`, 'utf8');
      if (stat.slice(stat.indexOf('(') + 1, stat.lastIndexOf(')')) !== 'postgres') continue;
      const f = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
      ticks += Number(f[11]) + Number(f[12]);
    } catch {
      // the process exited meanwhile
    }
  }
  return ticks / CLK_TCK;
}

function percentile(sorted: number[], p: number): number {
  if (!sorted.length) return Number.NaN;
  return sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))];
}

/**
 * One keep-alive HTTP/1.1 connection carrying one request at a time, for the measured sends. The
 * load generator shares the machine's cores with the server and Postgres: this costs a fraction
 * of http.request's CPU per request, so less of the machine goes to the generator. Same request
 * (method, path, headers, body) as common.ts's post(); the response must have a Content-Length.
 */
class Conn {
  private socket: Socket;
  private buf: Buffer = Buffer.alloc(0);
  private waiting: { resolve(r: { status: number; text: string }): void; reject(e: Error): void } | undefined;
  readonly ready: Promise<void>;

  constructor(private port: number) {
    this.socket = connect(port, '127.0.0.1');
    this.socket.setNoDelay(true);
    this.ready = new Promise((resolve, reject) => {
      this.socket.once('connect', resolve);
      this.socket.once('error', reject);
    });
    this.socket.on('data', (chunk: Buffer) => this.onData(chunk));
    const fail = (err?: Error) => {
      const w = this.waiting;
      this.waiting = undefined;
      w?.reject(err ?? new Error('connection closed'));
    };
    this.socket.on('error', fail);
    this.socket.on('close', () => fail());
  }

  post(body: string, token: string): Promise<{ status: number; text: string }> {
    return new Promise((resolve, reject) => {
      this.waiting = { resolve, reject };
      this.socket.write(
        `POST /graphql HTTP/1.1\r\nHost: 127.0.0.1:${this.port}\r\nContent-Type: application/json\r\n` +
          `Authorization: Bearer ${token}\r\nContent-Length: ${Buffer.byteLength(body)}\r\n` +
          `Connection: keep-alive\r\n\r\n${body}`,
      );
    });
  }

  private onData(chunk: Buffer) {
    this.buf = this.buf.length ? Buffer.concat([this.buf, chunk]) : chunk;
    const end = this.buf.indexOf('\r\n\r\n');
    if (end < 0) return;
    const head = this.buf.toString('latin1', 0, end);
    const len = /\r\ncontent-length:\s*(\d+)/i.exec(head);
    const w = this.waiting;
    if (!len) {
      this.waiting = undefined;
      w?.reject(new Error(`response without Content-Length: ${head}`));
      this.socket.destroy();
      return;
    }
    const total = end + 4 + Number(len[1]);
    if (this.buf.length < total) return;
    const text = this.buf.toString('utf8', end + 4, total);
    this.buf = this.buf.subarray(total);
    this.waiting = undefined;
    w?.resolve({ status: Number(head.slice(9, 12)), text });
  }

  close() {
    this.socket.destroy();
  }
}

async function setup(port: number) {
  const tokens = await signup(port, USERS, 'bench');
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
  conns: Conn[],
  inFlight: number,
  until: number,
  users: { tokens: string[]; channels: string[] },
) {
  const latencies: number[] = [];
  let errors = 0;
  let firstError: string | undefined;
  let seq = 0;
  const worker = async (w: number) => {
    const conn = conns[w];
    while (Date.now() < until) {
      const n = seq++;
      const token = users.tokens[(w + n) % users.tokens.length];
      const channelId = users.channels[n % users.channels.length];
      const body = JSON.stringify({
        query: SEND,
        variables: { i: { channelId, content: `bench message ${n} from worker ${w}: hello there` } },
      });
      const t0 = performance.now();
      const r = await conn.post(body, token);
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

/** Rows in messages, and transactions committed in the database so far (one per statement outside a transaction). */
async function countMessages(url: string): Promise<{ rows: number; commits: number }> {
  const c = new pg.Client({ connectionString: url });
  await c.connect();
  try {
    const r = await c.query(
      'select (select count(*)::int from messages) as n, xact_commit::float8 as x from pg_stat_database where datname = current_database()',
    );
    return { rows: r.rows[0].n as number, commits: r.rows[0].x as number };
  } finally {
    await c.end();
  }
}

async function main() {
  const server = await startBanter('banter_bench', {
    env: { DATABASE_POOL_SIZE: env.BENCH_POOL_SIZE ?? '20' },
  });
  const { port, dbUrl } = server;
  try {
    const users = await setup(port);
    console.log(
      `banter bench:send — ${USERS} users, ${CHANNELS} channels in one guild, ${SECONDS} s per level after ${WARMUP} s warm-up, PostgreSQL, server pid ${server.pid}`,
    );
    console.log(
      'in flight | msg/s persisted | requests | errors | p50 ms | p90 ms | p99 ms | max ms | server CPU s / 1k msgs | pg CPU s / 1k msgs | bench CPU s / 1k msgs | commits / msg',
    );
    const rows: Record<string, number>[] = [];
    for (const inFlight of LEVELS) {
      const conns = Array.from({ length: inFlight }, () => new Conn(port));
      await Promise.all(conns.map((c) => c.ready));
      await drive(conns, inFlight, Date.now() + WARMUP * 1000, users);
      const before = await countMessages(dbUrl);
      const cpu0 = cpuSeconds(server.pid);
      const pg0 = postgresCpuSeconds();
      const own0 = process.cpuUsage();
      const t0 = performance.now();
      const r = await drive(conns, inFlight, Date.now() + SECONDS * 1000, users);
      for (const c of conns) c.close();
      const elapsed = (performance.now() - t0) / 1000;
      const cpu = cpuSeconds(server.pid) - cpu0;
      const pgCpu = postgresCpuSeconds() - pg0;
      const own = process.cpuUsage(own0);
      const after = await countMessages(dbUrl);
      const persisted = after.rows - before.rows;
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
        pgCpuPer1k: (pgCpu / Math.max(1, persisted)) * 1000,
        clientCpuPer1k: ((own.user + own.system) / 1e6 / Math.max(1, persisted)) * 1000,
        // pg_stat_database counts are flushed lazily (up to a second late): a rough figure.
        commitsPerMsg: (after.commits - before.commits) / Math.max(1, persisted),
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
          row.pgCpuPer1k.toFixed(2).padStart(18),
          row.clientCpuPer1k.toFixed(2).padStart(21),
          row.commitsPerMsg.toFixed(2).padStart(13),
        ].join(' | '),
      );
      if (r.firstError) console.log(`  first error: ${r.firstError}`);
    }
    if (env.BENCH_JSON) console.log(JSON.stringify(rows));
  } finally {
    await server.stop();
  }
  if (CPU_PROF_DIR) console.log(`server CPU profile written to ${path.resolve(CPU_PROF_DIR)}`);
}

// (keep-alive connections of common.ts's agent would hold the process open)
main().then(
  () => process.exit(0),
  (err) => {
    console.error(err);
    process.exit(1);
  },
);
