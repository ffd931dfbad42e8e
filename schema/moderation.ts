/**
 * Moderation: kick, ban, unban, timeout, the guild's bans and its audit log. Resolvers decode
 * ids and call core/services/moderation.service.ts, which checks permissions and hierarchy.
 */
import { z } from 'zod';
import { BanterError } from '../core/errors.ts';
import { isUuid } from '../core/ids.ts';
import * as moderation from '../core/services/moderation.service.ts';
import { builder, decodeId, encodeId, requireViewer } from './builder.ts';
import { GuildRef } from './guild.ts';
import { limit } from './limits.ts';
import { UserRef } from './user.ts';

export const MAX_PAGE = 100;
export const DEFAULT_PAGE = 50;

/**
 * Page size: default 50; outside 0-100 is BAD_USER_INPUT, as Channel.messages has it, so a client
 * never silently gets less than it asked for.
 */
export function pageSize(first: number | null | undefined): number {
  if (first == null) return DEFAULT_PAGE;
  if (!Number.isInteger(first) || first < 0 || first > MAX_PAGE)
    throw new BanterError('BAD_USER_INPUT', `first must be between 0 and ${MAX_PAGE}.`, {
      extra: { field: 'first' },
    });
  return first;
}

/** Opaque cursors over UUIDv7 row ids; anything else is BAD_USER_INPUT. */
export const encodeCursor = (id: string) => Buffer.from(`c:${id}`).toString('base64url');
export function decodeCursor(cursor: string | null | undefined): string | null {
  if (cursor == null) return null;
  const raw = cursor.length <= 200 ? Buffer.from(cursor, 'base64url').toString() : '';
  const id = raw.slice(2);
  if (!raw.startsWith('c:') || !isUuid(id)) {
    throw new BanterError('BAD_USER_INPUT', 'after is not a valid cursor.', { extra: { field: 'after' } });
  }
  return id;
}

/** A Relay connection from `first + 1` rows fetched newest first. */
export function toConnection<T extends { id: string }>(rows: T[], first: number, after: string | null) {
  const page = rows.slice(0, first);
  const edges = page.map((node) => ({ cursor: encodeCursor(node.id), node }));
  return {
    edges,
    pageInfo: {
      hasNextPage: rows.length > first,
      hasPreviousPage: after !== null,
      startCursor: edges[0]?.cursor ?? null,
      endCursor: edges.at(-1)?.cursor ?? null,
    },
  };
}

const reasonArg = z.string().max(moderation.MAX_REASON);

/** The (guild, user) every moderation mutation acts on, decoded from its global ids. */
function memberTarget(a: { guildId: string; userId: string }) {
  return { guildId: decodeId(a.guildId, 'Guild', 'guildId'), userId: decodeId(a.userId, 'User', 'userId') };
}

builder.mutationFields((t) => ({
  kickMember: t.boolean({
    args: {
      guildId: t.arg.id({ required: true }),
      userId: t.arg.id({ required: true }),
      reason: t.arg.string({ validate: reasonArg }),
    },
    resolve: async (_r, a, ctx) => {
      const v = requireViewer(ctx);
      await limit(ctx, 'mutation');
      return moderation.kickMember(ctx.deps, v, {
        ...memberTarget(a),
        reason: a.reason,
      });
    },
  }),
  banMember: t.boolean({
    description:
      'Bans a member or, pre-emptively, any user. deleteMessageHours (0-168) soft-deletes their messages in the guild from that many hours back, one MessageDeleted event each; they are deleted in batches before the ban is recorded, and stay deleted if the ban is then refused (CONFLICT: banned meanwhile).',
    args: {
      guildId: t.arg.id({ required: true }),
      userId: t.arg.id({ required: true }),
      reason: t.arg.string({ validate: reasonArg }),
      deleteMessageHours: t.arg.int(),
    },
    resolve: async (_r, a, ctx) => {
      const v = requireViewer(ctx);
      await limit(ctx, 'mutation');
      return moderation.banMember(ctx.deps, v, {
        ...memberTarget(a),
        reason: a.reason,
        deleteMessageHours: a.deleteMessageHours,
      });
    },
  }),
  unbanMember: t.boolean({
    args: {
      guildId: t.arg.id({ required: true }),
      userId: t.arg.id({ required: true }),
      reason: t.arg.string({ validate: reasonArg }),
    },
    resolve: async (_r, a, ctx) => {
      const v = requireViewer(ctx);
      await limit(ctx, 'mutation');
      return moderation.unbanMember(ctx.deps, v, {
        ...memberTarget(a),
        reason: a.reason,
      });
    },
  }),
  timeoutMember: t.boolean({
    description: 'Times a member out until `until` (at most 28 days ahead); null or a past time clears it.',
    args: {
      guildId: t.arg.id({ required: true }),
      userId: t.arg.id({ required: true }),
      until: t.arg({ type: 'DateTime' }),
      reason: t.arg.string({ validate: reasonArg }),
    },
    resolve: async (_r, a, ctx) => {
      const v = requireViewer(ctx);
      await limit(ctx, 'mutation');
      return moderation.timeoutMember(ctx.deps, v, {
        ...memberTarget(a),
        until: a.until,
        reason: a.reason,
      });
    },
  }),
}));

