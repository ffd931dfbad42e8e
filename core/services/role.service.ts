/**
 * Roles, role assignment and channel permission overwrites. Every change here is guarded by the
 * role hierarchy: apart from the owner, nobody touches a role, or a member, at or above their own highest role,
 * nor grants a permission they do not hold. Role changes lock the guild row so concurrent edits of
 * one guild's role order serialize (positions stay dense: @everyone 0, the others 1..n).
 */
import { and, asc, desc, eq, inArray, sql } from 'drizzle-orm';
import type { Tx } from '../db/client.ts';
import { channels, memberRoles, members, permissionOverwrites, roles } from '../db/tables.ts';
import type { Deps, Viewer } from '../deps.ts';
import { badInput, forbidden, notFound } from '../errors.ts';
import { transact } from '../events.ts';
import { newId } from '../ids.ts';
import { has, highestPosition, Permission, storeOverwriteLevels } from '../permissions.ts';
import { type GuildAccess, loadGuildAccess, requireChannel, requireGuild } from './access.service.ts';
import { writeAudit } from './audit.service.ts';
import { lockOverwriteChain } from './channel.service.ts';
import { validateName } from './guild.service.ts';

export type RoleRow = typeof roles.$inferSelect;
export type OverwriteRow = typeof permissionOverwrites.$inferSelect;

export const MAX_COLOR = 0xffffff;

export async function listRoles(deps: Deps, guildId: string): Promise<RoleRow[]> {
  return deps.db
    .select()
    .from(roles)
    .where(eq(roles.guildId, guildId))
    .orderBy(desc(roles.position), asc(roles.id));
}

/** The roles of each guild asked for, highest position first: one statement. */
export async function rolesOfGuilds(deps: Deps, guildIds: readonly string[]): Promise<RoleRow[][]> {
  if (!guildIds.length) return [];
  const rows = await deps.db
    .select()
    .from(roles)
    .where(inArray(roles.guildId, [...guildIds]))
    .orderBy(desc(roles.position), asc(roles.id));
  return guildIds.map((id) => rows.filter((r) => r.guildId === id));
}

export async function rolesByIds(deps: Deps, ids: readonly string[]): Promise<RoleRow[]> {
  if (!ids.length) return [];
  return deps.db
    .select()
    .from(roles)
    .where(inArray(roles.id, [...ids]));
}

interface Actor {
  access: GuildAccess;
  isOwner: boolean;
  /** highest role position (Infinity for the owner) */
  top: number;
}

/** Locks the guild's role order for this transaction and checks the viewer may manage roles. */
async function lockAsManager(tx: Tx, deps: Deps, viewer: Viewer, guildId: string): Promise<Actor> {
  await tx.execute(sql`select id from guilds where id = ${guildId}::uuid for update`);
  const access = await requireGuild(tx, viewer.userId, guildId, Permission.MANAGE_ROLES, deps.now());
  return { access, isOwner: access.ownerId === viewer.userId, top: highestPosition(access.input) };
}

function requireBelow(actor: Actor, position: number) {
  if (!actor.isOwner && position >= actor.top)
    throw forbidden('You can only manage roles below your highest role.');
}

/**
 * Acting on a member (their roles, their own channel overwrites) takes a higher top role than
 * theirs; the owner outranks everyone and nobody outranks the owner. Yourself is at your own rank,
 * so only the owner acts on themselves here: adding or removing one's own role, or editing one's
 * own overwrite, can lift a deny (a muting role, a moderator's overwrite) and so escalate.
 * A user who is not (or no longer) a member holds no roles, so only the owner rule applies.
 */
