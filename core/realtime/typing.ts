/**
 * Typing indicators: ephemeral, never logged. A user's repeated calls in one channel are
 * throttled (one signal per THROTTLE_MS); clients show the indicator for EXPIRES_MS.
 */
import type { Deps, Viewer } from '../deps.ts';
import { Permission } from '../permissions.ts';
import { requireChannel } from '../services/access.service.ts';

export const TYPING_EXPIRES_MS = 10_000;
const THROTTLE_MS = 5_000;

const recent = new Map<string, number>();

export async function startTyping(deps: Deps, viewer: Viewer, channelId: string): Promise<boolean> {
  const a = await requireChannel(deps.db, viewer.userId, channelId, Permission.SEND_MESSAGES, deps.now());
  const key = `${viewer.userId}:${channelId}`;
  const now = Date.now();
  const last = recent.get(key);
  if (last && now - last < THROTTLE_MS) return true;
  if (recent.size > 50_000) {
    for (const [k, t] of recent) if (now - t >= THROTTLE_MS) recent.delete(k);
  }
  recent.set(key, now);
  await deps.bus.signal('typing', {
    channelId,
    guildId: a.channel.guildId,
    userId: viewer.userId,
    at: now,
  });
  return true;
}
