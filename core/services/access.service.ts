/**
 * Loads what the permission functions need in one SQL statement, and answers "may this user do
 * X here". Resolvers and event delivery go through these; nothing else computes permissions.
 */
import { sql } from 'drizzle-orm';
import { type Database, type DbOrTx, databaseOf, resultRows, uuidArray } from '../db/client.ts';
import { forbidden, notFound } from '../errors.ts';
import { isUuid } from '../ids.ts';
import {
  ALL_PERMISSIONS,
  computeChannelPermissions,
  computeGuildPermissions,
  DM_PERMISSIONS,
  type GuildPermissionInput,
  has,
  type OverwriteInfo,
  type RoleInfo,
} from '../permissions.ts';
import { accessCacheOf } from './access-cache.ts';

export interface ChannelRow {
  id: string;
  guildId: string | null;
  type: string;
  name: string | null;
  topic: string | null;
  parentId: string | null;
  position: number;
  slowmodeSeconds: number;
  nsfw: boolean;
  sourceMessageId: string | null;
  ownerId: string | null;
  createdAt: Date;
}

export interface GuildAccess {
  guildId: string;
  ownerId: string;
  input: GuildPermissionInput;
  permissions: bigint;
}

export interface ChannelAccess {
  channel: ChannelRow;
  /** null for DMs */
  guild: GuildAccess | null;
  permissions: bigint;
  /** for DMs: the recipients' ids */
  recipientIds: string[];
  /** the overwrites `permissions` was computed from, outermost first (none for DMs); shared: do not change */
  levels: readonly (readonly OverwriteInfo[])[];
  /** when the viewer joined the channel's guild (ms since the epoch), if it is a member */
  joinedAt?: number;
}

const memberQuery = (userId: string, guildIdSql: ReturnType<typeof sql>) => sql`
  (select g.owner_id from guilds g where g.id = ${guildIdSql}) as owner_id,
  (select json_build_object('t', m.timeout_until) from members m
     where m.guild_id = ${guildIdSql} and m.user_id = ${userId}) as member,
  (select coalesce(json_agg(json_build_object('id', r.id, 'p', r.permissions::text, 'pos', r.position, 'e', r.is_everyone)), '[]'::json)
     from roles r where r.guild_id = ${guildIdSql} and (r.is_everyone or r.id in
       (select mr.role_id from member_roles mr where mr.guild_id = ${guildIdSql} and mr.user_id = ${userId}))) as roles`;

interface MemberCols {
  owner_id: string | null;
  /** `j`: joined_at, read where a channel's access is (CHANNEL_ACCESS_SQL) */
  member: { t: string | null; j?: string } | null;
  roles: { id: string; p: string; pos: number; e: boolean }[];
}

function guildInput(userId: string, r: MemberCols, now: Date): GuildPermissionInput {
  return {
    userId,
    ownerId: r.owner_id ?? '',
    isMember: r.member !== null,
    timeoutUntil: r.member?.t ? new Date(r.member.t) : null,
    now,
    roles: r.roles.map(
      (x): RoleInfo => ({ id: x.id, permissions: BigInt(x.p), position: x.pos, isEveryone: x.e }),
    ),
  };
}

/** The viewer's access to a guild, or null when the guild does not exist. */
export async function loadGuildAccess(
  db: DbOrTx,
  userId: string,
  guildId: string,
  now = new Date(),
): Promise<GuildAccess | null> {
  const r = resultRows<MemberCols>(
    await db.execute(sql`select ${memberQuery(userId, sql`${guildId}::uuid`)}`),
  )[0];
  if (!r?.owner_id) return null;
  const input = guildInput(userId, r, now);
  return { guildId, ownerId: r.owner_id, input, permissions: computeGuildPermissions(input) };
}

/**
 * The channel-access statement as fixed text ($1 channel id, $2 user id): it is the hottest
 * query in Banter (every send, every history page), so it runs as a prepared statement and
 * Postgres plans it once per connection. It must stay equivalent to memberQuery above.
 */
