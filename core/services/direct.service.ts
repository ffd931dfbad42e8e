/**
 * DMs and group DMs: channels without a guild whose recipients (channel_recipients) are who may
 * see them (access.service.ts gives recipients DM_PERMISSIONS). A 1:1 DM is unique per pair
 * through channels.dm_key; a group DM is new each time it is opened, as on Discord.
 */
import { and, desc, eq, inArray, isNull, sql } from 'drizzle-orm';
import { type DbOrTx, uuidArray } from '../db/client.ts';
import { channelRecipients, channels, relationships, users } from '../db/tables.ts';
import type { Deps, Viewer } from '../deps.ts';
import { badInput, forbidden, notFound } from '../errors.ts';
import { transact } from '../events.ts';
import { newId } from '../ids.ts';
import { isUniqueViolation } from './auth.service.ts';
import type { ChannelRowFull } from './channel.service.ts';

/** People in a group DM, the viewer included. */
export const MAX_GROUP_DM_SIZE = 10;
export const DIRECT_CHANNEL_TYPES = ['DM', 'GROUP_DM'] as const;

const dmKey = (a: string, b: string) => [a, b].sort().join(':');

/**
 * Opens a DM (one other user: the existing one when there is one) or a new group DM (several).
 * The viewer is included automatically and duplicates are dropped. Users who do not exist, are
 * deactivated or blocked the viewer all answer NOT_FOUND, so a block is never revealed.
 */
export async function openDirectChannel(
  deps: Deps,
  viewer: Viewer,
  userIds: readonly string[],
): Promise<ChannelRowFull> {
  const others = [...new Set(userIds)].filter((id) => id !== viewer.userId);
  if (!others.length) throw badInput('Name at least one other user.', 'userIds');
  if (others.length + 1 > MAX_GROUP_DM_SIZE) {
    throw badInput(`A group DM holds at most ${MAX_GROUP_DM_SIZE} people, you included.`, 'userIds');
  }
  const reachable = await deps.db
    .select({ id: users.id })
    .from(users)
    .where(
      and(
        inArray(users.id, others),
        isNull(users.deactivatedAt),
        sql`not exists (select 1 from ${relationships} r where r.user_id = ${users.id}
              and r.target_id = ${viewer.userId} and r.kind = 'BLOCKED')`,
      ),
    );
  if (reachable.length !== others.length) throw notFound('User');

  if (others.length > 1) return createDirect(deps, viewer, 'GROUP_DM', others, null);
  const key = dmKey(viewer.userId, others[0]);
  const existing = await byDmKey(deps.db, key);
  if (existing) return existing;
  try {
    return await createDirect(deps, viewer, 'DM', others, key);
  } catch (err) {
    // Both users opened it at the same moment: the other transaction's channel is the DM.
    const raced = isUniqueViolation(err) ? await byDmKey(deps.db, key) : undefined;
    if (raced) return raced;
    throw err;
  }
}

async function byDmKey(db: DbOrTx, key: string): Promise<ChannelRowFull | undefined> {
  const [c] = await db.select().from(channels).where(eq(channels.dmKey, key));
  return c;
}

async function createDirect(
  deps: Deps,
  viewer: Viewer,
  type: 'DM' | 'GROUP_DM',
  others: string[],
  key: string | null,
): Promise<ChannelRowFull> {
  const id = newId();
  const recipients = [viewer.userId, ...others];
  return transact(deps, async (tx, log) => {
    const [c] = await tx
      .insert(channels)
      .values({ id, type, guildId: null, dmKey: key, ownerId: type === 'GROUP_DM' ? viewer.userId : null })
      .returning();
    await tx.insert(channelRecipients).values(recipients.map((userId) => ({ channelId: id, userId })));
    for (const userId of recipients) {
      await log.append({
        type: 'DIRECT_CHANNEL_CREATED',
        channelId: id,
        userId,
        payload: { channelId: id, type, recipientIds: recipients },
      });
    }
    return c;
  });
}

/** The viewer's DMs and group DMs, most recently active first. */
export async function listDirectChannels(deps: Deps, viewer: Viewer): Promise<ChannelRowFull[]> {
  const rows = await deps.db
    .select({ c: channels })
    .from(channelRecipients)
    .innerJoin(channels, eq(channels.id, channelRecipients.channelId))
    .where(
      and(eq(channelRecipients.userId, viewer.userId), inArray(channels.type, [...DIRECT_CHANNEL_TYPES])),
    )
    .orderBy(desc(sql`coalesce(${channels.lastMessageId}, ${channels.id})`));
  return rows.map((r) => r.c);
}

/** The recipients of each channel, in the order asked (empty for guild channels): one query. */
export async function recipientsByChannel(
  deps: Deps,
  channelIds: readonly string[],
): Promise<(typeof users.$inferSelect)[][]> {
  if (!channelIds.length) return [];
  const rows = await deps.db
    .select({ channelId: channelRecipients.channelId, user: users })
    .from(channelRecipients)
    .innerJoin(users, eq(users.id, channelRecipients.userId))
    .where(sql`${channelRecipients.channelId} = any(${uuidArray(channelIds)})`)
    .orderBy(channelRecipients.createdAt, channelRecipients.userId);
  const by = new Map<string, (typeof users.$inferSelect)[]>(channelIds.map((id) => [id, []]));
  for (const r of rows) by.get(r.channelId)?.push(r.user);
  return channelIds.map((id) => by.get(id) ?? []);
}

/**
 * For sendMessage: in a 1:1 DM, FORBIDDEN when the other recipient has blocked the sender.
 * Other channel types pass (group DMs and guilds do not enforce blocks on sending).
 */
export async function assertCanSendInDm(
  db: DbOrTx,
  senderId: string,
  channel: { id: string; type: string },
): Promise<void> {
  if (channel.type !== 'DM') return;
  const [blocked] = await db
    .select({ one: sql`1` })
    .from(channelRecipients)
    .innerJoin(
      relationships,
      and(
        eq(relationships.userId, channelRecipients.userId),
        eq(relationships.targetId, senderId),
        eq(relationships.kind, 'BLOCKED'),
      ),
    )
    .where(eq(channelRecipients.channelId, channel.id))
    .limit(1);
  if (blocked) throw forbidden('You cannot send messages to this user.');
}
