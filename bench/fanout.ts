/**
 * Fan-out benchmark (issue 3): `npm run bench:fanout`. In one invocation it runs a raw `ws`
 * broadcast server (the practical limit) and Banter, each with BENCH_SOCKETS (1,000) subscribed
 * sockets held by separate client processes, and prints for both: deliveries/s (saturated),
 * p50/p99 publish-to-receive latency (saturated, and paced at 10 messages/s), server CPU seconds,
 * RSS per idle subscribed socket, what was lost; then the ratios and the issue's targets.
 * Above 5,000 sockets it is a capacity run: no saturated phase (its backlog would take minutes
 * to drain), only sockets open, RSS per socket and the paced phase. bench/README.md has the knobs.
 *
 * Fairness: both servers send the same JSON (a graphql-ws `next` of a MessageCreated; the raw
 * server broadcasts a copy of that shape as a text frame), and every client does the same work
 * per frame: a length check and two counters; only the sampled 1-in-10 sockets decode the frame
 * to read its timestamp. Frames too short to be a message (connection_ack, other events such as
 * presence) take a slow path that parses them; they are counted apart, never as deliveries.
 * The sockets are a minimal WebSocket client on node:net (WsClient below), not the `ws` client:
 * the client processes share the cores with the server, and their cost per frame is in every
 * latency they measure.
 */
import { type ChildProcess, fork } from 'node:child_process';
import { createHash, randomBytes, randomFillSync, randomUUID } from 'node:crypto';
import { appendFileSync } from 'node:fs';
import { createServer as createHttpServer } from 'node:http';
import { connect, type Socket } from 'node:net';
import { fileURLToPath } from 'node:url';
import { WebSocketServer } from 'ws';
import {
  type BanterServer,
  cpuSeconds,
  env,
  GC_ON_SIGNAL_ARGS,
  get,
  gql,
  machineBusySeconds,
  machineLine,
  memoryAfterGc,
  now,
  pool,
  post,
  signup,
  sleep,
  startBanter,
} from './common.ts';

const SOCKETS = Number(env.BENCH_SOCKETS ?? 1000);
/** The server's per-user socket limit: 20 by default; WS_MAX_SOCKETS_PER_USER, where the server reads it. */
const SOCKETS_PER_USER = Number(env.WS_MAX_SOCKETS_PER_USER || 20);
const USERS = Number(env.BENCH_USERS ?? Math.max(50, Math.ceil(SOCKETS / SOCKETS_PER_USER)));
const CLIENT_PROCS = Number(env.BENCH_CLIENT_PROCS ?? Math.max(2, Math.ceil(SOCKETS / 5000)));
const CONNECT_CONCURRENCY = Number(env.BENCH_CONNECT_CONCURRENCY ?? 200);
const CONNECT_SECONDS = Number(env.BENCH_CONNECT_SECONDS ?? 120);
const SATURATED = env.BENCH_SATURATED ? env.BENCH_SATURATED !== '0' : SOCKETS <= 5000;
const SAT_SECONDS = Number(env.BENCH_SECONDS ?? 5);
const PACED_SECONDS = Number(env.BENCH_PACED_SECONDS ?? 5);
const PUBLISHERS = Number(env.BENCH_PUBLISHERS ?? 16);
const DRAIN_SECONDS = Number(env.BENCH_DRAIN_SECONDS ?? 20);
const PROBE_SECONDS = Number(env.BENCH_PROBE_SECONDS ?? (SOCKETS <= 5000 ? 30 : 60));
const QUIET_SECONDS = Number(env.BENCH_QUIET_SECONDS ?? (SOCKETS <= 5000 ? 20 : 120));
const TARGETS = (env.BENCH_TARGETS ?? 'raw,banter').split(',');
/** Users choose INVISIBLE before connecting: no presence events when they come online. */
const INVISIBLE = env.BENCH_INVISIBLE === '1';
const TIMEOUT_SECONDS = Number(env.BENCH_TIMEOUT ?? 900);
const self = fileURLToPath(import.meta.url);

/** A frame at least this long is a message delivery; ack, pings and cursor-only events are shorter. */
const MESSAGE_BYTES = 160;

// ------------------------------------------------------------ latency histogram (2% buckets)
const H_MIN = 0.01;
const H_STEP = Math.log(1.02);
const H_N = 900; // up to ~550 s
const bucket = (ms: number) =>
  ms <= H_MIN ? 0 : Math.min(H_N - 1, Math.ceil(Math.log(ms / H_MIN) / H_STEP));
function percentile(h: number[], p: number): number {
  const total = h.reduce((a, b) => a + b, 0);
  if (!total) return Number.NaN;
  const want = Math.max(1, Math.ceil((p / 100) * total));
  let cum = 0;
  for (let i = 0; i < h.length; i++) {
    cum += h[i];
    if (cum >= want) return H_MIN * Math.exp(i * H_STEP);
  }
  return Number.NaN;
}

// ------------------------------------------------------------ raw ws broadcast server
function rawServer() {
  const http = createHttpServer((req, res) => {
    const chunks: Buffer[] = [];
    req.on('data', (c: Buffer) => chunks.push(c));
    req.on('end', () => {
      const body = Buffer.concat(chunks);
      // A text frame, as Banter sends: the client validates UTF-8 for both.
      for (const c of wss.clients) c.send(body, { binary: false });
      res.writeHead(204).end();
    });
  });
  const wss = new WebSocketServer({ server: http });
  wss.on('connection', (s) => s.on('error', () => s.terminate()));
  wss.on('error', () => {});
  http.listen(0, '127.0.0.1', () => process.send!({ port: (http.address() as { port: number }).port }));
  process.on('disconnect', () => process.exit(0));
}

// ------------------------------------------------------------ minimal WebSocket client
/*
 * The client processes hold thousands of sockets on the same 2 cores as the server under test,
 * so their per-frame cost adds to every latency they measure. The `ws` library's client (a
 * Writable stream per receiver, a Buffer per read, events per message, UTF-8 validation) used
 * 6.5–7.5 µs of user CPU per frame here, this one 3.3–4.6 µs (the kernel's ~5 µs per read stays):
 * it reads every socket of a process into one shared buffer (node:net `onread`) and hands each
 * complete message to a callback as a view of that buffer. It does what the bench needs of
 * RFC 6455 and no more: the Upgrade handshake (Sec-WebSocket-Accept and the subprotocol
 * checked), masked client frames, unmasked server frames of any length (7/16/64-bit), split
 * across reads or several per read, fragmented messages, ping → pong, the close handshake. No
 * extensions (none offered), no UTF-8 validation.
 */
