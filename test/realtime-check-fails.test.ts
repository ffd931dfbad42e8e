/**
 * A logged event whose access check fails at delivery for a reason of the server's closes its
 * subscribers to resume from before it (1013 on a socket, a resume item over SSE). When the check
 * fails for that one row every time while the database answers (here: its guild has two rows,
 * the primary key lost, as a restore that did not get to its constraints leaves it, and the
 * check's "who owns this guild" fails on it), resuming cannot get past it: after a few rounds the
 * row is skipped (never delivered: who may see it cannot be told) and the stream goes on. When
 * every check fails (a table of the check away), nothing is skipped, however many rounds.
 */
import assert from 'node:assert/strict';
import { after, before, it } from 'node:test';
import { sql } from 'drizzle-orm';
import { decodeAnyId } from '../schema/builder.ts';
import { createTestApp, signUp, type TestApp } from './helpers.ts';
import {
  connect,
  errorsLogged,
  guildWithChannel,
  invite,
  send,
  sseStream,
  subscribe,
  untilLive,
} from './realtime-helpers.ts';

let app: TestApp;
let wsUrl: string;
let httpUrl: string;
before(async () => {
  app = await createTestApp({ rateLimits: false });
  const port = await app.start(0);
  wsUrl = `ws://127.0.0.1:${port}/graphql`;
  httpUrl = `http://127.0.0.1:${port}/graphql`;
});
after(() => app.destroy());

const RESUME = 'An event could not be delivered: resume from your last cursor.';
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
const raw = (globalId: string) => decodeAnyId(globalId).id;
const contents = (events: any[]) =>
  events.filter((e) => e.__typename === 'MessageCreated').map((e) => e.message.content as string);

/**
 * Gives guild `guildId` a second row (its primary key dropped first): every access check in it
 * then fails in Postgres ("more than one row returned by a subquery"), every other check works.
 */
async function duplicateGuild(guildId: string) {
  await app.deps.db.execute(sql`alter table guilds drop constraint if exists guilds_pkey cascade`);
  await app.deps.db.execute(sql`insert into guilds select * from guilds where id = ${guildId}::uuid`);
}

/** A MESSAGE_DELETED row in `channelId` (whose check is the viewer's access to the channel). */
async function deletionRow(guildId: string, channelId: string) {
  await app.deps.db.execute(sql`insert into events (type, guild_id, channel_id, payload)
    values ('MESSAGE_DELETED', ${guildId}::uuid, ${channelId}::uuid,
      jsonb_build_object('messageId', gen_random_uuid()::text, 'channelId', ${channelId}::text))`);
}

/**
 * Socket rounds from `last`, a second or more apart (clients resume so), until one gets `want` or
 * `max` rounds are over: each round's close code (undefined: it got `want`) and what came.
 */
async function socketRounds(token: string, last: string, want: string, max: number) {
  const codes: (number | undefined)[] = [];
  const got: string[] = [];
  for (let i = 0; i < max && !got.includes(want); i++) {
    await sleep(1_100);
    const c = connect(wsUrl, token);
    const s = subscribe(c.client, last);
    const deadline = Date.now() + 5000;
    const has = () => contents(s.events).includes(want);
    while (!c.closed() && !has() && Date.now() < deadline) await sleep(50);
    codes.push(has() ? undefined : c.closed()?.code);
    got.push(...s.events.map((e) => e.message?.content ?? e.__typename));
    s.stop();
    await c.client.dispose();
  }
  return { codes, got };
}

it('a row whose check fails every time closes the socket (1013) for a few rounds, then is skipped and the stream goes on', {
  timeout: 60_000,
}, async () => {
  const u = await signUp(app);
  const bad = await guildWithChannel(app, u.token);
  const good = await guildWithChannel(app, u.token);
  const c = connect(wsUrl, u.token);
  const s = subscribe(c.client);
  await untilLive(app, [u]);
  await send(app, u.token, good.channelId, 'one');
  await s.until((e) => contents(e).includes('one'));
  const last = s.events.find((e) => e.message?.content === 'one').cursor as string;
  await duplicateGuild(raw(bad.guildId));
  await deletionRow(raw(bad.guildId), raw(bad.channelId));
  await send(app, u.token, good.channelId, 'two');
  await app.deps.realtime!.poke();
  const { result, logged } = await errorsLogged(app, async () => {
    const deadline = Date.now() + 5000;
    while (!c.closed() && Date.now() < deadline) await sleep(50);
    const live = c.closed()?.code;
    const reason = c.closed()?.reason;
    await c.client.dispose();
    return { live, reason, ...(await socketRounds(u.token, last, 'two', 5)) };
  });
  assert.equal(result.reason, 'An event could not be delivered: resume from your last cursor');
  // Live, then a resume: closed both times; at the third round the row is skipped.
  assert.deepEqual([result.live, ...result.codes], [1013, 1013, undefined], JSON.stringify(result));
  assert.deepEqual(result.got, ['two'], 'the row is never delivered; what follows it is');
  const skips = logged.filter((l) => l.msg?.includes('skipped'));
  assert.equal(skips.length, 1, `logged once at error level: ${JSON.stringify(logged)}`);
  assert.equal(typeof skips[0].obj.cursor, 'string');
});

