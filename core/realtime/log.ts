/**
 * Reading the event log in commit-safe order. Only rows below the horizon are read (see
 * Horizon): a transaction still open may hold a row with a lower seq, and it will sort after
 * every position handed out so far when it commits.
 */
import { and, eq, inArray, isNull, type SQL, sql } from 'drizzle-orm';
import { type Db, resultRows, uuidArray } from '../db/client.ts';
import { events, formerMembers, messages, users } from '../db/tables.ts';
import { BanterError } from '../errors.ts';
import type { MessageRow } from '../services/message.service.ts';
import { loadedAuthors, type UserRow } from '../services/message-history.service.ts';
import { comparePos, compareXid, ORIGIN, type Position, type Snapshot } from './cursor.ts';

export interface LogRow extends Position {
  type: string;
  guildId: string | null;
  channelId: string | null;
  userId: string | null;
  payload: Record<string, unknown>;
  /**
   * set when the message the row refers to is deleted by now (its MessageDeleted follows), or
   * when the row cannot be read (`malformed`): skipped by every subscriber
   */
  gone?: boolean;
  /**
   * its payload is not a JSON object (a hand edit, a restore, a writer's bug): the row is kept
   * so that positions move past it, with an empty payload, and `gone`
   */
  malformed?: true;
  /** the message the row refers to, as it was when the row was read (see loadMessages) */
  message?: MessageRow;
  /** GUILD_DELETED: who was in the guild (loadFormerMembers), or in a replay the viewer if it was */
  formerMembers?: ReadonlySet<string>;
  /**
   * GUILD_DELETED: whom formerMembers answers for (the viewers subscribed on this instance when it
   * was read); anyone else is looked up by itself (wasFormerMember). Unset: it answers for all.
   */
  formerAsked?: ReadonlySet<string>;
}

/**
 * A write's own log rows, from its result, in log order, with their messages loaded. `before`
 * is the last row of the log ahead of them (null: none). The write reports them only when no other
 * transaction was in progress as it began: every row ahead of them was committed by then, and none
 * can be committed ahead of them later (see the send statement in message-batch.ts).
 */
export interface WrittenLog {
  rows: LogRow[];
  before: Position | null;
}

interface RawRow {
  seq: string | number;
  xid: string;
  type: string;
  guild_id: string | null;
  channel_id: string | null;
  user_id: string | null;
  payload: unknown;
}

/**
 * jsonb arrives parsed from node-postgres, as text from some PGlite paths. Anything but an object
 * is undefined: one unreadable row must not stop the tailer, and every stream with it.
 */
function parsePayload(p: unknown): Record<string, unknown> | undefined {
  if (typeof p === 'string') {
    try {
      p = JSON.parse(p);
    } catch {
      return undefined;
    }
  }
  return typeof p === 'object' && p !== null && !Array.isArray(p)
    ? (p as Record<string, unknown>)
    : undefined;
}

/** A row's payload, or for a malformed one an empty one, the row marked (see LogRow.malformed). */
function withPayload(row: LogRow, raw: unknown): LogRow {
  const payload = parsePayload(raw);
  row.payload = payload ?? {};
  if (!payload) {
    row.malformed = true;
    row.gone = true;
  }
  return row;
}

function toRow(r: RawRow): LogRow {
  const row: LogRow = {
    seq: Number(r.seq),
    xid: String(r.xid),
    type: r.type,
    guildId: r.guild_id,
    channelId: r.channel_id,
    userId: r.user_id,
    payload: {},
  };
  return withPayload(row, r.payload);
}

/** instance_settings' key of the prune's watermark (see prunedThrough). */
const WATERMARK_KEY = 'events.pruned_through';

const COLS = sql`seq, xid::text as xid, type, guild_id, channel_id, user_id, payload`;
/**
 * The xid as a bigint: PGlite (wasm32) sorts xid8 wrongly (comparisons are right, ORDER BY is
 * not), and an xid8 never passes 2^63. The events_order index is on this expression.
 */
const XID = sql`(xid::text::bigint)`;
/**
 * Below which transaction id every row is final. `fast`: the snapshot's xmin, the oldest
 * transaction in progress on the whole server. `exact`: the oldest in progress that may be this
 * database's, else xmax: a transaction of another database on the same server (a psql session
 * left open in a transaction, another application, a test suite beside this one) never writes
 * this log, and with `fast` alone it would hold delivery back for as long as it stayed open; one
 * of this database, or one that cannot be placed (its backend gone by the time the activity is
 * read, a prepared transaction, a backend this role may not see), still does. `exact` reads
 * pg_stat_activity whenever anything is in progress, which cost a quarter of the sends per
 * second (bench:send, 16 in flight: 1,462 against 1,999 msg/s, Postgres CPU per message 0.35
 * against 0.21 ms) in the send's statement: so the hub's polls (every 500 ms) and its start use
 * `exact`, every other read `fast`. A transaction open elsewhere then delays delivery to the next
 * poll instead of stopping it.
 */
export type Horizon = 'fast' | 'exact';
/** The `exact` bound of snapshot `t.s`, in SQL (see Horizon). */
const EXACT_BOUND = `coalesce(
    (select min(x) from pg_snapshot_xip(t.s) x where x::xid not in (
      select a.backend_xid from pg_stat_activity a where a.backend_xid is not null
        and a.datid is distinct from (select oid from pg_database where datname = current_database()))),
    pg_snapshot_xmax(t.s))`;