const WS_GUID = '258EAFA5-E914-47DA-95CA-C5AB0DC85B11';
/** Largest message accepted (the `ws` default maxPayload). */
const WS_MAX_PAYLOAD = 100 * 2 ** 20;
/** Every socket of a process reads into this buffer: each read is handled synchronously before the next. */
const READ_BUFFER = Buffer.allocUnsafe(64 * 1024);
const EMPTY = Buffer.alloc(0);

interface WsHandlers {
  open(): void;
  /** A complete message; `data` may be a view of the shared read buffer, valid only during the call. */
  message(data: Buffer): void;
  /** An error worth counting (socket error, bad handshake, protocol error, handshake timeout). */
  error(what: string): void;
  /** The TCP connection closed: the code of the server's close frame, 1005 if it had none, else 1006. */
  close(code: number): void;
}

class WsClient {
  private readonly socket: Socket;
  private readonly key = randomBytes(16).toString('base64');
  /** The handshake response so far (latin1); undefined once the connection is open. */
  private response: string | undefined = '';
  private readonly handshakeTimer: NodeJS.Timeout;
  /** Bytes of an incomplete frame (own copies), their total, and how many make progress possible. */
  private pending: Buffer[] = [];
  private pendingBytes = 0;
  private need = 0;
  /** Frames of a fragmented message so far (own copies). */
  private fragments: Buffer[] | undefined;
  private fragmentBytes = 0;
  private closeCode = 1006;
  /** A close frame was received or sent, or the connection failed: further frames are ignored. */
  private done = false;

  constructor(
    url: string,
    private readonly protocol: string | undefined,
    private readonly h: WsHandlers,
    handshakeMs: number,
  ) {
    const u = new URL(url);
    const port = Number(u.port || 80);
    this.socket = connect({
      host: u.hostname,
      port,
      noDelay: true,
      onread: {
        buffer: READ_BUFFER,
        callback: (n) => {
          this.read(READ_BUFFER.subarray(0, n));
          return true;
        },
      },
    });
    this.socket.on('connect', () => {
      this.socket.write(
        `GET ${u.pathname}${u.search} HTTP/1.1\r\nHost: ${u.host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n` +
          `Sec-WebSocket-Key: ${this.key}\r\nSec-WebSocket-Version: 13\r\n` +
          `${protocol ? `Sec-WebSocket-Protocol: ${protocol}\r\n` : ''}\r\n`,
      );
    });
    this.socket.on('error', (err: NodeJS.ErrnoException) => h.error(err.code ?? err.message.slice(0, 60)));
    this.socket.on('close', () => {
      clearTimeout(this.handshakeTimer);
      h.close(this.closeCode);
    });
    this.handshakeTimer = setTimeout(() => this.fail('handshake timeout'), handshakeMs);
  }

  /** Sends a text message. */
  send(text: string) {
    this.sendFrame(0x1, Buffer.from(text));
  }

  /** Drops the connection without a close handshake (the `ws` client's terminate()). */
  terminate() {
    this.done = true;
    this.socket.destroy();
  }

  private fail(what: string) {
    this.h.error(what);
    this.terminate();
  }

  private read(chunk: Buffer) {
    if (this.response === undefined) this.frames(chunk);
    else this.handshake(chunk);
  }

  private handshake(chunk: Buffer) {
    const response = this.response + chunk.toString('latin1');
    const end = response.indexOf('\r\n\r\n');
    if (end < 0) {
      this.response = response;
      if (response.length > 16_384) this.fail('handshake: response headers too long');
      return;
    }
    const [status, ...lines] = response.slice(0, end).split('\r\n');
    // Whatever followed the headers is already WebSocket frames.
    const rest = Buffer.from(response.slice(end + 4), 'latin1');
    this.response = undefined;
    clearTimeout(this.handshakeTimer);
    const code = /^HTTP\/1\.1 (\d{3})/.exec(status)?.[1];
    if (code !== '101') return this.fail(`unexpected server response: ${code ?? status.slice(0, 30)}`);
    const headers = new Map<string, string>();
    for (const l of lines) {
      const colon = l.indexOf(':');
      if (colon > 0) headers.set(l.slice(0, colon).trim().toLowerCase(), l.slice(colon + 1).trim());
    }
    const accept = createHash('sha1')
      .update(this.key + WS_GUID)
      .digest('base64');
    if (headers.get('upgrade')?.toLowerCase() !== 'websocket')
      return this.fail('handshake: no Upgrade: websocket');
    if (headers.get('sec-websocket-accept') !== accept)
      return this.fail('handshake: wrong Sec-WebSocket-Accept');
    if (headers.get('sec-websocket-protocol') !== this.protocol)
      return this.fail(`handshake: subprotocol ${headers.get('sec-websocket-protocol')}`);
    if (headers.has('sec-websocket-extensions')) return this.fail('handshake: extension not offered');
    this.h.open();
    if (rest.length && !this.done) this.frames(rest);
  }

