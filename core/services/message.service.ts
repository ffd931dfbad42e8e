/**
 * Messages: the pieces shared by the files that split the work by concern: sending
 * (message-send.service.ts), editing and deleting (message-edit.service.ts), history and batch
 * loads (message-history.service.ts), mention parsing and resolving (mentions.ts).
 */
import { and, isNull, type SQL, sql } from 'drizzle-orm';
import { type Tx, uuidArray } from '../db/client.ts';
import { messageEdits, messageMentions, messages } from '../db/tables.ts';
import { badInput } from '../errors.ts';

export type MessageRow = typeof messages.$inferSelect;

export const MAX_CONTENT = 4000;
export const MAX_NONCE = 64;
export const MAX_ATTACHMENTS = 10;
/** A retry with the same nonce inside this window returns the first message. */
export const NONCE_WINDOW_MS = 10 * 60 * 1000;
/** Channel types that hold messages. */
export const MESSAGE_CHANNEL_TYPES = ['TEXT', 'ANNOUNCEMENT', 'DM', 'GROUP_DM', 'THREAD'];

/**
 * Trims and checks content: 1..4000 characters, or 0..4000 when `allowEmpty` (a forward is
 * itself the content). Length counts UTF-16 code units, as clients' text fields do.
 */
export function validateContent(raw: string, allowEmpty = false): string {
  const content = raw.trim();
  if (!content && !allowEmpty) throw badInput('Message content cannot be empty.', 'content');
  if (content.length > MAX_CONTENT)
    throw badInput(`Message content must be at most ${MAX_CONTENT} characters.`, 'content');
  return content;
}

/**
 * Soft-deletes the messages `where` selects, the one way Banter deletes a message (by its author,
 * a moderator, or a ban's purge): content, nonce, embeds and mention flags wiped, mention rows and
 * edit history removed, deleted_at set. Rows already deleted are skipped. Returns what it deleted.
 */
export async function wipeMessages(
  tx: Tx,
  where: SQL | undefined,
  now: Date,
): Promise<{ id: string; channelId: string }[]> {
  const deleted = await tx
    .update(messages)
    .set({
      deletedAt: now,
      content: '',
      // Freed so a later send may reuse it, and so a retry cannot resurrect a deleted message.
      nonce: null,
      embeds: sql`'[]'::jsonb`,
      mentionEveryone: false,
      mentionRoleIds: [],
    })
    .where(and(where, isNull(messages.deletedAt)))
    .returning({ id: messages.id, channelId: messages.channelId });
  // One array parameter: a ban's purge can wipe more messages than a statement has parameters.
  const ids = uuidArray(deleted.map((m) => m.id));
  if (deleted.length) {
    await tx.delete(messageMentions).where(sql`${messageMentions.messageId} = any(${ids})`);
    await tx.delete(messageEdits).where(sql`${messageEdits.messageId} = any(${ids})`);
  }
  return deleted;
}
