import { and, eq } from 'drizzle-orm';
import { channels, guilds, memberRoles, members, roles } from '../db/tables.ts';
import type { Deps, Viewer } from '../deps.ts';
import { badInput, conflict, forbidden, notFound } from '../errors.ts';
import { transact } from '../events.ts';
import { newId } from '../ids.ts';
import { DEFAULT_EVERYONE, Permission } from '../permissions.ts';
import { requireGuild } from './access.service.ts';
import { holdGuild, writeAudit } from './audit.service.ts';
import { purgeBeforeDeletion, recordFormerMembers, settleFormerMembers } from './purge.service.ts';

export type GuildRow = typeof guilds.$inferSelect;

export function validateName(raw: string, what: string, max = 100): string {
  const name = raw.trim();
  if (name.length < 1 || name.length > max) throw badInput(`${what} must be 1-${max} characters.`, 'name');
  return name;
}

/** Creates a guild with its @everyone role, the owner as first member and a #general channel. */
export async function createGuild(deps: Deps, viewer: Viewer, input: { name: string }): Promise<GuildRow> {
  const name = validateName(input.name, 'Guild name');
  const guildId = newId();
  const everyoneId = newId();
  const generalId = newId();
  return transact(deps, async (tx, log) => {
    const [g] = await tx.insert(guilds).values({ id: guildId, name, ownerId: viewer.userId }).returning();
    await tx.insert(roles).values({
      id: everyoneId,
      guildId,
      name: '@everyone',
      position: 0,
      permissions: DEFAULT_EVERYONE,
      isEveryone: true,
    });
    await tx.insert(members).values({ guildId, userId: viewer.userId });
    await tx.insert(channels).values({ id: generalId, guildId, type: 'TEXT', name: 'general', position: 0 });
    await writeAudit(tx, {
      guildId,
      actorId: viewer.userId,
      action: 'GUILD_CREATE',
      targetType: 'GUILD',
      targetId: guildId,
    });
    await log.append({ type: 'MEMBER_JOINED', guildId, payload: { userId: viewer.userId } });
    return g;
  });
}

export async function getGuild(deps: Deps, id: string): Promise<GuildRow | undefined> {
  const [g] = await deps.db.select().from(guilds).where(eq(guilds.id, id));
  return g;
}

/** The guilds the viewer is a member of, in the order they joined. */
export async function viewerGuilds(deps: Deps, viewer: Viewer): Promise<GuildRow[]> {
  const rows = await deps.db
    .select({ g: guilds })
    .from(members)
    .innerJoin(guilds, eq(guilds.id, members.guildId))
    .where(eq(members.userId, viewer.userId))
    .orderBy(members.joinedAt, guilds.id);
  return rows.map((r) => r.g);
}

export const MAX_DESCRIPTION = 1000;
export const MAX_URL = 2048;

/** Fields left undefined stay as they are; `description: null` and `iconUrl: null` clear them. */
export interface UpdateGuildInput {
  id: string;
  name?: string | null;
  description?: string | null;
  iconUrl?: string | null;
}

function validateIconUrl(raw: string): string {
  let u: URL;
  try {
    u = new URL(raw);
  } catch {
    throw badInput('iconUrl must be an http(s) URL.', 'iconUrl');
  }
  if ((u.protocol !== 'https:' && u.protocol !== 'http:') || raw.length > MAX_URL)
    throw badInput('iconUrl must be an http(s) URL.', 'iconUrl');
  return raw;
}

export async function updateGuild(deps: Deps, viewer: Viewer, input: UpdateGuildInput): Promise<GuildRow> {
  await requireGuild(deps.db, viewer.userId, input.id, Permission.MANAGE_GUILD, deps.now());
  const patch: Partial<GuildRow> = {};
  if (input.name !== undefined) {
    if (input.name === null) throw badInput('Guild name cannot be null.', 'name');
    patch.name = validateName(input.name, 'Guild name');
  }
  if (input.description !== undefined) {
    const d = input.description?.trim() || null;
    if (d && d.length > MAX_DESCRIPTION)
      throw badInput(`Description must be at most ${MAX_DESCRIPTION} characters.`, 'description');
    patch.description = d;
  }
  if (input.iconUrl !== undefined) patch.iconUrl = input.iconUrl ? validateIconUrl(input.iconUrl) : null;
  return transact(deps, async (tx, log) => {
    if (!Object.keys(patch).length) {
      const [g] = await tx.select().from(guilds).where(eq(guilds.id, input.id));
      if (!g) throw notFound('Guild');
      return g;
    }
    const [g] = await tx.update(guilds).set(patch).where(eq(guilds.id, input.id)).returning();
    if (!g) throw notFound('Guild');
    await writeAudit(tx, {
      guildId: g.id,
      actorId: viewer.userId,
      action: 'GUILD_UPDATE',
      targetType: 'GUILD',
      targetId: g.id,
      changes: patch,
    });
    await log.append({ type: 'GUILD_UPDATED', guildId: g.id, payload: { guildId: g.id, changes: patch } });
    return g;
  });
}