async function requireOutranks(
  tx: Tx,
  deps: Deps,
  actor: { userId: string; access: GuildAccess },
  targetUserId: string,
) {
  if (actor.userId === actor.access.ownerId) return;
  if (targetUserId === actor.userId)
    throw forbidden('Only the guild owner can change their own roles or overwrites.');
  const target = await loadGuildAccess(tx, targetUserId, actor.access.guildId, deps.now());
  if (!target) throw notFound('Guild');
  if (target.ownerId === targetUserId) throw forbidden('Nobody can act on the guild owner.');
  if (target.input.isMember && highestPosition(target.input) >= highestPosition(actor.access.input))
    throw forbidden('The member has a role at or above your highest role.');
}

function requireGrantable(actor: Actor, before: bigint, after: bigint) {
  const added = after & ~before;
  if (!actor.isOwner && !has(actor.access.permissions, added))
    throw forbidden('You cannot grant permissions you do not have.');
}

function validateColor(color: number | null | undefined): number {
  const c = color ?? 0;
  if (!Number.isInteger(c) || c < 0 || c > MAX_COLOR) throw badInput('color must be 0-0xFFFFFF.', 'color');
  return c;
}

/** The role, or NOT_FOUND when it does not exist or the viewer is not in its guild. */
async function findRole(deps: Deps, viewer: Viewer, roleId: string): Promise<RoleRow> {
  const [r] = await deps.db.select().from(roles).where(eq(roles.id, roleId));
  if (!r) throw notFound('Role');
  await requireGuild(deps.db, viewer.userId, r.guildId, 0n, deps.now());
  return r;
}

/** Non-@everyone roles in order, lowest first; their index + 1 is their position. */
async function orderedRoles(tx: Tx, guildId: string): Promise<RoleRow[]> {
  return tx
    .select()
    .from(roles)
    .where(and(eq(roles.guildId, guildId), eq(roles.isEveryone, false)))
    .orderBy(asc(roles.position), asc(roles.id));
}

async function writePositions(tx: Tx, list: RoleRow[]) {
  for (const [i, r] of list.entries()) {
    if (r.position !== i + 1)
      await tx
        .update(roles)
        .set({ position: i + 1 })
        .where(eq(roles.id, r.id));
  }
}

export interface CreateRoleInput {
  guildId: string;
  name: string;
  color?: number | null;
  permissions?: bigint | null;
  mentionable?: boolean | null;
  /** 1 (just above @everyone, the default) up to one above the current highest role */
  position?: number | null;
}

export async function createRole(deps: Deps, viewer: Viewer, input: CreateRoleInput): Promise<RoleRow> {
  const name = validateName(input.name, 'Role name');
  const color = validateColor(input.color);
  const permissions = input.permissions ?? 0n;
  return transact(deps, async (tx, log) => {
    const actor = await lockAsManager(tx, deps, viewer, input.guildId);
    const list = await orderedRoles(tx, input.guildId);
    const position = input.position ?? 1;
    if (!Number.isInteger(position) || position < 1 || position > list.length + 1)
      throw badInput(`position must be 1-${list.length + 1}.`, 'position');
    // Inserting at p pushes roles at p and above up one, so the new role ends below the actor's
    // top role exactly when p <= top.
    if (!actor.isOwner && position > actor.top)
      throw forbidden('You can only create roles below your highest role.');
    requireGrantable(actor, 0n, permissions);
    const id = newId();
    const [role] = await tx
      .insert(roles)
      .values({
        id,
        guildId: input.guildId,
        name,
        color,
        permissions,
        mentionable: input.mentionable ?? false,
        position,
      })
      .returning();
    list.splice(position - 1, 0, role);
    await writePositions(tx, list);
    await writeAudit(tx, {
      guildId: input.guildId,
      actorId: viewer.userId,
      action: 'ROLE_CREATE',
      targetType: 'ROLE',
      targetId: id,
      changes: { name, color, permissions: permissions.toString(), position },
    });
    await log.append({ type: 'ROLE_CREATED', guildId: input.guildId, payload: { roleId: id } });
    return role;
  });
}

/** Fields left undefined (or null) stay as they are. */
export interface UpdateRoleInput {
  id: string;
  name?: string | null;
  color?: number | null;
  permissions?: bigint | null;
  mentionable?: boolean | null;
  position?: number | null;
}

