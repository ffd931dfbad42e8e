/**
 * Who may see an event, decided at delivery time through access.service (never computed here).
 * Each subscriber keeps a short cache per channel and guild, dropped for a whole guild on any
 * event that can change access there, so a kick or an overwrite stops delivery at once and a
 * join starts it without reconnecting.
 */
import { sql } from 'drizzle-orm';
import { type Db, type DbOrTx, databaseOf } from '../db/client.ts';
import { isUuid, timeOfId } from '../ids.ts';
import {
  computeChannelPermissions,
  type GuildPermissionInput,
  has,
  type OverwriteInfo,
  Permission,
  readOverwriteLevels,
} from '../permissions.ts';
import {
  type ChannelAccess,
  loadChannelAccess,
  loadGuildAccess,
  loadGuildChannelLevels,
} from '../services/access.service.ts';
import { accessCacheOf } from '../services/access-cache.ts';
import { compareXid, type Position } from './cursor.ts';
import { formerMemberships, messageIdOf, wasFormerMember } from './log.ts';

export interface Visible {
  /** the row's transaction (a durable row's; '0' for an ephemeral one) */
  xid?: string;
  type: string;
  guildId: string | null;
  channelId: string | null;
  userId: string | null;
  payload: Record<string, unknown>;
  /** For presence rows: who of `asked` may see them, worked out by the hub for all its viewers at once. */
  audience?: { asked: ReadonlySet<string>; may: ReadonlySet<string> };
  /** For GUILD_DELETED rows: who was in the guild (or, in a replay, the viewer if it was) */
  formerMembers?: ReadonlySet<string>;
  /** For GUILD_DELETED rows: whom formerMembers answers for (unset: everyone); see log.ts */
  formerAsked?: ReadonlySet<string>;
  /** the message a row is about, as loaded with it (log.ts): the row shows it */
  message?: { channelId: string };
}

/**
 * Of `viewers`, who may see each subject's presence: they share a guild or a DM, or are friends
 * (the subject's row about the viewer: a request accepted, most often with no DM opened yet), and
 * the subject has not blocked them (`blocksAside`: whether or not it has). One statement for a whole batch of
 * presence changes and every viewer connected here (ViewerAccess.knows asks it for one pair when
 * a row comes without an audience).
 */
export async function presenceAudience(
  db: DbOrTx,
  subjects: string[],
  viewers: string[],
  blocksAside = false,
): Promise<Map<string, Set<string>>> {
  const out = new Map<string, Set<string>>(subjects.map((s) => [s, new Set<string>()]));
  if (!subjects.length || !viewers.length) return out;
  const sub = `{${subjects.join(',')}}`;
  const view = `{${viewers.join(',')}}`;
  const r = await db.execute(sql`
    (select a.user_id as subject, b.user_id as viewer from members a
      join members b on b.guild_id = a.guild_id
      where a.user_id = any(${sub}::uuid[]) and b.user_id = any(${view}::uuid[])
    union
    select a.user_id, b.user_id from channel_recipients a
      join channel_recipients b on b.channel_id = a.channel_id
      where a.user_id = any(${sub}::uuid[]) and b.user_id = any(${view}::uuid[])
    union
    select f.user_id, f.target_id from relationships f
      where f.user_id = any(${sub}::uuid[]) and f.target_id = any(${view}::uuid[]) and f.kind = 'FRIEND')
    except
    select r.user_id, r.target_id from relationships r
      where r.user_id = any(${sub}::uuid[]) and r.kind = 'BLOCKED' and not ${blocksAside}`);
  for (const row of (r as unknown as { rows: { subject: string; viewer: string }[] }).rows) {
    out.get(row.subject)?.add(row.viewer);
  }
  return out;
}

/** No channel, guild or user has this id (theirs are UUIDv7): the subject of accessAnswers. */
const NOBODY = '00000000-0000-0000-0000-000000000000';

/**
 * Whether access checks answer: the statements a check runs (a channel's, a guild's), asked about
 * a subject that does not exist. A check that failed while these work failed on its own subject
 * (its rows make the statement fail, or the code on what it returned), not because the database
 * is away or every check fails (a table of theirs away, a failover): see skipsUnchecked in hub.ts.
 */
export async function accessAnswers(db: Db): Promise<boolean> {
  try {
    await Promise.all([loadChannelAccess(db, NOBODY, NOBODY), loadGuildAccess(db, NOBODY, NOBODY)]);
    return true;
  } catch {
    return false;
  }
}

const CACHE_MS = 30_000;
/**
 * When a cached answer lapses: CACHE_MS from now, give or take a quarter. The subscribers of a
 * busy channel load their answers at the same event; with one fixed lifetime they would all lapse
 * together, and one event every CACHE_MS would wait for all their loads at once.
 */
const lapseAt = () => Date.now() + CACHE_MS * (0.75 + Math.random() * 0.5);
/**
 * A channel's cached answer used by a row with less than this left before it lapses is loaded
 * again beside the delivery (see renewChannel): in a busy channel the row that found it lapsed
 * waited for the load, and that subscriber's frame went out after everyone else's, behind the
 * whole fan-out (a few of a thousand subscribers each message, the slowest deliveries).
 */
