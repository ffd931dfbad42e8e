/**
 * A burst of PERMISSIONS_CHANGED rows (a category's deletion tells each of its channels) is judged
 * for a member by the guild's channels loaded together (GuildViews in core/realtime/visibility.ts),
 * kept across the rows committed before that load began. Who may see the channels gets every row,
 * live and replayed; who may not gets none; and a change of the member's roles between two bursts
 * is not missed by what the first burst loaded (it held the second category's channels too).
 */
import assert from 'node:assert/strict';
import { after, before, it } from 'node:test';
import { sql } from 'drizzle-orm';
import type { Delivered } from '../core/realtime/subscription.ts';
import { decodeAnyId, encodeId } from '../schema/builder.ts';
import { createTestApp, ok, signUp, type TestApp, type TestUser } from './helpers.ts';
import {
  channelAccessHelpers,
  guildWithChannel,
  invite,
  rowsUntil,
  send,
  untilLive,
} from './realtime-helpers.ts';

let app: TestApp;
const { everyoneRole } = channelAccessHelpers(() => app);
before(async () => {
  app = await createTestApp({ rateLimits: false });
});
after(() => app.destroy());

const raw = (id: string) => decodeAnyId(id).id;
type Stream = AsyncIterableIterator<Delivered>;

/** The stream's rows until one that `pred` holds for (that one included); throws after `ms`. */
const until = (s: Stream, pred: (r: Delivered) => boolean, what: string, ms = 30_000) =>
  rowsUntil(s, pred, what, [], ms);

const content = (r: Delivered) => (r.message as { content?: string } | undefined)?.content;
const subscribe = (u: TestUser, after: string | null = null) =>
  app.deps.realtime!.subscribe({ userId: raw(u.id) }, after) as Promise<Stream>;

/** A category hidden from @everyone and shown to `role`, with `n` channels in it (written directly). */
async function category(owner: TestUser, guildId: string, everyone: string, role: string, n: number) {
  const cat = await ok(
    app,
    `mutation($g: ID!) { createChannel(input: { guildId: $g, name: "cat", type: CATEGORY }) { id } }`,
    { g: guildId },
    owner.token,
  );
  const id = cat.createChannel.id as string;
  const ow = `mutation($c: ID!, $t: ID!, $a: [Permission!]!, $d: [Permission!]!) {
    setChannelOverwrite(input: { channelId: $c, targetType: ROLE, targetId: $t, allow: $a, deny: $d }) { allow } }`;
  await ok(app, ow, { c: id, t: everyone, a: [], d: ['VIEW_CHANNEL'] }, owner.token);
  await ok(app, ow, { c: id, t: role, a: ['VIEW_CHANNEL'], d: [] }, owner.token);
  await app.deps.db.execute(sql`insert into channels (id, guild_id, parent_id, type, name)
    select gen_random_uuid(), ${raw(guildId)}::uuid, ${raw(id)}::uuid, 'TEXT', 'c' || i from generate_series(1, ${n}) i`);
  return id;
}

/** Rows telling a deleted category's channel of the overwrites copied to it (channel.service). */
const told = (rows: Delivered[]) =>
  rows.filter((r) => r.type === 'PERMISSIONS_CHANGED' && 'parentId' in r.payload).length;

