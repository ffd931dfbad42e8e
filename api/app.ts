/**
 * The app factory: builds every client from the config and returns `{ start, stop }`. Nothing
 * creates a client at module top level; tests build as many apps as they like.
 */
import { randomUUID } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';
import { renderGraphiQL } from '@graphql-yoga/render-graphiql';
import { type DocumentNode, GraphQLError, getOperationAST } from 'graphql';
import { createYoga, type Plugin } from 'graphql-yoga';
import { Redis } from 'ioredis';
import { createDatabase, type Database } from '../core/db/client.ts';
import type { Deps } from '../core/deps.ts';
import { type Bus, createMemoryBus, createRedisBus } from '../core/ports/bus.ts';
import {
  createMemoryRateLimiter,
  createRedisRateLimiter,
  type RateLimiter,
} from '../core/ports/rate-limit.ts';
import { redisClientOptions } from '../core/ports/redis.ts';
import type { SearchEngine } from '../core/ports/search.ts';
import { createHub } from '../core/realtime/hub.ts';
import { createRedisPresence } from '../core/realtime/presence.ts';
import { createRedisThrottle } from '../core/realtime/typing.ts';
import { createPostgresSearch } from '../core/search/postgres.search.ts';
import type { Context } from '../schema/builder.ts';
import { buildSchema } from '../schema/index.ts';
import { armorPlugins } from './armor.ts';
import { clientIp } from './client-ip.ts';
import type { Config } from './config.ts';
import { createMaskError, parseFailedCode } from './errors.ts';
import { createLogger, type Logger } from './logger.ts';
import { createMetrics, type Metrics } from './metrics.ts';
import { attachRealtime } from './realtime/server.ts';
import { maskingOnce, sseSubscriptions } from './realtime/sse.ts';
import { requestStore } from './request-store.ts';

const pkg = JSON.parse(readFileSync(new URL('../package.json', import.meta.url), 'utf8')) as {
  version: string;
};

export interface App {
  config: Config;
  deps: Deps;
  log: Logger;
  metrics: Metrics;
  /** The shared Redis client (REDIS_URL set): tests look at its queues. */
  redis?: Redis;
  /** GraphQL over the Fetch API, in process (tests use it for queries and mutations). */
  fetch: (input: string, init?: RequestInit, serverContext?: { ip?: string }) => Promise<Response>;
  /** Applies migrations and listens; resolves to the bound port. */
  start(port?: number): Promise<number>;
  /** Stops accepting, finishes in-flight requests, closes every client. Idempotent. */
  stop(): Promise<void>;
}

export interface BuildOptions {
  logger?: Logger;
  /** PGlite only: the data directory to start from (DatabaseOptions.pgliteFrom; tests). */
  pgliteFrom?: Blob;
}

function httpError(status: number, message: string) {
  return new GraphQLError(message, { extensions: { http: { status }, code: 'BAD_USER_INPUT' } });
}

const bodyTooLarge = () => httpError(413, 'Request body is too large.');

/** How long a request waits on a Redis command before going on without it. */
const REDIS_COMMAND_TIMEOUT_MS = 500;
/**
 * How long a Redis connection may leave a command unanswered, hearing nothing at all, before it is
 * taken for dead and replaced. A peer gone silent without a reset (a network partition, a frozen
 * VM, a failover that left the old connection open) is otherwise kept for as long as TCP takes to
 * give up: forever when the path still acknowledges, ~15 min of retransmissions when it does not.
 * Meanwhile each command, though timed out for its caller, stays queued on it (memory grows with
 * traffic) and the bus's subscriber hears no other instance. Above any pause a healthy Redis makes.
 */
const REDIS_SOCKET_TIMEOUT_MS = 5_000;

/**
 * Connections the kernel holds for the server until it accepts them (Linux caps it at
 * net.core.somaxconn, 4096 by default). Node's 511 overflowed when 1,000 clients reconnected at
 * once to an instance busy replaying to the first of them: the kernel dropped 3,817 connection
 * attempts in one such storm (0 at 4096), each client then waiting out a SYN retry (1, 3, 7 s).
 */
const LISTEN_BACKLOG = 4096;

function withTimeout<T>(p: Promise<T>, ms: number, what: string): Promise<T> {
  return Promise.race([
    p,
    new Promise<T>((_, reject) =>
      setTimeout(() => reject(new Error(`${what} did not answer in ${ms} ms`)), ms).unref(),
    ),
  ]);
}

