import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import { and, eq, sql } from 'drizzle-orm';
import { events } from '../core/db/tables.ts';
import { isBlockedBy } from '../core/services/relationship.service.ts';
import { decodeAnyId, encodeId } from '../schema/builder.ts';
import { createTestApp, fails, ok, signUp, type TestApp, type TestUser } from './helpers.ts';

let app: TestApp;
before(async () => {
  app = await createTestApp();
});
after(() => app.destroy());

const op = (name: string) => `mutation($id: ID!) { ${name}(userId: $id) { kind user { id } } }`;
const SEND = op('sendFriendRequest');
const ACCEPT = op('acceptFriendRequest');
const DECLINE = op('declineFriendRequest');
const REMOVE = op('removeFriend');
const BLOCK = op('blockUser');
const UNBLOCK = op('unblockUser');

const uuid = (u: TestUser) => decodeAnyId(u.id).id;

/** The viewer's relationships as { otherGlobalId: kind }. */
async function rels(u: TestUser): Promise<Record<string, string>> {
  const d = await ok(app, '{ viewer { relationships { kind user { id } } } }', {}, u.token);
  return Object.fromEntries(d.viewer.relationships.map((r: any) => [r.user.id, r.kind]));
}

async function relEvents(u: TestUser) {
  const rows = await app.deps.db
    .select({ payload: events.payload })
    .from(events)
    .where(and(eq(events.type, 'RELATIONSHIP_UPDATED'), eq(events.userId, uuid(u))))
    .orderBy(events.seq);
  return rows.map((r) => r.payload as { targetId: string; kind: string | null });
}

async function eventCount(): Promise<number> {
  const [r] = await app.deps.db.select({ n: sql<number>`count(*)::int` }).from(events);
  return r.n;
}

async function pair() {
  return [await signUp(app), await signUp(app)] as const;
}