it("a category's deletion tells each of its channels to who may see them, live and replayed, and to nobody else; a role taken away between two is heard", {
  timeout: 120_000,
}, async () => {
  const N = 20;
  const [owner, shown, hidden] = await Promise.all([1, 2, 3].map(() => signUp(app)));
  const { guildId, channelId } = await guildWithChannel(app, owner.token);
  for (const u of [shown, hidden]) await invite(app, owner.token, guildId, u.token);
  const everyone = await everyoneRole(owner.token, guildId);
  const role = (
    await ok(
      app,
      `mutation($i: CreateRoleInput!) { createRole(input: $i) { id } }`,
      { i: { guildId, name: 'Seer', permissions: [] } },
      owner.token,
    )
  ).createRole.id as string;
  const ASSIGN = `mutation($g: ID!, $u: ID!, $r: ID!) { assignRole(guildId: $g, userId: $u, roleId: $r) }`;
  const UNASSIGN = `mutation($g: ID!, $u: ID!, $r: ID!) { unassignRole(guildId: $g, userId: $u, roleId: $r) }`;
  await ok(app, ASSIGN, { g: guildId, u: shown.id, r: role }, owner.token);
  // Both made before the first deletion: what its burst loads holds the second one's channels too.
  const first = await category(owner, guildId, everyone, role, N);
  const second = await category(owner, guildId, everyone, role, N);
  const third = await category(owner, guildId, everyone, role, N);
  const streams = await Promise.all([shown, hidden].map((u) => subscribe(u)));
  try {
    await untilLive(app, [shown, hidden]);
    await send(app, owner.token, channelId, 'mark');
    const [mark] = (await until(streams[0], (r) => content(r) === 'mark', 'mark')).slice(-1);
    await until(streams[1], (r) => content(r) === 'mark', 'mark (hidden)');

    await ok(app, `mutation($id: ID!) { deleteChannel(id: $id) }`, { id: first }, owner.token);
    await send(app, owner.token, channelId, 'one');
    const a = await until(streams[0], (r) => content(r) === 'one', 'shown one');
    const b = await until(streams[1], (r) => content(r) === 'one', 'hidden one');
    assert.equal(told(a), N, 'the member shown the category hears of each of its channels');
    assert.equal(told(b), 0, 'the member it was hidden from hears of none');

    // The second category's overwrites hide it from the role now (a row about one channel, which
    // keeps the member's standing in the guild): what the first burst loaded must not be kept.
    const ow = `mutation($c: ID!, $t: ID!) {
      setChannelOverwrite(input: { channelId: $c, targetType: ROLE, targetId: $t, allow: [], deny: [VIEW_CHANNEL] }) { allow } }`;
    await ok(app, ow, { c: second, t: role }, owner.token);
    await ok(app, `mutation($id: ID!) { deleteChannel(id: $id) }`, { id: second }, owner.token);
    await send(app, owner.token, channelId, 'two');
    const c = await until(streams[0], (r) => content(r) === 'two', 'shown two');
    const d = await until(streams[1], (r) => content(r) === 'two', 'hidden two');
    assert.equal(told(c), 0, 'hidden from its role, it hears of none of the second category');
    assert.equal(told(d), 0);

    // The role goes; the third category's channels are hidden from it now.
    await ok(app, UNASSIGN, { g: guildId, u: shown.id, r: role }, owner.token);
    await ok(app, `mutation($id: ID!) { deleteChannel(id: $id) }`, { id: third }, owner.token);
    await send(app, owner.token, channelId, 'three');
    const c3 = await until(streams[0], (r) => content(r) === 'three', 'shown three');
    const d3 = await until(streams[1], (r) => content(r) === 'three', 'hidden three');
    assert.equal(told(c3), 0, 'its role taken away, it hears of none of the third category');
    assert.equal(told(d3), 0);

    // Replayed from before both (access now: the role is gone): none for either.
    const resumed = await Promise.all([shown, hidden].map((u) => subscribe(u, mark.cursor)));
    try {
      const e = await until(resumed[0], (r) => content(r) === 'three', 'shown resumed');
      const f = await until(resumed[1], (r) => content(r) === 'three', 'hidden resumed');
      assert.equal(told(e), 0);
      assert.equal(told(f), 0);
    } finally {
      for (const s of resumed) await s.return!();
    }
    // The role back: a replay tells it of every channel of the first and third (it may see them
    // now), of none of the second's (their copied overwrites hide them from the role).
    await ok(app, ASSIGN, { g: guildId, u: shown.id, r: role }, owner.token);
    const again = await subscribe(shown, mark.cursor);
    try {
      const g = await until(again, (r) => content(r) === 'three', 'shown resumed with the role');
      assert.equal(told(g), 2 * N);
    } finally {
      await again.return!();
    }
  } finally {
    for (const s of streams) await s.return!();
  }
});