it('over SSE, a row whose check fails every time ends the stream for a few rounds, then is skipped and the stream goes on', {
  timeout: 60_000,
}, async () => {
  const u = await signUp(app);
  const bad = await guildWithChannel(app, u.token);
  const good = await guildWithChannel(app, u.token);
  const s = sseStream(httpUrl, u.token);
  await untilLive(app, [u]);
  await send(app, u.token, good.channelId, 'one');
  await s.until((x) => contents(x.events).includes('one'), 'one');
  const last = s.events.find((e) => e.message?.content === 'one').cursor as string;
  await duplicateGuild(raw(bad.guildId));
  await deletionRow(raw(bad.guildId), raw(bad.channelId));
  await send(app, u.token, good.channelId, 'two');
  await app.deps.realtime!.poke();
  const hasTwo = (x: typeof s) => contents(x.events).includes('two');
  const { result: rounds } = await errorsLogged(app, async () => {
    /** per round: 'resume' (the stream ended so) or what it got */
    const rounds: string[][] = [];
    await s.until((x) => x.ended || hasTwo(x), 'the live stream to end', 5000);
    rounds.push(s.errors.at(-1)?.message === RESUME ? ['resume'] : contents(s.events).slice(1));
    s.stop();
    for (let i = 0; i < 5 && rounds.at(-1)?.[0] === 'resume'; i++) {
      await sleep(1_100);
      const si = sseStream(httpUrl, u.token, { cursor: last });
      await si.until((x) => x.ended || hasTwo(x), 'the stream to end or two', 5000);
      rounds.push(
        si.errors.at(-1)?.message === RESUME
          ? ['resume']
          : si.events.map((e) => e.message?.content ?? e.__typename),
      );
      si.stop();
    }
    return rounds;
  });
  assert.deepEqual(rounds, [['resume'], ['resume'], ['two']]);
});

it('when every check fails (a table of the check away) nothing is skipped, however many rounds: the row comes once it is back', {
  timeout: 60_000,
}, async () => {
  const u = await signUp(app);
  const { guildId, channelId } = await guildWithChannel(app, u.token);
  const c = connect(wsUrl, u.token);
  const s = subscribe(c.client);
  await untilLive(app, [u]);
  await send(app, u.token, channelId, 'one');
  await s.until((e) => contents(e).includes('one'));
  const last = s.events.find((e) => e.message?.content === 'one').cursor as string;
  s.stop();
  await c.client.dispose();
  // Past the access cache's life: the checks load from the database, and fail.
  await sleep(1_200);
  await app.deps.db.execute(sql`alter table permission_overwrites rename to permission_overwrites_away`);
  let rounds: Awaited<ReturnType<typeof socketRounds>>;
  try {
    await deletionRow(raw(guildId), raw(channelId));
    ({ result: rounds } = await errorsLogged(app, () => socketRounds(u.token, last, 'never', 5)));
  } finally {
    await app.deps.db.execute(sql`alter table permission_overwrites_away rename to permission_overwrites`);
  }
  assert.deepEqual(rounds.codes, [1013, 1013, 1013, 1013, 1013], JSON.stringify(rounds));
  assert.deepEqual(rounds.got, []);
  const c2 = connect(wsUrl, u.token);
  const s2 = subscribe(c2.client, last);
  try {
    await s2.until((e) => e.some((x) => x.__typename === 'MessageDeleted'), 10_000, 'the row, not skipped');
  } finally {
    s2.stop();
    await c2.client.dispose();
  }
});

it('an ephemeral event (presence) whose execution fails (a table away) is dropped, not sent as an error frame the client can do nothing with; the stream goes on', async () => {
  const [u, v] = await Promise.all([signUp(app), signUp(app)]);
  const { guildId, channelId } = await guildWithChannel(app, u.token);
  await invite(app, u.token, guildId, v.token);
  const q = `subscription { events { __typename cursor
    ... on MessageCreated { message { content } }
    ... on PresenceChanged { user { id } status } } }`;
  const c = connect(wsUrl, u.token);
  const s = subscribe(c.client, null, q);
  const logged: string[] = [];
  const error = app.log.error;
  app.log.error = ((_obj: unknown, msg?: string) => {
    logged.push(String(msg));
  }) as typeof app.log.error;
  try {
    await untilLive(app, [u]);
    // v's presence resolves its user (PresenceChanged.user) while the users table is away, as a
    // statement fails while the database is: an error frame before, dropped (and logged) now.
    await app.deps.db.execute(sql`alter table users rename to users_away`);
    try {
      await app.deps.bus.signal('presence', { userId: raw(v.id), status: 'DND' });
      const deadline = Date.now() + 15_000;
      while (!s.errors.length && !logged.some((m) => m.includes('dropped')) && Date.now() < deadline)
        await sleep(20);
    } finally {
      await app.deps.db.execute(sql`alter table users_away rename to users`);
    }
    await send(app, u.token, channelId, 'after');
    await s.until((e) => contents(e).includes('after'), 10_000);
    assert.deepEqual(s.errors, [], 'no error frame on the stream');
    assert.equal(c.closed(), undefined, 'the socket stays open');
    assert.ok(
      logged.some((m) => m.includes('dropped')),
      `logged: ${JSON.stringify(logged)}`,
    );
  } finally {
    app.log.error = error;
    s.stop();
    await c.client.dispose();
  }
});
