import { and, eq, inArray, sql } from 'drizzle-orm';
import { resultRows, type Tx, uuidArray } from '../db/client.ts';
import { channels, permissionOverwrites } from '../db/tables.ts';
import type { Deps, Viewer } from '../deps.ts';
import { badInput, conflict, forbidden, notFound } from '../errors.ts';
import { type EventWriter, transact } from '../events.ts';
import { newId } from '../ids.ts';
import { type OverwriteInfo, Permission, storeOverwriteLevels } from '../permissions.ts';
import {
  loadChannelAccess,
  loadGuildChannelsAccess,
  requireChannel,
  requireGuild,
} from './access.service.ts';
import { holdGuild, writeAudit } from './audit.service.ts';
import { validateName } from './guild.service.ts';
import { purgeBeforeDeletion } from './purge.service.ts';

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
    // Its category's deletion copies the category's overwrites to the channels in it: one begun
    // first leaves no category here (NOT_FOUND), one begun after waits for this channel to be in.
    // Unlocked, the channel could land in a deleted category, shown to everyone it was to be hidden from.
    if (input.parentId && !(await holdChannel(tx, input.parentId))) throw notFound('Channel');
    // Else its guild (holdGuild): the insert's key check waited on a guild deletion, then failed
    // with a foreign key violation (INTERNAL_SERVER_ERROR) where the guild was simply gone.
    if (!input.parentId && !(await holdGuild(tx, input.guildId))) throw notFound('Guild');
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

/**
 * Locks a channel FOR SHARE until the transaction ends, holding off its deletion (which locks it
 * FOR UPDATE first); false when it is gone. Its guild first, as lockOverwriteChain has it.
 */
export async function holdChannel(tx: Tx, id: string): Promise<boolean> {
  await lockGuildOf(tx, id);
  const [held] = await tx.select({ id: channels.id }).from(channels).where(eq(channels.id, id)).for('share');
  return !!held;
}

/** A channel row, with the viewer's permissions there when a list view already computed them. */
export type ChannelWithAccess = ChannelRowFull & { viewerPermissions?: bigint };

/** The channels (threads left out) of each guild asked for, in position order: one statement. */
export async function guildChannelsOf(deps: Deps, guildIds: readonly string[]): Promise<ChannelRowFull[][]> {
  if (!guildIds.length) return [];
  const rows = await deps.db
    .select()
    .from(channels)
    .where(and(inArray(channels.guildId, [...guildIds]), sql`${channels.type} <> 'THREAD'`))
    .orderBy(channels.position, channels.id);
  return guildIds.map((id) => rows.filter((r) => r.guildId === id));
}

/** The channels among `rows` the viewer can see (`permissions` from loadGuildsChannelsAccess). */
export function visibleChannels(
  rows: readonly ChannelRowFull[],
  permissions: ReadonlyMap<string, bigint>,
): ChannelWithAccess[] {
  const out: ChannelWithAccess[] = [];
  for (const c of rows) {
    const p = permissions.get(c.id) ?? 0n;
    if (p !== 0n) out.push({ ...c, viewerPermissions: p });
  }
  return out;
}

/** The channels of a guild the viewer can see, in position order, in two SQL statements. */
export async function visibleGuildChannels(
  deps: Deps,
  viewer: Viewer,
  guildId: string,
): Promise<ChannelWithAccess[]> {
  const [[rows], access] = await Promise.all([
    guildChannelsOf(deps, [guildId]),
    loadGuildChannelsAccess(deps.db, viewer.userId, guildId, deps.now()),
  ]);
  return visibleChannels(rows, access.permissions);
}

export async function channelsByIds(deps: Deps, ids: readonly string[]): Promise<ChannelRowFull[]> {
  if (!ids.length) return [];
  return deps.db
    .select()
    .from(channels)
    .where(inArray(channels.id, [...ids]));
}

