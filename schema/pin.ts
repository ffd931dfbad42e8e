/** Pins: Message.pinned, Channel.pinnedMessages and the pin mutations. */
import * as pinService from '../core/services/pin.service.ts';
import { builder, decodeId, requireViewer } from './builder.ts';
import { ChannelRef } from './channel.ts';
import { limit } from './limits.ts';
import { MessageRef } from './message.ts';

builder.objectField(MessageRef, 'pinned', (t) => t.boolean({ resolve: (m) => m.pinnedAt !== null }));

builder.objectField(ChannelRef, 'pinnedMessages', (t) =>
  t.field({
    type: [MessageRef],
    description: 'Newest pin first (at most 50); empty without READ_HISTORY',
    resolve: (c, _a, ctx) => pinService.pinnedMessages(ctx.deps, requireViewer(ctx), c.id),
  }),
);

builder.mutationFields((t) => ({
  pinMessage: t.field({
    type: MessageRef,
    description: `Needs PIN_MESSAGES. A channel holds at most ${pinService.MAX_PINS} pins (CONFLICT beyond); pinning twice is a no-op.`,
    args: { messageId: t.arg.id({ required: true }) },
    resolve: async (_r, { messageId }, ctx) => {
      const v = requireViewer(ctx);
      await limit(ctx, 'mutation');
      return pinService.pinMessage(ctx.deps, v, decodeId(messageId, 'Message', 'messageId'));
    },
  }),
  unpinMessage: t.field({
    type: MessageRef,
    description: 'Needs PIN_MESSAGES; unpinning a message that is not pinned is a no-op.',
    args: { messageId: t.arg.id({ required: true }) },
    resolve: async (_r, { messageId }, ctx) => {
      const v = requireViewer(ctx);
      await limit(ctx, 'mutation');
      return pinService.unpinMessage(ctx.deps, v, decodeId(messageId, 'Message', 'messageId'));
    },
  }),
}));