const FINISHED = {
  fast: sql`xid < pg_snapshot_xmin(pg_current_snapshot())`,
  exact: sql.raw(`xid < (select ${EXACT_BOUND} from (select pg_current_snapshot() as s) t)`),
};

/**
 * The lowest transaction id whose rows a statement starting now may not see (the `exact` bound,
 * see Horizon): a write of this database that such a statement misses commits with an xid from
 * here on, and so do its log rows. As a decimal string.
 */
export async function unfinishedFrom(db: Db): Promise<string> {
  return String((await exactBoundNow(db)).x);
}

/**
 * The `exact` bound of the snapshot now as `x` (a decimal string), and `also` (SQL select items,
 * each named) read in the same statement.
 */
async function exactBoundNow<T extends Record<string, unknown>>(
  db: Db,
  also = '',
): Promise<{ x: string } & T> {
  const [r] = resultRows<{ x: string } & T>(
    await db.execute(
      sql.raw(`select (${EXACT_BOUND})::text as x${also} from (select pg_current_snapshot() as s) t`),
    ),
  );
  return r;
}

/**
 * Where a client starts its stream before it loads the state it will keep up to date (the
 * `eventsCursor` query): every transaction below the exact horizon had finished when this was
 * read, so a query the client sends afterwards sees its rows; every row from the horizon on (a
 * write still in progress, or committed since) sorts after this position, so `events(after:)`
 * from it replays them. Nothing is missed; a row both in that state and replayed can come twice
 * to the client (once in each). One below the horizon (a cursor must be below the snapshot's
 * xmax, assertResumable, and the horizon can be the xmax itself), with a seq drawn from the log's
 * sequence after the snapshot: above every row of a transaction below the horizon (their seqs
 * were drawn before they finished), and above a restore's mark once one was made here, as a row's
 * would be: fromBeforeRestore tells such a cursor from one of the other cluster by its seq (it had
 * none with the largest seq, and one from another cluster was accepted once this cluster's
 * counter passed its xid, and the rows written here below that xid were never replayed).
 */
export async function startPosition(db: Db): Promise<Position> {
  const r = await exactBoundNow<{ n: string }>(
    db,
    `, nextval(pg_get_serial_sequence('events', 'seq'))::text as n`,
  );
  const h = BigInt(r.x);
  return { xid: (h > 0n ? h - 1n : 0n).toString(), seq: Number(r.n) };
}

/** The last finished row: where a tailer starting now begins. */
export async function headPosition(db: Db): Promise<Position> {
  const [r] = resultRows<{ xid: string; seq: string }>(
    await db.execute(
      sql`select xid::text as xid, seq from events where ${FINISHED.exact} order by ${XID} desc, seq desc limit 1`,
    ),
  );
  return r ? { xid: String(r.xid), seq: Number(r.seq) } : ORIGIN;
}

/** The database's snapshot now: where a live-only subscriber's stream begins. */
export async function snapshotNow(db: Db): Promise<Snapshot> {
  const [r] = resultRows<{ xmin: string; xmax: string; xip: string[] | string | null }>(
    await db.execute(sql`select pg_snapshot_xmin(s)::text as xmin, pg_snapshot_xmax(s)::text as xmax,
      (select array_agg(x::text) from pg_snapshot_xip(s) x) as xip
      from (select pg_current_snapshot() as s) t`),
  );
  const xip =
    typeof r.xip === 'string' ? r.xip.replace(/[{}]/g, '').split(',').filter(Boolean) : (r.xip ?? []);
  return { xmin: String(r.xmin), xmax: String(r.xmax), xip: new Set(xip.map(String)) };
}

/** Finished rows after `from`, in log order. */
export async function readAfter(
  db: Db,
  from: Position,
  limit: number,
  horizon: Horizon = 'fast',
): Promise<LogRow[]> {
  const r = await db.execute(sql`
    select ${COLS} from events
    where (${XID}, seq) > (${from.xid}::bigint, ${from.seq}::bigint) and ${FINISHED[horizon]}
    order by ${XID}, seq limit ${limit}`);
  return resultRows<RawRow>(r).map(toRow);
}

/** The message id a row is about, in SQL, as messageIdOf and loadMessages read it (else null). */
const ROW_MESSAGE_ID = sql`case when ${events.type} in ('MESSAGE_DELETED', 'READ_STATE_UPDATED') then null
  when jsonb_typeof(${events.payload}->'messageId') = 'string' then ${events.payload}->>'messageId'
  when left(${events.type}, 8) = 'MESSAGE_' and jsonb_typeof(${events.payload}->'id') = 'string'
    then ${events.payload}->>'id' end`;
/** What Postgres casts to a uuid (either case): checked here and, the same pattern, in SQL. */
export const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;
/** ... as a uuid; anything else is no id (a malformed payload must not stop the tailer). */
const ROW_MESSAGE_UUID = sql`(case when ${ROW_MESSAGE_ID} ~* ${sql.raw(`'${UUID.source}'`)} then (${ROW_MESSAGE_ID})::uuid end)`;

/**
 * readAfter and loadMessages in one statement: the tailer's read when it has subscribers to
 * hand the rows to (one round trip less between a commit and its delivery).
 */
export async function readAfterWithMessages(
  db: Db,
  from: Position,
  limit: number,
  horizon: Horizon = 'fast',
): Promise<LogRow[]> {
  return (await readAfterWatched(db, from, limit, horizon)).rows;
}

