/**
 * The soak: what a server that has been up for weeks keeps. The real server (`api/main.ts`, a
 * child process started by startBanter with `--expose-gc`) in embedded PGlite or on PostgreSQL +
 * Redis (its own database and key prefix), then bounded rounds of the churn a deployment sees:
 * sockets connecting (some never saying connection_init), subscribing with and without `after`,
 * completing and subscribing again on the same socket, closing normally, abruptly (TCP reset) or
 * vanishing (no more reads: the keep-alive drops them); SSE streams opened (POST and GET) and
 * aborted; access tokens running out (a short ACCESS_TOKEN_TTL) and refreshed, sessions revoked
 * and logged out under open sockets and streams; users signing up, joining, leaving, kicked and
 * joining again; typing, presence changes; messages sent, edited, deleted, reacted to. Each round
 * ends quiet (every client of the round closed, the server's grace timers run out), then the
 * server collects its garbage and is read: heap, live objects by constructor for the suspects (a
 * heap snapshot the server writes on SIGWINCH, through a module preloaded with NODE_OPTIONS: the
 * server's code is not touched), active handles, /metrics (open sockets, subscriptions, SSE
 * streams, series), its database's Postgres connections, its Redis keys. A table per round, then
 * per column whether it stays level after the warm-up rounds (within its tolerance) or grows.
 */
import { randomBytes } from 'node:crypto';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { Redis } from 'ioredis';
import pg from 'pg';
import WebSocket from 'ws';
import {
  ADMIN_URL,
  type BanterServer,
  env,
  get,
  gql,
  machineLine,
  now,
  pool,
  rssBytes,
  sleep,
  startBanter,
} from './common.ts';

/** `pglite`, `postgres` (+ Redis) or `both` (one after the other). */
const MODES = (env.BENCH_SOAK_MODE ?? 'both') === 'both' ? ['pglite', 'postgres'] : [env.BENCH_SOAK_MODE!];
const ROUNDS = Number(env.BENCH_ROUNDS ?? 8);
/** Rounds left out of the verdict (caches filling, code warming up). */
const WARMUP = Number(env.BENCH_WARMUP_ROUNDS ?? 3);
/** Seconds of churn per round (then the quiet and the reading). */
const CHURN_SECONDS = Number(env.BENCH_ROUND_SECONDS ?? 10);
/** The server's ACCESS_TOKEN_TTL (30 s at least): tokens run out under open sockets every ~3 rounds. */
const TOKEN_TTL = Number(env.BENCH_TOKEN_TTL ?? 30);
/** Users made at the start (the guild's owner among them). */
const USERS = Number(env.BENCH_USERS ?? 10);
/** Users who sign up per round (each joins, connects, and leaves the guild again). */
const SIGNUPS = Number(env.BENCH_SIGNUPS ?? 1);
/** Sockets opened (and closed) per round, besides the residents. */
const SOCKETS = Number(env.BENCH_SOCKETS ?? 24);
/** Sockets kept open across rounds (reopened when the server closed one: an expired token, a revoked session). */
const RESIDENTS = Number(env.BENCH_RESIDENTS ?? 4);
/** SSE streams opened (and aborted) per round. */
const STREAMS = Number(env.BENCH_STREAMS ?? 6);
/** Messages sent per round (some then edited, deleted, reacted to). */
const MESSAGES = Number(env.BENCH_MESSAGES ?? 30);
/** The server's keep-alive: a vanished socket is dropped after one to two of these. */
const KEEPALIVE_MS = Number(env.BENCH_KEEPALIVE_MS ?? 2000);
/** The server's connection_init timeout: sockets that never send it are closed after this. */
const INIT_TIMEOUT_MS = Number(env.BENCH_INIT_TIMEOUT_MS ?? 1000);
/** Each mode gives up after this many seconds. */
const TIMEOUT_SECONDS = Number(env.BENCH_TIMEOUT ?? 600);
/** Longest wait for a round's end to be quiet (its sockets and streams gone from /metrics). */
const QUIET_MAX_MS = 30_000;
/**
 * Grace after quiet: the presence's OFFLINE grace (5 s), the shared pages' lifetime (1 s) and the
 * timer that cuts a socket the server closed if its client does not answer (CLOSE_GRACE_MS, 10 s,
 * which holds the socket until then) run out.
 */
const SETTLE_MS = 11_000;
/** A resident socket is reopened before the reading unless its token has this long to go. */
const RESIDENTS_MIN_LIFE_MS = SETTLE_MS + 15_000;

const QUERY = `subscription($after: String) { events(after: $after) { __typename cursor
  ... on MessageCreated { message { id content } } } }`;