/** Fields left undefined stay as they are; `topic: null` and `parentId: null` clear them. */
export interface UpdateChannelInput {
  id: string;
  name?: string | null;
  topic?: string | null;
  position?: number | null;
  slowmodeSeconds?: number | null;
  nsfw?: boolean | null;
  parentId?: string | null;
}

export async function updateChannel(
  deps: Deps,
  viewer: Viewer,
  input: UpdateChannelInput,
): Promise<ChannelRowFull> {
  const a = await requireChannel(deps.db, viewer.userId, input.id, Permission.MANAGE_CHANNELS, deps.now());
  const c = a.channel;
  if (!c.guildId) throw forbidden();
  const patch: Partial<ChannelRowFull> = {};
  if (input.name !== undefined) {
    if (input.name === null) throw badInput('Channel name cannot be null.', 'name');
    patch.name = validateChannelName(input.name);
  }
  if (input.topic !== undefined) {
    const topic = input.topic?.trim() || null;
    if (topic && topic.length > MAX_TOPIC)
      throw badInput(`Topic must be at most ${MAX_TOPIC} characters.`, 'topic');
    patch.topic = topic;
  }
  if (input.position != null) {
    if (!Number.isInteger(input.position) || input.position < 0 || input.position > 10_000)
      throw badInput('Position must be 0-10000.', 'position');
    patch.position = input.position;
  }
  if (input.slowmodeSeconds != null) {
    const s = input.slowmodeSeconds;
    if (!Number.isInteger(s) || s < 0 || s > MAX_SLOWMODE)
      throw badInput(`Slow mode must be 0-${MAX_SLOWMODE} seconds.`, 'slowmodeSeconds');
    patch.slowmodeSeconds = s;
  }
  if (input.nsfw != null) patch.nsfw = input.nsfw;
  if (input.parentId !== undefined) {
    if (c.type === 'THREAD') throw badInput('A thread cannot be moved.', 'parentId');
    if (input.parentId !== null) {
      if (c.type === 'CATEGORY') throw badInput('A category cannot be inside another category.', 'parentId');
      const parent = await requireChannel(deps.db, viewer.userId, input.parentId, 0n, deps.now());
      if (parent.channel.guildId !== c.guildId || parent.channel.type !== 'CATEGORY') {
        throw badInput('parentId must be a category of the same guild.', 'parentId');
      }
    }
    patch.parentId = input.parentId;
  }
  const guildId = c.guildId;
  return transact(deps, async (tx, log) => {
    // The guild first (holdGuild), as a move's lockOverwriteChain has it: a deletion's cascade
    // waiting on this channel row while this audit row's key check waited on the deletion deadlocked.
    if (!(await holdGuild(tx, guildId))) throw notFound('Channel');
    const moved =
      patch.parentId !== undefined && patch.parentId !== c.parentId
        ? await overwriteLevelsNow(tx, viewer.userId, c.id, deps.now(), patch.parentId)
        : undefined;
    const [row] = Object.keys(patch).length
      ? await tx.update(channels).set(patch).where(eq(channels.id, c.id)).returning()
      : await tx.select().from(channels).where(eq(channels.id, c.id));
    if (!row) throw notFound('Channel');
    if (Object.keys(patch).length) {
      await writeAudit(tx, {
        guildId,
        actorId: viewer.userId,
        action: 'CHANNEL_UPDATE',
        targetType: 'CHANNEL',
        targetId: c.id,
        changes: patch,
      });
      await log.append({
        type: 'CHANNEL_UPDATED',
        guildId,
        channelId: c.id,
        payload: { channelId: c.id, changes: Object.keys(patch) },
      });
      // A move changes whose overwrites apply (the category's): members who lose sight of the
      // channel hear of it as they do of an overwrite change (the ChannelUpdated is not theirs).
      // The row records the overwrites that applied before, for visibility to tell it to who could
      // view it then or can now, and to nobody else.
      if (moved) {
        await log.append({
          type: 'PERMISSIONS_CHANGED',
          guildId,
          channelId: c.id,
          payload: { channelId: c.id, parentId: patch.parentId, overwrites: storeOverwriteLevels(moved) },
        });
      }
    }
    return row;
  });
}

