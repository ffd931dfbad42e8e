/** Guild members: the paginated member list and nicknames. */
import { and, eq, sql } from 'drizzle-orm';
import type { DbOrTx } from '../db/client.ts';
import { members } from '../db/tables.ts';
import type { Deps, Viewer } from '../deps.ts';
import { badInput, forbidden, notFound } from '../errors.ts';
import { transact } from '../events.ts';
import { isUuid } from '../ids.ts';
import { has, highestPosition, Permission } from '../permissions.ts';
import { loadGuildAccess, requireGuild } from './access.service.ts';
import { holdGuild, writeAudit } from './audit.service.ts';

export interface MemberRow {
  guildId: string;
  userId: string;
  nickname: string | null;
  joinedAt: Date;
  timeoutUntil: Date | null;
  /** ids of the member's roles, @everyone not included */
  roleIds: string[];
  /** the join time at full database precision, for cursors */
  joinedAtExact: string;
}

export const MAX_PAGE = 100;
export const DEFAULT_PAGE = 50;
export const MAX_NICKNAME = 32;

export function encodeMemberCursor(m: MemberRow): string {
  return Buffer.from(JSON.stringify([m.joinedAtExact, m.userId])).toString('base64url');
}

/**
 * joined_at::text as Postgres prints it, checked field by field (Date.parse takes "1", and a
 * 31 February would reach the ::timestamptz cast, which refuses it with a masked error).
 */
const PG_TIMESTAMP_RE =
  /^(\d{4})-(\d{2})-(\d{2}) (\d{2}):(\d{2}):(\d{2})(\.\d{1,6})?[+-]\d{2}(:[0-5]\d){0,2}$/;

function isPgTimestamp(s: string): boolean {
  const m = PG_TIMESTAMP_RE.exec(s);
  if (!m) return false;
  const [y, mo, d, h, mi, se] = m.slice(1, 7).map(Number);
  const day = new Date(Date.UTC(y, mo - 1, d));
  return y >= 1 && day.getUTCMonth() === mo - 1 && day.getUTCDate() === d && h < 24 && mi < 60 && se < 60;
}

function decodeMemberCursor(cursor: string): [string, string] {
  try {
    const v = cursor.length <= 200 ? JSON.parse(Buffer.from(cursor, 'base64url').toString()) : null;
    if (
      Array.isArray(v) &&
      v.length === 2 &&
      typeof v[0] === 'string' &&
      isPgTimestamp(v[0]) &&
      typeof v[1] === 'string' &&
      isUuid(v[1])
    )
      return [v[0], v[1]];
  } catch {
    // falls through to the error below
  }
  throw badInput('after is not a valid cursor.', 'after');
}

interface RawMember {
  guild_id: string;
  user_id: string;
  nickname: string | null;
  joined_at: string | Date;
  joined_exact: string;
  timeout_until: string | Date | null;
  role_ids: string[] | null;
}

const toMember = (r: RawMember): MemberRow => ({
  guildId: r.guild_id,
  userId: r.user_id,
  nickname: r.nickname,
  joinedAt: new Date(r.joined_at),
  joinedAtExact: r.joined_exact,
  timeoutUntil: r.timeout_until ? new Date(r.timeout_until) : null,
  roleIds: r.role_ids ?? [],
});

const memberSelect = sql`select m.guild_id, m.user_id, m.nickname, m.joined_at, m.joined_at::text as joined_exact,
    m.timeout_until,
    (select json_agg(mr.role_id order by mr.role_id) from member_roles mr
       where mr.guild_id = m.guild_id and mr.user_id = m.user_id) as role_ids
  from members m`;

/**
 * One page of a guild's members in join order (ties by user id). Fetches one row more than asked
 * to know whether there is a next page.
 */
