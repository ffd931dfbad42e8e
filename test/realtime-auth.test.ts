/** Socket auth, cursor errors, revocation, typing. */
import assert from 'node:assert/strict';
import { after, before, it } from 'node:test';
import { pruneEvents } from '../core/realtime/log.ts';
import { createTestApp, gql, ok, signUp, type TestApp } from './helpers.ts';
import { connect, guildWithChannel, invite, send, subscribe } from './realtime-helpers.ts';

let app: TestApp;
let url: string;
before(async () => {
  app = await createTestApp({ rateLimits: false });
  url = `ws://127.0.0.1:${await app.start(0)}/graphql`;
});
after(() => app.destroy());

async function closeCode(token: string | undefined): Promise<number> {
  const c = connect(url, token);
  const s = subscribe(c.client);
  const deadline = Date.now() + 5000;
  while (!c.closed() && Date.now() < deadline) await new Promise((r) => setTimeout(r, 50));
  s.stop();
  await c.client.dispose();
  return c.closed()?.code ?? -1;
}

it('closes sockets whose connection_init carries a bad token with 4401', async () => {
  assert.equal(await closeCode('not-a-jwt'), 4401);
});

it('accepts an anonymous socket; its subscribe gets UNAUTHENTICATED unless it carries a token in extensions.headers (as GraphiQL sends it)', async () => {
  const u = await signUp(app);
  const { client, closed } = connect(url, undefined);
  const anon = subscribe(client);
  await assert.rejects(
    anon.until(() => false, 5000),
    /UNAUTHENTICATED|Unauthorized/,
  );
  assert.equal(closed(), undefined);
  const got: any[] = [];
  const failures: unknown[] = [];
  const stop = client.subscribe(
    {
      query: 'subscription { events { __typename ... on MessageCreated { message { content } } } }',
      extensions: { headers: { authorization: `Bearer ${u.token}` } },
    },
    { next: (v) => got.push(v), error: (e) => failures.push(e), complete: () => {} },
  );
  const { channelId } = await guildWithChannel(app, u.token);
  await new Promise((r) => setTimeout(r, 300));
  await send(app, u.token, channelId, 'via extensions');
  const deadline = Date.now() + 5000;
  while (!got.some((v) => v.data?.events?.message?.content === 'via extensions') && Date.now() < deadline)
    await new Promise((r) => setTimeout(r, 50));
  assert.deepEqual(failures, []);
  assert.ok(got.some((v) => v.data?.events?.message?.content === 'via extensions'));
  stop();
  await client.dispose();
});

it('refuses malformed cursors with BAD_USER_INPUT as a GraphQL error, socket kept', async () => {
  const u = await signUp(app);
  const { client } = connect(url, u.token);
  for (const bad of ['nope', Buffer.from('e1.x.1').toString('base64url'), 'a'.repeat(500)]) {
    const s = subscribe(client, bad);
    await assert.rejects(
      s.until(() => false, 5000),
      /BAD_USER_INPUT/,
    );
  }
  // The same socket still works.
  const s = subscribe(client);
  const { channelId } = await guildWithChannel(app, u.token);
  await new Promise((r) => setTimeout(r, 200));
  await send(app, u.token, channelId, 'still here');
  await s.until((e) => e.some((x) => x.message?.content === 'still here'));
  await client.dispose();
});

it('closes the sockets of a session that logs out (4403)', async () => {
  const u = await signUp(app);
  const c = connect(url, u.token);
  const s = subscribe(c.client);
  await new Promise((r) => setTimeout(r, 300));
  await ok(app, 'mutation { logout }', {}, u.token);
  const deadline = Date.now() + 15_000;
  while (!c.closed() && Date.now() < deadline) await new Promise((r) => setTimeout(r, 100));
  assert.equal(c.closed()?.code, 4403);
  s.stop();
  await c.client.dispose();
});

it('startTyping reaches other members only, with a null cursor, throttled, never replayed', async () => {
  const [a, b, stranger] = await Promise.all([signUp(app), signUp(app), signUp(app)]);
  const { guildId, channelId } = await guildWithChannel(app, a.token);
  await invite(app, a.token, guildId, b.token);
  const cb = connect(url, b.token);
  const cs = connect(url, stranger.token);
  const sb = subscribe(cb.client);
  const ss = subscribe(cs.client);
  await new Promise((r) => setTimeout(r, 300));
  const m = `mutation($c: ID!) { startTyping(channelId: $c) }`;
  assert.equal((await ok(app, m, { c: channelId }, a.token)).startTyping, true);
  assert.equal((await ok(app, m, { c: channelId }, a.token)).startTyping, true);
  await sb.until((e) => e.some((x) => x.__typename === 'TypingStarted'));
  await new Promise((r) => setTimeout(r, 300));
  const typing = sb.events.filter((x) => x.__typename === 'TypingStarted');
  assert.equal(typing.length, 1, 'throttled');
  assert.equal(typing[0].cursor, null);
  assert.equal(typing[0].user.id, a.id);
  assert.equal(ss.events.length, 0);
  const r = await gql(app, m, { c: channelId }, { token: stranger.token });
  assert.equal(r.errors?.[0].extensions?.code, 'NOT_FOUND');
  const r2 = await gql(app, m, { c: channelId });
  assert.equal(r2.errors?.[0].extensions?.code, 'UNAUTHENTICATED');
  // Replay from before: typing is not in the log.
  await send(app, a.token, channelId, 'x');
  await sb.until((e) => e.some((x) => x.__typename === 'MessageCreated'));
  const replay = subscribe(cb.client, sb.events.find((x) => x.cursor)?.cursor);
  await new Promise((r) => setTimeout(r, 300));
  assert.ok(replay.events.every((x) => x.__typename !== 'TypingStarted'));
  await cb.client.dispose();
  await cs.client.dispose();
});

it('refuses a cursor from before the retention watermark with CURSOR_EXPIRED', async () => {
  const u = await signUp(app);
  const { channelId } = await guildWithChannel(app, u.token);
  const { client } = connect(url, u.token);
  const s = subscribe(client);
  await new Promise((r) => setTimeout(r, 200));
  await send(app, u.token, channelId, 'old');
  await s.until((e) => e.length > 0);
  const old = s.events[0].cursor;
  s.stop();
  await send(app, u.token, channelId, 'newer');
  const pruned = await pruneEvents(app.deps.db, 7, new Date(Date.now() + 8 * 86_400_000));
  assert.ok(pruned >= 2);
  const r = subscribe(client, old);
  await assert.rejects(
    r.until(() => false, 5000),
    /CURSOR_EXPIRED/,
  );
  await client.dispose();
});
