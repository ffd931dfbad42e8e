/** DMs and group DMs: `openDirectChannel`, `Viewer.directChannels` and `Channel.recipients`. */
import { badInput } from '../core/errors.ts';
import * as direct from '../core/services/direct.service.ts';
import { builder, decodeId, requireViewer } from './builder.ts';
import { ChannelRef } from './channel.ts';
import { limit } from './limits.ts';
import { UserRef, ViewerRef } from './user.ts';

/** Far above the group size: only bounds the work of decoding a hostile list. */
const MAX_IDS = 100;

builder.mutationField('openDirectChannel', (t) =>
  t.field({
    type: ChannelRef,
    description: `A DM for one user (the existing one if any), a new GROUP_DM for several (at most ${direct.MAX_GROUP_DM_SIZE} people, the viewer included). NOT_FOUND for unknown or deactivated users and for users who blocked the viewer.`,
    args: { userIds: t.arg.idList({ required: true }) },
    resolve: async (_r, { userIds }, ctx) => {
      const v = requireViewer(ctx);
      if (userIds.length > MAX_IDS) throw badInput(`At most ${MAX_IDS} user ids.`, 'userIds');
      const ids = userIds.map((id) => decodeId(id, 'User', 'userIds'));
      await limit(ctx, 'mutation');
      return direct.openDirectChannel(ctx.deps, v, ids);
    },
  }),
);

builder.objectField(ViewerRef, 'directChannels', (t) =>
  t.field({
    type: [ChannelRef],
    description: 'The viewer’s DMs and group DMs, most recently active first',
    resolve: (_v, _a, ctx) => direct.listDirectChannels(ctx.deps, requireViewer(ctx)),
  }),
);

builder.objectField(ChannelRef, 'recipients', (t) =>
  t.loadableList({
    type: UserRef,
    description: 'Who is in a DM or group DM; empty for guild channels',
    load: (ids: string[], ctx) => direct.recipientsByChannel(ctx.deps, ids),
    resolve: (c) => c.id,
  }),
);