/** A channel, its parent and grandparent, as a subquery of ids. */
const chainOf = (channelId: string) => sql`select id from channels where id = ${channelId}::uuid
      union select parent_id from channels where id = ${channelId}::uuid
      union select p.parent_id from channels c join channels p on p.id = c.parent_id where c.id = ${channelId}::uuid`;

/**
 * Takes the locks that every change or record of a channel's overwrites takes, so that none
 * commits between another's read of them and its commit (the ids it locked): the channel, its parent and grandparent
 * (and `also`, a move's new category) FOR UPDATE, outermost first (categories, channels, threads),
 * as every transaction locking several of these does (a category's deletion holds it while it
 * updates its channels, a channel's deletion holds it while it deletes its threads; locked by id,
 * a move or deletion beside either deadlocked). Their guild goes first, FOR KEY SHARE (what this
 * transaction's inserts would take on it later): deleteGuild locks it FOR UPDATE before its
 * cascade reaches the channels.
 *
 * The locking statement sees the chain as it was when it began: a move that committed while it
 * waited changed it. The chain is read again once locked; when it differs, the round's locks are
 * let go (a savepoint rolled back) and the chain as it is now is locked, outermost first again:
 * locking the new category while holding the channel would deadlock beside that category's
 * deletion, which holds it and waits for the channel.
 */
export async function lockOverwriteChain(
  tx: Tx,
  channelId: string,
  also?: string | null,
): Promise<Set<string>> {
  await lockGuildOf(tx, channelId);
  for (let round = 1; ; round++) {
    const last = round === 3;
    const held = await tx
      .transaction(async (sp) => {
        const locked = new Set(
          resultRows<{ id: string }>(
            await sp.execute(sql`select id from channels where id in (${chainOf(channelId)}
              union select ${also ?? null}::uuid)
            order by case type when 'CATEGORY' then 0 when 'THREAD' then 2 else 1 end, id for update`),
          ).map((r) => r.id),
        );
        const now = resultRows<{ id: string | null }>(await sp.execute(chainOf(channelId)));
        // Moved meanwhile (rare): let this round's locks go and lock the chain as it is now. A
        // third round keeps what it holds rather than go on.
        if (!last && !now.every((r) => !r.id || locked.has(r.id))) throw STALE_CHAIN;
        return locked;
      })
      .catch((err) => {
        if (err === STALE_CHAIN) return undefined;
        throw err;
      });
    if (held) return held;
  }
}
const STALE_CHAIN = new Error('the channel moved while its chain was locked');

/** The channel's guild, FOR KEY SHARE (see lockOverwriteChain). */
async function lockGuildOf(tx: Tx, channelId: string) {
  await tx.execute(
    sql`select 1 from guilds where id = (select guild_id from channels where id = ${channelId}::uuid) for key share`,
  );
}

/**
 * The overwrite levels that decide who may view a channel now (its own, its parent's, its
 * grandparent's), read after locking those channels (lockOverwriteChain, which an overwrite
 * change takes too, role.service's overwriteGuard): a change committing meanwhile is read, and
 * none commits before this transaction does. Recorded in a log row, for visibility to decide
 * after they change (a move, an overwrite change) or are gone (a deletion).
 */
async function overwriteLevelsNow(
  tx: Tx,
  viewerId: string,
  channelId: string,
  now: Date,
  /** a move's new category, locked with them: NOT_FOUND when it was deleted since it was checked */
  movingTo?: string | null,
) {
  const held = await lockOverwriteChain(tx, channelId, movingTo);
  // Into a deleted category, its overwrites would not apply, nor be copied to the channel.
  if (movingTo && !held.has(movingTo)) throw notFound('Channel');
  const a = await loadChannelAccess(tx, viewerId, channelId, now);
  if (!a) throw notFound('Channel');
  return a.levels;
}

