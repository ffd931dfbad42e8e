/**
 * A resume on a busy instance: while a subscriber replays, every row the tailer dispatches (every
 * guild's) waits for it; past its bound it catches up from the log again instead of being cut
 * off, and goes live once it has. Live, a subscriber that does not read is still cut off.
 */
import assert from 'node:assert/strict';
import { after, before, it } from 'node:test';
import { sql } from 'drizzle-orm';
import { comparePos, decodeCursor, encodeCursor, type Position } from '../core/realtime/cursor.ts';
import type { Hub } from '../core/realtime/hub.ts';
import { type Delivered, SlowConsumerError, type Subscription } from '../core/realtime/subscription.ts';
import { decodeAnyId } from '../schema/builder.ts';
import { createTestApp, signUp, type TestApp, type TestUser } from './helpers.ts';
import { connect, guildWithChannel, send, sleep, subscribe, within } from './realtime-helpers.ts';

let app: TestApp;
let url: string;
before(async () => {
  app = await createTestApp({ rateLimits: false });
  url = `ws://127.0.0.1:${await app.start(0)}/graphql`;
});
after(() => app.destroy());

const rowsOf = <T>(r: unknown) => (r as { rows: T[] }).rows;

interface Viewer {
  u: TestUser;
  userId: string;
  guildId: string;
  /** global id, for the API */
  channelId: string;
  /** raw uuid, for the log */
  channel: string;
}

async function viewer(): Promise<Viewer> {
  const u = await signUp(app);
  const { guildId, channelId } = await guildWithChannel(app, u.token);
  return {
    u,
    userId: decodeAnyId(u.id).id,
    guildId: decodeAnyId(guildId).id,
    channelId,
    channel: decodeAnyId(channelId).id,
  };
}

/** A cursor of `v`'s, taken from a live subscription: what a client resuming from there holds. */
async function cursorOf(hub: Hub, v: Viewer): Promise<{ cursor: string; messageId: string }> {
  const live = await hub.subscribe({ userId: v.userId }, null);
  try {
    const messageId = decodeAnyId(await send(app, v.u.token, v.channelId, 'the last one seen')).id;
    await hub.poke();
    const r = await within(live.next(), 5000);
    assert.notEqual(r, 'timeout', 'the live subscription got the message');
    return { cursor: (r as IteratorResult<Delivered>).value.cursor as string, messageId };
  } finally {
    await live.return!();
  }
}

/** `n` edits of `messageId` written straight into the log (a backlog longer than a replay page), then tailed. */
async function backlog(hub: Hub, v: Viewer, messageId: string, n: number) {
  await app.deps.db.execute(sql`insert into events (type, guild_id, channel_id, payload)
    select 'MESSAGE_UPDATED', ${v.guildId}::uuid, ${v.channel}::uuid,
      jsonb_build_object('messageId', ${messageId}::text, 'n', i) from generate_series(1, ${n}) i`);
  await hub.poke();
}

/** The log's rows in `v`'s channel after `from`, in log order, as cursors. */
async function channelLog(v: Viewer, from: Position): Promise<string[]> {
  const r = await app.deps.db.execute(sql`select xid::text as xid, seq from events
    where channel_id = ${v.channel}::uuid and (xid::text::bigint, seq) > (${from.xid}::bigint, ${from.seq}::bigint)
    order by xid::text::bigint, seq`);
  return rowsOf<{ xid: string; seq: string }>(r).map((x) =>
    encodeCursor({ xid: String(x.xid), seq: Number(x.seq) }),
  );
}

/**
 * Every cursor delivered after `from`, strictly in log order (nothing repeated or out of order),
 * and those of the channel exactly the log's (nothing lost).
 */
function assertExactlyOnce(got: string[], from: Position, expected: string[]) {
  let last = from;
  for (const c of got) {
    const p = decodeCursor(c);
    assert.ok(comparePos(p, last) > 0, `${JSON.stringify(p)} came after ${JSON.stringify(last)}`);
    last = p;
  }
  const inChannel = new Set(expected);
  assert.deepEqual(
    got.filter((c) => inChannel.has(c)),
    expected,
  );
}

/**
 * Sends messages with `lanes` concurrent senders until stopped (at most `max` in all, for at most
 * `ms`): one in `every` in `own`'s channel by its owner, the others in `other`'s. `sent` counts them.
 * Each sender pauses `pause` ms between sends: PGlite runs one statement at a time, and senders
 * that never let go of it starve every other reader of the log (the replay too), which is not
 * what this is about.
 */
function busyWriter(
  own: Viewer,
  other: Viewer,
  o: { every: number; lanes: number; pause: number; max: number; ms: number },
) {
  const deadline = Date.now() + o.ms;
  /** finished: it stopped by itself (its count or its time ran out) */
  const state = { stopped: false, finished: false, sent: 0, ownSent: 0 };
  const lane = async () => {
    while (!state.stopped && state.sent < o.max && Date.now() < deadline) {
      const mine = state.sent++ % o.every === 0;
      if (mine) state.ownSent++;
      const to = mine ? own : other;
      await send(app, to.u.token, to.channelId, `busy ${state.sent}`);
      await sleep(o.pause);
    }
  };
  const done = Promise.all(Array.from({ length: o.lanes }, lane)).finally(() => {
    state.finished = true;
  });
  return {
    state,
    async stop() {
      state.stopped = true;
      await done;
    },
  };
}

