/**
 * The viewer's one stream, `events(after)`, and its event types. Rows come from the realtime
 * hub (core/realtime); fields resolve from the database at delivery, so a replayed
 * MessageCreated shows the message as it is now.
 */
import { BanterError, notFound } from '../core/errors.ts';
import { encodeCursor } from '../core/realtime/cursor.ts';
import { messageIdOf, startPosition } from '../core/realtime/log.ts';
import type { PresenceShown } from '../core/realtime/presence.ts';
import type { Delivered } from '../core/realtime/subscription.ts';
import { startTyping, TYPING_EXPIRES_MS } from '../core/realtime/typing.ts';
import { presenceAudience } from '../core/realtime/visibility.ts';
import { messagesByIds } from '../core/services/message-history.service.ts';
import { type RelationshipKind as Kind, RELATIONSHIP_KINDS } from '../core/services/relationship.service.ts';
import { presenceChoice } from '../core/services/user.service.ts';
import { builder, type Context, decodeId, encodeId, requireViewer } from './builder.ts';
import { ChannelRef } from './channel.ts';
import { GuildRef } from './guild.ts';
import { limit } from './limits.ts';
import { MessageRef, type MessageRow } from './message.ts';
import { RelationshipKind } from './relationship.ts';
import { UserRef, ViewerRef } from './user.ts';

/** Log event type -> GraphQL type name. */
const TYPE_NAMES: Record<string, string> = {
  MESSAGE_CREATED: 'MessageCreated',
  MESSAGE_UPDATED: 'MessageUpdated',
  MESSAGE_DELETED: 'MessageDeleted',
  REACTION_ADDED: 'ReactionAdded',
  REACTION_REMOVED: 'ReactionRemoved',
  MESSAGE_PINNED: 'MessagePinned',
  MESSAGE_UNPINNED: 'MessageUnpinned',
  CHANNEL_CREATED: 'ChannelCreated',
  CHANNEL_UPDATED: 'ChannelUpdated',
  CHANNEL_DELETED: 'ChannelDeleted',
  GUILD_UPDATED: 'GuildUpdated',
  GUILD_DELETED: 'GuildDeleted',
  MEMBER_JOINED: 'MemberJoined',
  MEMBER_LEFT: 'MemberLeft',
  MEMBER_UPDATED: 'MemberUpdated',
  MEMBER_KICKED: 'MemberKicked',
  MEMBER_BANNED: 'MemberBanned',
  ROLE_CREATED: 'RoleCreated',
  ROLE_UPDATED: 'RoleUpdated',
  ROLE_DELETED: 'RoleDeleted',
  PERMISSIONS_CHANGED: 'PermissionsChanged',
  READ_STATE_UPDATED: 'ReadStateUpdated',
  DIRECT_CHANNEL_CREATED: 'DirectChannelCreated',
  RELATIONSHIP_UPDATED: 'RelationshipUpdated',
  TYPING_STARTED: 'TypingStarted',
  PRESENCE_CHANGED: 'PresenceChanged',
};

const str = (e: Delivered, key: string): string | null =>
  typeof e.payload[key] === 'string' ? (e.payload[key] as string) : null;
const gid = (type: string, id: string | null) => (id ? encodeId(type, id) : null);
/** A log row's kind, null for none (or a value no RelationshipKind has, which the enum could not serialize). */
const relationshipKindOf = (kind: string | null): Kind | null =>
  (RELATIONSHIP_KINDS as readonly string[]).includes(kind ?? '') ? (kind as Kind) : null;

export const EventRef = builder.interfaceRef<Delivered>('Event').implement({
  description: 'Something that happened. `cursor` is null only for ephemeral events (typing, presence).',
  fields: (t) => ({
    cursor: t.string({ nullable: true, resolve: (e) => e.cursor }),
  }),
  resolveType: (e) => TYPE_NAMES[e.type] ?? 'UnknownEvent',
});

function eventType(name: string, description: string, fields: (t: any) => Record<string, unknown>) {
  builder.objectRef<Delivered>(name).implement({
    description,
    interfaces: [EventRef],
    fields: (t) => fields(t) as never,
  });
}