describe('friend requests', () => {
  it('send -> OUTGOING/INCOMING, accept -> FRIEND on both sides, with an event for each side', async () => {
    const [a, b] = await pair();
    const s = await ok(app, SEND, { id: b.id }, a.token);
    assert.deepEqual(s.sendFriendRequest, { kind: 'OUTGOING', user: { id: b.id } });
    assert.deepEqual(await rels(a), { [b.id]: 'OUTGOING' });
    assert.deepEqual(await rels(b), { [a.id]: 'INCOMING' });
    const r = await ok(app, ACCEPT, { id: a.id }, b.token);
    assert.deepEqual(r.acceptFriendRequest, { kind: 'FRIEND', user: { id: a.id } });
    assert.deepEqual(await rels(a), { [b.id]: 'FRIEND' });
    assert.deepEqual(await rels(b), { [a.id]: 'FRIEND' });
    assert.deepEqual(await relEvents(a), [
      { targetId: uuid(b), kind: 'OUTGOING' },
      { targetId: uuid(b), kind: 'FRIEND' },
    ]);
    assert.deepEqual(await relEvents(b), [
      { targetId: uuid(a), kind: 'INCOMING' },
      { targetId: uuid(a), kind: 'FRIEND' },
    ]);
  });

  it('answers `since` as stored, matching Viewer.relationships', async () => {
    const [a, b] = await pair();
    const s = await ok(
      app,
      'mutation($id: ID!) { sendFriendRequest(userId: $id) { since } }',
      { id: b.id },
      a.token,
    );
    const l = await ok(app, '{ viewer { relationships { since } } }', {}, a.token);
    assert.equal(s.sendFriendRequest.since, l.viewer.relationships[0].since);
    assert.ok(Date.parse(s.sendFriendRequest.since) > Date.now() - 60_000);
  });

  it('requesting someone who already requested you makes you friends', async () => {
    const [a, b] = await pair();
    await ok(app, SEND, { id: b.id }, a.token);
    const r = await ok(app, SEND, { id: a.id }, b.token);
    assert.equal(r.sendFriendRequest.kind, 'FRIEND');
    assert.deepEqual(await rels(a), { [b.id]: 'FRIEND' });
  });

  it('refuses duplicates and requests to friends or to users one blocked with CONFLICT', async () => {
    const [a, b] = await pair();
    await ok(app, SEND, { id: b.id }, a.token);
    await fails(app, 'CONFLICT', SEND, { id: b.id }, a.token);
    await ok(app, ACCEPT, { id: a.id }, b.token);
    await fails(app, 'CONFLICT', SEND, { id: b.id }, a.token);
    await fails(app, 'CONFLICT', SEND, { id: a.id }, b.token);
    const c = await signUp(app);
    await ok(app, BLOCK, { id: c.id }, a.token);
    const before = await eventCount();
    await fails(app, 'CONFLICT', SEND, { id: c.id }, a.token);
    assert.equal(await eventCount(), before);
    assert.deepEqual(await rels(c), {});
  });

  it('answers NOT_FOUND for unknown, deactivated and blocking users, writing nothing', async () => {
    const [a, blocker] = await pair();
    await ok(app, BLOCK, { id: a.id }, blocker.token);
    const before = await eventCount();
    const e = await fails(app, 'NOT_FOUND', SEND, { id: blocker.id }, a.token);
    assert.doesNotMatch(e.message, /block/i);
    assert.deepEqual(await rels(a), {});
    assert.deepEqual(await rels(blocker), { [a.id]: 'BLOCKED' });
    const ghost = encodeId('User', '01900000-0000-7000-8000-000000000000');
    await fails(app, 'NOT_FOUND', SEND, { id: ghost }, a.token);
    const gone = await signUp(app);
    await ok(app, 'mutation { deactivateAccount(password: "correct horse battery") }', {}, gone.token);
    await fails(app, 'NOT_FOUND', SEND, { id: gone.id }, a.token);
    assert.equal(await eventCount(), before);
  });

  it('refuses yourself and bad ids with BAD_USER_INPUT, and strangers with UNAUTHENTICATED', async () => {
    const [a] = await pair();
    for (const m of [SEND, BLOCK]) await fails(app, 'BAD_USER_INPUT', m, { id: a.id }, a.token);
    for (const m of [SEND, ACCEPT, DECLINE, REMOVE, BLOCK, UNBLOCK]) {
      await fails(app, 'BAD_USER_INPUT', m, { id: 'garbage' }, a.token);
      await fails(app, 'BAD_USER_INPUT', m, { id: encodeId('Guild', uuid(a)) }, a.token);
      await fails(app, 'UNAUTHENTICATED', m, { id: a.id });
    }
    assert.deepEqual(await rels(a), {});
  });

  it('accept needs an incoming request (NOT_FOUND otherwise, including for the sender)', async () => {
    const [a, b] = await pair();
    await fails(app, 'NOT_FOUND', ACCEPT, { id: b.id }, a.token);
    await ok(app, SEND, { id: b.id }, a.token);
    await fails(app, 'NOT_FOUND', ACCEPT, { id: b.id }, a.token);
    assert.deepEqual(await rels(a), { [b.id]: 'OUTGOING' });
  });

  it('decline removes an incoming request; it also cancels one’s own outgoing request', async () => {
    const [a, b] = await pair();
    await ok(app, SEND, { id: b.id }, a.token);
    const d = await ok(app, DECLINE, { id: a.id }, b.token);
    assert.equal(d.declineFriendRequest, null);
    assert.deepEqual(await rels(a), {});
    assert.deepEqual(await rels(b), {});
    assert.deepEqual((await relEvents(a)).at(-1), { targetId: uuid(b), kind: null });
    await ok(app, SEND, { id: b.id }, a.token);
    await ok(app, DECLINE, { id: b.id }, a.token);
    assert.deepEqual(await rels(a), {});
    assert.deepEqual(await rels(b), {});
    await fails(app, 'NOT_FOUND', DECLINE, { id: b.id }, a.token);
  });

  it('decline does not touch friends or blocks (NOT_FOUND)', async () => {
    const [a, b] = await pair();
    await ok(app, SEND, { id: b.id }, a.token);
    await ok(app, ACCEPT, { id: a.id }, b.token);
    await fails(app, 'NOT_FOUND', DECLINE, { id: b.id }, a.token);
    const c = await signUp(app);
    await ok(app, BLOCK, { id: c.id }, a.token);
    await fails(app, 'NOT_FOUND', DECLINE, { id: c.id }, a.token);
    assert.deepEqual(await rels(a), { [b.id]: 'FRIEND', [c.id]: 'BLOCKED' });
  });
});