it('a resume whose slow replay outlasts its bound on a busy instance catches up from the log, never cut off, every event once in log order', {
  timeout: 120_000,
}, async () => {
  const hub = app.deps.realtime!;
  const [reader, other] = await Promise.all([viewer(), viewer()]);
  const { cursor, messageId } = await cursorOf(hub, reader);
  const from = decodeCursor(cursor);
  // At most 30 live rows held (a quarter of the bound): a second of this writer passes it.
  hub.configure({ maxPending: 120 });
  const writer = busyWriter(reader, other, { every: 4, lanes: 2, pause: 5, max: 10_000, ms: 40_000 });
  let resumed: Subscription | undefined;
  try {
    await backlog(hub, reader, messageId, 1000);
    resumed = (await hub.subscribe({ userId: reader.userId }, cursor)) as Subscription;
    const got: string[] = [];
    let liveWhileBusy = false;
    let ownAtLive = 0;
    let marker: string | undefined;
    const deadline = Date.now() + 60_000;
    while (Date.now() < deadline) {
      if (!liveWhileBusy && !resumed.replaying && !writer.state.finished) {
        liveWhileBusy = true;
        ownAtLive = writer.state.ownSent;
      }
      // Busy until it has gone live and 20 more of its channel's messages were sent after.
      if (!marker && (writer.state.finished || (liveWhileBusy && writer.state.ownSent >= ownAtLive + 20))) {
        await writer.stop();
        marker = await send(app, reader.u.token, reader.channelId, 'the end');
      }
      // A consumer slow to take in the backlog (a millisecond or more per row, so its replay takes
      // seconds), and quick enough for what comes after.
      if (got.length < 1000) await sleep(1);
      const r = await within(resumed.next(), 20_000);
      assert.notEqual(r, 'timeout', `the stream stalled after ${got.length} rows`);
      const step = r as IteratorResult<Delivered>;
      assert.equal(step.done, false, `the stream ended after ${got.length} rows`);
      if (step.value.cursor) got.push(step.value.cursor);
      if (marker && step.value.payload.messageId === decodeAnyId(marker).id) break;
    }
    assert.ok(marker, 'the writer stopped');
    assert.ok(liveWhileBusy, 'the subscriber went live while the writer was still busy');
    assert.ok(resumed.restarts >= 1, 'live rows passed the bound during the replay (the old cut-off)');
    assert.equal(resumed.closed, false);
    assertExactlyOnce(got, from, await channelLog(reader, from));
    assert.ok(got.length > 1000 + 20);
  } finally {
    await writer.stop();
    await resumed?.return();
    hub.configure({ maxPending: 5000 });
  }
});

it('live rows past the bound while a consumer does not read during its replay are dropped and read from the log after', {
  timeout: 60_000,
}, async () => {
  const hub = app.deps.realtime!;
  const [reader, other] = await Promise.all([viewer(), viewer()]);
  const { cursor, messageId } = await cursorOf(hub, reader);
  const { messageId: otherMessage } = await cursorOf(hub, other);
  const from = decodeCursor(cursor);
  // A hold limit of 4 live rows, a replay window of 4.
  hub.configure({ maxPending: 16 });
  let resumed: Subscription | undefined;
  try {
    await backlog(hub, reader, messageId, 30);
    const before = hub.subscriberCount;
    resumed = (await hub.subscribe({ userId: reader.userId }, cursor)) as Subscription;
    const first = await within(resumed.next(), 5000);
    assert.notEqual(first, 'timeout');
    const got = [(first as IteratorResult<Delivered>).value.cursor as string];
    // The replay now waits for the reader; rows of another guild, and of its own channel, come
    // live meanwhile: many more than it may hold, or than the slow-consumer bound.
    await backlog(hub, other, otherMessage, 20);
    for (let i = 0; i < 6; i++) await send(app, reader.u.token, reader.channelId, `meanwhile ${i}`);
    await backlog(hub, reader, messageId, 10);
    await hub.poke();
    assert.equal(resumed.closed, false, 'not cut off while it replays');
    assert.equal(resumed.behind, true, 'the rows it could not hold were dropped');
    const expected = await channelLog(reader, from);
    for (let i = 0; got.at(-1) !== expected.at(-1) && i < 200; i++) {
      const r = await within(resumed.next(), 5000);
      assert.notEqual(r, 'timeout', `stalled after ${got.length} of ${expected.length}`);
      got.push((r as IteratorResult<Delivered>).value.cursor as string);
    }
    assertExactlyOnce(got, from, expected);
    assert.equal(resumed.restarts, 1);
    for (let i = 0; resumed.replaying && i < 100; i++) await sleep(20);
    assert.equal(resumed.replaying, false, 'live once it caught up');
    // Live now: the next message comes as it is sent.
    const next = await send(app, reader.u.token, reader.channelId, 'live');
    await hub.poke();
    const r = await within(resumed.next(), 5000);
    assert.notEqual(r, 'timeout');
    assert.equal((r as IteratorResult<Delivered>).value.payload.messageId, decodeAnyId(next).id);
    await resumed.return();
    assert.equal(hub.subscriberCount, before);
  } finally {
    await resumed?.return();
    hub.configure({ maxPending: 5000 });
  }
});