it("a category's deletion tells its channels to the member an overwrite of its own shows them to, not to a member of the same roles", {
  timeout: 120_000,
}, async () => {
  const N = 10;
  const [owner, one, other] = await Promise.all([1, 2, 3].map(() => signUp(app)));
  const { guildId, channelId } = await guildWithChannel(app, owner.token);
  for (const u of [one, other]) await invite(app, owner.token, guildId, u.token);
  const everyone = await everyoneRole(owner.token, guildId);
  const ow = `mutation($c: ID!, $tt: OverwriteTargetType!, $t: ID!, $a: [Permission!]!, $d: [Permission!]!) {
    setChannelOverwrite(input: { channelId: $c, targetType: $tt, targetId: $t, allow: $a, deny: $d }) { allow } }`;
  // Both hold @everyone only: the channels each may view are worked out apart all the same.
  const streams = await Promise.all([one, other].map((u) => subscribe(u)));
  try {
    await untilLive(app, [one, other]);
    // Each shown a category in turn: whichever of them is judged first, the other is not judged alike.
    for (const [shown, k] of [
      [one, 0],
      [other, 1],
    ] as const) {
      const cat = (
        await ok(
          app,
          `mutation($g: ID!) { createChannel(input: { guildId: $g, name: "cat", type: CATEGORY }) { id } }`,
          { g: guildId },
          owner.token,
        )
      ).createChannel.id as string;
      await ok(app, ow, { c: cat, tt: 'ROLE', t: everyone, a: [], d: ['VIEW_CHANNEL'] }, owner.token);
      await ok(app, ow, { c: cat, tt: 'MEMBER', t: shown.id, a: ['VIEW_CHANNEL'], d: [] }, owner.token);
      await app.deps.db.execute(sql`insert into channels (id, guild_id, parent_id, type, name)
        select gen_random_uuid(), ${raw(guildId)}::uuid, ${raw(cat)}::uuid, 'TEXT', 'c' || i from generate_series(1, ${N}) i`);
      await ok(app, `mutation($id: ID!) { deleteChannel(id: $id) }`, { id: cat }, owner.token);
      await send(app, owner.token, channelId, `after ${k}`);
      const a = await until(streams[k], (r) => content(r) === `after ${k}`, 'shown after');
      const b = await until(streams[1 - k], (r) => content(r) === `after ${k}`, 'hidden after');
      assert.equal(told(a), N, 'the member its overwrite shows them to hears of each channel');
      assert.equal(told(b), 0, 'the member of the same roles hears of none');
    }
  } finally {
    for (const s of streams) await s.return!();
  }
});

/**
 * A subscriber far behind in the log (a slow one, its checks queued behind loads) holds answers
 * loaded long ago. The guild's channels a burst loaded (GuildViews) are kept only across rows
 * committed before that load began: a later one about a channel drops them, even while the
 * viewer's cached standing in the guild says it is out (it left meanwhile: a row not reached
 * yet). The clock and the caches' lapse factor are doubles (Date.now, Math.random), set per step:
 * what they stand for is time passing (the cached standing lapses, is loaded again out, lapses
 * again) while the subscriber works through rows; the database, the rows and ViewerAccess are real.
 */
