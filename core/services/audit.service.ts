import type { Tx } from '../db/client.ts';
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