it('a resumed subscriber that is live and stops reading is still cut off as a slow consumer', {
  timeout: 60_000,
}, async () => {
  const hub = app.deps.realtime!;
  const reader = await viewer();
  const { cursor, messageId } = await cursorOf(hub, reader);
  hub.configure({ maxPending: 20 });
  let resumed: Subscription | undefined;
  try {
    await backlog(hub, reader, messageId, 5);
    resumed = (await hub.subscribe({ userId: reader.userId }, cursor)) as Subscription;
    for (let i = 0; i < 5; i++) assert.notEqual(await within(resumed.next(), 5000), 'timeout');
    // Live once a row sent now arrives: live rows wait for the replay's end.
    const now = decodeAnyId(await send(app, reader.u.token, reader.channelId, 'live')).id;
    await hub.poke();
    const r = await within(resumed.next(), 5000);
    assert.notEqual(r, 'timeout');
    assert.equal((r as IteratorResult<Delivered>).value.payload.messageId, now);
    // It stops reading: more of its own rows than the bound come.
    await backlog(hub, reader, messageId, 30);
    for (let i = 0; !resumed.closed && i < 100; i++) await sleep(20);
    let failure: unknown;
    try {
      for (let i = 0; i < 100; i++) if ((await resumed.next()).done) break;
    } catch (err) {
      failure = err;
    }
    assert.ok(failure instanceof SlowConsumerError, `failed with ${failure}`);
  } finally {
    await resumed?.return();
    hub.configure({ maxPending: 5000 });
  }
});

it('a resume over a socket on a busy instance is never closed as a slow consumer and gets every event once in log order', {
  timeout: 120_000,
}, async () => {
  const hub = app.deps.realtime!;
  const [reader, other] = await Promise.all([viewer(), viewer()]);
  const { cursor, messageId } = await cursorOf(hub, reader);
  const from = decodeCursor(cursor);
  hub.configure({ maxPending: 400 });
  const writer = busyWriter(reader, other, { every: 5, lanes: 2, pause: 5, max: 10_000, ms: 40_000 });
  const c = connect(url, reader.u.token);
  try {
    await backlog(hub, reader, messageId, 8000);
    // The writer has been busy a while: the replay starts behind it, and it goes on during it.
    for (let i = 0; writer.state.sent < 50 && i < 200; i++) await sleep(20);
    const s = subscribe(c.client, cursor);
    await s.until((e) => e.length >= 8000, 60_000, 'the replay');
    await writer.stop();
    const end = decodeAnyId(await send(app, reader.u.token, reader.channelId, 'the end')).id;
    await s.until(
      (e) => e.some((x) => x.message?.id && decodeAnyId(x.message.id).id === end),
      20_000,
      'the end',
    );
    assert.equal(c.closed(), undefined, `closed: ${JSON.stringify(c.closed())}`);
    assert.deepEqual(s.errors, []);
    assertExactlyOnce(s.events.map((e) => e.cursor).filter(Boolean), from, await channelLog(reader, from));
    s.stop();
  } finally {
    await writer.stop();
    await c.client.dispose();
    hub.configure({ maxPending: 5000 });
  }
});

it('a subscriber closed while it is behind in its replay ends there: unregistered, nothing more read or delivered', {
  timeout: 60_000,
}, async () => {
  const hub = app.deps.realtime!;
  const [reader, other] = await Promise.all([viewer(), viewer()]);
  const { cursor, messageId } = await cursorOf(hub, reader);
  const { messageId: otherMessage } = await cursorOf(hub, other);
  hub.configure({ maxPending: 16 });
  try {
    await backlog(hub, reader, messageId, 30);
    const before = hub.subscriberCount;
    const resumed = (await hub.subscribe({ userId: reader.userId }, cursor)) as Subscription;
    assert.notEqual(await within(resumed.next(), 5000), 'timeout');
    await backlog(hub, other, otherMessage, 20);
    assert.equal(resumed.behind, true);
    await resumed.return();
    assert.equal(hub.subscriberCount, before);
    // The paused replay wakes to the close and stops; more rows come to nobody.
    await backlog(hub, reader, messageId, 10);
    await sleep(200);
    assert.equal(resumed.replaying, false);
    assert.deepEqual(await resumed.next(), { value: undefined, done: true });
    assert.equal(resumed.restarts, 0, 'no second replay after the close');
  } finally {
    hub.configure({ maxPending: 5000 });
  }
});