it('doubles for the clock and lapse factor: what a burst loaded is not kept across a channel row committed after it, while the cached standing says out (a lagging subscriber)', {
  timeout: 120_000,
}, async () => {
  const { mock } = await import('node:test');
  const { ViewerAccess } = await import('../core/realtime/visibility.ts');
  const { headPosition, readRangeAll } = await import('../core/realtime/log.ts');
  const db = app.deps.db;
  const [owner, viewer] = await Promise.all([1, 2].map(() => signUp(app)));
  const { guildId, channelId: hidden } = await guildWithChannel(app, owner.token);
  await invite(app, owner.token, guildId, viewer.token);
  const everyone = await everyoneRole(owner.token, guildId);
  const other = (
    await ok(
      app,
      `mutation($i: CreateRoleInput!) { createRole(input: $i) { id } }`,
      { i: { guildId, name: 'Other', permissions: [] } },
      owner.token,
    )
  ).createRole.id as string;
  // A category with an overwrite of a role the viewer lacks, and two channels: its deletion is a
  // burst of two rows the viewer may see (the second loads the guild's channels together).
  const cat = await category(owner, guildId, everyone, other, 2);
  await ok(
    app,
    `mutation($c: ID!, $t: ID!) { removeChannelOverwrite(channelId: $c, targetId: $t) }`,
    {
      c: cat,
      t: everyone,
    },
    owner.token,
  );
  const OW = `mutation($c: ID!, $t: ID!, $a: [Permission!]!, $d: [Permission!]!) {
    setChannelOverwrite(input: { channelId: $c, targetType: ROLE, targetId: $t, allow: $a, deny: $d }) { allow } }`;
  const rename = (name: string) =>
    ok(
      app,
      `mutation($g: ID!, $n: String!) { updateGuild(input: { id: $g, name: $n }) { id } }`,
      {
        g: guildId,
        n: name,
      },
      owner.token,
    );
  const start = await headPosition(db);
  let head = start;
  const access = new ViewerAccess(db, raw(viewer.id), () => head);
  const g = raw(guildId);
  let done = start;
  /** The guild's rows committed since the last step, in log order. */
  async function next() {
    const to = await headPosition(db);
    const rows = (await readRangeAll(db, done, to, 1000)).filter((r) => r.guildId === g);
    done = to;
    return rows;
  }
  const base = Date.now();
  /** Observes and checks `rows` at `t` ms, loads lapsing by `rnd` (0: soonest, 1: latest). */
  async function at(t: number, rnd: number, rows: Awaited<ReturnType<typeof next>>) {
    head = await headPosition(db);
    mock.method(Date, 'now', () => base + t);
    mock.method(Math, 'random', () => rnd);
    try {
      const out: { type: string; channelId: string | null; yes: boolean }[] = [];
      for (const r of rows) {
        access.observe(r);
        out.push({ type: r.type, channelId: r.channelId, yes: await access.canSee(r, false) });
      }
      return out;
    } finally {
      mock.restoreAll();
    }
  }

  await rename('n0');
  await at(0, 0, await next()); // its standing in the guild: a member (lapses at 22.5 s)
  await ok(app, `mutation($id: ID!) { deleteChannel(id: $id) }`, { id: cat }, owner.token);
  await rename('n1');
  const burst = await next();
  const n1 = burst.pop()!;
  const seen = await at(20_000, 1, burst); // the guild's channels loaded together (to 57.5 s)
  assert.deepEqual(
    seen.filter((x) => x.type === 'PERMISSIONS_CHANGED').map((x) => x.yes),
    [true, true],
  );
  // The channel hidden from everyone; then an overwrite of it for a role the viewer lacks: a
  // change it may not hear of (it could not view the channel before it, nor after). Then the
  // viewer leaves (the subscriber has not reached that row yet).
  await ok(app, OW, { c: hidden, t: everyone, a: [], d: ['VIEW_CHANNEL'] }, owner.token);
  await ok(app, OW, { c: hidden, t: other, a: ['ADD_REACTIONS'], d: [] }, owner.token);
  await ok(app, `mutation($g: ID!) { leaveGuild(guildId: $g) }`, { g: guildId }, viewer.token);
  const [hide, aimed, left] = await next();
  assert.equal(hide.type, 'PERMISSIONS_CHANGED');
  assert.equal(aimed.type, 'PERMISSIONS_CHANGED');
  // Its standing lapsed: loaded again, out now (to 45.5 s).
  assert.deepEqual(
    (await at(23_000, 0, [n1])).map((x) => x.yes),
    [false],
  );
  await invite(app, owner.token, guildId, viewer.token); // back, without the channel
  await at(30_000, 0, [hide]); // out, still: told nothing
  // Its standing lapsed again, loaded again: in. The overwrite for the other role is none of its.
  const [told] = await at(46_000, 0, [aimed]);
  assert.equal(told.yes, false, 'an overwrite change of a channel it could view neither before nor after');
  assert.equal(left.type, 'MEMBER_LEFT');
});

/**
 * As above, for a channel's cached answer (ChannelEntry): a role change that hides the channel is
 * passed over while the viewer's cached standing says it is out (it left: a row the lagging
 * subscriber has not reached), and a message sent in the channel after it was hidden went out on
 * the answer loaded before. Doubles for the clock and the lapse factor, as above.
 */
