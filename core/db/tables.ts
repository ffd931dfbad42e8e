/**
 * The database schema, shared by the app and drizzle-kit (`drizzle.config.ts`).
 * Ids are UUIDv7 made in the app (core/ids.ts), so id order is creation order.
 */
import { sql } from 'drizzle-orm';
import {
  bigint,
  bigserial,
  boolean,
  customType,
  index,
  integer,
  jsonb,
  pgTable,
  primaryKey,
  text,
  timestamp,
  uniqueIndex,
  uuid,
} from 'drizzle-orm/pg-core';

const ts = (name: string) => timestamp(name, { withTimezone: true, mode: 'date' });
const createdAt = () => ts('created_at').notNull().defaultNow();
/** Permission bitfields: bigint so there is room past 32 flags, as Discord has. */
const perms = (name: string) => bigint(name, { mode: 'bigint' });
/** The id of the writing transaction: lets the event log be read in commit-safe order. */
const xid8 = customType<{ data: string; driverData: string }>({ dataType: () => 'xid8' });

export const users = pgTable(
  'users',
  {
    id: uuid('id').primaryKey(),
    username: text('username').notNull(),
    email: text('email').notNull(),
    passwordHash: text('password_hash').notNull(),
    displayName: text('display_name'),
    bio: text('bio'),
    avatarUrl: text('avatar_url'),
    isAdmin: boolean('is_admin').notNull().default(false),
    isBot: boolean('is_bot').notNull().default(false),
    deactivatedAt: ts('deactivated_at'),
    /**
     * The presence status the user chose (setPresence; null: ONLINE). The presence store (Redis,
     * or the process) holds a copy, written again from here when a socket connects and after the
     * store was away, so that a restarted Redis or process does not show an invisible user.
     */
    presenceChoice: text('presence_choice').$type<'ONLINE' | 'IDLE' | 'DND' | 'INVISIBLE'>(),
    createdAt: createdAt(),
  },
  (t) => [
    uniqueIndex('users_username_lower').on(sql`lower(${t.username})`),
    uniqueIndex('users_email_lower').on(sql`lower(${t.email})`),
    index('users_username_prefix').on(sql`lower(${t.username}) text_pattern_ops`),
  ],
);

/** One row per signed-in device. The refresh token is stored hashed and rotated on every use. */
export const sessions = pgTable(
  'sessions',
  {
    id: uuid('id').primaryKey(),
    userId: uuid('user_id')
      .notNull()
      .references(() => users.id, { onDelete: 'cascade' }),
    deviceName: text('device_name'),
    refreshHash: text('refresh_hash').notNull(),
    createdAt: createdAt(),
    lastUsedAt: ts('last_used_at').notNull().defaultNow(),
    expiresAt: ts('expires_at').notNull(),
    revokedAt: ts('revoked_at'),
    ip: text('ip'),
  },
  (t) => [uniqueIndex('sessions_refresh_hash').on(t.refreshHash), index('sessions_user').on(t.userId)],
);

/** Refresh tokens already rotated away: presenting one again means it leaked, so the session is revoked. */
/**
 * Foreign keys whose referencing column leads no index were checked by a scan of the whole table
 * for every referenced row deleted: a channel's deletion scanned read_states once per channel
 * (1M rows: 58 ms a channel, a guild's cascade that once per channel); hence
 * spent_refresh_tokens_session, bans_user, invites_channel and read_states_channel
 * (test/foreign-keys.test.ts keeps it so).
 */
export const spentRefreshTokens = pgTable(
  'spent_refresh_tokens',
  {
    hash: text('hash').primaryKey(),
    sessionId: uuid('session_id')
      .notNull()
      .references(() => sessions.id, { onDelete: 'cascade' }),
    spentAt: ts('spent_at').notNull().defaultNow(),
  },
  (t) => [index('spent_refresh_tokens_session').on(t.sessionId)],
);

/** Friends, pending requests and blocks: one row per direction. */
export const relationships = pgTable(
  'relationships',
  {
    userId: uuid('user_id')
      .notNull()
      .references(() => users.id, { onDelete: 'cascade' }),
    targetId: uuid('target_id')
      .notNull()
      .references(() => users.id, { onDelete: 'cascade' }),
    /** FRIEND | OUTGOING | INCOMING | BLOCKED */
    kind: text('kind').notNull(),
    createdAt: createdAt(),
  },
  (t) => [primaryKey({ columns: [t.userId, t.targetId] }), index('relationships_target').on(t.targetId)],
);