/** A read that says where the prune's watermark was in the read's snapshot. */
export interface WatchedRead {
  rows: LogRow[];
  /**
   * the watermark (prunedThrough) as the read saw it; undefined when the read found no rows (it
   * is a column of each row). A watermark past `from` means rows after `from` were deleted before
   * the read: a reader that had not read them has lost them (see the hub's lostToPrune).
   */
  pruned: Position | undefined;
}

/** readAfterWithMessages, with the watermark as the same statement saw it (see WatchedRead). */
export async function readAfterWatched(
  db: Db,
  from: Position,
  limit: number,
  horizon: Horizon = 'fast',
): Promise<WatchedRead> {
  const found = await queriesOf(db).withMessages[horizon].execute({ xid: from.xid, seq: from.seq, limit });
  return { rows: found.map((f) => foundRow(f)!), pruned: prunedOf(found[0]?.pruned) };
}

/** The watermark column of a read (jsonb as text), ORIGIN when none was ever written. */
function prunedOf(value: string | null | undefined): Position | undefined {
  if (value === undefined) return undefined;
  return value === null ? ORIGIN : watermarkOf(value);
}

// Named prepared statements: planning these joins costs more than running them (~1 ms vs ~0.2).
// The page of events is read first (limit inside), each row's message id computed once there:
// joined on that plain uuid, a plan chosen while the tables were small (a new server's first
// generic plan: a nested loop over all messages) costs one compare per pair, not the CASE and
// regex per pair that made a 300-row read take 190 ms on a fresh database.
/** The page of finished rows after the placeholders' position, `finished` deciding which are. */
const pageOf = (db: Db, finished: SQL) =>
  db
    .select({
      seq: events.seq,
      xid: sql<string>`${events.xid}::text`.as('page_xid'),
      xorder: sql<string>`${XID}`.as('page_order'),
      type: events.type,
      guildId: events.guildId,
      channelId: events.channelId,
      userId: events.userId,
      payload: events.payload,
      mid: sql<string | null>`${ROW_MESSAGE_UUID}`.as('page_message_id'),
    })
    .from(events)
    .where(
      sql`(${XID}, ${events.seq}) > (${sql.placeholder('xid')}::bigint, ${sql.placeholder('seq')}::bigint)
        and ${finished}`,
    )
    .orderBy(XID, events.seq)
    .limit(sql.placeholder('limit'))
    .as('page');

type Page = ReturnType<typeof pageOf>;
/** A page's columns with its message and author, as readAfterWithMessages returns them. */
const withMessageColumns = (page: Page) => ({
  seq: page.seq,
  xid: page.xid,
  type: page.type,
  guildId: page.guildId,
  channelId: page.channelId,
  userId: page.userId,
  payload: page.payload,
  m: messages,
  u: users,
  /** the watermark in the read's snapshot: an uncorrelated subquery, evaluated once per read */
  pruned: sql<
    string | null
  >`(select value::text from instance_settings where key = ${sql.raw(`'${WATERMARK_KEY}'`)})`,
});
const messageOf = (page: Page) => and(eq(messages.id, page.mid), isNull(messages.deletedAt));

const prepareReadAfterWithMessages = (db: Db, horizon: Horizon) => {
  const page = pageOf(db, FINISHED[horizon]);
  return db
    .select(withMessageColumns(page))
    .from(page)
    .leftJoin(messages, messageOf(page))
    .leftJoin(users, eq(users.id, messages.authorId))
    .orderBy(page.xorder, page.seq)
    .prepare(`banter_read_after_with_messages_${horizon}`);
};

/**
 * The exact horizon and the snapshot's xmax, once per statement, as a one-row subquery that the
 * page reads below (lateral), so the rows and the two bounds come from one snapshot.
 */
const prepareReadAfterBounded = (db: Db) => {
  const bound = db
    .select({
      h: sql<string>`${sql.raw(EXACT_BOUND)}`.as('bound_h'),
      x: sql<string>`pg_snapshot_xmax(t.s)`.as('bound_x'),
    })
    .from(sql`(select pg_current_snapshot() as s) t`)
    .as('bound');
  const page = pageOf(db, sql`${events.xid} < ${bound.h}`);
  return db
    .select({
      ...withMessageColumns(page),
      horizon: sql<string>`${bound.h}::text`,
      xmax: sql<string>`${bound.x}::text`,
    })
    .from(bound)
    .leftJoinLateral(page, sql`true`)
    .leftJoin(messages, messageOf(page))
    .leftJoin(users, eq(users.id, messages.authorId))
    .orderBy(page.xorder, page.seq)
    .prepare('banter_read_after_bounded');
};

interface LogQueries {
  withMessages: Record<Horizon, ReturnType<typeof prepareReadAfterWithMessages>>;
  bounded: ReturnType<typeof prepareReadAfterBounded>;
}
const logQueries = new WeakMap<Db, LogQueries>();
function queriesOf(db: Db): LogQueries {
  let q = logQueries.get(db);
  if (!q) {
    q = {
      withMessages: {
        fast: prepareReadAfterWithMessages(db, 'fast'),
        exact: prepareReadAfterWithMessages(db, 'exact'),
      },
      bounded: prepareReadAfterBounded(db),
    };
    logQueries.set(db, q);
  }
  return q;
}

