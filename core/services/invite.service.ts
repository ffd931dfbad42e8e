/**
 * Invites: codes that let a user join a guild. Uses are counted with one conditional UPDATE, so
 * concurrent joins never take an invite past its maxUses.
 */
import { randomBytes } from 'node:crypto';
import { and, asc, count, eq, gt, isNull, or, sql } from 'drizzle-orm';
import { bans, guilds, invites, members } from '../db/tables.ts';
import type { Deps, Viewer } from '../deps.ts';
import { badInput, forbidden, notFound } from '../errors.ts';
import { transact } from '../events.ts';
import { has, Permission } from '../permissions.ts';
import { requireChannel, requireGuild } from './access.service.ts';
import { holdGuild, writeAudit } from './audit.service.ts';
import { holdChannel } from './channel.service.ts';
import type { GuildRow } from './guild.service.ts';

export type InviteRow = typeof invites.$inferSelect;

export const DEFAULT_INVITE_TTL = 7 * 24 * 3600;
export const MAX_INVITE_TTL = 30 * 24 * 3600;
export const MAX_INVITE_USES = 10_000;

const ALPHABET = 'ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz23456789';

/** 10 characters from a 57-letter alphabet: about 58 bits, too many to guess. */
function newCode(): string {
  const bytes = randomBytes(10);
  let code = '';
  for (const b of bytes) code += ALPHABET[b % ALPHABET.length];
  return code;
}

export interface CreateInviteInput {
  guildId: string;
  channelId?: string | null;
  /** omitted: unlimited */
  maxUses?: number | null;
  /** omitted: 7 days */
  expiresInSeconds?: number | null;
}

export async function createInvite(deps: Deps, viewer: Viewer, input: CreateInviteInput): Promise<InviteRow> {
  const maxUses = input.maxUses ?? null;
  if (maxUses !== null && (!Number.isInteger(maxUses) || maxUses < 1 || maxUses > MAX_INVITE_USES))
    throw badInput(`maxUses must be 1-${MAX_INVITE_USES} (omit it for unlimited).`, 'maxUses');
  const ttl = input.expiresInSeconds ?? DEFAULT_INVITE_TTL;
  if (!Number.isInteger(ttl) || ttl < 1 || ttl > MAX_INVITE_TTL)
    throw badInput(`expiresInSeconds must be 1-${MAX_INVITE_TTL}.`, 'expiresInSeconds');
  if (input.channelId) {
    // An invite to a channel needs CREATE_INVITE there, so channel overwrites can refuse it.
    const a = await requireChannel(deps.db, viewer.userId, input.channelId, 0n, deps.now());
    if (a.channel.guildId !== input.guildId) throw badInput('channelId must be in the guild.', 'channelId');
    if (!has(a.permissions, Permission.CREATE_INVITE)) throw forbidden();
  } else {
    await requireGuild(deps.db, viewer.userId, input.guildId, Permission.CREATE_INVITE, deps.now());
  }
  const code = newCode();
  const expiresAt = new Date(deps.now().getTime() + ttl * 1000);
  return transact(deps, async (tx) => {
    // The guild, and the channel when there is one, held first (NOT_FOUND when gone): the insert's
    // key checks waited on their deletion, then failed with a foreign key violation
    // (INTERNAL_SERVER_ERROR).
    const held = input.channelId
      ? await holdChannel(tx, input.channelId)
      : await holdGuild(tx, input.guildId);
    if (!held) throw notFound(input.channelId ? 'Channel' : 'Guild');
    const [row] = await tx
      .insert(invites)
      .values({
        code,
        guildId: input.guildId,
        channelId: input.channelId ?? null,
        inviterId: viewer.userId,
        maxUses,
        expiresAt,
      })
      .returning();
    await writeAudit(tx, {
      guildId: input.guildId,
      actorId: viewer.userId,
      action: 'INVITE_CREATE',
      targetType: 'INVITE',
      changes: { code, maxUses, expiresAt: expiresAt.toISOString() },
    });
    return row;
  });
}

/** SQL for "this invite can still be used". */
const usable = (now: Date) =>
  and(
    isNull(invites.revokedAt),
    or(isNull(invites.expiresAt), gt(invites.expiresAt, now)),
    or(isNull(invites.maxUses), sql`${invites.uses} < ${invites.maxUses}`),
  );