export const guilds = pgTable(
  'guilds',
  {
    id: uuid('id').primaryKey(),
    name: text('name').notNull(),
    ownerId: uuid('owner_id')
      .notNull()
      .references(() => users.id),
    iconUrl: text('icon_url'),
    description: text('description'),
    createdAt: createdAt(),
  },
  (t) => [index('guilds_owner').on(t.ownerId)],
);

export const channels = pgTable(
  'channels',
  {
    id: uuid('id').primaryKey(),
    /** null for DM and GROUP_DM */
    guildId: uuid('guild_id').references(() => guilds.id, { onDelete: 'cascade' }),
    /** TEXT | VOICE | ANNOUNCEMENT | CATEGORY | DM | GROUP_DM | THREAD */
    type: text('type').notNull(),
    name: text('name'),
    topic: text('topic'),
    /** category of a channel, or the text channel a thread belongs to */
    parentId: uuid('parent_id'),
    position: integer('position').notNull().default(0),
    slowmodeSeconds: integer('slowmode_seconds').notNull().default(0),
    nsfw: boolean('nsfw').notNull().default(false),
    /** the message a thread was started from */
    sourceMessageId: uuid('source_message_id'),
    /** creator of a thread or group DM */
    ownerId: uuid('owner_id').references(() => users.id),
    /** sorted recipient ids of a 1:1 DM, so opening it twice finds the same channel */
    dmKey: text('dm_key'),
    lastMessageId: uuid('last_message_id'),
    createdAt: createdAt(),
  },
  (t) => [
    index('channels_guild').on(t.guildId),
    index('channels_parent').on(t.parentId),
    uniqueIndex('channels_dm_key').on(t.dmKey),
    uniqueIndex('channels_thread_source').on(t.sourceMessageId),
  ],
);

export const channelRecipients = pgTable(
  'channel_recipients',
  {
    channelId: uuid('channel_id')
      .notNull()
      .references(() => channels.id, { onDelete: 'cascade' }),
    userId: uuid('user_id')
      .notNull()
      .references(() => users.id, { onDelete: 'cascade' }),
    createdAt: createdAt(),
  },
  (t) => [primaryKey({ columns: [t.channelId, t.userId] }), index('channel_recipients_user').on(t.userId)],
);

export const roles = pgTable(
  'roles',
  {
    id: uuid('id').primaryKey(),
    guildId: uuid('guild_id')
      .notNull()
      .references(() => guilds.id, { onDelete: 'cascade' }),
    name: text('name').notNull(),
    color: integer('color').notNull().default(0),
    /** higher is more senior; @everyone is 0 */
    position: integer('position').notNull().default(0),
    permissions: perms('permissions').notNull().default(sql`0`),
    mentionable: boolean('mentionable').notNull().default(false),
    isEveryone: boolean('is_everyone').notNull().default(false),
    createdAt: createdAt(),
  },
  (t) => [index('roles_guild').on(t.guildId)],
);

export const members = pgTable(
  'members',
  {
    guildId: uuid('guild_id')
      .notNull()
      .references(() => guilds.id, { onDelete: 'cascade' }),
    userId: uuid('user_id')
      .notNull()
      .references(() => users.id, { onDelete: 'cascade' }),
    nickname: text('nickname'),
    /** cannot send, react or speak until then */
    timeoutUntil: ts('timeout_until'),
    joinedAt: ts('joined_at').notNull().defaultNow(),
  },
  (t) => [primaryKey({ columns: [t.guildId, t.userId] }), index('members_user').on(t.userId)],
);

export const memberRoles = pgTable(
  'member_roles',
  {
    guildId: uuid('guild_id')
      .notNull()
      .references(() => guilds.id, { onDelete: 'cascade' }),
    userId: uuid('user_id').notNull(),
    roleId: uuid('role_id')
      .notNull()
      .references(() => roles.id, { onDelete: 'cascade' }),
  },
  (t) => [primaryKey({ columns: [t.guildId, t.userId, t.roleId] }), index('member_roles_role').on(t.roleId)],
);

export const permissionOverwrites = pgTable(
  'permission_overwrites',
  {
    channelId: uuid('channel_id')
      .notNull()
      .references(() => channels.id, { onDelete: 'cascade' }),
    /** ROLE | MEMBER */
    targetType: text('target_type').notNull(),
    targetId: uuid('target_id').notNull(),
    allow: perms('allow').notNull().default(sql`0`),
    deny: perms('deny').notNull().default(sql`0`),
  },
  (t) => [primaryKey({ columns: [t.channelId, t.targetId] })],
);

