/**
 * Accounts and sessions: scrypt password hashes, short-lived JWT access tokens, opaque refresh
 * tokens stored hashed per device session and rotated on every use. Presenting a refresh token
 * that was already rotated away means it leaked: the whole session is revoked.
 */
import { createHash, randomBytes, scrypt as scryptCb, timingSafeEqual } from 'node:crypto';
import { and, eq, isNull, sql } from 'drizzle-orm';
import { jwtVerify, SignJWT } from 'jose';
import { databaseErrorOf } from '../db/client.ts';
import { sessions, spentRefreshTokens, users } from '../db/tables.ts';
import type { Deps, Viewer } from '../deps.ts';
import { BanterError, badInput, conflict, notFound, unauthenticated } from '../errors.ts';
import { isUuid, newId } from '../ids.ts';
import { disconnectSession } from '../realtime/disconnect.ts';

/** scrypt's parameters for new hashes; N is 2^cost (CoreSettings.passwordHashCost, default 14). */
const SCRYPT = { r: 8, p: 1, keylen: 32 };
/** The costs (log2 N) a hash may have: up to 2^16, 64 MiB of memory at r = 8. */
const COSTS = { minLog2N: 10, maxLog2N: 16 };
const DEFAULT_PASSWORD_HASH_COST = 14;

function scrypt(password: string, salt: Buffer, N: number, r: number, p: number): Promise<Buffer> {
  return new Promise((resolve, reject) =>
    scryptCb(password, salt, SCRYPT.keylen, { N, r, p, maxmem: 256 * N * r + 1024 * 1024 }, (err, key) =>
      err ? reject(err) : resolve(key),
    ),
  );
}

export async function hashPassword(password: string, cost = DEFAULT_PASSWORD_HASH_COST): Promise<string> {
  if (!Number.isInteger(cost) || cost < COSTS.minLog2N || cost > COSTS.maxLog2N) {
    throw new Error(`password hash cost must be a whole number from ${COSTS.minLog2N} to ${COSTS.maxLog2N}`);
  }
  const N = 2 ** cost;
  const salt = randomBytes(16);
  const key = await scrypt(password, salt, N, SCRYPT.r, SCRYPT.p);
  return `scrypt$${N}$${SCRYPT.r}$${SCRYPT.p}$${salt.toString('base64url')}$${key.toString('base64url')}`;
}

/** Checks a password against a stored hash, with the parameters the hash names (bounded). */
export async function verifyPassword(password: string, stored: string): Promise<boolean> {
  const [alg, nRaw, rRaw, pRaw, saltB64, keyB64] = stored.split('$');
  if (alg !== 'scrypt' || !saltB64 || !keyB64) return false;
  const [N, r, p] = [Number(nRaw), Number(rRaw), Number(pRaw)];
  const log2N = Math.log2(N);
  if (!Number.isInteger(log2N) || log2N < COSTS.minLog2N || log2N > COSTS.maxLog2N) return false;
  if (r !== SCRYPT.r || p !== SCRYPT.p) return false;
  const expected = Buffer.from(keyB64, 'base64url');
  const key = await scrypt(password, Buffer.from(saltB64, 'base64url'), N, r, p);
  return key.length === expected.length && timingSafeEqual(key, expected);
}

/** A hash made once per cost so that logins for unknown users cost the same time as real ones. */
const dummyHashes = new Map<number, Promise<string>>();

const sha256 = (s: string) => createHash('sha256').update(s).digest('base64url');

export const USERNAME_RE = /^[a-zA-Z0-9_.]{2,32}$/;
const EMAIL_RE = /^[^\s@]{1,64}@[^\s@]{1,255}$/;

export function validateUsername(username: string): string {
  if (!USERNAME_RE.test(username)) {
    throw badInput('Username must be 2-32 characters: letters, digits, underscore or dot.', 'username');
  }
  if (/^\.|\.$|\.\./.test(username))
    throw badInput('Username cannot start, end or repeat a dot.', 'username');
  return username;
}

export interface RegisterInput {
  username: string;
  email: string;
  password: string;
  deviceName?: string | null;
}
export interface LoginInput {
  login: string;
  password: string;
  deviceName?: string | null;
}
export interface AuthResult {
  accessToken: string;
  refreshToken: string;
  userId: string;
  sessionId: string;
}

function isUniqueViolation(err: unknown): string | null {
  const db = databaseErrorOf(err);
  return db?.code === '23505' ? (db.constraint ?? db.message ?? 'unique') : null;
}

export { isUniqueViolation };