type FoundRow = Awaited<ReturnType<LogQueries['bounded']['execute']>>[number];
/** A found row as a LogRow with its message (withMessage), or null for the bounded read's empty page. */
function foundRow({
  m,
  u,
  horizon: _h,
  xmax: _x,
  pruned: _p,
  ...e
}: Partial<Pick<FoundRow, 'horizon' | 'xmax'>> & Omit<FoundRow, 'horizon' | 'xmax'>): LogRow | null {
  if (e.seq === null) return null;
  const row = withPayload({ ...e, seq: Number(e.seq), xid: String(e.xid) } as LogRow, e.payload);
  if (!row.malformed) withMessage(row, m, u);
  return row;
}

/** A read that says how far it saw: see readAfterBounded. */
export interface BoundedRead {
  rows: LogRow[];
  /** every transaction below this had finished, and its rows after `from` are in `rows` (unless a full page) */
  horizon: string;
  /** the read's snapshot's xmax: every transaction committed before the read began is below it */
  xmax: string;
  /** the watermark in the read's snapshot (see WatchedRead) */
  pruned: Position;
}

/**
 * readAfterWithMessages with the `exact` horizon, saying where that horizon and the snapshot's
 * xmax were. Once a read returns a horizon at or past an earlier read's xmax (and not a full
 * page), every transaction that had committed when that earlier read began has been read: what
 * typing waits for (see the hub). One statement, so both come from the snapshot the rows were
 * read in.
 */
export async function readAfterBounded(db: Db, from: Position, limit: number): Promise<BoundedRead> {
  const found = await queriesOf(db).bounded.execute({ xid: from.xid, seq: from.seq, limit });
  return {
    rows: found.map(foundRow).filter((r): r is LogRow => r !== null),
    horizon: String(found[0].horizon),
    xmax: String(found[0].xmax),
    pruned: prunedOf(found[0].pruned) ?? ORIGIN,
  };
}

/** Whether a row refers to a message that must still exist for it to be delivered. */
function aboutLiveMessage(r: LogRow): boolean {
  return r.type !== 'MESSAGE_DELETED' && r.type !== 'READ_STATE_UPDATED' && messageIdOf(r) !== null;
}

/** A row gets its message (and the author) as read, or is marked gone when that message is not there. */
function withMessage(r: LogRow, m: MessageRow | null | undefined, u: UserRow | null | undefined) {
  if (m) {
    r.message = m;
    if (u) loadedAuthors.set(m, u);
  } else if (aboutLiveMessage(r)) r.gone = true;
}

/**
 * Rows in (from, to] that `userId` could possibly see: a coarse SQL prefilter (own rows, guilds
 * it is in, DMs it is in, membership events about it, deletions of guilds it was in); exact
 * permission is decided per row after.
 */
export async function readRange(
  db: Db,
  userId: string,
  from: Position,
  to: Position,
  limit: number,
): Promise<LogRow[]> {
  if (comparePos(from, to) >= 0) return [];
  // Rows written by an older instance still carry their members in the payload (during a rollout).
  const wasIn = sql`(type = 'GUILD_DELETED' and (guild_id in (select guild_id from ${formerMembers} where user_id = ${userId}::uuid)
    or payload->'memberIds' @> jsonb_build_array(${userId}::text)))`;
  const r = await db.execute(sql`
    select ${COLS}, ${wasIn} as was_in from events
    where (${XID}, seq) > (${from.xid}::bigint, ${from.seq}::bigint)
      and (${XID}, seq) <= (${to.xid}::bigint, ${to.seq}::bigint)
      and (user_id = ${userId}::uuid or (user_id is null and (
        guild_id in (select guild_id from members where user_id = ${userId}::uuid)
        or channel_id in (select channel_id from channel_recipients where user_id = ${userId}::uuid)
        or payload->>'userId' = ${userId}
        or ${wasIn})))
    order by ${XID}, seq limit ${limit}`);
  return resultRows<RawRow & { was_in: boolean }>(r).map((raw) => {
    const row = toRow(raw);
    // Who was in a deleted guild, as far as this viewer's replay needs to know.
    if (row.type === 'GUILD_DELETED') row.formerMembers = new Set(raw.was_in ? [userId] : []);
    return row;
  });
}

/**
 * Every row in (from, to], whoever may see it: a page that several viewers' replays share (see
 * sharedPage in hub.ts), each deciding per row what its viewer may see.
 */
export async function readRangeAll(db: Db, from: Position, to: Position, limit: number): Promise<LogRow[]> {
  if (comparePos(from, to) >= 0) return [];
  const r = await db.execute(sql`
    select ${COLS} from events
    where (${XID}, seq) > (${from.xid}::bigint, ${from.seq}::bigint)
      and (${XID}, seq) <= (${to.xid}::bigint, ${to.seq}::bigint)
    order by ${XID}, seq limit ${limit}`);
  return resultRows<RawRow>(r).map(toRow);
}

/**
 * What readRange's prefilter reads of a viewer besides the rows: the guilds it is in and the DMs
 * it is in, for a shared page's rows (readRangeAll) to pass through that same filter in memory.
 */
export interface ViewerScope {
  guilds: ReadonlySet<string>;
  channels: ReadonlySet<string>;
}

/** The scopes of several viewers, in one statement (a crowd resuming at once asks together). */
export async function loadViewerScopes(db: Db, userIds: string[]): Promise<Map<string, ViewerScope>> {
  const out = new Map<string, { guilds: Set<string>; channels: Set<string> }>();
  for (const id of userIds) out.set(id, { guilds: new Set(), channels: new Set() });
  if (!userIds.length) return out;
  const ids = uuidArray(userIds);
  const r = await db.execute(sql`
    select user_id::text as user_id, guild_id::text as id, true as guild from members where user_id = any(${ids})
    union all
    select user_id::text, channel_id::text, false from channel_recipients where user_id = any(${ids})`);
  for (const row of resultRows<{ user_id: string; id: string; guild: boolean }>(r)) {
    const s = out.get(row.user_id);
    if (s) (row.guild ? s.guilds : s.channels).add(row.id);
  }
  return out;
}

