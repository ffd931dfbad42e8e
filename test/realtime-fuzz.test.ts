/**
 * Event log rows of every shape a hand edit, a restore, a writer's bug or another version of the
 * server (a rolling deploy) may leave: every type the server knows and some it does not, payloads
 * with fields missing, of the wrong JSON type, huge, invalid ids, ids of what the row's viewer may
 * not see; guild, channel and user columns null, pointing at nothing, at another guild's channel or
 * at a DM. Seeded and bounded: FUZZ_ROWS rows (default 24) in batches of FUZZ_BATCH, FUZZ_SEED.
 *
 * After each batch, for a member of the guild the rows are about and for a bystander in another
 * guild, over graphql-ws and SSE, live and replayed from before the batch: each stream reaches a
 * message sent after the batch (no stall, nothing instance-wide stops), a stream closed to resume
 * (1013, or SSE's resume item) is resumed, and none is closed again and again with no progress for
 * STUCK_MS (no endless resume loop); no content of a channel the viewer cannot see reaches it (no
 * leak); the process sees no unhandled rejection or exception.
 */
import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import { after, before, it } from 'node:test';
import { sql } from 'drizzle-orm';
import { resultRows } from '../core/db/client.ts';
import { decodeCursor, encodeCursor, ORIGIN } from '../core/realtime/cursor.ts';
import { decodeAnyId } from '../schema/builder.ts';
import { createTestApp, ok, signUp, type TestApp } from './helpers.ts';
import { connect, guildWithChannel, invite, send, sseStream } from './realtime-helpers.ts';

const SEED = Number(process.env.FUZZ_SEED ?? 1);
const ROWS = Number(process.env.FUZZ_ROWS ?? 24);
const BATCH = Number(process.env.FUZZ_BATCH ?? 12);
/**
 * Longest a stream may go on being closed with nothing delivered in between: an event that fails
 * is passed after REPEATS rounds a second apart (core/realtime/failures.ts); past this, it loops.
 */
const STUCK_MS = 10_000;
/** a closed stream resumes after this (a client's back-off) */
const RESUME_MS = 100;
/** longest a batch may take to reach every stream's sentinel */
const BATCH_MS = 60_000;

const QUERY = `subscription($after: String) { events(after: $after) { __typename cursor
  ... on MessageCreated { message { id content } }
  ... on MessageUpdated { message { id content } }
  ... on MessageDeleted { messageId channelId }
  ... on ReactionAdded { emoji user { id } message { id content } }
  ... on ReactionRemoved { emoji user { id } message { id content } }
  ... on MessagePinned { message { id content } }
  ... on MessageUnpinned { message { id content } }
  ... on ChannelCreated { channel { id name } }
  ... on ChannelUpdated { channel { id name } }
  ... on ChannelDeleted { channelId deletedIn: guildId }
  ... on GuildUpdated { guild { id name } }
  ... on GuildDeleted { guildId }
  ... on MemberJoined { guildId user { id } }
  ... on MemberLeft { guildId user { id } }
  ... on MemberUpdated { guildId user { id } }
  ... on MemberKicked { guildId user { id } }
  ... on MemberBanned { guildId user { id } }
  ... on RoleCreated { guildId roleId }
  ... on RoleUpdated { guildId roleId }
  ... on RoleDeleted { guildId roleId }
  ... on PermissionsChanged { guildId overwriteOn: channelId }
  ... on ReadStateUpdated { channelId lastReadMessageId }
  ... on DirectChannelCreated { channel { id name } }
  ... on RelationshipUpdated { user { id } kind }
  ... on TypingStarted { channelId user { id } }
  ... on PresenceChanged { user { id } status }
  ... on UnknownEvent { type }
} }`;

const TYPES = [
  'MESSAGE_CREATED',
  'MESSAGE_UPDATED',
  'MESSAGE_DELETED',
  'REACTION_ADDED',
  'REACTION_REMOVED',
  'MESSAGE_PINNED',
  'MESSAGE_UNPINNED',
  'CHANNEL_CREATED',
  'CHANNEL_UPDATED',
  'CHANNEL_DELETED',
  'GUILD_UPDATED',
  'GUILD_DELETED',
  'MEMBER_JOINED',
  'MEMBER_LEFT',
  'MEMBER_UPDATED',
  'MEMBER_KICKED',
  'MEMBER_BANNED',
  'ROLE_CREATED',
  'ROLE_UPDATED',
  'ROLE_DELETED',
  'PERMISSIONS_CHANGED',
  'READ_STATE_UPDATED',
  'DIRECT_CHANNEL_CREATED',
  'RELATIONSHIP_UPDATED',
  // never logged (ephemeral), and types of a newer version
  'TYPING_STARTED',
  'PRESENCE_CHANGED',
  'THREAD_CREATED',
  'MESSAGE_FORWARDED',
];

