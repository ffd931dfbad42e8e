/**
 * Reading messages: one message by id, a channel's history as pages, and the batch loads the
 * schema's dataloaders call (one statement per batch, whatever the page size).
 */
import { and, asc, desc, eq, gt, gte, inArray, isNull, lt } from 'drizzle-orm';
import type { DbOrTx } from '../db/client.ts';
import { attachments, channels, messageEdits, messageMentions, messages, users } from '../db/tables.ts';
import type { Deps, Viewer } from '../deps.ts';
import { badInput, forbidden, notFound } from '../errors.ts';
import { has, Permission } from '../permissions.ts';
import { type ChannelAccess, loadChannelAccess } from './access.service.ts';
import type { MessageRow } from './message.service.ts';

export const DEFAULT_PAGE = 50;
export const MAX_PAGE = 100;

/**
 * A message the viewer can see with its channel access: NOT_FOUND when it does not exist, is
 * deleted or its channel is hidden; FORBIDDEN when visible but `need` is missing.
 */
export async function loadVisibleMessage(
  deps: Deps,
  viewer: Viewer,
  id: string,
  need = Permission.VIEW_CHANNEL,
): Promise<{ row: MessageRow; access: ChannelAccess }> {
  const [row] = await deps.db
    .select()
    .from(messages)
    .where(and(eq(messages.id, id), isNull(messages.deletedAt)));
  if (!row) throw notFound('Message');
  const access = await loadChannelAccess(deps.db, viewer.userId, row.channelId, deps.now());
  if (!access || access.permissions === 0n) throw notFound('Message');
  if (!has(access.permissions, need)) throw forbidden();
  return { row, access };
}

/** message(id): reading an older message needs READ_HISTORY. */
export async function getMessage(deps: Deps, viewer: Viewer, id: string): Promise<MessageRow> {
  const need = Permission.VIEW_CHANNEL | Permission.READ_HISTORY;
  return (await loadVisibleMessage(deps, viewer, id, need)).row;
}

export interface HistoryArgs {
  first?: number | null;
  after?: string | null;
  last?: number | null;
  before?: string | null;
  /** a message id: the page is centered on it */
  around?: string | null;
}

export interface MessagePage {
  /** oldest first */
  rows: MessageRow[];
  hasPreviousPage: boolean;
  hasNextPage: boolean;
}

function pageSize(n: number | null | undefined, field: string): number {
  if (n === null || n === undefined) return DEFAULT_PAGE;
  if (!Number.isInteger(n) || n < 0 || n > MAX_PAGE)
    throw badInput(`${field} must be between 0 and ${MAX_PAGE}.`, field);
  return n;
}

/**
 * A page of a channel's history, oldest first. `first`/`after` read forward from the oldest (or
 * the cursor); `last`/`before` read backward from the newest (or the cursor); `around` centers on
 * a message. With no arguments the page is the newest 50. Page sizes above 100 are refused
 * (BAD_USER_INPUT), not clamped, so a client never silently gets less than it asked for.
 * As Relay allows, the side a page was not paged toward reports false (forward pages do not
 * look back), except `around`, which reports both sides.
 */
export async function listMessages(
  deps: Deps,
  access: ChannelAccess,
  args: HistoryArgs,
): Promise<MessagePage> {
  if (!has(access.permissions, Permission.VIEW_CHANNEL | Permission.READ_HISTORY))
    throw forbidden('You cannot read the history of this channel.');
  const forward = args.first != null || args.after != null;
  const backward = args.last != null || args.before != null;
  const cursored = args.after != null || args.before != null;
  if ((forward && backward) || (args.around && cursored))
    throw badInput('Use first/after, last/before or around (with first or last as the size), not several.');
  const db = deps.db;
  const inChannel = and(eq(messages.channelId, access.channel.id), isNull(messages.deletedAt));
  if (args.around) {
    return around(db, inChannel, args.around, pageSize(args.first ?? args.last, 'first'));
  }
  if (forward) {
    const n = pageSize(args.first, 'first');
    if (n === 0) return { rows: [], hasPreviousPage: false, hasNextPage: false };
    const rows = await db
      .select()
      .from(messages)
      .where(and(inChannel, args.after ? gt(messages.id, args.after) : undefined))
      .orderBy(asc(messages.id))
      .limit(n + 1);
    return { rows: rows.slice(0, n), hasPreviousPage: false, hasNextPage: rows.length > n };
  }
  const n = pageSize(args.last, 'last');
  if (n === 0) return { rows: [], hasPreviousPage: false, hasNextPage: false };
  const rows = await db
    .select()
    .from(messages)
    .where(and(inChannel, args.before ? lt(messages.id, args.before) : undefined))
    .orderBy(desc(messages.id))
    .limit(n + 1);
  return { rows: rows.slice(0, n).reverse(), hasPreviousPage: rows.length > n, hasNextPage: false };
}