/**
 * Preloaded into the server: on SIGWINCH (ignored by default), a full collection, then its active
 * handles by kind and a heap snapshot, written to BENCH_SOAK_DIR for the bench to read.
 */
const PROBE = `import{writeFileSync,renameSync}from'node:fs';import{writeHeapSnapshot}from'node:v8';
process.on('SIGWINCH',()=>{const d=process.env.BENCH_SOAK_DIR,p=process.pid;globalThis.gc?.();globalThis.gc?.();
const m=process.memoryUsage(),resources={};for(const r of process.getActiveResourcesInfo())resources[r]=(resources[r]||0)+1;
const snapshot=writeHeapSnapshot(d+'/heap-'+p+'.heapsnapshot');
writeFileSync(d+'/probe-'+p+'.tmp',JSON.stringify({heapUsed:m.heapUsed,external:m.external,resources,snapshot}));renameSync(d+'/probe-'+p+'.tmp',d+'/probe-'+p+'.json')});`;

/** Objects counted by constructor in every reading (the suspects). */
const SUSPECTS = [
  'Subscription', // core/realtime/subscription.ts, one per events subscription
  'Conn', // api/realtime/protocol.ts, one per socket
  'Operation', // api/realtime/protocol.ts, one per subscribe
  'Work', // api/realtime/shared-execution.ts, a shared execution
  'Delivery',
  'WebSocket', // ws
  'Socket', // net
  'IncomingMessage',
  'AbortController',
  'Timeout',
];

// ------------------------------------------------------------ the server and what it holds

interface User {
  id: string;
  name: string;
  token: string;
  refresh: string;
  issued: number;
  /** the last cursor any of its sockets or streams saw */
  cursor?: string;
}

function fmtMb(b: number) {
  return (b / 1048576).toFixed(1);
}

/**
 * From a V8 heap snapshot: live objects by constructor name (nodes of type object), and the bytes
 * (self sizes) by kind: `object <constructor>`, `closure <name>`, `native <name>`, else the node
 * type alone (strings, arrays, code, ...).
 */
function readSnapshot(file: string) {
  const snap = JSON.parse(readFileSync(file, 'utf8'));
  const meta = snap.snapshot.meta;
  const fields: string[] = meta.node_fields;
  const width = fields.length;
  const typeAt = fields.indexOf('type');
  const nameAt = fields.indexOf('name');
  const sizeAt = fields.indexOf('self_size');
  const types = meta.node_types[0] as string[];
  const named = new Set(['object', 'closure', 'native'].map((t) => types.indexOf(t)));
  const objectType = types.indexOf('object');
  const nodes: number[] = snap.nodes;
  const strings: string[] = snap.strings;
  const counts = new Map<string, number>();
  const bytes = new Map<string, number>();
  for (let i = 0; i < nodes.length; i += width) {
    const t = nodes[i + typeAt];
    const name = strings[nodes[i + nameAt]];
    if (t === objectType) counts.set(name, (counts.get(name) ?? 0) + 1);
    const k = named.has(t) ? `${types[t]} ${name || '(anonymous)'}` : types[t];
    bytes.set(k, (bytes.get(k) ?? 0) + nodes[i + sizeAt]);
  }
  return { counts, bytes };
}

async function probe(pid: number, dir: string) {
  const file = path.join(dir, `probe-${pid}.json`);
  rmSync(file, { force: true });
  process.kill(pid, 'SIGWINCH');
  for (let i = 0; i < 600; i++) {
    await sleep(100);
    let r: { heapUsed: number; external: number; resources: Record<string, number>; snapshot: string };
    try {
      r = JSON.parse(readFileSync(file, 'utf8'));
    } catch {
      continue; // not written yet
    }
    rmSync(file, { force: true });
    const { counts, bytes } = readSnapshot(r.snapshot);
    rmSync(r.snapshot, { force: true });
    return { ...r, counts, bytes, rss: rssBytes(pid) };
  }
  throw new Error('the server wrote no heap snapshot in 60 s');
}

/** /metrics: each sample's value, and how many samples (series) there are. */
async function metrics(port: number) {
  const text = await get(port, '/metrics');
  const values = new Map<string, number>();
  for (const line of text.split('\n')) {
    const at = line.lastIndexOf(' ');
    if (at > 0 && !line.startsWith('#')) values.set(line.slice(0, at), Number(line.slice(at + 1)));
  }
  return { value: (s: string) => values.get(s) ?? 0, series: values.size };
}

