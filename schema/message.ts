/**
 * The Message type, its small satellite types (Embed, Attachment, MessageEdit), history
 * (Channel.messages, message(id)) and the message and thread mutations. Other files extend
 * Message with builder.objectField(MessageRef, ...) (reactions, pins).
 *
 * Every field that reaches beyond the message row is batched (loadable refs and fields), so a
 * page of 50 messages costs the same fixed number of statements as a page of 10.
 */
import { z } from 'zod';
import { BanterError, notFound } from '../core/errors.ts';
import { isUuid } from '../core/ids.ts';
import { has, Permission } from '../core/permissions.ts';
import {
  type ChannelAccess,
  loadChannelAccess,
  loadChannelsPermissions,
  requireChannel,
} from '../core/services/access.service.ts';
import {
  MAX_ATTACHMENTS,
  MAX_NONCE,
  type MessageRow,
  NONCE_WINDOW_MS,
} from '../core/services/message.service.ts';
import * as edits from '../core/services/message-edit.service.ts';
import * as history from '../core/services/message-history.service.ts';
import { sendMessage } from '../core/services/message-send.service.ts';
import { startThread } from '../core/services/thread.service.ts';
import { builder, type Context, decodeId, encodeId, nodeId, requireViewer } from './builder.ts';
import { ChannelRef } from './channel.ts';
import { limit } from './limits.ts';
import { UserRef } from './user.ts';

export type { MessageRow };

/**
 * The viewer's access to a channel, memoized per request. Entries expire after a second so a
 * long-lived context (a subscription) never acts on stale permissions.
 */
const accessCache = new WeakMap<object, Map<string, { at: number; p: Promise<ChannelAccess | null> }>>();
const ACCESS_TTL_MS = 1000;

function viewerAccess(ctx: Context, channelId: string, known?: ChannelAccess): Promise<ChannelAccess | null> {
  let m = accessCache.get(ctx);
  if (!m) {
    m = new Map();
    accessCache.set(ctx, m);
  }
  const hit = m.get(channelId);
  const t = Date.now();
  if (!known && hit && t - hit.at < ACCESS_TTL_MS) return hit.p;
  const p =
    known !== undefined
      ? Promise.resolve(known)
      : ctx.viewer
        ? loadChannelAccess(ctx.deps.db, ctx.viewer.userId, channelId, ctx.deps.now())
        : Promise.resolve(null);
  m.set(channelId, { at: t, p });
  return p;
}

/**
 * Loads by id for whoever asks (node(id), replyTo, forwardedFrom, a thread's sourceMessage):
 * deleted messages and messages in channels whose history the viewer may not read (VIEW_CHANNEL
 * and READ_HISTORY, as message(id) needs) are NOT_FOUND. One statement for the rows, plus one access
 * check per distinct channel not already checked in this request. Not cached across the
 * request (cache: false) so a long-lived context never serves an edited message's old text.
 */
const READABLE = Permission.VIEW_CHANNEL | Permission.READ_HISTORY;
export const MessageRef = builder.loadableNodeRef<MessageRow, string, string>('Message', {
  id: nodeId('Message', (m) => m.id),
  loaderOptions: { cache: false },
  load: async (ids, ctx) => {
    const rows = await history.messagesByIds(ctx.deps.db, ids);
    const channelIds = [...new Set(rows.map((r) => r.channelId))];
    const access = await Promise.all(channelIds.map((c) => viewerAccess(ctx, c)));
    const visible = new Set(channelIds.filter((_, i) => has(access[i]?.permissions ?? 0n, READABLE)));
    const byId = new Map(rows.filter((r) => visible.has(r.channelId)).map((r) => [r.id, r]));
    return ids.map((id) => byId.get(id) ?? notFound('Message'));
  },
});

/** A message the viewer can see, or null (replyTo and forwardedFrom point at messages that may be gone). */
async function loadOrNull(ctx: Context, id: string | null): Promise<MessageRow | null> {
  if (!id) return null;
  try {
    return await MessageRef.getDataloader(ctx).load(id);
  } catch (err) {
    if (err instanceof BanterError && err.code === 'NOT_FOUND') return null;
    throw err;
  }
}

interface EmbedShape {
  type?: string;
  title?: string;
  description?: string;
  url?: string;
  color?: number;
  siteName?: string;
  imageUrl?: string;
  thumbnailUrl?: string;
}

const str = (v: unknown) => (typeof v === 'string' ? v : null);