export const bans = pgTable(
  'bans',
  {
    guildId: uuid('guild_id')
      .notNull()
      .references(() => guilds.id, { onDelete: 'cascade' }),
    userId: uuid('user_id')
      .notNull()
      .references(() => users.id, { onDelete: 'cascade' }),
    reason: text('reason'),
    actorId: uuid('actor_id').references(() => users.id),
    createdAt: createdAt(),
  },
  (t) => [primaryKey({ columns: [t.guildId, t.userId] }), index('bans_user').on(t.userId)],
);

export const invites = pgTable(
  'invites',
  {
    code: text('code').primaryKey(),
    guildId: uuid('guild_id')
      .notNull()
      .references(() => guilds.id, { onDelete: 'cascade' }),
    channelId: uuid('channel_id').references(() => channels.id, { onDelete: 'set null' }),
    inviterId: uuid('inviter_id')
      .notNull()
      .references(() => users.id),
    /** null: unlimited */
    maxUses: integer('max_uses'),
    uses: integer('uses').notNull().default(0),
    expiresAt: ts('expires_at'),
    revokedAt: ts('revoked_at'),
    createdAt: createdAt(),
  },
  (t) => [index('invites_guild').on(t.guildId), index('invites_channel').on(t.channelId)],
);

export const auditLog = pgTable(
  'audit_log',
  {
    id: uuid('id').primaryKey(),
    guildId: uuid('guild_id')
      .notNull()
      .references(() => guilds.id, { onDelete: 'cascade' }),
    actorId: uuid('actor_id').references(() => users.id),
    action: text('action').notNull(),
    targetType: text('target_type'),
    targetId: uuid('target_id'),
    reason: text('reason'),
    changes: jsonb('changes'),
    createdAt: createdAt(),
  },
  (t) => [index('audit_log_guild').on(t.guildId, t.id)],
);

export const messages = pgTable(
  'messages',
  {
    id: uuid('id').primaryKey(),
    channelId: uuid('channel_id')
      .notNull()
      .references(() => channels.id, { onDelete: 'cascade' }),
    /** denormalized from the channel: lets guild-wide queries (ban purge, search) skip a join */
    guildId: uuid('guild_id'),
    authorId: uuid('author_id')
      .notNull()
      .references(() => users.id),
    content: text('content').notNull(),
    createdAt: createdAt(),
    editedAt: ts('edited_at'),
    replyToId: uuid('reply_to_id'),
    forwardedFromId: uuid('forwarded_from_id'),
    nonce: text('nonce'),
    mentionEveryone: boolean('mention_everyone').notNull().default(false),
    mentionRoleIds: uuid('mention_role_ids').array().notNull().default(sql`'{}'::uuid[]`),
    pinnedAt: ts('pinned_at'),
    pinnedBy: uuid('pinned_by'),
    embeds: jsonb('embeds').notNull().default(sql`'[]'::jsonb`),
    /** soft delete: content is wiped, the row stays so replies and reports keep their ids */
    deletedAt: ts('deleted_at'),
  },
  (t) => [
    index('messages_channel').on(t.channelId, t.id),
    index('messages_author_channel').on(t.authorId, t.channelId, t.id),
    index('messages_guild_author').on(t.guildId, t.authorId, t.id),
    index('messages_pinned').on(t.channelId, t.pinnedAt),
    uniqueIndex('messages_nonce').on(t.authorId, t.nonce),
    /**
     * Full-text search (core/search/postgres.search.ts): 'simple' so every language is split and
     * lowercased the same way, without stemming or stop words. Queries must repeat this exact
     * expression for the planner to use the index.
     */
    index('messages_search').using('gin', sql`to_tsvector('simple', ${t.content})`),
  ],
);

export const messageEdits = pgTable(
  'message_edits',
  {
    id: uuid('id').primaryKey(),
    messageId: uuid('message_id')
      .notNull()
      .references(() => messages.id, { onDelete: 'cascade' }),
    /** the content before this edit */
    content: text('content').notNull(),
    editedAt: ts('edited_at').notNull().defaultNow(),
  },
  (t) => [index('message_edits_message').on(t.messageId, t.id)],
);

export const messageMentions = pgTable(
  'message_mentions',
  {
    messageId: uuid('message_id')
      .notNull()
      .references(() => messages.id, { onDelete: 'cascade' }),
    userId: uuid('user_id').notNull(),
    channelId: uuid('channel_id').notNull(),
  },
  (t) => [
    primaryKey({ columns: [t.messageId, t.userId] }),
    index('message_mentions_user').on(t.userId, t.channelId, t.messageId),
  ],
);

