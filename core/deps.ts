import type { Database, Db } from './db/client.ts';
import type { Bus } from './ports/bus.ts';
import type { RateLimiter } from './ports/rate-limit.ts';
import type { SearchEngine } from './ports/search.ts';
import type { Hub } from './realtime/hub.ts';

/** The minimal logger core needs (pino satisfies it). */
export interface Log {
  info(obj: object | string, msg?: string): void;
  warn(obj: object | string, msg?: string): void;
  error(obj: object | string, msg?: string): void;
  debug(obj: object | string, msg?: string): void;
}

/** Core's settings: the part of the process config that the domain reads. */
export interface CoreSettings {
  jwtSecret: Uint8Array;
  /** seconds */
  accessTokenTtl: number;
  sessionTtlDays: number;
  serverName: string;
  version: string;
  motd: string;
  eventRetentionDays: number;
  /** log2 of scrypt's N for new password hashes (auth.service.ts; a hash keeps its own). */
  passwordHashCost: number;
  features: string[];
}

/** Everything a service needs, built once by the app factory and passed in. */
export interface Deps {
  database: Database;
  db: Db;
  bus: Bus;
  rateLimiter: RateLimiter;
  /** false when RATE_LIMITS=off */
  rateLimitsEnabled: boolean;
  log: Log;
  /** The realtime hub; absent in processes that hold no sockets (workers). */
  realtime?: Hub;
  /** The search engine (Postgres FTS unless TYPESENSE_URL is set); absent means Postgres FTS on `db`. */
  search?: SearchEngine;
  settings: CoreSettings;
  now(): Date;
}

/** The signed-in user a request acts for. */
export interface Viewer {
  userId: string;
  sessionId: string;
  isAdmin: boolean;
}
