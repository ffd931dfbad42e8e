/**
 * GraphQL over WebSocket (graphql-transport-ws) on the HTTP server's port and path. Auth is the
 * `connection_init` payload; the hub (core/realtime) does ordering, replay and permissions; this
 * file does sockets: limits, keep-alive, slow consumers, revocation, metrics.
 */
import { randomUUID } from 'node:crypto';
import type { IncomingMessage, Server } from 'node:http';
import type { Duplex } from 'node:stream';
import { type ExecutionArgs, GraphQLError, getOperationAST } from 'graphql';
import { decodeJwt } from 'jose';
import { type WebSocket, WebSocketServer } from 'ws';
import type { Deps, Viewer } from '../../core/deps.ts';
import { BanterError } from '../../core/errors.ts';
import { CloseCode, endedSessions, SESSION_CHECK_MS } from '../../core/realtime/disconnect.ts';
import type { Hub } from '../../core/realtime/hub.ts';
import { EventFailedError, SlowConsumerError } from '../../core/realtime/subscription.ts';
import { authenticate, forgetAllCachedSessions } from '../../core/services/auth.service.ts';
import type { Context } from '../../schema/builder.ts';
import { clientIp } from '../client-ip.ts';
import type { Logger } from '../logger.ts';
import { requestStore } from '../request-store.ts';
import { closeLabel, createRealtimeMetrics } from './metrics.ts';
import {
  type Connection,
  type OperationSink,
  type ProtocolHandlers,
  type Running,
  type SubscribePayload,
  serveProtocol,
} from './protocol.ts';
import { type DeliveryHooks, maskResult, startSubscription } from './shared-execution.ts';

export interface RealtimeLimits {
  /** Open sockets per user. Default 20. */
  socketsPerUser: number;
  /** Concurrent operations per socket. Default 50. */
  subscriptionsPerSocket: number;
  /**
   * New connections per IP per minute, as a steady rate (newConnectionFrom): up to this many at
   * once, then one each 60 s / this. Default 6000: every client behind one address (an office's
   * NAT, a proxy not named in TRUST_PROXY_HOPS) reconnects at once when its instance restarts, and
   * in a rolling deploy twice within the minute; at 120, all but 120 of them were refused, and a
   * graphql-ws client with its default settings gives up on a refused upgrade for good. Sockets
   * per user bound what one account holds; this bounds how fast one address can make the server
   * authenticate (6000 a minute is the per-IP budget of sendMessage too).
   */
  connectionsPerIpPerMinute: number;
  /** Outgoing bytes a socket may have queued before it is closed as a slow consumer. Default 4 MiB. */
  maxBufferedBytes: number;
  /** graphql-ws keep-alive ping interval in ms (a socket missing a pong for as long is dropped). Default 12 s. */
  keepAliveMs: number;
  /** How often sockets' sessions are re-checked for revocation, in ms. Default 10 s. */
  sessionCheckMs: number;
  /** ms a socket may take to send connection_init before it is closed with 4408. Default 10 s. */
  connectionInitWaitMs: number;
}

export const DEFAULT_LIMITS: RealtimeLimits = {
  socketsPerUser: 20,
  subscriptionsPerSocket: 50,
  connectionsPerIpPerMinute: 6000,
  maxBufferedBytes: 4 * 1024 * 1024,
  keepAliveMs: 12_000,
  sessionCheckMs: SESSION_CHECK_MS,
  connectionInitWaitMs: 10_000,
};

/** How long a socket refused by the per-IP connection rate may take to answer its close frame. */
const REFUSED_GRACE_MS = 2000;

/** The close reason (1013) when an event could not be executed or checked: not a slow consumer. */
const EVENT_FAILED_REASON = 'An event could not be delivered: resume from your last cursor';

/**
 * An upgrading socket's 'error' listener until ws has its own. A function of the module, not a
 * closure: one made in onUpgrade held onUpgrade's context, with the request in it, for the
 * socket's whole life.
 */
function destroyOnError(this: Duplex) {
  this.destroy();
}

/** retryAfter (s) for a subscribe refused at the sockets-per-user limit */
const SLOT_RETRY_S = 5;

