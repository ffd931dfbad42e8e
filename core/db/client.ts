import { mkdirSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import type { Logger as DrizzleLogger, ExtractTablesWithRelations } from 'drizzle-orm';
import type { PgDatabase, PgQueryResultHKT, PgTransaction } from 'drizzle-orm/pg-core';
import * as tables from './tables.ts';

export type Tables = typeof tables;
/** The one database type services see, whichever driver is underneath. */
export type Db = PgDatabase<PgQueryResultHKT, Tables>;
export type Tx = PgTransaction<PgQueryResultHKT, Tables, ExtractTablesWithRelations<Tables>>;
/** Either the database or a transaction in progress: services accept both. */
export type DbOrTx = Db | Tx;

export interface Database {
  db: Db;
  kind: 'pglite' | 'postgres';
  /** Statements sent since start; tests read it to prove there is no N+1. */
  readonly queryCount: number;
  /** Resolves when the database answers a trivial query. */
  ping(): Promise<void>;
  /** Applies pending migrations, serialized across processes by an advisory lock. */
  migrate(): Promise<void>;
  /**
   * Runs a hot, fixed SQL text as a named prepared statement (Postgres plans it once per
   * connection instead of on every call); PGlite runs it as a plain parameterized query.
   */
  prepared<T>(name: string, text: string, params: unknown[]): Promise<T[]>;
  /** Pool statistics for /metrics (zeros for PGlite). */
  poolStats(): { total: number; idle: number; waiting: number };
  close(): Promise<void>;
}

export interface DatabaseOptions {
  /** postgres:// URL; unset means embedded PGlite in `dataDir`. */
  url?: string;
  /** Directory for PGlite's files; `memory://` keeps it in memory (tests). */
  dataDir: string;
  /** Maximum connections in the pg pool. Default 10. */
  poolSize?: number;
}

export const migrationsFolder = fileURLToPath(new URL('../../migrations', import.meta.url));
/** Arbitrary, fixed: every Banter process takes the same lock before migrating. */
const MIGRATION_LOCK = 4_242_001;

export async function createDatabase(opts: DatabaseOptions): Promise<Database> {
  let count = 0;
  const logger: DrizzleLogger = {
    logQuery() {
      count++;
    },
  };
  if (opts.url) {
    const { default: pg } = await import('pg');
    const { drizzle } = await import('drizzle-orm/node-postgres');
    const { migrate } = await import('drizzle-orm/node-postgres/migrator');
    const pool = new pg.Pool({ connectionString: opts.url, max: opts.poolSize ?? 10 });
    // An idle client losing its connection must not crash the process.
    pool.on('error', () => {});
    const db = drizzle(pool, { schema: tables, logger }) as unknown as Db;
    const database: Database = {
      db,
      kind: 'postgres',
      get queryCount() {
        return count;
      },
      async ping() {
        await pool.query('select 1');
      },
      async migrate() {
        const client = new pg.Client({ connectionString: opts.url });
        await client.connect();
        try {
          await client.query('select pg_advisory_lock($1)', [MIGRATION_LOCK]);
          await migrate(drizzle(client), { migrationsFolder });
        } finally {
          await client.query('select pg_advisory_unlock($1)', [MIGRATION_LOCK]).catch(() => {});
          await client.end();
        }
      },
      async prepared<T>(name: string, text: string, params: unknown[]) {
        count++;
        return (await pool.query({ name, text, values: params })).rows as T[];
      },
      poolStats: () => ({ total: pool.totalCount, idle: pool.idleCount, waiting: pool.waitingCount }),
      close: () => pool.end(),
    };
    roots.set(db, database);
    return database;
  }
  const { PGlite } = await import('@electric-sql/pglite');
  const { drizzle } = await import('drizzle-orm/pglite');
  const { migrate } = await import('drizzle-orm/pglite/migrator');
  let dataDir = opts.dataDir;
  if (!dataDir.startsWith('memory://')) {
    dataDir = path.join(opts.dataDir, 'pglite');
    mkdirSync(dataDir, { recursive: true });
  }
  const client = await PGlite.create(dataDir);
  const db = drizzle(client, { schema: tables, logger }) as unknown as Db;
  const database: Database = {
    db,
    kind: 'pglite',
    get queryCount() {
      return count;
    },
    async ping() {
      await client.query('select 1');
    },
    // PGlite is single-process by construction: no lock needed.
    migrate: () => migrate(drizzle(client), { migrationsFolder }),
    async prepared<T>(_name: string, text: string, params: unknown[]) {
      count++;
      return (await client.query<T>(text, params)).rows;
    },
    poolStats: () => ({ total: 1, idle: 1, waiting: 0 }),
    close: () => client.close(),
  };
  roots.set(db, database);
  return database;
}

/** Which Database a root drizzle handle belongs to (a transaction handle maps to nothing). */
const roots = new WeakMap<object, Database>();
export function databaseOf(db: DbOrTx): Database | undefined {
  return roots.get(db);
}