/**
 * The hub has already decided the viewer may see the event's channel, so the message is loaded
 * once per event for every subscriber (not through MessageRef's per-viewer access check), which
 * lets subscribers with the same document share one execution.
 */
const messageOf = new WeakMap<Delivered, Promise<MessageRow | null>>();
function eventMessage(e: Delivered, ctx: Context): MessageRow | Promise<MessageRow> {
  // Usually read along with the row (loadMessages): no statement, and no await either.
  if (e.message) return e.message;
  let p = messageOf.get(e);
  if (!p) {
    const id = messageIdOf(e);
    p = id ? messagesByIds(ctx.deps.db, [id]).then((r) => r[0] ?? null) : Promise.resolve(null);
    messageOf.set(e, p);
  }
  return p.then((m) => m ?? Promise.reject(notFound('Message')));
}
const messageField = (t: any) =>
  t.field({ type: MessageRef, resolve: (e: Delivered, _a: unknown, ctx: Context) => eventMessage(e, ctx) });
const channelIdField = (t: any) =>
  t.id({ resolve: (e: Delivered) => encodeId('Channel', e.channelId ?? '') });
const guildIdField = (t: any) => t.id({ resolve: (e: Delivered) => encodeId('Guild', e.guildId ?? '') });
const userField = (t: any, key = 'userId') =>
  t.field({ type: UserRef, resolve: (e: Delivered) => str(e, key) ?? '' });

eventType('MessageCreated', 'A message was sent.', (t) => ({ message: messageField(t) }));
eventType('MessageUpdated', 'A message was edited (or its embeds changed).', (t) => ({
  message: messageField(t),
}));
eventType('MessageDeleted', 'A message was deleted.', (t) => ({
  messageId: t.id({ resolve: (e: Delivered) => encodeId('Message', messageIdOf(e) ?? '') }),
  channelId: channelIdField(t),
}));
for (const [name, what] of [
  ['ReactionAdded', 'A reaction was added'],
  ['ReactionRemoved', 'A reaction was removed'],
] as const) {
  eventType(name, `${what}; \`message.reactions\` has the new counts.`, (t) => ({
    message: messageField(t),
    emoji: t.string({ resolve: (e: Delivered) => str(e, 'emoji') ?? '' }),
    user: userField(t),
  }));
}
eventType('MessagePinned', 'A message was pinned.', (t) => ({ message: messageField(t) }));
eventType('MessageUnpinned', 'A message was unpinned.', (t) => ({ message: messageField(t) }));
eventType('ChannelCreated', 'A channel the viewer can see was created.', (t) => ({
  channel: t.field({ type: ChannelRef, resolve: (e: Delivered) => e.channelId ?? '' }),
}));
eventType('ChannelUpdated', 'A channel the viewer can see changed.', (t) => ({
  channel: t.field({ type: ChannelRef, resolve: (e: Delivered) => e.channelId ?? '' }),
}));
eventType('ChannelDeleted', 'A channel was deleted.', (t) => ({
  channelId: channelIdField(t),
  guildId: t.id({ nullable: true, resolve: (e: Delivered) => gid('Guild', e.guildId) }),
}));
eventType('GuildUpdated', 'A guild changed.', (t) => ({
  guild: t.field({ type: GuildRef, resolve: (e: Delivered) => e.guildId ?? '' }),
}));
eventType('GuildDeleted', 'A guild was deleted.', (t) => ({ guildId: guildIdField(t) }));
for (const [name, what] of [
  ['MemberJoined', 'A user joined a guild.'],
  ['MemberLeft', 'A member left a guild.'],
  ['MemberUpdated', 'A member changed (nickname, roles, timeout).'],
  ['MemberKicked', 'A member was kicked.'],
  ['MemberBanned', 'A member was banned.'],
] as const) {
  eventType(name, what, (t) => ({ guildId: guildIdField(t), user: userField(t) }));
}
for (const [name, what] of [
  ['RoleCreated', 'A role was created.'],
  ['RoleUpdated', 'A role changed.'],
  ['RoleDeleted', 'A role was deleted.'],
] as const) {
  eventType(name, what, (t) => ({
    guildId: guildIdField(t),
    roleId: t.id({ resolve: (e: Delivered) => encodeId('Role', str(e, 'roleId') ?? '') }),
  }));
}
eventType(
  'PermissionsChanged',
  'Permissions changed in a guild (a channel overwrite when channelId is set).',
  (t) => ({
    guildId: guildIdField(t),
    channelId: t.id({ nullable: true, resolve: (e: Delivered) => gid('Channel', e.channelId) }),
  }),
);
eventType('ReadStateUpdated', 'The viewer read a channel on one of its devices.', (t) => ({
  channelId: channelIdField(t),
  lastReadMessageId: t.id({
    nullable: true,
    resolve: (e: Delivered) => gid('Message', str(e, 'lastReadMessageId')),
  }),
}));
eventType('DirectChannelCreated', 'A DM or group DM including the viewer was opened.', (t) => ({
  channel: t.field({ type: ChannelRef, resolve: (e: Delivered) => e.channelId ?? '' }),
}));
eventType('RelationshipUpdated', "The viewer's relationship with a user changed.", (t) => ({
  user: userField(t, 'targetId'),
  // The enum Relationship.kind is, so that a client's generated type narrows on it; null when none is left.
  kind: t.field({
    type: RelationshipKind,
    nullable: true,
    description: 'The viewer’s side now, as Relationship.kind; null when none is left.',
    resolve: (e: Delivered) => relationshipKindOf(str(e, 'kind')),
  }),
}));
eventType('TypingStarted', `A user started typing; show it for ${TYPING_EXPIRES_MS / 1000} s.`, (t) => ({
  channelId: channelIdField(t),
  user: userField(t),
}));
eventType('PresenceChanged', "A user's presence changed.", (t) => ({
  user: userField(t),
  status: t.field({
    type: PresenceStatus,
    resolve: (e: Delivered) => (str(e, 'status') ?? 'OFFLINE') as PresenceShown,
  }),
}));
eventType('UnknownEvent', 'An event this server version has no type for yet.', (t) => ({
  type: t.string({ resolve: (e: Delivered) => e.type }),
}));

