import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import { createTestApp, fails, ok, signUp, type TestApp } from './helpers.ts';

let app: TestApp;
before(async () => {
  app = await createTestApp();
});
after(() => app.destroy());

const UPDATE = `mutation($i: UpdateProfileInput!) { updateProfile(input: $i) { id displayName bio avatarUrl } }`;
const RENAME = `mutation($u: String!) { changeUsername(username: $u) { id username } }`;
const DEACTIVATE = `mutation($p: String!) { deactivateAccount(password: $p) }`;
const SEARCH = `query($p: String!, $n: Int) { searchUsers(prefix: $p, first: $n) { id username } }`;
const LOGIN = `mutation($i: LoginInput!) { login(input: $i) { accessToken } }`;
const ME = '{ viewer { user { id username displayName bio avatarUrl } } }';

describe('updateProfile', () => {
  it('sets, keeps omitted fields, trims, and clears with null', async () => {
    const u = await signUp(app);
    const a = await ok(
      app,
      UPDATE,
      { i: { displayName: '  Ada  ', bio: 'hello', avatarUrl: 'https://x.test/a.png' } },
      u.token,
    );
    assert.deepEqual(
      { ...a.updateProfile, id: undefined },
      { id: undefined, displayName: 'Ada', bio: 'hello', avatarUrl: 'https://x.test/a.png' },
    );
    const b = await ok(app, UPDATE, { i: { bio: 'changed' } }, u.token);
    assert.equal(b.updateProfile.displayName, 'Ada');
    assert.equal(b.updateProfile.bio, 'changed');
    assert.equal(b.updateProfile.avatarUrl, 'https://x.test/a.png');
    const c = await ok(app, UPDATE, { i: { displayName: null, bio: null, avatarUrl: null } }, u.token);
    assert.deepEqual(
      [c.updateProfile.displayName, c.updateProfile.bio, c.updateProfile.avatarUrl],
      [null, null, null],
    );
    const me = await ok(app, ME, {}, u.token);
    assert.equal(me.viewer.user.displayName, null);
  });

  it('accepts every limit exactly at its boundary', async () => {
    const u = await signUp(app);
    const url = `http://x.test/${'a'.repeat(2048 - 'http://x.test/'.length)}`;
    assert.equal(url.length, 2048);
    const r = await ok(
      app,
      UPDATE,
      { i: { displayName: 'd'.repeat(32), bio: 'b'.repeat(190), avatarUrl: url } },
      u.token,
    );
    assert.equal(r.updateProfile.displayName.length, 32);
    assert.equal(r.updateProfile.bio.length, 190);
    assert.equal(r.updateProfile.avatarUrl, url);
    const one = await ok(app, UPDATE, { i: { displayName: 'x' } }, u.token);
    assert.equal(one.updateProfile.displayName, 'x');
    const empty = await ok(app, UPDATE, { i: { bio: '   ' } }, u.token);
    assert.equal(empty.updateProfile.bio, null);
  });

  it('refuses values past each limit with BAD_USER_INPUT and changes nothing', async () => {
    const u = await signUp(app);
    await ok(app, UPDATE, { i: { displayName: 'Keep', bio: 'keep', avatarUrl: 'http://k.test/' } }, u.token);
    const bad = [
      { displayName: 'd'.repeat(33) },
      { displayName: '' },
      { displayName: '    ' },
      { bio: 'b'.repeat(191) },
      { avatarUrl: `https://x.test/${'a'.repeat(2048)}` },
      { avatarUrl: 'ftp://x.test/a.png' },
      { avatarUrl: 'javascript:alert(1)' },
      { avatarUrl: 'not a url' },
      { avatarUrl: '' },
      // One bad field spoils the whole update.
      { displayName: 'Fine', bio: 'b'.repeat(191) },
    ];
    for (const i of bad) {
      const e = await fails(app, 'BAD_USER_INPUT', UPDATE, { i }, u.token);
      assert.ok(e.message.length > 0);
    }
    const me = await ok(app, ME, {}, u.token);
    assert.equal(me.viewer.user.displayName, 'Keep');
    assert.equal(me.viewer.user.bio, 'keep');
    assert.equal(me.viewer.user.avatarUrl, 'http://k.test/');
  });

  it('needs a signed-in user', async () => {
    await fails(app, 'UNAUTHENTICATED', UPDATE, { i: { bio: 'x' } });
  });
});

