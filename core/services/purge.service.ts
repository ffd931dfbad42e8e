/**
 * What goes before a channel or a guild is deleted. Its cascade did all of it in one statement,
 * and the realtime log delivers nothing written after a transaction still in progress (log.ts,
 * Horizon): deleting a guild of 200k messages held every stream of every guild for ~10 s. The
 * bulk (messages with their reactions, edits, mentions and attachments; read states; a guild's
 * audit log) now goes first, PURGE_BATCH rows per statement, each its own transaction, so
 * delivery elsewhere waits for one batch at most (tens of ms). Until the deletion itself the
 * channel or guild is still there, its history thinning; what is written meanwhile goes with the
 * cascade. The messages' log events stay: delivery finds their messages gone and skips them, and
 * the deletion's event hides them after.
 */
import { type SQL, sql } from 'drizzle-orm';
import { type Db, resultRows, type Tx, uuidArray } from '../db/client.ts';
import { UUID, unfinishedFrom } from '../realtime/log.ts';

export const PURGE_BATCH = 500;

/**
 * Deletes the rows of `table` that `where` selects, PURGE_BATCH per statement, in the order of
 * `key` (a uuid column that an index on the `where` columns then `key` orders): each batch
 * starts where the last ended. Selecting "any 500 left" instead walked the index over every
 * entry deleted so far (dead until vacuumed), each batch longer than the last: a guild of 200k
 * messages took 14.7 s to delete in batches that way, against 6.8 s for the cascade.
 */
async function inBatches(db: Db, table: SQL, key: SQL, where: SQL) {
  let after = '00000000-0000-0000-0000-000000000000';
  for (;;) {
    const [r] = resultRows<{ n: number; last: string | null }>(
      await db.execute(sql`with d as (
        delete from ${table} where ${where} and ${key} in (
          select ${key} from ${table} where ${where} and ${key} > ${after}::uuid order by ${key} limit ${PURGE_BATCH})
        returning ${key} as k) select count(*)::int as n, max(k::text) as last from d`),
    );
    // Until a batch finds nothing: rows written meanwhile (later ids) are taken too, and the
    // few left behind (another deletion of the same thing took a batch's rows first) go with
    // the cascade.
    if (Number(r.n) === 0 || !r.last) return;
    after = r.last;
  }
}

/** Clears the bulk of channels (with their threads, given) or of a guild ahead of its deletion. */
export async function purgeBeforeDeletion(db: Db, of: { channelIds: string[] } | { guildId: string }) {
  const channelIds =
    'guildId' in of
      ? resultRows<{ id: string }>(
          await db.execute(sql`select id from channels where guild_id = ${of.guildId}::uuid`),
        ).map((r) => r.id)
      : of.channelIds;
  // Only the channels that have rows in a table: a channel may have tens of thousands of
  // threads, most of them with nothing to purge (a statement per empty thread took minutes).
  const ids = uuidArray(channelIds);
  for (const [table, key] of [
    [sql`messages`, sql`id`],
    [sql`read_states`, sql`user_id`],
  ] as const) {
    const holding = resultRows<{ c: string }>(
      await db.execute(
        sql`select c from unnest(${ids}) c where exists (select 1 from ${table} where channel_id = c)`,
      ),
    );
    for (const { c } of holding) await inBatches(db, table, key, sql`channel_id = ${c}::uuid`);
  }
  if ('guildId' in of) await inBatches(db, sql`audit_log`, sql`id`, sql`guild_id = ${of.guildId}::uuid`);
}

/** Members recorded per transaction by recordFormerMembers. */
const RECORD_BATCH = 1_000;

/** The membership changes the log records, each with the member as payload.userId. */
const MEMBERSHIP_EVENTS = sql`('MEMBER_JOINED', 'MEMBER_LEFT', 'MEMBER_KICKED', 'MEMBER_BANNED')`;