const EmbedRef = builder.objectRef<EmbedShape>('Embed');
EmbedRef.implement({
  description: 'A link preview or rich card, filled in by the embed worker',
  fields: (t) => ({
    type: t.string({ nullable: true, resolve: (e) => str(e.type) }),
    title: t.string({ nullable: true, resolve: (e) => str(e.title) }),
    description: t.string({ nullable: true, resolve: (e) => str(e.description) }),
    url: t.string({ nullable: true, resolve: (e) => str(e.url) }),
    color: t.int({
      nullable: true,
      resolve: (e) => (Number.isInteger(e.color) ? (e.color as number) : null),
    }),
    siteName: t.string({ nullable: true, resolve: (e) => str(e.siteName) }),
    imageUrl: t.string({ nullable: true, resolve: (e) => str(e.imageUrl) }),
    thumbnailUrl: t.string({ nullable: true, resolve: (e) => str(e.thumbnailUrl) }),
  }),
});

export const AttachmentRef = builder.objectRef<history.AttachmentRow>('Attachment');
AttachmentRef.implement({
  description: 'A file sent with a message',
  fields: (t) => ({
    id: t.id({ resolve: (a) => encodeId('Attachment', a.id) }),
    filename: t.exposeString('filename'),
    contentType: t.exposeString('contentType'),
    size: t.exposeInt('size'),
    width: t.exposeInt('width', { nullable: true }),
    height: t.exposeInt('height', { nullable: true }),
  }),
});

const MessageEditRef = builder.objectRef<history.MessageEditRow>('MessageEdit');
MessageEditRef.implement({
  description: 'An earlier version of a message and when it was replaced',
  fields: (t) => ({
    content: t.exposeString('content'),
    editedAt: t.expose('editedAt', { type: 'DateTime' }),
  }),
});

MessageRef.implement({
  fields: (t) => ({
    channel: t.field({ type: ChannelRef, resolve: (m) => m.channelId }),
    author: t.field({ type: UserRef, resolve: (m) => history.loadedAuthors.get(m) ?? m.authorId }),
    content: t.exposeString('content'),
    createdAt: t.expose('createdAt', { type: 'DateTime' }),
    editedAt: t.expose('editedAt', { type: 'DateTime', nullable: true }),
    replyTo: t.field({
      type: MessageRef,
      nullable: true,
      description: 'null when the replied-to message was deleted',
      resolve: (m, _a, ctx) => loadOrNull(ctx, m.replyToId),
    }),
    forwardedFrom: t.field({
      type: MessageRef,
      nullable: true,
      description: 'null when the original was deleted or is in a channel the viewer cannot see',
      resolve: (m, _a, ctx) => loadOrNull(ctx, m.forwardedFromId),
    }),
    mentions: t.loadableList({
      type: UserRef,
      description: 'Users mentioned with @username',
      load: async (ids: string[], ctx) => {
        const rows = await history.mentionedUsers(ctx.deps.db, ids);
        return ids.map((id) => rows.filter((r) => r.messageId === id).map((r) => r.user));
      },
      resolve: (m) => m.id,
    }),
    mentionEveryone: t.exposeBoolean('mentionEveryone', {
      description: '@everyone or @here by someone allowed to (MENTION_EVERYONE)',
    }),
    mentionRoleIds: t.idList({
      description: 'Role ids mentioned with @rolename',
      resolve: (m) => m.mentionRoleIds.map((id) => encodeId('Role', id)),
    }),
    attachments: t.loadableGroup({
      type: AttachmentRef,
      load: (ids: string[], ctx) => history.attachmentsOf(ctx.deps.db, ids),
      group: (a) => a.messageId ?? '',
      resolve: (m) => m.id,
    }),
    embeds: t.field({
      type: [EmbedRef],
      resolve: (m) =>
        Array.isArray(m.embeds)
          ? (m.embeds as unknown[]).filter((e): e is EmbedShape => !!e && typeof e === 'object')
          : [],
    }),
    nonce: t.string({
      nullable: true,
      description: "The sender's nonce; only the author sees it",
      resolve: (m, _a, ctx) => (ctx.viewer?.userId === m.authorId ? m.nonce : null),
    }),
    editHistory: t.loadableGroup({
      type: MessageEditRef,
      description: 'Earlier versions, oldest first',
      load: (ids: string[], ctx) => history.editsOf(ctx.deps.db, ids),
      group: (e) => e.messageId,
      resolve: (m) => m.id,
    }),
    thread: t.loadable({
      type: ChannelRef,
      nullable: true,
      description: 'The thread started from this message, if any; null when none or hidden from the viewer',
      // A thread can carry its own overwrites, so seeing the message does not mean seeing its thread.
      load: async (ids: string[], ctx) => {
        const rows = await history.threadsOf(ctx.deps.db, ids);
        const perms = ctx.viewer
          ? await loadChannelsPermissions(
              ctx.deps.db,
              ctx.viewer.userId,
              rows.map((r) => r.id),
              ctx.deps.now(),
            )
          : new Map<string, bigint>();
        return ids.map((id) => {
          const t = rows.find((r) => r.sourceMessageId === id);
          return t && (perms.get(t.id) ?? 0n) !== 0n ? t : null;
        });
      },
      resolve: (m) => m.id,
    }),
  }),
});

