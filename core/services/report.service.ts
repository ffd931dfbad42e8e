/**
 * Message reports: any user who can see a message may report it once while the report is open;
 * the instance admin sees every report; a guild member with MANAGE_MESSAGES in the guild sees the
 * reports of the channels where they also have VIEW_CHANNEL and MANAGE_MESSAGES (a reported text
 * must not reach someone an overwrite keeps out of its channel).
 * Reports carry a snapshot of the content so deleting the message keeps the evidence.
 */
import { and, desc, eq, inArray, isNull, lt, type SQL, sql } from 'drizzle-orm';
import { type DbOrTx, uuidArray } from '../db/client.ts';
import { messages, reports } from '../db/tables.ts';
import type { Deps, Viewer } from '../deps.ts';
import { badInput, conflict, forbidden, notFound } from '../errors.ts';
import { transact } from '../events.ts';
import { newId } from '../ids.ts';
import { has, Permission } from '../permissions.ts';
import { loadChannelAccess, loadChannelsPermissions, requireGuild } from './access.service.ts';
import { holdGuild, writeAudit } from './audit.service.ts';

export type ReportRow = typeof reports.$inferSelect;
export const REPORT_STATUSES = ['OPEN', 'RESOLVED'] as const;
export type ReportStatus = (typeof REPORT_STATUSES)[number];
export const MAX_REPORT_TEXT = 1000;

function text1000(raw: string, field: string): string {
  const s = raw.trim();
  if (s.length < 1 || s.length > MAX_REPORT_TEXT) {
    throw badInput(`${field} must be 1-${MAX_REPORT_TEXT} characters.`, field);
  }
  return s;
}

export async function reportMessage(
  deps: Deps,
  viewer: Viewer,
  input: { messageId: string; reason: string },
): Promise<ReportRow> {
  const reason = text1000(input.reason, 'reason');
  return transact(deps, async (tx) => {
    const [m] = await tx.select().from(messages).where(eq(messages.id, input.messageId));
    if (!m || m.deletedAt) throw notFound('Message');
    // Seeing a message takes VIEW_CHANNEL and READ_HISTORY; without them it does not exist.
    const a = await loadChannelAccess(tx, viewer.userId, m.channelId, deps.now());
    if (!a || !has(a.permissions, Permission.VIEW_CHANNEL | Permission.READ_HISTORY)) {
      throw notFound('Message');
    }
    if (m.authorId === viewer.userId) throw badInput('You cannot report your own message.', 'messageId');
    // Serializes two reports of one message by one reporter, so the duplicate check holds.
    await tx.execute(
      sql`select pg_advisory_xact_lock(hashtextextended(${`report:${m.id}:${viewer.userId}`}, 0))`,
    );
    const [open] = await tx
      .select({ id: reports.id })
      .from(reports)
      .where(
        and(eq(reports.messageId, m.id), eq(reports.reporterId, viewer.userId), eq(reports.status, 'OPEN')),
      );
    if (open) throw conflict('You already have an open report on this message.');
    const [r] = await tx
      .insert(reports)
      .values({
        id: newId(),
        messageId: m.id,
        channelId: m.channelId,
        guildId: m.guildId,
        reporterId: viewer.userId,
        reason,
        contentSnapshot: m.content,
        authorId: m.authorId,
      })
      .returning();
    return r;
  });
}

/** What a guild moderator needs in a report's channel to read or resolve it. */
const MODERATE_IN_CHANNEL = Permission.VIEW_CHANNEL | Permission.MANAGE_MESSAGES;

/**
 * May the viewer read (and resolve) this report? The admin always; else MANAGE_MESSAGES in its
 * guild and VIEW_CHANNEL + MANAGE_MESSAGES in its channel (a deleted channel: the admin only).
 */
async function canModerate(db: DbOrTx, deps: Deps, viewer: Viewer, r: ReportRow): Promise<boolean> {
  if (viewer.isAdmin) return true;
  if (!r.guildId) return false;
  const a = await loadChannelAccess(db, viewer.userId, r.channelId, deps.now());
  return (
    !!a?.guild?.input.isMember &&
    has(a.guild.permissions, Permission.MANAGE_MESSAGES) &&
    has(a.permissions, MODERATE_IN_CHANNEL)
  );
}

/** A report the viewer may moderate; NOT_FOUND otherwise (reports are not the reporter's to read back). */
export async function getReport(deps: Deps, viewer: Viewer, id: string): Promise<ReportRow> {
  const [r] = await deps.db.select().from(reports).where(eq(reports.id, id));
  if (!r || !(await canModerate(deps.db, deps, viewer, r))) throw notFound('Report');
  return r;
}

