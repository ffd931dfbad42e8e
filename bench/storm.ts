/**
 * Restart-storm benchmark: `npm run bench:storm` (`npx tsx bench/storm.ts`). Two api instances
 * on one PostgreSQL database and one Redis; BENCH_SOCKETS (1,000) graphql-ws sockets subscribed
 * to `events(after)` on instance A, spread over users (at most 20 sockets each), all from one
 * address; a writer sends at a steady rate to a channel of a guild they are all in, over HTTP to
 * instance B. Then A is stopped (SIGTERM, or SIGKILL with BENCH_KILL=KILL) and every socket
 * reconnects to B at once with its last cursor, as a graphql-ws client does (it sends the same
 * subscribe again, its `after` following what arrived). Printed: time until every socket had
 * resumed (p50/max), sendMessage latency on B before and during the storm (p50/p99/max),
 * publish-to-receive latency of live messages before and during the storm (sockets already
 * resumed), CPU seconds of each server, and whether every socket got every message exactly once
 * and in the log's order. bench/README.md describes it.
 *
 * BENCH_GUILDS > 1 (or BENCH_DMS > 0) adds noise near the head of the log: each user is also in
 * one of BENCH_GUILDS - 1 more guilds, BENCH_DMS DMs join pairs of users, and a second writer
 * sends BENCH_NOISE_RATE messages/s round-robin to those guilds' and DMs' channels, so most rows
 * a resuming socket's replay passes over are of guilds and DMs its user is not in.
 *
 * The sockets are held by a child process (the `ws` client), so that their work does not delay
 * the writer's timing; both stamp with the same wall clock (performance.timeOrigin + now()).
 */
import { fork } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { fileURLToPath } from 'node:url';
import pg from 'pg';
import WebSocket from 'ws';
import {
  type BanterServer,
  cpuSeconds,
  env,
  gql,
  machineBusySeconds,
  machineLine,
  now,
  pool,
  signup,
  sleep,
  startBanter,
} from './common.ts';

const SOCKETS = Number(env.BENCH_SOCKETS ?? 1000);
const PER_USER = Math.min(20, Number(env.BENCH_SOCKETS_PER_USER ?? 20));
const USERS = Math.max(2, Math.ceil(SOCKETS / PER_USER));
/** Messages per second the writer sends, before and during the storm. */
const RATE = Number(env.BENCH_RATE ?? 20);
/** Seconds of writing before the kill (the "before" figures). */
const BEFORE_SECONDS = Number(env.BENCH_BEFORE_SECONDS ?? 5);
/** Seconds the writer goes on after the kill (the storm window). */
const STORM_SECONDS = Number(env.BENCH_STORM_SECONDS ?? 15);
/** SIGTERM (graceful stop) or SIGKILL. */
const KILL = (env.BENCH_KILL ?? 'TERM').toUpperCase() === 'KILL' ? 'SIGKILL' : 'SIGTERM';
/** Longest wait for the last deliveries after the writer stops. */
const DRAIN_SECONDS = Number(env.BENCH_DRAIN_SECONDS ?? 30);
const RATE_LIMITS = env.BENCH_RATE_LIMITS ?? 'off';
const TIMEOUT_SECONDS = Number(env.BENCH_TIMEOUT ?? 300);
/** Guilds: the writer's (every user is in it) and GUILDS - 1 more, each user in one of those. */
const GUILDS = Math.max(1, Number(env.BENCH_GUILDS ?? 1));
/** DMs between pairs of users, written to by the noise writer. */
const DMS = Math.max(0, Number(env.BENCH_DMS ?? 0));
/** Messages per second the noise writer sends to the other guilds and the DMs (with any). */
const NOISE_RATE = GUILDS > 1 || DMS > 0 ? Number(env.BENCH_NOISE_RATE ?? RATE) : 0;
/** Sends in flight at most (a slow server slows the writer down past this). */
const MAX_IN_FLIGHT = 64;
const self = fileURLToPath(import.meta.url);