/** A socket's authentication: true, or the close code and reason (and error code for a subscribe). */
type BindOutcome = true | { code: number; reason: string; error?: string };

export interface RealtimeServerOptions {
  server: Server;
  deps: Deps;
  hub: Hub;
  log: Logger;
  registry: import('prom-client').Registry;
  mask: (error: unknown, message: string) => Error;
  /** yoga's enveloped parse/validate/execute (armor limits and error masking apply) */
  getEnveloped: (ctx: Record<string, unknown>) => {
    parse: (source: string) => import('graphql').DocumentNode;
    validate: (
      schema: import('graphql').GraphQLSchema,
      doc: import('graphql').DocumentNode,
    ) => readonly GraphQLError[];
    execute: (args: ExecutionArgs) => unknown;
    schema: import('graphql').GraphQLSchema;
  };
  limits?: Partial<RealtimeLimits>;
  /** events sent elsewhere (SSE), counted into the same delivered metric */
  alsoDelivered?: { shared: number; own: number };
  /** TRUST_PROXY_HOPS: where a socket's address comes from (api/client-ip.ts). Default 0. */
  trustProxyHops?: number;
  /**
   * counts a subscription the socket starts in banter_graphql_operations_total (its queries and
   * mutations are counted by yoga's onExecute hooks, through getEnveloped's execute)
   */
  countOperation?: (op: import('graphql').OperationDefinitionNode) => void;
  /** the user's open SSE streams (api/realtime/sse.ts): they count toward socketsPerUser */
  streamsOf?: (userId: string) => number;
  /** SSE streams open and ended, for the metrics (api/realtime/sse.ts) */
  sseStreams?: { open(): number; ends: Record<string, number> };
}

/**
 * A new connection (a socket, or an SSE stream) from `ip`, at the per-address rate
 * (WS_CONNECTIONS_PER_IP_PER_MINUTE): one count for both. Allowed when rate limits are off,
 * and when the count cannot be read (Redis away): a limit, not a reason to refuse everyone.
 * A steady rate (smooth), not a fixed minute: a reconnect wave past the limit is let in at the
 * limit's pace (one each 10 ms at 6000), refused connections taking nothing. With a fixed window,
 * an address past it was refused everything until the minute ended, up to 60 s, and graphql-ws's
 * client, with its default 5 retries (31 to 46 s of backoff), gave up for good meanwhile.
 */
export async function newConnectionFrom(
  deps: Pick<Deps, 'rateLimiter' | 'rateLimitsEnabled'>,
  ip: string,
  perMinute: number,
): Promise<{ ok: boolean; retryAfter: number }> {
  if (!deps.rateLimitsEnabled) return { ok: true, retryAfter: 0 };
  return deps.rateLimiter
    .hit(`ws:ip:${ip}`, { limit: perMinute, windowSeconds: 60, smooth: true })
    .catch(() => ({ ok: true, retryAfter: 0 }));
}

/**
 * The socket's mask: `o.mask`, without yoga's `http` extension (the status it gives its HTTP
 * response), which yoga leaves out of the results it writes: a client sees the same extensions
 * on both transports.
 */
function socketMask(mask: RealtimeServerOptions['mask']): RealtimeServerOptions['mask'] {
  return (error, message) => {
    const e = mask(error, message);
    if (!(e instanceof GraphQLError) || e.extensions.http === undefined) return e;
    const { http: _, ...extensions } = e.extensions;
    return new GraphQLError(e.message, {
      nodes: e.nodes,
      source: e.source,
      positions: e.positions,
      path: e.path,
      extensions,
    });
  };
}

