/**
 * The graphql-transport-ws protocol (graphql-ws's PROTOCOL.md) on `ws` sockets, written for
 * fan-out. graphql-ws's own server keeps several suspended async functions and promise chains per
 * subscription for as long as it lives; here a connection is one small object and an operation
 * one entry in its map, so an idle subscribed socket costs little more than the socket itself.
 * Results of hub subscriptions are written by the push path (shared-execution.ts) as `next`
 * frames; this file does the protocol: init and auth, ping/pong, subscribe, complete, errors, and
 * the close codes graphql-ws clients expect.
 *
 * Keep-alive is one timer for all sockets, pinging a slice of them per tick (a WebSocket ping; a
 * socket that has not answered the previous ping by the next one is terminated). Frames are
 * written without waiting for the kernel (the bound on `bufferedAmount` holds a slow consumer
 * back: it is closed and resumes by cursor).
 */
import type { IncomingMessage } from 'node:http';
import type { Socket } from 'node:net';
import type { GraphQLError } from 'graphql';
import { handleProtocols } from 'graphql-ws';
import type { WebSocket, WebSocketServer } from 'ws';
import { CloseCode } from '../../core/realtime/disconnect.ts';

export const PROTOCOL = 'graphql-transport-ws';

/**
 * How long a socket the server closes may take to send its peer the close frame, behind what it
 * had queued, before it is cut: with a freed slot, a user could otherwise hold another
 * `maxBufferedBytes` per new socket for `ws`'s 30 s.
 */
const CLOSE_GRACE_MS = 10_000;

/** graphql-ws's protocol close codes. */
export const ProtocolClose = {
  InternalServerError: 4500,
  BadRequest: 4400,
  Unauthorized: 4401,
  SubprotocolNotAcceptable: 4406,
  ConnectionInitialisationTimeout: 4408,
  SubscriberAlreadyExists: 4409,
  TooManyInitialisationRequests: 4429,
} as const;

/** A subscribe message's payload, checked for shape. */
export interface SubscribePayload {
  query: string;
  operationName?: string | null;
  variables?: Record<string, unknown> | null;
  extensions?: Record<string, unknown> | null;
}

/** A running operation: stopping it ends its stream and writes nothing more. */
export interface Running {
  stop(): void;
}

/** What an operation hands back to the protocol. */
export interface OperationSink {
  /** writes a `next` frame with this result; whether it was written (see nextEncoded) */
  next(result: unknown): boolean;
  /** the operation is over: writes `complete` unless the client ended it */
  complete(): void;
  /**
   * writes a `next` frame whose payload is this UTF-8 JSON: the bytes are copied, so one buffer
   * serves every subscriber of a shared result. Whether it was written: not for an operation
   * that ended, nor to a socket that is not open (closing: its client sent its close, which may
   * take up to 30 s to end) or that is cut off by it as a slow consumer.
   */
  nextEncoded(json: Buffer): boolean;
  readonly socket: WebSocket;
}

/**
 * One operation of a connection, from its subscribe until it ends (the client completes it, the
 * server completes it, or the socket closes). Its identity is what the sink and the setup check:
 * an id the client completed and then reused names a new Operation, which the old one's late
 * setup, frames or error must not touch.
 */
export class Operation {
  /** what stops it, once set up */
  running: Running | undefined;
  /** it ended: nothing more is written for it */
  ended = false;
}

export interface Connection {
  readonly socket: WebSocket;
  readonly ip: string;
  /** set by the server's onConnect (or its first subscribe) */
  viewer?: import('../../core/deps.ts').Viewer;
  /** operations by id, from their subscribe (still being set up or running) until they end */
  readonly operations: Map<string, Operation>;
  /** the socket's close event has run (onClose was called): nothing is to be registered for it */
  readonly closed: boolean;
}

export interface ProtocolHandlers {
  /** connection_init: true acknowledges; false closes 4403 (unless the handler closed already) */
  onConnect(conn: Connection, payload: Record<string, unknown>): Promise<boolean>;
  /**
   * subscribe: starts the operation (or returns errors, sent as an `error` message). It must not
   * write to `sink` after `stop()`. Called as the subscribe is read, its operation (and those
   * before it, not those after) in `conn.operations`.
   */
  onSubscribe(
    conn: Connection,
    id: string,
    payload: SubscribePayload,
    sink: OperationSink,
  ): Promise<Running | readonly GraphQLError[]>;
  /**
   * the socket closed (any reason): `code`, the one its close frame carried, and `byClient`,
   * whether the client began it (its close frame, or the connection lost: 1006) rather than the
   * server (a close of its own, or a frame `ws` refused)
   */
  onClose(conn: Connection, code: number, byClient: boolean): void;
}

