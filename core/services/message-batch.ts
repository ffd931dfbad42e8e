/**
 * Group insert for the common send: concurrent sends of one process share one statement (one
 * round trip, one commit) instead of one each. A send that finds no statement running goes out
 * at once, alone; otherwise it waits for the running statement to finish, and the next statement
 * carries everything queued meanwhile. Only if the running statement is slow (STALL_MS) does a
 * second one start beside it, so one stalled statement does not stall every send. Each
 * message's row, mentions and MESSAGE_CREATED event are still written by the same statement, so
 * all or none of them exist.
 *
 * If a group statement fails, its sends are retried one per statement, so one bad row (a channel
 * deleted meanwhile) fails only its own request.
 *
 * The rows go in in channel id order: their key checks lock their channels (FOR KEY SHARE) in that
 * order, a channel before its threads (made after it, their ids sort after), as a channel's
 * deletion locks them. In message id order, a statement holding a thread while it waited on the
 * channel deadlocked beside the deletion holding the channel and waiting on the thread, and when
 * the deletion was the one Postgres failed, it answered INTERNAL_SERVER_ERROR.
 */
import { type Database, followerOf } from '../db/client.ts';
import { fromRowJson } from '../db/row-json.ts';
import { messages, users } from '../db/tables.ts';
import type { WrittenLog } from '../realtime/log.ts';
import type { MessageRow } from './message.service.ts';
import { loadedAuthors } from './message-history.service.ts';

export interface BatchRow {
  id: string;
  channelId: string;
  guildId: string | null;
  authorId: string;
  content: string;
  createdAt: Date;
  replyToId: string | null;
  forwardedFromId: string | null;
  nonce: string | null;
  mentionEveryone: boolean;
  mentionRoleIds: string[];
  mentionUserIds: string[];
}

/** What a send gets back: its row (author loaded) and event; none when the nonce index conflicted. */
export interface BatchResult {
  message: MessageRow;
  seq: number;
}

/** One inserted message as the statement returns it. */
interface Inserted {
  m: Record<string, unknown>;
  u: Record<string, unknown> | null;
  seq: string | number;
  xid: string;
  /** no other transaction was in progress when the statement began */
  alone: boolean;
  before_xid: string | null;
  before_seq: string | number | null;
}

const MAX_IN_FLIGHT = 2;
/**
 * How long a queued send waits behind a running statement before a second statement starts.
 * Waiting for the running one makes bigger groups (fewer statements and commits): measured ~10%
 * more sends per second than always running two.
 */
const STALL_MS = 10;
const MAX_BATCH = 64;

const GROUP_SQL = `
  with v as (
    select * from unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::uuid[], $5::text[], $6::timestamptz[],
      $7::uuid[], $8::uuid[], $9::text[], $10::boolean[], $11::text[])
      as v(id, channel_id, guild_id, author_id, content, created_at, reply_to_id, forwarded_from_id,
        nonce, mention_everyone, mention_role_ids)
  ), m as (
    insert into messages (id, channel_id, guild_id, author_id, content, created_at, reply_to_id,
      forwarded_from_id, nonce, mention_everyone, mention_role_ids)
    select id, channel_id, guild_id, author_id, content, created_at, reply_to_id, forwarded_from_id,
      nonce, mention_everyone, mention_role_ids::uuid[]
    from v order by channel_id, id
    on conflict do nothing
    returning *
  ), mm as (
    insert into message_mentions (message_id, user_id, channel_id)
    select m.id, x.u, m.channel_id from m join unnest($12::uuid[], $13::uuid[]) as x(mid, u) on x.mid = m.id
  ), e as (
    insert into events (type, guild_id, channel_id, payload)
    select 'MESSAGE_CREATED', m.guild_id, m.channel_id, json_build_object('messageId', m.id)
    from m order by m.id
    returning seq, xid, payload->>'messageId' as mid
  ), w as (
    select pg_snapshot_xmin(s) = pg_current_xact_id() and pg_snapshot_xmax(s) = pg_current_xact_id() as alone
    from (select pg_current_snapshot() as s) t
  ), b as (
    select events.xid::text as xid, events.seq from events
    where (select alone from w) and (events.xid::text::bigint) < pg_current_xact_id()::text::bigint
    order by (events.xid::text::bigint) desc, events.seq desc limit 1
  )
  select row_to_json(m.*) as m, row_to_json(u.*) as u, e.seq, e.xid::text as xid, w.alone,
    b.xid as before_xid, b.seq as before_seq
  from m join e on e.mid = m.id::text left join users u on u.id = m.author_id
    cross join w left join b on true`;

/**
 * The statement's rows as the realtime hub takes them, when it may (log order is xid, then seq).
 * `w` says whether no other transaction was in progress when the statement's snapshot was taken:
 * its xmin (the oldest one in progress, else xmax) and xmax (one past the newest finished) are
 * both this statement's own xid, assigned after. Then every transaction with a lower xid had
 * finished, its rows visible to this statement; `b` is the last of them, and no row can ever be
 * committed between it and this write's rows. (Another database's transactions count too: telling
 * them apart reads pg_stat_activity, too dear for every send; see Horizon in log.ts.) Otherwise
 * the hub reads the log as for any ring, and `b` does not run (a one-time filter: joined with `w`
 * instead, the backward index scan went on through the whole log looking for a row to pair with
 * `alone`).
 */