/**
 * readRange's SQL prefilter, in memory, for a row of a shared page (readRangeAll): own rows, rows
 * of guilds and DMs in `scope`, membership rows about the viewer, deletions of guilds it was in
 * (the page's former members, loadFormerMembers). Exact permission is still decided per row after.
 */
export function mayConcern(r: LogRow, userId: string, scope: ViewerScope): boolean {
  if (r.userId !== null) return r.userId === userId;
  return (
    (r.guildId !== null && scope.guilds.has(r.guildId)) ||
    (r.channelId !== null && scope.channels.has(r.channelId)) ||
    r.payload.userId === userId ||
    (r.type === 'GUILD_DELETED' &&
      (!!r.formerMembers?.has(userId) || (!!r.formerAsked && !r.formerAsked.has(userId))))
  );
}

/** A GUILD_DELETED row whose former members loadFormerMembers has not looked up yet. */
export const awaitsFormerMembers = (r: LogRow) =>
  r.type === 'GUILD_DELETED' && !!r.guildId && !r.formerMembers;

/**
 * GUILD_DELETED rows of a batch get who of `viewers` (the users subscribed on this instance) was in
 * each guild, in one statement (left unset when nothing was recorded for the guild at all). Only
 * those: every member of a guild of 300k, read before its batch went out, held every other
 * guild's delivery on the instance ~0.9 s. A viewer not among them (one that subscribed while this
 * was read) is looked up by itself (wasFormerMember).
 */
export async function loadFormerMembers(db: Db, batch: LogRow[], viewers: Iterable<string>): Promise<void> {
  const deleted = batch.filter(awaitsFormerMembers);
  if (!deleted.length) return;
  const asked = new Set(viewers);
  const found = resultRows<{ guild_id: string; recorded: boolean; was_in: string[] | string }>(
    await db.execute(sql`select g.id::text as guild_id,
        exists (select 1 from ${formerMembers} f where f.guild_id = g.id) as recorded,
        (select coalesce(json_agg(f.user_id::text), '[]'::json) from ${formerMembers} f
          where f.guild_id = g.id and f.user_id = any(${uuidArray([...asked])})) as was_in
      from unnest(${uuidArray([...new Set(deleted.map((r) => r.guildId!))])}) as g(id)`),
  );
  const byGuild = new Map(found.map((f) => [f.guild_id, f]));
  for (const r of deleted) {
    const f = byGuild.get(r.guildId!);
    const wasIn = typeof f?.was_in === 'string' ? (JSON.parse(f.was_in) as string[]) : (f?.was_in ?? []);
    const set = new Set<string>(wasIn);
    // A row written by an older instance (during a rollout) has its members in the payload.
    const ids = r.payload.memberIds;
    const legacy = Array.isArray(ids);
    if (legacy) for (const id of ids) if (typeof id === 'string') set.add(id);
    // None recorded at all (a row older than both): the subscribers' own memory decides.
    if (!f?.recorded && !set.size) continue;
    r.formerMembers = set;
    r.formerAsked = asked;
  }
}

/**
 * Whether `userId` was in a deleted guild, for a viewer its GUILD_DELETED row's formerMembers does
 * not answer for (see loadFormerMembers): recorded, or named in the row (an older instance's).
 */
export async function wasFormerMember(
  db: Db,
  row: { guildId: string | null; payload: Record<string, unknown> },
  userId: string,
): Promise<boolean> {
  return (await formerMemberships(db, [row], userId)).has(row);
}

/**
 * wasFormerMember for several rows in one statement (a replay page's deletions, read before the
 * viewer subscribed): the rows `userId` was a former member in.
 */
export async function formerMemberships<
  R extends { guildId: string | null; payload: Record<string, unknown> },
>(db: Db, rows: readonly R[], userId: string): Promise<Set<R>> {
  const out = new Set<R>();
  const ask = new Set<string>();
  for (const r of rows) {
    const ids = r.payload.memberIds;
    if (Array.isArray(ids) && ids.includes(userId)) out.add(r);
    else if (r.guildId) ask.add(r.guildId);
  }
  if (!ask.size) return out;
  const found = resultRows<{ guild_id: string }>(
    await db.execute(
      sql`select guild_id::text as guild_id from ${formerMembers}
        where user_id = ${userId}::uuid and guild_id = any(${uuidArray([...ask])})`,
    ),
  );
  const was = new Set(found.map((f) => f.guild_id));
  for (const r of rows) if (r.guildId && was.has(r.guildId)) out.add(r);
  return out;
}

/** The message a row is about, if any. */
export function messageIdOf(row: { type: string; payload: Record<string, unknown> }): string | null {
  const p = row.payload;
  if (typeof p.messageId === 'string') return p.messageId;
  if (row.type.startsWith('MESSAGE_') && typeof p.id === 'string') return p.id;
  return null;
}

/**
 * In one query per batch: each row about a message gets that message as it is now (`message`,
 * which delivery renders instead of loading it again per event, its author in `loadedAuthors`),
 * or `gone` when it was deleted since (its MessageDeleted follows).
 */
