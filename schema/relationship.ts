/** Friends, friend requests and blocks: `Viewer.relationships` and the mutations that change them. */
import * as rel from '../core/services/relationship.service.ts';
import { builder, decodeId, requireViewer } from './builder.ts';
import { limit } from './limits.ts';
import { UserRef, ViewerRef } from './user.ts';

export const RelationshipKind = builder.enumType('RelationshipKind', {
  description:
    'The viewer’s side: FRIEND, OUTGOING (the viewer asked), INCOMING (they asked) or BLOCKED (the viewer blocked them)',
  values: rel.RELATIONSHIP_KINDS,
});

const RelationshipRef = builder.objectRef<rel.RelationshipRow>('Relationship');
RelationshipRef.implement({
  fields: (t) => ({
    user: t.field({ type: UserRef, resolve: (r) => r.targetId }),
    kind: t.field({ type: RelationshipKind, resolve: (r) => r.kind }),
    since: t.expose('createdAt', { type: 'DateTime' }),
  }),
});

builder.objectField(ViewerRef, 'relationships', (t) =>
  t.field({
    type: [RelationshipRef],
    resolve: (_v, _a, ctx) => rel.listRelationships(ctx.deps, requireViewer(ctx)),
  }),
);

type Change = (
  deps: Parameters<typeof rel.sendFriendRequest>[0],
  viewer: Parameters<typeof rel.sendFriendRequest>[1],
  otherId: string,
) => Promise<rel.RelationshipRow | null>;

/** Every relationship mutation takes a user id and answers the viewer's side afterwards. */
function relationshipMutation(name: string, description: string, change: Change) {
  builder.mutationField(name, (t) =>
    t.field({
      type: RelationshipRef,
      nullable: true,
      description: `${description} Answers the viewer’s relationship afterwards (null when none is left).`,
      args: { userId: t.arg.id({ required: true }) },
      resolve: async (_r, { userId }, ctx) => {
        const v = requireViewer(ctx);
        const targetId = decodeId(userId, 'User', 'userId');
        await limit(ctx, 'mutation');
        return change(ctx.deps, v, targetId);
      },
    }),
  );
}

relationshipMutation(
  'sendFriendRequest',
  'Asks a user to be friends; when they already asked the viewer, makes them friends. NOT_FOUND for unknown users and for users who blocked the viewer; CONFLICT when already friends, already asked, or the viewer blocked them.',
  rel.sendFriendRequest,
);
relationshipMutation(
  'acceptFriendRequest',
  'Accepts an incoming request (NOT_FOUND when there is none).',
  rel.acceptFriendRequest,
);
relationshipMutation(
  'declineFriendRequest',
  'Declines an incoming request or cancels the viewer’s outgoing one (NOT_FOUND when there is none).',
  rel.declineFriendRequest,
);
relationshipMutation('removeFriend', 'Ends a friendship (NOT_FOUND when not friends).', rel.removeFriend);
relationshipMutation(
  'blockUser',
  'Blocks a user, ending any friendship or request (CONFLICT when already blocked).',
  rel.blockUser,
);
relationshipMutation(
  'unblockUser',
  'Lifts the viewer’s block (NOT_FOUND when there is none).',
  rel.unblockUser,
);