const RENEW_MS = 5_000;
/**
 * What a channel's events need: live, to view it; replayed, its history too, unless the row
 * carries none of it (WITHOUT_HISTORY).
 */
const LIVE = Permission.VIEW_CHANNEL;
const REPLAY = Permission.VIEW_CHANNEL | Permission.READ_HISTORY;
/**
 * Rows about a channel that show none of its history: a member who may view the channel but not
 * read its history still gets them in a replay, as it would have live. Its client holds the
 * messages it saw live and the channel as it was; without these it would keep showing a deleted
 * message, or an old name, that queries no longer show. Any other row (a message, an edit, a
 * reaction, a pin, and any type added later) needs READ_HISTORY to be replayed.
 */
const WITHOUT_HISTORY = new Set(['MESSAGE_DELETED', 'CHANNEL_CREATED', 'CHANNEL_UPDATED']);

/**
 * Rows about a message (its creation, edit, a reaction, a pin), which show it as it is: live, a
 * member who may view the channel but not read its history gets them only for a message sent
 * since it joined the guild (whose MessageCreated it got live, or would have had it been
 * connected; a stream's own start would lose them for a client that resumes). Older ones are
 * history it may not read (message(id) refuses them too), a MessageCreated included: the log may
 * bring a message sent just before the join after it (behind an older transaction still open),
 * and access is judged as it is when the row is delivered.
 */
const ABOUT_A_MESSAGE = new Set([
  'MESSAGE_CREATED',
  'MESSAGE_UPDATED',
  'REACTION_ADDED',
  'REACTION_REMOVED',
  'MESSAGE_PINNED',
  'MESSAGE_UNPINNED',
]);

/** When the message a row is about was sent (its UUIDv7 id's time; -1 without one), read once per row. */
const sentTimes = new WeakMap<object, number>();
function sentAt(e: Visible): number {
  let t = sentTimes.get(e.payload);
  if (t === undefined) {
    const id = messageIdOf(e);
    t = id && isUuid(id) ? timeOfId(id) : -1;
    sentTimes.set(e.payload, t);
  }
  return t;
}

const loading = new WeakMap<object, Map<string, Promise<unknown>>>();

/**
 * A viewer's access for delivery: one load shared by all of this process's subscribers asking
 * the same question at once (a user's several sockets, a crowd reconnecting after a restart,
 * caches of a busy channel's subscribers expiring together). The access cache's generation is
 * part of the key: the tailer clears that cache when it reads an access-changing row, before any
 * subscriber sees the row, so a subscriber that has seen it never joins a load begun before it.
 */
function shared<T>(db: Db, question: string, load: () => Promise<T>): Promise<T> {
  const root = databaseOf(db);
  if (!root) return load();
  let m = loading.get(root);
  if (!m) {
    m = new Map();
    loading.set(root, m);
  }
  const key = `${accessCacheOf(root).mark()}:${question}`;
  let p = m.get(key) as Promise<T> | undefined;
  if (!p) {
    p = load();
    const inFlight = m;
    const done = () => inFlight.delete(key);
    p.then(done, done);
    m.set(key, p);
  }
  return p;
}

/**
 * A guild's channels (threads aside) and their overwrites, loaded once for all of this process's
 * viewers: what each member's GuildViews are computed from, with its own standing. A category's
 * deletion (a row per channel) made each member subscribed here load them with its standing, one
 * statement and every channel's permissions worked out per member (1,000 members of a guild with
 * 2,000 channels: 1,000 such statements, 2M computations, the hub busy ~30 s and other guilds'
 * rows held).
 */
interface GuildChannels {
  /** each channel's overwrite levels, outermost first */
  levels: ReadonlyMap<string, OverwriteInfo[][]>;
  all: ReadonlySet<string>;
  /** the users a MEMBER overwrite of the guild is for: their views are worked out alone */
  targeted: ReadonlySet<string>;
  /** the channels each standing (standingKey) may view, worked out once for the viewers holding it */
  live: Map<string, ReadonlySet<string>>;
  /** the tailer's position as the load began: every row up to it was committed, and is in it */
  asOf: Position | undefined;
  until: number;
}

/** How long a guild's channels loaded for one viewer serve others, unless access changed since. */
const GUILD_CHANNELS_MS = 5_000;
/**
 * Per database, the guilds' channels loaded in the access cache's generation `mark` (see shared):
 * those of an older one serve no viewer, and are let go as it ends (2,000 channels hold ~2.4 MB:
 * kept for every guild a burst was ever judged in, up to 1,000, they were held for good).
 */
const guildChannelsLoaded = new WeakMap<object, { mark: number; byGuild: Map<string, GuildChannels> }>();