const PresenceStatus = builder.enumType('PresenceStatus', {
  description: 'What others see: INVISIBLE users are shown OFFLINE.',
  values: ['ONLINE', 'IDLE', 'DND', 'OFFLINE'] as const,
});
const PresenceChoice = builder.enumType('PresenceChoice', {
  values: ['ONLINE', 'IDLE', 'DND', 'INVISIBLE'] as const,
});
const PresenceRef = builder.objectRef<{ status: PresenceShown }>('Presence').implement({
  description: "A user's presence, aggregated over its devices; OFFLINE to users it has blocked.",
  fields: (t) => ({ status: t.field({ type: PresenceStatus, resolve: (p) => p.status }) }),
});

builder.objectField(UserRef, 'presence', (t) =>
  t.loadable({
    type: PresenceRef,
    resolve: (u) => u.id,
    load: async (ids: string[], ctx) => {
      const viewerId = ctx.viewer?.userId;
      // Whom the stream would tell (presenceAudience: a shared guild or DM, no block by them): a
      // stranger, or whom they blocked, reads OFFLINE, as the stream tells them nothing.
      const [shown, audience] = await Promise.all([
        ctx.deps.realtime ? ctx.deps.realtime.presence.shown(ids) : new Map<string, PresenceShown>(),
        viewerId ? presenceAudience(ctx.deps.db, ids, [viewerId]) : new Map<string, Set<string>>(),
      ]);
      const may = (id: string) => id === viewerId || (!!viewerId && !!audience.get(id)?.has(viewerId));
      return ids.map((id) => ({
        status: may(id) ? ((shown.get(id) ?? 'OFFLINE') as PresenceShown) : 'OFFLINE',
      }));
    },
  }),
);