for (const standing of [true, false])
  it(`doubles for the clock and lapse factor: a message in a channel hidden since its answer was loaded is not shown on it, while the cached standing says out (a lagging subscriber; its standing loaded before: ${standing})`, {
    timeout: 120_000,
  }, async () => {
    const { mock } = await import('node:test');
    const { ViewerAccess } = await import('../core/realtime/visibility.ts');
    const { headPosition, readRangeAll } = await import('../core/realtime/log.ts');
    const db = app.deps.db;
    const [owner, viewer] = await Promise.all([1, 2].map(() => signUp(app)));
    const { guildId, channelId } = await guildWithChannel(app, owner.token);
    await invite(app, owner.token, guildId, viewer.token);
    const everyone = await everyoneRole(owner.token, guildId);
    const rename = (name: string) =>
      ok(
        app,
        `mutation($g: ID!, $n: String!) { updateGuild(input: { id: $g, name: $n }) { id } }`,
        { g: guildId, n: name },
        owner.token,
      );
    const start = await headPosition(db);
    let head = start;
    const access = new ViewerAccess(db, raw(viewer.id), () => head);
    const g = raw(guildId);
    let done = start;
    async function next() {
      const to = await headPosition(db);
      const rows = (await readRangeAll(db, done, to, 1000)).filter(
        (r) => r.guildId === g || r.channelId === raw(channelId),
      );
      done = to;
      return rows;
    }
    const base = Date.now();
    async function at(t: number, rnd: number, rows: Awaited<ReturnType<typeof next>>) {
      head = await headPosition(db);
      mock.method(Date, 'now', () => base + t);
      mock.method(Math, 'random', () => rnd);
      try {
        const out: { type: string; yes: boolean }[] = [];
        for (const r of rows) {
          access.observe(r);
          out.push({ type: r.type, yes: await access.canSee(r, false) });
        }
        return out;
      } finally {
        mock.restoreAll();
      }
    }
    await rename('n0');
    // its standing: a member (lapses at 22.5 s), or not loaded (messages need none)
    const n0 = await next();
    await at(0, 0, standing ? n0 : []);
    await send(app, owner.token, channelId, 'seen');
    assert.deepEqual(
      (await at(20_000, 1, await next())).map((x) => x.yes),
      [true],
    ); // the channel's answer, to 57.5 s
    await rename('n1');
    // @everyone may view no channel now; then a message there; then the viewer leaves.
    await ok(
      app,
      `mutation($i: UpdateRoleInput!) { updateRole(input: $i) { id } }`,
      { i: { id: everyone, permissions: ['SEND_MESSAGES', 'READ_HISTORY'] } },
      owner.token,
    );
    await send(app, owner.token, channelId, 'secret');
    await ok(app, `mutation($g: ID!) { leaveGuild(guildId: $g) }`, { g: guildId }, viewer.token);
    const [n1, hidden, secret, left] = await next();
    assert.deepEqual(
      [n1.type, hidden.type, secret.type, left.type],
      ['GUILD_UPDATED', 'ROLE_UPDATED', 'MESSAGE_CREATED', 'MEMBER_LEFT'],
    );
    assert.deepEqual(
      (await at(23_000, 0, [n1])).map((x) => x.yes),
      [false],
    ); // lapsed, loaded again: out
    const [, shown] = await at(30_000, 0, [hidden, secret]);
    assert.equal(shown.yes, false, 'a message sent after the channel was hidden from it');
  });

/**
 * The guild's channels a burst's views are built from are loaded once for the process and may be
 * newer than the viewer's cached standing they are combined with: a lagging subscriber holds its
 * standing from before a row that takes a role away (committed, read by the tailer, not reached
 * by it yet), and judges an earlier burst with channels loaded after that row. The row, once
 * reached, must drop those views as well as the standing: a later overwrite change of a channel
 * the role alone showed is none of the viewer's. Doubles for the clock and the lapse factor (time
 * standing still while the subscriber works through rows: no cached answer lapses); the database,
 * the rows and ViewerAccess are real.
 */