/** How many guilds' channels are held for this database's viewers (tests). */
export function heldGuildChannels(db: Db): number {
  const root = databaseOf(db);
  return (root && guildChannelsLoaded.get(root)?.byGuild.size) || 0;
}

/**
 * The guild's channels as loaded for any viewer of this process since the access cache's last
 * invalidation (the tailer's read of an access-changing row, this process's commit of one) and
 * within GUILD_CHANNELS_MS; else loaded (once for every viewer asking meanwhile).
 */
function guildChannels(
  db: Db,
  guildId: string,
  committed: () => Position | undefined,
): GuildChannels | Promise<GuildChannels> {
  const root = databaseOf(db);
  const kept = root ? guildChannelsLoaded.get(root) : undefined;
  const mark = root ? accessCacheOf(root).mark() : 0;
  if (kept && kept.mark !== mark) guildChannelsLoaded.delete(root!);
  const k = kept?.mark === mark ? kept.byGuild.get(guildId) : undefined;
  if (k && Date.now() < k.until) return k;
  const load = async (): Promise<GuildChannels> => {
    // Taken before the statement is sent: every row up to it is in what it reads.
    const asOf = committed();
    const levels = await loadGuildChannelLevels(db, guildId);
    const targeted = new Set<string>();
    for (const ls of levels.values())
      for (const l of ls) for (const o of l) if (o.targetType === 'MEMBER') targeted.add(o.targetId);
    const c = {
      levels,
      all: new Set(levels.keys()),
      targeted,
      live: new Map(),
      asOf,
      until: Date.now() + GUILD_CHANNELS_MS,
    };
    if (root && accessCacheOf(root).mark() === mark) {
      let m = guildChannelsLoaded.get(root);
      if (m?.mark !== mark) {
        m = { mark, byGuild: new Map() };
        guildChannelsLoaded.set(root, m);
      }
      if (m.byGuild.size >= 1_000) m.byGuild.clear();
      m.byGuild.set(guildId, c);
    }
    return c;
  };
  return shared(db, `gc:${guildId}`, load);
}

/**
 * What a member's permissions in a channel are computed from, but for MEMBER overwrites (see
 * GuildChannels.targeted): members with the same key may view the same channels.
 */
function standingKey(i: GuildPermissionInput): string {
  if (i.userId === i.ownerId) return 'owner';
  const roles = i.roles.map((r) => `${r.id}:${r.permissions}:${r.isEveryone ? 1 : 0}`).sort();
  return `${i.timeoutUntil && i.timeoutUntil > i.now ? 'timed out' : ''}|${roles.join(',')}`;
}

const noChannels: ReadonlySet<string> = new Set();

/** The channels of `c` that a member with this standing may view. */
function liveFor(c: GuildChannels, input: GuildPermissionInput): ReadonlySet<string> {
  const compute = () => {
    const live = new Set<string>();
    for (const [id, levels] of c.levels)
      if (has(computeChannelPermissions(input, levels), LIVE)) live.add(id);
    return live;
  };
  if (c.targeted.has(input.userId)) return compute();
  const key = standingKey(input);
  let live = c.live.get(key);
  if (!live) {
    live = compute();
    c.live.set(key, live);
  }
  return live;
}

/** Events after which access in a guild may differ. */
const ACCESS_CHANGING = new Set([
  'PERMISSIONS_CHANGED',
  'ROLE_CREATED',
  'ROLE_UPDATED',
  'ROLE_DELETED',
  'MEMBER_JOINED',
  'MEMBER_LEFT',
  'MEMBER_UPDATED',
  'MEMBER_KICKED',
  'MEMBER_BANNED',
  'CHANNEL_CREATED',
  'CHANNEL_UPDATED',
  'CHANNEL_DELETED',
  'GUILD_DELETED',
  'DIRECT_CHANNEL_CREATED',
]);

/**
 * Whether a GUILD_UPDATED changed who owns the guild: the owner has every permission, so access
 * to channels hidden from its roles changes for the old and the new owner. Other guild changes
 * (name, icon, description) change no access and keep the cached answers; a payload that does
 * not say what changed is taken to be an ownership change.
 */
function changesOwner(e: Visible): boolean {
  const changes = e.payload.changes;
  return typeof changes !== 'object' || changes === null || 'ownerId' in changes;
}

/** Access-changing events that change channels only: the viewer's standing in the guild stays. */
const CHANNEL_LEVEL = new Set([
  'CHANNEL_CREATED',
  'CHANNEL_UPDATED',
  'CHANNEL_DELETED',
  'PERMISSIONS_CHANGED',
]);

/** Events about a guild as a whole, shown to its members (the channel may be gone or hidden). */
const GUILD_LEVEL = new Set(['PERMISSIONS_CHANGED', 'GUILD_UPDATED', 'GUILD_DELETED']);

const noLevels: OverwriteInfo[][] = [];
const recorded = new WeakMap<object, OverwriteInfo[][]>();