export async function register(deps: Deps, input: RegisterInput, ip?: string): Promise<AuthResult> {
  const username = validateUsername(input.username.trim());
  const email = input.email.trim();
  if (!EMAIL_RE.test(email) || email.length > 254) throw badInput('Email address is not valid.', 'email');
  if (input.password.length < 8) throw badInput('Password must be at least 8 characters.', 'password');
  if (input.password.length > 256) throw badInput('Password must be at most 256 characters.', 'password');
  const passwordHash = await hashPassword(input.password, deps.settings.passwordHashCost);
  const id = newId();
  try {
    await deps.db.transaction(async (tx) => {
      // Serialize the "first account is admin" decision across concurrent registrations.
      await tx.execute(sql`select pg_advisory_xact_lock(4242002)`);
      const [{ n }] = await tx.select({ n: sql<number>`count(*)::int` }).from(users);
      await tx.insert(users).values({ id, username, email, passwordHash, isAdmin: n === 0 });
    });
  } catch (err) {
    const c = isUniqueViolation(err);
    if (c?.includes('email')) throw conflict('That email address is already registered.');
    if (c) throw conflict('That username is taken.');
    throw err;
  }
  return createSession(deps, id, input.deviceName ?? null, ip);
}

export async function login(deps: Deps, input: LoginInput, ip?: string): Promise<AuthResult> {
  const login = input.login.trim().toLowerCase();
  if (!login || login.length > 254) throw badInput('Enter a username or email address.', 'login');
  const col = login.includes('@') ? sql`lower(${users.email})` : sql`lower(${users.username})`;
  const [user] = await deps.db
    .select({ id: users.id, passwordHash: users.passwordHash, deactivatedAt: users.deactivatedAt })
    .from(users)
    .where(sql`${col} = ${login}`);
  if (!user) {
    const cost = deps.settings.passwordHashCost;
    if (!dummyHashes.has(cost)) dummyHashes.set(cost, hashPassword('not-a-real-password', cost));
    await verifyPassword(input.password, await dummyHashes.get(cost)!);
    throw unauthenticated('Wrong username, email or password.');
  }
  if (!(await verifyPassword(input.password, user.passwordHash)) || user.deactivatedAt) {
    throw unauthenticated('Wrong username, email or password.');
  }
  return createSession(deps, user.id, input.deviceName ?? null, ip);
}

async function signAccess(deps: Deps, userId: string, sessionId: string): Promise<string> {
  return new SignJWT({ sid: sessionId })
    .setProtectedHeader({ alg: 'HS256' })
    .setSubject(userId)
    .setIssuedAt()
    .setExpirationTime(`${deps.settings.accessTokenTtl}s`)
    .sign(deps.settings.jwtSecret);
}

async function createSession(
  deps: Deps,
  userId: string,
  deviceName: string | null,
  ip?: string,
): Promise<AuthResult> {
  const refreshToken = randomBytes(32).toString('base64url');
  const sessionId = newId();
  const expiresAt = new Date(deps.now().getTime() + deps.settings.sessionTtlDays * 86_400_000);
  await deps.db.insert(sessions).values({
    id: sessionId,
    userId,
    deviceName: deviceName?.slice(0, 100) ?? null,
    refreshHash: sha256(refreshToken),
    expiresAt,
    ip: ip ?? null,
  });
  return { accessToken: await signAccess(deps, userId, sessionId), refreshToken, userId, sessionId };
}

/** Rotates a refresh token. Reusing a spent one revokes the session it belonged to. */
export async function refreshSession(deps: Deps, refreshToken: string): Promise<AuthResult> {
  const hash = sha256(refreshToken);
  const next = randomBytes(32).toString('base64url');
  const now = deps.now();
  const outcome = await deps.db.transaction(async (tx) => {
    const [s] = await tx.select().from(sessions).where(eq(sessions.refreshHash, hash)).for('update');
    if (!s) {
      const [spent] = await tx.select().from(spentRefreshTokens).where(eq(spentRefreshTokens.hash, hash));
      if (spent) {
        const [revoked] = await tx
          .update(sessions)
          .set({ revokedAt: now })
          .where(and(eq(sessions.id, spent.sessionId), isNull(sessions.revokedAt)))
          .returning({ userId: sessions.userId });
        return { reused: true as const, sessionId: spent.sessionId, userId: revoked?.userId };
      }
      return null;
    }
    if (s.revokedAt || s.expiresAt <= now) return null;
    const [u] = await tx.select({ d: users.deactivatedAt }).from(users).where(eq(users.id, s.userId));
    if (!u || u.d) return null;
    await tx.insert(spentRefreshTokens).values({ hash, sessionId: s.id });
    await tx
      .update(sessions)
      .set({ refreshHash: sha256(next), lastUsedAt: now })
      .where(eq(sessions.id, s.id));
    return { reused: false as const, session: s };
  });
  if (!outcome) throw unauthenticated('This refresh token is not valid; sign in again.');
  if (outcome.reused) {
    forgetSession(outcome.sessionId);
    // Its sockets close now, as at any other revocation (not at the next periodic session check).
    if (outcome.userId) await disconnectSession(deps, outcome.userId, outcome.sessionId, 'Session revoked');
    throw unauthenticated(
      'This refresh token was already used; the session has been revoked. Sign in again.',
    );
  }
  const s = outcome.session;
  return {
    accessToken: await signAccess(deps, s.userId, s.id),
    refreshToken: next,
    userId: s.userId,
    sessionId: s.id,
  };
}