/** Half the page before the pivot, the pivot (when it is still there) and what follows. */
async function around(
  db: DbOrTx,
  inChannel: ReturnType<typeof and>,
  pivot: string,
  n: number,
): Promise<MessagePage> {
  if (n === 0) return { rows: [], hasPreviousPage: false, hasNextPage: false };
  const older = Math.floor(n / 2);
  const newer = n - older;
  const [before, from] = await Promise.all([
    older
      ? db
          .select()
          .from(messages)
          .where(and(inChannel, lt(messages.id, pivot)))
          .orderBy(desc(messages.id))
          .limit(older + 1)
      : Promise.resolve([] as MessageRow[]),
    db
      .select()
      .from(messages)
      .where(and(inChannel, gte(messages.id, pivot)))
      .orderBy(asc(messages.id))
      .limit(newer + 1),
  ]);
  return {
    rows: [...before.slice(0, older).reverse(), ...from.slice(0, newer)],
    hasPreviousPage: before.length > older,
    hasNextPage: from.length > newer,
  };
}

// Batch loads for the schema's dataloaders: one statement each, keyed by the ids asked for.

/** Messages by id, deleted ones left out. */
export async function messagesByIds(db: DbOrTx, ids: readonly string[]): Promise<MessageRow[]> {
  if (!ids.length) return [];
  return db
    .select()
    .from(messages)
    .where(and(inArray(messages.id, [...ids]), isNull(messages.deletedAt)));
}

export type UserRow = typeof users.$inferSelect;

/**
 * Authors read along with their messages (the event tailer reads both in one statement), so
 * rendering `Message.author` for an event needs no statement of its own. Keyed by the row object.
 */
export const loadedAuthors = new WeakMap<MessageRow, UserRow>();

export async function mentionedUsers(
  db: DbOrTx,
  messageIds: readonly string[],
): Promise<{ messageId: string; user: UserRow }[]> {
  if (!messageIds.length) return [];
  return db
    .select({ messageId: messageMentions.messageId, user: users })
    .from(messageMentions)
    .innerJoin(users, eq(users.id, messageMentions.userId))
    .where(inArray(messageMentions.messageId, [...messageIds]))
    .orderBy(asc(users.username));
}

export type MessageEditRow = typeof messageEdits.$inferSelect;

export async function editsOf(db: DbOrTx, messageIds: readonly string[]): Promise<MessageEditRow[]> {
  if (!messageIds.length) return [];
  return db
    .select()
    .from(messageEdits)
    .where(inArray(messageEdits.messageId, [...messageIds]))
    .orderBy(asc(messageEdits.id));
}

export type AttachmentRow = typeof attachments.$inferSelect;

export async function attachmentsOf(db: DbOrTx, messageIds: readonly string[]): Promise<AttachmentRow[]> {
  if (!messageIds.length) return [];
  return db
    .select()
    .from(attachments)
    .where(inArray(attachments.messageId, [...messageIds]))
    .orderBy(asc(attachments.id));
}

export type ChannelRow = typeof channels.$inferSelect;

/** Threads started from these messages. */
export async function threadsOf(db: DbOrTx, messageIds: readonly string[]): Promise<ChannelRow[]> {
  if (!messageIds.length) return [];
  return db
    .select()
    .from(channels)
    .where(and(inArray(channels.sourceMessageId, [...messageIds]), eq(channels.type, 'THREAD')));
}

/** The newest message of a channel, read from the messages_channel index (no per-channel row). */
export async function lastMessageId(db: DbOrTx, channelId: string): Promise<string | null> {
  const [r] = await db
    .select({ id: messages.id })
    .from(messages)
    .where(and(eq(messages.channelId, channelId), isNull(messages.deletedAt)))
    .orderBy(desc(messages.id))
    .limit(1);
  return r?.id ?? null;
}
