/**
 * Read markers: markRead, Channel.unreadCount / mentionCount (batched per request, so a guild's
 * channel list costs one statement) and Viewer.unreadChannels.
 */
import { createContextCache } from '@pothos/core';
import DataLoader from 'dataloader';
import * as readState from '../core/services/read-state.service.ts';
import { builder, type Context, decodeId, requireViewer } from './builder.ts';
import { ChannelRef } from './channel.ts';
import { limit } from './limits.ts';
import { ViewerRef } from './user.ts';

const countsLoader = createContextCache(
  (ctx: Context) =>
    new DataLoader<string, readState.ChannelCounts>(
      (ids) => readState.channelCounts(ctx.deps.db, requireViewer(ctx).userId, ids),
      // Batched within a tick, never cached: a subscription's context lives on while counts change.
      { cache: false },
    ),
);

builder.objectFields(ChannelRef, (t) => ({
  unreadCount: t.int({
    description: `Messages by others after the viewer's read marker, counted up to ${readState.UNREAD_CAP}`,
    resolve: async (c, _a, ctx) => (await countsLoader(ctx).load(c.id)).unreadCount,
  }),
  mentionCount: t.int({
    description: `Unread messages that mention the viewer, @everyone or one of the viewer's roles (among the newest ${readState.UNREAD_CAP} unread)`,
    resolve: async (c, _a, ctx) => (await countsLoader(ctx).load(c.id)).mentionCount,
  }),
}));

const UnreadChannelRef = builder.objectRef<readState.ChannelCounts>('UnreadChannel');
UnreadChannelRef.implement({
  fields: (t) => ({
    channel: t.field({ type: ChannelRef, resolve: (u) => u.channelId }),
    unreadCount: t.exposeInt('unreadCount'),
    mentionCount: t.exposeInt('mentionCount'),
  }),
});

builder.objectField(ViewerRef, 'unreadChannels', (t) =>
  t.field({
    type: [UnreadChannelRef],
    description: "The viewer's visible guild channels and DMs with something unread",
    resolve: (_v, _a, ctx) => readState.unreadChannels(ctx.deps, requireViewer(ctx)),
  }),
);

builder.mutationField('markRead', (t) =>
  t.field({
    type: ChannelRef,
    description: 'Moves the read marker to this message; never moves it back to an older one.',
    args: { channelId: t.arg.id({ required: true }), messageId: t.arg.id({ required: true }) },
    resolve: async (_r, { channelId, messageId }, ctx) => {
      const v = requireViewer(ctx);
      await limit(ctx, 'mutation');
      const id = await readState.markRead(ctx.deps, v, {
        channelId: decodeId(channelId, 'Channel', 'channelId'),
        messageId: decodeId(messageId, 'Message', 'messageId'),
      });
      // Counts read later in this operation must see the new marker.
      countsLoader(ctx).clear(id);
      return id;
    },
  }),
);