/**
 * The overwrites a row recorded as deciding who could view its channel before it (a deletion, a
 * move, a category's overwrites copied to its channels: channel.service), read once per row for
 * all its subscribers; undefined for a row that recorded none (written before they were, or an
 * overwrite change, which names its target instead), null when the record cannot be read.
 */
function recordedLevels(e: Visible): OverwriteInfo[][] | null | undefined {
  if (!('overwrites' in e.payload)) return undefined;
  let levels = recorded.get(e.payload);
  if (!levels) {
    levels = readOverwriteLevels(e.payload.overwrites) ?? noLevels;
    recorded.set(e.payload, levels);
  }
  return levels === noLevels ? null : levels;
}

/** Membership events are also shown to the member they are about, who may no longer be in. */
const ABOUT_A_MEMBER = new Set([
  'MEMBER_JOINED',
  'MEMBER_LEFT',
  'MEMBER_KICKED',
  'MEMBER_BANNED',
  'MEMBER_UPDATED',
]);

/**
 * Whether `userId` hears of a guild's deletion: it was in, or did it; undefined when nothing was
 * recorded, 'ask' when the row's former members were read for other viewers only.
 */
function sawDeletion(e: Visible, userId: string): boolean | 'ask' | undefined {
  if (e.payload.actorId === userId) return true;
  if (!e.formerMembers) return undefined;
  if (e.formerMembers.has(userId)) return true;
  return !e.formerAsked || e.formerAsked.has(userId) ? false : 'ask';
}

/** The transaction of a durable row; undefined for an ephemeral one ('0') or one that has none. */
const durableXid = (e: Visible) => (e.xid && e.xid !== '0' ? e.xid : undefined);

/** A viewer's cached standing in a guild: its permission input there, null when not a member. */
interface GuildEntry {
  member: boolean;
  input: GuildPermissionInput | null;
  until: number;
  /** standingKey(input), worked out once */
  key?: string;
}

/** Per overwrite levels (a row's, read once for all its viewers: recordedLevels), couldViewBy's answers. */
const couldViewAnswers = new WeakMap<object, { members: boolean; by: Map<string, boolean> }>();

/**
 * Whether a member with this standing may view a channel with these overwrite levels, answered
 * once per standing for a row's viewers (a category's deletion: a row per channel, each judged
 * for every member subscribed here), unless the levels hold a MEMBER overwrite (then each alone).
 */
function couldViewBy(g: GuildEntry, input: GuildPermissionInput, levels: OverwriteInfo[][]): boolean {
  let a = couldViewAnswers.get(levels);
  if (!a) {
    a = { members: levels.some((l) => l.some((o) => o.targetType === 'MEMBER')), by: new Map() };
    couldViewAnswers.set(levels, a);
  }
  if (a.members) return has(computeChannelPermissions(input, levels), LIVE);
  g.key ??= standingKey(input);
  let yes = a.by.get(g.key);
  if (yes === undefined) {
    yes = has(computeChannelPermissions(input, levels), LIVE);
    a.by.set(g.key, yes);
  }
  return yes;
}

/** A viewer's answers for a channel, cached: booleans, no bigint work per event. */
interface ChannelEntry {
  /** may view it (live rows) */
  live: boolean;
  /** may read its history (replayed rows) */
  replay: boolean;
  guildId: string | null;
  /** when the viewer joined its guild (ms; Infinity when not a member), for messageOk */
  joinedAt: number;
  until: number;
  /** the access cache's generation as its load began (undefined: no cache, never renewed) */
  mark?: number;
  /** its load again before it lapses (renewChannel), settled once the answer is kept or not */
  renewing?: Promise<void>;
}

/**
 * Whom a viewer may show each of a guild's channels (threads aside), loaded together: what a
 * burst of its channel rows (a category's deletion tells each of its channels) is judged by.
 */
interface GuildViews {
  /** the guild's channels, threads aside (another is loaded by itself) */
  all: ReadonlySet<string>;
  /** those the viewer may view */
  live: ReadonlySet<string>;
  input: GuildPermissionInput | null;
  /** the tailer's position as the load began: every row up to it was committed, and is in it */
  asOf: Position | undefined;
  until: number;
}

/**
 * One subscriber's view of who may see what. Its caches are made on first use: an idle
 * subscribed socket holds none (thousands of them are what a busy instance mostly has).
 */
export class ViewerAccess {
  /** per channel: may view it live, may read its history (replay), as booleans: no bigint work per event */
  private channels: Map<string, ChannelEntry> | undefined;
  private guilds: Map<string, GuildEntry> | undefined;
  /** guilds this viewer was seen in: who hears of a deletion whose former members were not loaded */
  private everIn: Set<string> | undefined;
  private known: Map<string, { yes: boolean; until: number }> | undefined;
  private views: Map<string, GuildViews> | undefined;
  /** per guild: the transaction of its last channel row whose channel was loaded alone */
  private alone: Map<string, string> | undefined;
  /** deleted guilds of the page being replayed, looked up for this viewer: whether it was in */
  private formerPage: Map<string, boolean> | undefined;

