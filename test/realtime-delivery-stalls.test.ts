/**
 * What a big deletion costs the delivery side once it has committed: the tailer hands every row
 * to every subscriber of the instance, in log order, and a subscriber's check of one row holds
 * every row behind it. A deleted guild's former members read in full before its batch went out
 * (300k members: other guilds' deliveries held ~0.9 s), and a category's deletion (a
 * PERMISSIONS_CHANGED row per channel) made a subscriber of another guild load its access to each
 * of those channels, one after another (2,000 channels: ~1.7 s). Asserted on rows and statements,
 * not on time.
 */
import assert from 'node:assert/strict';
import { after, before, it } from 'node:test';
import { sql } from 'drizzle-orm';
import type { Delivered } from '../core/realtime/subscription.ts';
import { heldGuildChannels, ViewerAccess } from '../core/realtime/visibility.ts';
import { decodeAnyId, encodeId } from '../schema/builder.ts';
import { createTestApp, ok, signUp, type TestApp, type TestUser } from './helpers.ts';
import { channelAccessHelpers, guildWithChannel, invite, send, untilLive } from './realtime-helpers.ts';

let app: TestApp;
const { hiddenCategoryOf } = channelAccessHelpers(() => app);
before(async () => {
  app = await createTestApp({ rateLimits: false });
});
after(() => app.destroy());

const raw = (id: string) => decodeAnyId(id).id;
type Stream = AsyncIterableIterator<Delivered>;

/** The stream's rows until one that `pred` holds for (that one included); throws after `ms`. */
async function until(
  s: Stream,
  pred: (r: Delivered) => boolean,
  what: string,
  ms = 30_000,
): Promise<Delivered[]> {
  const got: Delivered[] = [];
  const deadline = Date.now() + ms;
  for (;;) {
    let timer: NodeJS.Timeout | undefined;
    const left = deadline - Date.now();
    const r = await Promise.race([
      s.next(),
      new Promise<never>((_, reject) => {
        timer = setTimeout(
          () => reject(new Error(`timed out waiting for ${what}; have ${got.map((x) => x.type)}`)),
          Math.max(0, left),
        );
      }),
    ]).finally(() => clearTimeout(timer));
    if (r.done) throw new Error(`stream ended waiting for ${what}; have ${got.map((x) => x.type)}`);
    got.push(r.value);
    if (pred(r.value)) return got;
  }
}

const content = (r: Delivered) => (r.message as { content?: string } | undefined)?.content;
const subscribe = (u: TestUser, after: string | null = null) =>
  app.deps.realtime!.subscribe({ userId: raw(u.id) }, after) as Promise<Stream>;

it("a deleted guild's former members are read for the viewers subscribed here, not every one of them", {
  timeout: 120_000,
}, async () => {
  const [owner, member, late, outsider, lateOutsider] = await Promise.all(
    [1, 2, 3, 4, 5].map(() => signUp(app)),
  );
  const { guildId, channelId } = await guildWithChannel(app, owner.token);
  for (const u of [member, late]) await invite(app, owner.token, guildId, u.token);
  const elsewhere = await guildWithChannel(app, outsider.token);
  await invite(app, outsider.token, elsewhere.guildId, lateOutsider.token);
  const g = raw(guildId);
  const M = 5_000;
  await app.deps.db.execute(sql`insert into users (id, username, email, password_hash)
    select gen_random_uuid(), 'dm' || i || '_' || ${g.slice(0, 8)}, 'dm' || i || '_' || ${g.slice(0, 8)} || '@test', 'x'
    from generate_series(1, ${M}) i`);
  await app.deps.db.execute(sql`insert into members (guild_id, user_id)
    select ${g}::uuid, id from users where username like ${`dm%\\_${g.slice(0, 8)}`}`);
  const streams = await Promise.all([owner, member, outsider].map((u) => subscribe(u)));
  try {
    await untilLive(app, [owner, member, outsider]);
    await send(app, owner.token, channelId, 'before');
    const [mark] = (await until(streams[0], (r) => content(r) === 'before', 'owner before')).slice(-1);
    await ok(app, `mutation($id: ID!) { deleteGuild(id: $id) }`, { id: guildId }, owner.token);
    await send(app, outsider.token, elsewhere.channelId, 'after');
    const [ownerRow] = (await until(streams[0], (r) => r.type === 'GUILD_DELETED', 'owner deletion')).slice(
      -1,
    );
    const [memberRow] = (await until(streams[1], (r) => r.type === 'GUILD_DELETED', 'member deletion')).slice(
      -1,
    );
    const seen = await until(streams[2], (r) => content(r) === 'after', 'outsider after');
    assert.deepEqual(
      seen.filter((r) => r.type === 'GUILD_DELETED'),
      [],
    );
    // The row every subscriber here took (one object for all): who of its M + 3 members it holds.
    // Before: every one of them, read before the batch went out (300k: ~0.9 s, every guild's
    // delivery held).
    assert.equal(ownerRow, memberRow);
    const held = ownerRow.formerMembers?.size ?? 0;
    assert.ok(held <= 3, `former members read for delivery: ${held}`);
    // A resume from before the deletion (a shared page of the log, read now): told if it was in.
    const resumed = await Promise.all([late, lateOutsider].map((u) => subscribe(u, mark.cursor)));
    try {
      const lateSeen = await until(resumed[0], (r) => r.type === 'GUILD_DELETED', 'late member deletion');
      assert.equal(lateSeen.at(-1)!.guildId, g);
      const otherSeen = await until(resumed[1], (r) => content(r) === 'after', 'late outsider after');
      assert.deepEqual(
        otherSeen.filter((r) => r.type === 'GUILD_DELETED'),
        [],
      );
    } finally {
      for (const s of resumed) await s.return!();
    }
    // A viewer the row's former members were not read for (it subscribed while they were) looks
    // itself up.
    const row = { ...ownerRow, formerMembers: new Set<string>(), formerAsked: new Set([raw(owner.id)]) };
    const asks = [late, lateOutsider].map((u) => new ViewerAccess(app.deps.db, raw(u.id)).canSee(row, false));
    assert.deepEqual(await Promise.all(asks), [true, false]);
  } finally {
    for (const s of streams) await s.return!();
  }
});

