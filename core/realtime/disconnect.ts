import { sql } from 'drizzle-orm';
import { type Db, resultRows, uuidArray } from '../db/client.ts';
import type { Deps } from '../deps.ts';

/** graphql-ws close codes Banter uses, plus its own. */
export const CloseCode = {
  /**
   * bad or expired access token, at connection_init or when the token the socket authenticated
   * with expires (graphql-ws clients do not retry: refresh the session, reconnect, resume by cursor)
   */
  Unauthorized: 4401,
  /** session revoked, account deactivated, or disconnected by a moderator */
  Forbidden: 4403,
  /** too many sockets for this user, or connections from this address */
  TooManyConnections: 4029,
  /**
   * try again: the socket's outgoing buffer passed its bound, or an event failed to execute on
   * the server (it was not sent): resume from the last cursor. Also a token the server could not
   * check (the database away): reconnect later
   */
  SlowConsumer: 1013,
  GoingAway: 1001,
} as const;

/**
 * Closes a user's sockets (one session's, or all) on every api instance: services call it after
 * revoking a session or deactivating an account, once the change has committed (a socket closed
 * earlier could reconnect and still find the session alive).
 */
export async function disconnectUser(
  deps: Deps,
  userId: string,
  opts: { sessionId?: string; reason?: string } = {},
): Promise<void> {
  await deps.bus.signal('disconnect', {
    userId,
    sessionId: opts.sessionId,
    code: CloseCode.Forbidden,
    reason: opts.reason ?? 'Session ended',
  });
}

/** Closes the sockets of one session (logout, revokeSession) on every api instance. */
export function disconnectSession(deps: Deps, userId: string, sessionId: string, reason = 'Session ended') {
  return disconnectUser(deps, userId, { sessionId, reason });
}

/** How often open sockets and SSE streams check that their sessions are still alive. */
export const SESSION_CHECK_MS = 10_000;

/**
 * Of these sessions, those that ended (revoked, expired, or their user deactivated), in one
 * statement: the periodic check behind the bus's disconnect signal, which an instance can miss
 * (Redis down), so that nothing outlives its session by more than SESSION_CHECK_MS.
 */
export async function endedSessions(db: Db, ids: string[]): Promise<Set<string>> {
  if (!ids.length) return new Set();
  const r = await db.execute(sql`
    select s.id from sessions s join users u on u.id = s.user_id
    where s.id = any(${uuidArray(ids)})
      and (s.revoked_at is not null or s.expires_at <= now() or u.deactivated_at is not null)`);
  return new Set(resultRows<{ id: string }>(r).map((x) => x.id));
}