/** Members who are not the owner get FORBIDDEN; strangers NOT_FOUND. */
async function requireOwner(deps: Deps, viewer: Viewer, guildId: string) {
  const a = await requireGuild(deps.db, viewer.userId, guildId, 0n, deps.now());
  if (a.ownerId !== viewer.userId) throw forbidden('Only the owner can do this.');
  return a;
}

/**
 * Deletes a guild and everything in it (the database cascades). Its audit rows go with it, so the
 * deletion is recorded only in the event log.
 */
export async function deleteGuild(deps: Deps, viewer: Viewer, guildId: string): Promise<string> {
  await requireOwner(deps, viewer, guildId);
  await purgeBeforeDeletion(deps.db, { guildId });
  const recorded = await recordFormerMembers(deps.db, guildId);
  return transact(deps, async (tx, log) => {
    // Members rows cascade away with the guild: who was in is kept in former_members (as long as
    // the event log), so every member subscribed now, or replaying later, hears of the deletion.
    // The guild row is locked first so a join committing meanwhile is either recorded or refused.
    await tx.select({ id: guilds.id }).from(guilds).where(eq(guilds.id, guildId)).for('update');
    // Its channels next, in id order, as grouped sends' key checks take them (message-batch.ts):
    // the cascade deletes them in the order of their rows, and one waiting on a channel a send's
    // statement held while that statement waited on a channel the cascade had already deleted
    // deadlocked (deleteGuild failed with INTERNAL_SERVER_ERROR when Postgres chose it).
    await tx
      .select({ id: channels.id })
      .from(channels)
      .where(eq(channels.guildId, guildId))
      .orderBy(channels.id)
      .for('update');
    await settleFormerMembers(tx, guildId, recorded);
    // Not "while the viewer still owns it": the purge above has begun the deletion for good. An
    // ownership transferred meanwhile made this refuse and left the guild to its heir gutted, its
    // messages and audit log gone; the owner's deletion, begun first, now completes.
    const gone = await tx.delete(guilds).where(eq(guilds.id, guildId)).returning({ id: guilds.id });
    if (!gone.length) throw notFound('Guild');
    await log.append({
      type: 'GUILD_DELETED',
      guildId,
      payload: { guildId, actorId: viewer.userId },
    });
    return guildId;
  });
}

export async function transferGuildOwnership(
  deps: Deps,
  viewer: Viewer,
  input: { guildId: string; userId: string },
): Promise<GuildRow> {
  await requireOwner(deps, viewer, input.guildId);
  if (input.userId === viewer.userId) throw badInput('You already own this guild.', 'userId');
  return transact(deps, async (tx, log) => {
    const [m] = await tx
      .select({ userId: members.userId })
      .from(members)
      .where(and(eq(members.guildId, input.guildId), eq(members.userId, input.userId)));
    if (!m) throw notFound('Member');
    // The owner condition makes two concurrent transfers by the same owner resolve to one.
    const [g] = await tx
      .update(guilds)
      .set({ ownerId: input.userId })
      .where(and(eq(guilds.id, input.guildId), eq(guilds.ownerId, viewer.userId)))
      .returning();
    if (!g) throw forbidden('Only the owner can do this.');
    await writeAudit(tx, {
      guildId: g.id,
      actorId: viewer.userId,
      action: 'GUILD_OWNER_TRANSFER',
      targetType: 'USER',
      targetId: input.userId,
      changes: { from: viewer.userId, to: input.userId },
    });
    await log.append({
      type: 'GUILD_UPDATED',
      guildId: g.id,
      payload: { guildId: g.id, changes: { ownerId: input.userId } },
    });
    return g;
  });
}

/** Leaves a guild; the owner must transfer ownership first (CONFLICT). */
export async function leaveGuild(deps: Deps, viewer: Viewer, guildId: string): Promise<boolean> {
  const a = await requireGuild(deps.db, viewer.userId, guildId, 0n, deps.now());
  if (a.ownerId === viewer.userId)
    throw conflict('The owner cannot leave; transfer ownership or delete the guild first.');
  return transact(deps, async (tx, log) => {
    // The guild first, as a kick does (holdGuild): a deletion's cascade waiting on this member row
    // while this audit row's key check waited on the deletion deadlocked, failing one of the two.
    if (!(await holdGuild(tx, guildId))) throw notFound('Guild');
    const where = and(eq(members.guildId, guildId), eq(members.userId, viewer.userId));
    const gone = await tx.delete(members).where(where).returning({ userId: members.userId });
    if (!gone.length) throw notFound('Guild');
    await tx
      .delete(memberRoles)
      .where(and(eq(memberRoles.guildId, guildId), eq(memberRoles.userId, viewer.userId)));
    await writeAudit(tx, {
      guildId,
      actorId: viewer.userId,
      action: 'MEMBER_LEAVE',
      targetType: 'USER',
      targetId: viewer.userId,
    });
    await log.append({ type: 'MEMBER_LEFT', guildId, payload: { userId: viewer.userId } });
    return true;
  });
}
