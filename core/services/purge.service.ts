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
import { type Db, resultRows } from '../db/client.ts';

export const PURGE_BATCH = 500;

/** Deletes the rows of `table` that `where` selects, PURGE_BATCH per statement. */
async function inBatches(db: Db, table: SQL, where: SQL) {
  for (;;) {
    // By ctid: one statement shape for every table, whatever its key.
    const [r] = resultRows<{ n: number }>(
      await db.execute(sql`with d as (
        delete from ${table} where ctid = any(array(select ctid from ${table} where ${where} limit ${PURGE_BATCH}))
        returning 1) select count(*)::int as n from d`),
    );
    // Until a batch finds nothing: one that deleted fewer (rows another deletion of the same
    // thing took, or updated under it) would leave the rest to the cascade.
    if (Number(r.n) === 0) return;
  }
}

/** Clears the bulk of channels (with their threads, given) or of a guild ahead of its deletion. */
export async function purgeBeforeDeletion(db: Db, of: { channelIds: string[] } | { guildId: string }) {
  if ('guildId' in of) {
    const g = sql`${of.guildId}::uuid`;
    await inBatches(db, sql`messages`, sql`guild_id = ${g}`);
    await inBatches(db, sql`read_states`, sql`channel_id in (select id from channels where guild_id = ${g})`);
    await inBatches(db, sql`audit_log`, sql`guild_id = ${g}`);
    return;
  }
  if (!of.channelIds.length) return;
  const ids = sql`${`{${of.channelIds.join(',')}}`}::uuid[]`;
  await inBatches(db, sql`messages`, sql`channel_id = any(${ids})`);
  await inBatches(db, sql`read_states`, sql`channel_id = any(${ids})`);
}