export async function listMembers(
  deps: Deps,
  viewer: Viewer,
  guildId: string,
  args: { first?: number | null; after?: string | null },
): Promise<{ members: MemberRow[]; hasNextPage: boolean }> {
  // Refused, not clamped, as in Channel.messages: a client never silently gets less than it asked.
  const first = args.first ?? DEFAULT_PAGE;
  if (!Number.isInteger(first) || first < 0 || first > MAX_PAGE)
    throw badInput(`first must be between 0 and ${MAX_PAGE}.`, 'first');
  const after = args.after ? decodeMemberCursor(args.after) : null;
  await requireGuild(deps.db, viewer.userId, guildId, 0n, deps.now());
  const res = await deps.db.execute(sql`${memberSelect}
    where m.guild_id = ${guildId}::uuid
    ${after ? sql`and (m.joined_at, m.user_id) > (${after[0]}::timestamptz, ${after[1]}::uuid)` : sql``}
    order by m.joined_at, m.user_id
    limit ${first + 1}`);
  const rows = (res as unknown as { rows: RawMember[] }).rows.map(toMember);
  return { members: rows.slice(0, first), hasNextPage: rows.length > first };
}

export async function getMember(db: DbOrTx, guildId: string, userId: string): Promise<MemberRow | null> {
  const res = await db.execute(sql`${memberSelect}
    where m.guild_id = ${guildId}::uuid and m.user_id = ${userId}::uuid`);
  const r = (res as unknown as { rows: RawMember[] }).rows[0];
  return r ? toMember(r) : null;
}

/**
 * Sets or clears (null or blank) a nickname. Your own needs CHANGE_NICKNAME (or MANAGE_NICKNAMES);
 * someone else's needs MANAGE_NICKNAMES and a higher top role than theirs.
 */
export async function setNickname(
  deps: Deps,
  viewer: Viewer,
  input: { guildId: string; userId: string; nickname: string | null },
): Promise<MemberRow> {
  const nickname = input.nickname?.trim() || null;
  if (nickname && nickname.length > MAX_NICKNAME)
    throw badInput(`Nickname must be 1-${MAX_NICKNAME} characters.`, 'nickname');
  const actor = await requireGuild(deps.db, viewer.userId, input.guildId, 0n, deps.now());
  const isOwner = actor.ownerId === viewer.userId;
  if (input.userId === viewer.userId) {
    if (
      !has(actor.permissions, Permission.CHANGE_NICKNAME) &&
      !has(actor.permissions, Permission.MANAGE_NICKNAMES)
    )
      throw forbidden();
  } else {
    if (!has(actor.permissions, Permission.MANAGE_NICKNAMES)) throw forbidden();
    const target = await loadGuildAccess(deps.db, input.userId, input.guildId, deps.now());
    if (!target?.input.isMember) throw notFound('Member');
    if (!isOwner && highestPosition(target.input) >= highestPosition(actor.input))
      throw forbidden('You can only change nicknames of members below your highest role.');
  }
  return transact(deps, async (tx, log) => {
    // The guild first (holdGuild): a deletion's cascade waiting on this member row while this
    // audit row's key check waited on the deletion deadlocked, failing one of the two.
    if (!(await holdGuild(tx, input.guildId))) throw notFound('Guild');
    const updated = await tx
      .update(members)
      .set({ nickname })
      .where(and(eq(members.guildId, input.guildId), eq(members.userId, input.userId)))
      .returning({ userId: members.userId });
    if (!updated.length) throw notFound('Member');
    await writeAudit(tx, {
      guildId: input.guildId,
      actorId: viewer.userId,
      action: 'MEMBER_UPDATE',
      targetType: 'USER',
      targetId: input.userId,
      changes: { nickname },
    });
    await log.append({
      type: 'MEMBER_UPDATED',
      guildId: input.guildId,
      payload: { userId: input.userId, nickname },
    });
    const m = await getMember(tx, input.guildId, input.userId);
    if (!m) throw notFound('Member');
    return m;
  });
}