const CHANNEL_ACCESS_SQL = `
  with c as (select * from channels where id = $1::uuid),
  chain as (
    select c.id, 0 as depth from c
    union all select p.id, 1 from c join channels p on p.id = c.parent_id
    union all select gp.id, 2 from c join channels p on p.id = c.parent_id join channels gp on gp.id = p.parent_id
  )
  select row_to_json(c.*) as c,
    (select coalesce(json_agg(json_build_object('c', o.channel_id, 'tt', o.target_type, 'ti', o.target_id,
        'a', o.allow::text, 'd', o.deny::text)), '[]'::json)
      from permission_overwrites o where o.channel_id in (select id from chain)) as ow,
    (select coalesce(json_agg(id order by depth desc), '[]'::json) from chain) as chain,
    (select json_agg(cr.user_id) from channel_recipients cr where cr.channel_id = c.id) as rcp,
    (select g.owner_id from guilds g where g.id = c.guild_id) as owner_id,
    (select json_build_object('t', m.timeout_until, 'j', m.joined_at) from members m
       where m.guild_id = c.guild_id and m.user_id = $2::uuid) as member,
    (select coalesce(json_agg(json_build_object('id', r.id, 'p', r.permissions::text, 'pos', r.position, 'e', r.is_everyone)), '[]'::json)
       from roles r where r.guild_id = c.guild_id and (r.is_everyone or r.id in
         (select mr.role_id from member_roles mr where mr.guild_id = c.guild_id and mr.user_id = $2::uuid))) as roles
  from c`;

/** Inside a transaction there is no prepared path: inline the (uuid-validated) parameters. */
function bindForRaw(text: string, params: string[]): string {
  return text.replace(/\$(\d+)/g, (_m, i) => {
    const v = params[Number(i) - 1];
    if (!isUuid(v)) throw new Error('bindForRaw takes uuids only');
    return `'${v}'`;
  });
}

type ChannelAccessRow = MemberCols & {
  c: Record<string, unknown>;
  ow: { c: string; tt: 'ROLE' | 'MEMBER'; ti: string; a: string; d: string }[];
  chain: string[];
  rcp: string[] | null;
};

/** The clock-independent part of a channel access. */
interface ChannelAccessInputs {
  channel: ChannelRow;
  recipientIds: string[];
  member: MemberCols;
  levels: OverwriteInfo[][];
}

/** The channel's half of the inputs, the same for every user: cached per channel. */
type ChannelHalf = Omit<ChannelAccessInputs, 'member'>;

async function fetchChannelAccessInputs(
  db: DbOrTx,
  userId: string,
  channelId: string,
): Promise<ChannelAccessInputs | null> {
  const params = [channelId, userId];
  const root = databaseOf(db);
  const r = root
    ? (await root.prepared<ChannelAccessRow>('banter_channel_access', CHANNEL_ACCESS_SQL, params))[0]
    : resultRows<ChannelAccessRow>(await db.execute(sql.raw(bindForRaw(CHANNEL_ACCESS_SQL, params))))[0];
  if (!r) return null;
  const c = r.c;
  const channel: ChannelRow = {
    id: c.id as string,
    guildId: (c.guild_id as string) ?? null,
    type: c.type as string,
    name: (c.name as string) ?? null,
    topic: (c.topic as string) ?? null,
    parentId: (c.parent_id as string) ?? null,
    position: c.position as number,
    slowmodeSeconds: c.slowmode_seconds as number,
    nsfw: c.nsfw as boolean,
    sourceMessageId: (c.source_message_id as string) ?? null,
    ownerId: (c.owner_id as string) ?? null,
    createdAt: new Date(c.created_at as string),
  };
  const levels: OverwriteInfo[][] = r.chain.map((id) =>
    r.ow
      .filter((o) => o.c === id)
      .map((o) => ({ targetType: o.tt, targetId: o.ti, allow: BigInt(o.a), deny: BigInt(o.d) })),
  );
  return { channel, recipientIds: r.rcp ?? [], member: r, levels };
}