export async function updateRole(deps: Deps, viewer: Viewer, input: UpdateRoleInput): Promise<RoleRow> {
  const found = await findRole(deps, viewer, input.id);
  const patch: Partial<RoleRow> = {};
  if (input.name != null) patch.name = validateName(input.name, 'Role name');
  if (input.color != null) patch.color = validateColor(input.color);
  if (input.mentionable != null) patch.mentionable = input.mentionable;
  if (found.isEveryone && (patch.name !== undefined || input.position != null))
    throw badInput('@everyone cannot be renamed or moved.', patch.name ? 'name' : 'position');
  return transact(deps, async (tx, log) => {
    const actor = await lockAsManager(tx, deps, viewer, found.guildId);
    const [current] = await tx.select().from(roles).where(eq(roles.id, found.id));
    if (!current) throw notFound('Role');
    requireBelow(actor, current.position);
    if (input.permissions != null) {
      requireGrantable(actor, current.permissions, input.permissions);
      patch.permissions = input.permissions;
    }
    if (input.position != null && input.position !== current.position) {
      const list = await orderedRoles(tx, found.guildId);
      if (!Number.isInteger(input.position) || input.position < 1 || input.position > list.length)
        throw badInput(`position must be 1-${list.length}.`, 'position');
      requireBelow(actor, input.position);
      const moved = list.filter((r) => r.id !== current.id);
      moved.splice(input.position - 1, 0, current);
      await writePositions(tx, moved);
    }
    const [role] = Object.keys(patch).length
      ? await tx.update(roles).set(patch).where(eq(roles.id, current.id)).returning()
      : await tx.select().from(roles).where(eq(roles.id, current.id));
    const changes: Record<string, unknown> = { ...patch };
    if (patch.permissions !== undefined) changes.permissions = patch.permissions.toString();
    if (input.position != null) changes.position = input.position;
    await writeAudit(tx, {
      guildId: found.guildId,
      actorId: viewer.userId,
      action: 'ROLE_UPDATE',
      targetType: 'ROLE',
      targetId: current.id,
      changes,
    });
    await log.append({
      type: 'ROLE_UPDATED',
      guildId: found.guildId,
      payload: { roleId: current.id, changes: Object.keys(changes) },
    });
    return role;
  });
}

export async function deleteRole(deps: Deps, viewer: Viewer, roleId: string): Promise<string> {
  const found = await findRole(deps, viewer, roleId);
  if (found.isEveryone) throw badInput('@everyone cannot be deleted.', 'id');
  return transact(deps, async (tx, log) => {
    const actor = await lockAsManager(tx, deps, viewer, found.guildId);
    const [current] = await tx.select().from(roles).where(eq(roles.id, found.id));
    if (!current) throw notFound('Role');
    requireBelow(actor, current.position);
    await tx.delete(roles).where(eq(roles.id, current.id));
    // Overwrites name their target without a foreign key (it may be a role or a user). A role's
    // are on its guild's channels (overwriteGuard): looked up by channel (the key's first column),
    // as target_id has no index of its own: every overwrite on the server was read, in the
    // transaction that holds every realtime stream (log.ts, Horizon): 1M took ~0.18 s.
    await tx
      .delete(permissionOverwrites)
      .where(
        and(
          inArray(
            permissionOverwrites.channelId,
            tx.select({ id: channels.id }).from(channels).where(eq(channels.guildId, found.guildId)),
          ),
          eq(permissionOverwrites.targetType, 'ROLE'),
          eq(permissionOverwrites.targetId, current.id),
        ),
      );
    await writePositions(tx, await orderedRoles(tx, found.guildId));
    await writeAudit(tx, {
      guildId: found.guildId,
      actorId: viewer.userId,
      action: 'ROLE_DELETE',
      targetType: 'ROLE',
      targetId: current.id,
      changes: { name: current.name },
    });
    await log.append({ type: 'ROLE_DELETED', guildId: found.guildId, payload: { roleId: current.id } });
    return current.id;
  });
}