const QUERY = `subscription($after: String) { events(after: $after) { cursor
  ... on MessageCreated { message { id content createdAt author { id username } } } } }`;

// ------------------------------------------------------------ figures
function pct(xs: number[], p: number): number {
  if (!xs.length) return Number.NaN;
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.max(0, Math.ceil((p / 100) * s.length) - 1))];
}
const fmt = (x: number, d = 1) => (Number.isFinite(x) ? x.toFixed(d) : 'n/a');
const stats = (xs: number[]) =>
  `p50 ${fmt(pct(xs, 50))} / p99 ${fmt(pct(xs, 99))} / max ${fmt(pct(xs, 100))} ms (n=${xs.length})`;

// ------------------------------------------------------------ the clients (a child process)
interface SocketState {
  ws?: WebSocket;
  token: string;
  cursor: string | null;
  /** message numbers in arrival order */
  got: number[];
  /** when the current subscribe was sent, and when it got its first live message since */
  subscribedAt: number;
  resumedAt: number;
  closedAt: number;
  connects: number;
}

function clients() {
  const socks: SocketState[] = [];
  let url = '';
  /** After the kill: sockets reconnect, with their cursor, to this url. */
  let failoverUrl = '';
  /** Live latencies (ms): before the kill, and during the storm for sockets already resumed. */
  const liveBefore: number[] = [];
  const liveStorm: number[] = [];
  let killAt = Number.POSITIVE_INFINITY;
  let stormEnd = Number.POSITIVE_INFINITY;
  const closes: Record<string, number> = {};
  const errors: Record<string, number> = {};
  const bump = (o: Record<string, number>, k: string) => {
    o[k] = (o[k] ?? 0) + 1;
  };
  const reply = (m: object) => process.connected && process.send!(m);
  process.on('disconnect', () => process.exit(0));

  function connect(i: number, to: string) {
    const s = socks[i];
    s.connects++;
    const ws = new WebSocket(to, 'graphql-transport-ws', { perMessageDeflate: false });
    s.ws = ws;
    ws.on('open', () =>
      ws.send(JSON.stringify({ type: 'connection_init', payload: { authorization: `Bearer ${s.token}` } })),
    );
    ws.on('error', (err: NodeJS.ErrnoException) => bump(errors, err.code ?? err.message.slice(0, 40)));
    ws.on('message', (data: Buffer) => {
      const t = now();
      const text = data.toString();
      if (text.startsWith('{"type":"ping"')) return ws.send('{"type":"pong"}');
      if (text.startsWith('{"type":"connection_ack"')) {
        s.subscribedAt = now();
        ws.send(
          JSON.stringify({
            id: '1',
            type: 'subscribe',
            payload: { query: QUERY, variables: { after: s.cursor } },
          }),
        );
        return;
      }
      const c = text.indexOf('"cursor":"');
      if (c >= 0) s.cursor = text.slice(c + 10, text.indexOf('"', c + 10));
      const at = text.indexOf('storm n=');
      if (at < 0) {
        if (!text.includes('"type":"next"')) bump(errors, `frame ${text.slice(0, 60)}`);
        return;
      }
      const n = Number.parseInt(text.slice(at + 8, text.indexOf(' ', at + 8)), 10);
      const ts = Number.parseFloat(text.slice(text.indexOf('ts=', at) + 3));
      s.got.push(n);
      // A message sent after this subscribe: the replay is over (everything before it came first).
      if (ts >= s.subscribedAt) {
        if (!s.resumedAt) s.resumedAt = t;
        if (t < killAt) liveBefore.push(t - ts);
        else if (t < stormEnd && s.connects > 1) liveStorm.push(t - ts);
      }
    });
    ws.on('close', (code) => {
      if (s.ws !== ws) return;
      bump(closes, String(code));
      s.ws = undefined;
      s.closedAt = now();
      // As graphql-ws does (here without its backoff: all at once), to the other instance.
      if (failoverUrl) {
        s.resumedAt = 0;
        connect(i, failoverUrl);
      }
    });
  }

  process.on('message', (m: any) => {
    if (m.cmd === 'open') {
      url = m.url;
      for (let i = 0; i < m.n; i++) {
        socks.push({
          token: m.tokens[i % m.tokens.length],
          cursor: null,
          got: [],
          subscribedAt: 0,
          resumedAt: 0,
          closedAt: 0,
          connects: 0,
        });
      }
      void pool(m.n, 100, async (i) => {
        connect(i, url);
        for (let k = 0; k < 400 && !socks[i].subscribedAt; k++) await sleep(50);
      }).then(() => reply({ cmd: 'opened', ok: socks.filter((s) => s.subscribedAt).length }));
    } else if (m.cmd === 'received') {
      // How many sockets have message n (or later).
      reply({ cmd: 'received', n: socks.filter((s) => s.got.length && s.got.at(-1)! >= m.n).length });
    } else if (m.cmd === 'failover') {
      failoverUrl = m.url;
      killAt = m.at;
      stormEnd = m.stormEnd;
    } else if (m.cmd === 'reset') {
      for (const s of socks) s.got = [];
      liveBefore.length = 0;
    } else if (m.cmd === 'report') {
      // m.order: log index by message number; m.first: the first message every socket must have.
      const order: number[] = m.order;
      let missing = 0;
      let dupes = 0;
      let reordered = 0;
      let short = 0;
      const resumed: number[] = [];
      let notResumed = 0;
      for (const s of socks) {
        const seen = new Uint8Array(order.length);
        let prev = -1;
        for (const n of s.got) {
          if (n < 0 || n >= order.length) continue;
          if (seen[n]) dupes++;
          seen[n] = 1;
          const idx = order[n];
          if (idx < prev) reordered++;
          prev = Math.max(prev, idx);
        }
        let lack = 0;
        for (let n = m.first; n < order.length; n++) if (!seen[n]) lack++;
        missing += lack;
        if (lack) short++;
        if (s.connects > 1 && s.resumedAt) resumed.push(s.resumedAt - killAt);
        else if (s.connects > 1) notResumed++;
      }
      reply({
        cmd: 'report',
        missing,
        dupes,
        reordered,
        short,
        resumed,
        notResumed,
        liveBefore,
        liveStorm,
        closes,
        errors,
        reconnects: socks.reduce((a, s) => a + s.connects - 1, 0),
        clientCpu: process.cpuUsage(),
      });
    }
  });
}

