import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import { and, eq, sql } from 'drizzle-orm';
import { channels, events } from '../core/db/tables.ts';
import { BanterError } from '../core/errors.ts';
import { assertCanSendInDm, recipientsByChannel } from '../core/services/direct.service.ts';
import { decodeAnyId, encodeId } from '../schema/builder.ts';
import { createTestApp, fails, ok, signUp, type TestApp, type TestUser } from './helpers.ts';

let app: TestApp;
before(async () => {
  app = await createTestApp();
});
after(() => app.destroy());

const OPEN = `mutation($ids: [ID!]!) { openDirectChannel(userIds: $ids) { id type guild { id } recipients { id } } }`;
const CHANNEL = `query($id: ID!) { channel(id: $id) { id type recipients { id username } } }`;
const LIST = '{ viewer { directChannels { id type recipients { id } } } }';
const BLOCK = 'mutation($id: ID!) { blockUser(userId: $id) { kind } }';

const uuid = (globalId: string) => decodeAnyId(globalId).id;
const open = async (u: TestUser, others: TestUser[]) =>
  (await ok(app, OPEN, { ids: others.map((o) => o.id) }, u.token)).openDirectChannel;
const users = async (n: number) => {
  const out: TestUser[] = [];
  for (let i = 0; i < n; i++) out.push(await signUp(app));
  return out;
};

async function channelCount(): Promise<number> {
  const [r] = await app.deps.db.select({ n: sql<number>`count(*)::int` }).from(channels);
  return r.n;
}

describe('openDirectChannel: DMs', () => {
  it('creates a DM once and returns the same channel to both sides', async () => {
    const [a, b] = await users(2);
    const dm = await open(a, [b]);
    assert.equal(dm.type, 'DM');
    assert.equal(dm.guild, null);
    assert.deepEqual(dm.recipients.map((r: any) => r.id).sort(), [a.id, b.id].sort());
    assert.equal((await open(a, [b])).id, dm.id);
    assert.equal((await open(b, [a])).id, dm.id);
    // The viewer and duplicates are dropped before deciding DM vs group DM.
    assert.equal((await open(a, [b, a, b])).id, dm.id);
    const evs = await app.deps.db
      .select({ userId: events.userId, channelId: events.channelId })
      .from(events)
      .where(and(eq(events.type, 'DIRECT_CHANNEL_CREATED'), eq(events.channelId, uuid(dm.id))));
    assert.deepEqual(evs.map((e) => e.userId).sort(), [uuid(a.id), uuid(b.id)].sort());
  });

  it('lets recipients read the channel by id; anyone else gets NOT_FOUND', async () => {
    const [a, b, stranger] = await users(3);
    const dm = await open(a, [b]);
    const seen = await ok(app, CHANNEL, { id: dm.id }, b.token);
    assert.equal(seen.channel.type, 'DM');
    assert.equal(seen.channel.recipients.length, 2);
    await fails(app, 'NOT_FOUND', CHANNEL, { id: dm.id }, stranger.token);
    await fails(app, 'UNAUTHENTICATED', CHANNEL, { id: dm.id });
  });

  it('opens the same DM once when both sides open it at the same moment', async () => {
    const [a, b] = await users(2);
    const before = await channelCount();
    const [x, y] = await Promise.all([open(a, [b]), open(b, [a])]);
    assert.equal(x.id, y.id);
    assert.equal(await channelCount(), before + 1);
  });

  it('answers NOT_FOUND when the other user blocked the viewer, unknown or deactivated, writing nothing', async () => {
    const [a, blocker, gone] = await users(3);
    await ok(app, BLOCK, { id: a.id }, blocker.token);
    await ok(app, 'mutation { deactivateAccount(password: "correct horse battery") }', {}, gone.token);
    const before = await channelCount();
    const e = await fails(app, 'NOT_FOUND', OPEN, { ids: [blocker.id] }, a.token);
    assert.doesNotMatch(e.message, /block/i);
    await fails(app, 'NOT_FOUND', OPEN, { ids: [gone.id] }, a.token);
    await fails(
      app,
      'NOT_FOUND',
      OPEN,
      { ids: [encodeId('User', '01900000-0000-7000-8000-000000000000')] },
      a.token,
    );
    assert.equal(await channelCount(), before);
    // The blocker may still open a DM with the user they blocked.
    assert.equal((await open(blocker, [a])).type, 'DM');
  });

  it('hides an existing DM from a user who was blocked after it was opened', async () => {
    const [a, b] = await users(2);
    const dm = await open(a, [b]);
    await ok(app, BLOCK, { id: a.id }, b.token);
    await fails(app, 'NOT_FOUND', OPEN, { ids: [b.id] }, a.token);
    // The channel itself stays (history); sending is what the block stops (assertCanSendInDm).
    assert.equal((await ok(app, CHANNEL, { id: dm.id }, a.token)).channel.id, dm.id);
  });

  it('refuses empty lists, only-self lists and bad ids with BAD_USER_INPUT; strangers with UNAUTHENTICATED', async () => {
    const [a] = await users(1);
    await fails(app, 'BAD_USER_INPUT', OPEN, { ids: [] }, a.token);
    await fails(app, 'BAD_USER_INPUT', OPEN, { ids: [a.id, a.id] }, a.token);
    await fails(app, 'BAD_USER_INPUT', OPEN, { ids: ['nope'] }, a.token);
    await fails(app, 'BAD_USER_INPUT', OPEN, { ids: [encodeId('Channel', uuid(a.id))] }, a.token);
    await fails(app, 'UNAUTHENTICATED', OPEN, { ids: [a.id] });
  });
});

