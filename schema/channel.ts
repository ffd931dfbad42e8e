import { createContextCache } from '@pothos/core';
import DataLoader from 'dataloader';
import { z } from 'zod';
import { notFound } from '../core/errors.ts';
import { requireChannel } from '../core/services/access.service.ts';
import * as channelService from '../core/services/channel.service.ts';
import { builder, type Context, decodeId, encodeId, nodeId, requireViewer } from './builder.ts';
import { canSeeGuildChannel, GuildRef, requireGuildBatched } from './guild.ts';
import { limit } from './limits.ts';

export const ChannelType = builder.enumType('ChannelType', {
  values: ['TEXT', 'VOICE', 'ANNOUNCEMENT', 'CATEGORY', 'DM', 'GROUP_DM', 'THREAD'] as const,
});

/**
 * Channels load without a permission check: every path that reaches one (a query by id, a
 * guild's channel list, a message) has checked visibility first.
 */
export const ChannelRef = builder.loadableNodeRef<channelService.ChannelWithAccess, string, string>(
  'Channel',
  {
    id: nodeId('Channel', (c) => c.id),
    load: async (ids, ctx) => {
      const rows = await channelService.channelsByIds(ctx.deps, ids);
      const byId = new Map(rows.map((r) => [r.id, r]));
      return ids.map((id) => byId.get(id) ?? notFound('Channel'));
    },
  },
);

ChannelRef.implement({
  fields: (t) => ({
    type: t.field({ type: ChannelType, resolve: (c) => c.type as 'TEXT' }),
    name: t.exposeString('name', { nullable: true }),
    topic: t.exposeString('topic', { nullable: true }),
    position: t.exposeInt('position'),
    slowmodeSeconds: t.exposeInt('slowmodeSeconds'),
    nsfw: t.exposeBoolean('nsfw'),
    createdAt: t.expose('createdAt', { type: 'DateTime' }),
    guild: t.field({ type: GuildRef, nullable: true, resolve: (c) => c.guildId }),
    parent: t.field({
      type: ChannelRef,
      nullable: true,
      description:
        'The category (or, for a thread, the channel) it is in; null when none or hidden from the viewer',
      // A channel can be visible inside a category the viewer cannot see (overwrites): never show that one.
      resolve: async (c, _a, ctx) =>
        c.parentId && c.guildId && (await canSeeGuildChannel(ctx, c.guildId, c.parentId)) ? c.parentId : null,
    }),
  }),
});

/** Each guild's channel rows, batched across the guilds of one list (not cached: see guildAccessLoader). */
const guildChannelsLoader = createContextCache(
  (ctx: Context) =>
    new DataLoader<string, channelService.ChannelRowFull[]>(
      (ids) => channelService.guildChannelsOf(ctx.deps, ids),
      {
        cache: false,
      },
    ),
);

builder.objectField(GuildRef, 'channels', (t) =>
  t.field({
    type: [ChannelRef],
    description: 'The channels (and categories) the viewer can see, in position order',
    resolve: async (g, _a, ctx) => {
      requireViewer(ctx);
      const [access, rows] = await Promise.all([
        requireGuildBatched(ctx, g.id),
        guildChannelsLoader(ctx).load(g.id),
      ]);
      return channelService.visibleChannels(rows, access.permissions);
    },
  }),
);

builder.queryField('channel', (t) =>
  t.field({
    type: ChannelRef,
    // Nullable as CONTRACT.md has it, though a missing or hidden channel answers NOT_FOUND.
    nullable: true,
    args: { id: t.arg.id({ required: true }) },
    resolve: async (_r, { id }, ctx) => {
      const v = requireViewer(ctx);
      const a = await requireChannel(ctx.deps.db, v.userId, decodeId(id, 'Channel'), 0n, ctx.deps.now());
      return a.channel.id;
    },
  }),
);

const CreateChannelInput = builder.inputType('CreateChannelInput', {
  fields: (t) => ({
    guildId: t.id({ required: true }),
    name: t.string({ required: true, validate: z.string().max(1000) }),
    type: t.field({ type: ChannelType, required: true }),
    topic: t.string({ validate: z.string().max(10_000) }),
    parentId: t.id(),
    position: t.int({ validate: z.number().int().min(0).max(10_000) }),
    slowmodeSeconds: t.int(),
    nsfw: t.boolean(),
  }),
});

builder.mutationField('createChannel', (t) =>
  t.field({
    type: ChannelRef,
    args: { input: t.arg({ type: CreateChannelInput, required: true }) },
    resolve: async (_r, { input }, ctx) => {
      const v = requireViewer(ctx);
      await limit(ctx, 'mutation');
      return channelService.createChannel(ctx.deps, v, {
        ...input,
        guildId: decodeId(input.guildId, 'Guild', 'guildId'),
        parentId: input.parentId ? decodeId(input.parentId, 'Channel', 'parentId') : null,
      });
    },
  }),
);

const UpdateChannelInput = builder.inputType('UpdateChannelInput', {
  description: 'Fields left out stay as they are; null clears topic and parentId.',
  fields: (t) => ({
    id: t.id({ required: true }),
    name: t.string({ validate: z.string().max(1000) }),
    topic: t.string({ validate: z.string().max(10_000) }),
    position: t.int({ validate: z.number().int().min(0).max(10_000) }),
    slowmodeSeconds: t.int(),
    nsfw: t.boolean(),
    parentId: t.id(),
  }),
});

builder.mutationFields((t) => ({
  updateChannel: t.field({
    type: ChannelRef,
    description: 'Needs MANAGE_CHANNELS in the channel',
    args: { input: t.arg({ type: UpdateChannelInput, required: true }) },
    resolve: async (_r, { input }, ctx) => {
      const v = requireViewer(ctx);
      await limit(ctx, 'mutation');
      return channelService.updateChannel(ctx.deps, v, {
        ...input,
        id: decodeId(input.id, 'Channel'),
        parentId: input.parentId ? decodeId(input.parentId, 'Channel', 'parentId') : input.parentId,
      });
    },
  }),
  deleteChannel: t.id({
    description:
      "Needs MANAGE_CHANNELS. A deleted channel's messages and threads go with it; each thread gets a ChannelDeleted of its own, before the channel's. Channels in a deleted category become uncategorized and keep copies of the category's permission overwrites, so nobody sees more than before; CONFLICT when the category has overwrites and one of its channels has overwrites of its own.",
    args: { id: t.arg.id({ required: true }) },
    resolve: async (_r, { id }, ctx) => {
      const v = requireViewer(ctx);
      await limit(ctx, 'mutation');
      return encodeId('Channel', await channelService.deleteChannel(ctx.deps, v, decodeId(id, 'Channel')));
    },
  }),
}));
