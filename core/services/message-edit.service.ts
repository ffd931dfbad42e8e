/**
 * Editing and deleting messages. Only the author edits; the author or a MANAGE_MESSAGES holder
 * deletes. A delete is soft (the row keeps its id for replies and reports) but wipes everything
 * the author wrote, including edit history, and the message is NOT_FOUND from then on.
 */
import { and, eq, isNull } from 'drizzle-orm';
import { messageEdits, messageMentions, messages } from '../db/tables.ts';
import type { Deps, Viewer } from '../deps.ts';
import { forbidden, notFound } from '../errors.ts';
import { transact } from '../events.ts';
import { newId } from '../ids.ts';
import { has, Permission } from '../permissions.ts';
import { holdGuild, writeAudit } from './audit.service.ts';
import { lookupMentions } from './mentions.ts';
import { type MessageRow, validateContent, wipeMessages } from './message.service.ts';
import { loadVisibleMessage } from './message-history.service.ts';

export interface EditMessageInput {
  id: string;
  content: string;
}

export async function editMessage(deps: Deps, viewer: Viewer, input: EditMessageInput): Promise<MessageRow> {
  const { row, access } = await loadVisibleMessage(deps, viewer, input.id);
  if (row.authorId !== viewer.userId) throw forbidden('Only the author can edit a message.');
  const content = validateContent(input.content, !!row.forwardedFromId);
  // Saving the same text is not an edit: no history entry, no event.
  if (content === row.content) return row;
  const mentions = await lookupMentions(deps.db, access, content);
  const now = deps.now();
  return transact(deps, async (tx, log) => {
    // Locks the row so concurrent edits each record the version they replaced.
    const [current] = await tx
      .select({ content: messages.content })
      .from(messages)
      .where(and(eq(messages.id, row.id), isNull(messages.deletedAt)))
      .for('update');
    if (!current) throw notFound('Message');
    await tx
      .insert(messageEdits)
      .values({ id: newId(), messageId: row.id, content: current.content, editedAt: now });
    const [updated] = await tx
      .update(messages)
      .set({ content, editedAt: now, mentionEveryone: mentions.everyone, mentionRoleIds: mentions.roleIds })
      .where(eq(messages.id, row.id))
      .returning();
    await tx.delete(messageMentions).where(eq(messageMentions.messageId, row.id));
    if (mentions.userIds.length) {
      await tx
        .insert(messageMentions)
        .values(mentions.userIds.map((userId) => ({ messageId: row.id, userId, channelId: row.channelId })));
    }
    await log.append({
      type: 'MESSAGE_UPDATED',
      guildId: row.guildId,
      channelId: row.channelId,
      payload: { messageId: row.id },
    });
    return updated;
  });
}

/** Soft-deletes a message; returns its id. */
export async function deleteMessage(deps: Deps, viewer: Viewer, id: string): Promise<string> {
  const { row, access } = await loadVisibleMessage(deps, viewer, id);
  const own = row.authorId === viewer.userId;
  if (!own && !has(access.permissions, Permission.MANAGE_MESSAGES)) {
    throw forbidden('Only the author or a moderator can delete this message.');
  }
  const now = deps.now();
  await transact(deps, async (tx, log) => {
    // Audited (a moderator's deletion): the guild first (holdGuild), as a pin has it. A guild
    // deletion's cascade waiting on this message row while this audit row's key check waited on
    // the deletion deadlocked, failing one of the two.
    if (!own && row.guildId && !(await holdGuild(tx, row.guildId))) throw notFound('Message');
    const gone = await wipeMessages(tx, eq(messages.id, row.id), now);
    if (!gone.length) throw notFound('Message');
    if (!own && row.guildId) {
      await writeAudit(tx, {
        guildId: row.guildId,
        actorId: viewer.userId,
        action: 'MESSAGE_DELETE',
        targetType: 'MESSAGE',
        targetId: row.id,
        changes: { authorId: row.authorId, channelId: row.channelId },
      });
    }
    await log.append({
      type: 'MESSAGE_DELETED',
      guildId: row.guildId,
      channelId: row.channelId,
      payload: { messageId: row.id, channelId: row.channelId },
    });
  });
  return row.id;
}
