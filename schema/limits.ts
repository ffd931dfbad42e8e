/**
 * Per-user and per-IP rate limits on mutations and on the read-heavy queries. Each rule applies
 * to the viewer (when signed in) and to the client address; RATE_LIMITS=off turns them all off.
 */

import { rateLimited } from '../core/errors.ts';
import type { RateLimitRule } from '../core/ports/rate-limit.ts';
import type { Context } from './builder.ts';

export const RULES = {
  register: { perIp: { limit: 5, windowSeconds: 3600 } },
  login: { perIp: { limit: 20, windowSeconds: 300 }, perKey: { limit: 10, windowSeconds: 300 } },
  /**
   * Every user behind one address (an office, a campus, a carrier's NAT) refreshes about once per
   * ACCESS_TOKEN_TTL, when its socket is closed at its token's expiry, and all at once after an
   * outage: as many as the address may open sockets. A refresh token cannot be guessed; this only
   * bounds the lookups of junk ones.
   */
  refresh: { perIp: { limit: 6000, windowSeconds: 60 } },
  sendMessage: { perUser: { limit: 600, windowSeconds: 60 }, perIp: { limit: 6000, windowSeconds: 60 } },
  mutation: { perUser: { limit: 300, windowSeconds: 60 }, perIp: { limit: 3000, windowSeconds: 60 } },
  /** read-heavy queries (searchUsers, search): each one scans an index */
  search: { perUser: { limit: 60, windowSeconds: 60 }, perIp: { limit: 600, windowSeconds: 60 } },
} satisfies Record<string, { perIp?: RateLimitRule; perUser?: RateLimitRule; perKey?: RateLimitRule }>;

export type RuleName = keyof typeof RULES;

/** Throws RATE_LIMITED (with retryAfter) when any applicable rule is exhausted. */
export async function limit(ctx: Context, name: RuleName, key?: string): Promise<void> {
  if (!ctx.deps.rateLimitsEnabled) return;
  const rule: { perIp?: RateLimitRule; perUser?: RateLimitRule; perKey?: RateLimitRule } = RULES[name];
  const rl = ctx.deps.rateLimiter;
  const checks: Promise<{ ok: boolean; retryAfter: number }>[] = [];
  if (rule.perIp) checks.push(rl.hit(`${name}:ip:${ctx.ip}`, rule.perIp));
  if (rule.perUser && ctx.viewer) checks.push(rl.hit(`${name}:u:${ctx.viewer.userId}`, rule.perUser));
  if (rule.perKey && key) checks.push(rl.hit(`${name}:k:${key}`, rule.perKey));
  const results = await Promise.all(checks);
  const worst = results.filter((r) => !r.ok).sort((a, b) => b.retryAfter - a.retryAfter)[0];
  if (worst) throw rateLimited(worst.retryAfter);
}
