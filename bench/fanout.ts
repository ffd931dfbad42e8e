/**
 * Fan-out benchmark (issue 3): `node --import tsx bench/fanout.ts`. In one invocation it runs a
 * raw `ws` broadcast server (the practical limit) and Banter, each with BENCH_SOCKETS (1,000)
 * subscribed sockets held by separate client processes, and prints for both: deliveries/s
 * (saturated), p50/p99 publish-to-receive latency (saturated, and paced at 10 messages/s), server
 * CPU seconds, RSS per idle subscribed socket; then the ratios.
 *
 * Banter runs as `node --import tsx api/main.ts` on a fresh PostgreSQL database (BENCH_PG_ADMIN_URL,
 * default the local server) with RATE_LIMITS=off; subscribers are BENCH_USERS users (20 sockets
 * each at most, the per-user limit) in one guild, all on `events` with the same document.
 */
import { type ChildProcess, fork, spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { Agent, createServer as createHttpServer, request } from 'node:http';
import { createServer } from 'node:net';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import pg from 'pg';
import WebSocket, { WebSocketServer } from 'ws';

const env = process.env;
const SOCKETS = Number(env.BENCH_SOCKETS ?? 1000);
const USERS = Number(env.BENCH_USERS ?? 50);
const CLIENT_PROCS = Number(env.BENCH_CLIENT_PROCS ?? 2);
const SAT_SECONDS = Number(env.BENCH_SECONDS ?? 5);
const PACED_SECONDS = Number(env.BENCH_PACED_SECONDS ?? 5);
const PUBLISHERS = Number(env.BENCH_PUBLISHERS ?? 16);
const ADMIN_URL = env.BENCH_PG_ADMIN_URL ?? 'postgres://postgres@127.0.0.1:5432/postgres';
const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const self = fileURLToPath(import.meta.url);
const now = () => performance.timeOrigin + performance.now();
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

// ---------------------------------------------------------------- raw ws broadcast server
function rawServer() {
  const http = createHttpServer((req, res) => {
    const chunks: Buffer[] = [];
    req.on('data', (c: Buffer) => chunks.push(c));
    req.on('end', () => {
      const body = Buffer.concat(chunks);
      for (const c of wss.clients) c.send(body);
      res.writeHead(204).end();
    });
  });
  const wss = new WebSocketServer({ server: http });
  http.listen(0, '127.0.0.1', () => process.send!({ port: (http.address() as { port: number }).port }));
}

// ---------------------------------------------------------------- subscriber processes
function clients() {
  const sockets: WebSocket[] = [];
  let received = 0;
  let firstRecv = 0;
  let lastRecv = 0;
  let lat: number[] = [];
  const tsRe = /ts=(\d+(?:\.\d+)?)/;
  process.on('message', async (m: any) => {
    if (m.cmd === 'open') {
      let ready = 0;
      await new Promise<void>((resolve) => {
        for (let i = 0; i < m.n; i++) {
          const sample = i % 10 === 0;
          const ws = new WebSocket(m.url, m.kind === 'banter' ? 'graphql-transport-ws' : undefined);
          sockets.push(ws);
          const onData = (data: Buffer) => {
            const t = now();
            if (m.kind === 'banter') {
              const s = data.toString();
              if (s.startsWith('{"type":"connection_ack"')) {
                ws.send(JSON.stringify({ id: '1', type: 'subscribe', payload: { query: m.query } }));
                if (++ready === m.n) resolve();
                return;
              }
              if (!s.includes('"next"')) return;
              count(t, sample ? s : undefined);
            } else count(t, sample ? data.toString() : undefined);
          };
          ws.on('message', onData);
          ws.on('open', () => {
            if (m.kind === 'banter') {
              ws.send(
                JSON.stringify({
                  type: 'connection_init',
                  payload: { authorization: `Bearer ${m.tokens[i % m.tokens.length]}` },
                }),
              );
            } else if (++ready === m.n) resolve();
          });
          ws.on('close', (code) => {
            if (code !== 1000 && code !== 1005) process.send!({ closed: code });
          });
        }
      });
      await sleep(500);
      process.send!({ ready: sockets.length });
    } else if (m.cmd === 'reset') {
      received = 0;
      firstRecv = 0;
      lastRecv = 0;
      lat = [];
      process.send!({ reset: true });
    } else if (m.cmd === 'stats') {
      process.send!({ received, firstRecv, lastRecv, lat });
    } else if (m.cmd === 'close') {
      for (const s of sockets) s.terminate();
      process.exit(0);
    }
  });
  function count(t: number, sampled?: string) {
    received++;
    if (!firstRecv) firstRecv = t;
    lastRecv = t;
    if (sampled) {
      const x = tsRe.exec(sampled);
      if (x) lat.push(t - Number(x[1]));
    }
  }
}

// ---------------------------------------------------------------- driver helpers
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
function cpuSeconds(pid: number): number {
  const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
  const f = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  return (Number(f[11]) + Number(f[12])) / 100;
}
function rssBytes(pid: number): number {
  const m = /VmRSS:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'));
  return m ? Number(m[1]) * 1024 : 0;
}
const pct = (xs: number[], p: number) => {
  const s = [...xs].sort((a, b) => a - b);
  return s.length ? s[Math.min(s.length - 1, Math.floor((p / 100) * s.length))] : Number.NaN;
};
const agent = new Agent({ keepAlive: true, maxSockets: 64 });
function post(port: number, p: string, body: string, token?: string): Promise<string> {
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
      },
    );
    req.on('error', reject);
    req.end(body);
  });
}
async function gql<T = any>(port: number, query: string, variables: object, token?: string): Promise<T> {
  const body = JSON.parse(await post(port, '/graphql', JSON.stringify({ query, variables }), token));
  if (body.errors?.length) throw new Error(`${query.slice(0, 50)}: ${JSON.stringify(body.errors)}`);
  return body.data;
}

