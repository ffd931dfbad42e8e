import { randomBytes } from 'node:crypto';
import { mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { CONNECTION_TTL_MS } from '../core/realtime/presence.ts';

/** The process configuration, read from the environment once at start (CONTRACT.md lists it). */
export interface Config {
  nodeEnv: string;
  /** Default 4000. */
  port: number;
  /** Default `./data`. */
  dataDir: string;
  /** postgres:// URL; unset: embedded PGlite in `dataDir`. */
  databaseUrl?: string;
  /** Default 10. */
  databasePoolSize: number;
  /**
   * A PostgreSQL statement out this long has its backend checked from another connection, and its
   * connection closed if the backend is gone or idle: a connection a failover left hanging would
   * otherwise hold its caller, the realtime tailer included, until TCP gives up (~15 min). Also
   * the longest wait for a pool connection. Default 30 s; 0 turns it off.
   */
  databaseQueryTimeoutMs: number;
  /** redis:// URL; unset: in-process bus, presence and rate limits. */
  redisUrl?: string;
  /** Key prefix for everything Banter stores in Redis. Default `banter:`. */
  redisPrefix: string;
  /** HS256 secret for access tokens; generated once into `dataDir` when unset (not in production). */
  jwtSecret: string;
  /** Access token lifetime in seconds. Default 900. */
  accessTokenTtl: number;
  /** Refresh token (session) lifetime in days. Default 30. */
  sessionTtlDays: number;
  /** `on` (default) or `off`. */
  rateLimits: boolean;
  /** GraphiQL at GET /graphql. Default on, off when NODE_ENV=production unless GRAPHIQL=true. */
  graphiql: boolean;
  /** pino level. Default `info` (`silent` in tests). */
  logLevel: string;
  serverName: string;
  motd: string;
  /** How long the event log keeps events, in days. Default 7. */
  eventRetentionDays: number;
  /**
   * log2 of scrypt's N for new password hashes: 14 (N = 16384). No environment variable: only the
   * test harness sets it lower (through loadConfig's overrides), since it signs up hundreds of users.
   */
  passwordHashCost: number;
  /**
   * How long a presence connection entry in Redis lives unless refreshed, so how long after its
   * instance died a user is told OFFLINE: 60 s (CONNECTION_TTL_MS). No environment variable: only
   * tests set it shorter (through loadConfig's overrides), to see that happen without a minute's wait.
   */
  presenceConnectionTtlMs: number;
  /** Largest accepted request body in bytes. Default 1 MiB. */
  maxBodyBytes: number;
  /** Proxies of yours in front of Banter whose X-Forwarded-For to believe (api/client-ip.ts). Default 0. */
  trustProxyHops: number;
  /** WebSocket limits: sockets per user (20), operations per socket (50), new sockets per IP per minute (6000: see DEFAULT_LIMITS in api/realtime/server.ts), ms to send connection_init (10 s), keep-alive ping interval (12 s). */
  ws: {
    socketsPerUser: number;
    operationsPerSocket: number;
    connectionsPerIpPerMinute: number;
    initTimeoutMs: number;
    keepAliveMs: number;
  };
  /** Set S3 endpoint etc. are read later by the storage port. */
  s3?: { endpoint: string; bucket: string; accessKeyId: string; secretAccessKey: string; region: string };
  typesense?: { url: string; apiKey: string };
}

export class ConfigError extends Error {}

type Env = Record<string, string | undefined>;

function int(env: Env, name: string, def: number, min: number, max: number): number {
  const raw = env[name];
  if (raw === undefined || raw === '') return def;
  const n = Number(raw);
  if (!Number.isInteger(n) || n < min || n > max) {
    throw new ConfigError(`${name} must be a whole number from ${min} to ${max} (got "${raw}")`);
  }
  return n;
}

function bool(env: Env, name: string, def: boolean, yes = ['true', 'on', '1'], no = ['false', 'off', '0']) {
  const raw = env[name];
  if (raw === undefined || raw === '') return def;
  if (yes.includes(raw.toLowerCase())) return true;
  if (no.includes(raw.toLowerCase())) return false;
  throw new ConfigError(`${name} must be one of ${[...yes, ...no].join(', ')} (got "${raw}")`);
}

function url(env: Env, name: string, protocols: string[]): string | undefined {
  const raw = env[name];
  if (raw === undefined || raw === '') return undefined;
  let u: URL;
  try {
    u = new URL(raw);
  } catch {
    throw new ConfigError(`${name} must be a URL (${protocols.join(' or ')}), got something else`);
  }
  if (!protocols.includes(u.protocol)) {
    throw new ConfigError(`${name} must start with ${protocols.join(' or ')} (got ${u.protocol})`);
  }
  return raw;
}

/** Reads the generated secret from `dataDir`, creating it on first start. */
function generatedSecret(dataDir: string): string {
  const file = path.join(dataDir, 'jwt-secret');
  try {
    return readFileSync(file, 'utf8').trim();
  } catch {
    mkdirSync(dataDir, { recursive: true });
    const secret = randomBytes(48).toString('base64url');
    writeFileSync(file, secret, { mode: 0o600, flag: 'wx' });
    return secret;
  }
}

/** Validates the environment; throws ConfigError with one line naming the variable at fault. */
export function loadConfig(env: Env = process.env, overrides: Partial<Config> = {}): Config {
  const nodeEnv = env.NODE_ENV ?? 'development';
  const production = nodeEnv === 'production';
  const dataDir = overrides.dataDir ?? path.resolve(env.DATA_DIR || './data');
  const jwt = env.JWT_SECRET;
  if (production && !jwt && !overrides.jwtSecret) {
    throw new ConfigError(
      'JWT_SECRET is required when NODE_ENV=production (a random string of 32+ characters)',
    );
  }
  if (jwt !== undefined && jwt !== '' && jwt.length < 32) {
    throw new ConfigError('JWT_SECRET must be at least 32 characters');
  }
  const s3Endpoint = url(env, 'S3_ENDPOINT', ['http:', 'https:']);
  const typesenseUrl = url(env, 'TYPESENSE_URL', ['http:', 'https:']);
  if (typesenseUrl && !env.TYPESENSE_API_KEY) {
    throw new ConfigError('TYPESENSE_API_KEY is required when TYPESENSE_URL is set');
  }
  const logLevel = env.LOG_LEVEL || (nodeEnv === 'test' ? 'silent' : 'info');
  if (!['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'].includes(logLevel)) {
    throw new ConfigError(
      `LOG_LEVEL must be one of fatal, error, warn, info, debug, trace, silent (got "${logLevel}")`,
    );
  }
  const config: Config = {
    nodeEnv,
    port: int(env, 'PORT', 4000, 0, 65535),
    dataDir,
    databaseUrl: url(env, 'DATABASE_URL', ['postgres:', 'postgresql:']),
    databasePoolSize: int(env, 'DATABASE_POOL_SIZE', 10, 1, 500),
    databaseQueryTimeoutMs: int(env, 'DATABASE_QUERY_TIMEOUT_MS', 30_000, 0, 3_600_000),
    redisUrl: url(env, 'REDIS_URL', ['redis:', 'rediss:']),
    redisPrefix: env.REDIS_PREFIX || 'banter:',
    jwtSecret: '',
    accessTokenTtl: int(env, 'ACCESS_TOKEN_TTL', 900, 30, 86400),
    sessionTtlDays: int(env, 'SESSION_TTL_DAYS', 30, 1, 365),
    rateLimits: bool(env, 'RATE_LIMITS', true, ['on', 'true', '1'], ['off', 'false', '0']),
    graphiql: bool(env, 'GRAPHIQL', !production),
    logLevel,
    serverName: env.SERVER_NAME || 'Banter',
    motd: env.MOTD ?? '',
    eventRetentionDays: int(env, 'EVENT_RETENTION_DAYS', 7, 1, 3650),
    passwordHashCost: 14,
    presenceConnectionTtlMs: CONNECTION_TTL_MS,
    maxBodyBytes: int(env, 'MAX_BODY_BYTES', 1024 * 1024, 1024, 100 * 1024 * 1024),
    trustProxyHops: int(env, 'TRUST_PROXY_HOPS', 0, 0, 10),
    ws: {
      socketsPerUser: int(env, 'WS_MAX_SOCKETS_PER_USER', 20, 1, 100_000),
      operationsPerSocket: int(env, 'WS_MAX_OPERATIONS_PER_SOCKET', 50, 1, 10_000),
      connectionsPerIpPerMinute: int(env, 'WS_CONNECTIONS_PER_IP_PER_MINUTE', 6000, 1, 10_000_000),
      initTimeoutMs: int(env, 'WS_CONNECTION_INIT_TIMEOUT_MS', 10_000, 100, 600_000),
      keepAliveMs: int(env, 'WS_KEEPALIVE_MS', 12_000, 100, 600_000),
    },
    s3: s3Endpoint
      ? {
          endpoint: s3Endpoint,
          bucket: env.S3_BUCKET || 'banter',
          accessKeyId: env.S3_ACCESS_KEY_ID ?? '',
          secretAccessKey: env.S3_SECRET_ACCESS_KEY ?? '',
          region: env.S3_REGION || 'us-east-1',
        }
      : undefined,
    typesense: typesenseUrl ? { url: typesenseUrl, apiKey: env.TYPESENSE_API_KEY! } : undefined,
    ...overrides,
  };
  if (!config.jwtSecret) config.jwtSecret = jwt || generatedSecret(config.dataDir);
  return config;
}
