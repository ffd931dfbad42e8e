/**
 * Friends, friend requests and blocks. Each user has their own row about the other (one row per
 * direction), so "A blocked B" and "B is A's friend" are separate facts. A block is never
 * revealed to the blocked user: what they try answers as if the blocker did not exist.
 */
import { and, eq, sql } from 'drizzle-orm';
import type { DbOrTx, Tx } from '../db/client.ts';
import { relationships, users } from '../db/tables.ts';
import type { Deps, Viewer } from '../deps.ts';
import { badInput, conflict, notFound } from '../errors.ts';
import { type EventWriter, transact } from '../events.ts';

export const RELATIONSHIP_KINDS = ['FRIEND', 'OUTGOING', 'INCOMING', 'BLOCKED'] as const;
export type RelationshipKind = (typeof RELATIONSHIP_KINDS)[number];

export interface RelationshipRow {
  targetId: string;
  kind: RelationshipKind;
  createdAt: Date;
}

/** The kind of `userId`'s own row about `targetId`, or null. */
export async function relationshipKind(
  db: DbOrTx,
  userId: string,
  targetId: string,
): Promise<RelationshipKind | null> {
  const [r] = await db
    .select({ kind: relationships.kind })
    .from(relationships)
    .where(and(eq(relationships.userId, userId), eq(relationships.targetId, targetId)));
  return (r?.kind as RelationshipKind | undefined) ?? null;
}

/** True when `otherId` has blocked `viewerId` (presence, DMs and search hide the blocker). */
export async function isBlockedBy(db: DbOrTx, viewerId: string, otherId: string): Promise<boolean> {
  return (await relationshipKind(db, otherId, viewerId)) === 'BLOCKED';
}

export async function listRelationships(deps: Deps, viewer: Viewer): Promise<RelationshipRow[]> {
  const rows = await deps.db
    .select({
      targetId: relationships.targetId,
      kind: relationships.kind,
      createdAt: relationships.createdAt,
    })
    .from(relationships)
    .where(eq(relationships.userId, viewer.userId))
    .orderBy(relationships.createdAt, relationships.targetId);
  return rows as RelationshipRow[];
}

interface Pair {
  tx: Tx;
  log: EventWriter;
  me: string;
  other: string;
  /** my row about them */
  mine: RelationshipKind | null;
  /** their row about me */
  theirs: RelationshipKind | null;
}

/**
 * Runs `fn` with both rows of a pair read under a per-pair lock, so two users acting on each
 * other at once (both sending a request) serialize instead of colliding on the primary key.
 */
async function withPair<T>(
  deps: Deps,
  viewer: Viewer,
  otherId: string,
  fn: (p: Pair) => Promise<T>,
): Promise<T> {
  const me = viewer.userId;
  if (otherId === me) throw badInput('You cannot do that to yourself.', 'userId');
  const key = [me, otherId].sort().join(':');
  return transact(deps, async (tx, log) => {
    await tx.execute(sql`select pg_advisory_xact_lock(hashtextextended(${`rel:${key}`}, 0))`);
    const mine = await relationshipKind(tx, me, otherId);
    const theirs = await relationshipKind(tx, otherId, me);
    return fn({ tx, log, me, other: otherId, mine, theirs });
  });
}

/** Sets (or with null deletes) `userId`'s row about `targetId`, and tells `userId` about it. */
async function setRow(
  p: Pair,
  userId: string,
  targetId: string,
  kind: RelationshipKind | null,
): Promise<RelationshipRow | null> {
  const where = and(eq(relationships.userId, userId), eq(relationships.targetId, targetId));
  let row: RelationshipRow | null = null;
  if (kind === null) await p.tx.delete(relationships).where(where);
  else {
    const [r] = await p.tx
      .insert(relationships)
      .values({ userId, targetId, kind })
      .onConflictDoUpdate({
        target: [relationships.userId, relationships.targetId],
        set: { kind, createdAt: sql`now()` },
      })
      .returning({ createdAt: relationships.createdAt });
    row = { targetId, kind, createdAt: r.createdAt };
  }
  await p.log.append({ type: 'RELATIONSHIP_UPDATED', userId, payload: { targetId, kind } });
  return row;
}