it("a category's deletion costs a subscriber of another guild as many statements for 300 channels as for 3", {
  timeout: 120_000,
}, async () => {
  const counts: number[] = [];
  for (const n of [3, 300]) {
    const owner = await signUp(app);
    const bystander = await signUp(app);
    const { guildId } = await guildWithChannel(app, owner.token);
    const cat = await hiddenCategoryOf(owner.token, guildId, n);
    const elsewhere = await guildWithChannel(app, bystander.token);
    const s = await subscribe(bystander);
    try {
      await untilLive(app, [bystander]);
      const before = app.deps.database.queryCount;
      await ok(app, `mutation($id: ID!) { deleteChannel(id: $id) }`, { id: cat }, owner.token);
      await send(app, bystander.token, elsewhere.channelId, 'after');
      const seen = await until(s, (r) => content(r) === 'after', 'bystander after');
      counts.push(app.deps.database.queryCount - before);
      // It is told nothing of that guild.
      assert.deepEqual(
        seen.filter((r) => r.guildId === raw(guildId)).map((r) => r.type),
        [],
      );
    } finally {
      await s.return!();
    }
  }
  // The deletion and the send take as many for both (test/long-transactions). Before: the
  // bystander loaded its access to each channel told of (3 + ~300 statements). The margin is the
  // hub's 500 ms polls, counted too, while a loaded machine takes seconds longer over 300.
  assert.ok(counts[1] - counts[0] < 100, `statements for 3 channels, then 300: ${counts}`);
});

it("a category's deletion costs a member of its guild as many statements for 300 channels as for 3", {
  timeout: 120_000,
}, async () => {
  const counts: number[] = [];
  for (const n of [3, 300]) {
    const owner = await signUp(app);
    const member = await signUp(app);
    const { guildId, channelId } = await guildWithChannel(app, owner.token);
    await invite(app, owner.token, guildId, member.token);
    const cat = await hiddenCategoryOf(owner.token, guildId, n);
    const s = await subscribe(member);
    try {
      await untilLive(app, [member]);
      const before = app.deps.database.queryCount;
      await ok(app, `mutation($id: ID!) { deleteChannel(id: $id) }`, { id: cat }, owner.token);
      await send(app, owner.token, channelId, 'after');
      const seen = await until(s, (r) => content(r) === 'after', 'member after');
      counts.push(app.deps.database.queryCount - before);
      // The category hid them from it, and still does (its overwrites copied to each): told nothing.
      assert.deepEqual(
        seen.filter((r) => r.type === 'PERMISSIONS_CHANGED' || r.type === 'CHANNEL_DELETED'),
        [],
      );
    } finally {
      await s.return!();
    }
  }
  // Before: it loaded its access to each channel told of, one after another (the margin: as above).
  assert.ok(counts[1] - counts[0] < 100, `statements for 3 channels, then 300: ${counts}`);
});