  /** Parses the frames in `chunk` (which may be the shared read buffer), keeping an incomplete one. */
  private frames(chunk: Buffer) {
    if (this.done) return;
    let data = chunk;
    if (this.pendingBytes) {
      if (this.pendingBytes + chunk.length < this.need) {
        this.pending.push(Buffer.from(chunk));
        this.pendingBytes += chunk.length;
        return;
      }
      this.pending.push(chunk);
      data = Buffer.concat(this.pending, this.pendingBytes + chunk.length);
      this.pending = [];
      this.pendingBytes = 0;
    }
    let off = 0;
    while (off < data.length && !this.done) {
      const avail = data.length - off;
      if (avail < 2) {
        this.need = 2;
        break;
      }
      const b0 = data[off];
      const b1 = data[off + 1];
      if (b0 & 0x70) return this.protocolError(1002, 'RSV bits set');
      if (b1 & 0x80) return this.protocolError(1002, 'masked server frame');
      let len = b1 & 0x7f;
      if (b0 & 0x08 && (len > 125 || !(b0 & 0x80))) return this.protocolError(1002, 'bad control frame');
      let header = 2;
      if (len === 126) {
        header = 4;
        if (avail < header) {
          this.need = header;
          break;
        }
        len = data.readUInt16BE(off + 2);
      } else if (len === 127) {
        header = 10;
        if (avail < header) {
          this.need = header;
          break;
        }
        const high = data.readUInt32BE(off + 2);
        if (high > 0x1f_ffff) return this.protocolError(1009, 'payload length > 2^53 - 1');
        len = high * 2 ** 32 + data.readUInt32BE(off + 6);
      }
      if (len > WS_MAX_PAYLOAD) return this.protocolError(1009, 'message too big');
      if (avail < header + len) {
        this.need = header + len;
        break;
      }
      const payload = data.subarray(off + header, off + header + len);
      off += header + len;
      this.frame((b0 & 0x80) !== 0, b0 & 0x0f, payload);
    }
    if (off < data.length && !this.done) {
      const rest = data.subarray(off);
      // The shared read buffer is overwritten by the next read: keep a copy.
      this.pending = [data === chunk ? Buffer.from(rest) : rest];
      this.pendingBytes = rest.length;
    }
  }

  private frame(fin: boolean, opcode: number, payload: Buffer) {
    if (opcode >= 0x8) {
      if (opcode === 0x8) return this.closeFrame(payload);
      if (opcode === 0x9) return this.sendFrame(0xa, payload);
      if (opcode === 0xa) return;
      return this.protocolError(1002, `opcode ${opcode}`);
    }
    if (opcode === 0x0) {
      if (!this.fragments) return this.protocolError(1002, 'continuation without a message');
      this.fragmentBytes += payload.length;
      if (this.fragmentBytes > WS_MAX_PAYLOAD) return this.protocolError(1009, 'message too big');
      this.fragments.push(Buffer.from(payload));
      if (!fin) return;
      const message = Buffer.concat(this.fragments, this.fragmentBytes);
      this.fragments = undefined;
      this.fragmentBytes = 0;
      return this.h.message(message);
    }
    if (opcode !== 0x1 && opcode !== 0x2) return this.protocolError(1002, `opcode ${opcode}`);
    if (this.fragments) return this.protocolError(1002, 'new message inside a fragmented one');
    if (fin) return this.h.message(payload);
    this.fragments = [Buffer.from(payload)];
    this.fragmentBytes = payload.length;
  }

  /** The server's close frame: answer with its code and end; the server then closes TCP. */
  private closeFrame(payload: Buffer) {
    if (payload.length === 1) return this.protocolError(1002, 'close frame of 1 byte');
    this.closeCode = payload.length ? payload.readUInt16BE(0) : 1005;
    this.sendFrame(0x8, payload.length ? payload.subarray(0, 2) : EMPTY);
    this.done = true;
    this.socket.end();
  }

  /** What the `ws` client does on a bad frame: counts it, sends a close frame, ends (reported as 1006). */
  private protocolError(code: number, what: string) {
    this.h.error(`protocol: ${what}`);
    const p = Buffer.allocUnsafe(2);
    p.writeUInt16BE(code);
    this.sendFrame(0x8, p);
    this.done = true;
    this.socket.end();
    setTimeout(() => this.socket.destroy(), 2000).unref();
  }

  /** One masked frame; nothing after a close frame. */
  private sendFrame(opcode: number, payload: Buffer) {
    if (this.done || this.socket.destroyed) return;
    const n = payload.length;
    const header = n < 126 ? 2 : n < 65_536 ? 4 : 10;
    const out = Buffer.allocUnsafe(header + 4 + n);
    out[0] = 0x80 | opcode;
    if (n < 126) out[1] = 0x80 | n;
    else if (n < 65_536) {
      out[1] = 0x80 | 126;
      out.writeUInt16BE(n, 2);
    } else {
      out[1] = 0x80 | 127;
      out.writeUInt32BE(Math.floor(n / 2 ** 32), 2);
      out.writeUInt32BE(n >>> 0, 6);
    }
    randomFillSync(out, header, 4);
    for (let j = 0; j < n; j++) out[header + 4 + j] = payload[j] ^ out[header + (j & 3)];
    this.socket.write(out);
  }
}

// ------------------------------------------------------------ subscriber processes
interface OpenCmd {
  kind: 'raw' | 'banter';
  url: string;
  /** This process's share of the sockets. */
  n: number;
  /** Open sockets [already open, upTo) of that share. */
  upTo: number;
  /** Global index of this process's first socket (picks its user's token). */
  offset: number;
  tokens?: string[];
  query?: string;
  concurrency: number;
  /** Epoch ms after which failed connects are not retried. */
  deadline: number;
}

interface ClientStats {
  received: number;
  other: number;
  firstRecv: number;
  lastRecv: number;
  hist?: number[];
  /** Sampled messages published before the phase began (probes or backlog arriving late). */
  stale: number;
  ready: number;
  open: number;
  /** Subscribed sockets that never received a message. */
  silent: number;
  lost: number;
  short: number;
  extra: number;
  closes: Record<string, number>;
  errors: Record<string, number>;
  odd: Record<string, number>;
  sampleBytes: number;
  /** One message frame as received (for BENCH_VERBOSE). */
  sample: string;
  /** Per message of the phase (by its publish time): the first and last sampled latency, ms. */
  spans?: Record<string, [number, number]>;
}

