/**
 * Threads: a THREAD channel under the text channel of the message it starts from, at most one
 * per message (channels_thread_source). Its permissions follow the parent: access.service chains
 * overwrites through parent_id, so nothing here computes them.
 */
import { channels } from '../db/tables.ts';
import type { Deps, Viewer } from '../deps.ts';
import { badInput, conflict, forbidden, notFound } from '../errors.ts';
import { transact } from '../events.ts';
import { newId } from '../ids.ts';
import { has, Permission } from '../permissions.ts';
import { type ChannelRowFull, holdChannel, validateChannelName } from './channel.service.ts';
import { loadVisibleMessage } from './message-history.service.ts';

/** Threads hang off guild text channels; DMs and threads themselves do not nest them. */
const THREAD_PARENTS = ['TEXT', 'ANNOUNCEMENT'];

export async function startThread(
  deps: Deps,
  viewer: Viewer,
  input: { messageId: string; name: string },
): Promise<ChannelRowFull> {
  const name = validateChannelName(input.name);
  const { row, access } = await loadVisibleMessage(deps, viewer, input.messageId);
  const parent = access.channel;
  if (!parent.guildId || !THREAD_PARENTS.includes(parent.type))
    throw badInput(`Threads cannot be started in a ${parent.type} channel.`, 'messageId');
  if (!has(access.permissions, Permission.READ_HISTORY | Permission.CREATE_THREADS))
    throw forbidden('You cannot start threads here.');
  const id = newId();
  return transact(deps, async (tx, log) => {
    // A deletion of the channel locks it first and deletes its threads with it (telling of each):
    // one begun before waits for this thread to be in, one committed first leaves no channel here,
    // and so no message to start from. Unlocked, a thread could land beside a deletion, its parent gone.
    if (!(await holdChannel(tx, parent.id))) throw notFound('Message');
    const [thread] = await tx
      .insert(channels)
      .values({
        id,
        guildId: parent.guildId,
        type: 'THREAD',
        name,
        parentId: parent.id,
        sourceMessageId: row.id,
        ownerId: viewer.userId,
        createdAt: deps.now(),
      })
      .onConflictDoNothing()
      .returning();
    if (!thread) throw conflict('A thread was already started from this message.');
    await log.append({
      type: 'CHANNEL_CREATED',
      guildId: parent.guildId,
      channelId: id,
      payload: { channelId: id, parentId: parent.id, messageId: row.id },
    });
    return thread;
  });
}
