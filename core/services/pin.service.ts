/**
 * Pinned messages: a pin is `messages.pinned_at` / `pinned_by`. Pinning twice or unpinning an
 * unpinned message is a no-op (no error, no event).
 */
import { and, desc, eq, isNotNull, isNull, sql } from 'drizzle-orm';
import type { Tx } from '../db/client.ts';
import { channels, messages } from '../db/tables.ts';
import type { Deps, Viewer } from '../deps.ts';
import { conflict, notFound } from '../errors.ts';
import { type EventWriter, transact } from '../events.ts';
import { has, Permission } from '../permissions.ts';
import { requireChannel } from './access.service.ts';
import { holdGuild, writeAudit } from './audit.service.ts';
import type { MessageRow } from './message.service.ts';
import { loadVisibleMessage } from './message-history.service.ts';

/** Pins one channel may hold (deleted messages do not count); one more is CONFLICT. */
export const MAX_PINS = 50;

const PIN_NEEDS = Permission.PIN_MESSAGES | Permission.READ_HISTORY;

export async function pinMessage(deps: Deps, viewer: Viewer, messageId: string): Promise<MessageRow> {
  const { row: message } = await loadVisibleMessage(deps, viewer, messageId, PIN_NEEDS);
  return transact(deps, async (tx, log) => {
    if (message.guildId) await holdGuild(tx, message.guildId);
    // One pinner per channel at a time, so concurrent pins cannot count past MAX_PINS. NO KEY
    // UPDATE leaves the FK share locks of message inserts in this channel unblocked.
    await tx
      .select({ id: channels.id })
      .from(channels)
      .where(eq(channels.id, message.channelId))
      .for('no key update');
    const [m] = await tx.select().from(messages).where(eq(messages.id, message.id)).for('no key update');
    if (!m || m.deletedAt) throw notFound('Message');
    if (m.pinnedAt) return m;
    const [{ n }] = await tx
      .select({ n: sql<number>`count(*)::int` })
      .from(messages)
      .where(
        and(eq(messages.channelId, m.channelId), isNotNull(messages.pinnedAt), isNull(messages.deletedAt)),
      );
    if (Number(n) >= MAX_PINS) throw conflict(`A channel can have at most ${MAX_PINS} pinned messages.`);
    // The database clock has microseconds, so pins made in the same millisecond still order.
    const [pinned] = await tx
      .update(messages)
      .set({ pinnedAt: sql`clock_timestamp()`, pinnedBy: viewer.userId })
      .where(eq(messages.id, m.id))
      .returning();
    await recordPinChange(tx, log, viewer, m, true);
    return pinned;
  });
}

export async function unpinMessage(deps: Deps, viewer: Viewer, messageId: string): Promise<MessageRow> {
  const { row: message } = await loadVisibleMessage(deps, viewer, messageId, PIN_NEEDS);
  return transact(deps, async (tx, log) => {
    if (message.guildId) await holdGuild(tx, message.guildId);
    const [unpinned] = await tx
      .update(messages)
      .set({ pinnedAt: null, pinnedBy: null })
      .where(and(eq(messages.id, message.id), isNotNull(messages.pinnedAt), isNull(messages.deletedAt)))
      .returning();
    if (!unpinned) return message;
    await recordPinChange(tx, log, viewer, unpinned, false);
    return unpinned;
  });
}

/**
 * A channel's pinned messages, newest pin first. A viewer who sees the channel but lacks
 * READ_HISTORY gets an empty list rather than an error, so channel lists keep resolving.
 */
export async function pinnedMessages(deps: Deps, viewer: Viewer, channelId: string): Promise<MessageRow[]> {
  const access = await requireChannel(deps.db, viewer.userId, channelId, 0n, deps.now());
  if (!has(access.permissions, Permission.READ_HISTORY)) return [];
  return deps.db
    .select()
    .from(messages)
    .where(and(eq(messages.channelId, channelId), isNotNull(messages.pinnedAt), isNull(messages.deletedAt)))
    .orderBy(desc(messages.pinnedAt), desc(messages.id))
    .limit(MAX_PINS);
}

/** The audit row (guild channels only) and the event a pin or an unpin writes, in its transaction. */
async function recordPinChange(
  tx: Tx,
  log: EventWriter,
  viewer: Viewer,
  m: Pick<MessageRow, 'id' | 'guildId' | 'channelId'>,
  pinned: boolean,
): Promise<void> {
  if (m.guildId) {
    await writeAudit(tx, {
      guildId: m.guildId,
      actorId: viewer.userId,
      action: pinned ? 'MESSAGE_PIN' : 'MESSAGE_UNPIN',
      targetType: 'MESSAGE',
      targetId: m.id,
      changes: { channelId: m.channelId },
    });
  }
  await log.append({
    type: pinned ? 'MESSAGE_PINNED' : 'MESSAGE_UNPINNED',
    guildId: m.guildId,
    channelId: m.channelId,
    payload: { messageId: m.id, channelId: m.channelId, userId: viewer.userId },
  });
}