it('doubles for the clock and lapse factor: views built from channels loaded after a role was taken away and the standing cached before it are not kept across that row (a lagging subscriber)', {
  timeout: 120_000,
}, async () => {
  const { mock } = await import('node:test');
  const { ViewerAccess } = await import('../core/realtime/visibility.ts');
  const { headPosition, readRangeAll } = await import('../core/realtime/log.ts');
  const db = app.deps.db;
  const [owner, viewer] = await Promise.all([1, 2].map(() => signUp(app)));
  const { guildId } = await guildWithChannel(app, owner.token);
  await invite(app, owner.token, guildId, viewer.token);
  const everyone = await everyoneRole(owner.token, guildId);
  const role = async (name: string) =>
    (
      await ok(
        app,
        `mutation($i: CreateRoleInput!) { createRole(input: $i) { id } }`,
        { i: { guildId, name, permissions: [] } },
        owner.token,
      )
    ).createRole.id as string;
  const seer = await role('Seer');
  const other = await role('Other');
  await ok(
    app,
    `mutation($g: ID!, $u: ID!, $r: ID!) { assignRole(guildId: $g, userId: $u, roleId: $r) }`,
    { g: guildId, u: viewer.id, r: seer },
    owner.token,
  );
  // Two categories hidden from @everyone and shown to Seer: the first's deletion is the burst (two
  // rows: the second loads the guild's channels), the second's channel is what a later row is about.
  const first = await category(owner, guildId, everyone, seer, 2);
  const second = await category(owner, guildId, everyone, seer, 1);
  const [kept] = (
    (await db.execute(sql`select id from channels where parent_id = ${raw(second)}::uuid`)) as unknown as {
      rows: { id: string }[];
    }
  ).rows;
  const start = await headPosition(db);
  let head = start;
  const access = new ViewerAccess(db, raw(viewer.id), () => head);
  const g = raw(guildId);
  let done = start;
  async function next() {
    const to = await headPosition(db);
    const rows = (await readRangeAll(db, done, to, 1000)).filter((r) => r.guildId === g);
    done = to;
    return rows;
  }
  const base = Date.now();
  async function at(t: number, rows: Awaited<ReturnType<typeof next>>) {
    head = await headPosition(db);
    mock.method(Date, 'now', () => base + t);
    mock.method(Math, 'random', () => 1);
    try {
      const out: { type: string; channelId: string | null; yes: boolean }[] = [];
      for (const r of rows) {
        access.observe(r);
        out.push({ type: r.type, channelId: r.channelId, yes: await access.canSee(r, false) });
      }
      return out;
    } finally {
      mock.restoreAll();
    }
  }
  await ok(
    app,
    `mutation($g: ID!, $n: String!) { updateGuild(input: { id: $g, name: $n }) { id } }`,
    { g: guildId, n: 'n0' },
    owner.token,
  );
  // Its standing, with Seer, cached (to 37.5 s: the clock stands at 0 and 1 s below).
  assert.deepEqual(
    (await at(0, await next())).map((x) => x.yes),
    [true],
  );
  // The first category deleted; Seer taken from the viewer; then an overwrite of the second's
  // channel for a role the viewer lacks. All committed before the subscriber reaches the burst.
  await ok(app, `mutation($id: ID!) { deleteChannel(id: $id) }`, { id: first }, owner.token);
  await ok(
    app,
    `mutation($g: ID!, $u: ID!, $r: ID!) { unassignRole(guildId: $g, userId: $u, roleId: $r) }`,
    { g: guildId, u: viewer.id, r: seer },
    owner.token,
  );
  await ok(
    app,
    `mutation($c: ID!, $t: ID!, $a: [Permission!]!, $d: [Permission!]!) {
      setChannelOverwrite(input: { channelId: $c, targetType: ROLE, targetId: $t, allow: $a, deny: $d }) { allow } }`,
    { c: encodeId('Channel', kept.id), t: other, a: ['ADD_REACTIONS'], d: [] },
    owner.token,
  );
  const rows = await next();
  const types = rows.map((r) => r.type);
  const taken = types.indexOf('MEMBER_UPDATED');
  assert.ok(taken > 0, `rows: ${types}`);
  const burst = rows.slice(0, taken).filter((r) => r.type === 'PERMISSIONS_CHANGED');
  assert.equal(burst.length, 2, `rows: ${types}`);
  const aimed = rows[rows.length - 1];
  assert.equal(aimed.type, 'PERMISSIONS_CHANGED');
  assert.equal(aimed.channelId, kept.id);
  const seen = await at(1_000, rows);
  // The burst was judged by its standing then (Seer: it could see the first category's channels).
  assert.deepEqual(
    seen.filter((x) => x.type === 'PERMISSIONS_CHANGED').map((x) => x.yes),
    [true, true, false],
    'the burst told; the overwrite of a channel only Seer showed it, after Seer was taken, not',
  );
});

