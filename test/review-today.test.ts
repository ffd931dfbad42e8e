/**
 * Review of today's changes (fc45f3c..): defects shown with real components (PGlite or Postgres,
 * real sockets, the real hub).
 */
import assert from 'node:assert/strict';
import { after, before, it } from 'node:test';
import { sql } from 'drizzle-orm';
import type { Hub } from '../core/realtime/hub.ts';
import type { Delivered, Subscription } from '../core/realtime/subscription.ts';
import { decodeAnyId } from '../schema/builder.ts';
import { createTestApp, fails, ok, signUp, type TestApp, type TestUser } from './helpers.ts';
import { connect, guildWithChannel, invite, send, subscribe } from './realtime-helpers.ts';

let app: TestApp;
let url: string;
before(async () => {
  app = await createTestApp({ rateLimits: false });
  url = `ws://127.0.0.1:${await app.start(0)}/graphql`;
});
after(() => app.destroy());

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
const within = <T>(p: Promise<T>, ms: number) => Promise.race([p, sleep(ms).then(() => 'timeout' as const)]);

async function everyoneRole(token: string, guildId: string): Promise<string> {
  const r = await ok(app, `query($g: ID!) { guild(id: $g) { roles { id isEveryone } } }`, { g: guildId }, token);
  return (r.guild.roles as { id: string; isEveryone: boolean }[]).find((x) => x.isEveryone)!.id;
}

async function overwrite(token: string, i: Record<string, unknown>) {
  await ok(
    app,
    `mutation($i: SetChannelOverwriteInput!) { setChannelOverwrite(input: $i) { targetId } }`,
    { i },
    token,
  );
}

async function createChannel(token: string, guildId: string, name: string, type = 'TEXT', parentId?: string) {
  const r = await ok(
    app,
    `mutation($g: ID!, $n: String!, $t: ChannelType!, $p: ID) { createChannel(input: { guildId: $g, name: $n, type: $t, parentId: $p }) { id } }`,
    { g: guildId, n: name, t: type, p: parentId ?? null },
    token,
  );
  return r.createChannel.id as string;
}

const Q = `subscription($after: String) { events(after: $after) { __typename cursor
  ... on MessageCreated { message { content } }
  ... on PermissionsChanged { channelId }
  ... on ChannelDeleted { deletedId: channelId }
} }`;
const contents = (events: any[]) =>
  events.filter((e) => e.__typename === 'MessageCreated').map((e) => e.message.content as string);

it('deleting a category tells no member about a channel of it that stays hidden from that member (no PermissionsChanged naming it), live or in replay', async () => {
  const [o, blind] = await Promise.all([signUp(app), signUp(app)]);
  const { guildId, channelId: general } = await guildWithChannel(app, o.token);
  await invite(app, o.token, guildId, blind.token);
  const cat = await createChannel(o.token, guildId, 'staff', 'CATEGORY');
  await overwrite(o.token, {
    channelId: cat,
    targetType: 'ROLE',
    targetId: await everyoneRole(o.token, guildId),
    allow: [],
    deny: ['VIEW_CHANNEL'],
  });
  const hidden = await createChannel(o.token, guildId, 'hidden', 'TEXT', cat);
  const bc = connect(url, blind.token);
  try {
    const live = subscribe(bc.client, null, Q);
    await sleep(500);
    await send(app, o.token, general, 'cursor');
    await live.until((e) => contents(e).includes('cursor'), 10_000, 'cursor');
    const cursor = live.events.at(-1).cursor as string;
    await ok(app, `mutation($c: ID!) { deleteChannel(id: $c) }`, { c: cat }, o.token);
    await send(app, o.token, general, 'end');
    await live.until((e) => contents(e).includes('end'), 10_000, 'end (live)');
    const replay = subscribe(bc.client, cursor, Q);
    await replay.until((e) => contents(e).includes('end'), 10_000, 'end (replay)');
    // The channel is still hidden from `blind` (the category's overwrites were copied to it) ...
    await fails(app, 'NOT_FOUND', `query($c: ID!) { channel(id: $c) { id } }`, { c: hidden }, blind.token);
    // ... so nothing should name it to `blind`.
    const naming = (events: any[]) => events.filter((e) => e.channelId === hidden || e.deletedId === hidden).map((e) => e.__typename);
    assert.deepEqual(
      { live: naming(live.events), replay: naming(replay.events) },
      { live: [], replay: [] },
      'events naming a channel hidden from the viewer',
    );
  } finally {
    await bc.client.dispose();
  }
});

interface NoHistory {
  o: TestUser;
  v: TestUser;
  vId: string;
  general: string;
  nohist: string;
  cursor: string;
  anchor: string;
}

/** A guild where `v` may view `nohist` but not read its history; a cursor of `v`'s in `general`. */
async function noHistoryGuild(hub: Hub): Promise<NoHistory> {
  const [o, v] = await Promise.all([signUp(app), signUp(app)]);
  const { guildId, channelId: general } = await guildWithChannel(app, o.token);
  await invite(app, o.token, guildId, v.token);
  const nohist = await createChannel(o.token, guildId, 'nohist');
  await overwrite(o.token, {
    channelId: nohist,
    targetType: 'ROLE',
    targetId: await everyoneRole(o.token, guildId),
    allow: [],
    deny: ['READ_HISTORY'],
  });
  const vId = decodeAnyId(v.id).id;
  const live = await hub.subscribe({ userId: vId }, null);
  try {
    const anchor = await send(app, o.token, general, 'anchor');
    await hub.poke();
    const r = await within(live.next(), 5000);
    assert.notEqual(r, 'timeout');
    const cursor = (r as IteratorResult<Delivered>).value.cursor as string;
    return { o, v, vId, general, nohist, cursor, anchor: decodeAnyId(anchor).id };
  } finally {
    await live.return!();
  }
}