const BanRef = builder.objectRef<moderation.BanRow>('Ban');
BanRef.implement({
  fields: (t) => ({
    user: t.field({ type: UserRef, resolve: (b) => b.userId }),
    reason: t.exposeString('reason', { nullable: true }),
    actor: t.field({ type: UserRef, nullable: true, resolve: (b) => b.actorId }),
    createdAt: t.expose('createdAt', { type: 'DateTime' }),
  }),
});

builder.objectField(GuildRef, 'bans', (t) =>
  t.field({
    type: [BanRef],
    description: 'Banned users, newest first (BAN_MEMBERS).',
    resolve: (g, _a, ctx) => moderation.listBans(ctx.deps, requireViewer(ctx), g.id),
  }),
);

/** Audit target types whose ids are node ids; others (none yet) are exposed raw. */
const TARGET_TYPENAMES: Record<string, string> = {
  GUILD: 'Guild',
  CHANNEL: 'Channel',
  USER: 'User',
  ROLE: 'Role',
  MESSAGE: 'Message',
};

const AuditLogEntryRef = builder.objectRef<moderation.AuditRow>('AuditLogEntry');
AuditLogEntryRef.implement({
  fields: (t) => ({
    id: t.id({ resolve: (e) => encodeId('AuditLogEntry', e.id) }),
    actor: t.field({ type: UserRef, nullable: true, resolve: (e) => e.actorId }),
    action: t.exposeString('action'),
    targetType: t.exposeString('targetType', { nullable: true }),
    targetId: t.id({
      nullable: true,
      description: 'A global id when the target type is a node type (GUILD, CHANNEL, USER, ROLE, MESSAGE).',
      resolve: (e) => {
        if (!e.targetId) return null;
        const typename = e.targetType ? TARGET_TYPENAMES[e.targetType] : undefined;
        return typename ? encodeId(typename, e.targetId) : e.targetId;
      },
    }),
    reason: t.exposeString('reason', { nullable: true }),
    changes: t.string({
      nullable: true,
      description: 'What changed, as a JSON object encoded in a string.',
      resolve: (e) => (e.changes == null ? null : JSON.stringify(e.changes)),
    }),
    createdAt: t.expose('createdAt', { type: 'DateTime' }),
  }),
});

const AuditLogConnection = builder.connectionObject(
  { type: AuditLogEntryRef, name: 'AuditLogConnection' },
  { name: 'AuditLogEdge' },
);

builder.objectField(GuildRef, 'auditLog', (t) =>
  t.field({
    type: AuditLogConnection,
    description:
      'Moderation and configuration actions, newest first (VIEW_AUDIT_LOG). first defaults to 50; above 100 is BAD_USER_INPUT.',
    args: {
      first: t.arg.int(),
      after: t.arg.string(),
      action: t.arg.string({ validate: z.string().max(100) }),
      actorId: t.arg.id(),
    },
    resolve: async (g, a, ctx) => {
      const v = requireViewer(ctx);
      const first = pageSize(a.first);
      const afterId = decodeCursor(a.after);
      const rows = await moderation.listAuditLog(ctx.deps, v, {
        guildId: g.id,
        first,
        afterId,
        action: a.action,
        actorId: a.actorId ? decodeId(a.actorId, 'User', 'actorId') : null,
      });
      return toConnection(rows, first, afterId);
    },
  }),
);
