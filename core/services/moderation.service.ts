/**
 * Kick, ban, unban and timeout. Each action checks the actor's permission and the role
 * hierarchy inside its transaction (so a concurrent role change cannot slip between check and
 * write), writes an audit row and an event in that same transaction.
 */
import { and, desc, eq, gt, gte, inArray, isNull, lt, sql } from 'drizzle-orm';
import type { DbOrTx, Tx } from '../db/client.ts';
import { auditLog, bans, memberRoles, members, messages, users } from '../db/tables.ts';
import type { Deps, Viewer } from '../deps.ts';
import { badInput, conflict, forbidden, notFound } from '../errors.ts';
import { type EventWriter, transact } from '../events.ts';
import { idAtTime } from '../ids.ts';
import { has, highestPosition, Permission } from '../permissions.ts';
import { type GuildAccess, loadGuildAccess, requireGuild } from './access.service.ts';
import { holdGuild, writeAudit } from './audit.service.ts';
import { wipeMessages } from './message.service.ts';

export const MAX_REASON = 512;
/** Discord's limits: a purge reaches back at most 7 days, a timeout lasts at most 28 days. */
export const MAX_PURGE_HOURS = 168;
export const MAX_TIMEOUT_MS = 28 * 24 * 3600 * 1000;

export type BanRow = typeof bans.$inferSelect;

function cleanReason(raw: string | null | undefined): string | null {
  const r = raw?.trim() || null;
  if (r && r.length > MAX_REASON)
    throw badInput(`Reason must be at most ${MAX_REASON} characters.`, 'reason');
  return r;
}

/**
 * The actor's access (with `need`) and the target's, after the hierarchy rules: nobody acts on
 * themselves, on the owner, or on a member whose highest role is at or above their own. All
 * three answer FORBIDDEN: the target is visible, the action is not allowed.
 */
async function requireActionable(
  tx: DbOrTx,
  deps: Deps,
  viewer: Viewer,
  guildId: string,
  targetId: string,
  need: bigint,
): Promise<{ actor: GuildAccess; target: GuildAccess }> {
  const actor = await requireGuild(tx, viewer.userId, guildId, need, deps.now());
  if (targetId === viewer.userId) throw forbidden('You cannot do this to yourself.');
  const target = await loadGuildAccess(tx, targetId, guildId, deps.now());
  if (!target) throw notFound('Guild');
  if (targetId === actor.ownerId) throw forbidden('Nobody can act on the guild owner.');
  // A non-member holds no roles here, so only the owner rule applies to a pre-emptive ban.
  if (target.input.isMember && highestPosition(target.input) >= highestPosition(actor.input)) {
    throw forbidden('The target has a role at or above your highest role.');
  }
  return { actor, target };
}

/** Drops the membership and its role assignments; true when there was one. */
async function removeMember(tx: Tx, guildId: string, userId: string): Promise<boolean> {
  const gone = await tx
    .delete(members)
    .where(and(eq(members.guildId, guildId), eq(members.userId, userId)))
    .returning({ userId: members.userId });
  await tx.delete(memberRoles).where(and(eq(memberRoles.guildId, guildId), eq(memberRoles.userId, userId)));
  return gone.length > 0;
}

export async function kickMember(
  deps: Deps,
  viewer: Viewer,
  input: { guildId: string; userId: string; reason?: string | null },
): Promise<boolean> {
  const reason = cleanReason(input.reason);
  return transact(deps, async (tx, log) => {
    await holdGuild(tx, input.guildId);
    const { target } = await requireActionable(
      tx,
      deps,
      viewer,
      input.guildId,
      input.userId,
      Permission.KICK_MEMBERS,
    );
    if (!target.input.isMember) throw notFound('Member');
    await removeMember(tx, input.guildId, input.userId);
    await writeAudit(tx, {
      guildId: input.guildId,
      actorId: viewer.userId,
      action: 'MEMBER_KICK',
      targetType: 'USER',
      targetId: input.userId,
      reason,
    });
    await log.append({ type: 'MEMBER_KICKED', guildId: input.guildId, payload: { userId: input.userId } });
    return true;
  });
}