class Clients {
  procs: ChildProcess[] = [];
  closes: Record<number, number> = {};
  constructor(n: number) {
    for (let i = 0; i < n; i++) {
      const p = fork(self, ['clients'], { execArgv: ['--import', 'tsx'] });
      p.on('message', (m: any) => {
        if (m.closed) this.closes[m.closed] = (this.closes[m.closed] ?? 0) + 1;
      });
      this.procs.push(p);
    }
  }
  private ask(p: ChildProcess, msg: object, key: string): Promise<any> {
    return new Promise((resolve) => {
      const on = (m: any) => {
        if (key in m) {
          p.off('message', on);
          resolve(m);
        }
      };
      p.on('message', on);
      p.send(msg);
    });
  }
  async open(msg: object, total: number) {
    const per = Math.ceil(total / this.procs.length);
    await Promise.all(
      this.procs.map((p, i) =>
        this.ask(p, { cmd: 'open', n: Math.min(per, total - i * per), ...msg }, 'ready'),
      ),
    );
  }
  async reset() {
    await Promise.all(this.procs.map((p) => this.ask(p, { cmd: 'reset' }, 'reset')));
  }
  async stats() {
    const all = await Promise.all(this.procs.map((p) => this.ask(p, { cmd: 'stats' }, 'received')));
    return {
      received: all.reduce((a, s) => a + s.received, 0),
      firstRecv: Math.min(...all.map((s) => s.firstRecv || Number.POSITIVE_INFINITY)),
      lastRecv: Math.max(...all.map((s) => s.lastRecv)),
      lat: all.flatMap((s) => s.lat as number[]),
    };
  }
  close() {
    for (const p of this.procs) p.send({ cmd: 'close' });
  }
}

interface Result {
  deliveriesPerSec: number;
  satP50: number;
  satP99: number;
  pacedP50: number;
  pacedP99: number;
  cpuSeconds: number;
  rssPerSocketKB: number;
  published: number;
  delivered: number;
}

