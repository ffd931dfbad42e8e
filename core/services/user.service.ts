/**
 * Profiles, usernames, deactivation and user search. A deactivated account keeps its row (its
 * messages keep an author) but cannot sign in, is hidden from search and cannot be DM'd.
 */
import { and, eq, isNull, sql } from 'drizzle-orm';
import { relationships, sessions, users } from '../db/tables.ts';
import type { Deps, Viewer } from '../deps.ts';
import { BanterError, badInput, conflict, forbidden, notFound } from '../errors.ts';
import { disconnectUser } from '../realtime/disconnect.ts';
import {
  forgetAllCachedSessions,
  isUniqueViolation,
  validateUsername,
  verifyPassword,
} from './auth.service.ts';

export type UserRow = typeof users.$inferSelect;

export const MAX_DISPLAY_NAME = 32;
export const MAX_BIO = 190;
export const MAX_AVATAR_URL = 2048;
export const MAX_SEARCH_PREFIX = 32;
export const MAX_SEARCH_RESULTS = 25;
export const DEFAULT_SEARCH_RESULTS = 10;

/** Absent fields stay as they are; null clears. */
export interface UpdateProfileInput {
  displayName?: string | null;
  bio?: string | null;
  avatarUrl?: string | null;
}

function validateDisplayName(raw: string | null): string | null {
  if (raw === null) return null;
  const name = raw.trim();
  if (name.length < 1 || name.length > MAX_DISPLAY_NAME) {
    throw badInput(
      `Display name must be 1-${MAX_DISPLAY_NAME} characters (or null to clear it).`,
      'displayName',
    );
  }
  return name;
}

function validateBio(raw: string | null): string | null {
  if (raw === null) return null;
  const bio = raw.trim();
  if (bio.length > MAX_BIO) throw badInput(`Bio must be at most ${MAX_BIO} characters.`, 'bio');
  return bio || null;
}

function validateAvatarUrl(raw: string | null): string | null {
  if (raw === null) return null;
  const bad = (cause?: unknown) =>
    new BanterError(
      'BAD_USER_INPUT',
      `Avatar URL must be an http(s) URL of at most ${MAX_AVATAR_URL} characters.`,
      { cause, extra: { field: 'avatarUrl' } },
    );
  if (raw.length > MAX_AVATAR_URL) throw bad();
  let url: URL;
  try {
    url = new URL(raw);
  } catch (err) {
    throw bad(err);
  }
  if (url.protocol !== 'http:' && url.protocol !== 'https:') throw bad();
  return raw;
}

export async function updateProfile(deps: Deps, viewer: Viewer, input: UpdateProfileInput): Promise<UserRow> {
  const set: Partial<Pick<UserRow, 'displayName' | 'bio' | 'avatarUrl'>> = {};
  if (input.displayName !== undefined) set.displayName = validateDisplayName(input.displayName);
  if (input.bio !== undefined) set.bio = validateBio(input.bio);
  if (input.avatarUrl !== undefined) set.avatarUrl = validateAvatarUrl(input.avatarUrl);
  return saveUser(deps, viewer.userId, set);
}

export async function changeUsername(deps: Deps, viewer: Viewer, raw: string): Promise<UserRow> {
  const username = validateUsername(raw.trim());
  try {
    return await saveUser(deps, viewer.userId, { username });
  } catch (err) {
    // The unique index is on lower(username): a case-only change of one's own name is fine.
    if (isUniqueViolation(err)) throw conflict('That username is taken.');
    throw err;
  }
}

async function saveUser(deps: Deps, userId: string, set: Partial<UserRow>): Promise<UserRow> {
  if (!Object.keys(set).length) {
    const [u] = await deps.db.select().from(users).where(eq(users.id, userId));
    if (!u) throw notFound('User');
    return u;
  }
  const [u] = await deps.db
    .update(users)
    .set(set)
    .where(and(eq(users.id, userId), isNull(users.deactivatedAt)))
    .returning();
  if (!u) throw notFound('User');
  return u;
}

/**
 * Wrong password answers FORBIDDEN (not UNAUTHENTICATED): the session is fine, and clients treat
 * UNAUTHENTICATED as "sign in again".
 */
export async function deactivateAccount(deps: Deps, viewer: Viewer, password: string): Promise<void> {
  const [u] = await deps.db
    .select({ passwordHash: users.passwordHash })
    .from(users)
    .where(and(eq(users.id, viewer.userId), isNull(users.deactivatedAt)));
  if (!u) throw notFound('User');
  if (!(await verifyPassword(password, u.passwordHash))) throw forbidden('Wrong password.');
  const now = deps.now();
  await deps.db.transaction(async (tx) => {
    await tx.update(users).set({ deactivatedAt: now }).where(eq(users.id, viewer.userId));
    await tx
      .update(sessions)
      .set({ revokedAt: now })
      .where(and(eq(sessions.userId, viewer.userId), isNull(sessions.revokedAt)));
  });
  // The session cache is keyed by session id, not user: drop it all rather than miss one.
  forgetAllCachedSessions();
  await disconnectUser(deps, viewer.userId, { reason: 'Account deactivated' });
}

/** Escapes LIKE wildcards: `_` is a legal username character. */
const likePrefix = (s: string) => `${s.toLowerCase().replace(/[\\%_]/g, (c) => `\\${c}`)}%`;

/**
 * Users whose username starts with `prefix` (case-insensitive), in username order, through the
 * lower(username) text_pattern_ops index. Hides deactivated users and users who blocked the viewer.
 */
export async function searchUsers(
  deps: Deps,
  viewer: Viewer,
  prefix: string,
  first?: number | null,
): Promise<UserRow[]> {
  if (prefix.length < 1 || prefix.length > MAX_SEARCH_PREFIX) {
    throw badInput(`Prefix must be 1-${MAX_SEARCH_PREFIX} characters.`, 'prefix');
  }
  const n = first ?? DEFAULT_SEARCH_RESULTS;
  if (!Number.isInteger(n) || n < 1) throw badInput('first must be a positive number.', 'first');
  return deps.db
    .select()
    .from(users)
    .where(
      and(
        sql`lower(${users.username}) like ${likePrefix(prefix)} escape '\\'`,
        isNull(users.deactivatedAt),
        sql`not exists (select 1 from ${relationships} r where r.user_id = ${users.id}
              and r.target_id = ${viewer.userId} and r.kind = 'BLOCKED')`,
      ),
    )
    .orderBy(sql`lower(${users.username})`)
    .limit(Math.min(n, MAX_SEARCH_RESULTS));
}

/** The status the viewer chose (setPresence): ONLINE until it chooses one. */
export async function presenceChoice(deps: Deps, viewer: Viewer) {
  const [r] = await deps.db
    .select({ choice: users.presenceChoice })
    .from(users)
    .where(eq(users.id, viewer.userId));
  return r?.choice ?? 'ONLINE';
}
