import { and, eq, inArray, sql } from 'drizzle-orm';
import { channels } from '../db/tables.ts';
import type { Deps, Viewer } from '../deps.ts';
import { badInput } from '../errors.ts';
import { transact } from '../events.ts';
import { newId } from '../ids.ts';
import { Permission } from '../permissions.ts';
import { loadChannelAccess, requireChannel, requireGuild } from './access.service.ts';
import { writeAudit } from './audit.service.ts';
import { validateName } from './guild.service.ts';

export type ChannelRowFull = typeof channels.$inferSelect;
export const GUILD_CHANNEL_TYPES = ['TEXT', 'VOICE', 'ANNOUNCEMENT', 'CATEGORY'] as const;

export interface CreateChannelInput {
  guildId: string;
  name: string;
  type: string;
  topic?: string | null;
  parentId?: string | null;
  position?: number | null;
  slowmodeSeconds?: number | null;
  nsfw?: boolean | null;
}

export const MAX_TOPIC = 1024;
export const MAX_SLOWMODE = 21_600;

export function validateChannelName(raw: string): string {
  const name = validateName(raw, 'Channel name');
  return name;
}

export async function createChannel(
  deps: Deps,
  viewer: Viewer,
  input: CreateChannelInput,
): Promise<ChannelRowFull> {
  if (!(GUILD_CHANNEL_TYPES as readonly string[]).includes(input.type)) {
    throw badInput(
      `A guild channel must be one of ${GUILD_CHANNEL_TYPES.join(', ')}; threads are started from a message.`,
      'type',
    );
  }
  const name = validateChannelName(input.name);
  const topic = input.topic?.trim() || null;
  if (topic && topic.length > MAX_TOPIC)
    throw badInput(`Topic must be at most ${MAX_TOPIC} characters.`, 'topic');
  const slowmode = input.slowmodeSeconds ?? 0;
  if (!Number.isInteger(slowmode) || slowmode < 0 || slowmode > MAX_SLOWMODE) {
    throw badInput(`Slow mode must be 0-${MAX_SLOWMODE} seconds.`, 'slowmodeSeconds');
  }
  await requireGuild(deps.db, viewer.userId, input.guildId, Permission.MANAGE_CHANNELS, deps.now());
  if (input.parentId) {
    const parent = await requireChannel(deps.db, viewer.userId, input.parentId, 0n, deps.now());
    if (parent.channel.guildId !== input.guildId || parent.channel.type !== 'CATEGORY') {
      throw badInput('parentId must be a category of the same guild.', 'parentId');
    }
    if (input.type === 'CATEGORY')
      throw badInput('A category cannot be inside another category.', 'parentId');
  }
  const id = newId();
  return transact(deps, async (tx, log) => {
    const [c] = await tx
      .insert(channels)
      .values({
        id,
        guildId: input.guildId,
        type: input.type,
        name,
        topic,
        parentId: input.parentId ?? null,
        position: input.position ?? 0,
        slowmodeSeconds: slowmode,
        nsfw: input.nsfw ?? false,
      })
      .returning();
    await writeAudit(tx, {
      guildId: input.guildId,
      actorId: viewer.userId,
      action: 'CHANNEL_CREATE',
      targetType: 'CHANNEL',
      targetId: id,
      changes: { name, type: input.type },
    });
    await log.append({
      type: 'CHANNEL_CREATED',
      guildId: input.guildId,
      channelId: id,
      payload: { channelId: id },
    });
    return c;
  });
}

/** The channels of a guild the viewer can see, in position order. */
export async function visibleGuildChannels(
  deps: Deps,
  viewer: Viewer,
  guildId: string,
): Promise<ChannelRowFull[]> {
  const rows = await deps.db
    .select()
    .from(channels)
    .where(and(eq(channels.guildId, guildId), sql`${channels.type} <> 'THREAD'`))
    .orderBy(channels.position, channels.id);
  const visible = await Promise.all(
    rows.map((c) => loadChannelAccess(deps.db, viewer.userId, c.id, deps.now())),
  );
  return rows.filter((_, i) => (visible[i]?.permissions ?? 0n) !== 0n);
}

export async function channelsByIds(deps: Deps, ids: readonly string[]): Promise<ChannelRowFull[]> {
  if (!ids.length) return [];
  return deps.db
    .select()
    .from(channels)
    .where(inArray(channels.id, [...ids]));
}