function writtenLog(inserted: Inserted[], results: Map<string, BatchResult>): WrittenLog | undefined {
  const first = inserted[0];
  if (!first?.alone) return undefined;
  const rows = inserted
    .map((r) => {
      const { message } = results.get(r.m.id as string)!;
      return {
        xid: String(r.xid),
        seq: Number(r.seq),
        type: 'MESSAGE_CREATED',
        guildId: message.guildId,
        channelId: message.channelId,
        userId: null,
        payload: { messageId: message.id },
        message,
      };
    })
    .sort((a, b) => a.seq - b.seq);
  const before = first.before_xid === null ? null : { xid: first.before_xid, seq: Number(first.before_seq) };
  return { rows, before };
}

interface Waiting {
  row: BatchRow;
  resolve(r: BatchResult | undefined): void;
  reject(err: unknown): void;
}

class Batcher {
  private queue: Waiting[] = [];
  private inFlight = 0;
  private stallTimer: NodeJS.Timeout | undefined;

  constructor(private database: Database) {}

  /** sends waiting for a statement */
  get queued() {
    return this.queue.length;
  }

  insert(row: BatchRow): Promise<BatchResult | undefined> {
    return new Promise((resolve, reject) => {
      this.queue.push({ row, resolve, reject });
      if (this.inFlight === 0) this.flush();
      else this.armStallTimer();
    });
  }

  /** A second statement for the queue if it still waits STALL_MS from now. */
  private armStallTimer() {
    if (this.stallTimer || this.inFlight >= MAX_IN_FLIGHT || !this.queue.length) return;
    this.stallTimer = setTimeout(() => {
      this.stallTimer = undefined;
      if (this.inFlight < MAX_IN_FLIGHT) this.flush();
    }, STALL_MS);
  }

  private flush() {
    if (this.stallTimer) {
      clearTimeout(this.stallTimer);
      this.stallTimer = undefined;
    }
    const group = this.queue.splice(0, MAX_BATCH);
    if (!group.length) return;
    this.inFlight++;
    this.run(group).finally(() => {
      this.inFlight--;
      if (this.queue.length) this.flush();
    });
    // More than one group queued: the rest waits for a statement to finish, or STALL_MS.
    this.armStallTimer();
  }

  private async run(group: Waiting[]) {
    try {
      const results = await this.statement(group.map((w) => w.row));
      for (const w of group) w.resolve(results.get(w.row.id));
    } catch (err) {
      if (group.length === 1) {
        group[0].reject(err);
        return;
      }
      await Promise.all(
        group.map(async (w) => {
          try {
            w.resolve((await this.statement([w.row])).get(w.row.id));
          } catch (e) {
            w.reject(e);
          }
        }),
      );
    }
  }

  private async statement(rows: BatchRow[]): Promise<Map<string, BatchResult>> {
    const mentionMessage: string[] = [];
    const mentionUser: string[] = [];
    for (const r of rows) {
      for (const u of r.mentionUserIds) {
        mentionMessage.push(r.id);
        mentionUser.push(u);
      }
    }
    const params = [
      rows.map((r) => r.id),
      rows.map((r) => r.channelId),
      rows.map((r) => r.guildId),
      rows.map((r) => r.authorId),
      rows.map((r) => r.content),
      rows.map((r) => r.createdAt),
      rows.map((r) => r.replyToId),
      rows.map((r) => r.forwardedFromId),
      rows.map((r) => r.nonce),
      rows.map((r) => r.mentionEveryone),
      // One array literal per row: unnest would flatten a two-dimensional array.
      rows.map((r) => `{${r.mentionRoleIds.join(',')}}`),
      mentionMessage,
      mentionUser,
    ];
    let results: Map<string, BatchResult> | undefined;
    const convert = (inserted: Inserted[]) => {
      results ??= new Map(
        inserted.map((r) => {
          const message = fromRowJson(messages, r.m);
          if (r.u) loadedAuthors.set(message, fromRowJson(users, r.u));
          return [message.id, { message, seq: Number(r.seq) }];
        }),
      );
      return results;
    };
    // The realtime hub takes these rows the moment the result arrives (followCommits in
    // core/db/client.ts): from the result itself when it may, else by reading the log on this
    // connection, idle by then. Either way before this process does anything else.
    const follower = followerOf(this.database);
    const out = await this.database.prepared<Inserted>(
      'banter_send_messages',
      GROUP_SQL,
      params,
      follower &&
        ((db, inserted) =>
          inserted.length ? follower(db, writtenLog(inserted, convert(inserted))) : undefined),
    );
    return convert(out);
  }
}

const batchers = new WeakMap<Database, Batcher>();

/** Inserts the message, its mentions and its event, grouped with concurrent sends. */
export function insertGrouped(database: Database, row: BatchRow): Promise<BatchResult | undefined> {
  let b = batchers.get(database);
  if (!b) {
    b = new Batcher(database);
    batchers.set(database, b);
  }
  return b.insert(row);
}

/** How many sends on `database` wait for a group statement now (tests wait on it). */
export function queuedSends(database: Database): number {
  return batchers.get(database)?.queued ?? 0;
}