/**
 * One page of reports, newest first, up to `first + 1` rows. Without a guild: the instance
 * admin only (FORBIDDEN for others). With one: its MANAGE_MESSAGES holders (only the reports of
 * channels where canModerate would let them in), or the admin. A moderator's page costs four
 * statements whatever its size: guild check, reported channels, their permissions, the page.
 */
export async function listReports(
  deps: Deps,
  viewer: Viewer,
  input: { status?: ReportStatus | null; guildId?: string | null; first: number; afterId?: string | null },
): Promise<ReportRow[]> {
  if (!input.guildId && !viewer.isAdmin) {
    throw forbidden('Only the instance admin can list every report; pass a guildId.');
  }
  const where: SQL[] = [];
  if (input.guildId) where.push(eq(reports.guildId, input.guildId));
  if (input.status) where.push(eq(reports.status, input.status));
  if (input.guildId && !viewer.isAdmin) {
    await requireGuild(deps.db, viewer.userId, input.guildId, Permission.MANAGE_MESSAGES, deps.now());
    // Filtered in SQL, not after the fetch, so pages stay full and cursors stay exact.
    const reported = await deps.db
      .selectDistinct({ channelId: reports.channelId })
      .from(reports)
      .where(and(...where));
    const perms = await loadChannelsPermissions(
      deps.db,
      viewer.userId,
      reported.map((r) => r.channelId),
      deps.now(),
    );
    const allowed = reported
      .map((r) => r.channelId)
      .filter((c) => has(perms.get(c) ?? 0n, MODERATE_IN_CHANNEL));
    if (!allowed.length) return [];
    where.push(sql`${reports.channelId} = any(${uuidArray(allowed)})`);
  }
  if (input.afterId) where.push(lt(reports.id, input.afterId));
  return deps.db
    .select()
    .from(reports)
    .where(and(...where))
    .orderBy(desc(reports.id))
    .limit(input.first + 1);
}

/** Closes an open report (CONFLICT when already resolved); audited in the report's guild. */
export async function resolveReport(
  deps: Deps,
  viewer: Viewer,
  input: { id: string; resolution: string },
): Promise<ReportRow> {
  const resolution = text1000(input.resolution, 'resolution');
  return transact(deps, async (tx) => {
    const [r] = await tx.select().from(reports).where(eq(reports.id, input.id)).for('update');
    if (!r || !(await canModerate(tx, deps, viewer, r))) throw notFound('Report');
    if (r.status !== 'OPEN') throw conflict('This report is already resolved.');
    const [done] = await tx
      .update(reports)
      .set({ status: 'RESOLVED', resolvedBy: viewer.userId, resolvedAt: deps.now(), resolution })
      .where(eq(reports.id, r.id))
      .returning();
    // A report outlives its guild (the admin resolves it after): its audit row then has no guild
    // to go to. Held so a deletion meanwhile waits for this or comes first.
    if (r.guildId && (await holdGuild(tx, r.guildId))) {
      await writeAudit(tx, {
        guildId: r.guildId,
        actorId: viewer.userId,
        action: 'REPORT_RESOLVE',
        targetType: 'MESSAGE',
        targetId: r.messageId,
        reason: resolution,
        changes: { reportId: r.id, reporterId: r.reporterId, authorId: r.authorId },
      });
    }
    return done;
  });
}

/**
 * For each report, its message's id when the message still exists and the viewer can see it,
 * else null: a moderator outside the channel still has the snapshot, and Message's loader would
 * refuse them. One statement for the messages plus one access check per distinct channel.
 */
export async function visibleMessageIds(
  deps: Deps,
  viewer: Viewer,
  items: readonly { messageId: string; channelId: string }[],
): Promise<(string | null)[]> {
  const ids = [...new Set(items.map((i) => i.messageId))];
  const live = new Set(
    (
      await deps.db
        .select({ id: messages.id })
        .from(messages)
        .where(and(inArray(messages.id, ids), isNull(messages.deletedAt)))
    ).map((m) => m.id),
  );
  const channelIds = [...new Set(items.filter((i) => live.has(i.messageId)).map((i) => i.channelId))];
  const need = Permission.VIEW_CHANNEL | Permission.READ_HISTORY;
  const seen = new Map<string, boolean>();
  await Promise.all(
    channelIds.map(async (c) => {
      const a = await loadChannelAccess(deps.db, viewer.userId, c, deps.now());
      seen.set(c, !!a && has(a.permissions, need));
    }),
  );
  return items.map((i) => (live.has(i.messageId) && seen.get(i.channelId) ? i.messageId : null));
}
