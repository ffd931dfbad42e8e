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
   * the server (it was not sent): resume from the last cursor
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