export async function loadMessages(db: Db, batch: LogRow[]): Promise<void> {
  const ids = new Set<string>();
  // A malformed id is no message (the uuid cast would fail the whole read), as in the tailer's join.
  for (const r of batch) {
    const id = aboutLiveMessage(r) ? messageIdOf(r)! : '';
    if (UUID.test(id)) ids.add(id);
  }
  if (!ids.size) return;
  const found = await db
    .select({ m: messages, u: users })
    .from(messages)
    .leftJoin(users, eq(users.id, messages.authorId))
    .where(and(inArray(messages.id, [...ids]), isNull(messages.deletedAt)));
  const alive = new Map(found.map((f) => [f.m.id, f]));
  for (const r of batch) {
    if (!aboutLiveMessage(r)) continue;
    // found as a uuid, in lower case, whatever case the row wrote it in (as the tailer's join)
    const f = alive.get(messageIdOf(r)!.toLowerCase());
    withMessage(r, f?.m, f?.u);
  }
}

/** The last position pruned: a cursor before it may have lost rows. */
export async function prunedThrough(db: Db): Promise<Position> {
  const [r] = resultRows<{ value: Position | string }>(
    await db.execute(sql`select value from instance_settings where key = ${WATERMARK_KEY}`),
  );
  return r ? watermarkOf(r.value) : ORIGIN;
}

/** jsonb as node-postgres (parsed) or PGlite (text) hands it over. */
function watermarkOf(value: Position | string): Position {
  const v = typeof value === 'string' ? (JSON.parse(value) as Position) : value;
  return { xid: String(v.xid), seq: Number(v.seq) };
}

/**
 * A cursor a resume may start from: not before the watermark (its rows may be pruned), and not
 * ahead of the log (a transaction that has not even begun: a cursor of another server, or of
 * this database before it was restored into a cluster whose transaction ids are lower, would
 * otherwise be accepted and then deliver nothing, ever). `bounds`: the log's, read after the
 * caller asked (the hub shares one statement between the subscribers asking at once).
 */
export async function assertResumable(
  db: Db,
  after: Position,
  bounds?: Promise<ResumeBounds>,
): Promise<void> {
  const r = await (bounds ?? resumeBounds(db));
  if (
    compareXid(after.xid, r.xmax) >= 0 ||
    (r.restored && (await fromBeforeRestore(db, after, r.restored)))
  ) {
    throw new BanterError(
      'CURSOR_EXPIRED',
      'after: this cursor is not from this event log as it is now (was the database restored or moved?). Fetch afresh and subscribe without after.',
    );
  }
  assertAfterWatermark(after, r.watermark);
}

/** What assertResumable checks a cursor against, whatever the cursor: one statement serves many. */
export interface ResumeBounds {
  watermark: Position;
  restored: Position | undefined;
  xmax: string;
}

/** The log's bounds for resuming, as they are now (see assertResumable). */
export async function resumeBounds(db: Db): Promise<ResumeBounds> {
  const [r] = resultRows<{
    value: Position | string | null;
    restored: Position | string | null;
    xmax: string;
  }>(
    await db.execute(sql`select (select value from instance_settings where key = ${WATERMARK_KEY}) as value,
      (select value from instance_settings where key = ${RESTORED_KEY}) as restored,
      pg_snapshot_xmax(pg_current_snapshot())::text as xmax`),
  );
  return {
    watermark: r.value === null ? ORIGIN : watermarkOf(r.value),
    restored: r.restored === null ? undefined : watermarkOf(r.restored),
    xmax: String(r.xmax),
  };
}

const RESTORED_KEY = 'events.restored_at';

/**
 * Whether a cursor was handed out before the rows from another cluster were discarded (`mark`:
 * that snapshot's xmax and the log's last seq then, or its sequence's if above it: eventsCursor's
 * seqs are drawn from it). A row committed meanwhile by another instance may have a seq up to the
 * mark too, but an xid from the mark on, and it is still there.
 */
async function fromBeforeRestore(db: Db, after: Position, mark: Position): Promise<boolean> {
  // eventsCursor's, as it was handed out before its seq was drawn (startPosition): whether before
  // the restore or after cannot be told, and the other cluster's would be accepted.
  if (after.seq === Number.MAX_SAFE_INTEGER) return true;
  if (after.seq > mark.seq) return false;
  if (compareXid(after.xid, mark.xid) < 0) return true;
  const found = resultRows<{ one: number }>(
    await db.execute(
      sql`select 1 as one from events where seq = ${after.seq} and ${XID} = ${after.xid}::bigint`,
    ),
  );
  return found.length === 0;
}

/**
 * Rows whose transaction ids this cluster has not reached yet: the database was restored into a
 * cluster whose counter is lower (a dump loaded into a new server). New rows would sort before
 * them, and once the counter passed them they would be read, and delivered, a second time. They
 * are deleted, and every cursor handed out before (seq up to the log's last; the sequence goes on
 * from there after a restore) is refused with CURSOR_EXPIRED: the xids it holds mean nothing here.
 * Run before a hub takes its starting position. Returns how many rows were deleted.
 */
