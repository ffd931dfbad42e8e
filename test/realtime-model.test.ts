/**
 * A seeded, randomized, bounded model test of `events(after)`: members send, edit, delete and
 * react in several channels while the owner changes who may see what (kick, ban/unban, re-join
 * by invite, roles with channel overwrites granted, revoked and deleted, overwrites for @everyone,
 * a role or a member set and removed, channels and a category created, moved and deleted,
 * timeouts), and readers (the owner, members, a non-member) disconnect and resume with their last
 * cursor at random moments on random instances (two app instances on Postgres + Redis, one on
 * PGlite); three more stay connected throughout, two of them subscribed without a cursor.
 *
 * Each mutation's request and response times are recorded; after each access change (they run
 * one at a time) who may view each channel, and read its history, is read from the database,
 * with each reader's standing in the guild. The changes also cover a category (its overwrites
 * apply to the channels in it; channels moved in and out; deleted, leaving copies of its
 * overwrites on its channels), role deletion, READ_HISTORY denied by an overwrite, and member
 * timeouts (which leave what a member may view). A change's effect on events committed around it
 * may go either way only between its request and its response:
 * - safety: every row a reader got, of any type, is one it may get (core/realtime/visibility.ts)
 *   in some state in force between the request of the write or change that made it and its
 *   receipt: a message row in a channel it may read the history of, or view when the message was
 *   sent since it joined (live; this model does not tell a live row from a replayed one); a
 *   deletion, creation or change of a channel it may view; a channel's deletion or overwrite
 *   change also by the overwrites the row recorded, with the reader's roles then; membership and
 *   role rows to members and to whom they are about. And what it got is that row: its type,
 *   message, channel, guild, user and role ids;
 * - liveness: each row a reader may get in every state from before its request to the end
 *   arrived (a message row: in a channel whose history it may read, or, to the live-only reader,
 *   view when the message was sent since it joined; a deletion: in a channel it may view; rows
 *   about a message deleted since are skipped, their MessageDeleted follows). A reader subscribed
 *   without a cursor is owed the rows from its first event on in log order, and those of writes
 *   asked for after it;
 * - no cursor twice, cursors strictly increasing per reader across resumes (log order, so channel
 *   order), each cursor the log row it names.
 *
 * MODEL_SEED (a number, `a-b` or `a,b,c`; default 1) picks the runs, MODEL_STEPS (default 240) the
 * writers' operations per run. Interleavings also depend on timing: a failure prints its seed and
 * what it saw, to be made into a deterministic test.
 */
import assert from 'node:assert/strict';
import { performance } from 'node:perf_hooks';
import { after, before, it } from 'node:test';
import { type App, buildApp } from '../api/app.ts';
import { timeOfId } from '../core/ids.ts';
import {
  computeChannelPermissions,
  type GuildPermissionInput,
  has,
  Permission,
  readOverwriteLevels,
} from '../core/permissions.ts';
import { comparePos, decodeCursor, encodeCursor } from '../core/realtime/cursor.ts';
import { loadChannelAccess, loadGuildAccess } from '../core/services/access.service.ts';
import { decodeAnyId, encodeId } from '../schema/builder.ts';
import { createTestApp, gql, ok, onPostgres, signUp, type TestApp, type TestUser } from './helpers.ts';
import { channelAccessHelpers, connect, guildWithChannel, sleep, subscribe } from './realtime-helpers.ts';

function parseSeeds(s: string): number[] {
  const out: number[] = [];
  for (const part of s.split(',')) {
    const [lo, hi] = part.split('-').map(Number);
    for (let x = lo; x <= (hi ?? lo); x++) out.push(x);
  }
  return out;
}
const SEEDS = parseSeeds(process.env.MODEL_SEED ?? '1');
const STEPS = Number(process.env.MODEL_STEPS ?? 240);