/**
 * A channel's threads go with it, each told deleted (before the channel) as a deletion of its own
 * would be: a client holding a thread learns it is gone without knowing whose thread it was.
 * A thread's levels are its channel's and its own overwrites; locked here after the channel's
 * (an overwrite change on a thread locks its chain, lockOverwriteChain), read before they go.
 */
async function deleteThreadsOf(
  tx: Tx,
  log: EventWriter,
  guildId: string,
  actorId: string,
  channelId: string,
  channelLevels: readonly (readonly OverwriteInfo[])[],
  /** at most this many (the first ones), else all */
  limit?: number,
): Promise<number> {
  const q = tx
    .select({ id: channels.id })
    .from(channels)
    .where(and(eq(channels.parentId, channelId), eq(channels.type, 'THREAD')))
    .orderBy(channels.createdAt, channels.id);
  const threads = await (limit ? q.limit(limit) : q).for('update');
  if (!threads.length) return 0;
  const ids = threads.map((t) => t.id);
  // One array parameter, not one per thread: a channel's threads are not bounded, a statement's
  // parameters are (65,535).
  const idArray = uuidArray(ids);
  const own = (await tx
    .select()
    .from(permissionOverwrites)
    .where(sql`${permissionOverwrites.channelId} = any(${idArray})`)) as (OverwriteInfo & {
    channelId: string;
  })[];
  await tx.delete(channels).where(sql`${channels.id} = any(${idArray})`);
  const ownOf = new Map<string, OverwriteInfo[]>();
  for (const o of own) ownOf.set(o.channelId, [...(ownOf.get(o.channelId) ?? []), o]);
  await log.appendMany(
    ids.map((id) => ({
      type: 'CHANNEL_DELETED',
      guildId,
      channelId: id,
      payload: {
        channelId: id,
        actorId,
        overwrites: storeOverwriteLevels([...channelLevels, ownOf.get(id) ?? []]),
      },
    })),
  );
  return threads.length;
}

/** Threads deleted per transaction ahead of their channel's deletion (see deleteChannel). */
const THREAD_BATCH = 500;

/**
 * A category's overwrites apply to its channels (access.service reads the parent's level before
 * the channel's own): left uncategorized, a channel hidden by its category would be shown to
 * everyone it was hidden from. So its channels get copies of the category's overwrites, which
 * keeps who may see what exactly as it was, as Discord's synced channels keep theirs. A channel
 * with overwrites of its own cannot take them exactly (two levels do not fold into one: an
 * @everyone deny on the channel overrides a role allow on the category, in one level it would
 * not), so the deletion is refused until those are moved out or cleared.
 */