  constructor(
    private db: Db,
    readonly userId: string,
    /** the tailer's position now: every row up to it has committed (unset: none is known to) */
    private committed: () => Position | undefined = () => undefined,
  ) {}

  /**
   * A page of rows about to be replayed: its GUILD_DELETED rows whose former members were read for
   * other viewers only (a shared page read before this viewer subscribed) are looked up for it in
   * one statement, where canSee would ask about each (200 deletions: 200 statements, one after
   * another). Kept for that page only.
   */
  async lookUpDeletions(rows: readonly Visible[]): Promise<void> {
    this.formerPage = undefined;
    const asked = rows.filter(
      (r) => r.type === 'GUILD_DELETED' && r.guildId && sawDeletion(r, this.userId) === 'ask',
    );
    if (asked.length < 2) return;
    // Failed: each row is asked about by itself, as before, and fails as its check (a row whose
    // check fails for good is skipped: skipsUnchecked in hub.ts).
    const was = await formerMemberships(this.db, asked, this.userId).catch(() => undefined);
    if (was) this.formerPage = new Map(asked.map((r) => [r.guildId!, was.has(r)]));
  }

  /** Called for every event in log order before deciding on it. */
  observe(e: Visible) {
    if (e.guildId && (ACCESS_CHANGING.has(e.type) || (e.type === 'GUILD_UPDATED' && changesOwner(e))))
      this.changedIn(e.guildId, e);
    if (e.channelId && (e.type === 'DIRECT_CHANNEL_CREATED' || e.type === 'PERMISSIONS_CHANGED')) {
      this.channels?.delete(e.channelId);
    }
    // Someone (un)blocked this viewer: the row is theirs (never delivered here), but it changes
    // whether their presence may be shown.
    if (e.type === 'RELATIONSHIP_UPDATED' && e.userId && e.payload.targetId === this.userId) {
      this.known?.delete(e.userId);
    }
  }

  private seenIn(guildId: string) {
    this.everIn ??= new Set();
    this.everIn.add(guildId);
  }

  /**
   * An access-changing row of a guild: what it may change for this viewer is forgotten, and only
   * that. A burst of such rows (a channel deleted with its thousands of threads, a raid of joins)
   * made every subscriber of the instance load its standing in that guild again for each row, one
   * load after another while the tailer kept handing it rows, until it was cut off as a slow
   * consumer: another guild's members and the guild's own alike.
   */
  private changedIn(guildId: string, e: Visible) {
    const about =
      ABOUT_A_MEMBER.has(e.type) && typeof e.payload.userId === 'string' ? e.payload.userId : null;
    // A member's joining, leaving, roles or timeout change that member's access, nobody else's.
    if (about !== null && about !== this.userId) return;
    // Loaded after the row committed: they hold what it changed (a burst's rows, one transaction's
    // or read together, cost one load, not one per row). Else dropped, whatever the standing
    // cached below says: a non-member's may have lapsed, and be loaded again in (it left and came
    // back, rows this subscriber has not reached yet), and these be used for a row they miss.
    const v = this.views?.get(guildId);
    const xid = durableXid(e);
    if (v && !(v.asOf && xid && compareXid(xid, v.asOf.xid) <= 0)) this.views!.delete(guildId);
    const g = this.guilds?.get(guildId);
    // A non-member stays one until a row about itself (its MEMBER_JOINED): its channels there
    // are none of its.
    if (g && !g.member && about === null) return;
    // Channels and their overwrites change the viewer's channels there, not its standing in the
    // guild (membership, roles, owner: GuildEntry).
    if (CHANNEL_LEVEL.has(e.type)) this.forgetChannelsOf(guildId);
    else this.forgetGuild(guildId);
  }

  private forgetChannelsOf(guildId: string) {
    if (this.channels)
      for (const [id, c] of this.channels) if (c.guildId === guildId) this.channels.delete(id);
  }

  forgetGuild(guildId: string) {
    this.guilds?.delete(guildId);
    this.views?.delete(guildId);
    this.forgetChannelsOf(guildId);
  }

  /**
   * Whom the viewer may show each of the guild's channels, in one load (see GuildViews), kept until
   * a row of the guild that changes access and committed after the load began.
   */
  private viewsOf(guildId: string): GuildViews | Promise<GuildViews> {
    const v = this.views?.get(guildId);
    if (v && Date.now() < v.until) return v;
    // The guild's channels, shared with its other members here, and the viewer's standing (cached:
    // a row about its roles or membership drops both it and the views).
    const c = guildChannels(this.db, guildId, this.committed);
    const g = this.guild(guildId);
    const make = (c: GuildChannels, g: GuildEntry): GuildViews => {
      // The standing as cached, judged at this time: a timeout ends with no row, and a standing
      // cached while it lasted still says timed out (a channel loaded alone is judged now too).
      const input = g.input && { ...g.input, now: new Date() };
      const entry: GuildViews = {
        all: c.all,
        live: input ? liveFor(c, input) : noChannels,
        input,
        asOf: c.asOf,
        until: lapseAt(),
      };
      this.views ??= new Map();
      this.views.set(guildId, entry);
      return entry;
    };
    if (!(c instanceof Promise) && !(g instanceof Promise)) return make(c, g);
    return Promise.all([c, g]).then(([c, g]) => make(c, g));
  }