/** Drives a publisher saturated, then paced; returns the figures. */
async function measure(
  pid: number,
  c: Clients,
  publish: (ts: number) => Promise<void>,
): Promise<Omit<Result, 'rssPerSocketKB'>> {
  await c.reset();
  const cpu0 = cpuSeconds(pid);
  const t0 = now();
  const until = t0 + SAT_SECONDS * 1000;
  let published = 0;
  await Promise.all(
    Array.from({ length: PUBLISHERS }, async () => {
      while (now() < until) {
        await publish(now());
        published++;
      }
    }),
  );
  // Drain: until nothing new arrives for a second (or everything arrived).
  let last = -1;
  for (;;) {
    await sleep(1000);
    const s = await c.stats();
    if (s.received === last || s.received >= published * SOCKETS) break;
    last = s.received;
  }
  const sat = await c.stats();
  const cpu = cpuSeconds(pid) - cpu0;
  const deliveriesPerSec = sat.received / ((sat.lastRecv - t0) / 1000);
  await c.reset();
  for (let i = 0; i < PACED_SECONDS * 10; i++) {
    const t = now();
    await publish(t);
    await sleep(Math.max(0, 100 - (now() - t)));
  }
  await sleep(1500);
  const paced = await c.stats();
  return {
    deliveriesPerSec,
    satP50: pct(sat.lat, 50),
    satP99: pct(sat.lat, 99),
    pacedP50: pct(paced.lat, 50),
    pacedP99: pct(paced.lat, 99),
    cpuSeconds: cpu,
    published,
    delivered: sat.received,
  };
}

async function runRaw(): Promise<Result> {
  const server = fork(self, ['raw-server'], { execArgv: ['--import', 'tsx'] });
  const { port } = await new Promise<{ port: number }>((r) => server.once('message', r as never));
  await sleep(500);
  const rss0 = rssBytes(server.pid!);
  const c = new Clients(CLIENT_PROCS);
  await c.open({ url: `ws://127.0.0.1:${port}/`, kind: 'raw' }, SOCKETS);
  await sleep(1500);
  const rss1 = rssBytes(server.pid!);
  const body = (ts: number) =>
    JSON.stringify({ type: 'next', content: `bench ts=${ts.toFixed(3)} hello there` });
  const r = await measure(server.pid!, c, async (ts) => {
    await post(port, '/publish', body(ts));
  });
  c.close();
  server.kill();
  return { ...r, rssPerSocketKB: (rss1 - rss0) / SOCKETS / 1024 };
}

const QUERY =
  'subscription { events { cursor ... on MessageCreated { message { id content createdAt author { id username } } } } }';

