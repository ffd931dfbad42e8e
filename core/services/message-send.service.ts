/**
 * sendMessage: the hottest path. In the common case it costs one statement for permissions and
 * one transaction (insert message, insert event). A "preflight" statement runs only when the
 * input needs lookups (reply, forward, mentions, slow mode), and mentions/attachments add one
 * statement each only when present. Nothing per-channel is updated on send (no row lock):
 * a channel's last message is read from the messages_channel index.
 */
import { and, eq, inArray, isNull, sql } from 'drizzle-orm';
import { type Tx, violatesForeignKey } from '../db/client.ts';
import { attachments, messageMentions, messages } from '../db/tables.ts';
import type { Deps, Viewer } from '../deps.ts';
import { badInput, conflict, forbidden, notFound, rateLimited } from '../errors.ts';
import { announce, transact } from '../events.ts';
import { newId } from '../ids.ts';
import { has, Permission } from '../permissions.ts';
import { sentInChannel } from '../realtime/typing.ts';
import { type ChannelAccess, loadChannelAccess, requireChannel } from './access.service.ts';
import { assertCanSendInDm } from './direct.service.ts';
import { mentionLookupSql, NO_MENTIONS, parseMentions, resolveMentions } from './mentions.ts';
import {
  MAX_ATTACHMENTS,
  MAX_NONCE,
  MESSAGE_CHANNEL_TYPES,
  type MessageRow,
  NONCE_WINDOW_MS,
  validateContent,
} from './message.service.ts';
import { insertGrouped } from './message-batch.ts';

export interface SendMessageInput {
  channelId: string;
  content?: string | null;
  replyToId?: string | null;
  forwardedFromId?: string | null;
  attachmentIds?: readonly string[] | null;
  nonce?: string | null;
}

interface Preflight {
  reply?: { c: string; d: boolean } | null;
  fwd?: { c: string; d: boolean } | null;
  last_own?: string | null;
  nonce_msg?: string | null;
  mention_users?: string[] | null;
  mention_roles?: { id: string; m: boolean }[] | null;
}

/**
 * Who may post where. ANNOUNCEMENT channels are for staff: posting there needs MANAGE_MESSAGES
 * in the channel on top of SEND_MESSAGES (grant it to a writers role with a channel overwrite).
 */
function requiredToSend(type: string): bigint {
  const base = Permission.VIEW_CHANNEL | Permission.SEND_MESSAGES;
  return type === 'ANNOUNCEMENT' ? base | Permission.MANAGE_MESSAGES : base;
}