  /** Sync when cached (the common case), a promise otherwise. */
  canSee(e: Visible, replay: boolean): boolean | Promise<boolean> {
    // A row about a message shows that message: only to who may see the message's own channel,
    // whatever the row's columns say (a row with another channel, none, or addressed to a user is
    // none a writer makes: a hand edit, a restore, a writer's bug), and, addressed, to that user.
    if (e.message && ABOUT_A_MESSAGE.has(e.type) && (e.message.channelId !== e.channelId || e.userId)) {
      if (e.userId && e.userId !== this.userId) return false;
      return replay ? this.channelOk(e.message.channelId, true) : this.messageOk(e, e.message.channelId);
    }
    if (e.userId) {
      if (e.userId !== this.userId) return false;
      // Addressing narrows who hears of a row and grants nothing: one about a channel or a guild
      // (read state, a DM opened) still needs the viewer to see it (another is none a writer makes).
      if (!e.channelId && !e.guildId) return true;
      return e.channelId ? this.channelOk(e.channelId, false) : this.member(e.guildId!);
    }
    if (e.type === 'PRESENCE_CHANGED') {
      // addressed to one viewer (a blocker shown OFFLINE to whom it blocked)
      if (typeof e.payload.to === 'string') return e.payload.to === this.userId;
      if (e.payload.userId === this.userId) return true;
      if (e.audience?.asked.has(this.userId)) return e.audience.may.has(this.userId);
      return this.knows(String(e.payload.userId));
    }
    if (ABOUT_A_MEMBER.has(e.type) && e.payload.userId === this.userId) return true;
    if (e.type === 'GUILD_DELETED') {
      const saw = sawDeletion(e, this.userId);
      if (saw === 'ask') {
        const was = e.guildId ? this.formerPage?.get(e.guildId) : undefined;
        if (was !== undefined) return was;
        return shared(this.db, `f:${this.userId}:${e.guildId}`, () =>
          wasFormerMember(this.db, e, this.userId),
        );
      }
      return saw ?? (!!e.guildId && !!this.everIn?.has(e.guildId));
    }
    if (e.type === 'PERMISSIONS_CHANGED' && e.channelId && e.guildId) {
      const channelId = e.channelId;
      return this.ifMember(e.guildId, () => this.overwriteOk(e, channelId));
    }
    if (e.type === 'CHANNEL_DELETED' && e.guildId) return this.deletionOk(e, e.guildId);
    if (e.channelId && e.guildId && CHANNEL_LEVEL.has(e.type)) {
      const channelId = e.channelId;
      return this.ifMember(e.guildId, () =>
        this.channelOk(channelId, replay && !WITHOUT_HISTORY.has(e.type)),
      );
    }
    if (e.channelId && !GUILD_LEVEL.has(e.type)) {
      if (!replay && ABOUT_A_MESSAGE.has(e.type)) return this.messageOk(e, e.channelId);
      return this.channelOk(e.channelId, replay && !WITHOUT_HISTORY.has(e.type));
    }
    if (e.guildId) return this.member(e.guildId);
    return false;
  }

  /**
   * A row about one of a guild's channels (created, changed, its overwrites), for a member only: a
   * non-member may view none of them, and is answered from its standing in the guild (one load,
   * kept across such rows: CHANNEL_LEVEL rows keep it), not a load of its access to each channel.
   * A category's deletion tells each of its channels (thousands): a subscriber of another guild
   * loaded its access to each, one after another, and its own guild's rows waited behind them.
   */
  private ifMember(guildId: string, then: () => boolean | Promise<boolean>): boolean | Promise<boolean> {
    const g = this.guild(guildId);
    if (g instanceof Promise) return g.then((x) => x.member && then());
    return g.member && then();
  }

  private channelOk(channelId: string, replay: boolean): boolean | Promise<boolean> {
    const c = this.cachedChannel(channelId);
    if (c) return replay ? c.replay : c.live;
    return this.loadChannel(channelId).then(({ entry }) => (replay ? entry.replay : entry.live));
  }

  /** A live row about an existing message (ABOUT_A_MESSAGE). */
  private messageOk(e: Visible, channelId: string): boolean | Promise<boolean> {
    // Who may read the history (nearly everyone) is answered as channelOk would: on the fan-out's
    // path, the message's time is read only for a member who may not.
    const c = this.cachedChannel(channelId);
    if (c) return c.replay || (c.live && sentAt(e) >= c.joinedAt);
    return this.loadChannel(channelId).then(
      ({ entry }) => entry.replay || (entry.live && sentAt(e) >= entry.joinedAt),
    );
  }

