/**
 * A subscriber's cached answer for a channel lapses 22.5–37.5 s after its load; the row that
 * found it lapsed waited for the load, and in a busy channel that subscriber's frame went out
 * after the whole fan-out (bench:fanout, paced at 1,000 sockets: a third of the messages had
 * frames written after every other socket's, up to 30 ms later). An answer used with less than
 * RENEW_MS left is loaded again beside the delivery, and kept only if nothing that may change
 * access was read or committed since the load began. Asserted on whether a check waits (a
 * promise) and on what is kept, with the clock moved (Date.now), not on time.
 */
import assert from 'node:assert/strict';
import { after, before, it, mock } from 'node:test';
import type { Delivered } from '../core/realtime/subscription.ts';
import { ViewerAccess } from '../core/realtime/visibility.ts';
import { accessCacheOf } from '../core/services/access-cache.ts';
import { decodeAnyId } from '../schema/builder.ts';
import { createTestApp, ok, signUp, type TestApp } from './helpers.ts';
import { guildWithChannel, invite, send, untilLive } from './realtime-helpers.ts';

let app: TestApp;
before(async () => {
  app = await createTestApp({ rateLimits: false });
});
after(() => app.destroy());

const raw = (id: string) => decodeAnyId(id).id;
type Stream = AsyncIterableIterator<Delivered>;
interface Entry {
  until: number;
  renewing?: Promise<void>;
}
const entryOf = (a: ViewerAccess, channelId: string) =>
  (a as unknown as { channels?: Map<string, Entry> }).channels?.get(channelId);

/** A member's view of a message row of its guild's channel, its answer loaded (lapsing in 30 s). */
async function setUp() {
  const [owner, member] = await Promise.all([signUp(app), signUp(app)]);
  const { guildId, channelId } = await guildWithChannel(app, owner.token);
  await invite(app, owner.token, guildId, member.token);
  const s = (await app.deps.realtime!.subscribe({ userId: raw(owner.id) }, null)) as Stream;
  let row: Delivered;
  try {
    await untilLive(app, [owner]);
    await send(app, owner.token, channelId, 'hello');
    // Bounded: the stream's next row is the message (nothing else is written meanwhile).
    const r = await Promise.race([
      s.next(),
      new Promise<never>((_, reject) =>
        setTimeout(() => reject(new Error('no row in 30 s')), 30_000).unref(),
      ),
    ]);
    row = r.value as Delivered;
  } finally {
    await s.return!();
  }
  assert.equal(row.type, 'MESSAGE_CREATED');
  const access = new ViewerAccess(app.deps.db, raw(member.id));
  // The lapse without its random spread: 30 s after the load.
  const random = mock.method(Math, 'random', () => 0.5);
  let first: boolean | Promise<boolean>;
  try {
    first = access.canSee(row, false);
    assert.ok(first instanceof Promise, 'the first check loads the answer');
  } finally {
    random.mock.restore();
  }
  assert.equal(await first, true);
  const c = raw(channelId);
  const entry = entryOf(access, c)!;
  assert.ok(entry, 'the answer is kept');
  return { access, row, c, entry, owner, member, guildId };
}

/** Date.now() as if `at` were now (the clock goes on from there). */
function clockAt(at: number) {
  const real = Date.now;
  const offset = at - real();
  return mock.method(Date, 'now', () => real() + offset);
}

it('an answer used shortly before it lapses is loaded again meanwhile: the row after the lapse does not wait for a load', {
  timeout: 120_000,
}, async () => {
  const { access, row, c, entry } = await setUp();
  // 2 s before it lapses, as a busy channel's next row would come (the answer loaded then is
  // kept from then on: 30 s, without the random spread).
  let clock = clockAt(entry.until - 2_000);
  const random = mock.method(Math, 'random', () => 0.5);
  try {
    // Still within its life: answered at once (before and after the change).
    assert.equal(access.canSee(row, false), true);
    // The load it began (if any) settles; its answer replaces the one that was about to lapse.
    await entry.renewing;
  } finally {
    clock.mock.restore();
    random.mock.restore();
  }
  clock = clockAt(entry.until + 1_000);
  try {
    const after = access.canSee(row, false);
    assert.notEqual(entryOf(access, c), entry, 'the answer was loaded again');
    // Before: a promise (the row waited for a load of the answer, behind the rest of the fan-out).
    assert.equal(after instanceof Promise ? 'waits for a load' : after, true);
  } finally {
    clock.mock.restore();
  }
});