function channelAccessFrom(userId: string, x: ChannelAccessInputs, now: Date): ChannelAccess {
  // Fresh objects every time: cached inputs are shared between requests.
  const channel = { ...x.channel };
  const recipientIds = [...x.recipientIds];
  if (!channel.guildId) {
    const permissions = recipientIds.includes(userId) ? DM_PERMISSIONS : 0n;
    return { channel, guild: null, permissions, recipientIds, levels: x.levels };
  }
  const input = guildInput(userId, x.member, now);
  const guild: GuildAccess = {
    guildId: channel.guildId,
    ownerId: input.ownerId,
    input,
    permissions: computeGuildPermissions(input),
  };
  return {
    channel,
    guild,
    permissions: computeChannelPermissions(input, x.levels),
    recipientIds,
    levels: x.levels,
    joinedAt: x.member.member?.j ? Date.parse(x.member.member.j) : undefined,
  };
}

export interface AccessReadOptions {
  /**
   * Accept inputs up to ACCESS_CACHE_MS old (core/services/access-cache.ts): for hot paths that
   * only check, outside a transaction. Changes committed by this process are always seen.
   */
  cached?: boolean;
}

/**
 * The viewer's access to a channel, or null when it does not exist. Overwrites come from the
 * channel, its parent and its grandparent (thread → text channel → category), outermost first.
 */
export async function loadChannelAccess(
  db: DbOrTx,
  userId: string,
  channelId: string,
  now = new Date(),
  opts: AccessReadOptions = {},
): Promise<ChannelAccess | null> {
  const root = opts.cached ? databaseOf(db) : undefined;
  const x = root
    ? await cachedInputs(root, db, userId, channelId)
    : await fetchChannelAccessInputs(db, userId, channelId);
  return x ? channelAccessFrom(userId, x, now) : null;
}

/**
 * The inputs from the cache, kept in two halves: the channel's (row, overwrites) per channel and
 * the member's (owner, timeout, roles) per guild and user, so a guild's N users in M channels
 * cost about N + M loads per ACCESS_CACHE_MS rather than N × M. Each half is at most that old
 * and younger than this process's last access-affecting change. A miss of either half runs the
 * one statement and refills both. DMs are left out: their access rules live partly outside this
 * statement (blocks).
 */
async function cachedInputs(
  root: Database,
  db: DbOrTx,
  userId: string,
  channelId: string,
): Promise<ChannelAccessInputs | null> {
  const cache = accessCacheOf<ChannelHalf | MemberCols>(root);
  const t = Date.now();
  const ch = cache.peek(`c:${channelId}`, t) as ChannelHalf | undefined;
  if (ch) {
    const member = cache.peek(`m:${ch.channel.guildId}:${userId}`, t) as MemberCols | undefined;
    if (member) return { ...ch, member };
  }
  const mark = cache.mark();
  const x = await fetchChannelAccessInputs(db, userId, channelId);
  if (x && x.channel.guildId !== null) {
    cache.put(
      `c:${channelId}`,
      { channel: x.channel, recipientIds: x.recipientIds, levels: x.levels },
      mark,
      t,
    );
    cache.put(`m:${x.channel.guildId}:${userId}`, x.member, mark, t);
  }
  return x;
}

/**
 * Access to a channel the viewer must be able to see: NOT_FOUND when it does not exist or is
 * hidden (never reveal it), FORBIDDEN when visible but `need` is missing.
 */
export async function requireChannel(
  db: DbOrTx,
  userId: string,
  channelId: string,
  need = 0n,
  now = new Date(),
  opts: AccessReadOptions = {},
): Promise<ChannelAccess> {
  const a = await loadChannelAccess(db, userId, channelId, now, opts);
  if (!a || a.permissions === 0n) throw notFound('Channel');
  if (need && !has(a.permissions, need)) throw forbidden();
  return a;
}

/** Access to a guild the viewer is a member of (NOT_FOUND for strangers), with `need` checked. */
export async function requireGuild(
  db: DbOrTx,
  userId: string,
  guildId: string,
  need = 0n,
  now = new Date(),
): Promise<GuildAccess> {
  const a = await loadGuildAccess(db, userId, guildId, now);
  if (!a?.input.isMember) throw notFound('Guild');
  if (need && !has(a.permissions, need)) throw forbidden();
  return a;
}