describe('changeUsername', () => {
  it('renames, including a case-only change of one’s own name', async () => {
    const u = await signUp(app, 'renamer');
    const r = await ok(app, RENAME, { u: '  Renamed.One  ' }, u.token);
    assert.equal(r.changeUsername.username, 'Renamed.One');
    const c = await ok(app, RENAME, { u: 'renamed.one' }, u.token);
    assert.equal(c.changeUsername.username, 'renamed.one');
    await ok(app, LOGIN, { i: { login: 'RENAMED.ONE', password: 'correct horse battery' } });
    await fails(app, 'UNAUTHENTICATED', LOGIN, {
      i: { login: 'renamer', password: 'correct horse battery' },
    });
  });

  it('refuses a name taken by someone else, in any case, with CONFLICT', async () => {
    await signUp(app, 'TakenName');
    const u = await signUp(app);
    await fails(app, 'CONFLICT', RENAME, { u: 'takenname' }, u.token);
    await fails(app, 'CONFLICT', RENAME, { u: 'TAKENNAME' }, u.token);
    const me = await ok(app, ME, {}, u.token);
    assert.equal(me.viewer.user.username, u.username);
  });

  it('validates like register with BAD_USER_INPUT', async () => {
    const u = await signUp(app);
    for (const name of ['a', 'x'.repeat(33), 'bad name', '.dot', 'dot.', 'two..dots', 'émoji', '']) {
      await fails(app, 'BAD_USER_INPUT', RENAME, { u: name }, u.token);
    }
    const ok32 = await ok(app, RENAME, { u: `z${'9'.repeat(31)}` }, u.token);
    assert.equal(ok32.changeUsername.username.length, 32);
    await ok(app, RENAME, { u: 'ab' }, u.token);
    await fails(app, 'UNAUTHENTICATED', RENAME, { u: 'whatever' });
  });
});

describe('deactivateAccount', () => {
  it('refuses a wrong password with FORBIDDEN and leaves the account working', async () => {
    const u = await signUp(app);
    await fails(app, 'FORBIDDEN', DEACTIVATE, { p: 'wrong password!' }, u.token);
    await ok(app, ME, {}, u.token);
    await ok(app, LOGIN, { i: { login: u.username, password: 'correct horse battery' } });
    await fails(app, 'UNAUTHENTICATED', DEACTIVATE, { p: 'correct horse battery' });
  });

  it('revokes sessions, refuses login, hides from search and user(id), shows deactivated', async () => {
    const friend = await signUp(app);
    const u = await signUp(app, 'goner_one');
    const other = await ok(app, LOGIN, { i: { login: u.username, password: 'correct horse battery' } });
    await ok(
      app,
      'mutation($id: ID!) { sendFriendRequest(userId: $id) { kind } }',
      { id: u.id },
      friend.token,
    );
    await ok(
      app,
      'mutation($id: ID!) { acceptFriendRequest(userId: $id) { kind } }',
      { id: friend.id },
      u.token,
    );
    assert.equal((await ok(app, SEARCH, { p: 'goner_' }, friend.token)).searchUsers.length, 1);

    const r = await ok(app, DEACTIVATE, { p: 'correct horse battery' }, u.token);
    assert.equal(r.deactivateAccount, true);
    await fails(app, 'UNAUTHENTICATED', ME, {}, u.token);
    await fails(app, 'UNAUTHENTICATED', ME, {}, other.login.accessToken);
    await fails(
      app,
      'UNAUTHENTICATED',
      'mutation($t: String!) { refreshSession(refreshToken: $t) { accessToken } }',
      {
        t: u.refreshToken,
      },
    );
    await fails(app, 'UNAUTHENTICATED', LOGIN, {
      i: { login: u.username, password: 'correct horse battery' },
    });
    assert.equal((await ok(app, SEARCH, { p: 'goner_' }, friend.token)).searchUsers.length, 0);
    await fails(app, 'NOT_FOUND', 'query($id: ID!) { user(id: $id) { id } }', { id: u.id }, friend.token);
    const rel = await ok(
      app,
      '{ viewer { relationships { kind user { id deactivated } } } }',
      {},
      friend.token,
    );
    assert.deepEqual(rel.viewer.relationships, [{ kind: 'FRIEND', user: { id: u.id, deactivated: true } }]);
    // The name stays taken: the account still exists.
    await fails(app, 'CONFLICT', RENAME, { u: 'GONER_ONE' }, friend.token);
  });
});