it("a category's deletion tells its channels to a member of @everyone alone and to one of the same roles timed out (a timeout stops sending, not viewing what an overwrite shows)", {
  timeout: 120_000,
}, async () => {
  const N = 10;
  const [owner, free, timedOut] = await Promise.all([1, 2, 3].map(() => signUp(app)));
  const { guildId } = await guildWithChannel(app, owner.token);
  for (const u of [free, timedOut]) await invite(app, owner.token, guildId, u.token);
  const everyone = await everyoneRole(owner.token, guildId);
  // @everyone may send but not view: a category's overwrite shows it its channels, timed out or
  // not (a timeout takes what it takes after the overwrites, as Discord's does).
  await ok(
    app,
    `mutation($i: UpdateRoleInput!) { updateRole(input: $i) { id } }`,
    { i: { id: everyone, permissions: ['SEND_MESSAGES'] } },
    owner.token,
  );
  await ok(
    app,
    `mutation($g: ID!, $u: ID!, $t: DateTime) { timeoutMember(guildId: $g, userId: $u, until: $t) }`,
    { g: guildId, u: timedOut.id, t: new Date(Date.now() + 3_600_000).toISOString() },
    owner.token,
  );
  const cat = (
    await ok(
      app,
      `mutation($g: ID!) { createChannel(input: { guildId: $g, name: "cat", type: CATEGORY }) { id } }`,
      { g: guildId },
      owner.token,
    )
  ).createChannel.id as string;
  await ok(
    app,
    `mutation($c: ID!, $t: ID!) {
      setChannelOverwrite(input: { channelId: $c, targetType: ROLE, targetId: $t, allow: [VIEW_CHANNEL], deny: [] }) { allow } }`,
    { c: cat, t: everyone },
    owner.token,
  );
  await app.deps.db.execute(sql`insert into channels (id, guild_id, parent_id, type, name)
    select gen_random_uuid(), ${raw(guildId)}::uuid, ${raw(cat)}::uuid, 'TEXT', 'c' || i from generate_series(1, ${N}) i`);
  const streams = await Promise.all([free, timedOut].map((u) => subscribe(u)));
  try {
    await untilLive(app, [free, timedOut]);
    const rename = (n: string) =>
      ok(
        app,
        `mutation($g: ID!, $n: String!) { updateGuild(input: { id: $g, name: $n }) { id } }`,
        { g: guildId, n },
        owner.token,
      );
    const renamed = (n: string) => (r: Delivered) =>
      r.type === 'GUILD_UPDATED' && (r.payload.changes as { name?: string } | undefined)?.name === n;
    // Each one's standing loaded first, as a connected member's is.
    await rename('before');
    for (const s of streams) await until(s, renamed('before'), 'renamed before');
    await ok(app, `mutation($id: ID!) { deleteChannel(id: $id) }`, { id: cat }, owner.token);
    await rename('after');
    const a = await until(streams[0], renamed('after'), 'free: renamed after');
    const b = await until(streams[1], renamed('after'), 'timed out: renamed after');
    assert.equal(told(a), N, 'the member not timed out hears of each channel');
    assert.equal(told(b), N, 'the member timed out, of the same roles, hears of each channel');
  } finally {
    for (const s of streams) await s.return!();
  }
});

/**
 * A timeout ends with no row: the standing a subscriber cached while the member was timed out
 * says so until it lapses, while a channel's access loaded now does not. A category's deletion
 * judged after the timeout ended tells each channel a member no longer timed out may view: the
 * first row (its channel loaded alone) and the rest (the guild's channels loaded together, with
 * the cached standing) alike. Doubles for the clock (Date: time passing past the timeout's end,
 * less than the standing's lifetime) and the lapse factor; the database, rows and ViewerAccess are
 * real.
 */