describe('openDirectChannel: group DMs', () => {
  it('creates a new GROUP_DM each time, with the viewer included and an event per recipient', async () => {
    const [a, b, c] = await users(3);
    const g1 = await open(a, [b, c, b]);
    const g2 = await open(a, [b, c]);
    assert.equal(g1.type, 'GROUP_DM');
    assert.notEqual(g1.id, g2.id);
    assert.deepEqual(g1.recipients.map((r: any) => r.id).sort(), [a.id, b.id, c.id].sort());
    const evs = await app.deps.db
      .select({ userId: events.userId })
      .from(events)
      .where(and(eq(events.type, 'DIRECT_CHANNEL_CREATED'), eq(events.channelId, uuid(g1.id))));
    assert.deepEqual(evs.map((e) => e.userId).sort(), [a.id, b.id, c.id].map(uuid).sort());
    assert.equal((await ok(app, CHANNEL, { id: g1.id }, c.token)).channel.type, 'GROUP_DM');
  });

  it('allows 10 people including the viewer and refuses 11 with BAD_USER_INPUT', async () => {
    const [a, ...others] = await users(11);
    const before = await channelCount();
    await fails(app, 'BAD_USER_INPUT', OPEN, { ids: others.map((o) => o.id) }, a.token);
    assert.equal(await channelCount(), before);
    const nine = others.slice(0, 9);
    // Duplicates and the viewer do not count against the limit.
    const g = await open(a, [...nine, nine[0], a]);
    assert.equal(g.recipients.length, 10);
    await fails(app, 'BAD_USER_INPUT', OPEN, { ids: Array(101).fill(a.id) }, a.token);
  });

  it('answers NOT_FOUND when any member blocked the viewer, creating nothing', async () => {
    const [a, b, blocker] = await users(3);
    await ok(app, BLOCK, { id: a.id }, blocker.token);
    const before = await channelCount();
    await fails(app, 'NOT_FOUND', OPEN, { ids: [b.id, blocker.id] }, a.token);
    assert.equal(await channelCount(), before);
  });
});

describe('directChannels and recipients', () => {
  it('lists the viewer’s DMs and group DMs, newest first, and nothing of others', async () => {
    const [a, b, c, stranger] = await users(4);
    const dm = await open(a, [b]);
    const group = await open(c, [a, b]);
    const la = await ok(app, LIST, {}, a.token);
    assert.deepEqual(
      la.viewer.directChannels.map((x: any) => [x.id, x.type]),
      [
        [group.id, 'GROUP_DM'],
        [dm.id, 'DM'],
      ],
    );
    assert.equal(la.viewer.directChannels[0].recipients.length, 3);
    const lc = await ok(app, LIST, {}, c.token);
    assert.deepEqual(
      lc.viewer.directChannels.map((x: any) => x.id),
      [group.id],
    );
    assert.deepEqual((await ok(app, LIST, {}, stranger.token)).viewer.directChannels, []);
  });

  it('answers an empty recipients list for guild channels', async () => {
    const [a] = await users(1);
    const g = await ok(
      app,
      'mutation { createGuild(input: { name: "G" }) { channels { id recipients { id } } } }',
      {},
      a.token,
    );
    assert.deepEqual(g.createGuild.channels[0].recipients, []);
  });
});

describe('assertCanSendInDm', () => {
  const row = async (globalId: string) => {
    const [c] = await app.deps.db
      .select()
      .from(channels)
      .where(eq(channels.id, uuid(globalId)));
    return c;
  };
  const code = async (p: Promise<void>) => {
    try {
      await p;
      return 'ok';
    } catch (err) {
      return err instanceof BanterError ? err.code : String(err);
    }
  };

  it('is FORBIDDEN only in a 1:1 DM whose other recipient blocked the sender', async () => {
    const [a, b, c] = await users(3);
    const dm = await row((await open(a, [b])).id);
    const group = await row((await open(a, [b, c])).id);
    const db = app.deps.db;
    assert.equal(await code(assertCanSendInDm(db, uuid(a.id), dm)), 'ok');
    await ok(app, BLOCK, { id: a.id }, b.token);
    assert.equal(await code(assertCanSendInDm(db, uuid(a.id), dm)), 'FORBIDDEN');
    // The blocker may still send; group DMs do not enforce blocks.
    assert.equal(await code(assertCanSendInDm(db, uuid(b.id), dm)), 'ok');
    assert.equal(await code(assertCanSendInDm(db, uuid(a.id), group)), 'ok');
  });
});

// directChannels has no page: a user's every DM goes into one recipients batch, whose ids were
// one bind parameter each (inArray), so past 65,535 DMs the listing failed (the wire protocol's
// bound). Called directly: making that many DMs through the API would take minutes.
it('loads the recipients of more channels than a statement has parameters', async () => {
  const [a, b] = await users(2);
  const dm = (await open(a, [b])).id;
  const ids = [uuid(dm), ...Array.from({ length: 65_600 }, () => crypto.randomUUID())];
  const got = await recipientsByChannel(app.deps, ids);
  assert.equal(got.length, ids.length);
  assert.deepEqual(got[0].map((u) => u.id).sort(), [uuid(a.id), uuid(b.id)].sort());
  assert.ok(got.slice(1).every((r) => r.length === 0));
});