it('an answer loaded again is not kept when access may have changed while it loaded', {
  timeout: 120_000,
}, async () => {
  const { access, row, c, entry } = await setUp();
  const clock = clockAt(entry.until - 2_000);
  try {
    assert.equal(access.canSee(row, false), true);
  } finally {
    clock.mock.restore();
  }
  assert.ok(entry.renewing, 'loaded again');
  // What the tailer does when it reads an access-changing row (and a commit here of one), before
  // any subscriber sees the row: the load begun before it may hold what the row changed.
  accessCacheOf(app.deps.database).clear();
  await entry.renewing;
  assert.equal(entryOf(access, c), entry, 'the answer loaded across the change is not kept');
  // It lapses as it would have: the next row waits for a load.
  const later = clockAt(entry.until + 1_000);
  try {
    const after = access.canSee(row, false);
    assert.ok(after instanceof Promise, 'loaded again, after the change');
    assert.equal(await after, true);
  } finally {
    later.mock.restore();
  }
});

it('an answer loaded again after an access change the subscriber has not reached yet does not replace the one its earlier rows are judged by', {
  timeout: 120_000,
}, async () => {
  const { access, row, entry, owner, member, guildId } = await setUp();
  // The member is kicked. The tailer reads the kick with the rows before it (this message among
  // them) and moves the access cache's generation before handing them out (a commit here moves it
  // at once); this subscriber has not observed the kick yet: it is still on the rows before it,
  // and those are judged by what it could see before the kick.
  const s = (await app.deps.realtime!.subscribe({ userId: raw(owner.id) }, null)) as Stream;
  try {
    await untilLive(app, [owner]);
    await ok(
      app,
      `mutation($g: ID!, $u: ID!) { kickMember(guildId: $g, userId: $u) }`,
      { g: guildId, u: member.id },
      owner.token,
    );
    // The tailer has read the kick once the owner's stream has it (bounded: 20 rows, 30 s each).
    for (let i = 0; ; i++) {
      assert.ok(i < 20, 'the kick reached the owner');
      const r = await Promise.race([
        s.next(),
        new Promise<never>((_, reject) =>
          setTimeout(() => reject(new Error('no row in 30 s')), 30_000).unref(),
        ),
      ]);
      if ((r.value as Delivered).type === 'MEMBER_KICKED') break;
    }
  } finally {
    await s.return!();
  }
  const clock = clockAt(entry.until - 2_000);
  try {
    // A row before the kick, 2 s before the answer lapses: answered from it.
    assert.equal(access.canSee(row, false), true);
    // Whatever load that began settles (the subscriber waits meanwhile on another row's check,
    // say), still before it reaches the kick.
    await entry.renewing;
    // The next row before the kick (the same message row stands for it): still the member's.
    // Before: false (the answer loaded after the kick, with the generation already moved, was
    // kept, and the row the member could see was withheld: lost to it).
    assert.equal(
      access.canSee(row, false),
      true,
      'a row from before the kick, judged before the subscriber reached it',
    );
  } finally {
    clock.mock.restore();
  }
  // Once it reaches the kick, the answer goes, and the next load says no.
  access.observe({
    xid: undefined,
    type: 'MEMBER_KICKED',
    guildId: raw(guildId),
    channelId: null,
    userId: null,
    payload: { userId: raw(member.id) },
  } as never);
  const later = access.canSee(row, false);
  assert.equal(later instanceof Promise ? await later : later, false);
});