describe('friends and blocks', () => {
  it('removeFriend ends the friendship on both sides; NOT_FOUND when not friends', async () => {
    const [a, b] = await pair();
    await fails(app, 'NOT_FOUND', REMOVE, { id: b.id }, a.token);
    await ok(app, SEND, { id: b.id }, a.token);
    await fails(app, 'NOT_FOUND', REMOVE, { id: b.id }, a.token);
    await ok(app, ACCEPT, { id: a.id }, b.token);
    const r = await ok(app, REMOVE, { id: a.id }, b.token);
    assert.equal(r.removeFriend, null);
    assert.deepEqual(await rels(a), {});
    assert.deepEqual(await rels(b), {});
    assert.deepEqual((await relEvents(a)).at(-1), { targetId: uuid(b), kind: null });
  });

  it('blocking ends a friendship; the blocked side only sees the friendship end', async () => {
    const [a, b] = await pair();
    await ok(app, SEND, { id: b.id }, a.token);
    await ok(app, ACCEPT, { id: a.id }, b.token);
    const r = await ok(app, BLOCK, { id: b.id }, a.token);
    assert.deepEqual(r.blockUser, { kind: 'BLOCKED', user: { id: b.id } });
    assert.deepEqual(await rels(a), { [b.id]: 'BLOCKED' });
    assert.deepEqual(await rels(b), {});
    assert.deepEqual((await relEvents(b)).at(-1), { targetId: uuid(a), kind: null });
    assert.equal(await isBlockedBy(app.deps.db, uuid(b), uuid(a)), true);
    assert.equal(await isBlockedBy(app.deps.db, uuid(a), uuid(b)), false);
  });

  it('blocking removes pending requests either way, and tells the blocked user nothing new otherwise', async () => {
    const [a, b] = await pair();
    await ok(app, SEND, { id: a.id }, b.token);
    await ok(app, BLOCK, { id: b.id }, a.token);
    assert.deepEqual(await rels(b), {});
    const [c, d] = await pair();
    await ok(app, SEND, { id: d.id }, c.token);
    await ok(app, BLOCK, { id: d.id }, c.token);
    assert.deepEqual(await rels(d), {});
    const [e, f] = await pair();
    await ok(app, BLOCK, { id: f.id }, e.token);
    assert.deepEqual(await relEvents(f), []);
  });

  it('both may block each other; one unblocking leaves the other’s block in force', async () => {
    const [a, b] = await pair();
    await ok(app, BLOCK, { id: b.id }, a.token);
    await ok(app, BLOCK, { id: a.id }, b.token);
    assert.deepEqual(await rels(a), { [b.id]: 'BLOCKED' });
    assert.deepEqual(await rels(b), { [a.id]: 'BLOCKED' });
    const u = await ok(app, UNBLOCK, { id: b.id }, a.token);
    assert.equal(u.unblockUser, null);
    assert.deepEqual(await rels(a), {});
    assert.deepEqual(await rels(b), { [a.id]: 'BLOCKED' });
    await fails(app, 'NOT_FOUND', SEND, { id: b.id }, a.token);
  });

  it('refuses a second block with CONFLICT, unknown users with NOT_FOUND, unblocking nothing with NOT_FOUND', async () => {
    const [a, b] = await pair();
    await ok(app, BLOCK, { id: b.id }, a.token);
    await fails(app, 'CONFLICT', BLOCK, { id: b.id }, a.token);
    await fails(
      app,
      'NOT_FOUND',
      BLOCK,
      { id: encodeId('User', '01900000-0000-7000-8000-000000000001') },
      a.token,
    );
    await fails(app, 'NOT_FOUND', UNBLOCK, { id: a.id }, b.token);
    await ok(app, UNBLOCK, { id: b.id }, a.token);
    await fails(app, 'NOT_FOUND', UNBLOCK, { id: b.id }, a.token);
    // After unblocking, a friendship can start again.
    await ok(app, SEND, { id: b.id }, a.token);
    await ok(app, ACCEPT, { id: a.id }, b.token);
    assert.deepEqual(await rels(a), { [b.id]: 'FRIEND' });
  });

  it('serializes two users requesting each other at the same moment into a friendship', async () => {
    const [a, b] = await pair();
    const [x, y] = await Promise.all([
      ok(app, SEND, { id: b.id }, a.token),
      ok(app, SEND, { id: a.id }, b.token),
    ]);
    assert.deepEqual([x.sendFriendRequest.kind, y.sendFriendRequest.kind].sort(), ['FRIEND', 'OUTGOING']);
    assert.deepEqual(await rels(a), { [b.id]: 'FRIEND' });
    assert.deepEqual(await rels(b), { [a.id]: 'FRIEND' });
  });
});
