import { createContextCache } from '@pothos/core';
import DataLoader from 'dataloader';
import { sql } from 'drizzle-orm';
import { z } from 'zod';
import { guilds } from '../core/db/tables.ts';
import { notFound } from '../core/errors.ts';
import {
  type GuildAccess,
  type GuildChannelsAccess,
  loadGuildsChannelsAccess,
  requireGuild,
} from '../core/services/access.service.ts';
import * as guildService from '../core/services/guild.service.ts';
import { builder, type Context, decodeId, encodeId, nodeId, requireViewer } from './builder.ts';
import { limit } from './limits.ts';
import { UserRef, ViewerRef } from './user.ts';

export const GuildRef = builder.loadableNodeRef<guildService.GuildRow, string, string>('Guild', {
  id: nodeId('Guild', (g) => g.id),
  load: async (ids, ctx) => {
    const rows = await ctx.deps.db.select().from(guilds).where(sql`${guilds.id} in ${ids}`);
    const byId = new Map(rows.map((r) => [r.id, r]));
    return ids.map((id) => byId.get(id) ?? notFound('Guild'));
  },
});

/**
 * The viewer's access to guilds and to their (non-thread) channels, one statement per batch, so
 * fields of every guild or channel in a list (Viewer.guilds, Guild.channels, Channel.parent,
 * Invite.channel) cost the same as one. Not cached (batched within a tick only): a subscription's
 * long-lived context must never act on stale permissions.
 */
export const guildAccessLoader = createContextCache(
  (ctx: Context) =>
    new DataLoader<string, GuildChannelsAccess>(
      async (ids) => {
        const m = await loadGuildsChannelsAccess(ctx.deps.db, requireViewer(ctx).userId, ids, ctx.deps.now());
        return ids.map((id) => m.get(id) ?? { guild: null, permissions: new Map() });
      },
      { cache: false },
    ),
);

/** requireGuild through the batch loader: NOT_FOUND unless the viewer is a member. */
export async function requireGuildBatched(
  ctx: Context,
  guildId: string,
): Promise<GuildChannelsAccess & { guild: GuildAccess }> {
  const a = await guildAccessLoader(ctx).load(guildId);
  if (!a.guild?.input.isMember) throw notFound('Guild');
  return a as GuildChannelsAccess & { guild: GuildAccess };
}

/** Whether the viewer can see a non-thread channel of a guild (false for strangers and unknown ids). */
export async function canSeeGuildChannel(ctx: Context, guildId: string, channelId: string): Promise<boolean> {
  if (!ctx.viewer) return false;
  const a = await guildAccessLoader(ctx).load(guildId);
  return (a.permissions.get(channelId) ?? 0n) !== 0n;
}

GuildRef.implement({
  fields: (t) => ({
    name: t.exposeString('name'),
    description: t.exposeString('description', { nullable: true }),
    iconUrl: t.exposeString('iconUrl', { nullable: true }),
    owner: t.field({ type: UserRef, resolve: (g) => g.ownerId }),
    createdAt: t.expose('createdAt', { type: 'DateTime' }),
  }),
});

builder.queryField('guild', (t) =>
  t.field({
    type: GuildRef,
    // Nullable as CONTRACT.md has it, though a missing or hidden guild answers NOT_FOUND.
    nullable: true,
    args: { id: t.arg.id({ required: true }) },
    resolve: async (_r, { id }, ctx) => {
      const v = requireViewer(ctx);
      const gid = decodeId(id, 'Guild');
      await requireGuild(ctx.deps.db, v.userId, gid);
      const g = await guildService.getGuild(ctx.deps, gid);
      if (!g) throw notFound('Guild');
      return g;
    },
  }),
);

const CreateGuildInput = builder.inputType('CreateGuildInput', {
  fields: (t) => ({ name: t.string({ required: true, validate: z.string().max(1000) }) }),
});

builder.mutationField('createGuild', (t) =>
  t.field({
    type: GuildRef,
    args: { input: t.arg({ type: CreateGuildInput, required: true }) },
    resolve: async (_r, { input }, ctx) => {
      const v = requireViewer(ctx);
      await limit(ctx, 'mutation');
      return guildService.createGuild(ctx.deps, v, input);
    },
  }),
);

builder.objectField(ViewerRef, 'guilds', (t) =>
  t.field({
    type: [GuildRef],
    description: 'The guilds the viewer is a member of, in the order they joined',
    resolve: (_v, _a, ctx) => guildService.viewerGuilds(ctx.deps, requireViewer(ctx)),
  }),
);

const UpdateGuildInput = builder.inputType('UpdateGuildInput', {
  description: 'Fields left out stay as they are; null clears description and iconUrl.',
  fields: (t) => ({
    id: t.id({ required: true }),
    name: t.string({ validate: z.string().max(1000) }),
    description: t.string({ validate: z.string().max(10_000) }),
    iconUrl: t.string({ validate: z.string().max(10_000) }),
  }),
});

builder.mutationFields((t) => ({
  updateGuild: t.field({
    type: GuildRef,
    description: 'Needs MANAGE_GUILD',
    args: { input: t.arg({ type: UpdateGuildInput, required: true }) },
    resolve: async (_r, { input }, ctx) => {
      const v = requireViewer(ctx);
      await limit(ctx, 'mutation');
      return guildService.updateGuild(ctx.deps, v, { ...input, id: decodeId(input.id, 'Guild') });
    },
  }),
  deleteGuild: t.id({
    description: 'Owner only; answers the deleted guild id',
    args: { id: t.arg.id({ required: true }) },
    resolve: async (_r, { id }, ctx) => {
      const v = requireViewer(ctx);
      await limit(ctx, 'mutation');
      const gid = await guildService.deleteGuild(ctx.deps, v, decodeId(id, 'Guild'));
      return encodeId('Guild', gid);
    },
  }),
  transferGuildOwnership: t.field({
    type: GuildRef,
    description: 'Owner only; the new owner must be a member',
    args: { guildId: t.arg.id({ required: true }), userId: t.arg.id({ required: true }) },
    resolve: async (_r, args, ctx) => {
      const v = requireViewer(ctx);
      await limit(ctx, 'mutation');
      return guildService.transferGuildOwnership(ctx.deps, v, {
        guildId: decodeId(args.guildId, 'Guild', 'guildId'),
        userId: decodeId(args.userId, 'User', 'userId'),
      });
    },
  }),
  leaveGuild: t.boolean({
    description: 'The owner cannot leave (CONFLICT): transfer ownership first',
    args: { guildId: t.arg.id({ required: true }) },
    resolve: async (_r, { guildId }, ctx) => {
      const v = requireViewer(ctx);
      await limit(ctx, 'mutation');
      return guildService.leaveGuild(ctx.deps, v, decodeId(guildId, 'Guild', 'guildId'));
    },
  }),
}));