/**
 * Revocation is checked per request against a short in-process cache, so a revoked session
 * stops working here at once and on other instances within SESSION_CACHE_MS.
 */
const SESSION_CACHE_MS = 5_000;
const sessionCache = new Map<string, { ok: boolean; isAdmin: boolean; at: number }>();
function forgetSession(id: string) {
  sessionCache.delete(id);
}

/**
 * Tokens already verified, per signing secret: a client sends the same token on every request
 * until it expires, and verifying an HMAC through WebCrypto costs more than the rest of a small
 * request. The token string is the credential, so a hit is as good as a fresh verification;
 * expiry is checked on every use.
 */
const verifiedTokens = new WeakMap<Uint8Array, Map<string, { sub: string; sid: string; exp: number }>>();
const MAX_VERIFIED_TOKENS = 50_000;

async function verifyAccessToken(secret: Uint8Array, token: string): Promise<{ sub: string; sid: string }> {
  let cache = verifiedTokens.get(secret);
  if (!cache) {
    cache = new Map();
    verifiedTokens.set(secret, cache);
  }
  const hit = cache.get(token);
  if (hit && hit.exp * 1000 > Date.now()) return hit;
  try {
    const { payload } = await jwtVerify(token, secret, { algorithms: ['HS256'] });
    if (
      typeof payload.sub !== 'string' ||
      typeof payload.sid !== 'string' ||
      typeof payload.exp !== 'number'
    ) {
      throw new Error('claims');
    }
    const claims = { sub: payload.sub, sid: payload.sid, exp: payload.exp };
    if (cache.size >= MAX_VERIFIED_TOKENS) cache.clear();
    cache.set(token, claims);
    return claims;
  } catch (err) {
    cache.delete(token);
    const expired = (err as { code?: string }).code === 'ERR_JWT_EXPIRED';
    throw new BanterError(
      'UNAUTHENTICATED',
      expired ? 'Access token expired; refresh the session.' : 'Access token is not valid.',
      { cause: err },
    );
  }
}

/** Verifies an access token; returns the viewer or throws UNAUTHENTICATED. */
export async function authenticate(deps: Deps, token: string): Promise<Viewer> {
  const { sub, sid } = await verifyAccessToken(deps.settings.jwtSecret, token);
  const t = Date.now();
  let c = sessionCache.get(sid);
  if (!c || t - c.at > SESSION_CACHE_MS) {
    const [row] = await deps.db
      .select({ revokedAt: sessions.revokedAt, isAdmin: users.isAdmin, deactivatedAt: users.deactivatedAt })
      .from(sessions)
      .innerJoin(users, eq(users.id, sessions.userId))
      .where(and(eq(sessions.id, sid), eq(sessions.userId, sub)));
    c = { ok: !!row && !row.revokedAt && !row.deactivatedAt, isAdmin: !!row?.isAdmin, at: t };
    if (sessionCache.size > 100_000) sessionCache.clear();
    sessionCache.set(sid, c);
  }
  if (!c.ok) throw unauthenticated('This session has been revoked; sign in again.');
  return { userId: sub, sessionId: sid, isAdmin: c.isAdmin };
}

export async function revokeSession(deps: Deps, viewer: Viewer, sessionId: string): Promise<void> {
  // Session ids are uuids: anything else would fail the uuid cast in the database (a masked error).
  if (!isUuid(sessionId)) throw badInput('id is not a valid session id.', 'id');
  const res = await deps.db
    .update(sessions)
    .set({ revokedAt: deps.now() })
    .where(and(eq(sessions.id, sessionId), eq(sessions.userId, viewer.userId), isNull(sessions.revokedAt)))
    .returning({ id: sessions.id });
  if (!res.length) throw notFound('Session');
  forgetSession(sessionId);
  await disconnectSession(deps, viewer.userId, sessionId, 'Session revoked');
}

export async function logout(deps: Deps, viewer: Viewer): Promise<void> {
  await deps.db.update(sessions).set({ revokedAt: deps.now() }).where(eq(sessions.id, viewer.sessionId));
  forgetSession(viewer.sessionId);
  await disconnectSession(deps, viewer.userId, viewer.sessionId, 'Signed out');
}

export async function listSessions(deps: Deps, viewer: Viewer) {
  return deps.db
    .select()
    .from(sessions)
    .where(
      and(eq(sessions.userId, viewer.userId), isNull(sessions.revokedAt), sql`${sessions.expiresAt} > now()`),
    )
    .orderBy(sessions.id);
}

/** Forget every cached session of a user (deactivation, instance ban). */
export function forgetAllCachedSessions() {
  sessionCache.clear();
}