describe('searchUsers', () => {
  it('matches a case-insensitive prefix in username order, treating _ and % literally', async () => {
    const t = await signUp(app, 'Srch_Beta');
    await signUp(app, 'srch_alpha');
    await signUp(app, 'SRCHxgamma');
    await signUp(app, 'nosrch_delta');
    const names = async (p: string) =>
      (await ok(app, SEARCH, { p }, t.token)).searchUsers.map((x: any) => x.username);
    assert.deepEqual(await names('SRCH'), ['srch_alpha', 'Srch_Beta', 'SRCHxgamma']);
    assert.deepEqual(await names('srch_'), ['srch_alpha', 'Srch_Beta']);
    assert.deepEqual(await names('srch_b'), ['Srch_Beta']);
    assert.deepEqual(await names('srch%'), []);
    assert.deepEqual(await names('zzzz'), []);
  });

  it('defaults to 10, honours first, caps at 25', async () => {
    const t = await signUp(app);
    for (let i = 0; i < 27; i++) await signUp(app, `many${String(i).padStart(2, '0')}`);
    const count = async (n?: number) => (await ok(app, SEARCH, { p: 'many', n }, t.token)).searchUsers.length;
    assert.equal(await count(), 10);
    assert.equal(await count(1), 1);
    assert.equal(await count(25), 25);
    assert.equal(await count(100), 25);
  });

  it('hides users who blocked the viewer, but not users the viewer blocked', async () => {
    const viewer = await signUp(app);
    const blocker = await signUp(app, 'hideme_blocker');
    const blocked = await signUp(app, 'hideme_blocked');
    await ok(app, 'mutation($id: ID!) { blockUser(userId: $id) { kind } }', { id: viewer.id }, blocker.token);
    await ok(app, 'mutation($id: ID!) { blockUser(userId: $id) { kind } }', { id: blocked.id }, viewer.token);
    const r = await ok(app, SEARCH, { p: 'hideme_' }, viewer.token);
    assert.deepEqual(
      r.searchUsers.map((x: any) => x.username),
      ['hideme_blocked'],
    );
    // Others still find the blocker.
    const other = await signUp(app);
    assert.equal((await ok(app, SEARCH, { p: 'hideme_' }, other.token)).searchUsers.length, 2);
  });

  it('refuses bad prefixes and counts with BAD_USER_INPUT, strangers with UNAUTHENTICATED', async () => {
    const t = await signUp(app);
    await ok(app, SEARCH, { p: 'x'.repeat(32) }, t.token);
    await ok(app, SEARCH, { p: 'x' }, t.token);
    await fails(app, 'BAD_USER_INPUT', SEARCH, { p: '' }, t.token);
    await fails(app, 'BAD_USER_INPUT', SEARCH, { p: 'x'.repeat(33) }, t.token);
    await fails(app, 'BAD_USER_INPUT', SEARCH, { p: 'x', n: 0 }, t.token);
    await fails(app, 'BAD_USER_INPUT', SEARCH, { p: 'x', n: -1 }, t.token);
    await fails(app, 'UNAUTHENTICATED', SEARCH, { p: 'x' });
  });

  it('uses the lower(username) prefix index', async () => {
    // Postgres prefers a sequential scan on a tiny table; forbid it to see that the index applies.
    const { sql } = await import('drizzle-orm');
    const plan = await app.deps.db.transaction(async (tx) => {
      await tx.execute(sql`set local enable_seqscan = off`);
      const r = await tx.execute(
        sql`explain select id from users where lower(username) like 'many0%' escape '\\' order by lower(username) limit 25`,
      );
      return JSON.stringify((r as unknown as { rows: unknown[] }).rows);
    });
    // Either index on lower(username) bounds the scan to the prefix: the text_pattern_ops one
    // (~>=~) in any collation, the unique one (>=) where the collation is C, as here; with equal
    // costs the planner's pick between them moves with the table's definition.
    assert.match(plan, /(Index Scan using|Bitmap Index Scan on) users_username_(prefix|lower)\b/);
    assert.match(plan, /lower\(username\) (~>=~|>=) 'many0'/);
  });
});