export const reactions = pgTable(
  'reactions',
  {
    messageId: uuid('message_id')
      .notNull()
      .references(() => messages.id, { onDelete: 'cascade' }),
    emoji: text('emoji').notNull(),
    userId: uuid('user_id').notNull(),
    createdAt: createdAt(),
  },
  (t) => [primaryKey({ columns: [t.messageId, t.emoji, t.userId] })],
);

export const attachments = pgTable(
  'attachments',
  {
    id: uuid('id').primaryKey(),
    messageId: uuid('message_id').references(() => messages.id, { onDelete: 'cascade' }),
    uploaderId: uuid('uploader_id')
      .notNull()
      .references(() => users.id),
    filename: text('filename').notNull(),
    contentType: text('content_type').notNull(),
    size: integer('size').notNull(),
    storageKey: text('storage_key').notNull(),
    width: integer('width'),
    height: integer('height'),
    createdAt: createdAt(),
  },
  (t) => [index('attachments_message').on(t.messageId)],
);

export const readStates = pgTable(
  'read_states',
  {
    userId: uuid('user_id')
      .notNull()
      .references(() => users.id, { onDelete: 'cascade' }),
    channelId: uuid('channel_id')
      .notNull()
      .references(() => channels.id, { onDelete: 'cascade' }),
    lastReadMessageId: uuid('last_read_message_id'),
    updatedAt: ts('updated_at').notNull().defaultNow(),
  },
  (t) => [
    primaryKey({ columns: [t.userId, t.channelId] }),
    index('read_states_channel').on(t.channelId, t.userId),
  ],
);

export const reports = pgTable(
  'reports',
  {
    id: uuid('id').primaryKey(),
    /**
     * No foreign key: a report outlives its message (contentSnapshot is the evidence), also when
     * the message goes with its channel or guild, which a reference refused (it made both
     * undeletable once anything in them had been reported).
     */
    messageId: uuid('message_id').notNull(),
    channelId: uuid('channel_id').notNull(),
    guildId: uuid('guild_id'),
    reporterId: uuid('reporter_id')
      .notNull()
      .references(() => users.id),
    reason: text('reason').notNull(),
    /** the message as it was when reported, so deleting it does not destroy the evidence */
    contentSnapshot: text('content_snapshot').notNull(),
    authorId: uuid('author_id').notNull(),
    /** OPEN | RESOLVED */
    status: text('status').notNull().default('OPEN'),
    resolvedBy: uuid('resolved_by'),
    resolvedAt: ts('resolved_at'),
    resolution: text('resolution'),
    createdAt: createdAt(),
  },
  (t) => [index('reports_status').on(t.status, t.id), index('reports_guild').on(t.guildId, t.id)],
);

/**
 * The event log: every durable event, written in the same transaction as the change it records.
 * `seq` orders rows; `xid` lets a reader take only rows whose transactions have all finished, so
 * a cursor never skips a row that commits late.
 */
export const events = pgTable(
  'events',
  {
    seq: bigserial('seq', { mode: 'number' }).primaryKey(),
    xid: xid8('xid').notNull().default(sql`pg_current_xact_id()`),
    type: text('type').notNull(),
    guildId: uuid('guild_id'),
    channelId: uuid('channel_id'),
    /** for events only one user may see (read state, relationships) */
    userId: uuid('user_id'),
    payload: jsonb('payload').notNull(),
    createdAt: createdAt(),
  },
  (t) => [
    index('events_channel').on(t.channelId, t.seq),
    index('events_guild').on(t.guildId, t.seq),
    index('events_user').on(t.userId, t.seq),
    index('events_created').on(t.createdAt),
    /** the log's read order (core/realtime/log.ts) */
    index('events_order').on(sql`((${t.xid})::text::bigint)`, t.seq),
  ],
);

/** Process-wide key/value settings (the generated JWT secret lives in DATA_DIR, not here). */
export const instanceSettings = pgTable('instance_settings', {
  key: text('key').primaryKey(),
  value: jsonb('value').notNull(),
});

/**
 * Who was in a guild when it was deleted (its members rows cascade away with it): who may see
 * its GUILD_DELETED event, live or replayed. Kept as long as the event log (pruneEvents), instead
 * of in the event's payload, which every replay would read whole.
 */
export const formerMembers = pgTable(
  'former_members',
  {
    guildId: uuid('guild_id').notNull(),
    userId: uuid('user_id')
      .notNull()
      .references(() => users.id, { onDelete: 'cascade' }),
    deletedAt: ts('deleted_at').notNull().defaultNow(),
  },
  (t) => [
    primaryKey({ columns: [t.guildId, t.userId] }),
    index('former_members_user').on(t.userId),
    index('former_members_deleted').on(t.deletedAt),
  ],
);