// ------------------------------------------------------------ the bench
async function main() {
  const deadline = setTimeout(() => {
    console.error(`bench:storm: gave up after ${TIMEOUT_SECONDS} s`);
    process.exit(2);
  }, TIMEOUT_SECONDS * 1000);
  deadline.unref();
  console.log(machineLine());
  console.log(
    `storm: ${SOCKETS} sockets over ${USERS} users on A, writer ${RATE} msg/s to B, ${BEFORE_SECONDS} s before, ` +
      `${STORM_SECONDS} s after ${KILL} of A; RATE_LIMITS=${RATE_LIMITS}`,
  );
  if (NOISE_RATE)
    console.log(
      `noise: ${GUILDS - 1} more guilds (each user in one), ${DMS} DMs, ${NOISE_RATE} msg/s to their channels`,
    );
  const shared = {
    JWT_SECRET: randomBytes(32).toString('hex'),
    REDIS_URL: env.BENCH_REDIS_URL ?? 'redis://127.0.0.1:6379',
    REDIS_PREFIX: `banter-storm-${randomBytes(4).toString('hex')}:`,
    RATE_LIMITS,
  };
  const servers: BanterServer[] = [];
  let child: ReturnType<typeof fork> | undefined;
  try {
    const b = await startBanter('storm', { env: shared });
    servers.push(b);
    const a = await startBanter('storm', { env: shared, dbUrl: b.dbUrl });
    servers.unshift(a);
    const tokens = await signup(b.port, USERS, 'storm', 8);
    const owner = tokens[0];
    const g = await gql(
      b.port,
      'mutation { createGuild(input: { name: "Storm" }) { id channels { id } } }',
      {},
      owner,
    );
    const channelId: string = g.createGuild.channels[0].id;
    const inv = await gql(
      b.port,
      'mutation($g: ID!) { createInvite(input: { guildId: $g }) { code } }',
      { g: g.createGuild.id },
      owner,
    );
    await pool(USERS - 1, 16, (i) =>
      gql(
        b.port,
        'mutation($c: String!) { joinGuild(code: $c) { id } }',
        { c: inv.createInvite.code },
        tokens[i + 1],
      ),
    );
    const noise = await noiseChannels(b.port, tokens);

    child = fork(self, ['clients'], { execArgv: ['--import', 'tsx'], stdio: 'inherit' });
    const ask = <T>(m: object, want: string) =>
      new Promise<T>((resolve) => {
        const on = (r: any) => {
          if (r.cmd !== want) return;
          child!.off('message', on);
          resolve(r);
        };
        child!.on('message', on);
        child!.send(m);
      });
    const t0 = now();
    const opened = await ask<{ ok: number }>(
      { cmd: 'open', url: `ws://127.0.0.1:${a.port}/graphql`, tokens, n: SOCKETS },
      'opened',
    );
    console.log(`  ${opened.ok}/${SOCKETS} sockets subscribed on A in ${fmt((now() - t0) / 1000)} s`);

    // Message numbers: -k are probes (until every socket has one), 0.. the measured ones.
    let probe = -1;
    const send = (n: number) =>
      gql(
        b.port,
        'mutation($i: SendMessageInput!) { sendMessage(input: $i) { id } }',
        { i: { channelId, content: `storm n=${n} ts=${now().toFixed(3)} hello there` } },
        owner,
      );
    for (let k = 0; k < 100; k++) {
      await send(probe);
      await sleep(300);
      const r = await ask<{ n: number }>({ cmd: 'received', n: probe }, 'received');
      if (r.n >= opened.ok) break;
      probe--;
    }
    child.send({ cmd: 'reset' });
    await sleep(200);

    // The writer: message n at start + n / RATE, up to MAX_IN_FLIGHT in flight.
    const sends: { at: number; ms: number }[] = [];
    let inFlight = 0;
    let sent = 0;
    let failedSends = 0;
    const start = now();
    const killAt = start + BEFORE_SECONDS * 1000;
    const stopAt = killAt + STORM_SECONDS * 1000;
    const writer = (async () => {
      for (;;) {
        const due = start + (sent * 1000) / RATE;
        if (due >= stopAt) break;
        const wait = due - now();
        if (wait > 0) await sleep(wait);
        while (inFlight >= MAX_IN_FLIGHT) await sleep(5);
        const n = sent++;
        inFlight++;
        const t = now();
        send(n).then(
          () => {
            inFlight--;
            sends.push({ at: t, ms: now() - t });
          },
          (err) => {
            inFlight--;
            failedSends++;
            if (failedSends <= 3) console.log(`  send ${n} failed: ${String(err).slice(0, 200)}`);
          },
        );
      }
      for (let k = 0; k < 3000 && inFlight; k++) await sleep(10);
    })();

    // The noise writer: to the other guilds and the DMs, at NOISE_RATE, until the writer stops.
    let noiseSent = 0;
    let noiseFailed = 0;
    let noiseInFlight = 0;
    const noiseWriter = (async () => {
      if (!NOISE_RATE || !noise.length) return;
      for (;;) {
        const due = start + (noiseSent * 1000) / NOISE_RATE;
        if (due >= stopAt) break;
        const wait = due - now();
        if (wait > 0) await sleep(wait);
        while (noiseInFlight >= MAX_IN_FLIGHT) await sleep(5);
        const c = noise[noiseSent % noise.length];
        const k = noiseSent++;
        noiseInFlight++;
        gql(
          b.port,
          'mutation($i: SendMessageInput!) { sendMessage(input: $i) { id } }',
          { i: { channelId: c.channelId, content: `noise k=${k}` } },
          c.token,
        ).then(
          () => noiseInFlight--,
          (err) => {
            noiseInFlight--;
            if (++noiseFailed <= 3) console.log(`  noise ${k} failed: ${String(err).slice(0, 200)}`);
          },
        );
      }
      for (let k = 0; k < 3000 && noiseInFlight; k++) await sleep(10);
    })();

    const cpu0 = { a: cpuSeconds(a.pid), b: cpuSeconds(b.pid), m: machineBusySeconds() };
    await sleep(killAt - now());
    const cpu1 = { a: cpuSeconds(a.pid), b: cpuSeconds(b.pid), m: machineBusySeconds() };
    child.send({
      cmd: 'failover',
      url: `ws://127.0.0.1:${b.port}/graphql`,
      at: now(),
      stormEnd: stopAt,
    });
    process.kill(a.pid, KILL);
    const killedAt = now();
    let exitedAt = Number.NaN;
    void (async () => {
      for (let k = 0; k < 6000 && !a.exited(); k++) await sleep(10);
      exitedAt = now();
    })();
    await writer;
    await noiseWriter;
    const cpu2 = { b: cpuSeconds(b.pid), m: machineBusySeconds() };
    console.log(`  A stopped (${KILL}): exited ${fmt((exitedAt - killedAt) / 1000, 2)} s after the signal`);

    // Drain: wait until every socket has the last message (or the drain times out).
    const last = sent - 1;
    const d0 = now();
    let have = 0;
    while (now() - d0 < DRAIN_SECONDS * 1000) {
      have = (await ask<{ n: number }>({ cmd: 'received', n: last }, 'received')).n;
      if (have >= opened.ok) break;
      await sleep(250);
    }
    console.log(
      `  ${have}/${opened.ok} sockets have the last message ${fmt((now() - stopAt) / 1000)} s after the writer stopped`,
    );

    // The log's order of the measured messages.
    const c = new pg.Client({ connectionString: b.dbUrl });
    c.on('error', () => {});
    await c.connect();
    const rows = (
      await c.query(
        `select substring(m.content from 'storm n=(-?[0-9]+) ') as n from events e
          join messages m on m.id::text = coalesce(e.payload->>'messageId', e.payload->>'id')
          where e.type = 'MESSAGE_CREATED' and e.channel_id = $1 order by xid::text::bigint, seq`,
        // The channel's global id is base64 of `Channel:<uuid>`.
        [Buffer.from(channelId, 'base64').toString().split(':').at(-1)],
      )
    ).rows as { n: string }[];
    await c.end();
    const order = new Array<number>(sent).fill(Number.MAX_SAFE_INTEGER);
    let idx = 0;
    for (const r of rows) {
      const n = Number(r.n);
      if (n >= 0 && n < sent) order[n] = idx++;
    }
    // A send that failed was never logged: nobody is expected to have it.
    const logged = idx;
    const rep = await ask<any>({ cmd: 'report', order, first: 0 }, 'report');

    const before = sends.filter((s) => s.at < killedAt).map((s) => s.ms);
    const storm = sends.filter((s) => s.at >= killedAt).map((s) => s.ms);
    const stormFirst = sends.filter((s) => s.at >= killedAt && s.at < killedAt + 5000).map((s) => s.ms);
    console.log(`  messages: ${sent} sent, ${logged} logged, ${failedSends} sends failed`);
    if (NOISE_RATE) console.log(`  noise: ${noiseSent} sent, ${noiseFailed} failed`);
    console.log(
      `resumed: ${rep.resumed.length}/${rep.reconnects ? opened.ok : 0} sockets; after the kill p50 ${fmt(pct(rep.resumed, 50))} ms, ` +
        `max ${fmt(pct(rep.resumed, 100))} ms; never resumed ${rep.notResumed}; reconnects ${rep.reconnects}`,
    );
    console.log(`sendMessage on B before:        ${stats(before)}`);
    console.log(`sendMessage on B storm (${STORM_SECONDS} s): ${stats(storm)}`);
    console.log(`sendMessage on B first 5 s:     ${stats(stormFirst)}`);
    console.log(`live latency before:            ${stats(rep.liveBefore)}`);
    console.log(`live latency storm (resumed):   ${stats(rep.liveStorm)}`);
    console.log(
      `CPU s: before (${BEFORE_SECONDS} s) A ${fmt(cpu1.a - cpu0.a, 2)} B ${fmt(cpu1.b - cpu0.b, 2)} machine ${fmt(cpu1.m - cpu0.m, 2)}; ` +
        `storm (${STORM_SECONDS} s) B ${fmt(cpu2.b - cpu1.b, 2)} machine ${fmt(cpu2.m - cpu1.m, 2)}; ` +
        `clients ${fmt((rep.clientCpu.user + rep.clientCpu.system) / 1e6, 2)}`,
    );
    console.log(
      `exactly once, in order: missing ${rep.missing} (sockets short ${rep.short}), duplicates ${rep.dupes}, ` +
        `reordered ${rep.reordered} => ${rep.missing + rep.dupes + rep.reordered === 0 ? 'OK' : 'FAILED'}`,
    );
    console.log(`closes ${JSON.stringify(rep.closes)} errors ${JSON.stringify(rep.errors)}`);
  } catch (err) {
    console.error(err);
  } finally {
    child?.kill();
    for (const s of servers) await s.stop().catch((err) => console.error(err));
  }
  process.exit(0);
}