export async function discardRowsFromAnotherCluster(db: Db): Promise<number> {
  return db.transaction(async (tx) => {
    await tx.execute(sql`select pg_advisory_xact_lock(4242003)`);
    // One statement, one snapshot: a row another instance commits meanwhile is not this one's to
    // judge (its xid is past this snapshot's xmax, and it is not visible here).
    const [top] = resultRows<{ top: string | null; seq: string | null; xmax: string; n: string }>(
      await tx.execute(sql`with s as (select pg_snapshot_xmax(pg_current_snapshot())::text::bigint as xmax),
        t as (select max(${XID}) as top, greatest(max(seq),
          pg_sequence_last_value(pg_get_serial_sequence('events', 'seq')::regclass)) as seq from events),
        d as (delete from events where ${XID} >= (select xmax from s)
          and (select top from t) >= (select xmax from s) returning 1)
        select (select top from t)::text as top, (select seq from t)::text as seq,
          (select xmax from s)::text as xmax, (select count(*) from d)::text as n`),
    );
    if (top.top === null || compareXid(String(top.top), String(top.xmax)) < 0) return 0;
    const mark: Position = { xid: String(top.xmax), seq: Number(top.seq) };
    await tx.execute(sql`insert into instance_settings (key, value) values (${RESTORED_KEY}, ${JSON.stringify(mark)}::jsonb)
      on conflict (key) do update set value = excluded.value`);
    // The watermark came with the rows, in the other cluster's ids: at or past the mark, every
    // cursor of this cluster's (its xid from the mark on) sorted before it and was CURSOR_EXPIRED,
    // eventsCursor's too, read again and again, until the counter passed it. It goes just below
    // the mark: a cursor from before the restore is refused by the mark, as are the rows' own.
    const watermark = await prunedThrough(tx as unknown as Db);
    if (compareXid(watermark.xid, mark.xid) >= 0) {
      const below: Position = { xid: (BigInt(mark.xid) - 1n).toString(), seq: Number.MAX_SAFE_INTEGER };
      await tx.execute(sql`update instance_settings set value = ${JSON.stringify(below)}::jsonb
        where key = ${WATERMARK_KEY}`);
    }
    return Number(top.n);
  });
}

/** CURSOR_EXPIRED when rows after `after` may have been pruned. */
export function assertAfterWatermark(after: Position, watermark: Position): void {
  if (comparePos(after, watermark) < 0) throw new BanterError('CURSOR_EXPIRED');
}

/** Rows a prune deletes per transaction. */
export const PRUNE_BATCH = 5_000;

/** How much longer than the log's rows who was in a deleted guild is kept (see pruneEvents). */
const FORMER_MEMBERS_MARGIN_MS = 86_400_000;

/**
 * Deletes rows older than the retention and moves the watermark past them: PRUNE_BATCH rows per
 * transaction, each moving the watermark past its own, so that a long backlog (a first prune, a
 * retention shortened) is no single statement running past the database's statement timeout,
 * and no result of millions of rows. Returns how many were deleted.
 *
 * Age is by the database's clock, which dated the rows (created_at): an app whose clock ran days
 * ahead took rows the tailers had not read yet, and every cursor with them. `now` (tests) stands
 * in for it. Only rows below the `exact` horizon (see Horizon) go: a row committed after a
 * transaction of this database that is still open waits for it to end before any tailer reads
 * it, and one such transaction left open past the retention (a session idle in a transaction, a
 * forgotten prepared one) made the prune take those rows first, and every live stream missed
 * them once it ended. So no row is ever committed below the watermark after it moved.
 *
 * Rows go by age, and the watermark is the highest position deleted: a row dated before rows
 * ahead of it in log order (created_at is its transaction's start, its position the transaction's
 * first write) moves the watermark past them, and cursors among them are refused while their
 * rows are still there. That errs only toward CURSOR_EXPIRED (every row after a cursor at or past
 * the watermark is there), and only by the time between a writing transaction's start and its
 * first write: short for Banter's own writes, the only ones to this table (a few reads, or a wait
 * on a short advisory lock, come before it). An instance
 * whose tailer has not read a row that went is told by the watermark (see lostToPrune in hub.ts).
 */
export async function pruneEvents(db: Db, retentionDays: number, now?: Date): Promise<number> {
  return (await prune(db, retentionDays, now)).deleted;
}

/**
 * What an operator needs to know of the log after a prune (pruneEventsReporting): how old its
 * oldest row is, and whether the prune was held back (rows past the retention left because a
 * transaction of this database that began before they were written is still open), and by what.
 */
export interface PruneStatus {
  /** rows deleted */
  deleted: number;
  /** age of the oldest row left, in seconds by the database's clock (0: the log is empty) */
  oldestAgeSeconds: number;
  /** how far past the retention the oldest row left is, in seconds (0: not held back) */
  heldBackSeconds: number;
  /** when held back: the transaction at the prune's horizon (the oldest of this database open), if found */
  holder?: PruneHolder;
}

/** The transaction that holds the prune back (see PruneStatus). */
export interface PruneHolder {
  /** its backend (null: a prepared transaction, which has none) */
  pid: number | null;
  applicationName: string | null;
  user: string | null;
  /** pg_stat_activity's state ('idle in transaction', 'active'), or 'prepared' */
  state: string | null;
  /** seconds since it began (a prepared one: since it was prepared) */
  ageSeconds: number;
  xid: string;
  /** a prepared transaction's gid */
  gid?: string;
}

/** pruneEvents, then the log's state after it (see PruneStatus): the hub's prune, for its log and metrics. */
export async function pruneEventsReporting(db: Db, retentionDays: number, now?: Date): Promise<PruneStatus> {
  const { deleted, cutoff } = await prune(db, retentionDays, now);
  return { deleted, ...(await statusAfterPrune(db, cutoff, now)) };
}