export { ALL_PERMISSIONS };

export interface GuildChannelsAccess {
  /** null when the guild does not exist */
  guild: GuildAccess | null;
  /** every non-thread channel of the guild with the viewer's permissions there (0n: hidden) */
  permissions: Map<string, bigint>;
}

/**
 * The viewer's permissions in every non-thread channel of a guild in one SQL statement, computed
 * with the same `computeChannelPermissions` as loadChannelAccess (channel list views use this so
 * their cost does not grow with the number of channels).
 */
export async function loadGuildChannelsAccess(
  db: DbOrTx,
  userId: string,
  guildId: string,
  now = new Date(),
): Promise<GuildChannelsAccess> {
  const all = await loadGuildsChannelsAccess(db, userId, [guildId], now);
  return all.get(guildId) ?? { guild: null, permissions: new Map() };
}

type OverwriteCols = { c: string; tt: 'ROLE' | 'MEMBER'; ti: string; a: string; d: string };

/** Each channel's overwrite levels, outermost first, as loadChannelAccess builds them: category, then the channel. */
function channelLevels(
  ch: readonly { id: string; p: string | null }[],
  ow: readonly OverwriteCols[],
): Map<string, OverwriteInfo[][]> {
  const byChannel = new Map<string, OverwriteInfo[]>();
  for (const o of ow) {
    const list = byChannel.get(o.c) ?? [];
    list.push({ targetType: o.tt, targetId: o.ti, allow: BigInt(o.a), deny: BigInt(o.d) });
    byChannel.set(o.c, list);
  }
  const parentOf = new Map(ch.map((c) => [c.id, c.p]));
  const out = new Map<string, OverwriteInfo[][]>();
  for (const c of ch) {
    const chain = c.p && parentOf.has(c.p) ? [c.p, c.id] : [c.id];
    out.set(
      c.id,
      chain.map((id) => byChannel.get(id) ?? []),
    );
  }
  return out;
}

/** A guild's non-thread channels and the columns of their overwrites (none of a viewer's). */
const guildChannelsSql = (guildIdSql: ReturnType<typeof sql>) => sql`
  (select coalesce(json_agg(json_build_object('id', c.id, 'p', c.parent_id)), '[]'::json)
    from channels c where c.guild_id = ${guildIdSql} and c.type <> 'THREAD') as ch,
  (select coalesce(json_agg(json_build_object('c', o.channel_id, 'tt', o.target_type, 'ti', o.target_id,
      'a', o.allow::text, 'd', o.deny::text)), '[]'::json)
    from permission_overwrites o join channels c on c.id = o.channel_id
    where c.guild_id = ${guildIdSql} and c.type <> 'THREAD') as ow`;

/**
 * The overwrite levels of every non-thread channel of a guild (outermost first, as
 * loadGuildChannelsAccess computes with), in one statement and the same for every viewer: what
 * realtime delivery shares between a guild's members (core/realtime/visibility.ts), each
 * computing its permissions from its own standing. Empty when the guild does not exist.
 */
export async function loadGuildChannelLevels(
  db: DbOrTx,
  guildId: string,
): Promise<Map<string, OverwriteInfo[][]>> {
  const r = resultRows<{ ch: { id: string; p: string | null }[]; ow: OverwriteCols[] }>(
    await db.execute(sql`select ${guildChannelsSql(sql`${guildId}::uuid`)}`),
  )[0];
  return r ? channelLevels(r.ch, r.ow) : new Map();
}

/**
 * loadGuildChannelsAccess for many guilds in one SQL statement (the viewer's unread summary spans
 * all their guilds). Every requested id gets an entry; `guild` is null when it does not exist.
 */