export interface RoleAssignment {
  guildId: string;
  userId: string;
  roleId: string;
}

/** Adds (assign) or removes a role from a member; repeating either is harmless. */
export async function setMemberRole(
  deps: Deps,
  viewer: Viewer,
  input: RoleAssignment,
  assign: boolean,
): Promise<boolean> {
  return transact(deps, async (tx, log) => {
    const actor = await lockAsManager(tx, deps, viewer, input.guildId);
    const [role] = await tx
      .select()
      .from(roles)
      .where(and(eq(roles.id, input.roleId), eq(roles.guildId, input.guildId)));
    if (!role) throw notFound('Role');
    if (role.isEveryone) throw badInput('Everyone has @everyone; it cannot be assigned.', 'roleId');
    requireBelow(actor, role.position);
    const [m] = await tx
      .select({ userId: members.userId })
      .from(members)
      .where(and(eq(members.guildId, input.guildId), eq(members.userId, input.userId)));
    if (!m) throw notFound('Member');
    await requireOutranks(tx, deps, { userId: viewer.userId, access: actor.access }, input.userId);
    const changed = assign
      ? await tx
          .insert(memberRoles)
          .values({ guildId: input.guildId, userId: input.userId, roleId: role.id })
          .onConflictDoNothing()
          .returning({ roleId: memberRoles.roleId })
      : await tx
          .delete(memberRoles)
          .where(
            and(
              eq(memberRoles.guildId, input.guildId),
              eq(memberRoles.userId, input.userId),
              eq(memberRoles.roleId, role.id),
            ),
          )
          .returning({ roleId: memberRoles.roleId });
    if (!changed.length) return true;
    await writeAudit(tx, {
      guildId: input.guildId,
      actorId: viewer.userId,
      action: 'MEMBER_ROLE_UPDATE',
      targetType: 'USER',
      targetId: input.userId,
      changes: assign ? { added: [role.id] } : { removed: [role.id] },
    });
    await log.append({
      type: 'MEMBER_UPDATED',
      guildId: input.guildId,
      payload: { userId: input.userId, [assign ? 'addedRoleIds' : 'removedRoleIds']: [role.id] },
    });
    return true;
  });
}

export async function listOverwrites(deps: Deps, viewer: Viewer, channelId: string): Promise<OverwriteRow[]> {
  const a = await requireChannel(deps.db, viewer.userId, channelId, 0n, deps.now());
  if (!has(a.permissions, Permission.MANAGE_CHANNELS) && !has(a.permissions, Permission.MANAGE_ROLES))
    throw forbidden('Only members who manage channels or roles can see overwrites.');
  return deps.db
    .select()
    .from(permissionOverwrites)
    .where(eq(permissionOverwrites.channelId, channelId))
    .orderBy(asc(permissionOverwrites.targetType), asc(permissionOverwrites.targetId));
}

export interface OverwriteInput {
  channelId: string;
  targetType: 'ROLE' | 'MEMBER';
  targetId: string;
  allow: bigint;
  deny: bigint;
}

/**
 * Checks the viewer may manage `channelId`'s overwrites for this target: MANAGE_ROLES in the
 * channel, and a role target below the viewer's highest role (@everyone is always below).
 */
async function overwriteGuard(tx: Tx, deps: Deps, viewer: Viewer, channelId: string, targetId: string) {
  // Waits for a deletion, a move or another change that is recording the overwrites that apply
  // here, and holds them off until this change commits: the levels read below (`access.levels`)
  // are then the ones this change replaces, recorded in its row for visibility.
  await lockOverwriteChain(tx, channelId);
  const a = await requireChannel(tx, viewer.userId, channelId, Permission.MANAGE_ROLES, deps.now());
  if (!a.guild || !a.channel.guildId) throw forbidden();
  const guildId = a.channel.guildId;
  const isOwner = a.guild.ownerId === viewer.userId;
  const [role] = await tx
    .select()
    .from(roles)
    .where(and(eq(roles.id, targetId), eq(roles.guildId, guildId)));
  if (role && !role.isEveryone && !isOwner && role.position >= highestPosition(a.guild.input))
    throw forbidden('You can only manage roles below your highest role.');
  return { access: a, guild: a.guild, guildId, isOwner, role };
}