/** Messages a ban's purge wipes per transaction (see banMember). */
export const BAN_PURGE_BATCH = 500;

/**
 * Soft-deletes the user's messages in the guild from `since` on (content wiped, deleted_at set),
 * at most `limit` of them after `after` in id order, and logs one MESSAGE_DELETED per message,
 * the same event a single delete produces, so clients need no bulk-delete handling. Returns the
 * last id wiped (null: none) and how many.
 */
async function purgeMessages(
  tx: Tx,
  log: EventWriter,
  now: Date,
  input: { guildId: string; userId: string; since: string; after?: string; before?: string; limit?: number },
): Promise<{ n: number; last: string | null }> {
  const { guildId, userId, since } = input;
  const mine = and(
    eq(messages.guildId, guildId),
    eq(messages.authorId, userId),
    gte(messages.id, since),
    input.after ? gt(messages.id, input.after) : undefined,
    input.before ? lt(messages.id, input.before) : undefined,
  );
  // The next `limit` in id order, along messages_guild_author: each batch starts where the last
  // ended rather than walking past the rows wiped so far. Locked in id order first: two purges of
  // the same member at once (two moderators' bans) then queue behind each other's rows, where
  // updating in whatever order the plan took them deadlocked (INTERNAL_SERVER_ERROR for one).
  const next = tx
    .select({ id: messages.id })
    .from(messages)
    .where(and(mine, isNull(messages.deletedAt)))
    .orderBy(messages.id);
  const where = inArray(messages.id, (input.limit ? next.limit(input.limit) : next).for('update'));
  const deleted = await wipeMessages(tx, where, now);
  // Log order is the messages' own (wipeMessages returns them in no set order).
  deleted.sort((a, b) => (a.id < b.id ? -1 : a.id > b.id ? 1 : 0));
  await log.appendMany(
    deleted.map((m) => ({
      type: 'MESSAGE_DELETED',
      guildId,
      channelId: m.channelId,
      payload: { messageId: m.id, channelId: m.channelId },
    })),
  );
  return { n: deleted.length, last: deleted.at(-1)?.id ?? null };
}

/**
 * Bans a member (or, pre-emptively, any user), soft-deleting their messages in the guild from the
 * last `deleteMessageHours` hours (at most MAX_PURGE_HOURS).
 *
 * The purge goes first, BAN_PURGE_BATCH messages per transaction, each checking the actor's right
 * again; the ban's own transaction then wipes what was sent meanwhile. In one transaction, a spam
 * bot's tens of thousands of messages held it open for seconds (~2.5 s per 10k here), and the
 * realtime log delivers nothing written after a transaction still in progress (core/realtime/
 * log.ts, Horizon): every stream of every guild waited for it. So a ban refused after its purge
 * (banned meanwhile by someone else, the actor's right withdrawn) leaves the messages it wiped
 * wiped: wiping them was within the actor's right when it happened.
 */