function clients() {
  let sockets: (WsClient | undefined)[] = [];
  let counts = new Uint32Array(0);
  let readySlot = new Uint8Array(0);
  /** Whether a socket received a message before the last reset. */
  let everGot = new Uint8Array(0);
  const hist = new Array<number>(H_N).fill(0);
  let received = 0;
  let other = 0;
  let firstRecv = 0;
  let lastRecv = 0;
  let sampleBytes = 0;
  /** Epoch ms the phase began (reset); sampled messages published before it are stale. */
  let since = 0;
  let stale = 0;
  let sample = '';
  let spans = new Map<number, [number, number]>();
  let closing = false;
  const closes: Record<string, number> = {};
  const errors: Record<string, number> = {};
  const odd: Record<string, number> = {};
  const bump = (o: Record<string, number>, k: string) => {
    o[k] = (o[k] ?? 0) + 1;
  };
  const reply = (m: object) => {
    if (process.connected) process.send!(m);
  };
  process.on('disconnect', () => process.exit(0));
  // Last resort: a stray socket error must not end the run; it is reported instead.
  process.on('uncaughtException', (err: NodeJS.ErrnoException) =>
    bump(errors, `uncaught ${err.code ?? err.message}`),
  );

  function connectOnce(o: OpenCmd, i: number): Promise<{ ok: boolean; retry: boolean; why: string }> {
    const sampled = (o.offset + i) % 10 === 0;
    return new Promise((resolve) => {
      let settled = false;
      const done = (ok: boolean, retry: boolean, why: string) => {
        if (settled) return;
        settled = true;
        clearTimeout(timer);
        resolve({ ok, retry, why });
      };
      const timer = setTimeout(() => {
        ws.terminate();
        done(false, true, 'timeout');
      }, 20_000);
      const ready = () => {
        sockets[i] = ws;
        readySlot[i] = 1;
        done(true, false, '');
      };
      const ws: WsClient = new WsClient(
        o.url,
        o.kind === 'banter' ? 'graphql-transport-ws' : undefined,
        {
          error: (what) => bump(errors, what),
          open: () => {
            if (o.kind === 'raw') return ready();
            const token = o.tokens![(o.offset + i) % o.tokens!.length];
            ws.send(
              JSON.stringify({ type: 'connection_init', payload: { authorization: `Bearer ${token}` } }),
            );
          },
          message: (data) => {
            // The per-frame work, identical for both servers. `data` is a view of the read buffer.
            if (data.length >= MESSAGE_BYTES) {
              const t = now();
              counts[i]++;
              received++;
              if (firstRecv === 0) firstRecv = t;
              lastRecv = t;
              if (sampled) {
                const s = data.toString('latin1');
                const at = s.indexOf('ts=');
                const sent = at >= 0 ? Number.parseFloat(s.slice(at + 3, at + 24)) : Number.NaN;
                // Published before the phase began (a late probe or backlog): not this phase's latency.
                if (sent < since) stale++;
                else if (sent >= since) {
                  hist[bucket(t - sent)]++;
                  const span = spans.get(sent);
                  if (!span) spans.set(sent, [t - sent, t - sent]);
                  else span[1] = t - sent;
                }
                if (!sample) {
                  sampleBytes = data.length;
                  sample = s;
                }
              }
              return;
            }
            let m: { type?: string };
            try {
              m = JSON.parse(data.toString());
            } catch {
              return bump(odd, 'unparsable');
            }
            if (m.type === 'connection_ack') {
              ws.send(JSON.stringify({ id: '1', type: 'subscribe', payload: { query: o.query } }));
              ready();
            } else if (m.type === 'next') other++;
            else if (m.type === 'ping') ws.send('{"type":"pong"}');
            else bump(odd, String(m.type));
          },
          close: (code) => {
            if (!settled) done(false, code < 4000, `close ${code}`);
            else if (sockets[i] === ws) {
              sockets[i] = undefined;
              if (!closing) bump(closes, String(code));
            }
          },
        },
        10_000,
      );
    });
  }

  let openedUpTo = 0;
  async function open(o: OpenCmd) {
    if (sockets.length !== o.n) {
      sockets = new Array(o.n);
      counts = new Uint32Array(o.n);
      readySlot = new Uint8Array(o.n);
      everGot = new Uint8Array(o.n);
      openedUpTo = 0;
    }
    const from = openedUpTo;
    openedUpTo = Math.max(from, o.upTo);
    const failWhy: Record<string, number> = {};
    let failed = 0;
    let retries = 0;
    await pool(openedUpTo - from, o.concurrency, async (j) => {
      const i = from + j;
      for (let attempt = 0; ; attempt++) {
        const r = await connectOnce(o, i);
        if (r.ok) return;
        bump(failWhy, r.why);
        if (!r.retry || attempt >= 7 || now() > o.deadline) {
          failed++;
          return;
        }
        retries++;
        await sleep(Math.min(2000, 50 * 2 ** attempt) * (0.5 + Math.random()));
      }
    });
    reply({ opened: { ready: readySlot.reduce((a, b) => a + b, 0), failed, retries, failWhy } });
  }

  function stats(expect: number, withHist: boolean): ClientStats {
    let lost = 0;
    let short = 0;
    let extra = 0;
    let ready = 0;
    let open = 0;
    let silent = 0;
    for (let i = 0; i < counts.length; i++) {
      if (sockets[i]) open++;
      if (!readySlot[i]) continue;
      ready++;
      const c = counts[i];
      if (!c && !everGot[i]) silent++;
      if (c < expect) {
        lost += expect - c;
        short++;
      } else extra += c - expect;
    }
    return {
      received,
      other,
      firstRecv,
      lastRecv,
      hist: withHist ? hist : undefined,
      spans: withHist ? Object.fromEntries(spans) : undefined,
      stale,
      ready,
      open,
      silent,
      lost,
      short,
      extra,
      closes,
      errors,
      odd,
      sampleBytes,
      sample,
    };
  }

  process.on('message', (m: any) => {
    if (m.cmd === 'open') void open(m.open);
    else if (m.cmd === 'reset') {
      for (let i = 0; i < counts.length; i++) if (counts[i]) everGot[i] = 1;
      counts.fill(0);
      hist.fill(0);
      spans = new Map();
      received = 0;
      other = 0;
      stale = 0;
      since = m.since ?? 0;
      firstRecv = 0;
      lastRecv = 0;
      reply({ reset: true });
    } else if (m.cmd === 'stats') reply({ stats: stats(m.expect, m.hist) });
    else if (m.cmd === 'close') {
      closing = true;
      for (const s of sockets) s?.terminate();
      setTimeout(() => process.exit(0), 200);
    }
  });
}

// ------------------------------------------------------------ driver
const sum = (xs: number[]) => xs.reduce((a, b) => a + b, 0);
function merge(into: Record<string, number>, from: Record<string, number>) {
  for (const [k, v] of Object.entries(from)) into[k] = (into[k] ?? 0) + v;
  return into;
}