/**
 * Keys under the prefix: `presence-choice:<user>` apart (one per user who has connected in the
 * last 30 days, by design: core/realtime/presence.ts, CHOICE_TTL_S), and all the others.
 */
async function redisKeys(redis: Redis, prefix: string) {
  let cursor = '0';
  let choices = 0;
  let others = 0;
  for (let i = 0; i < 10_000; i++) {
    const [next, keys] = await redis.scan(cursor, 'MATCH', `${prefix}*`, 'COUNT', 1000);
    for (const k of keys) {
      if (k.startsWith(`${prefix}presence-choice:`)) choices++;
      else others++;
    }
    cursor = next;
    if (cursor === '0') return { choices, others };
  }
  throw new Error('SCAN did not end');
}

// ------------------------------------------------------------ clients

/** What the clients saw over a mode's run: events received, and closes by code. */
const seen = { wsEvents: 0, sseItems: 0, closes: new Map<number, number>() };

/** A graphql-transport-ws socket of one user; remembers the last cursor it saw. */
class Sock {
  ws: WebSocket;
  closedWith?: number;
  acked = false;
  events = 0;
  /** when the token it authenticated with runs out (ms): the server closes it then */
  readonly expires: number;
  /** the id of the last subscribe */
  last = '0';
  private nextId = 1;
  private opened: Promise<void>;
  private ack?: () => void;
  readonly acks: Promise<void>;
  constructor(
    port: number,
    readonly user: User,
    init = true,
  ) {
    this.ws = new WebSocket(`ws://127.0.0.1:${port}/graphql`, 'graphql-transport-ws');
    this.expires = user.issued + TOKEN_TTL * 1000;
    this.acks = new Promise((r) => {
      this.ack = r;
    });
    this.opened = new Promise((resolve) => {
      this.ws.once('open', () => resolve());
      this.ws.once('close', () => resolve());
    });
    this.ws.on('error', () => {});
    this.ws.on('close', (code) => {
      this.closedWith = code;
      seen.closes.set(code, (seen.closes.get(code) ?? 0) + 1);
      this.ack?.();
    });
    this.ws.on('message', (d) => {
      const m = JSON.parse(String(d));
      if (m.type === 'connection_ack') {
        this.acked = true;
        this.ack?.();
      } else if (m.type === 'ping') this.send({ type: 'pong' });
      else if (m.type === 'next') {
        this.events++;
        seen.wsEvents++;
        const c = m.payload?.data?.events?.cursor;
        if (c) this.user.cursor = c;
      }
    });
    if (init) void this.send({ type: 'connection_init', payload: { authorization: `Bearer ${user.token}` } });
  }
  async send(m: object) {
    await this.opened;
    if (this.ws.readyState === WebSocket.OPEN) this.ws.send(JSON.stringify(m));
  }
  /** Subscribes to events, after the user's last cursor when `resume`; returns the operation id. */
  subscribe(resume: boolean): string {
    const id = String(this.nextId++);
    this.last = id;
    // After the ack (a subscribe before it is closed 4401), with the cursor the user has then.
    void this.acks.then(() =>
      this.send({
        id,
        type: 'subscribe',
        payload: { query: QUERY, variables: { after: resume ? (this.user.cursor ?? null) : null } },
      }),
    );
    return id;
  }
  complete(id: string) {
    void this.acks.then(() => this.send({ id, type: 'complete' }));
  }
  get open() {
    return this.closedWith === undefined;
  }
  close() {
    this.ws.close(1000);
  }
  /** Gone without a close frame: a TCP reset. */
  reset() {
    const s = (this.ws as unknown as { _socket?: import('node:net').Socket })._socket;
    if (s) s.resetAndDestroy();
    else this.ws.terminate();
  }
  /** Reads nothing more (a client that vanished): the server's keep-alive finds it. */
  vanish() {
    (this.ws as unknown as { _socket?: import('node:net').Socket })._socket?.pause();
  }
}