it("doubles for the clock and lapse factor: a category's deletion judged after the member's timeout ended tells each of its channels, though its standing was cached while timed out", {
  timeout: 120_000,
}, async () => {
  const { mock } = await import('node:test');
  const { ViewerAccess } = await import('../core/realtime/visibility.ts');
  const { headPosition, readRangeAll } = await import('../core/realtime/log.ts');
  const db = app.deps.db;
  const [owner, viewer] = await Promise.all([1, 2].map(() => signUp(app)));
  const { guildId } = await guildWithChannel(app, owner.token);
  await invite(app, owner.token, guildId, viewer.token);
  const everyone = await everyoneRole(owner.token, guildId);
  // @everyone may send but not view: the category's overwrite shows its channels, unless timed out.
  await ok(
    app,
    `mutation($i: UpdateRoleInput!) { updateRole(input: $i) { id } }`,
    { i: { id: everyone, permissions: ['SEND_MESSAGES'] } },
    owner.token,
  );
  const cat = (
    await ok(
      app,
      `mutation($g: ID!) { createChannel(input: { guildId: $g, name: "cat", type: CATEGORY }) { id } }`,
      { g: guildId },
      owner.token,
    )
  ).createChannel.id as string;
  await ok(
    app,
    `mutation($c: ID!, $t: ID!) {
      setChannelOverwrite(input: { channelId: $c, targetType: ROLE, targetId: $t, allow: [VIEW_CHANNEL], deny: [] }) { allow } }`,
    { c: cat, t: everyone },
    owner.token,
  );
  await app.deps.db.execute(sql`insert into channels (id, guild_id, parent_id, type, name)
    select gen_random_uuid(), ${raw(guildId)}::uuid, ${raw(cat)}::uuid, 'TEXT', 'c' || i from generate_series(1, 2) i`);
  const base = Date.now();
  await ok(
    app,
    `mutation($g: ID!, $u: ID!, $t: DateTime) { timeoutMember(guildId: $g, userId: $u, until: $t) }`,
    { g: guildId, u: viewer.id, t: new Date(base + 10_000).toISOString() },
    owner.token,
  );
  const start = await headPosition(db);
  let head = start;
  const access = new ViewerAccess(db, raw(viewer.id), () => head);
  const g = raw(guildId);
  let done = start;
  async function next() {
    const to = await headPosition(db);
    const rows = (await readRangeAll(db, done, to, 1000)).filter((r) => r.guildId === g);
    done = to;
    return rows;
  }
  async function at(t: number, rows: Awaited<ReturnType<typeof next>>) {
    head = await headPosition(db);
    mock.timers.enable({ apis: ['Date'], now: base + t });
    mock.method(Math, 'random', () => 1);
    try {
      const out: { type: string; yes: boolean }[] = [];
      for (const r of rows) {
        access.observe(r);
        out.push({ type: r.type, yes: await access.canSee(r, false) });
      }
      return out;
    } finally {
      mock.timers.reset();
      mock.restoreAll();
    }
  }
  await ok(
    app,
    `mutation($g: ID!, $n: String!) { updateGuild(input: { id: $g, name: $n }) { id } }`,
    { g: guildId, n: 'n0' },
    owner.token,
  );
  // Its standing, timed out, cached (to 37.5 s).
  assert.deepEqual(
    (await at(0, await next())).map((x) => x.yes),
    [true],
  );
  await ok(app, `mutation($id: ID!) { deleteChannel(id: $id) }`, { id: cat }, owner.token);
  const burst = (await next()).filter((r) => r.type === 'PERMISSIONS_CHANGED');
  assert.equal(burst.length, 2);
  // 20 s on: the timeout (10 s) is over, the standing cached while it lasted is not.
  assert.deepEqual(
    (await at(20_000, burst)).map((x) => x.yes),
    [true, true],
    'each channel of the category told, the first loaded alone and the second with the others',
  );
});

it("a channel's deletion is told to the member an overwrite of its own showed the channel to, not to a member of the same roles", {
  timeout: 120_000,
}, async () => {
  const [owner, one, other] = await Promise.all([1, 2, 3].map(() => signUp(app)));
  const { guildId, channelId } = await guildWithChannel(app, owner.token);
  for (const u of [one, other]) await invite(app, owner.token, guildId, u.token);
  const everyone = await everyoneRole(owner.token, guildId);
  const ow = `mutation($c: ID!, $tt: OverwriteTargetType!, $t: ID!, $a: [Permission!]!, $d: [Permission!]!) {
    setChannelOverwrite(input: { channelId: $c, targetType: $tt, targetId: $t, allow: $a, deny: $d }) { allow } }`;
  const streams = await Promise.all([one, other].map((u) => subscribe(u)));
  try {
    await untilLive(app, [one, other]);
    // Each shown a channel in turn: whichever of them is judged first, the other is not judged alike.
    for (const [shown, k] of [
      [one, 0],
      [other, 1],
    ] as const) {
      const ch = (
        await ok(
          app,
          `mutation($g: ID!) { createChannel(input: { guildId: $g, name: "secret", type: TEXT }) { id } }`,
          { g: guildId },
          owner.token,
        )
      ).createChannel.id as string;
      await ok(app, ow, { c: ch, tt: 'ROLE', t: everyone, a: [], d: ['VIEW_CHANNEL'] }, owner.token);
      await ok(app, ow, { c: ch, tt: 'MEMBER', t: shown.id, a: ['VIEW_CHANNEL'], d: [] }, owner.token);
      await ok(app, `mutation($id: ID!) { deleteChannel(id: $id) }`, { id: ch }, owner.token);
      await send(app, owner.token, channelId, `gone ${k}`);
      const deleted = (rows: Delivered[]) =>
        rows.filter((r) => r.type === 'CHANNEL_DELETED' && r.channelId === raw(ch)).length;
      const a = await until(streams[k], (r) => content(r) === `gone ${k}`, 'shown gone');
      const b = await until(streams[1 - k], (r) => content(r) === `gone ${k}`, 'hidden gone');
      assert.equal(deleted(a), 1, 'the member its overwrite showed the channel to hears of its deletion');
      assert.equal(deleted(b), 0, 'the member of the same roles does not');
    }
  } finally {
    for (const s of streams) await s.return!();
  }
});
