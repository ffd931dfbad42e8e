/**
 * What the benchmarks share: a Banter server on a fresh PostgreSQL database as a child process,
 * keep-alive HTTP/GraphQL helpers, bounded-concurrency signup, /proc readings and the header
 * that makes figures comparable (load average, fd limits, the commit measured).
 *
 * bench/send.ts still has its own copies of some of these (it was being edited when this file
 * was split out of bench/fanout.ts); it can import them from here.
 */
import { execFileSync, spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { openSync, readFileSync, rmSync } from 'node:fs';
import { Agent, request } from 'node:http';
import { createServer } from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import pg from 'pg';

export const env = process.env;
export const ADMIN_URL = env.BENCH_PG_ADMIN_URL ?? 'postgres://postgres@127.0.0.1:5432/postgres';
export const repoRoot = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
/** Where the server's code is run from: BENCH_SERVER_DIR (e.g. a worktree of one commit), else this checkout. */
export const serverDir = path.resolve(env.BENCH_SERVER_DIR ?? repoRoot);
/** Wall-clock milliseconds with sub-millisecond resolution, comparable across processes. */
export const now = () => performance.timeOrigin + performance.now();
export const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

export async function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = createServer();
    s.once('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const { port } = s.address() as { port: number };
      s.close(() => resolve(port));
    });
  });
}

/** A process's CPU seconds so far (user + system), from /proc (USER_HZ = 100). */
export function cpuSeconds(pid: number): number {
  const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
  const f = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  return (Number(f[11]) + Number(f[12])) / 100;
}

/**
 * CPU seconds the whole machine has been busy so far, all cores together (user, nice, system,
 * irq, softirq, steal from /proc/stat; USER_HZ = 100).
 */
export function machineBusySeconds(): number {
  const f = readFileSync('/proc/stat', 'utf8').split('\n', 1)[0].trim().split(/\s+/).slice(1).map(Number);
  return (f[0] + f[1] + f[2] + f[5] + f[6] + f[7]) / 100;
}

export function rssBytes(pid: number): number {
  const m = /VmRSS:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'));
  return m ? Number(m[1]) * 1024 : 0;
}

/** `soft/hard` open-file limits of this process (children inherit them). */
export function fdLimits(): string {
  const m = /Max open files\s+(\S+)\s+(\S+)/.exec(readFileSync('/proc/self/limits', 'utf8'));
  return m ? `${m[1]}/${m[2]}` : 'unknown';
}

/** The commit the server code comes from, marked when its api/, core/ or schema/ have uncommitted edits. */
export function serverRevision(): string {
  try {
    const git = (...args: string[]) =>
      execFileSync('git', ['-C', serverDir, ...args], {
        encoding: 'utf8',
        stdio: ['ignore', 'pipe', 'ignore'],
      }).trim();
    const head = git('rev-parse', '--short=10', 'HEAD');
    const dirty = git('status', '--porcelain', '--', 'api', 'core', 'schema', 'migrations');
    return dirty
      ? `${head} + uncommitted edits (${dirty.split('\n').length} files in api/ core/ schema/)`
      : head;
  } catch {
    // An export (git archive) of a commit: whoever made it writes the hash into .bench-rev.
    try {
      return `${readFileSync(path.join(serverDir, '.bench-rev'), 'utf8').trim()} (export)`;
    } catch {
      return 'unknown (not a git checkout, no .bench-rev)';
    }
  }
}

/** One line for the top of a benchmark's output. */
export function machineLine(): string {
  const la = os.loadavg().map((x) => x.toFixed(2));
  return (
    `load average ${la.join(', ')} (1/5/15 min) on ${os.cpus().length} cores; open files soft/hard ${fdLimits()}; ` +
    `node ${process.version}; server code ${serverRevision()}${serverDir === repoRoot ? '' : ` in ${serverDir}`}`
  );
}

const agent = new Agent({ keepAlive: true, maxSockets: 64 });