export async function loadGuildsChannelsAccess(
  db: DbOrTx,
  userId: string,
  guildIds: readonly string[],
  now = new Date(),
): Promise<Map<string, GuildChannelsAccess>> {
  type Row = MemberCols & {
    guild_id: string;
    ch: { id: string; p: string | null }[];
    ow: OverwriteCols[];
  };
  const out = new Map<string, GuildChannelsAccess>();
  if (!guildIds.length) return out;
  const result = resultRows<Row>(
    await db.execute(sql`
      select q.id as guild_id, ${guildChannelsSql(sql`q.id`)},
        ${memberQuery(userId, sql`q.id`)}
      from unnest(${uuidArray(guildIds)}) as q(id)`),
  );
  for (const r of result) {
    const permissions = new Map<string, bigint>();
    if (!r.owner_id) {
      out.set(r.guild_id, { guild: null, permissions });
      continue;
    }
    const input = guildInput(userId, r, now);
    for (const [id, levels] of channelLevels(r.ch, r.ow)) {
      permissions.set(id, computeChannelPermissions(input, levels));
    }
    const guild: GuildAccess = {
      guildId: r.guild_id,
      ownerId: input.ownerId,
      input,
      permissions: computeGuildPermissions(input),
    };
    out.set(r.guild_id, { guild, permissions });
  }
  return out;
}

/**
 * The viewer's permissions in each of `channelIds` (any guild channel, threads included) in one
 * SQL statement, with the same parent chain as loadChannelAccess (thread → channel → category).
 * Lists that show many channels' content (a report queue, threads under messages) use this so
 * their cost stays fixed. DM channels and unknown ids are absent from the map: callers treat a
 * missing entry as hidden.
 */
export async function loadChannelsPermissions(
  db: DbOrTx,
  userId: string,
  channelIds: readonly string[],
  now = new Date(),
): Promise<Map<string, bigint>> {
  type Row = MemberCols & {
    guild_id: string;
    req: string[];
    ch: { id: string; p: string | null }[];
    ow: { c: string; tt: 'ROLE' | 'MEMBER'; ti: string; a: string; d: string }[];
  };
  const out = new Map<string, bigint>();
  const ids = [...new Set(channelIds)].filter(isUuid);
  if (!ids.length) return out;
  const result = resultRows<Row>(
    await db.execute(sql`
      with req as (
        select id, guild_id, parent_id from channels
        where id = any(${uuidArray(ids)}) and guild_id is not null),
      chain as (
        select id, guild_id, parent_id from req
        union select p.id, p.guild_id, p.parent_id from req join channels p on p.id = req.parent_id
        union select gp.id, gp.guild_id, gp.parent_id
          from req join channels p on p.id = req.parent_id join channels gp on gp.id = p.parent_id)
      select q.id as guild_id,
        (select json_agg(req.id) from req where req.guild_id = q.id) as req,
        (select json_agg(json_build_object('id', chain.id, 'p', chain.parent_id))
          from chain where chain.guild_id = q.id) as ch,
        (select coalesce(json_agg(json_build_object('c', o.channel_id, 'tt', o.target_type, 'ti', o.target_id,
            'a', o.allow::text, 'd', o.deny::text)), '[]'::json)
          from permission_overwrites o join chain on chain.id = o.channel_id
          where chain.guild_id = q.id) as ow,
        ${memberQuery(userId, sql`q.id`)}
      from (select distinct guild_id as id from req) q`),
  );
  for (const r of result) {
    if (!r.owner_id) continue;
    const input = guildInput(userId, r, now);
    const byChannel = new Map<string, OverwriteInfo[]>();
    for (const o of r.ow) {
      const list = byChannel.get(o.c) ?? [];
      list.push({ targetType: o.tt, targetId: o.ti, allow: BigInt(o.a), deny: BigInt(o.d) });
      byChannel.set(o.c, list);
    }
    const parentOf = new Map(r.ch.map((c) => [c.id, c.p]));
    for (const id of r.req) {
      // Up to two ancestors, outermost first, exactly as loadChannelAccess's chain.
      const chain = [id];
      for (let up = parentOf.get(id); up && chain.length < 3 && parentOf.has(up); up = parentOf.get(up)) {
        chain.unshift(up);
      }
      out.set(
        id,
        computeChannelPermissions(
          input,
          chain.map((c) => byChannel.get(c) ?? []),
        ),
      );
    }
  }
  return out;
}