/** The log's state after a prune whose cutoff was `cutoff` (see PruneStatus). */
async function statusAfterPrune(
  db: Db,
  cutoff: string,
  now: Date | undefined,
): Promise<Omit<PruneStatus, 'deleted'>> {
  const [r] = resultRows<{ age: number | string | null; held: number | string | null }>(
    await db.execute(sql`select extract(epoch from coalesce(${now?.toISOString() ?? null}::timestamptz, now()) - o.t)::float8 as age,
        greatest(0, extract(epoch from ${cutoff}::timestamptz - o.t))::float8 as held
      from (select min(created_at) as t from events) o`),
  );
  const status = { oldestAgeSeconds: Number(r.age ?? 0), heldBackSeconds: Number(r.held ?? 0) };
  if (!status.heldBackSeconds) return status;
  // The `exact` horizon's transaction: the prune deletes only rows below it.
  const [h] = resultRows<{
    pid: number | null;
    application_name: string | null;
    user: string | null;
    state: string | null;
    age: number | string;
    xid: string;
    gid: string | null;
  }>(
    await db.execute(
      sql.raw(`with h as (select (${EXACT_BOUND}) as x from (select pg_current_snapshot() as s) t)
      select a.pid, a.application_name, a.usename::text as user, a.state,
          extract(epoch from now() - a.xact_start)::float8 as age, h.x::text as xid, null::text as gid
        from h join pg_stat_activity a on a.backend_xid = h.x::xid
      union all
      select null, null, p.owner::text, 'prepared', extract(epoch from now() - p.prepared)::float8, h.x::text, p.gid
        from h join pg_prepared_xacts p on p.transaction = h.x::xid
      limit 1`),
    ),
  );
  if (!h) return status;
  const holder: PruneHolder = {
    pid: h.pid === null ? null : Number(h.pid),
    applicationName: h.application_name,
    user: h.user,
    state: h.state,
    ageSeconds: Number(h.age),
    xid: String(h.xid),
  };
  if (h.gid !== null) holder.gid = h.gid;
  return { ...status, holder };
}

/** The prune (see pruneEvents): how many rows it deleted, and its cutoff (ISO 8601). */
async function prune(
  db: Db,
  retentionDays: number,
  now: Date | undefined,
): Promise<{ deleted: number; cutoff: string }> {
  // As JSON's text, ISO 8601 with its offset whatever the session's DateStyle: ::text follows it,
  // and with DateStyle SQL or Postgres prints a zone's abbreviation, which input may read as
  // another zone's (Asia/Shanghai's 'CST' as US Central: a cutoff 14 h late, rows that young gone).
  const [c] = resultRows<{ cutoff: string }>(
    await db.execute(sql`select to_json(coalesce(${now?.toISOString() ?? null}::timestamptz, now())
      - ${retentionDays} * interval '1 day') #>> '{}' as cutoff`),
  );
  const cutoff = String(c.cutoff);
  let total = 0;
  for (;;) {
    const n = await db.transaction(async (tx) => {
      await tx.execute(sql`select pg_advisory_xact_lock(4242003)`);
      const deleted = resultRows<{ xid: string; seq: string }>(
        await tx.execute(sql`delete from events where seq in (
            select seq from events where created_at < ${cutoff}::timestamptz and ${FINISHED.exact}
            order by created_at limit ${PRUNE_BATCH})
          returning xid::text as xid, seq`),
      );
      if (!deleted.length) return 0;
      let top: Position = await prunedThrough(tx as unknown as Db);
      for (const d of deleted) {
        const p = { xid: String(d.xid), seq: Number(d.seq) };
        if (comparePos(p, top) > 0) top = p;
      }
      await tx.execute(sql`insert into instance_settings (key, value) values (${WATERMARK_KEY}, ${JSON.stringify(top)}::jsonb)
        on conflict (key) do update set value = excluded.value`);
      return deleted.length;
    });
    total += n;
    if (n < PRUNE_BATCH) break;
    await turn();
  }
  // Who was in a deleted guild goes after the last expired rows: a GUILD_DELETED row an earlier
  // batch had not deleted yet was still replayed, and needed them. PRUNE_BATCH per transaction
  // too: a deleted guild of 300k members, in the last batch's transaction, held it (and every
  // realtime stream with it) ~0.5 s. And a day after its cutoff: the rows are dated when the
  // recording ran (recordFormerMembers), seconds before the GUILD_DELETED row; a cutoff between
  // the two took them while the row that needs them stayed, and a member's replay lost it.
  const formerCutoff = sql`(${cutoff}::timestamptz - ${FORMER_MEMBERS_MARGIN_MS} * interval '1 millisecond')`;
  for (;;) {
    const n = await db.transaction(async (tx) => {
      await tx.execute(sql`select pg_advisory_xact_lock(4242003)`);
      const [r] = resultRows<{ n: number }>(
        await tx.execute(sql`with d as (delete from ${formerMembers} where (guild_id, user_id) in (
            select guild_id, user_id from ${formerMembers} where deleted_at < ${formerCutoff} limit ${PRUNE_BATCH})
          returning 1) select count(*)::int as n from d`),
      );
      return Number(r.n);
    });
    if (n < PRUNE_BATCH) break;
    await turn();
  }
  return { deleted: total, cutoff };
}

/**
 * One turn of the event loop. PGlite answers in process, its promises settling without one: a
 * prune of a long backlog (a server started after a week down) ran batch after batch while no
 * request, socket or timer of the embedded server was served (300k rows: 2.5 s).
 */
const turn = () => new Promise<void>((r) => setImmediate(r));