export function post(port: number, p: string, body: string, token?: string): Promise<string> {
  return new Promise((resolve, reject) => {
    const req = request(
      {
        host: '127.0.0.1',
        port,
        path: p,
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
        res.on('end', () => resolve(Buffer.concat(chunks).toString()));
        res.on('error', reject);
      },
    );
    req.on('error', reject);
    req.end(body);
  });
}

export function get(port: number, p: string): Promise<string> {
  return new Promise((resolve, reject) => {
    const req = request({ host: '127.0.0.1', port, path: p, agent }, (res) => {
      let s = '';
      res.on('data', (d) => {
        s += d;
      });
      res.on('end', () => resolve(s));
      res.on('error', reject);
    });
    req.on('error', reject);
    req.end();
  });
}

export async function gql<T = any>(
  port: number,
  query: string,
  variables: object,
  token?: string,
): Promise<T> {
  const body = JSON.parse(await post(port, '/graphql', JSON.stringify({ query, variables }), token));
  if (body.errors?.length) throw new Error(`${query.slice(0, 50)}: ${JSON.stringify(body.errors)}`);
  return body.data;
}

/** Runs fn(0..n-1) with at most `concurrency` in flight; results in index order. */
export async function pool<T>(n: number, concurrency: number, fn: (i: number) => Promise<T>): Promise<T[]> {
  const out = new Array<T>(n);
  let next = 0;
  await Promise.all(
    Array.from({ length: Math.min(n, concurrency) }, async () => {
      while (next < n) {
        const i = next++;
        out[i] = await fn(i);
      }
    }),
  );
  return out;
}

/**
 * Node flags that make a process, on SIGUSR2, run a full garbage collection and write its
 * process.memoryUsage() to memFile(pid): memory can then be read without the garbage of
 * whatever ran before (the server's own code is not touched for it).
 */
export const GC_ON_SIGNAL_ARGS = [
  '--expose-gc',
  '--import',
  'data:text/javascript,' +
    encodeURIComponent(
      "import{writeFileSync}from'node:fs';process.on('SIGUSR2',()=>{globalThis.gc();" +
        "writeFileSync((process.env.BENCH_MEM_DIR||'/tmp')+'/banter-bench-mem-'+process.pid+'.json'," +
        'JSON.stringify(process.memoryUsage()))})',
    ),
];

/**
 * After a full GC of a process started with GC_ON_SIGNAL_ARGS: its RSS, and its V8 heap used
 * plus external memory (Buffers, ArrayBuffers), in bytes.
 */
export async function memoryAfterGc(pid: number): Promise<{ rss: number; heap: number }> {
  const file = path.join(env.BENCH_MEM_DIR || '/tmp', `banter-bench-mem-${pid}.json`);
  rmSync(file, { force: true });
  process.kill(pid, 'SIGUSR2');
  for (let i = 0; i < 100; i++) {
    await sleep(100);
    try {
      const m = JSON.parse(readFileSync(file, 'utf8')) as NodeJS.MemoryUsage;
      rmSync(file, { force: true });
      await sleep(500); // let RSS settle after the collection
      return { rss: rssBytes(pid), heap: m.heapUsed + m.external };
    } catch {
      // not written yet
    }
  }
  return { rss: rssBytes(pid), heap: Number.NaN };
}

export interface BanterServer {
  port: number;
  pid: number;
  /** Its database. */
  dbUrl: string;
  /** Set once the process has exited. */
  exited: () => boolean;
  stop(): Promise<void>;
}

/**
 * Creates a database and starts `node --import tsx api/main.ts` from serverDir on it
 * (NODE_ENV=production, RATE_LIMITS=off, LOG_LEVEL=warn, no Redis); resolves once it answers.
 * `stop()` ends the server and drops the database. With `dbUrl`, it runs on that database instead
 * (a second instance beside another server), which `stop()` leaves alone.
 */