class Clients {
  procs: ChildProcess[] = [];
  constructor(n: number) {
    for (let i = 0; i < n; i++) {
      const p = fork(self, ['clients'], { execArgv: ['--import', 'tsx'] });
      p.on('exit', (code) => {
        if (code) console.error(`client process ${i} exited with ${code}`);
      });
      this.procs.push(p);
    }
  }
  private ask(p: ChildProcess, msg: object, key: string, timeoutMs = 30_000): Promise<any> {
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        p.off('message', on);
        reject(new Error(`client process did not answer ${JSON.stringify(msg).slice(0, 40)}`));
      }, timeoutMs);
      const on = (m: any) => {
        if (key in m) {
          clearTimeout(timer);
          p.off('message', on);
          resolve(m[key]);
        }
      };
      p.on('message', on);
      p.send(msg);
    });
  }
  /** Opens (more) sockets: `fraction` of each process's share of `total` is open afterwards. */
  async open(
    o: Omit<OpenCmd, 'n' | 'upTo' | 'offset' | 'concurrency' | 'deadline'>,
    total: number,
    fraction = 1,
  ) {
    const per = Math.ceil(total / this.procs.length);
    const deadline = Date.now() + CONNECT_SECONDS * 1000;
    const all = await Promise.all(
      this.procs.map((p, i) => {
        const n = Math.max(0, Math.min(per, total - i * per));
        const open: OpenCmd = {
          ...o,
          n,
          upTo: Math.ceil(n * fraction),
          offset: i * per,
          concurrency: CONNECT_CONCURRENCY,
          deadline,
        };
        return this.ask(p, { cmd: 'open', open }, 'opened', (CONNECT_SECONDS + 60) * 1000);
      }),
    );
    return {
      ready: sum(all.map((s) => s.ready)),
      failed: sum(all.map((s) => s.failed)),
      retries: sum(all.map((s) => s.retries)),
      failWhy: all.reduce((a, s) => merge(a, s.failWhy), {}),
    };
  }
  async reset() {
    await Promise.all(this.procs.map((p) => this.ask(p, { cmd: 'reset', since: now() }, 'reset')));
  }
  /** Totals over all processes; lost/short/extra are against `expect` messages per socket. */
  async stats(expect: number, hist = false): Promise<ClientStats> {
    const all: ClientStats[] = await Promise.all(
      this.procs.map((p) => this.ask(p, { cmd: 'stats', expect, hist }, 'stats')),
    );
    const h = hist ? new Array<number>(H_N).fill(0) : undefined;
    if (h) for (const s of all) for (let i = 0; i < H_N; i++) h[i] += s.hist![i];
    const spans: Record<string, [number, number]> = {};
    for (const s of all) {
      for (const [k, [first, last]] of Object.entries(s.spans ?? {})) {
        const m = spans[k];
        spans[k] = m ? [Math.min(m[0], first), Math.max(m[1], last)] : [first, last];
      }
    }
    return {
      received: sum(all.map((s) => s.received)),
      other: sum(all.map((s) => s.other)),
      firstRecv: Math.min(...all.map((s) => s.firstRecv || Number.POSITIVE_INFINITY)),
      lastRecv: Math.max(...all.map((s) => s.lastRecv)),
      hist: h,
      ready: sum(all.map((s) => s.ready)),
      open: sum(all.map((s) => s.open)),
      stale: sum(all.map((s) => s.stale)),
      silent: sum(all.map((s) => s.silent)),
      lost: sum(all.map((s) => s.lost)),
      short: sum(all.map((s) => s.short)),
      extra: sum(all.map((s) => s.extra)),
      closes: all.reduce((a, s) => merge(a, s.closes), {}),
      errors: all.reduce((a, s) => merge(a, s.errors), {}),
      odd: all.reduce((a, s) => merge(a, s.odd), {}),
      sampleBytes: Math.max(...all.map((s) => s.sampleBytes)),
      sample: all.find((s) => s.sample)?.sample ?? '',
      spans,
    };
  }
  /** CPU seconds (user + system) the client processes have used so far. */
  cpu(): number {
    let t = 0;
    for (const p of this.procs) {
      try {
        t += cpuSeconds(p.pid!);
      } catch {
        // exited
      }
    }
    return t;
  }
  close() {
    for (const p of this.procs) if (p.connected) p.send({ cmd: 'close' });
  }
}

/**
 * Waits until every subscribed socket has `perSocket` messages, or none arrived for 2 s, or
 * DRAIN_SECONDS passed. Returns the last totals and how it ended.
 */
async function drain(c: Clients, perSocket: number) {
  const t0 = now();
  let last = -1;
  let lastChange = t0;
  for (;;) {
    await sleep(250);
    const s = await c.stats(perSocket);
    if (s.lost === 0) return { s, ended: 'complete', ms: now() - t0 };
    if (s.received + s.other !== last) {
      last = s.received + s.other;
      lastChange = now();
    } else if (now() - lastChange >= 2000) return { s, ended: 'stalled 2 s', ms: now() - t0 };
    if (now() - t0 > DRAIN_SECONDS * 1000) return { s, ended: `cut at ${DRAIN_SECONDS} s`, ms: now() - t0 };
  }
}

/**
 * Waits until no frame of any kind (other events such as presence included) arrived for
 * `quietMs`, at most `maxSeconds`; resolves to a description of how long it took.
 */
async function quiet(c: Clients, quietMs: number, maxSeconds: number): Promise<string> {
  const t0 = now();
  let last = -1;
  let lastChange = t0;
  for (;;) {
    await sleep(250);
    const s = await c.stats(0);
    if (s.received + s.other !== last) {
      last = s.received + s.other;
      lastChange = now();
    } else if (now() - lastChange >= quietMs) return `quiet after ${fmt((now() - t0) / 1000)} s`;
    if (now() - t0 > maxSeconds * 1000) return `still receiving after ${maxSeconds} s`;
  }
}

