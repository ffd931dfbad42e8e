/**
 * Sockets end with their session: logout, revokeSession and deactivateAccount close the
 * affected sockets at once (over the bus), not at the periodic session re-check; and a socket
 * is closed with 4401 when the access token it authenticated with expires.
 */
import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import { decodeAnyId } from '../schema/builder.ts';
import { createTestApp, ok, signUp, type TestApp, type TestUser } from './helpers.ts';
import {
  connect,
  guildWithChannel,
  type Stream,
  send,
  subscribe,
  throughMarker,
  untilLive,
} from './realtime-helpers.ts';

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
  const me = (await ok(app, '{ viewer { user { id } } }', {}, token)).viewer.user as { id: string };
  const live = app.deps.realtime!.liveCount(decodeAnyId(me.id).id);
  const c = connect(url, token);
  const s = subscribe(c.client);
  await untilLive(app, [me], live + 1);
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

/**
 * That `c` is still open after the signal that closed others: a message sent now (as `token`, in
 * a guild of its own) reaches `c`'s stream. The signal closes every socket it names as it is heard,
 * before the marker is even written; a socket it closed gets nothing more.
 */
async function stillOpen(c: { s: Stream; closed(): unknown }, token: string) {
  const { channelId } = await guildWithChannel(app, token);
  try {
    await throughMarker(app, token, channelId, [c.s]);
  } catch (err) {
    // A closed socket's stream ends in an error: that is the answer, not a failure to get one.
    if (c.closed() === undefined) throw err;
  }
  return c.closed() === undefined;
}

describe('ending a session closes its sockets at once', () => {
  it('logout closes that session only (4403)', async () => {
    const u = await signUp(app);
    const other = await login(u);
    const mine = await open(u.token);
    const theirs = await open(other);
    assert.equal((await ok(app, 'mutation { logout }', {}, u.token)).logout, true);
    assert.equal(await closedWithin(mine, AT_ONCE_MS), 4403);
    assert.ok(await stillOpen(theirs, other), 'the other session stays connected');
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
    assert.ok(await stillOpen(mine, u.token), 'the revoking session stays connected');
    const again = connect(url, other);
    subscribe(again.client);
    assert.equal(await closedWithin(again, 5000), 4403);
    await Promise.all([mine.client.dispose(), theirs.client.dispose(), again.client.dispose()]);
  });

  it("reusing a spent refresh token closes the revoked session's sockets at once (4403; up to 10 s before)", async () => {
    const u = await signUp(app);
    const first = await ok(
      app,
      `mutation($i: LoginInput!) { login(input: $i) { accessToken refreshToken } }`,
      { i: { login: u.username, password: 'correct horse battery', deviceName: 'stolen' } },
      undefined,
      `login-reuse-${u.username}`,
    );
    const refresh = `mutation($t: String!) { refreshSession(refreshToken: $t) { accessToken refreshToken } }`;
    const rotated = await ok(
      app,
      refresh,
      { t: first.login.refreshToken },
      undefined,
      `refresh-${u.username}`,
    );
    const theirs = await open(rotated.refreshSession.accessToken);
    const mine = await open(u.token);
    // The spent token comes back (a thief's copy): the session is revoked.
    const r = await app.fetch(
      '/graphql',
      {
        method: 'POST',
        headers: { 'content-type': 'application/json' },
        body: JSON.stringify({ query: refresh, variables: { t: first.login.refreshToken } }),
      },
      { ip: `refresh-again-${u.username}` },
    );
    const body = (await r.json()) as { errors?: { extensions: { code: string } }[] };
    assert.equal(body.errors?.[0].extensions.code, 'UNAUTHENTICATED');
    assert.equal(await closedWithin(theirs, AT_ONCE_MS), 4403);
    assert.ok(await stillOpen(mine, u.token), 'the other session stays connected');
    await Promise.all([mine.client.dispose(), theirs.client.dispose()]);
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
    assert.ok(await stillOpen(mine, u.token));
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
    assert.ok(await stillOpen(c, bystander.token));
    await Promise.all([a.client.dispose(), b.client.dispose(), c.client.dispose()]);
  });
});

describe('a socket does not outlive its access token', () => {
  let short: TestApp;
  let shortUrl: string;
  before(async () => {
    // Below the configurable minimum (30 s), for the test only.
    short = await createTestApp({ rateLimits: false, accessTokenTtl: 2 });
    shortUrl = `ws://127.0.0.1:${await short.start(0)}/graphql`;
  });
  after(() => short.destroy());

  it('closes with 4401 when the token expires; the refreshed token resumes by cursor', {
    timeout: 20_000,
  }, async () => {
    const u = await signUp(short);
    const issued = Date.now();
    const { channelId } = await guildWithChannel(short, u.token);
    const c = connect(shortUrl, u.token);
    const s = subscribe(c.client);
    await untilLive(short, [u]);
    await send(short, u.token, channelId, 'before expiry');
    await s.until((e) => e.some((x) => x.message?.content === 'before expiry'));
    const deadline = Date.now() + 6000;
    while (!c.closed() && Date.now() < deadline) await new Promise((r) => setTimeout(r, 50));
    assert.equal(c.closed()?.code, 4401);
    const lived = Date.now() - issued;
    // exp is in whole seconds from the issue time; the sweep runs every second.
    assert.ok(lived >= 1000 && lived < 4500, `closed after ${lived} ms`);
    await c.client.dispose();

    const r = await ok(short, `mutation($t: String!) { refreshSession(refreshToken: $t) { accessToken } }`, {
      t: u.refreshToken,
    });
    const fresh = r.refreshSession.accessToken as string;
    await send(short, fresh, channelId, 'while away');
    const c2 = connect(shortUrl, fresh);
    const s2 = subscribe(c2.client, s.events.at(-1).cursor);
    await s2.until((e) => e.some((x) => x.message?.content === 'while away'));
    assert.deepEqual(
      s2.events.map((x) => x.message?.content),
      ['while away'],
    );
    await c2.client.dispose();
  });

  it('refuses an already expired token at connection_init with 4401', { timeout: 20_000 }, async () => {
    const u = await signUp(short);
    await new Promise((r) => setTimeout(r, 3100));
    const c = connect(shortUrl, u.token);
    subscribe(c.client);
    const deadline = Date.now() + 5000;
    while (!c.closed() && Date.now() < deadline) await new Promise((r) => setTimeout(r, 50));
    assert.equal(c.closed()?.code, 4401);
    await c.client.dispose();
  });
});