export async function sendMessage(deps: Deps, viewer: Viewer, input: SendMessageInput): Promise<MessageRow> {
  const forwarding = !!input.forwardedFromId;
  const content = validateContent(input.content ?? '', forwarding);
  const nonce = input.nonce ?? null;
  if (nonce !== null && (nonce.length === 0 || nonce.length > MAX_NONCE))
    throw badInput(`nonce must be 1-${MAX_NONCE} characters.`, 'nonce');
  const attachmentIds = [...new Set(input.attachmentIds ?? [])];
  if (attachmentIds.length > MAX_ATTACHMENTS)
    throw badInput(`At most ${MAX_ATTACHMENTS} attachments per message.`, 'attachmentIds');
  if (!content && !forwarding) throw badInput('Message content cannot be empty.', 'content');

  const now = deps.now();
  // Cached inputs (at most ACCESS_CACHE_MS old, never older than this process's own changes): the
  // check is the send's only read, and a send is not a change anyone else depends on in order.
  const access = await requireChannel(deps.db, viewer.userId, input.channelId, 0n, now, { cached: true });
  const channel = access.channel;
  if (!MESSAGE_CHANNEL_TYPES.includes(channel.type))
    throw badInput(`Messages cannot be sent in a ${channel.type} channel.`, 'channelId');
  if (!has(access.permissions, requiredToSend(channel.type)))
    throw forbidden('You cannot send messages here.');
  if (attachmentIds.length && !has(access.permissions, Permission.ATTACH_FILES))
    throw forbidden('You cannot attach files here.');
  // 1:1 DMs honour blocks; the DM service owns that rule (one extra statement, DMs only).
  if (channel.type === 'DM') await assertCanSendInDm(deps.db, viewer.userId, channel);

  const slowmode =
    channel.slowmodeSeconds > 0 &&
    !has(access.permissions, Permission.MANAGE_MESSAGES) &&
    !has(access.permissions, Permission.MANAGE_CHANNELS)
      ? channel.slowmodeSeconds
      : 0;
  const parsed = parseMentions(content);
  const pre = await preflight(deps, viewer.userId, access, input, slowmode, nonce, parsed.names);

  if (input.replyToId && (!pre.reply || pre.reply.d || pre.reply.c !== channel.id))
    throw notFound('Replied-to message');
  if (input.forwardedFromId) {
    if (!pre.fwd || pre.fwd.d) throw notFound('Forwarded message');
    const src =
      pre.fwd.c === channel.id ? access : await loadChannelAccess(deps.db, viewer.userId, pre.fwd.c, now);
    if (!src || !has(src.permissions, Permission.VIEW_CHANNEL | Permission.READ_HISTORY))
      throw notFound('Forwarded message');
  }
  if (slowmode) checkSlowMode(pre, slowmode, now);
  const mentions = content.includes('@') ? resolveMentions(parsed, access.permissions, pre) : NO_MENTIONS;

  const id = newId();
  /** A message sent ends its author's typing in the channel (sentInChannel). */
  const sent = (row: MessageRow) => {
    sentInChannel(deps, viewer.userId, channel.id);
    return row;
  };
  const values = {
    id,
    channelId: channel.id,
    guildId: channel.guildId,
    authorId: viewer.userId,
    content,
    createdAt: now,
    replyToId: input.replyToId ?? null,
    forwardedFromId: input.forwardedFromId ?? null,
    nonce,
    mentionEveryone: mentions.everyone,
    mentionRoleIds: mentions.roleIds,
  };
  try {
    if (!attachmentIds.length && !slowmode) {
      // The common case: message, mentions and event in one statement. No row back means the nonce
      // index conflicted: the transactional path below tells a retry from a stale nonce.
      const row = await insertAtomically(deps, values, mentions.userIds);
      if (row) return sent(row);
    }
    const created = await transact(deps, async (tx, log) => {
      // The preflight check above ran without a lock: two concurrent sends could both pass it.
      // Under slow mode the author's sends to this channel take turns and check again.
      if (slowmode) await slowModeTurn(tx, deps, viewer.userId, channel.id, slowmode, nonce, now);
      let row = await insert(tx, values);
      if (!row) {
        const dup = await nonceDuplicate(tx, viewer.userId, nonce, channel.id, now);
        if (dup) return dup;
        row = await insert(tx, values);
        if (!row) throw new Error('message insert conflicted twice');
      }
      if (mentions.userIds.length) {
        await tx
          .insert(messageMentions)
          .values(mentions.userIds.map((userId) => ({ messageId: id, userId, channelId: channel.id })));
      }
      if (attachmentIds.length) {
        const linked = await tx
          .update(attachments)
          .set({ messageId: id })
          .where(
            and(
              inArray(attachments.id, attachmentIds),
              eq(attachments.uploaderId, viewer.userId),
              isNull(attachments.messageId),
            ),
          )
          .returning({ id: attachments.id });
        if (linked.length !== attachmentIds.length)
          throw badInput('attachmentIds must be your own uploads not yet sent.', 'attachmentIds');
      }
      await log.append({
        type: 'MESSAGE_CREATED',
        guildId: channel.guildId,
        channelId: channel.id,
        payload: { messageId: id },
      });
      return row;
    });
    return sent(created);
  } catch (err) {
    // The access check took no lock (and may have used another instance's cached inputs): the
    // channel can be deleted before the insert, whose foreign key then refuses it. The sender is
    // told what a send a moment later is told.
    if (channelGone(err)) throw notFound('Channel');
    throw err;
  }
}

/** The message's channel was deleted under the insert (its foreign key; drizzle wraps pg's error). */
function channelGone(err: unknown): boolean {
  return violatesForeignKey(err, 'messages_channel_id_channels_id_fk');
}

/**
 * One statement (shared with concurrent sends, core/services/message-batch.ts): data-modifying
 * CTEs insert the message, its mentions and its MESSAGE_CREATED event together (a single
 * statement is its own transaction), so a send costs at most two round trips in all.
 */
async function insertAtomically(
  deps: Deps,
  v: typeof messages.$inferInsert,
  mentionUserIds: string[],
): Promise<MessageRow | undefined> {
  const r = await insertGrouped(deps.database, {
    id: v.id,
    channelId: v.channelId,
    guildId: v.guildId ?? null,
    authorId: v.authorId,
    content: v.content,
    createdAt: v.createdAt ?? deps.now(),
    replyToId: v.replyToId ?? null,
    forwardedFromId: v.forwardedFromId ?? null,
    nonce: v.nonce ?? null,
    mentionEveryone: v.mentionEveryone ?? false,
    mentionRoleIds: v.mentionRoleIds ?? [],
    mentionUserIds,
  });
  if (!r) return undefined;
  const row = r.message;
  await announce(deps, [
    {
      seq: r.seq,
      type: 'MESSAGE_CREATED',
      guildId: row.guildId,
      channelId: row.channelId,
      userId: null,
    },
  ]);
  return row;
}