it("a category's deletion costs the members subscribed here one load of the guild's channels, not one each", {
  timeout: 120_000,
}, async () => {
  const { createChannel, denyToEveryone } = channelAccessHelpers(() => app);
  const N = 20;
  const counts: number[] = [];
  for (const m of [1, 41]) {
    const owner = await signUp(app);
    const { guildId, channelId } = await guildWithChannel(app, owner.token);
    const g = raw(guildId);
    const tag = `cm${m}_${g.slice(0, 8)}`;
    await app.deps.db.execute(sql`insert into users (id, username, email, password_hash)
      select gen_random_uuid(), ${tag} || '_' || i, ${tag} || '_' || i || '@test', 'x'
      from generate_series(1, ${m}) i`);
    const ids = (
      (await app.deps.db.execute(sql`insert into members (guild_id, user_id)
        select ${g}::uuid, id from users where username like ${`${tag}\\_%`} returning user_id`)) as unknown as {
        rows: { user_id: string }[];
      }
    ).rows.map((r) => r.user_id);
    assert.equal(ids.length, m);
    const streams = await Promise.all(
      ids.map((id) => app.deps.realtime!.subscribe({ userId: id }, null) as Promise<Stream>),
    );
    try {
      await untilLive(
        app,
        ids.map((id) => ({ id: encodeId('User', id) })),
      );
      // A category its members see (it denies sending only), its channels told to each of them.
      const cat = await createChannel(owner.token, guildId, 'cat', 'CATEGORY');
      await denyToEveryone(owner.token, guildId, cat, 'SEND_MESSAGES');
      await app.deps.db.execute(sql`insert into channels (id, guild_id, parent_id, type, name)
        select gen_random_uuid(), ${g}::uuid, ${raw(cat)}::uuid, 'TEXT', 'c' || i from generate_series(1, ${N}) i`);
      // Each member's standing is loaded (by the category's rows), as a connected member's is.
      await send(app, owner.token, channelId, 'before');
      for (const s of streams) await until(s, (r) => content(r) === 'before', 'member before');
      const before = app.deps.database.queryCount;
      await ok(app, `mutation($id: ID!) { deleteChannel(id: $id) }`, { id: cat }, owner.token);
      for (const s of streams) {
        const seen = await until(s, (r) => r.type === 'CHANNEL_DELETED', 'member deletion');
        assert.equal(seen.filter((r) => r.type === 'PERMISSIONS_CHANGED').length, N);
      }
      counts.push(app.deps.database.queryCount - before);
    } finally {
      for (const s of streams) await s.return!();
    }
  }
  // Per member: the first row's channel, loaded alone (its member half is its own). Before: the
  // guild's channels were loaded with each member's standing too, one statement per member (2 per
  // member: ~80 more for 40 more members; now ~40). The margin: the hub's polls, counted too.
  assert.ok(counts[1] - counts[0] < 60, `statements for 1 member, then 41: ${counts}`);
});

it("a guild's channels loaded for a category's deletion are let go once access changes anywhere, not held for every guild one was deleted in", {
  timeout: 120_000,
}, async () => {
  const { createChannel, denyToEveryone } = channelAccessHelpers(() => app);
  const held: number[] = [];
  for (const k of [0, 1]) {
    const [owner, member] = await Promise.all([1, 2].map(() => signUp(app)));
    const { guildId } = await guildWithChannel(app, owner.token);
    await invite(app, owner.token, guildId, member.token);
    const cat = await createChannel(owner.token, guildId, `cat${k}`, 'CATEGORY');
    await denyToEveryone(owner.token, guildId, cat, 'SEND_MESSAGES');
    await app.deps.db.execute(sql`insert into channels (id, guild_id, parent_id, type, name)
      select gen_random_uuid(), ${raw(guildId)}::uuid, ${raw(cat)}::uuid, 'TEXT', 'c' || i from generate_series(1, 3) i`);
    const s = await subscribe(member);
    try {
      await untilLive(app, [member]);
      await ok(app, `mutation($id: ID!) { deleteChannel(id: $id) }`, { id: cat }, owner.token);
      // Its rows after the first are judged by the guild's channels loaded together.
      const seen = await until(s, (r) => r.type === 'CHANNEL_DELETED', 'deletion');
      assert.equal(seen.filter((r) => r.type === 'PERMISSIONS_CHANGED').length, 3);
      held.push(heldGuildChannels(app.deps.db));
    } finally {
      await s.return!();
    }
  }
  // The second guild's deletion changed access (the first's channels serve no one since): only
  // its own guild's channels are held. Before: both (and every earlier test's guild).
  assert.deepEqual(held, [1, 1]);
});