/** Unknown and deactivated users answer NOT_FOUND, as does anyone who blocked the viewer. */
async function requireReachable(p: Pair): Promise<void> {
  const [u] = await p.tx
    .select({ deactivatedAt: users.deactivatedAt })
    .from(users)
    .where(eq(users.id, p.other));
  if (!u || u.deactivatedAt || p.theirs === 'BLOCKED') throw notFound('User');
}

/**
 * Each change answers the viewer's own row afterwards (null when it is gone).
 * Sends a request, or accepts theirs when they already asked.
 */
export async function sendFriendRequest(deps: Deps, viewer: Viewer, otherId: string) {
  return withPair(deps, viewer, otherId, async (p): Promise<RelationshipRow | null> => {
    await requireReachable(p);
    if (p.mine === 'FRIEND') throw conflict('You are already friends.');
    if (p.mine === 'OUTGOING') throw conflict('You already sent this user a friend request.');
    if (p.mine === 'BLOCKED') throw conflict('Unblock this user before sending a friend request.');
    if (p.mine === 'INCOMING') {
      const mine = await setRow(p, p.me, p.other, 'FRIEND');
      await setRow(p, p.other, p.me, 'FRIEND');
      return mine;
    }
    const mine = await setRow(p, p.me, p.other, 'OUTGOING');
    await setRow(p, p.other, p.me, 'INCOMING');
    return mine;
  });
}

export async function acceptFriendRequest(deps: Deps, viewer: Viewer, otherId: string) {
  return withPair(deps, viewer, otherId, async (p): Promise<RelationshipRow | null> => {
    if (p.mine !== 'INCOMING') throw notFound('Friend request');
    await requireReachable(p);
    const mine = await setRow(p, p.me, p.other, 'FRIEND');
    await setRow(p, p.other, p.me, 'FRIEND');
    return mine;
  });
}

/** Declines an incoming request or cancels one's own outgoing request. */
export async function declineFriendRequest(deps: Deps, viewer: Viewer, otherId: string) {
  return withPair(deps, viewer, otherId, async (p) => {
    if (p.mine !== 'INCOMING' && p.mine !== 'OUTGOING') throw notFound('Friend request');
    await setRow(p, p.me, p.other, null);
    if (p.theirs === 'INCOMING' || p.theirs === 'OUTGOING') await setRow(p, p.other, p.me, null);
    return null;
  });
}

export async function removeFriend(deps: Deps, viewer: Viewer, otherId: string) {
  return withPair(deps, viewer, otherId, async (p) => {
    if (p.mine !== 'FRIEND') throw notFound('Friend');
    await setRow(p, p.me, p.other, null);
    if (p.theirs === 'FRIEND') await setRow(p, p.other, p.me, null);
    return null;
  });
}

/**
 * Blocks a user: ends any friendship or request between the two. Their own block of the viewer
 * (if any) stays, and they are told only that the friendship or request ended.
 */
export async function blockUser(deps: Deps, viewer: Viewer, otherId: string) {
  return withPair(deps, viewer, otherId, async (p): Promise<RelationshipRow | null> => {
    const [u] = await p.tx.select({ id: users.id }).from(users).where(eq(users.id, p.other));
    if (!u) throw notFound('User');
    if (p.mine === 'BLOCKED') throw conflict('You already blocked this user.');
    const mine = await setRow(p, p.me, p.other, 'BLOCKED');
    if (p.theirs && p.theirs !== 'BLOCKED') await setRow(p, p.other, p.me, null);
    return mine;
  });
}

export async function unblockUser(deps: Deps, viewer: Viewer, otherId: string) {
  return withPair(deps, viewer, otherId, async (p) => {
    if (p.mine !== 'BLOCKED') throw notFound('Block');
    await setRow(p, p.me, p.other, null);
    return null;
  });
}
