/**
 * A burst of access-changing rows in one guild (a channel deleted with thousands of threads, a
 * raid of joins committed together) must not cut off the instance's other subscribers, nor the
 * guild's own members, as slow consumers. Every subscriber judges every row of the log; such a
 * row made each of them forget its standing in that guild and load it again, one load per row in
 * log order, while the tailer kept handing it rows: past its bound (maxPending) it was closed 1013
 * and had to resume, a reconnect storm out of one moderator's action.
 */
import assert from 'node:assert/strict';
import { after, before, it } from 'node:test';
import { sql } from 'drizzle-orm';
import { decodeAnyId } from '../schema/builder.ts';
import { createTestApp, gql, signUp, type TestApp } from './helpers.ts';
import {
  connect,
  errorsLogged,
  guildWithChannel,
  invite,
  send,
  sleep,
  subscribe,
  untilLive,
} from './realtime-helpers.ts';

let app: TestApp;
let url: string;
before(async () => {
  app = await createTestApp({ rateLimits: false });
  url = `ws://127.0.0.1:${await app.start(0)}/graphql`;
});
after(() => app.destroy());

/** Rows a subscriber may have waiting, here (5,000 by default; 4 times that unchecked): a burst passes it 5 times. */
const BOUND = 1_500;
const BURST = 8_000;

const Q = `subscription { events { __typename cursor
  ... on MessageCreated { message { content } }
  ... on ChannelDeleted { channelId } } }`;

const has = (events: any[], content: string) => events.some((x) => x.message?.content === content);

/**
 * A guild with a member, and a bystander in a guild of its own, both subscribed (live); runs
 * `burst` against the guild, then checks both are still open and get what comes after.
 */
async function survives(burst: (g: { guildId: string; channelId: string; token: string }) => Promise<void>) {
  const hub = app.deps.realtime!;
  const owner = await signUp(app);
  const member = await signUp(app);
  const bystander = await signUp(app);
  const g = await guildWithChannel(app, owner.token);
  const side = await gql(
    app,
    `mutation($g: ID!) { createChannel(input: { guildId: $g, name: "side", type: TEXT }) { id } }`,
    { g: g.guildId },
    { token: owner.token },
  );
  const sideId = side.data.createChannel.id as string;
  await invite(app, owner.token, g.guildId, member.token);
  const elsewhere = await guildWithChannel(app, bystander.token);
  hub.configure({ maxPending: BOUND });
  const cm = connect(url, member.token);
  const cb = connect(url, bystander.token);
  const sm = subscribe(cm.client, null, Q);
  const sb = subscribe(cb.client, null, Q);
  try {
    await untilLive(app, [member, bystander]);
    await burst({ ...g, token: owner.token });
    await send(app, owner.token, sideId, 'after');
    await send(app, bystander.token, elsewhere.channelId, 'after');
    await sb.until((e) => has(e, 'after'), 60_000, 'bystander after');
    await sm.until((e) => has(e, 'after'), 60_000, 'member after');
    assert.equal(cb.closed(), undefined, 'the bystander was cut off');
    assert.equal(cm.closed(), undefined, 'the member was cut off');
    assert.deepEqual([...sb.errors, ...sm.errors], []);
    return { member: sm.events, bystander: sb.events };
  } finally {
    hub.configure({ maxPending: 5000 });
    sm.stop();
    sb.stop();
    await cm.client.dispose();
    await cb.client.dispose();
  }
}

it("a channel deleted with thousands of threads cuts off no subscriber: not another guild's, nor its own members", {
  timeout: 120_000,
}, async () => {
  const got = await survives(async ({ guildId, channelId, token }) => {
    await app.deps.db.execute(sql`insert into channels (id, guild_id, parent_id, type, name)
      select gen_random_uuid(), ${decodeAnyId(guildId).id}::uuid, ${decodeAnyId(channelId).id}::uuid,
        'THREAD', 't' || i from generate_series(1, ${BURST}) i`);
    const r = await gql(app, `mutation($id: ID!) { deleteChannel(id: $id) }`, { id: channelId }, { token });
    assert.deepEqual(r.errors, undefined);
  });
  // The member could see the channel and its threads: told of each deletion, once.
  assert.equal(got.member.filter((e) => e.__typename === 'ChannelDeleted').length, BURST + 1);
  assert.equal(got.bystander.filter((e) => e.__typename === 'ChannelDeleted').length, 0);
});

it("a raid of joins committed together cuts off no subscriber: not another guild's, nor the guild's members", {
  timeout: 120_000,
}, async () => {
  await survives(async ({ guildId }) => {
    const g = decodeAnyId(guildId).id;
    // Joins as joinGuild writes them (a member row and a MEMBER_JOINED each), committed at once
    // as another instance's many joins reach this one's tailer in one read.
    await app.deps.db.transaction(async (tx) => {
      await tx.execute(sql`insert into users (id, username, email, password_hash)
        select gen_random_uuid(), 'raid' || i || '_' || ${g.slice(0, 8)}, 'raid' || i || '_' || ${g.slice(0, 8)} || '@test', 'x'
        from generate_series(1, ${BURST}) i`);
      await tx.execute(sql`insert into members (guild_id, user_id)
        select ${g}::uuid, id from users where username like 'raid%\\_' || ${g.slice(0, 8)}`);
      await tx.execute(sql`insert into events (type, guild_id, payload)
        select 'MEMBER_JOINED', ${g}::uuid, jsonb_build_object('userId', user_id::text)
        from members where guild_id = ${g}::uuid order by joined_at, user_id`);
    });
  });
});

it('a socket cut off as a slow consumer is closed 1013 with no error before it, and logs no server error', {
  timeout: 60_000,
}, async () => {
  const hub = app.deps.realtime!;
  const u = await signUp(app);
  const { channelId } = await guildWithChannel(app, u.token);
  // A message in a channel the subscriber has not seen yet: its rows wait for a permission load.
  const id = await send(app, u.token, channelId, 'one');
  // Past 2 rows waiting (here, for their execution), a subscriber is cut off.
  hub.configure({ maxPending: 2 });
  const c = connect(url, u.token);
  const s = subscribe(c.client, null, Q);
  try {
    await untilLive(app, [u]);
    const { logged } = await errorsLogged(app, async () => {
      await app.deps.db.execute(sql`insert into events (type, guild_id, channel_id, payload)
        select 'MESSAGE_CREATED', m.guild_id, m.channel_id, jsonb_build_object('messageId', m.id::text)
        from messages m, generate_series(1, 50) where m.id = ${decodeAnyId(id).id}::uuid`);
      await hub.poke();
      for (let i = 0; i < 100 && !c.closed(); i++) await sleep(50);
    });
    assert.deepEqual(c.closed(), { code: 1013, reason: 'Slow consumer: resume from your last cursor' });
    // Before: an INTERNAL_SERVER_ERROR frame went first, and "unexpected error" was logged with
    // its stack for every socket cut off (a restart storm's worth of server errors).
    assert.deepEqual(
      logged.map((l) => l.msg),
      [],
    );
    // What the client heard: the close only, no error result ahead of it.
    assert.deepEqual(
      s.errors.map((e) => e.code ?? e.extensions?.code),
      [1013],
    );
  } finally {
    hub.configure({ maxPending: 5000 });
    s.stop();
    await c.client.dispose();
  }
});
