import { mkdirSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { type Logger as DrizzleLogger, type ExtractTablesWithRelations, type SQL, sql } from 'drizzle-orm';
import type { PgDatabase, PgQueryResultHKT, PgTransaction } from 'drizzle-orm/pg-core';
import type { WrittenLog } from '../realtime/log.ts';
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
   * With `then`, that is called with the rows the moment they arrive, before they are returned,
   * and with a Db on the same connection: what it sends there goes at once, and the connection
   * is released when its promise settles (see followCommits).
   */
  prepared<T>(name: string, text: string, params: unknown[], then?: OnResult<T>): Promise<T[]>;
  /**
   * Pool statistics for /metrics (zeros for PGlite), and how many connections have checked on
   * statements out past the bound so far.
   */
  poolStats(): { total: number; idle: number; waiting: number; checks: number };
  close(): Promise<void>;
}

/**
 * Called with a statement's rows as they arrive and a Db on its connection; returns what it sent
 * there (the connection is released once that settles), or nothing.
 */
export type OnResult<T> = (db: Db, rows: T[]) => Promise<unknown> | undefined;

/**
 * What a hot write committed, handed to the follower the moment its result arrives: the realtime
 * tailer delivers `written` itself when it has every row before them, else reads the log on `db`
 * (the write's connection, idle by then). Returns what it sent there, or nothing.
 */
export type Follower = (db: Db, written?: WrittenLog) => Promise<unknown> | undefined;

const followers = new WeakMap<Database, Follower>();
/** A callback that throws sends nothing: the write goes on regardless. */
function thenSafely<T>(then: OnResult<T>, db: Db, rows: T[]): Promise<unknown> | undefined {
  try {
    return then(db, rows);
  } catch {
    return undefined;
  }
}

/**
 * Makes `fn` the follower of a database's hot writes (one per database: the realtime hub of the
 * app using it). Returns the undo, which leaves a later registration alone.
 */
export function followCommits(database: Database, fn: Follower): () => void {
  followers.set(database, fn);
  return () => {
    if (followers.get(database) === fn) followers.delete(database);
  };
}
/** The follower for a hot write on `database`, if one is registered. */
export function followerOf(database: Database): Follower | undefined {
  return followers.get(database);
}

