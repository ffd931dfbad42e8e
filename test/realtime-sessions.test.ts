/**
 * Sockets end with their session: logout, revokeSession and deactivateAccount close the
 * affected sockets at once (over the bus), not at the periodic session re-check; and a socket
 * is closed with 4401 when the access token it authenticated with expires.
 */
import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import { createTestApp, ok, signUp, type TestApp, type TestUser } from './helpers.ts';
import { connect, subscribe } from './realtime-helpers.ts';

let app: TestApp;
let url: string;
before(async () => {
  app = await createTestApp({ rateLimits: false });
  url = `ws://127.0.0.1:${await app.start(0)}/graphql`;
});
after(() => app.destroy());

async function login(u: TestUser): Promise<string> {
  const r = await ok(
    app,
    `mutation($i: LoginInput!) { login(input: $i) { accessToken } }`,
    { i: { login: u.username, password: 'correct horse battery', deviceName: 'second' } },
    undefined,
    `login-${u.username}`,
  );
  return r.login.accessToken;
}

/** An open, subscribed socket: resolves once the server has registered the subscription. */
async function open(token: string) {
  const c = connect(url, token);
  const s = subscribe(c.client);
  await new Promise((r) => setTimeout(r, 300));
  assert.equal(c.closed(), undefined);
  return { ...c, s };
}

async function closedWithin(c: { closed(): { code: number } | undefined }, ms: number) {
  const deadline = Date.now() + ms;
  while (!c.closed() && Date.now() < deadline) await new Promise((r) => setTimeout(r, 20));
  return c.closed()?.code;
}

// The periodic re-check runs every 10 s: closing within a second shows the bus signal did it.
const AT_ONCE_MS = 1500;

describe('ending a session closes its sockets at once', () => {
  it('logout closes that session only (4403)', async () => {
    const u = await signUp(app);
    const other = await login(u);
    const mine = await open(u.token);
    const theirs = await open(other);
    assert.equal((await ok(app, 'mutation { logout }', {}, u.token)).logout, true);
    assert.equal(await closedWithin(mine, AT_ONCE_MS), 4403);
    await new Promise((r) => setTimeout(r, 300));
    assert.equal(theirs.closed(), undefined, 'the other session stays connected');
    await mine.client.dispose();
    await theirs.client.dispose();
  });

  it('revokeSession closes the revoked session only, and the token is refused after', async () => {
    const u = await signUp(app);
    const other = await login(u);
    const mine = await open(u.token);
    const theirs = await open(other);
    const list = await ok(app, '{ viewer { sessions { id current } } }', {}, u.token);
    const target = list.viewer.sessions.find((s: { current: boolean }) => !s.current).id;
    const r = await ok(app, 'mutation($id: String!) { revokeSession(id: $id) }', { id: target }, u.token);
    assert.equal(r.revokeSession, true);
    assert.equal(await closedWithin(theirs, AT_ONCE_MS), 4403);
    await new Promise((r) => setTimeout(r, 300));
    assert.equal(mine.closed(), undefined, 'the revoking session stays connected');
    const again = connect(url, other);
    subscribe(again.client);
    assert.equal(await closedWithin(again, 5000), 4403);
    await Promise.all([mine.client.dispose(), theirs.client.dispose(), again.client.dispose()]);
  });

  it('a failed revokeSession closes nothing', async () => {
    const u = await signUp(app);
    const mine = await open(u.token);
    const r = await app.fetch(
      '/graphql',
      {
        method: 'POST',
        headers: { 'content-type': 'application/json', authorization: `Bearer ${u.token}` },
        body: JSON.stringify({
          query: 'mutation { revokeSession(id: "0190a0a0-0000-7000-8000-000000000000") }',
        }),
      },
      { ip: 'revoke-miss' },
    );
    const body = (await r.json()) as { errors?: { extensions: { code: string } }[] };
    assert.equal(body.errors?.[0].extensions.code, 'NOT_FOUND');
    await new Promise((r) => setTimeout(r, 500));
    assert.equal(mine.closed(), undefined);
    await mine.client.dispose();
  });

  it('deactivateAccount closes every socket of the user, and nobody else', async () => {
    const [u, bystander] = await Promise.all([signUp(app), signUp(app)]);
    const other = await login(u);
    const a = await open(u.token);
    const b = await open(other);
    const c = await open(bystander.token);
    const m = 'mutation($p: String!) { deactivateAccount(password: $p) }';
    assert.equal((await ok(app, m, { p: 'correct horse battery' }, u.token)).deactivateAccount, true);
    assert.equal(await closedWithin(a, AT_ONCE_MS), 4403);
    assert.equal(await closedWithin(b, AT_ONCE_MS), 4403);
    await new Promise((r) => setTimeout(r, 300));
    assert.equal(c.closed(), undefined);
    await Promise.all([a.client.dispose(), b.client.dispose(), c.client.dispose()]);
  });
});
