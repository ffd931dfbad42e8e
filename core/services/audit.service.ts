import { sql } from 'drizzle-orm';
import { resultRows, type Tx } from '../db/client.ts';
import { auditLog } from '../db/tables.ts';
import { newId } from '../ids.ts';

export interface AuditEntry {
  guildId: string;
  actorId: string | null;
  /** e.g. GUILD_UPDATE, CHANNEL_CREATE, MEMBER_KICK, MEMBER_BAN, ROLE_UPDATE ... */
  action: string;
  targetType?: 'GUILD' | 'CHANNEL' | 'USER' | 'ROLE' | 'INVITE' | 'MESSAGE' | null;
  targetId?: string | null;
  reason?: string | null;
  changes?: Record<string, unknown> | null;
}

/** Writes an audit-log row in the caller's transaction: it lands exactly when the action does. */
export async function writeAudit(tx: Tx, e: AuditEntry): Promise<void> {
  await tx.insert(auditLog).values({
    id: newId(),
    guildId: e.guildId,
    actorId: e.actorId,
    action: e.action,
    targetType: e.targetType ?? null,
    targetId: e.targetId ?? null,
    reason: e.reason ?? null,
    changes: e.changes ?? null,
  });
}

/**
 * The guild's row FOR KEY SHARE, taken first by a transaction that locks or changes the guild's
 * rows (a channel, a member, a message) and then writes its audit row: that insert's foreign key
 * takes this lock, and deleteGuild, holding the guild FOR UPDATE while its cascade waits on those
 * rows, would deadlock with it. Taken first, it waits for the deletion (and then finds nothing), or
 * holds it off until this transaction commits. Whether the guild is there.
 */
export async function holdGuild(tx: Tx, guildId: string): Promise<boolean> {
  const r = await tx.execute(sql`select 1 from guilds where id = ${guildId}::uuid for key share`);
  return resultRows(r).length > 0;
}