export const MessageConnection = builder.connectionObject(
  { type: MessageRef, name: 'MessageConnection' },
  { name: 'MessageEdge' },
);

const CURSOR_PREFIX = 'msg:';
export const messageCursor = (id: string) => Buffer.from(CURSOR_PREFIX + id).toString('base64url');

function decodeCursor(cursor: string | null | undefined, field: string): string | null {
  if (cursor === null || cursor === undefined) return null;
  const raw = cursor.length <= 100 ? Buffer.from(cursor, 'base64url').toString() : '';
  const id = raw.slice(CURSOR_PREFIX.length);
  if (!raw.startsWith(CURSOR_PREFIX) || !isUuid(id))
    throw new BanterError('BAD_USER_INPUT', `${field} is not a valid cursor.`, { extra: { field } });
  return id;
}

/** Turns a page into a Relay connection (shared with search, which returns MessageConnection too). */
export function toConnection(page: history.MessagePage) {
  const edges = page.rows.map((node) => ({ cursor: messageCursor(node.id), node }));
  return {
    edges,
    pageInfo: {
      hasPreviousPage: page.hasPreviousPage,
      hasNextPage: page.hasNextPage,
      startCursor: edges[0]?.cursor ?? null,
      endCursor: edges.at(-1)?.cursor ?? null,
    },
  };
}

builder.objectField(ChannelRef, 'messages', (t) =>
  t.connection(
    {
      type: MessageRef,
      description: `Oldest first within a page. first/after pages forward, last/before backward, around centers on a message (size from first or last). Default ${history.DEFAULT_PAGE} newest; at most ${history.MAX_PAGE} (BAD_USER_INPUT above). Needs READ_HISTORY.`,
      args: { around: t.arg.id() },
      resolve: async (c, args, ctx) => {
        const v = requireViewer(ctx);
        const access = await requireChannel(ctx.deps.db, v.userId, c.id, 0n, ctx.deps.now());
        // Later loads in this request (replyTo, ...) reuse this check.
        void viewerAccess(ctx, c.id, access);
        const page = await history.listMessages(ctx.deps, access, {
          first: args.first,
          last: args.last,
          after: decodeCursor(args.after, 'after'),
          before: decodeCursor(args.before, 'before'),
          around: args.around ? decodeId(args.around, 'Message', 'around') : null,
        });
        return toConnection(page);
      },
    },
    MessageConnection,
  ),
);

builder.queryField('message', (t) =>
  t.field({
    type: MessageRef,
    // Nullable as CONTRACT.md has it, though a missing or hidden message answers NOT_FOUND.
    nullable: true,
    args: { id: t.arg.id({ required: true }) },
    resolve: (_r, { id }, ctx) => history.getMessage(ctx.deps, requireViewer(ctx), decodeId(id, 'Message')),
  }),
);

const SendMessageInput = builder.inputType('SendMessageInput', {
  fields: (t) => ({
    channelId: t.id({ required: true }),
    content: t.string({ description: '1-4000 characters after trimming; may be empty when forwarding' }),
    replyToId: t.id({ description: 'a message in the same channel' }),
    forwardedFromId: t.id({ description: 'a message in any channel the sender can read' }),
    attachmentIds: t.idList({
      description: `the sender's own uploads, not yet sent; at most ${MAX_ATTACHMENTS} (BAD_USER_INPUT above)`,
    }),
    // The wipe of a deleted message frees its nonce (core/services/message.service.ts: wipeMessages),
    // so that no retry returns a deleted message (NOT_FOUND for everyone): said here, where a client
    // reading "returns the first message" would not expect a second one to appear.
    nonce: t.string({
      description: `Makes a send safe to retry (${MAX_NONCE} characters at most): a send with a nonce you used in the last ${NONCE_WINDOW_MS / 60_000} minutes, in the same channel, returns the message that one sent instead of sending again (in another channel it is CONFLICT). A deleted message gives up its nonce: a retry after the first message was deleted sends a new message.`,
    }),
  }),
});

