/**
 * Emoji reactions on messages: one row per (message, emoji, user). Adding or removing twice is a
 * no-op (no error, no event), so clients can retry freely.
 */
import { and, eq, inArray, sql } from 'drizzle-orm';
import type { DbOrTx } from '../db/client.ts';
import { messages, reactions } from '../db/tables.ts';
import type { Deps, Viewer } from '../deps.ts';
import { badInput, conflict, notFound } from '../errors.ts';
import { transact } from '../events.ts';
import { Permission } from '../permissions.ts';
import type { MessageRow } from './message.service.ts';
import { loadVisibleMessage } from './message-history.service.ts';

/** Distinct emoji one message may carry; one more is CONFLICT (the emoji itself is fine). */
export const MAX_REACTION_EMOJI = 20;
export const MAX_EMOJI_BYTES = 32;

const segmenter = new Intl.Segmenter(undefined, { granularity: 'grapheme' });
// Code points an emoji grapheme may be built from: pictographs, skin tones, ZWJ, VS16, keycap
// parts, regional indicators and the tag characters of subdivision flags.
const EMOJI_PARTS =
  /^(?:\p{Extended_Pictographic}|\p{Emoji_Modifier}|\p{Regional_Indicator}|[\u200D\uFE0F#*0-9]|\u20E3|[\u{E0020}-\u{E007F}])+$/u;
const PICTOGRAPH = /\p{Extended_Pictographic}/u;
const NON_PICTO_PARTS = /\p{Regional_Indicator}|\u20E3|[#*0-9]/u;
const FLAG = /^\p{Regional_Indicator}{2}$/u;
const KEYCAP = /^[#*0-9]\uFE0F?\u20E3$/u;

/** A single unicode emoji (custom guild emoji are not supported yet), else BAD_USER_INPUT. */
export function validateEmoji(raw: string): string {
  const bad = () => badInput('emoji must be a single unicode emoji.', 'emoji');
  if (typeof raw !== 'string' || raw.length === 0) throw bad();
  if (Buffer.byteLength(raw, 'utf8') > MAX_EMOJI_BYTES) throw bad();
  const graphemes = [...segmenter.segment(raw)];
  if (graphemes.length !== 1 || !EMOJI_PARTS.test(raw)) throw bad();
  if (KEYCAP.test(raw) || FLAG.test(raw)) return raw;
  if (!PICTOGRAPH.test(raw) || NON_PICTO_PARTS.test(raw)) throw bad();
  return raw;
}

export interface ReactionInput {
  messageId: string;
  emoji: string;
}

export async function addReaction(deps: Deps, viewer: Viewer, input: ReactionInput): Promise<MessageRow> {
  const emoji = validateEmoji(input.emoji);
  const { row: message } = await loadVisibleMessage(
    deps,
    viewer,
    input.messageId,
    Permission.ADD_REACTIONS | Permission.READ_HISTORY,
  );
  return transact(deps, async (tx, log) => {
    // Serializes reactions on this message so the emoji cap holds under concurrency; NO KEY
    // UPDATE does not block the reactions FK check or other writers of unrelated rows.
    const [m] = await tx.select().from(messages).where(eq(messages.id, message.id)).for('no key update');
    if (!m || m.deletedAt) throw notFound('Message');
    const present = await tx
      .select({
        emoji: reactions.emoji,
        mine: sql<boolean>`bool_or(${reactions.userId} = ${viewer.userId})`,
      })
      .from(reactions)
      .where(eq(reactions.messageId, m.id))
      .groupBy(reactions.emoji);
    const same = present.find((p) => p.emoji === emoji);
    if (same?.mine) return m;
    if (!same && present.length >= MAX_REACTION_EMOJI) {
      throw conflict(`A message can carry at most ${MAX_REACTION_EMOJI} different emoji.`);
    }
    await tx
      .insert(reactions)
      .values({ messageId: m.id, emoji, userId: viewer.userId })
      .onConflictDoNothing();
    await log.append({
      type: 'REACTION_ADDED',
      guildId: m.guildId,
      channelId: m.channelId,
      payload: { messageId: m.id, emoji, userId: viewer.userId },
    });
    return m;
  });
}

/**
 * Takes back the viewer's own reaction. Needs only READ_HISTORY: a member who lost ADD_REACTIONS
 * (or is timed out) can still withdraw what they added.
 */
export async function removeReaction(deps: Deps, viewer: Viewer, input: ReactionInput): Promise<MessageRow> {
  const emoji = validateEmoji(input.emoji);
  const { row: message } = await loadVisibleMessage(deps, viewer, input.messageId, Permission.READ_HISTORY);
  return transact(deps, async (tx, log) => {
    const gone = await tx
      .delete(reactions)
      .where(
        and(
          eq(reactions.messageId, message.id),
          eq(reactions.emoji, emoji),
          eq(reactions.userId, viewer.userId),
        ),
      )
      .returning({ emoji: reactions.emoji });
    if (gone.length) {
      await log.append({
        type: 'REACTION_REMOVED',
        guildId: message.guildId,
        channelId: message.channelId,
        payload: { messageId: message.id, emoji, userId: viewer.userId },
      });
    }
    return message;
  });
}

export interface ReactionSummary {
  emoji: string;
  count: number;
  /** the viewer reacted with this emoji */
  me: boolean;
}

/**
 * Reaction summaries for many messages in one statement, each list in the order its emoji were
 * first added. `viewerId` null (signed out) makes every `me` false.
 */
export async function reactionsForMessages(
  db: DbOrTx,
  viewerId: string | null,
  messageIds: readonly string[],
): Promise<ReactionSummary[][]> {
  if (!messageIds.length) return [];
  const rows = await db
    .select({
      messageId: reactions.messageId,
      emoji: reactions.emoji,
      count: sql<number>`count(*)::int`,
      me: viewerId ? sql<boolean>`bool_or(${reactions.userId} = ${viewerId})` : sql<boolean>`false`,
    })
    .from(reactions)
    .where(inArray(reactions.messageId, [...messageIds]))
    .groupBy(reactions.messageId, reactions.emoji)
    .orderBy(sql`min(${reactions.createdAt})`, reactions.emoji);
  const byMessage = new Map<string, ReactionSummary[]>();
  for (const r of rows) {
    const list = byMessage.get(r.messageId) ?? [];
    list.push({ emoji: r.emoji, count: Number(r.count), me: !!r.me });
    byMessage.set(r.messageId, list);
  }
  return messageIds.map((id) => byMessage.get(id) ?? []);
}