interface Phase {
  published: number;
  publishErrors: number;
  delivered: number;
  /** Deliveries missing when the phase ended (sockets × published − delivered, per socket). */
  lost: number;
  shortSockets: number;
  /** Deliveries beyond what was published in the phase: late earlier messages, or duplicates. */
  extra: number;
  /** Of the sampled deliveries, those published before the phase (not in its latencies). */
  stale: number;
  p50: number;
  p99: number;
  /**
   * Over the phase's messages, p50/p99 of each message's first sampled delivery (the time before
   * the server's first write) and of its last (when it had written to everyone), ms.
   */
  first: [number, number];
  last: [number, number];
  ended: string;
  drainMs: number;
}

/** p50 and p99 of a list (nearest rank). */
function p50p99(xs: number[]): [number, number] {
  if (!xs.length) return [Number.NaN, Number.NaN];
  const sorted = [...xs].sort((a, b) => a - b);
  const at = (p: number) => sorted[Math.min(sorted.length - 1, Math.ceil(p * sorted.length) - 1)];
  return [at(0.5), at(0.99)];
}

/** CPU seconds used during a phase (to the end of its drain). */
interface PhaseCpu {
  /** The server process. */
  cpuSeconds: number;
  clientCpuSeconds: number;
  /** Everything else on the machine: Postgres, this driver, and whatever else is running. */
  restCpuSeconds: number;
}

interface Result {
  name: string;
  connect: {
    ready: number;
    failed: number;
    retries: number;
    failWhy: Record<string, number>;
    seconds: number;
  };
  probes: number;
  unprobed: number;
  rssPerSocketKB: number;
  /** V8 heap used + external per socket, after a full GC. */
  heapPerSocketKB: number;
  sat?: Phase & PhaseCpu & { deliveriesPerSec: number };
  paced: Phase & PhaseCpu;
  closes: Record<string, number>;
  errors: Record<string, number>;
  odd: Record<string, number>;
  other: number;
  frameBytes: number;
  frame: string;
  extra?: string;
}

/** What one server under test provides to the measurement. */
interface Target {
  name: string;
  pid: number;
  alive: () => boolean;
  open: Omit<OpenCmd, 'n' | 'upTo' | 'offset' | 'concurrency' | 'deadline'>;
  publish: (ts: number) => Promise<void>;
  /** Runs after the phases, while the sockets are still open; its line is printed with the results. */
  after?: () => Promise<string>;
}

const fmt = (x: number, d = 1) => (Number.isFinite(x) ? x.toFixed(d) : 'n/a');

/**
 * Opens sockets up to `fraction` of BENCH_SOCKETS, probes until each has had a message
 * (graphql-ws does not acknowledge a subscribe, so a subscription is live only some time after
 * it), waits for quiet, and reads the server's memory after a full GC.
 */
async function openIdle(t: Target, c: Clients, fraction: number) {
  const log = (s: string) => console.log(`  ${t.name}: ${s}`);
  let ts = now();
  const opened = await c.open(t.open, SOCKETS, fraction);
  const seconds = (now() - ts) / 1000;
  log(
    `${opened.ready}/${SOCKETS} sockets subscribed after ${fmt(seconds)} s ` +
      `(${opened.failed} failed, ${opened.retries} retries${opened.retries ? ` ${JSON.stringify(opened.failWhy)}` : ''})`,
  );
  await c.reset();
  let probes = 0;
  let unprobed = opened.ready;
  ts = now();
  while (now() - ts < PROBE_SECONDS * 1000 && t.alive()) {
    await t.publish(now()).catch(() => undefined);
    probes++;
    await sleep(200);
    unprobed = (await c.stats(1)).short;
    if (unprobed === 0) break;
  }
  await drain(c, probes);
  const probeSeconds = (now() - ts) / 1000;
  // Idle means idle: other events (the presence of all those users coming online) done too.
  const settled = await quiet(c, 2000, QUIET_SECONDS);
  const idle = await c.stats(0);
  const mem = await memoryAfterGc(t.pid);
  log(
    `${probes} probes until every socket had one (${unprobed} never did), drained in ${fmt(probeSeconds)} s, ` +
      `${settled}; ${idle.open} open, ${idle.silent} never received a message, ${idle.other} other events so far`,
  );
  return { ...opened, seconds, probes, unprobed, idle, mem };
}

/**
 * Starts a measured phase: resets the clients' counts and notes the CPU used so far. The function
 * it returns drains the phase's deliveries and returns its figures and the clients' stats.
 */
async function beginPhase(t: Target, c: Clients) {
  await c.reset();
  const cpu0 = cpuSeconds(t.pid);
  const ccpu0 = c.cpu();
  const busy0 = machineBusySeconds();
  return async (published: number, publishErrors: number) => {
    const d = await drain(c, published);
    const cpu = cpuSeconds(t.pid) - cpu0;
    const ccpu = c.cpu() - ccpu0;
    const rest = machineBusySeconds() - busy0 - cpu - ccpu;
    const s = await c.stats(published, true);
    const phase: Phase & PhaseCpu = {
      published,
      publishErrors,
      delivered: s.received,
      lost: s.lost,
      shortSockets: s.short,
      extra: s.extra,
      stale: s.stale,
      p50: percentile(s.hist!, 50),
      p99: percentile(s.hist!, 99),
      first: p50p99(Object.values(s.spans ?? {}).map((x) => x[0])),
      last: p50p99(Object.values(s.spans ?? {}).map((x) => x[1])),
      ended: d.ended,
      drainMs: d.ms,
      cpuSeconds: cpu,
      clientCpuSeconds: ccpu,
      restCpuSeconds: rest,
    };
    return { phase, s };
  };
}