/**
 * The noise's channels (BENCH_GUILDS, BENCH_DMS), each with the token of a user who may write
 * to it: guild k (1..GUILDS-1) holds the users i with i % (GUILDS - 1) = k - 1, made by the first
 * of them; DM j is between users 2j and 2j + 1 (mod the users), opened by the first.
 */
async function noiseChannels(
  port: number,
  tokens: string[],
): Promise<{ channelId: string; token: string }[]> {
  const out: { channelId: string; token: string }[] = [];
  const more = GUILDS - 1;
  for (let k = 0; k < Math.min(more, tokens.length); k++) {
    const owner = tokens[k];
    const g = await gql(
      port,
      'mutation($n: String!) { createGuild(input: { name: $n }) { id channels { id } } }',
      { n: `Noise ${k}` },
      owner,
    );
    out.push({ channelId: g.createGuild.channels[0].id, token: owner });
    const inv = await gql(
      port,
      'mutation($g: ID!) { createInvite(input: { guildId: $g }) { code } }',
      { g: g.createGuild.id },
      owner,
    );
    const members = tokens.filter((_, i) => i % more === k && i !== k);
    await pool(members.length, 16, (i) =>
      gql(
        port,
        'mutation($c: String!) { joinGuild(code: $c) { id } }',
        { c: inv.createInvite.code },
        members[i],
      ),
    );
  }
  if (DMS) {
    const ids = await pool(
      tokens.length,
      16,
      async (i) => (await gql(port, '{ viewer { user { id } } }', {}, tokens[i])).viewer.user.id,
    );
    for (let j = 0; j < DMS; j++) {
      const a = (2 * j) % tokens.length;
      const b = (2 * j + 1) % tokens.length;
      const d = await gql(
        port,
        'mutation($u: [ID!]!) { openDirectChannel(userIds: $u) { id } }',
        { u: [ids[b]] },
        tokens[a],
      );
      out.push({ channelId: d.openDirectChannel.id, token: tokens[a] });
    }
  }
  return out;
}

if (process.argv[2] === 'clients') clients();
else
  main().catch((err) => {
    console.error(err);
    process.exit(1);
  });