export interface ProtocolOptions {
  keepAliveMs: number;
  maxBufferedBytes: number;
  /** ms a socket may take to send connection_init. Default 10 s. */
  connectionInitWaitTimeout?: number;
  /** A socket's address from its upgrade request (default: the peer's). */
  ipOf?: (req: IncomingMessage) => string;
}

/**
 * Writes one text frame without waiting for it to be flushed. Not to a socket whose unsent bytes
 * pass `maxBufferedBytes`: true then, for the caller to close it as a slow consumer (its client
 * resumes by cursor).
 *
 * `data` is text for `ws` to frame, or a frame already built (nextFrame): that one goes to the
 * TCP socket directly, where `ws` itself writes straight through (no extension, as this server
 * offers no compression, and nothing queued in its sender); elsewhere `ws` frames it again.
 */
export function sendFrame(socket: WebSocket, data: string | Buffer, maxBufferedBytes: number): boolean {
  if (socket.readyState !== socket.OPEN) return false;
  if (socket.bufferedAmount > maxBufferedBytes) return true;
  if (typeof data === 'string') socket.send(data);
  else {
    const tcp = writesThrough(socket);
    if (tcp) tcp.write(data);
    else socket.send(unframe(data));
  }
  return false;
}

/**
 * One final, unmasked text frame (RFC 6455 5.2) holding `prefix`, `payload` and a closing brace,
 * as one buffer (a `next` message around a shared result): one copy of each and one write, where
 * `ws` would encode the string for every socket again and write header and payload as two pieces.
 */
export function nextFrame(prefix: Buffer, payload: Buffer): Buffer {
  const n = prefix.length + payload.length + 1;
  const frame = allocFrame(n);
  const at = frame.length - n;
  frame.set(prefix, at);
  frame.set(payload, at + prefix.length);
  frame[frame.length - 1] = 0x7d; // }
  return frame;
}

/** A buffer for a final text frame of `n` payload bytes, its header written. */
function allocFrame(n: number): Buffer {
  const head = n < 126 ? 2 : n < 65536 ? 4 : 10;
  const frame = Buffer.allocUnsafe(head + n);
  frame[0] = 0x81; // FIN, text
  if (head === 2) frame[1] = n;
  else if (head === 4) {
    frame[1] = 126;
    frame.writeUInt16BE(n, 2);
  } else {
    frame[1] = 127;
    frame.writeUInt32BE(Math.floor(n / 2 ** 32), 2);
    frame.writeUInt32BE(n >>> 0, 6);
  }
  return frame;
}

/** On a socket: the turn (corkedWriter's count) in which a frame was last written to it. */
const WROTE_IN = Symbol('banter.wroteIn');

/**
 * sendFrame, with writes held (corked) until the current turn of the event loop has run (its
 * synchronous work and the ticks it queued) once a turn writes a second frame to any socket: the
 * frames written to one socket in that time, a batch of events say, then leave in one system call
 * instead of one each (the kernel's part of a write is most of the cost of fan-out). A turn that
 * writes one frame per socket, an event fanned out alone (paced traffic), writes each at once, the
 * first subscribers' frames on their way while the rest are built, where holding every frame wrote
 * none before all were built (~4 µs each: the first of 1,000 sockets got its frame ~4 ms late).
 * The dispatch gives a socket its rows one after another, so in a batch only the first socket's
 * first frame goes alone. `ws` writes each frame with cork/uncork of its own, which nests.
 */