builder.objectField(ViewerRef, 'presenceChoice', (t) =>
  t.field({
    type: PresenceChoice,
    description:
      'The status the viewer chose (setPresence), on all its devices; ONLINE until it chooses one. ' +
      'Its `presence` is what others see: OFFLINE while INVISIBLE, and while no socket of it is open.',
    resolve: (_v, _a, ctx) => presenceChoice(ctx.deps, requireViewer(ctx)),
  }),
);

builder.mutationField('setPresence', (t) =>
  t.boolean({
    description: "Sets the viewer's status on all its devices; INVISIBLE shows OFFLINE to others.",
    args: { status: t.arg({ type: PresenceChoice, required: true }) },
    resolve: async (_r, { status }, ctx) => {
      const viewer = requireViewer(ctx);
      await limit(ctx, 'mutation');
      if (!ctx.deps.realtime) throw new BanterError('BAD_USER_INPUT', 'This process does not keep presence.');
      await ctx.deps.realtime.presence.choose(viewer.userId, status);
      return true;
    },
  }),
);

builder.subscriptionType({});

builder.subscriptionField('events', (t) =>
  t.field({
    type: EventRef,
    description:
      "The viewer's one stream of everything it may see. `after` is the last cursor the client saw: " +
      'the server replays what happened since, then goes live, with no event lost or repeated. ' +
      'A cursor older than retention fails with CURSOR_EXPIRED; a malformed one (an empty string too) ' +
      'with BAD_USER_INPUT. Without `after` (or with null) the stream is live from the moment the subscription is set up: it holds ' +
      'the events of changes committed after that moment (the server registers the subscriber, ' +
      'then takes a database snapshot; everything committed after it is delivered, even if it ' +
      'reaches the server first), and from the first of those on, every later event of the log: ' +
      'one committed just before, behind a change still in progress then, follows it, as a resume ' +
      "from that event's cursor would bring it. To also get what happened before, subscribe with " +
      '`after` set to the last cursor the client saw. Over SSE each event carries its cursor as ' +
      'its id, and a request with a Last-Event-ID header resumes after that cursor instead of ' +
      '`after` (an EventSource reconnecting to the URL it began with).',
    args: { after: t.arg.string() },
    subscribe: async (_r, { after }, ctx) => {
      const viewer = requireViewer(ctx);
      const hub = ctx.deps.realtime;
      if (!hub) throw new BanterError('BAD_USER_INPUT', 'This process does not serve subscriptions.');
      // An EventSource reconnects to the URL it was given, `after` and all, with the id of the last
      // event it got (its cursor: api/realtime/sse.ts) as Last-Event-ID: it resumes from there.
      const request = (ctx as { request?: Request }).request;
      const lastEventId = request?.headers.get('last-event-id') || undefined;
      // A malformed one is refused naming the header: `after: not a valid…` pointed at an argument
      // the request may not have.
      if (lastEventId) return hub.subscribe(viewer, lastEventId, { cursorFrom: 'Last-Event-ID' });
      return hub.subscribe(viewer, after);
    },
    resolve: (e) => e,
  }),
);

builder.queryField('eventsCursor', (t) =>
  t.string({
    description:
      'Where to start `events(after:)` before loading the state the stream will keep up to date: ' +
      'read this first, then the queries, then subscribe with `after` set to it (or resume from it ' +
      'after CURSOR_EXPIRED, having fetched afresh). Every event not yet committed when it was read ' +
      'is delivered; some already in the state fetched after it may come again, to be matched by id. ' +
      'A stream started without `after` has no cursor until its first durable event arrives: one ' +
      'that drops before then and subscribes live again misses what happened between.',
    resolve: async (_r, _a, ctx) => {
      requireViewer(ctx);
      return encodeCursor(await startPosition(ctx.deps.db));
    },
  }),
);

builder.mutationField('startTyping', (t) =>
  t.boolean({
    description: 'Tells the channel the viewer is typing (needs SEND_MESSAGES); expires after 10 s.',
    args: { channelId: t.arg.id({ required: true }) },
    resolve: async (_r, { channelId }, ctx) => {
      const viewer = requireViewer(ctx);
      await limit(ctx, 'mutation');
      return startTyping(ctx.deps, viewer, decodeId(channelId, 'Channel', 'channelId'));
    },
  }),
);