export async function banMember(
  deps: Deps,
  viewer: Viewer,
  input: { guildId: string; userId: string; reason?: string | null; deleteMessageHours?: number | null },
): Promise<boolean> {
  const reason = cleanReason(input.reason);
  const hours = input.deleteMessageHours ?? 0;
  if (!Number.isInteger(hours) || hours < 0 || hours > MAX_PURGE_HOURS) {
    throw badInput(`deleteMessageHours must be 0-${MAX_PURGE_HOURS}.`, 'deleteMessageHours');
  }
  const startedAt = deps.now().getTime();
  const since = idAtTime(startedAt - hours * 3600 * 1000);
  /**
   * The batches stop at what was sent before the ban began; the ban's own transaction takes the
   * rest. Chasing every new message instead never ended while the member sent faster than a batch
   * wiped (RATE_LIMITS=off, a bot): 500 per batch, ~60 ms each here.
   */
  const until = idAtTime(startedAt + 1);
  /** What the ban may do to the target, in the transaction `tx` (the guild held first). */
  const allowed = async (tx: Tx) => {
    await holdGuild(tx, input.guildId);
    await requireActionable(tx, deps, viewer, input.guildId, input.userId, Permission.BAN_MEMBERS);
    const [u] = await tx.select({ id: users.id }).from(users).where(eq(users.id, input.userId));
    if (!u) throw notFound('User');
  };
  /** Whose messages the purge wipes, and from when. */
  const whose = { guildId: input.guildId, userId: input.userId, since };
  let purged = 0;
  try {
    let after: string | undefined;
    for (let more = hours > 0; more; ) {
      const { n, last } = await transact(deps, async (tx, log) => {
        await allowed(tx);
        if (await isBanned(tx, input.guildId, input.userId)) throw conflict('This user is already banned.');
        return purgeMessages(tx, log, deps.now(), { ...whose, after, before: until, limit: BAN_PURGE_BATCH });
      });
      purged += n;
      if (last) after = last;
      more = n === BAN_PURGE_BATCH;
    }
    const banned = await transact(deps, async (tx, log) => {
      await allowed(tx);
      const inserted = await tx
        .insert(bans)
        .values({ guildId: input.guildId, userId: input.userId, reason, actorId: viewer.userId })
        .onConflictDoNothing()
        .returning({ userId: bans.userId });
      if (!inserted.length) throw conflict('This user is already banned.');
      const wasMember = await removeMember(tx, input.guildId, input.userId);
      // What was sent while the purge ran (the member removed now, nothing more comes). From
      // `since`, not from where the batches ended: a send takes its id before its insert (a grouped
      // insert waiting behind a stalled statement, another instance's clock a little behind), so a
      // message committed after a batch may have an id older than the last one it wiped.
      let rest = 0;
      if (hours > 0) rest = (await purgeMessages(tx, log, deps.now(), whose)).n;
      await writeAudit(tx, {
        guildId: input.guildId,
        actorId: viewer.userId,
        action: 'MEMBER_BAN',
        targetType: 'USER',
        targetId: input.userId,
        reason,
        changes: { wasMember, deleteMessageHours: hours, deletedMessages: purged + rest },
      });
      await log.append({ type: 'MEMBER_BANNED', guildId: input.guildId, payload: { userId: input.userId } });
      return true;
    });
    // Audited with the ban.
    purged = 0;
    return banned;
  } finally {
    // Refused after some of its purge committed (banned meanwhile by someone else, the actor's
    // right withdrawn): what it deleted is still the actor's deletion, and audited as one.
    if (purged > 0) await auditRefusedPurge(deps, viewer, input, hours, purged);
  }
}

/** The audit row of a ban's purge whose ban was refused after it (see banMember). */
async function auditRefusedPurge(
  deps: Deps,
  viewer: Viewer,
  input: { guildId: string; userId: string },
  hours: number,
  deleted: number,
) {
  try {
    await deps.db.transaction((tx) =>
      writeAudit(tx, {
        guildId: input.guildId,
        actorId: viewer.userId,
        action: 'MESSAGE_BULK_DELETE',
        targetType: 'USER',
        targetId: input.userId,
        changes: { deleteMessageHours: hours, deletedMessages: deleted, banRefused: true },
      }),
    );
  } catch (err) {
    deps.log.error(
      { err, ...input, deleted },
      'a refused ban purged messages and its audit row could not be written',
    );
  }
}

/** Lifts a ban (BAN_MEMBERS). No event: nothing a client shows changes until they rejoin. */
export async function unbanMember(
  deps: Deps,
  viewer: Viewer,
  input: { guildId: string; userId: string; reason?: string | null },
): Promise<boolean> {
  const reason = cleanReason(input.reason);
  return transact(deps, async (tx) => {
    await holdGuild(tx, input.guildId);
    await requireGuild(tx, viewer.userId, input.guildId, Permission.BAN_MEMBERS, deps.now());
    const gone = await tx
      .delete(bans)
      .where(and(eq(bans.guildId, input.guildId), eq(bans.userId, input.userId)))
      .returning({ userId: bans.userId });
    if (!gone.length) throw notFound('Ban');
    await writeAudit(tx, {
      guildId: input.guildId,
      actorId: viewer.userId,
      action: 'MEMBER_UNBAN',
      targetType: 'USER',
      targetId: input.userId,
      reason,
    });
    return true;
  });
}