const EditMessageInput = builder.inputType('EditMessageInput', {
  fields: (t) => ({
    id: t.id({ required: true }),
    content: t.string({ required: true }),
  }),
});

/** Input strings are bounded before any work: the service applies the exact rules. */
const bounded = (s: string | null | undefined, max: number, field: string) => {
  if (s && s.length > max)
    throw new BanterError('BAD_USER_INPUT', `${field} is too long.`, { extra: { field } });
  return s;
};

/** A list argument's length is checked before any element is decoded (a body can hold 100k ids). */
function boundedList<T>(list: readonly T[] | null | undefined, max: number, field: string): readonly T[] {
  if (list && list.length > max)
    throw new BanterError('BAD_USER_INPUT', `At most ${max} ${field}.`, { extra: { field } });
  return list ?? [];
}

export async function sendMessageFromInput(
  ctx: Context,
  input: typeof SendMessageInput.$inferInput,
): Promise<MessageRow> {
  const v = requireViewer(ctx);
  return sendMessage(ctx.deps, v, {
    channelId: decodeId(input.channelId, 'Channel', 'channelId'),
    content: bounded(input.content, 20_000, 'content'),
    replyToId: input.replyToId ? decodeId(input.replyToId, 'Message', 'replyToId') : null,
    forwardedFromId: input.forwardedFromId
      ? decodeId(input.forwardedFromId, 'Message', 'forwardedFromId')
      : null,
    attachmentIds: boundedList(input.attachmentIds, MAX_ATTACHMENTS, 'attachmentIds').map((id) =>
      decodeId(id, 'Attachment', 'attachmentIds'),
    ),
    nonce: bounded(input.nonce, 200, 'nonce'),
  });
}

builder.mutationFields((t) => ({
  sendMessage: t.field({
    type: MessageRef,
    description:
      'Needs SEND_MESSAGES (and MANAGE_MESSAGES in ANNOUNCEMENT channels); slow mode answers RATE_LIMITED with retryAfter.',
    args: { input: t.arg({ type: SendMessageInput, required: true }) },
    resolve: async (_r, { input }, ctx) => {
      requireViewer(ctx);
      await limit(ctx, 'sendMessage');
      return sendMessageFromInput(ctx, input);
    },
  }),
  editMessage: t.field({
    type: MessageRef,
    description: 'Author only; the previous version goes to editHistory.',
    args: { input: t.arg({ type: EditMessageInput, required: true }) },
    resolve: async (_r, { input }, ctx) => {
      const v = requireViewer(ctx);
      await limit(ctx, 'mutation');
      return edits.editMessage(ctx.deps, v, {
        id: decodeId(input.id, 'Message'),
        content: bounded(input.content, 20_000, 'content') ?? '',
      });
    },
  }),
  deleteMessage: t.id({
    description: 'Author or MANAGE_MESSAGES; the message is NOT_FOUND for everyone afterwards.',
    args: { id: t.arg.id({ required: true }) },
    resolve: async (_r, { id }, ctx) => {
      const v = requireViewer(ctx);
      await limit(ctx, 'mutation');
      return encodeId('Message', await edits.deleteMessage(ctx.deps, v, decodeId(id, 'Message')));
    },
  }),
  startThread: t.field({
    type: ChannelRef,
    description:
      "Creates a THREAD under the message's channel (one per message: CONFLICT); needs CREATE_THREADS.",
    args: {
      messageId: t.arg.id({ required: true }),
      name: t.arg.string({ required: true, validate: z.string().max(1000) }),
    },
    resolve: async (_r, { messageId, name }, ctx) => {
      const v = requireViewer(ctx);
      await limit(ctx, 'mutation');
      return startThread(ctx.deps, v, { messageId: decodeId(messageId, 'Message', 'messageId'), name });
    },
  }),
}));

builder.objectField(ChannelRef, 'sourceMessage', (t) =>
  t.field({
    type: MessageRef,
    nullable: true,
    description: 'For a thread: the message it was started from (null once deleted)',
    resolve: (c, _a, ctx) => loadOrNull(ctx, c.sourceMessageId),
  }),
);