async function insert(tx: Tx, values: typeof messages.$inferInsert): Promise<MessageRow | undefined> {
  // ON CONFLICT covers only the nonce index in practice (ids are fresh): a racing retry waits for
  // the first insert to commit, then lands here with no row.
  const [row] = await tx.insert(messages).values(values).onConflictDoNothing().returning();
  return row;
}

/**
 * The message an earlier send with this nonce made, when it is a retry (same channel, inside the
 * window). A nonce older than the window is released (set to null on the old message) so the
 * caller's second insert succeeds: the unique index then only ever holds live nonces.
 */
async function nonceDuplicate(
  tx: Tx,
  authorId: string,
  nonce: string | null,
  channelId: string,
  now: Date,
): Promise<MessageRow | undefined> {
  if (nonce === null) throw new Error('message insert conflicted without a nonce');
  const [old] = await tx
    .select()
    .from(messages)
    .where(and(eq(messages.authorId, authorId), eq(messages.nonce, nonce)));
  if (!old) return undefined;
  if (now.getTime() - old.createdAt.getTime() < NONCE_WINDOW_MS) {
    if (old.channelId !== channelId) throw conflict('This nonce was already used in another channel.');
    return old;
  }
  await tx.update(messages).set({ nonce: null }).where(eq(messages.id, old.id));
  return undefined;
}

/** The author's last message in the channel, and the message carrying this nonce if any. */
function slowModeItems(deps: Deps, userId: string, channelId: string, nonce: string | null) {
  const items = [
    sql`(select created_at from messages where author_id = ${userId}::uuid
      and channel_id = ${channelId}::uuid order by id desc limit 1) as last_own`,
  ];
  if (nonce !== null) {
    const since = new Date(deps.now().getTime() - NONCE_WINDOW_MS);
    items.push(sql`(select id from messages where author_id = ${userId}::uuid and nonce = ${nonce}
      and channel_id = ${channelId}::uuid and created_at > ${since}) as nonce_msg`);
  }
  return items;
}

/** Throws RATE_LIMITED while the author's last message here is younger than `slowmode` seconds. */
function checkSlowMode(pre: Preflight, slowmode: number, now: Date) {
  if (!pre.last_own) return;
  // A retry of the message that started the wait is not a new message: let the nonce path answer it.
  const wait = new Date(pre.last_own).getTime() + slowmode * 1000 - now.getTime();
  if (wait > 0 && !pre.nonce_msg)
    throw rateLimited(Math.ceil(wait / 1000), `Slow mode: wait ${Math.ceil(wait / 1000)} s.`);
}

/**
 * Inside the send's transaction: waits for the author's other sends to this channel (a
 * transaction-scoped advisory lock on the pair), then checks slow mode again against what they
 * committed.
 */
async function slowModeTurn(
  tx: Tx,
  deps: Deps,
  userId: string,
  channelId: string,
  slowmode: number,
  nonce: string | null,
  now: Date,
) {
  await tx.execute(
    sql`select pg_advisory_xact_lock(hashtextextended(${`slowmode:${channelId}:${userId}`}, 0))`,
  );
  const res = (await tx.execute(
    sql`select ${sql.join(slowModeItems(deps, userId, channelId, nonce), sql`, `)}`,
  )) as unknown as { rows: Preflight[] };
  checkSlowMode(res.rows[0] ?? {}, slowmode, now);
}

/** One statement gathering everything the checks need; skipped when nothing needs looking up. */
async function preflight(
  deps: Deps,
  userId: string,
  access: ChannelAccess,
  input: SendMessageInput,
  slowmode: number,
  nonce: string | null,
  names: string[],
): Promise<Preflight> {
  const items = [];
  const ref = (id: string) =>
    sql`(select json_build_object('c', channel_id, 'd', deleted_at is not null) from messages where id = ${id}::uuid)`;
  if (input.replyToId) items.push(sql`${ref(input.replyToId)} as reply`);
  if (input.forwardedFromId) items.push(sql`${ref(input.forwardedFromId)} as fwd`);
  if (slowmode) items.push(...slowModeItems(deps, userId, access.channel.id, nonce));
  items.push(...mentionLookupSql(access, names));
  if (!items.length) return {};
  const res = (await deps.db.execute(sql`select ${sql.join(items, sql`, `)}`)) as unknown as {
    rows: Preflight[];
  };
  return res.rows[0] ?? {};
}