async function measure(t: Target): Promise<Result> {
  const log = (s: string) => console.log(`  ${t.name}: ${s}`);
  // Warm the server's paths on a few sockets before its memory baseline, the same for both.
  const warm = new Clients(1);
  try {
    await warm.open(t.open, 10);
    for (let i = 0; i < 200; i++) await t.publish(now()).catch(() => undefined);
  } finally {
    warm.close();
  }
  await sleep(2000);
  const mem0 = await memoryAfterGc(t.pid);
  const c = new Clients(CLIENT_PROCS);
  try {
    // Memory per socket is the slope from half to all of the sockets, both idle and warm: what
    // the warm-up left behind (caches that expire, retained events) cancels out of it.
    const half = await openIdle(t, c, 0.5);
    const full = await openIdle(t, c, 1);
    const connect = {
      ready: full.ready,
      failed: half.failed + full.failed,
      retries: half.retries + full.retries,
      failWhy: merge(half.failWhy, full.failWhy),
      seconds: half.seconds + full.seconds,
    };
    const n = Math.max(1, full.idle.open - half.idle.open);
    const rssPerSocketKB = (full.mem.rss - half.mem.rss) / n / 1024;
    const heapPerSocketKB = (full.mem.heap - half.mem.heap) / n / 1024;
    const perOpen = Math.max(1, full.idle.open);
    log(
      `per idle socket after GC, from ${half.idle.open} to ${full.idle.open} sockets: RSS ${fmt(rssPerSocketKB)} KB, ` +
        `heap+external ${fmt(heapPerSocketKB)} KB (from the baseline before any socket: ` +
        `${fmt((full.mem.rss - mem0.rss) / perOpen / 1024)} KB, ${fmt((full.mem.heap - mem0.heap) / perOpen / 1024)} KB); ` +
        `server RSS ${fmt(full.mem.rss / 2 ** 20, 0)} MB`,
    );
    const probes = full.probes;
    const unprobed = full.unprobed;

    let sat: Result['sat'];
    if (SATURATED) {
      const end = await beginPhase(t, c);
      const t0 = now();
      const until = t0 + SAT_SECONDS * 1000;
      let published = 0;
      let publishErrors = 0;
      await Promise.all(
        Array.from({ length: PUBLISHERS }, async () => {
          while (now() < until && t.alive()) {
            try {
              await t.publish(now());
              published++;
            } catch {
              publishErrors++;
              await sleep(10);
            }
          }
        }),
      );
      const { phase, s } = await end(published, publishErrors);
      sat = { ...phase, deliveriesPerSec: s.received / ((s.lastRecv - t0) / 1000) };
      log(
        `saturated: ${published} published in ${SAT_SECONDS} s, drain ${phase.ended} after ${fmt(phase.drainMs / 1000)} s, ` +
          `${s.lost} deliveries missing`,
      );
      log(`before the paced phase: ${await quiet(c, 1000, QUIET_SECONDS)}`);
    }

    const end = await beginPhase(t, c);
    log(`paced phase begins at ${Date.now()}`);
    let published = 0;
    let publishErrors = 0;
    const start = now();
    for (let i = 0; i < PACED_SECONDS * 10 && t.alive(); i++) {
      await sleep(Math.max(0, start + i * 100 - now()));
      try {
        await t.publish(now());
        published++;
      } catch {
        publishErrors++;
      }
    }
    const { phase: paced, s } = await end(published, publishErrors);
    if (env.BENCH_SPANS) {
      const lines = Object.entries(s.spans ?? {}).map(([sent, [first, last]]) =>
        JSON.stringify({ server: t.name, sent: Number(sent), first, last }),
      );
      appendFileSync(env.BENCH_SPANS, `${lines.join('\n')}\n`);
    }
    return {
      name: t.name,
      connect,
      probes,
      unprobed,
      rssPerSocketKB,
      heapPerSocketKB,
      sat,
      paced,
      closes: s.closes,
      errors: s.errors,
      odd: s.odd,
      other: s.other,
      extra: await t.after?.(),
      frameBytes: s.sampleBytes,
      frame: s.sample,
    };
  } finally {
    c.close();
  }
}

async function runRaw(messageJson: (ts: number) => string): Promise<Result> {
  const server = fork(self, ['raw-server'], { execArgv: ['--import', 'tsx', ...GC_ON_SIGNAL_ARGS] });
  let alive = true;
  server.once('exit', () => {
    alive = false;
  });
  try {
    const { port } = await new Promise<{ port: number }>((r) => server.once('message', r as never));
    await sleep(500);
    return await measure({
      name: 'raw ws',
      pid: server.pid!,
      alive: () => alive,
      open: { kind: 'raw', url: `ws://127.0.0.1:${port}/` },
      publish: (ts) => post(port, '/publish', messageJson(ts)).then(() => undefined),
    });
  } finally {
    server.kill();
  }
}

const QUERY =
  'subscription { events { cursor ... on MessageCreated { message { id content createdAt author { id username } } } } }';

async function runBanter(server: BanterServer, tokens: string[], channelId: string): Promise<Result> {
  const { port } = server;
  const send = (ts: number) =>
    gql(
      port,
      'mutation($i: SendMessageInput!) { sendMessage(input: $i) { id } }',
      { i: { channelId, content: `bench ts=${ts.toFixed(3)} hello there` } },
      tokens[0],
    ).then(() => undefined);
  return measure({
    name: 'banter',
    pid: server.pid,
    alive: () => !server.exited(),
    open: { kind: 'banter', url: `ws://127.0.0.1:${port}/graphql`, tokens, query: QUERY },
    publish: send,
    after: async () =>
      (await get(port, '/metrics').catch(() => ''))
        .split('\n')
        .filter((l) =>
          /^banter_(events_delivered_total|ws_closes_total|ws_open_sockets|log_reads_total|log_writes_dispatched_total)/.test(
            l,
          ),
        )
        .join('; '),
  });
}

/** Users, one guild, everyone a member; tokens[0] owns it and publishes. */
async function setupBanter(server: BanterServer) {
  const ts = now();
  const tokens = await signup(server.port, USERS, 'fan', Number(env.BENCH_SIGNUP_CONCURRENCY ?? 8));
  const owner = tokens[0];
  const g = await gql(
    server.port,
    'mutation { createGuild(input: { name: "Fanout" }) { id channels { id } } }',
    {},
    owner,
  );
  const inv = await gql(
    server.port,
    'mutation($g: ID!) { createInvite(input: { guildId: $g }) { code } }',
    { g: g.createGuild.id },
    owner,
  );
  await pool(tokens.length - 1, 16, (i) =>
    gql(
      server.port,
      'mutation($c: String!) { joinGuild(code: $c) { id } }',
      { c: inv.createInvite.code },
      tokens[i + 1],
    ),
  );
  if (INVISIBLE) {
    await pool(tokens.length, 16, (i) =>
      gql(server.port, 'mutation { setPresence(status: INVISIBLE) }', {}, tokens[i]),
    );
  }
  console.log(
    `  banter: ${USERS} users signed up and joined${INVISIBLE ? ', INVISIBLE,' : ''} in ${fmt((now() - ts) / 1000)} s`,
  );
  return { tokens, channelId: g.createGuild.channels[0].id as string };
}