async function runBanter(): Promise<Result & { closes: Record<number, number>; shared: string }> {
  const dbName = `banter_fanout_${Date.now().toString(36)}_${randomBytes(3).toString('hex')}`;
  const admin = new pg.Client({ connectionString: ADMIN_URL });
  await admin.connect();
  await admin.query(`create database ${dbName}`);
  await admin.end();
  const dbUrl = new URL(ADMIN_URL);
  dbUrl.pathname = `/${dbName}`;
  const port = await freePort();
  const nodeArgs = ['--import', 'tsx'];
  if (env.BENCH_CPU_PROF) nodeArgs.push('--cpu-prof', `--cpu-prof-dir=${path.resolve(env.BENCH_CPU_PROF)}`);
  const server = spawn(process.execPath, [...nodeArgs, 'api/main.ts'], {
    cwd: root,
    env: {
      ...env,
      PORT: String(port),
      DATABASE_URL: dbUrl.toString(),
      REDIS_URL: '',
      RATE_LIMITS: 'off',
      LOG_LEVEL: 'warn',
      NODE_ENV: 'production',
      JWT_SECRET: randomBytes(32).toString('hex'),
      DATA_DIR: path.join(root, 'data', `bench-${dbName}`),
    },
    stdio: ['ignore', 'ignore', 'inherit'],
  });
  try {
    for (let i = 0; ; i++) {
      try {
        await post(port, '/graphql', JSON.stringify({ query: '{ serverInfo { name } }' }));
        break;
      } catch {
        if (i > 300) throw new Error('banter did not start');
        await sleep(100);
      }
    }
    const tag = randomBytes(3).toString('hex');
    const tokens: string[] = [];
    for (let i = 0; i < USERS; i += 8) {
      const batch = await Promise.all(
        Array.from({ length: Math.min(8, USERS - i) }, (_, j) =>
          gql(port, 'mutation($i: RegisterInput!) { register(input: $i) { accessToken } }', {
            i: {
              username: `fan${tag}_${i + j}`,
              email: `fan${tag}_${i + j}@example.test`,
              password: 'bench password 1',
            },
          }).then((d) => d.register.accessToken as string),
        ),
      );
      tokens.push(...batch);
    }
    const owner = tokens[0];
    const g = await gql(
      port,
      'mutation { createGuild(input: { name: "Fanout" }) { id channels { id } } }',
      {},
      owner,
    );
    const channelId = g.createGuild.channels[0].id as string;
    const inv = await gql(
      port,
      'mutation($g: ID!) { createInvite(input: { guildId: $g }) { code } }',
      { g: g.createGuild.id },
      owner,
    );
    for (const t of tokens.slice(1)) {
      await gql(
        port,
        'mutation($c: String!) { joinGuild(code: $c) { id } }',
        { c: inv.createInvite.code },
        t,
      );
    }
    const send = (ts: number) =>
      gql(
        port,
        'mutation($i: SendMessageInput!) { sendMessage(input: $i) { id } }',
        {
          i: { channelId, content: `bench ts=${ts.toFixed(3)} hello there` },
        },
        owner,
      ).then(() => undefined);
    // Warm up the paths (and one subscription) before measuring memory.
    const warm = new Clients(1);
    await warm.open({ url: `ws://127.0.0.1:${port}/graphql`, kind: 'banter', tokens, query: QUERY }, 10);
    for (let i = 0; i < 200; i++) await send(now());
    warm.close();
    await sleep(3000);
    const rss0 = rssBytes(server.pid!);
    const c = new Clients(CLIENT_PROCS);
    await c.open({ url: `ws://127.0.0.1:${port}/graphql`, kind: 'banter', tokens, query: QUERY }, SOCKETS);
    await sleep(3000);
    const rss1 = rssBytes(server.pid!);
    const r = await measure(server.pid!, c, send);
    const metrics = await new Promise<string>((resolve) =>
      request({ host: '127.0.0.1', port, path: '/metrics' }, (res) => {
        let s = '';
        res.on('data', (d) => {
          s += d;
        });
        res.on('end', () => resolve(s));
      }).end(),
    );
    const shared = metrics
      .split('\n')
      .filter((l) => l.startsWith('banter_events_delivered_total'))
      .join('; ');
    c.close();
    return { ...r, rssPerSocketKB: (rss1 - rss0) / SOCKETS / 1024, closes: c.closes, shared };
  } finally {
    server.kill('SIGTERM');
    await new Promise((r) => server.once('exit', r));
    const a = new pg.Client({ connectionString: ADMIN_URL });
    await a.connect();
    await a.query(`drop database if exists ${dbName} with (force)`);
    await a.end();
  }
}

function show(name: string, r: Result) {
  const f = (x: number, d = 1) => (Number.isFinite(x) ? x.toFixed(d) : 'n/a');
  console.log(
    `${name.padEnd(7)} deliveries/s ${f(r.deliveriesPerSec, 0).padStart(8)}  sat p50/p99 ${f(r.satP50)}/${f(r.satP99)} ms  ` +
      `paced p50/p99 ${f(r.pacedP50)}/${f(r.pacedP99)} ms  cpu ${f(r.cpuSeconds, 2)} s  RSS/socket ${f(r.rssPerSocketKB)} KB  ` +
      `(${r.published} published, ${r.delivered} delivered)`,
  );
}

async function main() {
  console.log(
    `fanout: ${SOCKETS} sockets in ${CLIENT_PROCS} client processes, ${PUBLISHERS} publishers, ${SAT_SECONDS} s saturated, ${PACED_SECONDS} s at 10/s`,
  );
  const raw = await runRaw();
  show('raw ws', raw);
  const banter = await runBanter();
  show('banter', banter);
  console.log(`banter closes: ${JSON.stringify(banter.closes)}; ${banter.shared}`);
  console.log(
    `ratios banter/raw: deliveries/s ${(banter.deliveriesPerSec / raw.deliveriesPerSec).toFixed(2)}, ` +
      `paced p99 ${(banter.pacedP99 / raw.pacedP99).toFixed(2)}x, RSS/socket ${(banter.rssPerSocketKB / raw.rssPerSocketKB).toFixed(2)}x, ` +
      `cpu s per delivery ${(banter.cpuSeconds / banter.delivered / (raw.cpuSeconds / raw.delivered)).toFixed(2)}x`,
  );
  process.exit(0);
}

const role = process.argv[2];
if (role === 'raw-server') rawServer();
else if (role === 'clients') clients();
else
  main().catch((err) => {
    console.error(err);
    process.exit(1);
  });