/** The inviter or a holder of MANAGE_GUILD may revoke; strangers get NOT_FOUND. */
export async function revokeInvite(deps: Deps, viewer: Viewer, code: string): Promise<boolean> {
  const [inv] = await deps.db.select().from(invites).where(eq(invites.code, code));
  if (!inv) throw notFound('Invite');
  const a = await requireGuild(deps.db, viewer.userId, inv.guildId, 0n, deps.now()).catch(() => {
    throw notFound('Invite');
  });
  if (inv.inviterId !== viewer.userId && !has(a.permissions, Permission.MANAGE_GUILD)) throw forbidden();
  if (inv.revokedAt) return true;
  return transact(deps, async (tx) => {
    // The guild first (holdGuild): a deletion's cascade waiting on this invite row while this
    // audit row's key check waited on the deletion deadlocked, failing one of the two.
    if (!(await holdGuild(tx, inv.guildId))) throw notFound('Invite');
    await tx
      .update(invites)
      .set({ revokedAt: deps.now() })
      .where(and(eq(invites.code, code), isNull(invites.revokedAt)));
    await writeAudit(tx, {
      guildId: inv.guildId,
      actorId: viewer.userId,
      action: 'INVITE_DELETE',
      targetType: 'INVITE',
      changes: { code },
    });
    return true;
  });
}

/** The guild's invites that can still be used, newest first (MANAGE_GUILD). */
export async function listInvites(deps: Deps, viewer: Viewer, guildId: string): Promise<InviteRow[]> {
  await requireGuild(deps.db, viewer.userId, guildId, Permission.MANAGE_GUILD, deps.now());
  return deps.db
    .select()
    .from(invites)
    .where(and(eq(invites.guildId, guildId), usable(deps.now())))
    .orderBy(sql`${invites.createdAt} desc`, asc(invites.code));
}

export interface InvitePreview {
  invite: InviteRow;
  guild: GuildRow;
  memberCount: number;
}

/** What anyone holding the code may see before joining; unusable codes are NOT_FOUND. */
export async function previewInvite(deps: Deps, code: string): Promise<InvitePreview> {
  const [r] = await deps.db
    .select({ invite: invites, guild: guilds })
    .from(invites)
    .innerJoin(guilds, eq(guilds.id, invites.guildId))
    .where(and(eq(invites.code, code), usable(deps.now())));
  if (!r) throw notFound('Invite');
  const [{ n }] = await deps.db.select({ n: count() }).from(members).where(eq(members.guildId, r.guild.id));
  return { ...r, memberCount: Number(n) };
}

/**
 * Joins the invite's guild. A member joining again gets the guild back without using the invite;
 * a banned user is refused; an expired, revoked or used-up code is NOT_FOUND.
 */
export async function joinGuild(deps: Deps, viewer: Viewer, code: string): Promise<GuildRow> {
  const gone = () => notFound('Invite (it may have expired, been revoked or reached its use limit)');
  return transact(deps, async (tx, log) => {
    const [inv] = await tx
      .select()
      .from(invites)
      .where(and(eq(invites.code, code), isNull(invites.revokedAt)));
    if (!inv) throw gone();
    // The guild held first: the member row's key check waited on a guild deletion, then failed
    // with a foreign key violation (INTERNAL_SERVER_ERROR) where the invite was simply gone.
    if (!(await holdGuild(tx, inv.guildId))) throw gone();
    const [guild] = await tx.select().from(guilds).where(eq(guilds.id, inv.guildId));
    if (!guild) throw gone();
    const [ban] = await tx
      .select({ userId: bans.userId })
      .from(bans)
      .where(and(eq(bans.guildId, guild.id), eq(bans.userId, viewer.userId)));
    if (ban) throw forbidden('You are banned from this guild.');
    const joined = await tx
      .insert(members)
      .values({ guildId: guild.id, userId: viewer.userId })
      .onConflictDoNothing()
      .returning({ userId: members.userId });
    if (!joined.length) return guild;
    // Row-locking UPDATE with the limit in its WHERE: a concurrent join waits, then re-checks.
    const used = await tx
      .update(invites)
      .set({ uses: sql`${invites.uses} + 1` })
      .where(and(eq(invites.code, code), usable(deps.now())))
      .returning({ uses: invites.uses });
    if (!used.length) throw gone();
    await writeAudit(tx, {
      guildId: guild.id,
      actorId: viewer.userId,
      action: 'MEMBER_JOIN',
      targetType: 'USER',
      targetId: viewer.userId,
      changes: { code },
    });
    await log.append({ type: 'MEMBER_JOINED', guildId: guild.id, payload: { userId: viewer.userId } });
    return guild;
  });
}