/** Reads `sub` until the message `endId` comes (bounded): the message ids it delivered. */
async function readUntil(sub: Subscription, endId: string): Promise<string[]> {
  const got: string[] = [];
  for (let i = 0; i < 500; i++) {
    const r = await within(sub.next(), 10_000);
    assert.notEqual(r, 'timeout', `stalled after ${got.length}`);
    const step = r as IteratorResult<Delivered>;
    assert.equal(step.done, false, 'the stream ended');
    if (step.value.type === 'MESSAGE_CREATED') got.push(String(step.value.payload.messageId));
    if (step.value.payload.messageId === endId) return got;
  }
  throw new Error('no end');
}

for (const liveCount of [2, 8]) {
  it(`messages sent while a resumed subscriber replays reach it live whatever their number (${liveCount}; hold limit 4): a member who may view a channel without READ_HISTORY`, {
    timeout: 60_000,
  }, async () => {
    const hub = app.deps.realtime!;
    const s = await noHistoryGuild(hub);
    // A backlog the replay pauses in (a window of 4 rows, the consumer not reading yet).
    await app.deps.db.execute(sql`insert into events (type, guild_id, channel_id, payload)
      select 'MESSAGE_UPDATED', c.guild_id, c.id, jsonb_build_object('messageId', ${s.anchor}::text, 'n', i)
      from channels c, generate_series(1, 20) i where c.id = ${decodeAnyId(s.general).id}::uuid`);
    await hub.poke();
    hub.configure({ maxPending: 16 }); // hold limit 4, replay window 4
    let sub: Subscription | undefined;
    try {
      sub = (await hub.subscribe({ userId: s.vId }, s.cursor)) as Subscription;
      await sleep(300);
      assert.equal(sub.replaying, true, 'paused in its replay');
      // Sent while it is subscribed (after its registration), in a channel it may view.
      const liveIds: string[] = [];
      for (let i = 0; i < liveCount; i++) liveIds.push(decodeAnyId(await send(app, s.o.token, s.nohist, `live ${i}`)).id);
      await hub.poke();
      const end = decodeAnyId(await send(app, s.o.token, s.general, 'end')).id;
      await hub.poke();
      const got = await readUntil(sub, end);
      assert.deepEqual(
        liveIds.filter((id) => !got.includes(id)),
        [],
        `live messages in a channel the viewer may view, lost (restarts: ${sub.restarts})`,
      );
    } finally {
      await sub?.return();
      hub.configure({ maxPending: 5000 });
    }
  });
}

it('a channel deleted while an overwrite change that shows it to a member commits: the member, who could view it just before the deletion, is told of the deletion', {
  skip: process.env.BANTER_TEST_DB !== 'postgres',
  timeout: 60_000,
}, async () => {
  const pg = (await import('pg')).default;
  const [o, m] = await Promise.all([signUp(app), signUp(app)]);
  const { guildId, channelId: general } = await guildWithChannel(app, o.token);
  await invite(app, o.token, guildId, m.token);
  const secret = await createChannel(o.token, guildId, 'secret');
  const everyone = await everyoneRole(o.token, guildId);
  await overwrite(o.token, { channelId: secret, targetType: 'ROLE', targetId: everyone, allow: [], deny: ['VIEW_CHANNEL'] });
  const mc = connect(url, m.token);
  const other = new pg.Client({ connectionString: app.config.databaseUrl });
  const stall = new pg.Client({ connectionString: app.config.databaseUrl });
  await other.connect();
  await stall.connect();
  try {
    const live = subscribe(mc.client, null, Q);
    await sleep(500);
    await send(app, o.token, general, 'start');
    await live.until((e) => contents(e).includes('start'), 10_000, 'start');
    const [g, c, r] = [decodeAnyId(guildId).id, decodeAnyId(secret).id, decodeAnyId(everyone).id];
    // Only to hold the deletion's transaction open after its cascade (its audit row waits).
    await stall.query('begin');
    await stall.query('lock table audit_log in share mode');
    // removeChannelOverwrite's statements (overwriteGuard's lock on the channel first), its
    // transaction still open: @everyone may view it again.
    await other.query('begin');
    await other.query('select 1 from channels where id = $1 for share', [c]);
    await other.query('delete from permission_overwrites where channel_id = $1 and target_id = $2', [c, r]);
    await other.query(
      `insert into events (type, guild_id, channel_id, payload) values ('PERMISSIONS_CHANGED', $1::uuid, $2::uuid,
        jsonb_build_object('channelId', $3::text, 'targetType', 'ROLE', 'targetId', $4::text))`,
      [g, c, c, r],
    );
    // deleteChannel reads the overwrites (the @everyone deny: not committed away yet), then waits.
    const deleting = ok(app, `mutation($c: ID!) { deleteChannel(id: $c) }`, { c: secret }, o.token);
    await sleep(500);
    await other.query('commit');
    await sleep(500);
    // Just before the deletion commits, `m` may view the channel: its client now shows it.
    const seen = await ok(app, `query($c: ID!) { channel(id: $c) { id } }`, { c: secret }, m.token);
    assert.equal(seen.channel.id, secret);
    await stall.query('commit');
    await deleting;
    await send(app, o.token, general, 'end');
    await live.until((e) => contents(e).includes('end'), 10_000, 'end');
    assert.deepEqual(
      live.events.filter((e) => e.deletedId === secret).map((e) => e.__typename),
      ['ChannelDeleted'],
      'the deletion of a channel the member could view (and had just fetched)',
    );
  } finally {
    await other.query('rollback').catch(() => {});
    await stall.query('rollback').catch(() => {});
    await other.end();
    await stall.end();
    await mc.client.dispose();
  }
});
