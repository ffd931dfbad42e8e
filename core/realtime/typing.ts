/**
 * Typing indicators: ephemeral, never logged. A user's repeated calls in one channel are
 * throttled (one signal per THROTTLE_MS across every instance); clients show the indicator for
 * EXPIRES_MS.
 */
import { sql } from 'drizzle-orm';
import type { Redis } from 'ioredis';
import { type DbOrTx, resultRows } from '../db/client.ts';
import type { Deps, Viewer } from '../deps.ts';
import { Permission } from '../permissions.ts';
import { requireChannel } from '../services/access.service.ts';
import { assertCanSendInDm } from '../services/direct.service.ts';

export const TYPING_EXPIRES_MS = 10_000;
const THROTTLE_MS = 5_000;

/** Who gets to announce: the first claim of a key in a window wins. */
export interface TypingThrottle {
  /** true when no claim of `key` is live, and then holds it for `ms` */
  claim(key: string, ms: number): Promise<boolean>;
  /** ends the live claim of `key`, if any: the next claim wins at once */
  release(key: string): Promise<void>;
}

export function createMemoryThrottle(): TypingThrottle {
  const recent = new Map<string, number>();
  return {
    async claim(key, ms) {
      const now = Date.now();
      const until = recent.get(key);
      if (until && until > now) return false;
      if (recent.size > 50_000) {
        for (const [k, t] of recent) if (t <= now) recent.delete(k);
      }
      recent.set(key, now + ms);
      return true;
    },
    async release(key) {
      recent.delete(key);
    },
  };
}

/**
 * Shared by every instance on the same Redis prefix (SET NX PX), so two instances do not both
 * announce within the window. When Redis does not answer, this instance throttles on its own.
 */
export function createRedisThrottle(redis: Pick<Redis, 'set' | 'del'>, prefix: string): TypingThrottle {
  const local = createMemoryThrottle();
  return {
    async claim(key, ms) {
      try {
        return (await redis.set(`${prefix}typing:${key}`, '1', 'PX', ms, 'NX')) === 'OK';
      } catch {
        return local.claim(key, ms);
      }
    },
    async release(key) {
      // Sent to Redis as called (before the send's response leaves), then the local claim.
      const gone = redis.del(`${prefix}typing:${key}`);
      await local.release(key);
      await gone.catch(() => {});
    },
  };
}

/**
 * Who may not be shown `userId` typing in the channel: whom it blocked (presence shows it OFFLINE
 * to them: "is typing" told them it was there) and who blocked it (as Discord, a blocker is not
 * shown the typing of whom it blocked). Only those who can be in the channel (its guild's members,
 * its recipients): a user blocked by thousands does not carry them all on every signal.
 */
async function hiddenFrom(
  db: DbOrTx,
  userId: string,
  channel: { id: string; guildId: string | null },
): Promise<string[]> {
  const there = channel.guildId
    ? sql`exists (select 1 from members m where m.guild_id = ${channel.guildId} and m.user_id = o.id)`
    : sql`exists (select 1 from channel_recipients c where c.channel_id = ${channel.id} and c.user_id = o.id)`;
  const r = await db.execute(sql`
    select o.id from (
      select target_id as id from relationships where user_id = ${userId} and kind = 'BLOCKED'
      union
      select user_id from relationships where target_id = ${userId} and kind = 'BLOCKED') o
    where ${there}`);
  return resultRows<{ id: string }>(r).map((x) => x.id);
}

/** The throttle's key for a user typing in a channel (claimed by startTyping, released by a send). */
const throttleKey = (userId: string, channelId: string) => `${userId}:${channelId}`;

/** For processes without a hub (nothing to deliver to locally anyway). */
const fallback = createMemoryThrottle();

/**
 * A user's message sent in a channel ends its typing there: clients drop the indicator when the
 * message arrives (as Discord's do), and the user's next startTyping, as it goes on writing, is
 * shown at once. Within the throttle's window it was dropped: the others saw no indicator for up
 * to THROTTLE_MS after each message. Not waited for (the send's response does not wait on Redis).
 */
export function sentInChannel(deps: Deps, userId: string, channelId: string): void {
  void (deps.realtime?.typing ?? fallback).release(throttleKey(userId, channelId)).catch(() => {});
}

export async function startTyping(deps: Deps, viewer: Viewer, channelId: string): Promise<boolean> {
  const a = await requireChannel(deps.db, viewer.userId, channelId, Permission.SEND_MESSAGES, deps.now());
  // Typing is the start of a send: in a 1:1 DM whose other recipient blocked the viewer, it is
  // refused as sendMessage is, rather than shown to the blocker (who cannot get the message).
  if (a.channel.type === 'DM') await assertCanSendInDm(deps.db, viewer.userId, a.channel);
  const throttle = deps.realtime?.typing ?? fallback;
  if (!(await throttle.claim(throttleKey(viewer.userId, channelId), THROTTLE_MS))) return true;
  const hidden = await hiddenFrom(deps.db, viewer.userId, a.channel);
  await deps.bus.signal('typing', {
    channelId,
    guildId: a.channel.guildId,
    userId: viewer.userId,
    at: Date.now(),
    ...(hidden.length ? { hiddenFrom: hidden } : {}),
  });
  return true;
}
