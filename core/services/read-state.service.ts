/**
 * Read markers and unread/mention counts. A marker only moves forward. Counts look at most at the
 * UNREAD_CAP newest unread messages of a channel, so a long-idle channel answers 1000, not 1000+.
 * A channel with no marker counts from when the viewer joined the guild (or was added to the DM),
 * so a new member does not inherit the whole history as unread.
 */
import { and, eq, isNull, sql } from 'drizzle-orm';
import { type DbOrTx, resultRows, uuidArray, violatesForeignKey } from '../db/client.ts';
import { messages, readStates } from '../db/tables.ts';
import type { Deps, Viewer } from '../deps.ts';
import { notFound } from '../errors.ts';
import { transact } from '../events.ts';
import { loadGuildsChannelsAccess, requireChannel } from './access.service.ts';

export const UNREAD_CAP = 1000;

export interface MarkReadInput {
  channelId: string;
  messageId: string;
}

/** Moves the viewer's marker to `messageId` unless it already points at a newer message. */
export async function markRead(deps: Deps, viewer: Viewer, input: MarkReadInput): Promise<string> {
  await requireChannel(deps.db, viewer.userId, input.channelId, 0n, deps.now());
  const [m] = await deps.db
    .select({ id: messages.id })
    .from(messages)
    .where(
      and(
        eq(messages.id, input.messageId),
        eq(messages.channelId, input.channelId),
        isNull(messages.deletedAt),
      ),
    );
  if (!m) throw notFound('Message');
  await transact(deps, async (tx, log) => {
    const moved = await tx
      .insert(readStates)
      .values({
        userId: viewer.userId,
        channelId: input.channelId,
        lastReadMessageId: m.id,
        updatedAt: deps.now(),
      })
      .onConflictDoUpdate({
        target: [readStates.userId, readStates.channelId],
        set: { lastReadMessageId: sql`excluded.last_read_message_id`, updatedAt: sql`excluded.updated_at` },
        setWhere: sql`${readStates.lastReadMessageId} is null or ${readStates.lastReadMessageId} < excluded.last_read_message_id`,
      })
      .returning({ id: readStates.lastReadMessageId });
    if (!moved.length) return;
    // userId scopes the event to the viewer: their other devices update, nobody else hears it.
    await log.append({
      type: 'READ_STATE_UPDATED',
      channelId: input.channelId,
      userId: viewer.userId,
      payload: { channelId: input.channelId, userId: viewer.userId, lastReadMessageId: m.id },
    });
  }).catch(channelGone);
  return input.channelId;
}

/**
 * The checks before markRead's insert took no lock: the channel can be deleted under it, and its
 * key check then waits for the deletion and refuses the row. The reader is told what a moment
 * later would tell them, not INTERNAL_SERVER_ERROR (a catch, not a lock first: markers move often).
 */
function channelGone(err: unknown): never {
  if (violatesForeignKey(err, 'read_states_channel_id_channels_id_fk')) throw notFound('Channel');
  throw err;
}

export interface ChannelCounts {
  channelId: string;
  guildId: string | null;
  unreadCount: number;
  mentionCount: number;
}

/**
 * Unread and mention counts for channels picked by `where` (a condition on `c`, the channels
 * table), in one statement. Unread: live messages by others after the marker. Mentions: those
 * of them naming the viewer, @everyone, or one of the viewer's roles in that guild.
 */
async function countChannels(
  db: DbOrTx,
  userId: string,
  where: ReturnType<typeof sql>,
  onlyUnread: boolean,
): Promise<ChannelCounts[]> {
  type Row = { channel_id: string; guild_id: string | null; unread: number; mentions: number };
  const result = await db.execute(sql`
    with base as (
      select c.id, c.guild_id,
        greatest(
          rs.last_read_message_id,
          (select (lpad(to_hex(floor(extract(epoch from coalesce(
              (select m.joined_at from members m where m.guild_id = c.guild_id and m.user_id = ${userId}::uuid),
              (select cr.created_at from channel_recipients cr where cr.channel_id = c.id and cr.user_id = ${userId}::uuid)
            )) * 1000)::bigint), 12, '0') || '70008000000000000000')::uuid)
        ) as after_id,
        coalesce((select array_agg(mr.role_id) from member_roles mr
          where mr.guild_id = c.guild_id and mr.user_id = ${userId}::uuid), '{}'::uuid[]) as role_ids
      from channels c
      left join read_states rs on rs.channel_id = c.id and rs.user_id = ${userId}::uuid
      where ${where}
    )
    select b.id as channel_id, b.guild_id, u.unread, u.mentions
    from base b
    cross join lateral (
      select count(*)::int as unread,
        (count(*) filter (where x.mention_everyone or x.mention_role_ids && b.role_ids
          or exists (select 1 from message_mentions mm where mm.message_id = x.id and mm.user_id = ${userId}::uuid)))::int as mentions
      from (
        select m.id, m.mention_everyone, m.mention_role_ids from messages m
        where m.channel_id = b.id and m.id > coalesce(b.after_id, '00000000-0000-0000-0000-000000000000'::uuid)
          and m.deleted_at is null and m.author_id <> ${userId}::uuid
        order by m.id desc limit ${UNREAD_CAP}
      ) x
    ) u
    ${onlyUnread ? sql`where u.unread > 0` : sql``}`);
  return resultRows<Row>(result).map((r) => ({
    channelId: r.channel_id,
    guildId: r.guild_id,
    unreadCount: Number(r.unread),
    mentionCount: Number(r.mentions),
  }));
}

/**
 * Counts for channels the caller has already shown to be visible (one statement, any number of
 * channels; ids that do not exist get zeros).
 */
export async function channelCounts(
  db: DbOrTx,
  userId: string,
  channelIds: readonly string[],
): Promise<ChannelCounts[]> {
  if (!channelIds.length) return [];
  const found = await countChannels(db, userId, sql`c.id = any(${uuidArray(channelIds)})`, false);
  const byId = new Map(found.map((c) => [c.channelId, c]));
  return channelIds.map(
    (id) => byId.get(id) ?? { channelId: id, guildId: null, unreadCount: 0, mentionCount: 0 },
  );
}

/**
 * Every channel the viewer can see with something unread: their guilds' channels (threads not
 * included yet) and their DMs, in two statements: the counts, then the viewer's permissions in the
 * guilds involved, to drop the channels they cannot see.
 */
export async function unreadChannels(deps: Deps, viewer: Viewer): Promise<ChannelCounts[]> {
  const candidates = await countChannels(
    deps.db,
    viewer.userId,
    sql`((c.guild_id in (select m.guild_id from members m where m.user_id = ${viewer.userId}::uuid)
          and c.type not in ('CATEGORY', 'THREAD'))
       or c.id in (select cr.channel_id from channel_recipients cr where cr.user_id = ${viewer.userId}::uuid))`,
    true,
  );
  const guildIds = [...new Set(candidates.flatMap((c) => (c.guildId ? [c.guildId] : [])))];
  const access = await loadGuildsChannelsAccess(deps.db, viewer.userId, guildIds, deps.now());
  return candidates
    .filter((c) => !c.guildId || (access.get(c.guildId)?.permissions.get(c.channelId) ?? 0n) !== 0n)
    .sort((a, b) => (a.channelId < b.channelId ? -1 : 1));
}
