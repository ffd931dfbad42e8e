import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import { eq } from 'drizzle-orm';
import { users } from '../core/db/tables.ts';
import { hashPassword } from '../core/services/auth.service.ts';
import { createTestApp, fails, gql, ok, signUp, type TestApp } from './helpers.ts';

let app: TestApp;
before(async () => {
  app = await createTestApp();
});
after(() => app.destroy());

const REGISTER = `mutation($i: RegisterInput!) { register(input: $i) { accessToken refreshToken user { id username isAdmin } } }`;
const LOGIN = `mutation($i: LoginInput!) { login(input: $i) { accessToken refreshToken user { id username } } }`;
const REFRESH = `mutation($t: String!) { refreshSession(refreshToken: $t) { accessToken refreshToken } }`;

describe('accounts', () => {
  it('makes the first account the instance admin, and only the first', async () => {
    const first = await ok(app, REGISTER, {
      i: { username: 'alice', email: 'alice@example.test', password: 'password123' },
    });
    assert.equal(first.register.user.isAdmin, true);
    const second = await ok(app, REGISTER, {
      i: { username: 'bob', email: 'bob@example.test', password: 'password123' },
    });
    assert.equal(second.register.user.isAdmin, false);
  });

  it('refuses taken usernames and emails case-insensitively with CONFLICT', async () => {
    await fails(app, 'CONFLICT', REGISTER, {
      i: { username: 'ALICE', email: 'other@example.test', password: 'password123' },
    });
    await fails(app, 'CONFLICT', REGISTER, {
      i: { username: 'alice2', email: 'Alice@Example.test', password: 'password123' },
    });
  });

  it('validates register input with BAD_USER_INPUT', async () => {
    for (const i of [
      { username: 'a', email: 'x1@example.test', password: 'password123' },
      { username: 'x'.repeat(33), email: 'x2@example.test', password: 'password123' },
      { username: 'bad name', email: 'x3@example.test', password: 'password123' },
      { username: 'okname', email: 'not-an-email', password: 'password123' },
      { username: 'okname2', email: 'x4@example.test', password: 'short' },
    ]) {
      await fails(app, 'BAD_USER_INPUT', REGISTER, { i });
    }
  });

  it('logs in by username or email, and refuses a wrong password with UNAUTHENTICATED', async () => {
    const byName = await ok(app, LOGIN, {
      i: { login: 'alice', password: 'password123', deviceName: 'laptop' },
    });
    assert.equal(byName.login.user.username, 'alice');
    const byEmail = await ok(app, LOGIN, { i: { login: 'ALICE@example.test', password: 'password123' } });
    assert.equal(byEmail.login.user.username, 'alice');
    await fails(app, 'UNAUTHENTICATED', LOGIN, { i: { login: 'alice', password: 'wrong-password' } });
    await fails(app, 'UNAUTHENTICATED', LOGIN, { i: { login: 'nobody', password: 'password123' } });
  });

  it('answers viewer null when signed out and UNAUTHENTICATED for a bad token', async () => {
    const anon = await ok(app, '{ viewer { user { id } } }');
    assert.equal(anon.viewer, null);
    const r = await gql(app, '{ viewer { user { id } } }', {}, { token: 'garbage' });
    assert.equal(r.errors?.[0].extensions?.code, 'UNAUTHENTICATED');
  });

  it('rotates refresh tokens and revokes the session when an old one is reused', async () => {
    const u = await signUp(app);
    const r1 = await ok(app, REFRESH, { t: u.refreshToken });
    assert.notEqual(r1.refreshSession.refreshToken, u.refreshToken);
    const r2 = await ok(app, REFRESH, { t: r1.refreshSession.refreshToken });
    // The new access token works.
    const me = await ok(app, '{ viewer { user { id } } }', {}, r2.refreshSession.accessToken);
    assert.equal(me.viewer.user.id, u.id);
    // Reusing a spent token revokes the session: the newest refresh and access tokens stop working.
    await fails(app, 'UNAUTHENTICATED', REFRESH, { t: u.refreshToken });
    await fails(app, 'UNAUTHENTICATED', REFRESH, { t: r2.refreshSession.refreshToken });
    await fails(app, 'UNAUTHENTICATED', '{ viewer { user { id } } }', {}, r2.refreshSession.accessToken);
  });

  // A socket lives as long as its access token (ACCESS_TOKEN_TTL, 15 min), then its client
  // refreshes and comes back: every user behind one address (an office, a campus, a carrier's
  // NAT) refreshes about once per 15 min, and all of them at once after an outage. At 60 a minute
  // per address, past ~900 such users some were refused and lost realtime until the next minute.
  it('refreshes from one address far past what a minute of one user needs', async () => {
    const u = await signUp(app);
    let token = u.refreshToken;
    for (let i = 0; i < 200; i++) {
      const r = await gql<{ refreshSession: { refreshToken: string } }>(
        app,
        REFRESH,
        { t: token },
        { ip: 'one-nat-for-many-users' },
      );
      assert.equal(r.errors, undefined, `refresh ${i + 1}: ${JSON.stringify(r.errors)}`);
      token = r.data?.refreshSession.refreshToken ?? '';
    }
  });

  it('logs out: the access token and refresh token stop working', async () => {
    const u = await signUp(app);
    assert.equal((await ok(app, 'mutation { logout }', {}, u.token)).logout, true);
    await fails(app, 'UNAUTHENTICATED', '{ viewer { user { id } } }', {}, u.token);
    await fails(app, 'UNAUTHENTICATED', REFRESH, { t: u.refreshToken });
    await fails(app, 'UNAUTHENTICATED', 'mutation { logout }');
  });

  it('lists sessions and revokes one', async () => {
    const u = await signUp(app);
    const second = await ok(app, LOGIN, {
      i: { login: u.username, password: 'correct horse battery', deviceName: 'phone' },
    });
    const s = await ok(app, '{ viewer { sessions { id deviceName current } } }', {}, u.token);
    assert.equal(s.viewer.sessions.length, 2);
    const phone = s.viewer.sessions.find((x: any) => x.deviceName === 'phone');
    assert.equal(phone.current, false);
    await ok(app, 'mutation($id: String!) { revokeSession(id: $id) }', { id: phone.id }, u.token);
    await fails(app, 'UNAUTHENTICATED', '{ viewer { user { id } } }', {}, second.login.accessToken);
    await fails(
      app,
      'NOT_FOUND',
      'mutation($id: String!) { revokeSession(id: $id) }',
      { id: phone.id },
      u.token,
    );
  });

  it('a password hash keeps its own cost: one made at the default N = 2^14 still logs in here (the suite hashes at 2^10)', async () => {
    const u = await signUp(app);
    const [before] = await app.deps.db.select().from(users).where(eq(users.username, u.username));
    assert.match(before.passwordHash, /^scrypt\$1024\$8\$1\$/);
    const stored = await hashPassword('another long password');
    assert.match(stored, /^scrypt\$16384\$8\$1\$/);
    await app.deps.db.update(users).set({ passwordHash: stored }).where(eq(users.username, u.username));
    await ok(app, LOGIN, { i: { login: u.username, password: 'another long password' } });
    await fails(app, 'UNAUTHENTICATED', LOGIN, {
      i: { login: u.username, password: 'correct horse battery' },
    });
  });
});