export function attachRealtime(options: RealtimeServerOptions) {
  const o = { ...options, mask: socketMask(options.mask) };
  const limits = { ...DEFAULT_LIMITS, ...o.limits };
  const ipOf = (req: IncomingMessage) => clientIp(req, o.trustProxyHops ?? 0);
  const wss = new WebSocketServer({ noServer: true, maxPayload: 256 * 1024 });
  /**
   * Sockets refused by the per-IP rate, upgraded only to be closed with 4029: apart from wss, so
   * they are not counted as open sockets while their close is answered; a close frame is all they
   * may send.
   */
  const refusals = new WebSocketServer({ noServer: true, maxPayload: 125 });
  const byUser = new Map<string, Set<WebSocket>>();
  const viewerOf = new Map<WebSocket, Viewer>();
  const presenceConn = new Map<WebSocket, string>();
  /** events sent, counted here and read by the metrics scrape (no label lookup per delivery) */
  const delivered = { shared: 0, own: 0 };
  const metrics = createRealtimeMetrics(o.registry, {
    sockets: () => wss.clients.size,
    subscriptions: () => o.hub.subscriberCount,
    delivered: () => {
      const also = o.alsoDelivered;
      return also ? { shared: delivered.shared + also.shared, own: delivered.own + also.own } : delivered;
    },
    sse: o.sseStreams,
    prune: () => o.hub.pruneStatus,
  });

  o.hub.observe({
    replayed: (n) => metrics.replay.observe(n),
    read: (via) => metrics.reads.inc({ via }),
    fromWrite: () => metrics.fromWrites.inc(),
  });

  function close(socket: WebSocket, code: number, reason: string) {
    protocol.closeSocket(socket, code, reason);
  }

  /**
   * Each socket's authentication, once started (at connection_init, or by the first subscribe of
   * an anonymous socket): the token and its outcome. A socket has one viewer: a second subscribe
   * racing the first one's authentication waits for it instead of authenticating again.
   */
  const bindings = new WeakMap<Connection, { token: string | undefined; outcome: Promise<BindOutcome> }>();

  /**
   * Authenticates a socket's viewer from an `authorization` value; true, or why not. The same token
   * again shares the first outcome. Once the socket is authenticated, another token (a client that
   * sends its headers with every operation, refreshed meanwhile) is accepted when it is the same
   * user's, and refused when it is another's or no valid token (a socket has one viewer: open
   * another socket for another user); the socket keeps the expiry of the token it began with.
   */
  function bindViewer(conn: Connection, raw: unknown): Promise<BindOutcome> {
    // Trimmed as an HTTP header's value is: a token read from a file with its newline, or pasted
    // into GraphiQL's headers with a space, works there and so here.
    const m = typeof raw === 'string' ? /^Bearer\s+(\S+)$/i.exec(raw.trim()) : null;
    const token = m?.[1];
    const current = bindings.get(conn);
    if (current) {
      if (current.token === token) return current.outcome;
      return current.outcome.then((first) => (first === true ? sameViewer(conn, token) : first));
    }
    const outcome = bind(conn, token);
    const entry = { token, outcome };
    bindings.set(conn, entry);
    // A failed authentication may be tried again (an anonymous socket's next subscribe).
    void outcome.then((r) => {
      if (r !== true && bindings.get(conn) === entry) bindings.delete(conn);
    });
    return outcome;
  }

  const otherToken = {
    code: CloseCode.Forbidden,
    reason: "This socket is authenticated as another user: open a new socket for this token's user.",
    error: 'BAD_USER_INPUT',
  };

  /**
   * The token could not be checked for a reason of the server's (the database away): nothing is
   * wrong with it, and 4401 (UNAUTHENTICATED to a subscribe) would send the client to sign in
   * again. It reconnects (subscribes) later instead.
   */
  const tryAgain = {
    code: CloseCode.SlowConsumer,
    reason: 'Try again later: the token could not be checked',
    error: 'INTERNAL_SERVER_ERROR',
  };

  /** A further token on an authenticated socket: fine when it is a valid token of the same user. */
  async function sameViewer(conn: Connection, token: string | undefined): Promise<BindOutcome> {
    if (!token) return otherToken;
    let viewer: Viewer | undefined;
    try {
      viewer = await authenticate(o.deps, token);
    } catch (err) {
      if (!(err instanceof BanterError)) return tryAgain;
    }
    return viewer && viewer.userId === conn.viewer?.userId ? true : otherToken;
  }

  async function bind(conn: Connection, token: string | undefined): Promise<BindOutcome> {
    let viewer: Viewer;
    let exp: number | undefined;
    try {
      if (!token) throw new BanterError('UNAUTHENTICATED');
      viewer = await authenticate(o.deps, token);
      exp = decodeJwt(token).exp;
    } catch (err) {
      if (!(err instanceof BanterError)) {
        o.log.warn({ err }, 'websocket authentication failed');
        return tryAgain;
      }
      const revoked = /revoked/.test(err.message);
      return revoked
        ? { code: CloseCode.Forbidden, reason: 'Forbidden' }
        : { code: CloseCode.Unauthorized, reason: 'Unauthorized' };
    }
    // The socket closed while its token was checked (a client that lost its network, the init
    // timeout): its close handler has run already, so nothing may be registered for it now.
    if (conn.closed) return { code: CloseCode.GoingAway, reason: 'Socket closed' };
    const mine = byUser.get(viewer.userId) ?? new Set<WebSocket>();
    if (mine.size + (o.streamsOf?.(viewer.userId) ?? 0) >= limits.socketsPerUser) {
      return {
        code: CloseCode.TooManyConnections,
        reason: 'Too many sockets for this user',
        error: 'RATE_LIMITED',
      };
    }
    mine.add(conn.socket);
    byUser.set(viewer.userId, mine);
    viewerOf.set(conn.socket, viewer);
    expireAt(conn.socket, exp);
    conn.viewer = viewer;
    const id = await o.hub.presence.connected(viewer.userId).catch(() => '');
    // Closed meanwhile: forget() has run without this connection id, so it is released here.
    if (conn.closed) {
      if (id) o.hub.presence.disconnected(viewer.userId, id);
    } else presenceConn.set(conn.socket, id);
    return true;
  }

  const deliveryHooks: DeliveryHooks = {
    mask: o.mask,
    counts: delivered,
    onSourceError(err, out) {
      // A subscriber too far behind, or one whose event failed to execute: the whole socket goes
      // (nothing later may reach the client ahead of that event), its client resumes by cursor.
      if (err instanceof SlowConsumerError) {
        close(out.socket, CloseCode.SlowConsumer, 'Slow consumer: resume from your last cursor');
      } else if (err instanceof EventFailedError) {
        close(out.socket, CloseCode.SlowConsumer, EVENT_FAILED_REASON);
      }
    },
    onEventFailed(row, errors, outcome, reached) {
      o.log.error(
        {
          cursor: row.cursor,
          type: row.type,
          errors: errors.map((e) => e.message),
          // every subscriber it reached (the first LOGGED_REQUEST_IDS), by its operation's request id
          requestIds: reached.requestIds,
          subscribers: reached.count,
        },
        outcome === 'dropped'
          ? 'ephemeral event execution failed: dropped (never replayed), the stream goes on'
          : outcome === 'sent'
            ? 'event execution failed again and again: sent with its errors, the stream goes on'
            : 'event execution failed: its subscribers are closed with 1013 to resume from before it',
      );
    },
  };

  /**
   * An anonymous socket authenticates (a subscribe's token) within the time allowed for
   * connection_init, or it is closed as a bad token would be: it can do nothing, and would
   * otherwise hold its place for ever. Armed again when a valid token waits for a slot, or a token
   * could not be checked (tryAgain): closed then as it was refused, not told to sign in again.
   */
  const anonymousTimers = new WeakMap<Connection, NodeJS.Timeout>();
  type Close = { code: number; reason: string };
  const noToken = { code: CloseCode.Unauthorized, reason: 'Unauthorized: no token in time' };
  const slotFull = { code: CloseCode.TooManyConnections, reason: 'Too many sockets for this user' };
  /** How the deadline closes the socket: as its last token was refused (4401 by default). */
  const deadlineCloses = new WeakMap<Connection, Close>();
  function anonymousDeadline(conn: Connection, ms = limits.connectionInitWaitMs, as: Close = noToken) {
    clearTimeout(anonymousTimers.get(conn));
    deadlineCloses.set(conn, as);
    const timer = setTimeout(async () => {
      const outcome = await bindings.get(conn)?.outcome;
      if (conn.closed || conn.viewer || outcome === true) return;
      const c = deadlineCloses.get(conn) ?? noToken;
      close(conn.socket, c.code, c.reason);
    }, ms);
    timer.unref();
    anonymousTimers.set(conn, timer);
  }

  const handlers: ProtocolHandlers = {
    async onConnect(conn, payload) {
      const raw = payload.authorization ?? payload.Authorization;
      // No credentials at all: an anonymous socket (GraphiQL opens one with an empty payload); it
      // may authenticate with its first subscribe (extensions.headers.authorization). A token
      // that is present but bad still closes the socket (4401/4403).
      if (raw === undefined) {
        anonymousDeadline(conn);
        conn.socket.once('close', () => clearTimeout(anonymousTimers.get(conn)));
        return true;
      }
      const outcome = await bindViewer(conn, raw);
      if (outcome === true) return true;
      close(conn.socket, outcome.code, outcome.reason);
      return false;
    },
    async onSubscribe(conn, _id, payload, out) {
      // Counted as the subscribe arrives (the protocol calls this at once): its operation and those
      // before it are in the map. After the wait for the authentication below, so are the ones that
      // came in the same read, and every subscribe of a burst past the limit was refused.
      const overLimit = conn.operations.size > limits.subscriptionsPerSocket;
      const ext = payload.extensions as { headers?: Record<string, unknown> } | undefined;
      const raw = ext?.headers?.authorization ?? ext?.headers?.Authorization;
      // A token in the subscribe (GraphiQL's headers): it authenticates an anonymous socket, and
      // must be the one an authenticated socket used. Without one, a subscribe waits for an
      // authentication already under way.
      const outcome = raw !== undefined ? await bindViewer(conn, raw) : await bindings.get(conn)?.outcome;
      if (outcome !== undefined && outcome !== true) {
        // An anonymous socket's subscribe is refused, the socket kept (GraphiQL's tab stays usable):
        // at the sockets-per-user limit, RATE_LIMITED (close another socket of that user, or retry).
        const code = outcome.error ?? 'UNAUTHENTICATED';
        const extensions = code === 'RATE_LIMITED' ? { code, retryAfter: SLOT_RETRY_S } : { code };
        // Its token was fine: it may wait for a slot, as long again after the retry it was told.
        // One that could not be checked may try again, and is closed to reconnect later (1013).
        if (!conn.viewer && !conn.closed) {
          if (code === 'RATE_LIMITED')
            anonymousDeadline(conn, SLOT_RETRY_S * 1000 + limits.connectionInitWaitMs, slotFull);
          else if (outcome === tryAgain) anonymousDeadline(conn, limits.connectionInitWaitMs, tryAgain);
          // A token refused for itself: the deadline (not moved) closes as for a bad token.
          else deadlineCloses.set(conn, noToken);
        }
        return [new GraphQLError(outcome.reason, { extensions })];
      }
      if (!conn.viewer) {
        return [new GraphQLError('Unauthorized', { extensions: { code: 'UNAUTHENTICATED' } })];
      }
      if (overLimit) {
        return [
          new GraphQLError(`At most ${limits.subscriptionsPerSocket} operations per socket.`, {
            extensions: { code: 'RATE_LIMITED', retryAfter: 1 },
          }),
        ];
      }
      // Run as an HTTP request is, in a store of its own: its log lines and a masked error carry
      // its id (the socket's had none, in the error or the log).
      const requestId = randomUUID();
      return requestStore.run({ requestId }, () => operate(conn, payload, out, requestId));
    },
    onClose(conn, code, byClient) {
      metrics.closes.inc({ code: closeLabel(code, byClient) });
      forget(conn.socket);
    },
  };

  /** A subscribe's operation once its socket is authenticated: parsed, validated and started. */
  async function operate(
    conn: Connection,
    payload: SubscribePayload,
    out: OperationSink,
    requestId: string,
  ): Promise<Running | readonly GraphQLError[]> {
    const env = o.getEnveloped({ ip: conn.ip });
    let document: import('graphql').DocumentNode;
    try {
      document = env.parse(payload.query);
    } catch (err) {
      return [maskError(err)];
    }
    // Picked as yoga picks it over HTTP, once parsed and before validation: several operations and
    // no (or an unknown) operationName, an anonymous one beside others, none at all. Validated
    // first, the last two were validation errors here and OPERATION_RESOLUTION_FAILURE there.
    // Through the mask, as every error answered here: it counts it in the errors metric by its code,
    // as yoga's mask does for HTTP (it was answered as it was, and not counted).
    const op = getOperationAST(document, payload.operationName);
    if (!op) {
      return [
        maskError(
          new GraphQLError('Could not determine what operation to execute.', {
            extensions: { code: 'OPERATION_RESOLUTION_FAILURE' },
          }),
        ),
      ];
    }
    // A rule that throws (graphql-js's own did, on a variable in a subscription's root
    // directives) answers its error, as yoga does over HTTP, not a 4500 close of the socket.
    let errors: readonly GraphQLError[];
    try {
      errors = env.validate(env.schema, document);
    } catch (err) {
      return [maskError(err)];
    }
    if (errors.length) return errors.map(maskError);
    const args: ExecutionArgs = {
      schema: env.schema,
      document,
      operationName: op.name?.value ?? payload.operationName,
      variableValues: payload.variables,
      contextValue: {
        deps: o.deps,
        viewer: conn.viewer ?? null,
        requestId,
        ip: conn.ip,
      } satisfies Context,
    };
    if (op.operation !== 'subscription') {
      // Queries and mutations over the socket: one result, then complete.
      const r = (await env.execute(args)) as import('graphql').ExecutionResult;
      out.next(maskResult(r, o.mask));
      out.complete();
      return { stop() {} };
    }
    // Counted as it begins, as yoga counts an SSE subscription (its onSubscribe hook).
    o.countOperation?.(op);
    try {
      return await startSubscription(args, deliveryHooks, out);
    } catch (err) {
      return [maskError(err)];
    }
  }

  function maskError(err: unknown): GraphQLError {
    return o.mask(err, 'Unexpected error.') as GraphQLError;
  }

  // A socket lives no longer than the token it authenticated with: at expiry it is closed with
  // 4401 so the client refreshes its session and resumes by cursor. Sockets are kept in buckets by
  // expiry second, swept once a second (one timer, not one per socket).
  const expiring = new Map<number, Set<WebSocket>>();
  const expiryOf = new WeakMap<WebSocket, number>();
  function expireAt(socket: WebSocket, exp: number | undefined) {
    if (exp === undefined) return;
    let set = expiring.get(exp);
    if (!set) {
      set = new Set();
      expiring.set(exp, set);
    }
    set.add(socket);
    expiryOf.set(socket, exp);
  }
  const expiryTimer = setInterval(() => {
    const now = Date.now() / 1000;
    for (const [exp, set] of expiring) {
      if (exp > now) continue;
      expiring.delete(exp);
      for (const s of set) close(s, CloseCode.Unauthorized, 'Access token expired');
    }
  }, 1000);
  expiryTimer.unref();

  function forget(socket: WebSocket) {
    const exp = expiryOf.get(socket);
    if (exp !== undefined) {
      const set = expiring.get(exp);
      set?.delete(socket);
      if (set && !set.size) expiring.delete(exp);
    }
    const v = viewerOf.get(socket);
    viewerOf.delete(socket);
    const conn = presenceConn.get(socket);
    presenceConn.delete(socket);
    if (v && conn) o.hub.presence.disconnected(v.userId, conn);
    if (v) {
      const set = byUser.get(v.userId);
      set?.delete(socket);
      if (set && !set.size) byUser.delete(v.userId);
    }
  }

  const protocol = serveProtocol(wss, handlers, {
    ipOf,
    keepAliveMs: limits.keepAliveMs,
    maxBufferedBytes: limits.maxBufferedBytes,
    connectionInitWaitTimeout: limits.connectionInitWaitMs,
  });

  /**
   * Per-IP connection rate, checked before anything else. A connection over it is upgraded and
   * closed at once with 4029, the seconds to wait in the reason: an HTTP 429 reaches a browser's
   * WebSocket as a bare error (no status, no Retry-After), and graphql-ws's client, by default,
   * gives up on an error for good where it retries a close, with its backoff. The refused socket
   * is cut if its client has not answered the close within REFUSED_GRACE_MS.
   */
  async function onUpgrade(req: IncomingMessage, socket: Duplex, head: Buffer) {
    // Node's HTTP server takes its 'error' listener off a socket it hands over, and ws adds its
    // own only in handleUpgrade: a reset while the rate is checked (in Redis) would otherwise be
    // an unhandled 'error' event, and end the process. Taken off once ws has its own.
    socket.on('error', destroyOnError);
    const path = (req.url ?? '/').split('?')[0];
    if (path !== '/graphql') {
      socket.end('HTTP/1.1 404 Not Found\r\nConnection: close\r\nContent-Length: 0\r\n\r\n');
      return;
    }
    const ip = ipOf(req);
    const r = await newConnectionFrom(o.deps, ip, limits.connectionsPerIpPerMinute);
    if (!r.ok) {
      // Counted under the code its client sees, as every close is (it was '429', from when the
      // upgrade was refused with an HTTP 429: a code no socket is closed with).
      metrics.closes.inc({ code: String(CloseCode.TooManyConnections) });
      refusals.handleUpgrade(req, socket, head, (ws) => {
        socket.off('error', destroyOnError);
        // It never reaches the protocol's handler, which listens for errors: a bad frame from
        // its client would otherwise be an unhandled 'error' event, and end the process.
        ws.on('error', () => ws.terminate());
        ws.close(
          CloseCode.TooManyConnections,
          `Too many connections from this address: try again in ${r.retryAfter} s`,
        );
        setTimeout(() => ws.terminate(), REFUSED_GRACE_MS).unref();
      });
      return;
    }
    wss.handleUpgrade(req, socket, head, (ws) => {
      socket.off('error', destroyOnError);
      wss.emit('connection', ws, req);
    });
  }
  const upgradeListener = (req: IncomingMessage, socket: Duplex, head: Buffer) => {
    onUpgrade(req, socket, head).catch((err) => {
      o.log.warn({ err }, 'websocket upgrade failed');
      socket.destroy();
    });
  };
  o.server.on('upgrade', upgradeListener);

  // Revocation and deactivation: sockets of ended sessions are closed, here at once when told
  // over the bus, and within sessionCheckMs by a periodic check of every open session.
  const offDisconnect = o.hub.onDisconnect((d) => {
    // This instance may have the session cached as alive: a client reconnecting here must not get in.
    forgetAllCachedSessions();
    for (const s of byUser.get(d.userId) ?? []) {
      if (!d.sessionId || viewerOf.get(s)?.sessionId === d.sessionId) close(s, d.code, d.reason);
    }
  });
  const sessionTimer = setInterval(() => void checkSessions(), limits.sessionCheckMs);
  sessionTimer.unref();
  async function checkSessions() {
    const ids = [...new Set([...viewerOf.values()].map((v) => v.sessionId))];
    if (!ids.length) return;
    try {
      const dead = await endedSessions(o.deps.db, ids);
      for (const [s, v] of viewerOf)
        if (dead.has(v.sessionId)) close(s, CloseCode.Forbidden, 'Session ended');
    } catch (err) {
      o.log.warn({ err }, 'websocket session check failed');
    }
  }

  return {
    wss,
    /** the user's open (authenticated) sockets: its SSE streams count them toward the same limit */
    socketsOf: (userId: string) => byUser.get(userId)?.size ?? 0,
    get socketCount() {
      return wss.clients.size;
    },
    /** Closes every socket (1001) and stops accepting upgrades. */
    async close() {
      o.server.off('upgrade', upgradeListener);
      clearInterval(sessionTimer);
      clearInterval(expiryTimer);
      offDisconnect();
      protocol.dispose();
      for (const s of [...wss.clients, ...refusals.clients]) s.terminate();
      await new Promise<void>((r) => wss.close(() => r()));
      await new Promise<void>((r) => refusals.close(() => r()));
    },
  };
}