/** An events stream over SSE (POST, or GET as an EventSource sends it); `abort()` ends it. */
function sse(port: number, user: User, resume: boolean, method: 'POST' | 'GET') {
  const ac = new AbortController();
  const variables = { after: resume ? (user.cursor ?? null) : null };
  const base = `http://127.0.0.1:${port}/graphql`;
  const url =
    method === 'GET'
      ? `${base}?${new URLSearchParams({ query: QUERY, variables: JSON.stringify(variables) })}`
      : base;
  const s = { items: 0, ended: false, abort: () => ac.abort() };
  void (async () => {
    const res = await fetch(url, {
      method,
      headers: {
        accept: 'text/event-stream',
        authorization: `Bearer ${user.token}`,
        ...(method === 'POST' ? { 'content-type': 'application/json' } : {}),
      },
      body: method === 'POST' ? JSON.stringify({ query: QUERY, variables }) : undefined,
      signal: ac.signal,
    });
    const reader = res.body!.getReader();
    const decoder = new TextDecoder();
    for (let i = 0; i < 1_000_000; i++) {
      const { done, value } = await reader.read();
      if (done) break;
      const text = decoder.decode(value, { stream: true });
      for (const m of text.matchAll(/"cursor":"([^"]+)"/g)) user.cursor = m[1];
      const items = (text.match(/event: next/g) ?? []).length;
      s.items += items;
      seen.sseItems += items;
    }
  })()
    .catch(() => {})
    .finally(() => {
      s.ended = true;
    });
  return s;
}

// ------------------------------------------------------------ the churn

const AUTH = 'accessToken refreshToken user { id username }';

async function register(port: number, name: string): Promise<User> {
  const d = await gql(port, `mutation($i: RegisterInput!) { register(input: $i) { ${AUTH} } }`, {
    i: { username: name, email: `${name}@example.test`, password: 'soak password 1' },
  });
  return fromAuth(d.register);
}

function fromAuth(a: any, cursor?: string): User {
  return {
    id: a.user.id,
    name: a.user.username,
    token: a.accessToken,
    refresh: a.refreshToken,
    issued: Date.now(),
    cursor,
  };
}

/**
 * A fresh access token when the one held would run out during the next round's churn, or `force`
 * (the session's refresh token rotates).
 */
async function fresh(port: number, u: User, force = false) {
  if (!force && Date.now() - u.issued < (TOKEN_TTL - CHURN_SECONDS - 5) * 1000) return;
  const d = await gql(port, `mutation($r: String!) { refreshSession(refreshToken: $r) { ${AUTH} } }`, {
    r: u.refresh,
  });
  Object.assign(u, fromAuth(d.refreshSession, u.cursor));
}

async function login(port: number, u: User) {
  const d = await gql(port, `mutation($i: LoginInput!) { login(input: $i) { ${AUTH} } }`, {
    i: { login: u.name, password: 'soak password 1', deviceName: 'soak' },
  });
  Object.assign(u, fromAuth(d.login, u.cursor));
}

const pick = <T>(xs: T[], i: number) => xs[i % xs.length];

interface World {
  port: number;
  owner: User;
  members: User[];
  guildId: string;
  channelId: string;
  invite: string;
  residents: Sock[];
  tag: string;
}

async function setup(port: number): Promise<World> {
  const tag = randomBytes(3).toString('hex');
  const users = await pool(USERS, 4, (i) => register(port, `soak${tag}_${i}`));
  const owner = users[0];
  const g = await gql(
    port,
    'mutation { createGuild(input: { name: "Soak" }) { id channels { id } } }',
    {},
    owner.token,
  );
  const guildId = g.createGuild.id;
  const inv = await gql(
    port,
    'mutation($g: ID!) { createInvite(input: { guildId: $g }) { code } }',
    { g: guildId },
    owner.token,
  );
  const invite = inv.createInvite.code;
  await pool(USERS - 1, 4, (i) =>
    gql(port, 'mutation($c: String!) { joinGuild(code: $c) { id } }', { c: invite }, users[i + 1].token),
  );
  return {
    port,
    owner,
    members: users.slice(1),
    guildId,
    channelId: g.createGuild.channels[0].id,
    invite,
    residents: [],
    tag,
  };
}

