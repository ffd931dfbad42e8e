/** Reactions on messages: Message.reactions (batched per request) and the two mutations. */
import { z } from 'zod';
import * as reactionService from '../core/services/reaction.service.ts';
import { builder, decodeId, requireViewer } from './builder.ts';
import { limit } from './limits.ts';
import { MessageRef } from './message.ts';

export const ReactionRef = builder.objectRef<reactionService.ReactionSummary>('Reaction');
ReactionRef.implement({
  description: 'One emoji on a message: how many reacted with it and whether the viewer did',
  fields: (t) => ({
    emoji: t.exposeString('emoji'),
    count: t.exposeInt('count'),
    me: t.exposeBoolean('me'),
  }),
});

builder.objectField(MessageRef, 'reactions', (t) =>
  t.loadableList({
    type: ReactionRef,
    description: 'In the order each emoji was first added',
    load: (ids: string[], ctx) =>
      reactionService.reactionsForMessages(ctx.deps.db, ctx.viewer?.userId ?? null, ids),
    resolve: (m) => m.id,
  }),
);

const emojiArg = z.string().max(64);

builder.mutationFields((t) => ({
  addReaction: t.field({
    type: MessageRef,
    description: `Adding the same emoji twice is a no-op. A message carries at most ${reactionService.MAX_REACTION_EMOJI} different emoji (CONFLICT beyond).`,
    args: {
      messageId: t.arg.id({ required: true }),
      emoji: t.arg.string({ required: true, validate: emojiArg }),
    },
    resolve: async (_r, { messageId, emoji }, ctx) => {
      const v = requireViewer(ctx);
      await limit(ctx, 'mutation');
      return reactionService.addReaction(ctx.deps, v, {
        messageId: decodeId(messageId, 'Message', 'messageId'),
        emoji,
      });
    },
  }),
  removeReaction: t.field({
    type: MessageRef,
    description: "Removes the viewer's own reaction; removing one that is not there is a no-op.",
    args: {
      messageId: t.arg.id({ required: true }),
      emoji: t.arg.string({ required: true, validate: emojiArg }),
    },
    resolve: async (_r, { messageId, emoji }, ctx) => {
      const v = requireViewer(ctx);
      await limit(ctx, 'mutation');
      return reactionService.removeReaction(ctx.deps, v, {
        messageId: decodeId(messageId, 'Message', 'messageId'),
        emoji,
      });
    },
  }),
}));