/** mulberry32: a small seeded generator */
function random(seed: number) {
  let s = seed >>> 0;
  return () => {
    s = (s + 0x6d2b79f5) >>> 0;
    let t = s;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

let a: TestApp;
let b: App | undefined;
let instances: App[];
let urls: string[];
before(async () => {
  a = await createTestApp({ rateLimits: false });
  instances = [a];
  urls = [`ws://127.0.0.1:${await a.start(0)}/graphql`];
  if (onPostgres) {
    // Same database, Redis, prefix and secret: a second instance of the same deployment.
    b = await buildApp({ ...a.config });
    instances.push(b);
    urls.push(`ws://127.0.0.1:${await b.start(0)}/graphql`);
  }
});
after(async () => {
  await b?.stop();
  await a?.destroy();
});

const sql = async (text: string, params: unknown[] = []): Promise<any[]> =>
  (
    await (
      a.deps.db as unknown as { $client: { query(t: string, p: unknown[]): Promise<{ rows: any[] }> } }
    ).$client.query(text, params)
  ).rows;

const uuid = (g: string) => decodeAnyId(g).id;

const QUERY = `subscription($after: String) { events(after: $after) { __typename cursor
  ... on MessageCreated { message { id content channel { id } } }
  ... on MessageUpdated { message { id content channel { id } } }
  ... on MessageDeleted { messageId channelId }
  ... on ReactionAdded { emoji message { id channel { id } reactions { emoji count } } }
  ... on ReactionRemoved { emoji message { id channel { id } reactions { emoji count } } }
  ... on ChannelDeleted { channelId cdGuildId: guildId }
  ... on PermissionsChanged { pcChannelId: channelId guildId }
  ... on MemberJoined { guildId user { id } }
  ... on MemberLeft { guildId user { id } }
  ... on MemberKicked { guildId user { id } }
  ... on MemberBanned { guildId user { id } }
  ... on MemberUpdated { guildId user { id } }
  ... on RoleCreated { guildId roleId }
  ... on RoleDeleted { guildId roleId }
} }`;

/** Rows the oracles judge per channel; every row is checked for order and repeats. */
const MESSAGE_ROWS: Record<string, string> = {
  MESSAGE_CREATED: 'C',
  MESSAGE_UPDATED: 'U',
  MESSAGE_DELETED: 'D',
  REACTION_ADDED: 'RA',
  REACTION_REMOVED: 'RR',
};

/** Log type → the GraphQL type a reader gets it as (the rows this model's writes make). */
const TYPE_NAMES: Record<string, string> = {
  MESSAGE_CREATED: 'MessageCreated',
  MESSAGE_UPDATED: 'MessageUpdated',
  MESSAGE_DELETED: 'MessageDeleted',
  REACTION_ADDED: 'ReactionAdded',
  REACTION_REMOVED: 'ReactionRemoved',
  CHANNEL_CREATED: 'ChannelCreated',
  CHANNEL_UPDATED: 'ChannelUpdated',
  CHANNEL_DELETED: 'ChannelDeleted',
  PERMISSIONS_CHANGED: 'PermissionsChanged',
  MEMBER_JOINED: 'MemberJoined',
  MEMBER_LEFT: 'MemberLeft',
  MEMBER_KICKED: 'MemberKicked',
  MEMBER_BANNED: 'MemberBanned',
  MEMBER_UPDATED: 'MemberUpdated',
  ROLE_CREATED: 'RoleCreated',
  ROLE_UPDATED: 'RoleUpdated',
  ROLE_DELETED: 'RoleDeleted',
  GUILD_UPDATED: 'GuildUpdated',
};

interface Op {
  actor: number;
  what: string;
  /** the log row it writes (message rows only): type letter, message, emoji and user for reactions */
  key?: string;
  req: number;
  res: number;
  ok: boolean;
}

/**
 * Who may see what, read from the database after a change, from `req` (uncertain until `res`)
 * until the next state's req. Per reader's user:
 */
interface State {
  what: string;
  req: number;
  res: number;
  /** channel uuids it may view (VIEW_CHANNEL: live rows, and deletions replayed) */
  view: Set<string>[];
  /** channel uuids whose history it may read too (VIEW_CHANNEL | READ_HISTORY: replayed rows) */
  hist: Set<string>[];
  /** when it joined the guild (ms; Infinity when not a member) */
  joined: number[];
  /** its standing in the guild (null: not a member), for rows that recorded overwrites */
  input: (GuildPermissionInput | null)[];
}

interface Got {
  cursor: string;
  t: number;
  session: number;
  /** what the reader got, as it got it */
  ev: any;
}

const EMOJI = ['👍', '🎉'];

/** When the message a row is about was sent (its UUIDv7 id's time). */
const sentAt = (row: any) => timeOfId(String(row.payload.messageId));

/** Whether the overwrites a row recorded (as they were before it) let a member with `input` view its channel. */
function couldViewBy(input: GuildPermissionInput | null, row: any): boolean {
  const levels = readOverwriteLevels(row.payload.overwrites);
  return !!input && !!levels && has(computeChannelPermissions(input, levels), Permission.VIEW_CHANNEL);
}

/**
 * Whether a reader's user is owed a row an access change wrote: it may get it in every state
 * from `from` (the one in force at the change's request) to the end.
 */
function owedChange(states: State[], from: number, u: number, uid: string, row: any): boolean {
  const ch: string | null = row.channel_id;
  const all = (f: (s: State) => boolean) => {
    for (let s = from; s < states.length; s++) if (!f(states[s])) return false;
    return true;
  };
  switch (row.type) {
    case 'CHANNEL_CREATED':
    case 'CHANNEL_UPDATED':
      return all((s) => s.view[u].has(ch!));
    case 'PERMISSIONS_CHANGED':
      return ch ? all((s) => s.view[u].has(ch)) : all((s) => !!s.input[u]);
    case 'CHANNEL_DELETED':
      return row.payload.actorId === uid || all((s) => couldViewBy(s.input[u], row));
    default:
      // guild-level rows (membership, roles): to its members
      return !row.user_id && !!row.guild_id && all((s) => !!s.input[u]);
  }
}

/** Whether a reader's user, in state `s`, may get `row` (core/realtime/visibility.ts's rules). */
function mayGet(s: State, u: number, uid: string, row: any): boolean {
  const ch: string | null = row.channel_id;
  const input = s.input[u];
  if (row.user_id) return row.user_id === uid;
  const couldBy = () => couldViewBy(input, row);
  switch (row.type) {
    case 'MESSAGE_CREATED':
    case 'MESSAGE_UPDATED':
    case 'REACTION_ADDED':
    case 'REACTION_REMOVED':
      // Without READ_HISTORY: live, and only about messages sent since it joined.
      return s.hist[u].has(ch!) || (s.view[u].has(ch!) && sentAt(row) >= s.joined[u]);
    case 'MESSAGE_DELETED':
    case 'CHANNEL_CREATED':
    case 'CHANNEL_UPDATED':
      return s.view[u].has(ch!);
    case 'CHANNEL_DELETED':
      return row.payload.actorId === uid || s.view[u].has(ch!) || couldBy();
    case 'PERMISSIONS_CHANGED':
      if (!ch) return !!input;
      return s.view[u].has(ch) || couldBy();
    case 'MEMBER_JOINED':
    case 'MEMBER_LEFT':
    case 'MEMBER_KICKED':
    case 'MEMBER_BANNED':
    case 'MEMBER_UPDATED':
      return row.payload.userId === uid || !!input;
    case 'ROLE_CREATED':
    case 'ROLE_UPDATED':
    case 'ROLE_DELETED':
    case 'GUILD_UPDATED':
      return !!input;
    default:
      return false;
  }
}

/** How what a reader got differs from the row its cursor names (undefined: it does not). */
function payloadMismatch(ev: any, row: any): string | undefined {
  const want = TYPE_NAMES[row.type];
  if (ev.__typename !== want) return `${ev.__typename}, not ${want}`;
  const p = row.payload;
  const same = (got: unknown, type: string, id: unknown, what: string) =>
    got === undefined || got === encodeId(type, String(id)) ? '' : `${what} ${String(got)}`;
  const out = [
    same(ev.message?.id, 'Message', p.messageId, 'message'),
    same(ev.message?.channel?.id, 'Channel', row.channel_id, 'message in channel'),
    same(ev.messageId, 'Message', p.messageId, 'messageId'),
    same(ev.channelId, 'Channel', row.channel_id, 'channelId'),
    ev.pcChannelId === undefined ||
    ev.pcChannelId === (row.channel_id ? encodeId('Channel', row.channel_id) : null)
      ? ''
      : `channelId ${ev.pcChannelId}`,
    same(ev.guildId, 'Guild', row.guild_id, 'guildId'),
    same(ev.cdGuildId, 'Guild', row.guild_id, 'guildId'),
    same(ev.user?.id, 'User', p.userId, 'user'),
    same(ev.roleId, 'Role', p.roleId, 'roleId'),
  ].filter(Boolean);
  return out.length ? out.join(', ') : undefined;
}

async function runModel(seed: number) {
  const t0 = performance.now();
  const now = () => performance.now() - t0;

  // Actors: 0 owner, 1-3 members, 4 a non-member. All five read; 0-3 write.
  const users: TestUser[] = await Promise.all(Array.from({ length: 5 }, () => signUp(a)));
  const uid = users.map((u) => uuid(u.id));
  const owner = users[0];
  const { guildId, channelId: general } = await guildWithChannel(a, owner.token);
  const { everyoneRole, createChannel } = channelAccessHelpers(() => a);
  const everyone = await everyoneRole(owner.token, guildId);
  const roles: string[] = [];
  for (const name of ['r1', 'r2']) {
    const r = await ok(
      a,
      `mutation($g: ID!, $n: String!) { createRole(input: { guildId: $g, name: $n, permissions: [] }) { id } }`,
      { g: guildId, n: name },
      owner.token,
    );
    roles.push(r.createRole.id);
  }
  const code = (
    await ok(
      a,
      `mutation($g: ID!) { createInvite(input: { guildId: $g }) { code } }`,
      { g: guildId },
      owner.token,
    )
  ).createInvite.code as string;
  const join = (i: number) =>
    ok(a, `mutation($c: String!) { joinGuild(code: $c) { id } }`, { c: code }, users[i].token);
  for (const i of [1, 2, 3]) await join(i);
  /** text channels and categories; `parent`: the category a channel is in */
  const channels: { gid: string; uuid: string; alive: boolean; category: boolean; parent: string | null }[] =
    [{ gid: general, uuid: uuid(general), alive: true, category: false, parent: null }];
  const addChannel = async (name: string, category: boolean, parent: string | null) => {
    const id = await createChannel(
      owner.token,
      guildId,
      name,
      category ? 'CATEGORY' : 'TEXT',
      parent ? channels.find((c) => c.uuid === parent)!.gid : undefined,
    );
    channels.push({ gid: id, uuid: uuid(id), alive: true, category, parent });
    return uuid(id);
  };
  // A category holding the third channel: its overwrites apply to the channels in it.
  const cat = await addChannel('cat', true, null);
  await addChannel('two', false, null);
  await addChannel('three', false, cat);
  const membership: ('in' | 'out' | 'banned')[] = ['in', 'in', 'in', 'in', 'out'];
  const held = new Set<string>(); // `${actor}|${role}`

  const views = async () => {
    const at = new Date();
    const alive = channels.filter((c) => c.alive);
    const s: Omit<State, 'what' | 'req' | 'res'> = { view: [], hist: [], joined: [], input: [] };
    // All at once: the state is read as soon after the change as may be.
    const loaded = await Promise.all(
      uid.map((u) =>
        Promise.all([
          Promise.all(alive.map((c) => loadChannelAccess(a.deps.db, u, c.uuid, at))),
          loadGuildAccess(a.deps.db, u, uuid(guildId), at),
        ]),
      ),
    );
    for (const [accs, g] of loaded) {
      const view = new Set<string>();
      const hist = new Set<string>();
      let joined = Number.POSITIVE_INFINITY;
      accs.forEach((acc, k) => {
        if (!acc) return;
        if (has(acc.permissions, Permission.VIEW_CHANNEL)) view.add(alive[k].uuid);
        if (has(acc.permissions, Permission.VIEW_CHANNEL | Permission.READ_HISTORY)) hist.add(alive[k].uuid);
        joined = acc.joinedAt ?? joined;
      });
      s.view.push(view);
      s.hist.push(hist);
      s.joined.push(joined);
      s.input.push(g?.input.isMember ? g.input : null);
    }
    return s;
  };
  const states: State[] = [{ what: 'start', req: Number.NEGATIVE_INFINITY, res: 0, ...(await views()) }];

  // Readers start at the log's end: every row after it is theirs to judge.
  const [top] = await sql(
    `select xid::text as xid, seq from events order by xid::text::bigint desc, seq desc limit 1`,
  );
  const head = { xid: String(top.xid), seq: Number(top.seq) };
  // The rows each access change wrote (they run one at a time, and only they write rows other
  // than message rows): judged from that change's request.
  let adminSeq = Number((await sql(`select coalesce(max(seq), 0)::bigint as m from events`))[0].m);
  const rowState = new Map<number, number>(); // seq → the index of the state whose change wrote it
  const record = async (what: string, req: number, res: number) => {
    states.push({ what, req, res, ...(await views()) });
    const mine = await sql(
      `select seq::bigint as seq from events where seq > $1 and not (type = any($2::text[])) order by seq`,
      [adminSeq, `{${Object.keys(MESSAGE_ROWS).join(',')}}`],
    );
    for (const x of mine) rowState.set(Number(x.seq), states.length - 1);
    if (mine.length) adminSeq = Number(mine.at(-1).seq);
  };

  const ops: Op[] = [];
  const pick = <T>(r: () => number, xs: T[]): T => xs[Math.floor(r() * xs.length)];
  const on = (r: () => number) => instances[Math.floor(r() * instances.length)];

  // --- writers -------------------------------------------------------------------------------
  const msgs: { gid: string; uuid: string; author: number; channel: string; deleted: boolean }[] = [];
  const reacted = new Set<string>(); // `${actor}|${message uuid}|${emoji}`
  let n = 0;
  let writes = 0;
  const run = async (actor: number, r: () => number, what: string, q: string, v: Record<string, unknown>) => {
    const req = now();
    const res = await gql(on(r), q, v, { token: users[actor].token });
    const op: Op = { actor, what, req, res: now(), ok: !res.errors?.length };
    const code = res.errors?.[0]?.extensions?.code;
    // Losing sight of a channel or a message (a kick, an overwrite, a deletion) refuses a write.
    if (!op.ok && code !== 'NOT_FOUND' && code !== 'FORBIDDEN')
      throw new Error(`${what} by ${actor}: ${JSON.stringify(res.errors)}`);
    ops.push(op);
    return { op, data: res.data };
  };
  const writer = async (actor: number, count: number) => {
    const r = random(seed * 100 + actor);
    for (let k = 0; k < count && failure === undefined; k++) {
      const x = r();
      const mine = msgs.filter((m) => m.author === actor && !m.deleted);
      const live = msgs.filter((m) => !m.deleted);
      if (x < 0.5 || !live.length) {
        const c = pick(
          r,
          channels.filter((ch) => ch.alive && !ch.category),
        );
        const { op, data } = await run(
          actor,
          r,
          `send in ${c.uuid.slice(-4)}`,
          `mutation($i: SendMessageInput!) { sendMessage(input: $i) { id } }`,
          { i: { channelId: c.gid, content: `m${++n} s${seed} a${actor}` } },
        );
        if (op.ok) {
          const id = data.sendMessage.id as string;
          msgs.push({ gid: id, uuid: uuid(id), author: actor, channel: c.uuid, deleted: false });
          op.key = `C:${uuid(id)}`;
        }
      } else if (x < 0.65 && mine.length) {
        const m = pick(r, mine);
        const { op } = await run(
          actor,
          r,
          `edit ${m.uuid.slice(-4)}`,
          `mutation($i: EditMessageInput!) { editMessage(input: $i) { id } }`,
          { i: { id: m.gid, content: `e${++n} s${seed}` } },
        );
        if (op.ok) op.key = `U:${m.uuid}`;
      } else if (x < 0.75 && mine.length) {
        const m = pick(r, mine);
        const { op } = await run(
          actor,
          r,
          `delete ${m.uuid.slice(-4)}`,
          `mutation($m: ID!) { deleteMessage(id: $m) }`,
          {
            m: m.gid,
          },
        );
        if (op.ok) {
          m.deleted = true;
          op.key = `D:${m.uuid}`;
        }
      } else {
        const m = pick(r, live);
        const emoji = pick(r, EMOJI);
        const k2 = `${actor}|${m.uuid}|${emoji}`;
        const adding = !reacted.has(k2);
        const { op } = await run(
          actor,
          r,
          `${adding ? 'react' : 'unreact'} ${m.uuid.slice(-4)}`,
          adding
            ? `mutation($m: ID!, $e: String!) { addReaction(messageId: $m, emoji: $e) { id } }`
            : `mutation($m: ID!, $e: String!) { removeReaction(messageId: $m, emoji: $e) { id } }`,
          { m: m.gid, e: emoji },
        );
        if (op.ok) {
          if (adding) reacted.add(k2);
          else reacted.delete(k2);
          op.key = `${adding ? 'RA' : 'RR'}:${m.uuid}:${emoji}:${uid[actor]}`;
        }
      }
      writes++;
      await sleep(r() * 20);
    }
  };

  // --- the owner changes access, one change at a time ------------------------------------------
  let writing = true;
  let failure: unknown;
  /** `${channel uuid}|${target id}` → what removes it */
  const overwrites = new Map<string, { c: string; t: string; channel: string }>();
  const channelDeleted = new Map<string, number>(); // channel uuid → its deletion's request
  const timedOut = new Set<number>();
  // A loop that fails stops the others: the run ends with its error, not at the test's timeout.
  const stop = (err: unknown) => {
    failure ??= err;
    writing = false;
  };
  const admin = async () => {
    const r = random(seed * 100 + 99);
    const O = owner.token;
    const mutate = async (what: string, q: string, v: Record<string, unknown>, token = O) => {
      const req = now();
      const data = await ok(on(r), q, v, token);
      await record(what, req, now());
      return data;
    };
    const kick = (m: number) => {
      membership[m] = 'out';
      timedOut.delete(m);
      for (const role of roles) held.delete(`${m}|${role}`);
    };
    // Access changes stop at four fifths of the writes, after undoing what hides channels from
    // members: the rows of the last fifth are owed to every member (liveness judges only rows in
    // channels a reader may view from before their request to the end).
    while (writing && writes < STEPS * 0.8) {
      await sleep(10 + r() * 60);
      if (!writing) break;
      const x = r();
      const m = 1 + Math.floor(r() * 3);
      // Members out of the guild come back soon: most of the time most of them read and write.
      const away = [1, 2, 3].filter((i) => membership[i] !== 'in');
      if (away.length && r() < 0.3) {
        const w = pick(r, away);
        if (membership[w] === 'banned') {
          await mutate(`unban ${w}`, `mutation($g: ID!, $u: ID!) { unbanMember(guildId: $g, userId: $u) }`, {
            g: guildId,
            u: users[w].id,
          });
          membership[w] = 'out';
        } else {
          await mutate(
            `join ${w}`,
            `mutation($c: String!) { joinGuild(code: $c) { id } }`,
            { c: code },
            users[w].token,
          );
          membership[w] = 'in';
        }
        continue;
      }
      const alive = channels.filter((c) => c.alive);
      const texts = alive.filter((c) => !c.category);
      const category = alive.find((c) => c.category);
      if (x < 0.1) {
        if (membership[m] === 'in') {
          await mutate(`kick ${m}`, `mutation($g: ID!, $u: ID!) { kickMember(guildId: $g, userId: $u) }`, {
            g: guildId,
            u: users[m].id,
          });
          kick(m);
        } else if (membership[m] === 'out') {
          await mutate(
            `join ${m}`,
            `mutation($c: String!) { joinGuild(code: $c) { id } }`,
            { c: code },
            users[m].token,
          );
          membership[m] = 'in';
        }
      } else if (x < 0.16) {
        if (membership[m] !== 'banned') {
          await mutate(`ban ${m}`, `mutation($g: ID!, $u: ID!) { banMember(guildId: $g, userId: $u) }`, {
            g: guildId,
            u: users[m].id,
          });
          kick(m);
          membership[m] = 'banned';
        } else {
          await mutate(`unban ${m}`, `mutation($g: ID!, $u: ID!) { unbanMember(guildId: $g, userId: $u) }`, {
            g: guildId,
            u: users[m].id,
          });
          membership[m] = 'out';
        }
      } else if (x < 0.32) {
        if (membership[m] !== 'in') continue;
        const role = pick(r, roles);
        const k = `${m}|${role}`;
        const grant = !held.has(k);
        await mutate(
          `${grant ? 'grant' : 'revoke'} r${roles.indexOf(role) + 1} to ${m}`,
          `mutation($g: ID!, $r: ID!, $u: ID!) { ${grant ? 'assignRole' : 'unassignRole'}(guildId: $g, roleId: $r, userId: $u) }`,
          { g: guildId, r: role, u: users[m].id },
        );
        if (grant) held.add(k);
        else held.delete(k);
      } else if (x < 0.38) {
        // A timeout leaves VIEW_CHANNEL and READ_HISTORY: it refuses the member's writes only.
        if (membership[m] !== 'in') continue;
        const set = !timedOut.has(m);
        await mutate(
          `${set ? 'time out' : 'clear timeout of'} ${m}`,
          `mutation($g: ID!, $u: ID!, $t: DateTime) { timeoutMember(guildId: $g, userId: $u, until: $t) }`,
          {
            g: guildId,
            u: users[m].id,
            t: set ? new Date(Date.now() + 1000 + r() * 4000).toISOString() : null,
          },
        );
        if (set) timedOut.add(m);
        else timedOut.delete(m);
      } else if (x < 0.7) {
        const c = pick(r, alive);
        const y = r();
        const [targetType, targetId, name] =
          y < 0.3
            ? ['ROLE', everyone, '@everyone']
            : y < 0.75
              ? ['ROLE', roles[y < 0.55 ? 0 : 1], `r${y < 0.55 ? 1 : 2}`]
              : ['MEMBER', users[m].id, `member ${m}`];
        let z = r();
        const k = `${c.uuid}|${targetId}`;
        // Hiding is undone about as often as it is done: clear an overwrite when there is one.
        if (z < 0.3 && overwrites.has(k)) z = 0.9;
        // An overwrite is set for members only; a former member's can still be removed.
        if (targetType === 'MEMBER' && z < 0.8 && membership[m] !== 'in') continue;
        if (z >= 0.8 && !overwrites.has(k)) continue;
        if (z < 0.8) overwrites.set(k, { c: c.gid, t: targetId, channel: c.uuid });
        else overwrites.delete(k);
        const where = `${c.category ? 'category ' : ''}${c.uuid.slice(-4)}`;
        // Without READ_HISTORY a member still views the channel: live, it gets rows about messages
        // sent since it joined; replayed, only deletions (core/realtime/visibility.ts).
        const [verb, allow, deny] =
          z < 0.3
            ? ['allow', ['VIEW_CHANNEL'], []]
            : z < 0.55
              ? ['deny', [], ['VIEW_CHANNEL']]
              : ['deny history to', [], ['READ_HISTORY']];
        if (z < 0.8)
          await mutate(
            `${verb} ${name} in ${where}`,
            `mutation($i: SetChannelOverwriteInput!) { setChannelOverwrite(input: $i) { targetId } }`,
            { i: { channelId: c.gid, targetType, targetId, allow, deny } },
          );
        else
          await mutate(
            `clear ${name} in ${where}`,
            `mutation($c: ID!, $t: ID!) { removeChannelOverwrite(channelId: $c, targetId: $t) }`,
            { c: c.gid, t: targetId },
          );
      } else if (x < 0.78) {
        // A move into or out of the category: its overwrites start or stop applying.
        const c = pick(r, texts);
        const to = c.parent ? null : category?.uuid;
        if (to === undefined) continue;
        await mutate(
          `move ${c.uuid.slice(-4)} ${to ? 'into' : 'out of'} the category`,
          `mutation($i: UpdateChannelInput!) { updateChannel(input: $i) { id } }`,
          { i: { id: c.gid, parentId: to ? category!.gid : null } },
        );
        c.parent = to;
      } else if (x < 0.83) {
        // A role deleted (its overwrites and holders go with it), and a new one in its place.
        const slot = Math.floor(r() * roles.length);
        const role = roles[slot];
        await mutate(`delete role r${slot + 1}`, `mutation($r: ID!) { deleteRole(id: $r) }`, { r: role });
        for (const i of [1, 2, 3]) held.delete(`${i}|${role}`);
        for (const [k, o] of overwrites) if (o.t === role) overwrites.delete(k);
        const created = await mutate(
          `create role r${slot + 1}`,
          `mutation($g: ID!, $n: String!) { createRole(input: { guildId: $g, name: $n, permissions: [] }) { id } }`,
          { g: guildId, n: `r${slot + 1}` },
        );
        roles[slot] = created.createRole.id;
      } else if (x < 0.91 && alive.length < 6) {
        const req = now();
        const makeCategory = !category && r() < 0.5;
        const parent = !makeCategory && category && r() < 0.3 ? category.uuid : null;
        const id = await addChannel(`c${++n}`, makeCategory, parent);
        await record(`create ${makeCategory ? 'category' : 'channel'} ${id.slice(-4)}`, req, now());
      } else {
        // A text channel's deletion takes its messages; a category's leaves its channels,
        // uncategorized, with copies of its overwrites (refused when they have their own).
        const kids = texts.filter((c) => c.parent === category?.uuid);
        const copyable =
          category &&
          !(
            [...overwrites.values()].some((o) => o.channel === category.uuid) &&
            [...overwrites.values()].some((o) => kids.some((k) => k.uuid === o.channel))
          );
        if (copyable && r() < 0.4) {
          await mutate(
            `delete category ${category.uuid.slice(-4)}`,
            `mutation($c: ID!) { deleteChannel(id: $c) }`,
            {
              c: category.gid,
            },
          );
          category.alive = false;
          for (const [k, o] of [...overwrites]) {
            if (o.channel !== category.uuid) continue;
            overwrites.delete(k);
            for (const kid of kids)
              overwrites.set(`${kid.uuid}|${o.t}`, { c: kid.gid, t: o.t, channel: kid.uuid });
          }
          for (const kid of kids) kid.parent = null;
          continue;
        }
        if (texts.length <= 2) continue;
        const c = pick(r, texts);
        // Its messages go with it: their rows are skipped from then on (gone), as a deletion's are.
        channelDeleted.set(c.uuid, now());
        await mutate(`delete channel ${c.uuid.slice(-4)}`, `mutation($c: ID!) { deleteChannel(id: $c) }`, {
          c: c.gid,
        });
        c.alive = false;
        for (const [k, o] of overwrites) if (o.channel === c.uuid) overwrites.delete(k);
        for (const msg of msgs) if (msg.channel === c.uuid) msg.deleted = true;
      }
    }
    for (const m of [1, 2, 3]) {
      if (membership[m] === 'banned')
        await mutate(`unban ${m}`, `mutation($g: ID!, $u: ID!) { unbanMember(guildId: $g, userId: $u) }`, {
          g: guildId,
          u: users[m].id,
        });
      if (membership[m] !== 'in')
        await mutate(
          `join ${m}`,
          `mutation($c: String!) { joinGuild(code: $c) { id } }`,
          { c: code },
          users[m].token,
        );
      membership[m] = 'in';
      if (timedOut.delete(m))
        await mutate(
          `clear timeout of ${m}`,
          `mutation($g: ID!, $u: ID!) { timeoutMember(guildId: $g, userId: $u, until: null) }`,
          { g: guildId, u: users[m].id },
        );
    }
    for (const [k, o] of overwrites) {
      overwrites.delete(k);
      if (channels.find((c) => c.uuid === o.channel)?.alive)
        await mutate(
          `clear ${o.t.slice(-4)} in ${o.channel.slice(-4)}`,
          `mutation($c: ID!, $t: ID!) { removeChannelOverwrite(channelId: $c, targetId: $t) }`,
          { c: o.c, t: o.t },
        );
    }
  };

  // --- readers: resume with the last cursor at random moments, on random instances -------------
  // Reader i reads as user READERS[i]; the last three (second devices) stay connected throughout,
  // two of them subscribed without a cursor (live only: owed what follows their first event).
  const READERS = [0, 1, 2, 3, 4, 1, 3, 2];
  const steady = (i: number) => i >= 5;
  const liveOnly = (i: number) => i === 5 || i === 7;
  const got: Got[][] = READERS.map(() => []);
  /** per reader, the seqs it must get (liveness), known once the writes are over */
  let owed: Set<number>[] | undefined;
  const errors: string[] = [];
  let reading = true;
  let sessions = 0;
  const reader = async (i: number) => {
    const r = random(seed * 100 + 50 + i);
    let cursor: string | null = liveOnly(i) ? null : encodeCursor(head);
    let session = 0;
    const [lo, hi] = onPostgres ? [100, 700] : [300, 1500];
    for (;;) {
      const last = !reading;
      const url = urls[Math.floor(r() * urls.length)];
      const c = connect(url, users[READERS[i]].token);
      const mine = session++;
      const s = subscribe(c.client, cursor, QUERY, (e) => {
        if (e.cursor) got[i].push({ cursor: e.cursor, t: now(), session: mine, ev: e });
      });
      if (steady(i)) while (reading) await sleep(50);
      if ((last || steady(i)) && failure === undefined) {
        // Drain: stay until every row it must get has come, or 20 s; then a little longer for any
        // it must not.
        const until = performance.now() + 20_000;
        const has = () => {
          const seqs = new Set(got[i].map((g) => decodeCursor(g.cursor).seq));
          return [...owed![i]].every((q) => seqs.has(q));
        };
        while (performance.now() < until && !has()) await sleep(100);
        await sleep(300);
      } else {
        // Now and then a session ends before its replay can have: a resume from mid-replay.
        await sleep(r() < 0.2 ? 10 + r() * 40 : lo + r() * (hi - lo));
      }
      s.stop();
      await c.client.dispose();
      sessions++;
      if (s.errors.length) errors.push(`reader ${i} session ${mine}: ${JSON.stringify(s.errors)}`);
      if (got[i].length) cursor = got[i].at(-1)!.cursor;
      if (last || steady(i)) return;
      await sleep(r() * 200);
    }
  };

  const readers = READERS.map((_, i) => reader(i).catch((err) => stop(err)));
  await sleep(300);
  const per = Math.ceil(STEPS / 4);
  const adminDone = admin().catch(stop);
  await Promise.all([0, 1, 2, 3].map((w) => writer(w, per).catch(stop)));
  writing = false;
  await adminDone;
  const end = now();
  if (failure !== undefined) {
    reading = false;
    await Promise.all(readers);
    throw failure;
  }

  // --- judge ---------------------------------------------------------------------------------
  const rows = await sql(
    `select xid::text as xid, seq::bigint as seq, type, guild_id, channel_id, user_id, payload from events
     where (xid::text::bigint, seq) > ($1::bigint, $2::bigint) order by xid::text::bigint, seq`,
    [head.xid, head.seq],
  );
  const bySeq = new Map<number, any>(rows.map((x) => [Number(x.seq), x]));
  // Each message row is the one of a write that succeeded: one actor made those of a key, one at
  // a time, so the log has them in the order they were made.
  const byKey = new Map<string, Op[]>();
  for (const op of ops) if (op.ok && op.key) byKey.set(op.key, [...(byKey.get(op.key) ?? []), op]);
  const opOf = new Map<number, Op>();
  const deletedMsgs = new Set<string>();
  const gone = new Set(msgs.filter((m) => m.deleted).map((m) => m.uuid));
  for (const x of rows) {
    const letter = MESSAGE_ROWS[x.type];
    if (!letter) continue;
    const p = x.payload;
    const key =
      letter === 'RA' || letter === 'RR'
        ? `${letter}:${p.messageId}:${p.emoji}:${p.userId}`
        : `${letter}:${p.messageId}`;
    const op = byKey.get(key)?.shift();
    assert.ok(op, `seed ${seed}: a ${x.type} row no write of the model made: ${JSON.stringify(x)}`);
    opOf.set(Number(x.seq), op);
    if (x.type === 'MESSAGE_DELETED') deletedMsgs.add(p.messageId);
  }
  // A removal checked before its channel's deletion and run after finds the reaction gone with the
  // message (a channel's messages are deleted, not marked): it succeeds and writes nothing.
  const channelOf = new Map(msgs.map((m) => [m.uuid, m.channel]));
  const unmatched = [...byKey.values()]
    .flat()
    .filter(
      (op) =>
        !op.key!.startsWith('RR:') ||
        !((channelDeleted.get(channelOf.get(op.key!.split(':')[1])!) ?? Infinity) <= op.res),
    );
  assert.deepEqual(unmatched, [], `seed ${seed}: writes that succeeded without their row`);

  /** the index of the state in force at t (its response at or before t) */
  const stateAt = (t: number) => {
    let k = 0;
    while (k + 1 < states.length && states[k + 1].res <= t) k++;
    return k;
  };
  /** the last state that may have been in force at t (its request at or before t) */
  const lastBy = (t: number) => {
    let k = 0;
    while (k + 1 < states.length && states[k + 1].req <= t) k++;
    return k;
  };

  // Liveness: every row in a channel the reader could read (VIEW_CHANNEL and READ_HISTORY) from
  // before the request to the end. The live-only reader is owed the rows from its first event on
  // in log order, and those of writes asked for after it got that event (it was set up by then).
  const owedTo = (i: number) => {
    const u = READERS[i];
    const out = new Set<number>();
    const first = liveOnly(i) ? got[i][0] : undefined;
    for (const row of rows) {
      const seq = Number(row.seq);
      const op = opOf.get(seq);
      const byChange = rowState.get(seq);
      if (!op && byChange === undefined) continue;
      const req = op ? op.req : states[byChange!].req;
      if (
        first &&
        comparePos({ xid: String(row.xid), seq }, decodeCursor(first.cursor)) < 0 &&
        req <= first.t
      )
        continue;
      if (!op) {
        if (owedChange(states, stateAt(req), u, uid[u], row)) out.add(seq);
        continue;
      }
      const mid = row.payload.messageId;
      if (row.type !== 'MESSAGE_DELETED' && (deletedMsgs.has(mid) || gone.has(mid))) continue;
      // A deletion is owed to who may view the channel (it shows none of its history). Other
      // rows need its history, or, live (the live-only reader gets every row live: hub.ts), a
      // message sent since the reader joined.
      const ch = row.channel_id;
      const may =
        row.type === 'MESSAGE_DELETED'
          ? (s: State) => s.view[u].has(ch)
          : liveOnly(i)
            ? (s: State) => s.hist[u].has(ch) || (s.view[u].has(ch) && sentAt(row) >= s.joined[u])
            : (s: State) => s.hist[u].has(ch);
      let always = true;
      for (let s = stateAt(op.req); s < states.length && always; s++) always = may(states[s]);
      if (always) out.add(seq);
    }
    return out;
  };
  owed = READERS.map((_, i) => owedTo(i));
  reading = false;
  await Promise.all(readers);
  if (failure !== undefined) throw failure;

  const problems: string[] = [...errors];
  let checked = 0;
  for (let i = 0; i < READERS.length; i++) {
    const u = READERS[i];
    const mine = got[i];
    const seen = new Set<number>();
    for (let k = 0; k < mine.length; k++) {
      const e = mine[k];
      const pos = decodeCursor(e.cursor);
      const row = bySeq.get(pos.seq);
      if (!row || row.xid !== pos.xid) {
        problems.push(`reader ${i} (user ${u}): cursor ${JSON.stringify(pos)} names no row of the log`);
        continue;
      }
      if (seen.has(pos.seq)) problems.push(`reader ${i} (user ${u}): seq ${pos.seq} (${row.type}) twice`);
      seen.add(pos.seq);
      if (k > 0 && comparePos(decodeCursor(mine[k - 1].cursor), pos) >= 0)
        problems.push(
          `reader ${i} (user ${u}): out of order, ${JSON.stringify(decodeCursor(mine[k - 1].cursor))} then ${JSON.stringify(pos)} (session ${mine[k - 1].session} → ${e.session})`,
        );
      const mismatch = payloadMismatch(e.ev, row);
      if (mismatch)
        problems.push(`reader ${i} (user ${u}): seq ${pos.seq} (${row.type}) came as ${mismatch}`);
      // Safety: some state that may have been in force between its request and its receipt.
      const op = opOf.get(pos.seq);
      const byChange = rowState.get(pos.seq);
      if (!op && byChange === undefined) {
        problems.push(
          `reader ${i} (user ${u}): got ${row.type} seq ${pos.seq}, a row of no change of the model`,
        );
        continue;
      }
      const req = op ? op.req : states[byChange!].req;
      const from = stateAt(req);
      const to = lastBy(e.t);
      let could = false;
      for (let s = from; s <= to && !could; s++) could = mayGet(states[s], u, uid[u], row);
      if (!could)
        problems.push(
          `reader ${i} (user ${u}): got ${row.type} seq ${pos.seq} in ${String(row.channel_id).slice(-4)} (${op ? `${op.what} by ${op.actor}` : states[byChange!].what}, [${req.toFixed(0)}, ${(op ? op.res : states[byChange!].res).toFixed(0)}], got at ${e.t.toFixed(0)}, session ${e.session}) it may not: states ${from}..${to}`,
        );
    }
    for (const seq of owed[i]) {
      if (seen.has(seq)) continue;
      const row = bySeq.get(seq);
      const op = opOf.get(seq);
      const what = op
        ? `${op.what} by ${op.actor}, [${op.req.toFixed(0)}, ${op.res.toFixed(0)}]`
        : states[rowState.get(seq)!].what;
      problems.push(
        `reader ${i} (user ${u}): lost ${row.type} seq ${seq} in ${String(row.channel_id).slice(-4)} (${what})`,
      );
    }
    checked += mine.length;
  }
  const stats = {
    seed,
    steps: STEPS,
    writes: ops.length,
    refused: ops.filter((o) => !o.ok).length,
    accessChanges: states.length - 1,
    rows: rows.length,
    rowsJudged: checked,
    owed: owed.map((o) => o.size),
    received: got.map((g) => g.length),
    sessions,
    changes: Object.entries(
      states.slice(1).reduce<Record<string, number>>((o, x) => {
        const w = x.what
          .split(' ')
          .slice(0, x.what.startsWith('delete') || x.what.startsWith('create') ? 2 : 1)
          .join(' ');
        o[w] = (o[w] ?? 0) + 1;
        return o;
      }, {}),
    )
      .map(([w, c]) => `${w}:${c}`)
      .join(','),
    wroteUntilMs: Math.round(end),
    ms: Math.round(now()),
  };
  if (problems.length) {
    const timeline = states.map((s, k) => `${k} ${s.what} [${s.req.toFixed(0)}, ${s.res.toFixed(0)}]`);
    throw new Error(
      `MODEL_SEED=${seed} MODEL_STEPS=${STEPS}: ${problems.length} problems\n${problems.slice(0, 30).join('\n')}\n` +
        `access changes:\n${timeline.join('\n')}\nchannels: ${channels.map((c) => c.uuid.slice(-4)).join(' ')}\n${JSON.stringify(stats)}`,
    );
  }
  if (process.env.MODEL_VERBOSE) console.log(JSON.stringify(stats));
  return stats;
}

for (const seed of SEEDS) {
  it(`model: seed ${seed}, ${STEPS} writes, readers resuming on ${onPostgres ? 'two instances' : 'one instance'}: nothing lost, repeated, reordered or shown that may not be`, {
    timeout: 300_000,
  }, async () => {
    await runModel(seed);
  });
}