export async function buildApp(config: Config, opts: BuildOptions = {}): Promise<App> {
  const log = opts.logger ?? createLogger(config.logLevel);
  const database: Database = await createDatabase({
    url: config.databaseUrl,
    dataDir: config.dataDir,
    poolSize: config.databasePoolSize,
    queryTimeoutMs: config.databaseQueryTimeoutMs,
    pgliteFrom: opts.pgliteFrom,
  });
  // A command Redis has not answered within REDIS_COMMAND_TIMEOUT_MS fails (down, its offline
  // queue would hold it for seconds of reconnect backoff; paused or slow, for as long as that
  // lasts): what Redis carries falls back or is skipped rather than holding up the request.
  const redis = config.redisUrl
    ? new Redis(config.redisUrl, {
        ...redisClientOptions,
        lazyConnect: false,
        maxRetriesPerRequest: 2,
        enableOfflineQueue: true,
        commandTimeout: REDIS_COMMAND_TIMEOUT_MS,
        socketTimeout: REDIS_SOCKET_TIMEOUT_MS,
      })
    : undefined;
  redis?.on('error', (err) => log.warn({ err: err.message }, 'redis error'));
  // The bus needs its own subscriber connection: a subscribed one can do nothing else (on RESP2).
  // It waits on its SUBSCRIBE as long as it takes (nothing waits on it); it keeps socketTimeout,
  // which the bus's heartbeat PING arms.
  const bus: Bus = redis
    ? createRedisBus(redis, redis.duplicate({ commandTimeout: undefined }), config.redisPrefix)
    : createMemoryBus();
  const rateLimiter: RateLimiter = redis
    ? createRedisRateLimiter(redis, config.redisPrefix)
    : createMemoryRateLimiter();
  // No Typesense engine yet: with TYPESENSE_URL set the app still searches with Postgres FTS.
  const search: SearchEngine = createPostgresSearch(database.db);
  if (config.typesense) log.warn('TYPESENSE_URL is set but not supported yet: searching with Postgres');
  const features = [
    database.kind === 'postgres' ? 'database:postgres' : 'database:pglite',
    redis ? 'bus:redis' : 'bus:memory',
    config.typesense ? 'search:typesense' : 'search:postgres',
    config.s3 ? 'storage:s3' : 'storage:embedded',
  ];
  const deps: Deps = {
    database,
    db: database.db,
    bus,
    rateLimiter,
    rateLimitsEnabled: config.rateLimits,
    search,
    log,
    now: () => new Date(),
    settings: {
      jwtSecret: new TextEncoder().encode(config.jwtSecret),
      accessTokenTtl: config.accessTokenTtl,
      sessionTtlDays: config.sessionTtlDays,
      serverName: config.serverName,
      version: pkg.version,
      motd: config.motd,
      eventRetentionDays: config.eventRetentionDays,
      passwordHashCost: config.passwordHashCost,
      features,
    },
  };
  const metrics = createMetrics(database);
  const hub = createHub(deps, {
    presence: redis
      ? createRedisPresence(redis, config.redisPrefix, config.presenceConnectionTtlMs)
      : undefined,
    typingThrottle: redis ? createRedisThrottle(redis, config.redisPrefix) : undefined,
  });
  deps.realtime = hub;
  let realtime: ReturnType<typeof attachRealtime> | undefined;
  const { authenticate } = await import('../core/services/auth.service.ts');

  // The operation that runs: the first of the document was counted, whichever was named.
  const countRun = ({ args }: { args: { document: DocumentNode; operationName?: string | null } }) => {
    const op = getOperationAST(args.document, args.operationName);
    if (op) metrics.countOperation(op);
  };
  const observe: Plugin = {
    onExecute: countRun,
    // Subscriptions (SSE, app.fetch) are subscribed, not executed: they were not counted.
    onSubscribe: countRun,
    // RATE_LIMITED errors leave their wait in the request store (api/errors.ts); HTTP says it too.
    onResponse({ response }) {
      const retryAfter = requestStore.getStore()?.retryAfter;
      if (retryAfter) response.headers.set('retry-after', String(retryAfter));
    },
  };

  // Yoga's own body limit pipes every body through a TransformStream (a stream pipeline and an
  // aborted AbortController per request: ~5% of a send's CPU). A declared Content-Length is
  // enforced by Node's HTTP parser (handle() caps it and refuses chunked bodies without one).
  const bodyLimit: Plugin = {
    onRequestParse({ request }) {
      const declared = request.headers.get('content-length');
      if (declared !== null) {
        if (!/^\d+$/.test(declared)) throw httpError(400, 'Content-Length header is invalid.');
        if (Number(declared) > config.maxBodyBytes) throw bodyTooLarge();
      }
    },
  };

  // Subscriptions over SSE mask their results before yoga does (api/realtime/sse.ts): one mask for
  // both, which leaves what it masked alone.
  const maskError = maskingOnce(createMaskError(log, metrics));
  // SSE streams count toward the socket's limits: per user (sockets and streams together; the
  // sockets are attached at start) and new ones per address.
  const sse = sseSubscriptions({
    mask: maskError,
    log,
    hub,
    db: deps.db,
    limits: {
      perUser: config.ws.socketsPerUser,
      perIpPerMinute: config.ws.connectionsPerIpPerMinute,
      socketsOf: (userId) => realtime?.socketsOf(userId) ?? 0,
      deps,
    },
  });

  const schema = buildSchema();
  // The HTTP server's yoga checks the declared length (bodyLimit); app.fetch's keeps yoga's own
  // streaming limit, as its callers' bodies declare none.
  const makeYoga = (http: boolean) =>
    createYoga<{ req?: IncomingMessage; ip?: string }, Context>({
      schema,
      graphqlEndpoint: '/graphql',
      landingPage: false,
      graphiql: config.graphiql ? { title: 'Banter GraphiQL', subscriptionsProtocol: 'WS' } : false,
      renderGraphiQL,
      batching: false,
      maxRequestBodySize: http ? false : undefined,
      logging: {
        debug: (...a) => log.debug({ yoga: a }),
        info: (...a) => log.info({ yoga: a }),
        warn: (...a) => log.warn({ yoga: a }),
        // Yoga logs every error its maskError replaced, a client's NOT_FOUND as much as a bug;
        // createMaskError has already logged the unexpected ones (with the stack and path).
        error: (...a) => (a[0] instanceof Error ? log.debug({ yoga: a }) : log.error({ yoga: a })),
      },
      maskedErrors: { maskError },
      plugins: [
        ...(http ? [bodyLimit] : []),
        ...armorPlugins({ production: config.nodeEnv === 'production' }),
        parseFailedCode,
        observe,
        sse.plugin,
      ],
      context: async ({ request, req, ip }): Promise<Context> => {
        const store = requestStore.getStore();
        const header = request.headers.get('authorization');
        let viewer: Context['viewer'] = null;
        if (header) {
          const m = /^Bearer\s+(\S+)$/i.exec(header);
          viewer = await authenticate(deps, m ? m[1] : '');
        }
        return {
          deps,
          viewer,
          requestId: store?.requestId ?? randomUUID(),
          ip: ip ?? (req ? clientIp(req, config.trustProxyHops) : 'unknown'),
        };
      },
    });
  const yoga = makeYoga(true);
  const inProcess = makeYoga(false);

  let inFlight = 0;
  let drained: (() => void) | undefined;
  let stopping = false;

  async function readiness(): Promise<{ ok: boolean; checks: Record<string, string> }> {
    const checks: Record<string, string> = {};
    const probes: [string, () => Promise<unknown>][] = [['database', () => database.ping()]];
    if (redis) probes.push(['redis', () => redis.ping()]);
    await Promise.all(
      probes.map(async ([name, fn]) => {
        try {
          await withTimeout(fn(), 2000, name);
          checks[name] = 'ok';
        } catch (err) {
          checks[name] = `down: ${(err as Error).message}`;
        }
      }),
    );
    return { ok: Object.values(checks).every((v) => v === 'ok'), checks };
  }

  async function handle(req: IncomingMessage, res: ServerResponse) {
    const started = process.hrtime.bigint();
    const requestId = (req.headers['x-request-id'] as string | undefined)?.slice(0, 64) || randomUUID();
    res.setHeader('x-request-id', requestId);
    const path = (req.url ?? '/').split('?')[0];
    const route = path === '/graphql' ? 'graphql' : path.startsWith('/admin') ? 'admin' : path;
    const store = { requestId } as { requestId: string; retryAfter?: number };
    res.on('finish', () => {
      const seconds = Number(process.hrtime.bigint() - started) / 1e9;
      const r = ['graphql', 'admin', '/healthz', '/readyz', '/metrics'].includes(route) ? route : 'other';
      metrics.requests.inc({ method: req.method ?? 'GET', route: r, status: String(res.statusCode) });
      metrics.latency.observe({ route: r }, seconds);
      log.debug(
        { requestId, method: req.method, path, status: res.statusCode, ms: seconds * 1000 },
        'request',
      );
    });
    if (path === '/healthz') {
      res.writeHead(200, { 'content-type': 'application/json' }).end('{"status":"ok"}');
      return;
    }
    if (path === '/readyz') {
      const r = await readiness();
      res
        .writeHead(r.ok && !stopping ? 200 : 503, { 'content-type': 'application/json' })
        .end(
          JSON.stringify({ status: r.ok && !stopping ? 'ready' : 'unavailable', stopping, checks: r.checks }),
        );
      return;
    }
    if (path === '/metrics') {
      res
        .writeHead(200, { 'content-type': metrics.registry.contentType })
        .end(await metrics.registry.metrics());
      return;
    }
    if (path !== '/graphql') {
      res.writeHead(404, { 'content-type': 'application/json' }).end('{"error":"not found"}');
      return;
    }
    const len = Number(req.headers['content-length'] ?? 0);
    if (len > config.maxBodyBytes) {
      res.writeHead(413, { 'content-type': 'application/json', connection: 'close' });
      res.end(
        JSON.stringify({
          errors: [
            {
              message: `Request body is larger than ${config.maxBodyBytes} bytes`,
              extensions: { code: 'BAD_USER_INPUT' },
            },
          ],
        }),
      );
      return;
    }
    if (req.method === 'POST' && req.headers['transfer-encoding'] && !req.headers['content-length']) {
      res.writeHead(411, { 'content-type': 'application/json' });
      res.end(
        JSON.stringify({
          errors: [{ message: 'Content-Length is required', extensions: { code: 'BAD_USER_INPUT' } }],
        }),
      );
      return;
    }
    inFlight++;
    try {
      // yoga writes the response itself (one write for a buffered body, no stream copy).
      await requestStore.run(store, () => yoga.requestListener(req, res));
    } finally {
      inFlight--;
      if (inFlight === 0 && drained) drained();
    }
  }

  let server: Server | undefined;
  let stopped: Promise<void> | undefined;

  const app: App = {
    config,
    deps,
    log,
    metrics,
    redis,
    fetch: (input, init, serverContext) =>
      requestStore.run({ requestId: randomUUID() }, async () => {
        const store = requestStore.getStore()!;
        const res = await inProcess.fetch(
          new URL(input, 'http://localhost'),
          init ?? {},
          serverContext ?? {},
        );
        if (store.retryAfter) res.headers.set('retry-after', String(store.retryAfter));
        return res;
      }),
    async start(port = config.port) {
      await database.migrate();
      server = createServer((req, res) => {
        handle(req, res).catch((err) => {
          log.error({ err }, 'request failed');
          if (!res.headersSent) res.writeHead(500).end();
          else res.end();
        });
      });
      server.keepAliveTimeout = 65_000;
      await hub.start();
      realtime = attachRealtime({
        server,
        deps,
        hub,
        log,
        registry: metrics.registry,
        mask: createMaskError(log, metrics),
        getEnveloped: yoga.getEnveloped as never,
        countOperation: metrics.countOperation,
        trustProxyHops: config.trustProxyHops,
        alsoDelivered: sse.counts,
        streamsOf: sse.streamsOf,
        sseStreams: sse.streams,
        limits: {
          socketsPerUser: config.ws.socketsPerUser,
          subscriptionsPerSocket: config.ws.operationsPerSocket,
          connectionsPerIpPerMinute: config.ws.connectionsPerIpPerMinute,
          connectionInitWaitMs: config.ws.initTimeoutMs,
          keepAliveMs: config.ws.keepAliveMs,
        },
      });
      await new Promise<void>((resolve, reject) => {
        server!.once('error', reject);
        server!.listen({ port, backlog: LISTEN_BACKLOG }, () => resolve());
      });
      const bound = (server.address() as AddressInfo).port;
      log.info({ port: bound, database: database.kind, redis: !!redis }, 'banter api listening');
      return bound;
    },
    stop() {
      stopped ??= (async () => {
        stopping = true;
        sse.close();
        await realtime?.close();
        await hub.stop();
        if (server) {
          const closed = new Promise<void>((r) => server!.close(() => r()));
          server.closeIdleConnections();
          if (inFlight > 0) {
            await withTimeout(
              new Promise<void>((r) => {
                drained = r;
              }),
              10_000,
              'in-flight requests',
            ).catch((err) => log.warn({ err: err.message }, 'stopping with requests still in flight'));
          }
          server.closeAllConnections();
          await closed;
        }
        await bus.close();
        await rateLimiter.close();
        if (redis) await redis.quit().catch(() => redis.disconnect());
        await database.close();
        log.info('banter api stopped');
      })();
      return stopped;
    },
  };
  return app;
}