const cpuText = (c: PhaseCpu) =>
  `${fmt(c.cpuSeconds, 2)} s (clients ${fmt(c.clientCpuSeconds, 2)} s, rest of machine ${fmt(c.restCpuSeconds, 2)} s)`;

function show(r: Result) {
  const n = r.name.padEnd(7);
  if (r.sat) {
    const s = r.sat;
    console.log(
      `${n} saturated: ${fmt(s.deliveriesPerSec, 0)} deliveries/s, p50/p99 ${fmt(s.p50)}/${fmt(s.p99)} ms, ` +
        `cpu ${cpuText(s)}; ${s.published} published (${s.publishErrors} errors), ${s.delivered} delivered, ` +
        `${s.lost} missing on ${s.shortSockets} sockets (drain ${s.ended})`,
    );
  }
  const p = r.paced;
  console.log(
    `${n} paced 10/s: p50/p99 ${fmt(p.p50)}/${fmt(p.p99)} ms (per message, first delivery ${fmt(p.first[0])}/${fmt(p.first[1])}, ` +
      `last ${fmt(p.last[0])}/${fmt(p.last[1])}), cpu ${cpuText(p)}; ${p.published} published ` +
      `(${p.publishErrors} errors) to ${r.connect.ready} sockets: ${p.delivered} delivered, ${p.lost} lost on ${p.shortSockets} sockets` +
      `${p.extra ? `, ${p.extra} extra (${p.stale} sampled were published before the phase)` : ''} (drain ${p.ended})`,
  );
  console.log(
    `${n} idle: ${r.connect.ready}/${SOCKETS} subscribed, per socket RSS ${fmt(r.rssPerSocketKB)} KB, heap+external ${fmt(r.heapPerSocketKB)} KB; frame ${r.frameBytes} B; ` +
      `closes ${JSON.stringify(r.closes)}, errors ${JSON.stringify(r.errors)}, other events ${r.other}` +
      `${Object.keys(r.odd).length ? `, odd frames ${JSON.stringify(r.odd)}` : ''}`,
  );
  if (r.extra) console.log(`${n} metrics: ${r.extra}`);
  if (env.BENCH_VERBOSE) console.log(`${n} a message frame: ${r.frame}`);
}

async function main() {
  const deadline = setTimeout(() => {
    console.error(`fanout: gave up after ${TIMEOUT_SECONDS} s`);
    process.exit(2); // the exit hook in common.ts kills the server; its database stays (banter_fanout_*)
  }, TIMEOUT_SECONDS * 1000);
  deadline.unref();
  console.log(
    `fanout: ${SOCKETS} sockets in ${CLIENT_PROCS} client processes, ${USERS} users; ` +
      (SATURATED
        ? `${PUBLISHERS} publishers for ${SAT_SECONDS} s saturated, then `
        : 'capacity run (no saturated phase), ') +
      `${PACED_SECONDS} s at 10 messages/s`,
  );
  console.log(machineLine());
  const results: Result[] = [];
  if (TARGETS.includes('raw')) {
    // The shape and size of Banter's frame: global ids and cursors are base64url.
    const b64 = (s: string) => Buffer.from(s).toString('base64url');
    const author = { id: b64(`User:${randomUUID()}`), username: `fan${randomBytes(3).toString('hex')}_0` };
    let seq = 0;
    const raw = await runRaw((ts) =>
      JSON.stringify({
        id: '1',
        type: 'next',
        payload: {
          data: {
            events: {
              cursor: b64(`e1.${++seq}.${seq % 1000}`),
              message: {
                id: b64(`Message:${randomUUID()}`),
                content: `bench ts=${ts.toFixed(3)} hello there`,
                createdAt: new Date().toISOString(),
                author,
              },
            },
          },
        },
      }),
    );
    show(raw);
    results.push(raw);
  }
  if (TARGETS.includes('banter')) {
    const server = await startBanter('banter_fanout', {
      env: { ACCESS_TOKEN_TTL: '3600' },
      gcOnSignal: true,
    });
    try {
      const setup = await setupBanter(server);
      const b = await runBanter(server, setup.tokens, setup.channelId);
      show(b);
      results.push(b);
    } finally {
      await server.stop();
    }
  }
  const raw = results.find((r) => r.name === 'raw ws');
  const b = results.find((r) => r.name === 'banter');
  if (raw && b) {
    const cpuPer = (r: Result) => (r.sat ? r.sat.cpuSeconds / r.sat.delivered : Number.NaN);
    console.log(
      `ratios banter/raw: deliveries/s ${fmt((b.sat?.deliveriesPerSec ?? Number.NaN) / (raw.sat?.deliveriesPerSec ?? Number.NaN), 2)}, ` +
        `paced p99 ${fmt(b.paced.p99 / raw.paced.p99, 2)}x, RSS/socket ${fmt(b.rssPerSocketKB / raw.rssPerSocketKB, 2)}x, ` +
        `cpu per delivery ${fmt(cpuPer(b) / cpuPer(raw), 2)}x`,
    );
  }
  if (b) {
    const ok = (x: boolean) => (x ? 'met' : 'NOT met');
    const ratio = raw?.sat && b.sat ? b.sat.deliveriesPerSec / raw.sat.deliveriesPerSec : Number.NaN;
    console.log(
      `targets: deliveries/s >= 0.5 of raw: ${Number.isNaN(ratio) ? 'not measured' : ok(ratio >= 0.5)}; ` +
        `<= 12 KB/idle socket: ${ok(b.rssPerSocketKB <= 12)}; ` +
        `paced p99 < 25 ms at ${b.connect.ready} sockets: ${ok(b.paced.p99 < 25 && b.paced.lost === 0)}; ` +
        `${SOCKETS} sockets on one process: ${ok(b.connect.ready === SOCKETS && b.paced.lost === 0)}`,
    );
  }
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