/**
 * Times a member out until `until` (MODERATE_MEMBERS), at most 28 days ahead; null or a time
 * already past clears the timeout. Administrators cannot be timed out (it would not bind them).
 */
export async function timeoutMember(
  deps: Deps,
  viewer: Viewer,
  input: { guildId: string; userId: string; until?: Date | null; reason?: string | null },
): Promise<boolean> {
  const reason = cleanReason(input.reason);
  const now = deps.now();
  const until = input.until && input.until > now ? input.until : null;
  if (until && until.getTime() - now.getTime() > MAX_TIMEOUT_MS) {
    throw badInput('A timeout lasts at most 28 days.', 'until');
  }
  return transact(deps, async (tx, log) => {
    await holdGuild(tx, input.guildId);
    const { target } = await requireActionable(
      tx,
      deps,
      viewer,
      input.guildId,
      input.userId,
      Permission.MODERATE_MEMBERS,
    );
    if (!target.input.isMember) throw notFound('Member');
    if (until && has(target.permissions, Permission.ADMINISTRATOR)) {
      throw forbidden('Administrators cannot be timed out.');
    }
    const [before] = await tx
      .select({ t: members.timeoutUntil })
      .from(members)
      .where(and(eq(members.guildId, input.guildId), eq(members.userId, input.userId)))
      .for('update');
    await tx
      .update(members)
      .set({ timeoutUntil: until })
      .where(and(eq(members.guildId, input.guildId), eq(members.userId, input.userId)));
    await writeAudit(tx, {
      guildId: input.guildId,
      actorId: viewer.userId,
      action: until ? 'MEMBER_TIMEOUT' : 'MEMBER_TIMEOUT_CLEAR',
      targetType: 'USER',
      targetId: input.userId,
      reason,
      changes: {
        timeoutUntil: { old: before?.t?.toISOString() ?? null, new: until?.toISOString() ?? null },
      },
    });
    await log.append({
      type: 'MEMBER_UPDATED',
      guildId: input.guildId,
      payload: { userId: input.userId, timeoutUntil: until?.toISOString() ?? null },
    });
    return true;
  });
}

/** The guild's bans, newest first (BAN_MEMBERS). */
export async function listBans(deps: Deps, viewer: Viewer, guildId: string): Promise<BanRow[]> {
  await requireGuild(deps.db, viewer.userId, guildId, Permission.BAN_MEMBERS, deps.now());
  return deps.db.select().from(bans).where(eq(bans.guildId, guildId)).orderBy(desc(bans.createdAt));
}

/** Whether the user is banned from the guild (joinGuild refuses them). */
export async function isBanned(db: DbOrTx, guildId: string, userId: string): Promise<boolean> {
  const r = await db.execute(
    sql`select 1 from ${bans} where ${bans.guildId} = ${guildId} and ${bans.userId} = ${userId}`,
  );
  return (r as unknown as { rows: unknown[] }).rows.length > 0;
}

export type AuditRow = typeof auditLog.$inferSelect;

/**
 * One page of the guild's audit log, newest first (VIEW_AUDIT_LOG). Returns up to `first + 1`
 * rows so the caller can tell whether there is a next page. Ids are UUIDv7: id order is time order.
 */
export async function listAuditLog(
  deps: Deps,
  viewer: Viewer,
  input: {
    guildId: string;
    first: number;
    afterId?: string | null;
    action?: string | null;
    actorId?: string | null;
  },
): Promise<AuditRow[]> {
  await requireGuild(deps.db, viewer.userId, input.guildId, Permission.VIEW_AUDIT_LOG, deps.now());
  const where = [eq(auditLog.guildId, input.guildId)];
  if (input.afterId) where.push(lt(auditLog.id, input.afterId));
  if (input.action) where.push(eq(auditLog.action, input.action));
  if (input.actorId) where.push(eq(auditLog.actorId, input.actorId));
  return deps.db
    .select()
    .from(auditLog)
    .where(and(...where))
    .orderBy(desc(auditLog.id))
    .limit(input.first + 1);
}