  /**
   * The channel's cached answer while it lasts (undefined once it has lapsed); one with less than
   * RENEW_MS left is loaded again meanwhile.
   */
  private cachedChannel(channelId: string): ChannelEntry | undefined {
    const c = this.channels?.get(channelId);
    if (!c) return undefined;
    const left = c.until - Date.now();
    if (left <= 0) return undefined;
    if (left < RENEW_MS && !c.renewing) this.renewChannel(channelId, c);
    return c;
  }

  /**
   * Loads a channel's answer again while the cached one still serves, and keeps it only if
   * nothing that may change access was read or committed here since the load began (the access
   * cache's generation: the tailer moves it on reading such a row, before any subscriber sees
   * it), and the entry is still the one renewed (observe dropped none). Else, as on a failure,
   * the cached answer lapses and the next row loads it again, waiting, as before.
   */
  private renewChannel(channelId: string, c: ChannelEntry) {
    const root = databaseOf(this.db);
    if (!root) return;
    const cache = accessCacheOf(root);
    const mark = cache.mark();
    // Only while the generation is still the one the cached answer was loaded at: once it moved,
    // an access-changing row was read (or committed) here that this subscriber may not have
    // reached yet (it is still on rows before it, judged by what it could see then), and an answer
    // loaded now holds the change: kept, it would judge those rows (a kicked member's last rows
    // withheld, a new member given rows from before its join). Such an answer lapses as before.
    if (c.mark !== mark) return;
    c.renewing = this.channelAccess(channelId).then(
      (a) => {
        if (cache.mark() === mark && this.channels?.get(channelId) === c)
          this.keepChannel(channelId, a, mark);
      },
      () => {},
    );
  }

  /** The viewer's access to a channel, loaded, and remembered as channelOk answers it. */
  private loadChannel(channelId: string) {
    const root = databaseOf(this.db);
    const mark = root ? accessCacheOf(root).mark() : undefined;
    return this.channelAccess(channelId).then((a) => ({
      access: a,
      entry: this.keepChannel(channelId, a, mark),
    }));
  }

  private channelAccess(channelId: string) {
    // Through the per-process access cache too (core/services/access-cache.ts): the channel's
    // half of the inputs is then loaded once for all its viewers.
    const load = () => loadChannelAccess(this.db, this.userId, channelId, new Date(), { cached: true });
    return shared(this.db, `c:${this.userId}:${channelId}`, load);
  }

  /** A loaded access to a channel, remembered as channelOk answers it. */
  private keepChannel(channelId: string, a: ChannelAccess | null, mark: number | undefined): ChannelEntry {
    const perms = a?.permissions ?? 0n;
    const guildId = a?.channel.guildId ?? null;
    if (guildId && perms) {
      this.seenIn(guildId);
      // In the guild now, where the cached standing says out: that standing is older than this
      // answer (it came back, in a row not reached yet). It goes, or changedIn would pass over
      // the guild's rows before that one (a role change committed after this load, its xid lower
      // than the join's) and keep this answer across them.
      if (this.guilds?.get(guildId)?.member === false) this.guilds.delete(guildId);
    }
    const joinedAt = a?.joinedAt ?? Number.POSITIVE_INFINITY;
    const entry: ChannelEntry = {
      live: has(perms, LIVE),
      replay: has(perms, REPLAY),
      guildId,
      joinedAt,
      until: lapseAt(),
      mark,
    };
    this.channels ??= new Map();
    this.channels.set(channelId, entry);
    return entry;
  }

  /**
   * The overwrites that apply to a channel changed (an overwrite set or removed, a move, a
   * category's copied to its channels): the row records those that applied before, and goes to
   * who may view the channel now or could by those. A member who could not see the channel
   * before and still cannot is not told it exists. Rows of older instances record none: one aimed
   * at a member or role goes to who may view it now and to the members it is for (the member, or
   * the holders of the role, @everyone being every member); one aimed at nobody, to every member.
   */
  private overwriteOk(e: Visible, channelId: string): boolean | Promise<boolean> {
    const { targetType, targetId } = e.payload;
    const aimed = typeof targetId === 'string' && (targetType === 'MEMBER' || targetType === 'ROLE');
    const before = recordedLevels(e);
    if (!aimed && before === undefined) return this.member(e.guildId!);
    const c = this.channels?.get(channelId);
    if (c?.live && Date.now() < c.until) return true;
    // A burst of these rows (a category's deletion tells each of its channels, thousands, in one
    // transaction) is judged by the guild's channels loaded together: one load, where each loaded
    // its channel. The first row of a transaction loads its channel alone (a change of one
    // channel's overwrites: a guild's every channel is more to read, for every member).
    const loaded = this.views?.get(e.guildId!);
    const fresh = loaded && Date.now() < loaded.until;
    const xid = durableXid(e);
    if (!fresh && xid && this.alone?.get(e.guildId!) !== xid) {
      this.alone ??= new Map();
      this.alone.set(e.guildId!, xid);
      return this.overwriteOkAlone(e, channelId, aimed, before);
    }
    // No closure made for the answer when the views are loaded (a burst's every row but its first,
    // for every member): a named one costs tsx's __name on each call.
    const v = this.viewsOf(e.guildId!);
    return v instanceof Promise
      ? v.then((v) => this.overwriteBy(v, e, channelId, aimed, before))
      : this.overwriteBy(v, e, channelId, aimed, before);
  }