/**
 * Who is in a guild about to be deleted, recorded in former_members (who hears of the deletion,
 * live or in a replay) RECORD_BATCH members per transaction, in user id order; rows a deletion
 * that never happened left for users who are no longer members go in the same batches (by user
 * id range). In the deletion's own transaction this took ~30 us a member (its keys and the users
 * foreign key): 100k members held every stream of every guild for 2.6-4 s. Returns where the
 * recording began in the log (unfinishedFrom): every membership change it may have missed
 * commits with its MEMBER_* row at or after it, and the deletion's transaction settles those
 * members alone (settleFormerMembers). Rows recorded for a deletion that never happens are read
 * by nothing (only a GUILD_DELETED row looks them up), and go with the log's retention or with
 * the next deletion's recording. A row such a deletion left is dated again here: retention
 * prunes former_members by that date (pruneEvents), and one kept from a deletion that failed
 * more than the retention ago went while the GUILD_DELETED row that needs it stayed: the
 * member's replay lost the deletion.
 */
export async function recordFormerMembers(db: Db, guildId: string): Promise<string> {
  const from = await unfinishedFrom(db);
  const g = sql`${guildId}::uuid`;
  let after = '00000000-0000-0000-0000-000000000000';
  for (;;) {
    // The batch's members are recorded; the rows of non-members in its range (after, last], or
    // past `after` in the last batch, are forgotten. Disjoint sets: one statement does both. Not
    // once the guild is gone: another deletion of it (a double submit) committed, and its rows are
    // who was in it, each a non-member now; forgotten, no member replaying the log heard of it.
    const [r] = resultRows<{ n: number; last: string | null }>(
      await db.execute(sql`with b as (
          select user_id from members where guild_id = ${g} and user_id > ${after}::uuid
          order by user_id limit ${RECORD_BATCH}),
        top as (select count(*)::int as n, max(user_id::text)::uuid as last from b),
        i as (insert into former_members (guild_id, user_id) select ${g}, user_id from b
          on conflict (guild_id, user_id) do update set deleted_at = excluded.deleted_at),
        d as (delete from former_members f where f.guild_id = ${g} and f.user_id > ${after}::uuid
          and exists (select 1 from guilds where id = ${g})
          and ((select n from top) < ${RECORD_BATCH} or f.user_id <= (select last from top))
          and not exists (select 1 from members m where m.guild_id = ${g} and m.user_id = f.user_id))
        select n, last::text as last from top`),
    );
    if (Number(r.n) < RECORD_BATCH || !r.last) return from;
    after = r.last;
  }
}

/**
 * In the deletion's transaction, the guild locked: former_members becomes exactly its members
 * now. recordFormerMembers made it so as of its statements, outside it; a member who joined or
 * left since (or while it ran) wrote a MEMBER_* log row with a transaction id at or after `from`,
 * what it returned: only those members are looked at again. Comparing all of both sets here
 * took ~0.35-0.5 s for 300k members with nothing to do, in the transaction that holds every
 * realtime stream (log.ts, Horizon).
 */
export async function settleFormerMembers(tx: Db | Tx, guildId: string, from: string) {
  const g = sql`${guildId}::uuid`;
  // The log's rows from `from` on (events_order, the log's read order: the seconds the recording
  // took), then this guild's: along events_guild a big guild's whole history would be read. Only
  // userIds that read as a uuid (log.ts UUID): a log row's malformed payload must not fail the deletion.
  const changed = resultRows<{ user_id: string }>(
    await tx.execute(sql`select distinct (payload->>'userId')::uuid as user_id from (
        select guild_id, type, payload from events where (xid::text::bigint) >= ${from}::bigint offset 0) e
      where guild_id = ${g} and type in ${MEMBERSHIP_EVENTS} and payload->>'userId' ~* ${UUID.source}`),
  ).map((r) => r.user_id);
  if (!changed.length) return;
  // Looked up by key (one array parameter): joined to the set, a plan could read them all.
  const ids = uuidArray(changed);
  await tx.execute(sql`delete from former_members f where f.guild_id = ${g} and f.user_id = any(${ids})
    and not exists (select 1 from members m where m.guild_id = ${g} and m.user_id = f.user_id)`);
  await tx.execute(sql`insert into former_members (guild_id, user_id)
    select ${g}, m.user_id from members m where m.guild_id = ${g} and m.user_id = any(${ids})
    on conflict do nothing`);
}