export async function startBanter(
  prefix: string,
  opts: { env?: Record<string, string>; gcOnSignal?: boolean; dbUrl?: string } = {},
): Promise<BanterServer> {
  // Another server's database (a second instance on it): neither created nor dropped here.
  const own = !opts.dbUrl;
  const dbUrl = new URL(opts.dbUrl ?? ADMIN_URL);
  const dbName = own
    ? `${prefix}_${Date.now().toString(36)}_${randomBytes(3).toString('hex')}`
    : `${dbUrl.pathname.slice(1)}_${randomBytes(3).toString('hex')}`;
  if (own) {
    const admin = new pg.Client({ connectionString: ADMIN_URL });
    await admin.connect();
    await admin.query(`create database ${dbName}`);
    await admin.end();
    dbUrl.pathname = `/${dbName}`;
  }
  const port = await freePort();
  const dataDir = path.join(os.tmpdir(), `banter-${dbName}`);
  const nodeArgs = ['--import', 'tsx', ...(opts.gcOnSignal ? GC_ON_SIGNAL_ARGS : [])];
  if (env.BENCH_CPU_PROF) nodeArgs.push('--cpu-prof', `--cpu-prof-dir=${path.resolve(env.BENCH_CPU_PROF)}`);
  if (env.BENCH_SERVER_NODE_ARGS) nodeArgs.push(...env.BENCH_SERVER_NODE_ARGS.split(' '));
  const server = spawn(process.execPath, [...nodeArgs, 'api/main.ts'], {
    cwd: serverDir,
    env: {
      ...env,
      PORT: String(port),
      DATABASE_URL: dbUrl.toString(),
      REDIS_URL: '',
      RATE_LIMITS: 'off',
      LOG_LEVEL: 'warn',
      NODE_ENV: 'production',
      JWT_SECRET: randomBytes(32).toString('hex'),
      DATA_DIR: dataDir,
      ...opts.env,
    },
    stdio: ['ignore', env.BENCH_SERVER_STDOUT ? openSync(env.BENCH_SERVER_STDOUT, 'a') : 'ignore', 'inherit'],
  });
  let exited = false;
  const exit = new Promise((r) => server.once('exit', r)).then(() => {
    exited = true;
  });
  // If this process dies, do not leave the server running.
  const killOnExit = () => server.kill('SIGKILL');
  process.once('exit', killOnExit);
  const stop = async () => {
    process.off('exit', killOnExit);
    if (!exited) {
      server.kill('SIGTERM');
      const forced = setTimeout(() => server.kill('SIGKILL'), 10_000);
      await exit;
      clearTimeout(forced);
    }
    rmSync(dataDir, { recursive: true, force: true });
    if (!own) return;
    const a = new pg.Client({ connectionString: ADMIN_URL });
    await a.connect();
    await a.query(`drop database if exists ${dbName} with (force)`);
    await a.end();
  };
  try {
    for (let i = 0; ; i++) {
      if (exited) throw new Error('banter exited during start');
      try {
        await post(port, '/graphql', JSON.stringify({ query: '{ serverInfo { name } }' }));
        break;
      } catch {
        if (i > 600) throw new Error('banter did not start in 60 s');
        await sleep(100);
      }
    }
  } catch (err) {
    await stop();
    throw err;
  }
  return { port, pid: server.pid!, dbUrl: dbUrl.toString(), exited: () => exited, stop };
}

/**
 * Registers n users (scrypt-bound on the server: `concurrency` in flight keeps its thread pool
 * busy without queueing for long); returns their access tokens.
 */
export async function signup(port: number, n: number, prefix: string, concurrency = 8): Promise<string[]> {
  const tag = randomBytes(3).toString('hex');
  return pool(n, concurrency, async (i) => {
    const d = await gql(port, 'mutation($i: RegisterInput!) { register(input: $i) { accessToken } }', {
      i: {
        username: `${prefix}${tag}_${i}`,
        email: `${prefix}${tag}_${i}@example.test`,
        password: 'bench password 1',
      },
    });
    return d.register.accessToken as string;
  });
}