  /** overwriteOk's answer by the guild's channels loaded together. */
  private overwriteBy(
    v: GuildViews,
    e: Visible,
    channelId: string,
    aimed: boolean,
    before: OverwriteInfo[][] | null | undefined,
  ): boolean | Promise<boolean> {
    return v.all.has(channelId)
      ? this.overwriteDecision(e, v.live.has(channelId), v.input, aimed, before)
      : this.overwriteOkAlone(e, channelId, aimed, before);
  }

  /** overwriteOk for a channel the guild's channels loaded together do not hold (a thread, a new one). */
  private overwriteOkAlone(
    e: Visible,
    channelId: string,
    aimed: boolean,
    before: OverwriteInfo[][] | null | undefined,
  ): Promise<boolean> {
    return this.loadChannel(channelId).then(({ access, entry }) => {
      const input = access?.guild?.input;
      return this.overwriteDecision(e, entry.live, input?.isMember ? input : null, aimed, before);
    });
  }

  /**
   * overwriteOk's answer, from whether the viewer may view the channel now and its standing in the
   * guild (`input`, null when not a member), however they were loaded.
   */
  private overwriteDecision(
    e: Visible,
    live: boolean,
    input: GuildPermissionInput | null,
    aimed: boolean,
    before: OverwriteInfo[][] | null | undefined,
  ): boolean | Promise<boolean> {
    if (live) return true;
    if (before) return this.couldView(e.guildId!, before);
    if (!aimed || !input) return false;
    const { targetType, targetId } = e.payload;
    if (targetType === 'MEMBER') return targetId === this.userId;
    return input.roles.some((r) => r.id === targetId);
  }

  /**
   * A channel was deleted: told to who could view it just before, by the viewer's roles now and
   * the overwrites the row recorded (its own are gone with it), and to whoever deleted it. A row
   * that recorded none (written before they were) goes to every member, as it did then; one whose
   * record cannot be read, to the deleter only.
   */
  private deletionOk(e: Visible, guildId: string): boolean | Promise<boolean> {
    if (e.payload.actorId === this.userId) return true;
    const levels = recordedLevels(e);
    if (levels === undefined) return this.member(guildId);
    if (levels === null) return false;
    return this.couldView(guildId, levels);
  }

  /** Whether the viewer's roles in the guild now, with these overwrite levels, give VIEW_CHANNEL. */
  private couldView(guildId: string, levels: OverwriteInfo[][]): boolean | Promise<boolean> {
    const g = this.guild(guildId);
    if (g instanceof Promise) return g.then((g) => !!g.input && couldViewBy(g, g.input, levels));
    return !!g.input && couldViewBy(g, g.input, levels);
  }

  /** Presence is shown to users who share a guild or a DM with its subject, unless it blocked them. */
  private knows(otherId: string): boolean | Promise<boolean> {
    if (otherId === this.userId) return true;
    const k = this.known?.get(otherId);
    if (k && Date.now() < k.until) return k.yes;
    const load = () => presenceAudience(this.db, [otherId], [this.userId]);
    return shared(this.db, `p:${this.userId}:${otherId}`, load).then((audience) => {
      const yes = !!audience.get(otherId)?.has(this.userId);
      this.known ??= new Map();
      if (this.known.size > 10_000) this.known.clear();
      this.known.set(otherId, { yes, until: lapseAt() });
      return yes;
    });
  }

  private member(guildId: string): boolean | Promise<boolean> {
    const g = this.guild(guildId);
    return g instanceof Promise ? g.then((x) => x.member) : g.member;
  }

  private guild(guildId: string): GuildEntry | Promise<GuildEntry> {
    const g = this.guilds?.get(guildId);
    if (g && Date.now() < g.until) return g;
    const load = () => loadGuildAccess(this.db, this.userId, guildId);
    return shared(this.db, `g:${this.userId}:${guildId}`, load).then((a) => {
      const member = !!a?.input.isMember;
      if (member) this.seenIn(guildId);
      // Out: what was loaded of its channels there while in goes, as changedIn passes over a
      // non-member's rows (a lagging subscriber: it left in a row not reached yet, and a role or
      // channel change before that row hid a channel its cached answer still showed). Only where
      // it was seen in (everIn: a channel it could view, or its standing): a bystander's answers
      // (thousands, none showing a thing) are not gone through for each guild it is out of.
      else if (this.everIn?.has(guildId)) {
        this.views?.delete(guildId);
        this.forgetChannelsOf(guildId);
      }
      const entry = { member, input: member ? a!.input : null, until: lapseAt() };
      this.guilds ??= new Map();
      this.guilds.set(guildId, entry);
      return entry;
    });
  }
}