function corkedWriter(maxBufferedBytes: number) {
  // The sockets held this turn: a list reused from turn to turn (a Set emptied each turn was
  // rebuilt for every event fanned out). A socket is listed when it is corked, once per cork.
  const held: (Socket | undefined)[] = [];
  let n = 0;
  let turn = 0;
  let ending = false;
  /** a socket got a second frame this turn: every write is held until it ends */
  let batching = false;
  const release = () => {
    ending = false;
    batching = false;
    turn++;
    const count = n;
    n = 0;
    for (let i = 0; i < count; i++) {
      const s = held[i]!;
      held[i] = undefined;
      s.uncork();
    }
    // A turn that held very many sockets does not keep the list that long.
    if (held.length > 65_536) held.length = 0;
  };
  return (ws: WebSocket, data: string | Buffer) => {
    const s = (ws as unknown as { _socket?: Socket & { [WROTE_IN]?: number } })._socket;
    if (!ending) {
      ending = true;
      process.nextTick(release);
    }
    if (s) {
      if (s[WROTE_IN] !== turn) s[WROTE_IN] = turn;
      else batching = true;
      // A socket with HOLD_BYTES unsent already is not held: its writes wait for the kernel anyway.
      if (batching && !s.writableCorked && s.writableLength < HOLD_BYTES) {
        s.cork();
        held[n++] = s;
      }
    }
    const cut = sendFrame(ws, data, maxBufferedBytes);
    // Held frames go at once when they add up (a long replay in one turn); the uncork at the
    // end of the turn then does nothing.
    if (s?.writableCorked && s.writableLength >= HOLD_BYTES) s.uncork();
    return cut;
  };
}

/**
 * The TCP socket under `ws` when `ws` writes its frames straight to it, in call order (ours may
 * then go beside them); undefined otherwise.
 */
function writesThrough(ws: WebSocket): Socket | undefined {
  const w = ws as unknown as { _socket?: Socket; _sender?: { _state?: number; _queue?: unknown[] } };
  const plain = ws.extensions === '' && w._sender?._state === 0 && !w._sender._queue?.length;
  return plain ? w._socket : undefined;
}

/** A built frame's payload, as text. */
function unframe(frame: Buffer): string {
  const len = frame[1] & 0x7f;
  return frame.toString('utf8', len < 126 ? 2 : len === 126 ? 4 : 10);
}

const HOLD_BYTES = 64 * 1024;

/**
 * The close code ws sent for a frame it refused: its receiver's errors carry it under a symbol of
 * ws's own (`kStatusCode`, not exported). Undefined for any other error (a reset connection).
 */
function refusedWith(err: Error): number | undefined {
  const key = Object.getOwnPropertySymbols(err).find((k) => k.description === 'status-code');
  const code = key && (err as unknown as Record<symbol, unknown>)[key];
  return typeof code === 'number' ? code : undefined;
}

const isObject = (x: unknown): x is Record<string, unknown> =>
  typeof x === 'object' && x !== null && !Array.isArray(x);
const optional = (x: unknown, type: 'string' | 'object') =>
  x === undefined || x === null || (type === 'object' ? isObject(x) : typeof x === type);

class Conn implements Connection {
  viewer?: Connection['viewer'];
  readonly operations = new Map<string, Operation>();
  closed = false;
  initReceived = false;
  acknowledged = false;
  initTimer: NodeJS.Timeout | undefined;
  alive = true;
  /** its keep-alive slice */
  slice: Set<Conn> | undefined;

  constructor(
    readonly socket: WebSocket,
    readonly ip: string,
  ) {}
}

/** Ticks per keep-alive interval: each pings its share of the sockets (see keepAliveSweep). */
const SWEEP_TICK_MS = 250;
const MAX_SWEEP_SLICES = 48;

/**
 * Keep-alive: every socket is pinged once per `intervalMs`, and one that has not answered the
 * previous ping by then is terminated. The sockets are dealt into slices visited one per tick,
 * so the pings (and the pongs they bring back) are spread over the interval: pinging every
 * socket at once held the event loop for ~12 ms per 1,000 sockets (one write each), and every
 * event being fanned out then waited for it.
 */
function keepAliveSweep(intervalMs: number) {
  const n = Math.max(1, Math.min(MAX_SWEEP_SLICES, Math.floor(intervalMs / SWEEP_TICK_MS)));
  const slices = Array.from({ length: n }, () => new Set<Conn>());
  let visit = 0;
  const timer = setInterval(() => {
    const slice = slices[visit];
    visit = (visit + 1) % n;
    for (const c of slice) {
      if (!c.alive) {
        c.socket.terminate();
        continue;
      }
      c.alive = false;
      if (c.socket.readyState === c.socket.OPEN) c.socket.ping();
    }
  }, intervalMs / n);
  timer.unref();
  return {
    add(c: Conn) {
      // Into the smallest slice, so the slices stay even as sockets come and go.
      let slice = slices[0];
      for (const x of slices) if (x.size < slice.size) slice = x;
      c.slice = slice;
      slice.add(c);
    },
    delete(c: Conn) {
      c.slice?.delete(c);
    },
    *all() {
      for (const slice of slices) yield* slice;
    },
    stop() {
      clearInterval(timer);
    },
  };
}