/** mulberry32 */
function random(seed: number) {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

let app: TestApp;
let wsUrl: string;
let httpUrl: string;
const crashes: unknown[] = [];
const onCrash = (err: unknown) => {
  console.log('crash', err, JSON.stringify(err));
  crashes.push(err);
};
before(async () => {
  app = await createTestApp({ rateLimits: false });
  const port = await app.start(0);
  wsUrl = `ws://127.0.0.1:${port}/graphql`;
  httpUrl = `http://127.0.0.1:${port}/graphql`;
  process.on('unhandledRejection', onCrash);
  process.on('uncaughtException', onCrash);
});
after(async () => {
  process.off('unhandledRejection', onCrash);
  process.off('uncaughtException', onCrash);
  await app.destroy();
});

const raw = (globalId: string) => decodeAnyId(globalId).id;
const seqOf = (cursor: string) => decodeCursor(cursor).seq;

/** A stream that resumes from its last cursor when it is closed to (1013, SSE's resume item). */
interface Reader {
  name: string;
  events: any[];
  /** errors that came as results (an event that failed for good goes out with its error) */
  errors: any[];
  /** times it was closed and resumed */
  closes: number;
  /** resumes if it ended; throws when it has been closed again and again for STUCK_MS with no progress */
  check(): void;
  stop(): void;
}

function wsReader(name: string, token: string, from: string | null): Reader {
  let cursor = from;
  let ended: unknown;
  let endedAt = 0;
  let progress = Date.now();
  let stop = () => {};
  let dispose = () => {};
  const r: Reader = {
    name,
    events: [],
    errors: [],
    closes: 0,
    check() {
      if (ended === undefined || Date.now() - endedAt < RESUME_MS) return;
      if (Date.now() - progress > STUCK_MS)
        throw new Error(`${name}: closed again and again from ${cursor}: ${JSON.stringify(ended)}`);
      r.closes++;
      open();
    },
    stop: () => {
      stop();
      dispose();
    },
  };
  const open = () => {
    ended = undefined;
    const c = connect(wsUrl, token);
    dispose = () => void c.client.dispose();
    stop = c.client.subscribe(
      { query: QUERY, variables: { after: cursor } },
      {
        next: (x: any) => {
          progress = Date.now();
          if (x.errors) r.errors.push(...x.errors);
          const e = x.data?.events;
          if (e) {
            r.events.push(e);
            if (e.cursor) cursor = e.cursor;
          }
        },
        error: (e: any) => {
          const closed = c.closed();
          endedAt = Date.now();
          ended = closed ?? (Array.isArray(e) ? e : String(e));
          // A refusal to subscribe at all (not a close to resume) is a failure of its own.
          if (!closed) r.errors.push({ subscribe: ended });
        },
        complete: () => {
          endedAt = Date.now();
          ended ??= 'complete';
        },
      },
    );
  };
  open();
  return r;
}

function sseReader(name: string, token: string, from: string | null): Reader {
  let cursor = from;
  let s = sseStream(httpUrl, token, { cursor, query: QUERY });
  let taken = 0;
  let progress = Date.now();
  const r: Reader = {
    name,
    events: [],
    errors: [],
    closes: 0,
    check() {
      for (; taken < s.items.length; taken++) {
        progress = Date.now();
        const item = s.items[taken];
        const resume = item.errors?.some((e: any) => /resume from your last cursor/.test(e.message));
        if (item.errors && !resume) r.errors.push(...item.errors);
        const e = item.data?.events;
        if (e) {
          r.events.push(e);
          if (e.cursor) cursor = e.cursor;
        }
      }
      if (!s.ended) return;
      if (Date.now() - progress > STUCK_MS)
        throw new Error(`${name}: ended again and again from ${cursor}: ${JSON.stringify(s.items.at(-1))}`);
      r.closes++;
      s = sseStream(httpUrl, token, { cursor, query: QUERY });
      taken = 0;
    },
    stop: () => s.stop(),
  };
  return r;
}

async function reach(readers: [Reader, string][], what: string) {
  const deadline = Date.now() + BATCH_MS;
  for (;;) {
    for (const [r] of readers) r.check();
    const missing = readers.filter(([r, content]) => !r.events.some((e) => e.message?.content === content));
    if (!missing.length) return;
    if (Date.now() > deadline)
      throw new Error(`${what}: ${missing.map(([r, c]) => `${r.name} never got ${c}`).join('; ')}`);
    await new Promise((res) => setTimeout(res, 50));
  }
}

interface Row {
  seq: number;
  type: string;
  guildId: string | null;
  channelId: string | null;
  userId: string | null;
  payload: unknown;
}

it(`rows of any shape stall, crash, loop and leak nothing (seed ${SEED}, ${ROWS} rows)`, async () => {
  const owner = await signUp(app);
  const member = await signUp(app);
  const bystander = await signUp(app);
  const a = await guildWithChannel(app, owner.token);
  await invite(app, owner.token, a.guildId, member.token);
  const b = await guildWithChannel(app, bystander.token);
  const dm = await ok(
    app,
    `mutation($u: [ID!]!) { openDirectChannel(userIds: $u) { id } }`,
    { u: [bystander.id] },
    owner.token,
  );
  const ids = {
    gA: raw(a.guildId),
    cA: raw(a.channelId),
    gB: raw(b.guildId),
    cB: raw(b.channelId),
    dm: raw(dm.openDirectChannel.id),
    owner: raw(owner.id),
    member: raw(member.id),
    bystander: raw(bystander.id),
  };
  const msgA = raw(await send(app, owner.token, a.channelId, 'hello A'));
  const secret = raw(await send(app, bystander.token, b.channelId, 'SECRET of B'));
  const rand = random(SEED);
  const pick = <T>(xs: readonly T[]): T => xs[Math.floor(rand() * xs.length)];
  const someId = () =>
    pick([msgA, secret, ids.member, ids.bystander, ids.owner, ids.cA, ids.cB, ids.gA, randomUUID()]);
  const values = (): unknown =>
    pick([
      someId,
      someId,
      someId,
      () => someId().toUpperCase(),
      () => 'not-a-uuid',
      () => '',
      () => '{a,b}',
      () => `${msgA},${secret}`,
      () => 'x'.repeat(pick([300, 70_000])),
      () => pick([0, -1, 1.5, 1e300, 2 ** 64]),
      () => pick([true, false, null]),
      () => [],
      () => [someId(), someId()],
      () => Array.from({ length: 5_000 }, (_, i) => `${i}`),
      () => ({}),
      () => ({ id: someId(), nested: { deeper: null } }),
      () => pick(['BLOCKED', 'FRIEND', 'MEMBER', 'ROLE', 'ONLINE', 'OFFLINE', 'bogus']),
      () => [[{ t: 'ROLE', id: ids.gA, a: '1024', d: '0' }]],
      () => [[{ t: 'ROLE', id: ids.gA, a: 'x', d: 1 }]],
      () => [[null]],
    ])();
  const KEYS = [
    'id',
    'messageId',
    'userId',
    'targetId',
    'targetType',
    'kind',
    'emoji',
    'roleId',
    'changes',
    'overwrites',
    'memberIds',
    'actorId',
    'lastReadMessageId',
    'status',
    'to',
    'channelId',
    'guildId',
    'content',
  ];
  const payloadOf = (type: string): unknown => {
    const shape = rand();
    if (shape < 0.08) return {};
    if (shape < 0.12) return pick([null, 'text', [1, 2], 7, true]);
    if (shape < 0.3) {
      // shapes writers use (or used: rows of older instances), with an extra field of a newer one
      const p: Record<string, unknown> = { addedLater: { x: [1, null] } };
      if (type.startsWith('MESSAGE_') || type.startsWith('REACTION_')) p.id = pick([msgA, secret]);
      if (type.startsWith('REACTION_') || type.endsWith('PINNED')) p.messageId = pick([msgA, secret]);
      if (type.startsWith('REACTION_')) p.emoji = '👍';
      if (type.startsWith('MEMBER_')) p.userId = pick([ids.member, ids.bystander]);
      if (type === 'GUILD_DELETED') p.memberIds = [ids.member, ids.owner];
      if (type === 'GUILD_UPDATED') p.changes = pick([{ name: 'x' }, { ownerId: ids.member }]);
      if (type === 'PERMISSIONS_CHANGED') Object.assign(p, { targetType: 'ROLE', targetId: ids.gA });
      if (type === 'RELATIONSHIP_UPDATED') Object.assign(p, { targetId: ids.member, kind: 'BLOCKED' });
      return p;
    }
    const p: Record<string, unknown> = {};
    const n = 1 + Math.floor(rand() * 5);
    for (let i = 0; i < n; i++) p[pick(KEYS)] = values();
    return p;
  };
  const column = <T>(xs: readonly T[]) => pick(xs);

  const rows = new Map<number, Row>();
  const readers: Reader[] = [];
  // From the log's start: a stream closed to resume has a cursor to resume from.
  const start = encodeCursor(ORIGIN);
  const live = {
    member: wsReader('member live (ws)', member.token, start),
    bystander: wsReader('bystander live (ws)', bystander.token, start),
    memberSse: sseReader('member live (SSE)', member.token, start),
    bystanderSse: sseReader('bystander live (SSE)', bystander.token, start),
  };
  readers.push(...Object.values(live));
  let n = 0;
  let cursorA: string | null = null;
  let cursorB: string | null = null;
  try {
    await reach(
      [
        [live.member, 'hello A'],
        [live.memberSse, 'hello A'],
        [live.bystander, 'SECRET of B'],
        [live.bystanderSse, 'SECRET of B'],
      ],
      'start',
    );
    cursorA = live.member.events.find((e) => e.message?.content === 'hello A').cursor;
    cursorB = live.bystander.events.find((e) => e.message?.content === 'SECRET of B').cursor;
    for (let batch = 0; n < ROWS; batch++) {
      for (let i = 0; i < BATCH && n < ROWS; i++, n++) {
        const type = pick(TYPES);
        const row = {
          type,
          guildId: column([null, ids.gA, ids.gA, ids.gB, randomUUID()]),
          channelId: column([null, ids.cA, ids.cA, ids.cB, ids.dm, randomUUID()]),
          userId: column([null, null, null, null, null, null, ids.member, ids.bystander, randomUUID()]),
          payload: payloadOf(type),
        };
        const [{ seq }] = resultRows<{ seq: string }>(
          await app.deps.db.execute(sql`insert into events (type, guild_id, channel_id, user_id, payload)
            values (${row.type}, ${row.guildId}::uuid, ${row.channelId}::uuid, ${row.userId}::uuid,
              ${JSON.stringify(row.payload)}::jsonb) returning seq`),
        );
        rows.set(Number(seq), { seq: Number(seq), ...row });
      }
      const sentA = `after batch ${batch} in A`;
      const sentB = `after batch ${batch} in B`;
      await send(app, owner.token, a.channelId, sentA);
      await send(app, bystander.token, b.channelId, sentB);
      await app.deps.realtime!.poke();
      const replays = {
        member: wsReader(`member replay ${batch} (ws)`, member.token, cursorA),
        bystander: wsReader(`bystander replay ${batch} (ws)`, bystander.token, cursorB),
        memberSse: sseReader(`member replay ${batch} (SSE)`, member.token, cursorA),
      };
      readers.push(...Object.values(replays));
      await reach(
        [
          [live.member, sentA],
          [live.bystander, sentB],
          [live.memberSse, sentA],
          [live.bystanderSse, sentB],
          [replays.member, sentA],
          [replays.bystander, sentB],
          [replays.memberSse, sentA],
        ],
        `batch ${batch}`,
      );
      for (const r of Object.values(replays)) r.stop();
      cursorA = live.member.events.find((e) => e.message?.content === sentA).cursor;
      cursorB = live.bystander.events.find((e) => e.message?.content === sentB).cursor;
    }
  } finally {
    for (const r of readers) r.stop();
  }

  // What each viewer got of the fuzzed rows.
  const problems: string[] = [];
  const mentions = (row: Row, ...xs: string[]) =>
    xs.some(
      (x) =>
        x === row.guildId ||
        x === row.channelId ||
        x === row.userId ||
        JSON.stringify(row.payload).toLowerCase().includes(x),
    );
  for (const r of readers) {
    const isBystander = r.name.startsWith('bystander');
    for (const e of r.events) {
      const text = JSON.stringify(e);
      if (!isBystander && text.includes('SECRET')) problems.push(`${r.name} got ${text}`);
      const row = e.cursor ? rows.get(seqOf(e.cursor)) : undefined;
      if (!row) continue;
      // A row may reach a viewer it names somewhere (a message it may see included); one that
      // names only others is a leak.
      const own = isBystander
        ? mentions(row, ids.gB, ids.cB, ids.dm, ids.bystander, secret)
        : mentions(row, ids.gA, ids.cA, ids.member, msgA);
      if (!own) problems.push(`${r.name} got ${text} of ${JSON.stringify(row).slice(0, 400)}`);
    }
  }
  const closes = readers.reduce((x, r) => x + r.closes, 0);
  console.log(
    `fuzz: seed ${SEED}, ${rows.size} rows, ${readers.length} streams, ${closes} resumes, ` +
      `${readers.reduce((x, r) => x + r.events.length, 0)} events delivered, ` +
      `${readers.reduce((x, r) => x + r.errors.length, 0)} with errors`,
  );
  assert.deepEqual(crashes, []);
  assert.deepEqual(problems, []);
});
