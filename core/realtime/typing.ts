/**
 * Typing indicators: ephemeral, never logged. A user's repeated calls in one channel are
 * throttled (one signal per THROTTLE_MS across every instance); clients show the indicator for
 * EXPIRES_MS.
 */
import type { Redis } from 'ioredis';
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
  };
}

/**
 * Shared by every instance on the same Redis prefix (SET NX PX), so two instances do not both
 * announce within the window. When Redis does not answer, this instance throttles on its own.
 */
export function createRedisThrottle(redis: Pick<Redis, 'set'>, prefix: string): TypingThrottle {
  const local = createMemoryThrottle();
  return {
    async claim(key, ms) {
      try {
        return (await redis.set(`${prefix}typing:${key}`, '1', 'PX', ms, 'NX')) === 'OK';
      } catch {
        return local.claim(key, ms);
      }
    },
  };
}

/** For processes without a hub (nothing to deliver to locally anyway). */
const fallback = createMemoryThrottle();

export async function startTyping(deps: Deps, viewer: Viewer, channelId: string): Promise<boolean> {
  const a = await requireChannel(deps.db, viewer.userId, channelId, Permission.SEND_MESSAGES, deps.now());
  // Typing is the start of a send: in a 1:1 DM whose other recipient blocked the viewer, it is
  // refused as sendMessage is, rather than shown to the blocker (who cannot get the message).
  if (a.channel.type === 'DM') await assertCanSendInDm(deps.db, viewer.userId, a.channel);
  const throttle = deps.realtime?.typing ?? fallback;
  if (!(await throttle.claim(`${viewer.userId}:${channelId}`, THROTTLE_MS))) return true;
  await deps.bus.signal('typing', {
    channelId,
    guildId: a.channel.guildId,
    userId: viewer.userId,
    at: Date.now(),
  });
  return true;
}