export function serveProtocol(wss: WebSocketServer, handlers: ProtocolHandlers, o: ProtocolOptions) {
  wss.options.handleProtocols = handleProtocols;
  const initWait = o.connectionInitWaitTimeout ?? 10_000;
  const keepAlive = keepAliveSweep(o.keepAliveMs);

  const write = corkedWriter(o.maxBufferedBytes);
  /** Writes a frame; whether it was written (sendFrame writes nothing to a socket not open). */
  const send = (c: Conn, data: string | Buffer): boolean => {
    const open = c.socket.readyState === c.socket.OPEN;
    if (write(c.socket, data)) {
      close(c, CloseCode.SlowConsumer, 'Slow consumer: resume from your last cursor');
      return false;
    }
    return open;
  };
  const close = (c: Conn, code: number, reason: string) => {
    const s = c.socket;
    if (s.readyState === s.OPEN || s.readyState === s.CONNECTING) {
      s.close(code, reason);
      setTimeout(() => s.readyState === s.CLOSED || s.terminate(), CLOSE_GRACE_MS).unref();
    }
    release(c, code, false);
  };
  /** Each socket's connection, for closes decided by the server (closeSocket). */
  const conns = new WeakMap<WebSocket, Conn>();

  /**
   * The connection is over for the server once the server begins to close it, or `ws` reports it
   * closed (a close the client began is seen only then): its operations stop and its handlers'
   * onClose runs (the user's socket slot, presence), then and only once.
   * A close of ours waits for the bytes queued ahead of its frame: for a slow consumer, up to
   * `maxBufferedBytes`, which `ws` would hold for 30 s before giving up; nothing else of the
   * socket is held meanwhile, and after CLOSE_GRACE_MS it is cut (the client sees 1006 and
   * resumes as it would from the close code). A message that arrives after it is ignored.
   */
  const release = (c: Conn, code: number, byClient: boolean) => {
    if (c.closed) return;
    c.closed = true;
    keepAlive.delete(c);
    if (c.initTimer) clearTimeout(c.initTimer);
    const ops = [...c.operations.values()];
    c.operations.clear();
    for (const op of ops) {
      op.ended = true;
      op.running?.stop();
    }
    handlers.onClose(c, code, byClient);
  };

  /** Ends `op`: out of its connection's map (if its id still names it), nothing more written. */
  const end = (c: Conn, id: string, op: Operation) => {
    op.ended = true;
    if (c.operations.get(id) === op) c.operations.delete(id);
  };

  /** Writes for one operation, and only while it has not ended (the client may reuse its id). */
  class Sink implements OperationSink {
    /** `{"id":…,"type":"next","payload":` as UTF-8, made at the first shared result */
    private prefix: Buffer | undefined;
    constructor(
      private c: Conn,
      private id: string,
      private op: Operation,
    ) {}
    get socket() {
      return this.c.socket;
    }
    nextEncoded(json: Buffer) {
      if (this.op.ended) return false;
      this.prefix ??= Buffer.from(JSON.stringify({ id: this.id, type: 'next', payload: 0 }).slice(0, -2));
      return send(this.c, nextFrame(this.prefix, json));
    }
    next(result: unknown) {
      if (this.op.ended) return false;
      return this.nextEncoded(Buffer.from(JSON.stringify(result)));
    }
    complete() {
      // Ended by the server: tell the client, unless it ended the operation itself.
      if (this.op.ended) return;
      end(this.c, this.id, this.op);
      send(this.c, JSON.stringify({ id: this.id, type: 'complete' }));
    }
  }

  async function subscribe(c: Conn, id: string, op: Operation, payload: SubscribePayload) {
    const r = await handlers.onSubscribe(c, id, payload, new Sink(c, id, op));
    if (!('stop' in r)) {
      if (!op.ended) {
        end(c, id, op);
        send(c, JSON.stringify({ id, type: 'error', payload: r }));
      }
      return;
    }
    // The client completed it (or the socket closed) while it was being set up.
    if (op.ended) r.stop();
    else op.running = r;
  }

  async function onMessage(c: Conn, raw: string) {
    let m: Record<string, unknown>;
    try {
      m = JSON.parse(raw);
      if (!isObject(m)) throw new Error('not an object');
    } catch {
      return close(c, ProtocolClose.BadRequest, 'Invalid message received');
    }
    switch (m.type) {
      case 'connection_init': {
        if (!optional(m.payload, 'object'))
          return close(c, ProtocolClose.BadRequest, 'Invalid message received');
        if (c.initReceived) {
          return close(c, ProtocolClose.TooManyInitialisationRequests, 'Too many initialisation requests');
        }
        c.initReceived = true;
        const ok = await handlers.onConnect(c, (m.payload as Record<string, unknown>) ?? {});
        if (c.initTimer) clearTimeout(c.initTimer);
        c.initTimer = undefined;
        if (c.socket.readyState !== c.socket.OPEN) return;
        if (!ok) return close(c, CloseCode.Forbidden, 'Forbidden');
        c.acknowledged = true;
        return send(c, '{"type":"connection_ack"}');
      }
      case 'ping':
        if (!optional(m.payload, 'object'))
          return close(c, ProtocolClose.BadRequest, 'Invalid message received');
        return send(c, '{"type":"pong"}');
      case 'pong':
        if (!optional(m.payload, 'object'))
          return close(c, ProtocolClose.BadRequest, 'Invalid message received');
        return;
      case 'subscribe': {
        const p = m.payload;
        if (
          typeof m.id !== 'string' ||
          !m.id ||
          !isObject(p) ||
          typeof p.query !== 'string' ||
          !optional(p.operationName, 'string') ||
          !optional(p.variables, 'object') ||
          !optional(p.extensions, 'object')
        ) {
          return close(c, ProtocolClose.BadRequest, 'Invalid message received');
        }
        if (!c.acknowledged) return close(c, ProtocolClose.Unauthorized, 'Unauthorized');
        if (c.operations.has(m.id)) {
          return close(c, ProtocolClose.SubscriberAlreadyExists, `Subscriber for ${m.id} already exists`);
        }
        const op = new Operation();
        c.operations.set(m.id, op);
        return subscribe(c, m.id, op, p as unknown as SubscribePayload);
      }
      case 'complete': {
        if (typeof m.id !== 'string' || !m.id)
          return close(c, ProtocolClose.BadRequest, 'Invalid message received');
        const op = c.operations.get(m.id);
        if (!op) return;
        end(c, m.id, op);
        op.running?.stop();
        return;
      }
      default:
        return close(c, ProtocolClose.BadRequest, `Unexpected message of type ${String(m.type)} received`);
    }
  }

  wss.on('connection', (socket: WebSocket, request: IncomingMessage) => {
    // Only the address is kept: the upgrade request (headers and all) is not held per socket.
    const c = new Conn(socket, o.ipOf ? o.ipOf(request) : (request.socket.remoteAddress ?? 'unknown'));
    keepAlive.add(c);
    socket.on('pong', () => {
      c.alive = true;
    });
    socket.once('error', (err) => {
      // A frame ws refused (too big, not UTF-8, bad framing): it sent its close frame with the
      // code, and the socket closes for that reason, not as a dead one (1006, once cut).
      const refused = refusedWith(err);
      if (refused !== undefined) release(c, refused, false);
      socket.terminate();
    });
    if (socket.protocol !== PROTOCOL) {
      close(c, ProtocolClose.SubprotocolNotAcceptable, 'Subprotocol not acceptable');
    } else {
      // 4408 is for a client that sent no connection_init in time. One that did, whose token is
      // still being checked (the database slow), is told to come back (1013), as when the check
      // fails for a reason of the server's: the socket holds nothing meanwhile either way.
      c.initTimer = setTimeout(() => {
        c.initTimer = undefined;
        if (c.acknowledged) return;
        if (c.initReceived)
          close(c, CloseCode.SlowConsumer, 'Try again later: the token could not be checked in time');
        else close(c, ProtocolClose.ConnectionInitialisationTimeout, 'Connection initialisation timeout');
      }, initWait);
    }
    socket.on('message', (data, isBinary) => {
      if (c.closed) return;
      onMessage(c, isBinary ? String(data) : data.toString()).catch(() =>
        close(c, ProtocolClose.InternalServerError, 'Internal server error'),
      );
    });
    // After a close of the server's (released then): a close the client began, or a lost one.
    socket.once('close', (code) => release(c, code, true));
    conns.set(socket, c);
  });

  return {
    /** Closes a socket for a reason of the server's (revocation, expiry, limits): see release. */
    closeSocket(socket: WebSocket, code: number, reason: string) {
      const c = conns.get(socket);
      if (c) close(c, code, reason);
    },
    /** Stops keep-alive and closes every socket with 1001. */
    dispose() {
      keepAlive.stop();
      for (const c of keepAlive.all()) close(c, CloseCode.GoingAway, 'Going away');
    },
  };
}