async function keepChildrenHidden(tx: Tx, log: EventWriter, guildId: string, categoryId: string) {
  const own = await tx
    .select()
    .from(permissionOverwrites)
    .where(eq(permissionOverwrites.channelId, categoryId));
  if (!own.length) return;
  const kids = await tx
    .select({ id: channels.id, name: channels.name })
    .from(channels)
    .where(eq(channels.parentId, categoryId));
  if (!kids.length) return;
  const ids = kids.map((k) => k.id);
  // One array parameter, not one per channel (a category's channels are not bounded).
  const idArray = uuidArray(ids);
  const theirs = await tx
    .selectDistinct({ channelId: permissionOverwrites.channelId })
    .from(permissionOverwrites)
    .where(sql`${permissionOverwrites.channelId} = any(${idArray})`);
  if (theirs.length) {
    const names = kids.filter((k) => theirs.some((t) => t.channelId === k.id)).map((k) => `#${k.name}`);
    throw conflict(
      `This category's permission overwrites apply to its channels, and ${names.join(', ')} ${names.length > 1 ? 'have' : 'has'} overwrites of its own: without the category they would be shown to members it hides them from. Clear their overwrites or move them out of the category first.`,
    );
  }
  // Channels x overwrites rows, copied by the database: built here, 2,000 channels' took ~0.2 s
  // of the deletion's transaction.
  await tx.execute(sql`insert into permission_overwrites (channel_id, target_type, target_id, allow, deny)
    select k, o.target_type, o.target_id, o.allow, o.deny
    from unnest(${idArray}) k cross join permission_overwrites o where o.channel_id = ${categoryId}::uuid`);
  // Nobody's access changed: told to who may view each channel (the category's overwrites applied
  // and still do), by the levels recorded, as for a move. Appended together (1,000 rows an insert):
  // an insert per channel, a round trip each, held the deletion's transaction (and with it every
  // realtime stream, log.ts Horizon) ~0.4 s for 500 channels, ~1.1 s for 2,000.
  const overwrites = storeOverwriteLevels([own as OverwriteInfo[]]);
  await log.appendMany(
    ids.map((channelId) => ({
      type: 'PERMISSIONS_CHANGED',
      guildId,
      channelId,
      payload: { channelId, parentId: null, overwrites },
    })),
  );
}

/**
 * Deletes a guild channel with its messages and threads. Channels inside a deleted category stay,
 * uncategorized (as Discord does), so deleting a category never destroys conversations.
 */
export async function deleteChannel(deps: Deps, viewer: Viewer, id: string): Promise<string> {
  const a = await requireChannel(deps.db, viewer.userId, id, Permission.MANAGE_CHANNELS, deps.now());
  const c = a.channel;
  if (!c.guildId) throw forbidden();
  const guildId = c.guildId;
  if (c.type !== 'CATEGORY') {
    const threads = await deps.db
      .select({ id: channels.id })
      .from(channels)
      .where(and(eq(channels.parentId, c.id), eq(channels.type, 'THREAD')));
    await purgeBeforeDeletion(deps.db, { channelIds: [c.id, ...threads.map((t) => t.id)] });
    // Its threads go next, THREAD_BATCH per transaction, each told deleted as before: in the
    // deletion's transaction, 20k threads (their rows and events) held it open ~2 s, and the log
    // delivers nothing written after a transaction still in progress: every stream of every
    // guild waited. Threads started meanwhile go with the deletion itself.
    for (let n = THREAD_BATCH; n === THREAD_BATCH; ) {
      n = await transact(deps, async (tx, log) => {
        const levels = await overwriteLevelsNow(tx, viewer.userId, c.id, deps.now());
        return deleteThreadsOf(tx, log, guildId, viewer.userId, c.id, levels, THREAD_BATCH);
      });
    }
  }
  return transact(deps, async (tx, log) => {
    // The overwrites that decided who could see it, read before they go with it: visibility
    // tells the deletion to those who could (core/realtime/visibility.ts), not to every member.
    const levels = await overwriteLevelsNow(tx, viewer.userId, c.id, deps.now());
    if (c.type === 'CATEGORY') {
      await keepChildrenHidden(tx, log, guildId, c.id);
      await tx.update(channels).set({ parentId: null }).where(eq(channels.parentId, c.id));
    } else {
      await deleteThreadsOf(tx, log, guildId, viewer.userId, c.id, levels);
    }
    const gone = await tx.delete(channels).where(eq(channels.id, c.id)).returning({ id: channels.id });
    if (!gone.length) throw notFound('Channel');
    await writeAudit(tx, {
      guildId,
      actorId: viewer.userId,
      action: 'CHANNEL_DELETE',
      targetType: 'CHANNEL',
      targetId: c.id,
      changes: { name: c.name, type: c.type },
    });
    await log.append({
      type: 'CHANNEL_DELETED',
      guildId,
      channelId: c.id,
      payload: { channelId: c.id, actorId: viewer.userId, overwrites: storeOverwriteLevels(levels) },
    });
    return c.id;
  });
}