export interface DatabaseOptions {
  /** postgres:// URL; unset means embedded PGlite in `dataDir`. */
  url?: string;
  /** Directory for PGlite's files; `memory://` keeps it in memory (tests). */
  dataDir: string;
  /** Maximum connections in the pg pool. Default 10. */
  poolSize?: number;
  /**
   * ms after which a statement still out has its backend checked (guardClient), and the longest
   * wait for a connection. Unset or 0: neither.
   */
  queryTimeoutMs?: number;
  /**
   * PGlite only: start from this data directory (a `dumpDataDir` tarball) rather than an empty
   * one. The test harness passes a freshly migrated one, made once per migration set.
   */
  pgliteFrom?: Blob;
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
    const limit = opts.queryTimeoutMs || undefined;
    // A caller waits at most `limit` for a connection; TCP keep-alive finds idle connections
    // that died silently. A statement out for `limit` has its connection checked (guardClient).
    // An idle connection is kept a minute (node-postgres closes it after 10 s): a burst of
    // permission reloads every half minute or so opened new ones each time, and a send landing
    // on a new one waited for its backend to start and to prepare its statements (4.4 against
    // 1.6 ms quiet, in 3.5% of paced fan-out messages at 1,000 subscribers).
    const pool = new pg.Pool({
      connectionString: opts.url,
      max: opts.poolSize ?? 10,
      idleTimeoutMillis: 60_000,
      connectionTimeoutMillis: limit,
      keepAlive: true,
      keepAliveInitialDelayMillis: 10_000,
    });
    // Which of these backends are still at work on a statement, asked on a connection of its
    // own: no answer in `limit`, or no such backend running, and it is not. A server that refuses
    // the connection for want of resources (class 53: at max_connections or the role's connection
    // limit, as a pool sized to it is under load) is there: all are, until the next period.
    let checks = 0;
    const probe = async (pids: number[]): Promise<Set<number> | 'all'> => {
      checks++;
      const c = new pg.Client({
        connectionString: opts.url,
        connectionTimeoutMillis: limit,
        query_timeout: limit,
      });
      c.on('error', () => {});
      try {
        await c.connect();
        const r = await c.query<{ pid: number }>(
          `select pid from pg_stat_activity where pid = any($1::int[]) and state in ('active', 'fastpath function call')`,
          [pids],
        );
        return new Set(r.rows.map((x) => x.pid));
      } catch (err) {
        return String((err as { code?: unknown }).code ?? '').startsWith('53') ? 'all' : new Set();
      } finally {
        void c.end().catch(() => {});
      }
    };
    // The statements out on this pool's connections. Every `limit`, those out that long are
    // checked together, over one connection: a lock storm holding many statements costs one
    // check a period, not one each (which would crowd other pools out of max_connections).
    const out = new Set<Watched>();
    let checking = false;
    const checkOut = async () => {
      if (checking || !limit) return;
      const now = Date.now();
      const due = [...out].filter((w) => now - w.since >= limit && w.pid() !== undefined);
      if (!due.length) return;
      checking = true;
      try {
        const working = await probe([...new Set(due.map((w) => w.pid()!))]);
        for (const w of due) if (out.has(w) && working !== 'all' && !working.has(w.pid()!)) w.cut();
      } finally {
        checking = false;
      }
    };
    const ticker = limit ? setInterval(() => void checkOut(), limit) : undefined;
    ticker?.unref();
    // An idle client losing its connection must not crash the process.
    pool.on('error', () => {});
    // Nor a checked-out one (a transaction's, a send's): pg-pool listens only while a client is
    // idle, and an 'error' nobody hears is thrown. The statement out on it fails instead, and the
    // pool drops the client when it comes back.
    pool.on('connect', (client) => {
      client.on('error', () => {});
      guardClient(client, limit ? out : undefined);
    });
    const db = drizzle(pool, { schema: tables, logger }) as unknown as Db;
    // A Db on one checked-out connection, for statements that must queue behind another on it.
    const onClientDb = new WeakMap<object, Db>();
    const onClient = (client: import('pg').PoolClient) => {
      let d = onClientDb.get(client);
      if (!d) {
        d = drizzle(client, { schema: tables, logger }) as unknown as Db;
        onClientDb.set(client, d);
      }
      return d;
    };
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
      async prepared<T>(name: string, text: string, params: unknown[], then?: OnResult<T>) {
        count++;
        if (!then) return (await pool.query({ name, text, values: params })).rows as T[];
        const client = await pool.connect();
        let rows: T[];
        try {
          rows = (await client.query({ name, text, values: params })).rows as T[];
        } catch (err) {
          // Dropped, as pool.query does: a backend terminated mid-statement answers with its error
          // before the socket closes, and the pool would otherwise hand the dying client out again.
          client.release(err as Error);
          throw err;
        }
        const followed = thenSafely(then, onClient(client), rows);
        // The connection goes back once what `then` sent is done; dropped if that failed (a lost
        // connection, or one whose statement timed out and still waits for its answer).
        if (followed)
          followed.then(
            () => client.release(),
            (err) => client.release(err as Error),
          );
        else client.release();
        return rows;
      },
      poolStats: () => ({ total: pool.totalCount, idle: pool.idleCount, waiting: pool.waitingCount, checks }),
      close: () => {
        clearInterval(ticker);
        return pool.end();
      },
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
  const client = await PGlite.create(dataDir, opts.pgliteFrom ? { loadDataDir: opts.pgliteFrom } : {});
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
    async prepared<T>(_name: string, text: string, params: unknown[], then?: OnResult<T>) {
      count++;
      const { rows } = await client.query<T>(text, params);
      if (then) thenSafely(then, db, rows);
      return rows;
    },
    poolStats: () => ({ total: 1, idle: 1, waiting: 0, checks: 0 }),
    close: () => client.close(),
  };
  roots.set(db, database);
  return database;
}

