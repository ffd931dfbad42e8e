import { z } from 'zod';
import * as memberService from '../core/services/member.service.ts';
import { builder, decodeId, requireViewer } from './builder.ts';
import { GuildRef } from './guild.ts';
import { limit } from './limits.ts';
import { RoleRef } from './role.ts';
import { UserRef } from './user.ts';

export const MemberRef = builder.objectRef<memberService.MemberRow>('Member');
MemberRef.implement({
  description: "A user's membership in a guild",
  fields: (t) => ({
    user: t.field({ type: UserRef, resolve: (m) => m.userId }),
    guild: t.field({ type: GuildRef, resolve: (m) => m.guildId }),
    nickname: t.exposeString('nickname', { nullable: true }),
    joinedAt: t.expose('joinedAt', { type: 'DateTime' }),
    timeoutUntil: t.expose('timeoutUntil', { type: 'DateTime', nullable: true }),
    roles: t.field({
      type: [RoleRef],
      description: 'The roles assigned to the member (@everyone not included)',
      resolve: (m) => m.roleIds,
    }),
  }),
});

const MemberConnection = builder.connectionObject(
  { type: MemberRef, name: 'MemberConnection' },
  { name: 'MemberEdge' },
);

// Forward only (as CONTRACT.md has it): a plain field, so the SDL offers no last/before.
builder.objectField(GuildRef, 'members', (t) =>
  t.field({
    type: MemberConnection,
    description: `In join order; first defaults to ${memberService.DEFAULT_PAGE}, above ${memberService.MAX_PAGE} is BAD_USER_INPUT`,
    args: { first: t.arg.int(), after: t.arg.string() },
    resolve: async (g, args, ctx) => {
      const page = await memberService.listMembers(ctx.deps, requireViewer(ctx), g.id, args);
      const edges = page.members.map((m) => ({ cursor: memberService.encodeMemberCursor(m), node: m }));
      return {
        edges,
        pageInfo: {
          hasNextPage: page.hasNextPage,
          hasPreviousPage: !!args.after,
          startCursor: edges[0]?.cursor ?? null,
          endCursor: edges.at(-1)?.cursor ?? null,
        },
      };
    },
  }),
);

builder.mutationField('setNickname', (t) =>
  t.field({
    type: MemberRef,
    description:
      'Your own needs CHANGE_NICKNAME; others need MANAGE_NICKNAMES and a higher role. null or blank clears it.',
    args: {
      guildId: t.arg.id({ required: true }),
      userId: t.arg.id({ required: true }),
      nickname: t.arg.string({ validate: z.string().max(1000) }),
    },
    resolve: async (_r, args, ctx) => {
      const v = requireViewer(ctx);
      await limit(ctx, 'mutation');
      return memberService.setNickname(ctx.deps, v, {
        guildId: decodeId(args.guildId, 'Guild', 'guildId'),
        userId: decodeId(args.userId, 'User', 'userId'),
        nickname: args.nickname ?? null,
      });
    },
  }),
);