export async function setChannelOverwrite(
  deps: Deps,
  viewer: Viewer,
  input: OverwriteInput,
): Promise<OverwriteRow> {
  if (input.allow & input.deny) throw badInput('A permission cannot be both allowed and denied.', 'deny');
  return transact(deps, async (tx, log) => {
    const g = await overwriteGuard(tx, deps, viewer, input.channelId, input.targetId);
    if (input.targetType === 'ROLE' && !g.role) throw notFound('Role');
    if (input.targetType === 'MEMBER') {
      const [m] = await tx
        .select({ userId: members.userId })
        .from(members)
        .where(and(eq(members.guildId, g.guildId), eq(members.userId, input.targetId)));
      if (!m) throw notFound('Member');
      await requireOutranks(tx, deps, { userId: viewer.userId, access: g.guild }, input.targetId);
    }
    if (!g.isOwner && !has(g.access.permissions, input.allow | input.deny))
      throw forbidden('You can only allow or deny permissions you have in this channel.');
    const values = { ...input };
    const [row] = await tx
      .insert(permissionOverwrites)
      .values(values)
      .onConflictDoUpdate({
        target: [permissionOverwrites.channelId, permissionOverwrites.targetId],
        set: { targetType: input.targetType, allow: input.allow, deny: input.deny },
      })
      .returning();
    await writeAudit(tx, {
      guildId: g.guildId,
      actorId: viewer.userId,
      action: 'CHANNEL_OVERWRITE_UPDATE',
      targetType: 'CHANNEL',
      targetId: input.channelId,
      changes: {
        targetType: input.targetType,
        targetId: input.targetId,
        allow: input.allow.toString(),
        deny: input.deny.toString(),
      },
    });
    await log.append({
      type: 'PERMISSIONS_CHANGED',
      guildId: g.guildId,
      channelId: input.channelId,
      payload: {
        channelId: input.channelId,
        targetType: input.targetType,
        targetId: input.targetId,
        overwrites: storeOverwriteLevels(g.access.levels),
      },
    });
    return row;
  });
}

export async function removeChannelOverwrite(
  deps: Deps,
  viewer: Viewer,
  input: { channelId: string; targetId: string },
): Promise<boolean> {
  return transact(deps, async (tx, log) => {
    const g = await overwriteGuard(tx, deps, viewer, input.channelId, input.targetId);
    // A member's overwrite may be someone's deny placed by a higher rank: the hierarchy applies.
    if (!g.role) await requireOutranks(tx, deps, { userId: viewer.userId, access: g.guild }, input.targetId);
    const gone = await tx
      .delete(permissionOverwrites)
      .where(
        and(
          eq(permissionOverwrites.channelId, input.channelId),
          eq(permissionOverwrites.targetId, input.targetId),
        ),
      )
      .returning();
    if (!gone.length) throw notFound('Overwrite');
    await writeAudit(tx, {
      guildId: g.guildId,
      actorId: viewer.userId,
      action: 'CHANNEL_OVERWRITE_DELETE',
      targetType: 'CHANNEL',
      targetId: input.channelId,
      changes: { targetType: gone[0].targetType, targetId: input.targetId },
    });
    await log.append({
      type: 'PERMISSIONS_CHANGED',
      guildId: g.guildId,
      channelId: input.channelId,
      payload: {
        channelId: input.channelId,
        targetType: gone[0].targetType,
        targetId: input.targetId,
        overwrites: storeOverwriteLevels(g.access.levels),
      },
    });
    return true;
  });
}