/** A statement out on a pool connection, as the pool's check sees it. */
interface Watched {
  since: number;
  pid(): number | undefined;
  /** closes its connection */
  cut(): void;
}
/**
 * Two failures that would keep a pool connection from its pool, made safe here:
 * - A connection left hanging (a failover's old primary gone silent: no answer, no reset) holds
 *   its statement, and whoever waits on it (the realtime tailer, a request), until TCP gives up,
 *   ~15 min. A statement out past the bound has its backend checked by the pool's watch (one
 *   connection for all such statements, every period) while it is out: a statement that is only long
 *   (a big guild's cascade, a lock wait) goes on; one whose backend is gone, idle (the answer
 *   lost), or unreachable has its connection closed, so what is queued on it fails at once and
 *   the pool drops it.
 * - drizzle-orm's transaction() (0.45) runs BEGIN outside the try/finally that gives its
 *   connection back (drizzle-orm issues 6023, 6114, 6241): a BEGIN that fails (a connection lost
 *   or closed as above) kept its connection checked out for ever, and a few of those emptied the
 *   pool. It is given back here, dropped, as drizzle will not. Nothing else here runs BEGIN.
 */
function guardClient(client: import('pg').PoolClient, watched?: Set<Watched>) {
  const isBegin = (q: unknown) =>
    /^\s*begin\b/i.test(typeof q === 'string' ? q : ((q as { text?: string })?.text ?? ''));
  const cut = () =>
    (client as unknown as { connection?: { stream?: { destroy(): void } } }).connection?.stream?.destroy();
  const pid = () => (client as unknown as { processID?: number }).processID;
  /** Watches one statement until it settles (the returned function). */
  const watching = () => {
    if (!watched) return () => {};
    const w: Watched = { since: Date.now(), pid, cut };
    watched.add(w);
    return () => watched.delete(w);
  };
  const query = client.query as (...args: unknown[]) => unknown;
  (client as unknown as { query: typeof query }).query = (...args: unknown[]) => {
    const begin = isBegin(args[0]);
    const settle = watching();
    const failed = (err: unknown) => {
      if (begin) client.release(err instanceof Error ? err : new Error(String(err)));
    };
    const last = args.length - 1;
    const callback = args[last];
    if (typeof callback === 'function') {
      args[last] = (err: unknown, res: unknown) => {
        settle();
        if (err) failed(err);
        callback(err, res);
      };
    }
    const r = query.apply(client, args);
    if (r instanceof Promise)
      r.then(settle, (err) => {
        settle();
        failed(err);
      });
    return r;
  };
}

/** A list of ids as one uuid[] parameter: a statement carries at most 65,535 parameters. */
export function uuidArray(ids: readonly string[]): SQL {
  return sql`${`{${ids.join(',')}}`}::uuid[]`;
}

/** A SQLSTATE (Postgres' classes), not a Node error code such as EPIPE. */
const SQLSTATE = /^(?:[0-9][0-9A-Z]|F0|HV|P0|XX)[0-9A-Z]{3}$/;

/**
 * The database's error inside `err` (drizzle wraps the driver's in `cause`): the first in the
 * chain carrying a SQLSTATE, or undefined (a driver, pool or socket failure has none).
 */
export function databaseErrorOf(
  err: unknown,
): { code: string; constraint?: string; message?: string } | undefined {
  for (let e = err, depth = 0; e && typeof e === 'object' && depth < 5; depth++) {
    const x = e as { code?: unknown; constraint?: string; message?: string; cause?: unknown };
    if (typeof x.code === 'string' && SQLSTATE.test(x.code)) return x as { code: string };
    e = x.cause;
  }
  return undefined;
}

/** Whether `err` is a violation of the foreign key `constraint` (a row it names deleted under the insert). */
export function violatesForeignKey(err: unknown, constraint: string): boolean {
  const db = databaseErrorOf(err);
  return db?.code === '23503' && db.constraint === constraint;
}

/** The rows of a raw `execute` result (node-postgres and PGlite both hand them over as `rows`). */
export function resultRows<T>(r: unknown): T[] {
  return (r as { rows: T[] }).rows;
}

/** Which Database a root drizzle handle belongs to (a transaction handle maps to nothing). */
const roots = new WeakMap<object, Database>();
export function databaseOf(db: DbOrTx): Database | undefined {
  return roots.get(db);
}