/** Runs a mutation and counts what it refused (a race the churn makes, e.g. a reaction on a deleted message). */
async function tryGql(w: World, refused: Refused, q: string, v: object, token: string) {
  try {
    return await gql(w.port, q, v, token);
  } catch (err) {
    const op = /\{\s*(\w+)/.exec(q)?.[1] ?? q.slice(0, 20);
    const code = /"code":"(\w+)"/.exec(String(err))?.[1] ?? 'error';
    const k = `${op} ${code}`;
    refused.set(k, (refused.get(k) ?? 0) + 1);
    return undefined;
  }
}

type Refused = Map<string, number>;

async function round(w: World, r: number, refused: Refused) {
  const { port } = w;
  const end = now() + CHURN_SECONDS * 1000;
  const everyone = [w.owner, ...w.members];
  for (const u of everyone) await fresh(port, u);

  // Residents each complete their subscription and subscribe again on the same socket.
  for (const s of w.residents) {
    if (!s.open) continue;
    s.complete(s.last);
    s.subscribe(true);
  }

  // Newcomers: sign up, join, connect, and (below) leave again.
  const newcomers: User[] = [];
  for (let i = 0; i < SIGNUPS; i++) {
    const u = await register(port, `soak${w.tag}_r${r}_${i}`);
    await gql(port, 'mutation($c: String!) { joinGuild(code: $c) { id } }', { c: w.invite }, u.token);
    newcomers.push(u);
  }

  // This round's sockets and streams: with and without `after`, a few never initialised.
  const sockets: Sock[] = [];
  for (let i = 0; i < SOCKETS; i++) {
    const u = i < newcomers.length ? newcomers[i] : pick(everyone, r + i);
    const s = new Sock(port, u, i % 8 !== 7);
    if (i % 8 !== 7) s.subscribe(i % 2 === 0);
    sockets.push(s);
  }
  const streams: ReturnType<typeof sse>[] = [];
  for (let i = 0; i < STREAMS; i++)
    streams.push(sse(port, pick(everyone, r + 2 * i), i % 2 === 1, i % 3 === 0 ? 'GET' : 'POST'));
  await Promise.race([Promise.all(sockets.map((s) => s.acks)), sleep(5000)]);

  // The traffic, spread over the round.
  const sent: { id: string; author: User }[] = [];
  const perStep = Math.max(1, Math.ceil(MESSAGES / 10));
  for (let step = 0; step < 10 && now() < end; step++) {
    await pool(perStep, 4, async (k) => {
      const u = pick(everyone, step * perStep + k + r);
      const d = await tryGql(
        w,
        refused,
        'mutation($i: SendMessageInput!) { sendMessage(input: $i) { id } }',
        { i: { channelId: w.channelId, content: `soak r${r} s${step} k${k}` } },
        u.token,
      );
      if (d) sent.push({ id: d.sendMessage.id, author: u });
    });
    const a = pick(everyone, step + r);
    await tryGql(w, refused, 'mutation($c: ID!) { startTyping(channelId: $c) }', { c: w.channelId }, a.token);
    await tryGql(
      w,
      refused,
      'mutation($s: PresenceChoice!) { setPresence(status: $s) }',
      { s: pick(['DND', 'IDLE', 'INVISIBLE', 'ONLINE'], step + r) },
      a.token,
    );
    const last = sent[sent.length - 1];
    if (last) {
      const m = last.id;
      await tryGql(
        w,
        refused,
        'mutation($m: ID!, $e: String!) { addReaction(messageId: $m, emoji: $e) { id } }',
        { m, e: pick(['👍', '🎉', '👀'], step) },
        a.token,
      );
      if (step % 2 === 0)
        await tryGql(
          w,
          refused,
          'mutation($m: ID!, $e: String!) { removeReaction(messageId: $m, emoji: $e) { id } }',
          { m, e: pick(['👍', '🎉', '👀'], step) },
          a.token,
        );
      await tryGql(
        w,
        refused,
        'mutation($i: EditMessageInput!) { editMessage(input: $i) { id } }',
        { i: { id: m, content: `edited r${r} s${step}` } },
        last.author.token,
      );
      if (step % 3 === 0)
        await tryGql(w, refused, 'mutation($m: ID!) { deleteMessage(id: $m) }', { m }, w.owner.token);
    }

    // Membership, sessions, closes: one kind per step.
    const victim = pick(w.members, r * 3 + step);
    switch (step) {
      case 1: {
        // leaves and joins again
        await tryGql(
          w,
          refused,
          'mutation($g: ID!) { leaveGuild(guildId: $g) }',
          { g: w.guildId },
          victim.token,
        );
        await tryGql(
          w,
          refused,
          'mutation($c: String!) { joinGuild(code: $c) { id } }',
          { c: w.invite },
          victim.token,
        );
        break;
      }
      case 2: {
        // kicked with its sockets open, joins again
        await tryGql(
          w,
          refused,
          'mutation($g: ID!, $u: ID!) { kickMember(guildId: $g, userId: $u) }',
          { g: w.guildId, u: victim.id },
          w.owner.token,
        );
        await tryGql(
          w,
          refused,
          'mutation($c: String!) { joinGuild(code: $c) { id } }',
          { c: w.invite },
          victim.token,
        );
        break;
      }
      case 3: {
        // a new session, and the one its open sockets and streams use revoked from it
        await login(port, victim);
        const v = await gql(port, '{ viewer { sessions { id current } } }', {}, victim.token);
        for (const s of v.viewer.sessions as { id: string; current: boolean }[])
          if (!s.current)
            await tryGql(
              w,
              refused,
              'mutation($id: String!) { revokeSession(id: $id) }',
              { id: s.id },
              victim.token,
            );
        break;
      }
      case 4: {
        // signs out with sockets open, then signs in again
        await tryGql(w, refused, 'mutation { logout }', {}, victim.token);
        await login(port, victim);
        break;
      }
      case 5: {
        // half of the sockets go: normally, by completing first, by a reset, vanished
        for (let i = 0; i < sockets.length / 2; i++) {
          const s = sockets[i];
          if (i % 4 === 0) s.close();
          else if (i % 4 === 1) {
            s.complete('1');
            s.close();
          } else if (i % 4 === 2) s.reset();
          else s.vanish();
        }
        for (let i = 0; i < streams.length / 2; i++) streams[i].abort();
        break;
      }
      case 6: {
        // the newcomers leave
        for (const u of newcomers)
          await tryGql(
            w,
            refused,
            'mutation($g: ID!) { leaveGuild(guildId: $g) }',
            { g: w.guildId },
            u.token,
          );
        break;
      }
    }
    const left = end - now();
    if (left > 0) await sleep(Math.min(left / (10 - step), 2000));
  }

  // The round ends: every client of its own goes (the vanished ones once the server dropped them).
  for (let i = 0; i < sockets.length; i++) {
    const s = sockets[i];
    if (i < sockets.length / 2 && i % 4 === 3) continue;
    if (i % 3 === 0) s.reset();
    else s.close();
  }
  for (const s of streams) s.abort();
  return { sockets, streams };
}

/**
 * Sockets kept open across rounds: one the server closed (its token ran out, its session was
 * revoked or signed out) comes back with a fresh token, resuming from its user's last cursor; one
 * whose token runs out before the reading is over is first let run out (the server closes it).
 * Afterwards each has `RESIDENTS_MIN_LIFE_MS` to go.
 */
async function keepResidents(w: World) {
  const everyone = [w.owner, ...w.members];
  for (let i = 0; i < RESIDENTS; i++) {
    const s = w.residents[i];
    if (s?.open && s.expires > now() + RESIDENTS_MIN_LIFE_MS) continue;
    if (s) for (let k = 0; k < 400 && s.open && now() < s.expires + 5000; k++) await sleep(100);
    if (s?.open) throw new Error(`a resident socket outlived its token by 5 s`);
    const u = pick(everyone, i);
    await fresh(w.port, u, true);
    const n = new Sock(w.port, u);
    n.subscribe(true);
    w.residents[i] = n;
    await Promise.race([n.acks, sleep(5000)]);
  }
}
// ------------------------------------------------------------ one mode

interface Reading {
  round: number;
  columns: Record<string, number>;
  counts: Map<string, number>;
  bytes: Map<string, number>;
}

/** Per column: the tolerance its rise after the warm-up may have and still count as level. */
function tolerance(col: string, first: number) {
  if (col === 'heap MB') return Math.max(2, first * 0.03);
  if (col === 'ext MB') return Math.max(2, first * 0.03);
  if (col === 'rss MB') return Math.max(32, first * 0.1);
  return Math.max(2, Math.ceil(first * 0.05));
}

function verdicts(rows: Reading[]) {
  const after = rows.slice(Math.min(WARMUP, rows.length - 2));
  const out: string[] = [];
  const growing: string[] = [];
  for (const col of Object.keys(rows[0].columns)) {
    const ys = after.map((r) => r.columns[col]);
    if (ys.some((y) => Number.isNaN(y))) continue;
    const n = ys.length;
    const mx = (n - 1) / 2;
    const my = ys.reduce((a, b) => a + b, 0) / n;
    let num = 0;
    let den = 0;
    ys.forEach((y, i) => {
      num += (i - mx) * (y - my);
      den += (i - mx) ** 2;
    });
    const fitted = den ? (num / den) * (n - 1) : 0;
    const rise = ys[n - 1] - ys[0];
    const tol = tolerance(col, ys[0]);
    const grows = fitted > tol && rise > tol;
    if (grows) growing.push(col);
    out.push(
      `${col}: ${grows ? 'GROWING' : 'level'} (${ys[0]} → ${ys[n - 1]} over rounds ${after[0].round}-${after[n - 1].round}, fitted ${fitted >= 0 ? '+' : ''}${fitted.toFixed(1)}, tolerance ±${tol.toFixed(1)})`,
    );
  }
  // Level is not enough: at a quiet reading every subscription, socket and operation alive is one
  // of the residents'. More objects than the server counts open are kept for subscribers gone.
  for (const [obj, live] of KEPT) {
    const extra = after.map((r) => r.columns[obj] - r.columns[live]);
    const kept = Math.max(...extra) > 0;
    if (kept) growing.push(`${obj} > ${live}`);
    out.push(
      `${obj} − ${live}: ${kept ? 'KEPT' : 'none kept'} (${extra.join(', ')} over rounds ${after[0].round}-${after[after.length - 1].round})`,
    );
  }
  return { out, growing };
}

/** Objects of each open subscriber, and the /metrics count of those open. */
const KEPT = [
  ['Subscription', 'subs'],
  ['Operation', 'subs'],
  ['Conn', 'ws open'],
] as const;

async function soak(mode: string) {
  const dir = mkdtempSync(path.join(os.tmpdir(), 'banter-soak-'));
  const postgres = mode === 'postgres';
  const prefix = `banter-soak-${randomBytes(4).toString('hex')}:`;
  const nodeOptions = [
    env.NODE_OPTIONS,
    `--import=data:text/javascript;base64,${Buffer.from(PROBE).toString('base64')}`,
  ]
    .filter(Boolean)
    .join(' ');
  const started = now();
  const server: BanterServer = await startBanter('soak', {
    gcOnSignal: true,
    env: {
      NODE_OPTIONS: nodeOptions,
      BENCH_SOAK_DIR: dir,
      ACCESS_TOKEN_TTL: String(TOKEN_TTL),
      WS_KEEPALIVE_MS: String(KEEPALIVE_MS),
      WS_CONNECTION_INIT_TIMEOUT_MS: String(INIT_TIMEOUT_MS),
      ...(postgres
        ? { REDIS_URL: env.BENCH_REDIS_URL ?? 'redis://127.0.0.1:6379', REDIS_PREFIX: prefix }
        : { DATABASE_URL: '' }),
    },
  });
  const admin = new pg.Client({ connectionString: ADMIN_URL });
  await admin.connect();
  const redis = postgres ? new Redis(env.BENCH_REDIS_URL ?? 'redis://127.0.0.1:6379') : undefined;
  const dbName = new URL(server.dbUrl).pathname.slice(1);
  const rows: Reading[] = [];
  const refused: Refused = new Map();
  const timer = setTimeout(() => {
    console.error(`bench:soak: ${mode} gave up after ${TIMEOUT_SECONDS} s`);
    process.exit(2);
  }, TIMEOUT_SECONDS * 1000);
  timer.unref();
  const cols = [
    'heap MB',
    'ext MB',
    'rss MB',
    ...SUSPECTS,
    'handles',
    'timers',
    'ws open',
    'subs',
    'sse open',
    'pg conns',
    'redis keys',
    'choices-users',
    'series',
  ];
  console.log(
    `\n${mode}${postgres ? ` (database ${dbName}, Redis prefix ${prefix})` : ' (embedded PGlite, no Redis)'}: ` +
      `${ROUNDS} rounds of ${CHURN_SECONDS} s churn, ${WARMUP} warm-up; per round ${SOCKETS} sockets, ` +
      `${STREAMS} SSE streams, ${MESSAGES} messages, 1 signup; ${RESIDENTS} resident sockets; ` +
      `ACCESS_TOKEN_TTL=${TOKEN_TTL} WS_KEEPALIVE_MS=${KEEPALIVE_MS} WS_CONNECTION_INIT_TIMEOUT_MS=${INIT_TIMEOUT_MS}`,
  );
  console.log(['round', 'churn s', 'quiet s', 'read s', ...cols].join('\t'));
  try {
    const w = await setup(server.port);
    await keepResidents(w);
    console.log(`  (server started and ${USERS} users set up in ${((now() - started) / 1000).toFixed(1)} s)`);
    for (let r = 1; r <= ROUNDS; r++) {
      const t0 = now();
      const ended = await round(w, r, refused);
      const churn = (now() - t0) / 1000;
      await keepResidents(w);
      // Quiet: only the residents (those still open) left on the server.
      let m = await metrics(server.port);
      const deadline = now() + QUIET_MAX_MS;
      for (let i = 0; i < 1000; i++) {
        const residents = w.residents.filter((s) => s.open).length;
        if (
          (m.value('banter_ws_open_sockets') <= residents &&
            m.value('banter_ws_active_subscriptions') <= residents &&
            m.value('banter_sse_open_streams') === 0) ||
          now() > deadline
        )
          break;
        await sleep(250);
        m = await metrics(server.port);
      }
      const quiet = (now() - t0) / 1000 - churn;
      for (const s of ended.sockets) if (s.open) s.ws.terminate(); // the vanished, dropped by the server
      await sleep(SETTLE_MS);
      const t1 = now();
      const p = await probe(server.pid, dir);
      const read = (now() - t1) / 1000;
      m = await metrics(server.port);
      const pgConns = postgres
        ? Number(
            (await admin.query('select count(*)::int n from pg_stat_activity where datname = $1', [dbName]))
              .rows[0].n,
          )
        : Number.NaN;
      const columns: Record<string, number> = {
        'heap MB': Number(fmtMb(p.heapUsed)),
        'ext MB': Number(fmtMb(p.external)),
        'rss MB': Number(fmtMb(p.rss)),
      };
      for (const s of SUSPECTS) columns[s] = p.counts.get(s) ?? 0;
      columns.handles = Object.values(p.resources).reduce((a, b) => a + b, 0);
      columns.timers = p.resources.Timeout ?? 0;
      columns['ws open'] = m.value('banter_ws_open_sockets');
      columns.subs = m.value('banter_ws_active_subscriptions');
      columns['sse open'] = m.value('banter_sse_open_streams');
      columns['pg conns'] = pgConns;
      const keys = redis ? await redisKeys(redis, prefix) : { choices: Number.NaN, others: Number.NaN };
      columns['redis keys'] = keys.others;
      // one presence-choice key per user made so far (each has connected)
      columns['choices-users'] = keys.choices - (USERS + r * SIGNUPS);
      columns.series = m.series;
      rows.push({ round: r, columns, counts: p.counts, bytes: p.bytes });
      console.log(
        [
          r,
          churn.toFixed(1),
          quiet.toFixed(1),
          read.toFixed(1),
          ...cols.map((c) => (Number.isNaN(columns[c]) ? '-' : columns[c])),
        ].join('\t'),
      );
    }
    if (env.BENCH_SOAK_DEBUG)
      console.log(
        'residents',
        w.residents.map((s) => s.closedWith ?? 'open'),
      );
    for (const s of w.residents) s.close();
    const { out, growing } = verdicts(rows);
    console.log(
      `${mode}: the clients got ${seen.wsEvents} socket events and ${seen.sseItems} SSE items; sockets closed by code: ` +
        [...seen.closes]
          .sort((a, b) => a[0] - b[0])
          .map(([c, n]) => `${c} ×${n}`)
          .join(', '),
    );
    seen.wsEvents = 0;
    seen.sseItems = 0;
    seen.closes.clear();
    console.log(
      `${mode}: refused in the churn (races it makes on purpose, e.g. a reaction to a message just deleted): ` +
        ([...refused].map(([k, n]) => `${k} ×${n}`).join(', ') || 'none'),
    );
    for (const line of out) console.log(`  ${line}`);
    // Whatever else grew, from the first reading after the warm-up to the last: the constructors
    // whose count, and the kinds of heap node whose bytes, rose most.
    const first = rows[Math.min(WARMUP, rows.length - 2)];
    const last = rows[rows.length - 1];
    const risen = (a: Map<string, number>, z: Map<string, number>, unit: (d: number) => string) =>
      [...z]
        .map(([k, v]) => [k, v - (a.get(k) ?? 0)] as const)
        .filter(([, d]) => d > 0)
        .sort((x, y) => y[1] - x[1])
        .slice(0, 10)
        .map(([k, d]) => `${k || '(anonymous)'} +${unit(d)}`)
        .join(', ') || 'none';
    console.log(
      `  most risen, rounds ${first.round}→${last.round}, objects: ${risen(first.counts, last.counts, String)}`,
    );
    console.log(
      `  most risen, rounds ${first.round}→${last.round}, bytes: ${risen(first.bytes, last.bytes, (d) => `${(d / 1024).toFixed(0)} KB`)}`,
    );
    console.log(
      `${mode}: VERDICT ${growing.length ? `GROWING: ${growing.join(', ')}` : 'every column level'}`,
    );
    return growing;
  } finally {
    redis?.disconnect();
    await admin.end();
    await server.stop();
    if (postgres) {
      const r = new Redis(env.BENCH_REDIS_URL ?? 'redis://127.0.0.1:6379');
      for (let i = 0; i < 1000; i++) {
        const keys = await r.keys(`${prefix}*`);
        if (!keys.length) break;
        await r.del(...keys);
      }
      r.disconnect();
    }
    rmSync(dir, { recursive: true, force: true });
  }
}

async function main() {
  console.log(machineLine());
  let growing = 0;
  for (const mode of MODES) growing += (await soak(mode)).length;
  process.exit(growing ? 1 : 0);
}

main().catch((err) => {
  console.error(err);
  process.exit(2);
});
