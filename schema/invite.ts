import { z } from 'zod';
import * as inviteService from '../core/services/invite.service.ts';
import { builder, decodeId, requireViewer } from './builder.ts';
import { ChannelRef } from './channel.ts';
import { canSeeGuildChannel, GuildRef } from './guild.ts';
import { limit } from './limits.ts';
import { UserRef } from './user.ts';

const codeArg = z.string().max(100);

export const InviteRef = builder.objectRef<inviteService.InviteRow>('Invite');
InviteRef.implement({
  fields: (t) => ({
    code: t.exposeString('code'),
    guild: t.field({ type: GuildRef, resolve: (i) => i.guildId }),
    channel: t.field({
      type: ChannelRef,
      nullable: true,
      description: 'The channel it leads to; null when none or hidden from the viewer',
      // Guild.invites is for MANAGE_GUILD, which does not imply seeing every channel.
      resolve: async (i, _a, ctx) =>
        i.channelId && (await canSeeGuildChannel(ctx, i.guildId, i.channelId)) ? i.channelId : null,
    }),
    inviter: t.field({ type: UserRef, resolve: (i) => i.inviterId }),
    maxUses: t.exposeInt('maxUses', { nullable: true, description: 'null: unlimited' }),
    uses: t.exposeInt('uses'),
    expiresAt: t.expose('expiresAt', { type: 'DateTime', nullable: true }),
    revoked: t.boolean({ resolve: (i) => !!i.revokedAt }),
    createdAt: t.expose('createdAt', { type: 'DateTime' }),
  }),
});

/** What a holder of the code sees before joining: never the guild itself (they are not in it). */
const InvitePreviewRef = builder.objectRef<inviteService.InvitePreview>('InvitePreview');
InvitePreviewRef.implement({
  fields: (t) => ({
    code: t.string({ resolve: (p) => p.invite.code }),
    guildName: t.string({ resolve: (p) => p.guild.name }),
    guildDescription: t.string({ nullable: true, resolve: (p) => p.guild.description }),
    guildIconUrl: t.string({ nullable: true, resolve: (p) => p.guild.iconUrl }),
    memberCount: t.exposeInt('memberCount'),
    inviter: t.field({ type: UserRef, resolve: (p) => p.invite.inviterId }),
    expiresAt: t.field({ type: 'DateTime', nullable: true, resolve: (p) => p.invite.expiresAt }),
  }),
});

builder.objectField(GuildRef, 'invites', (t) =>
  t.field({
    type: [InviteRef],
    description: 'Invites that can still be used, newest first (MANAGE_GUILD; FORBIDDEN otherwise)',
    resolve: (g, _a, ctx) => inviteService.listInvites(ctx.deps, requireViewer(ctx), g.id),
  }),
);

builder.queryField('invite', (t) =>
  t.field({
    type: InvitePreviewRef,
    description: 'A preview of the guild an invite leads to; NOT_FOUND when unusable',
    args: { code: t.arg.string({ required: true, validate: codeArg }) },
    resolve: (_r, { code }, ctx) => inviteService.previewInvite(ctx.deps, code),
  }),
);

const CreateInviteInput = builder.inputType('CreateInviteInput', {
  fields: (t) => ({
    guildId: t.id({ required: true }),
    channelId: t.id(),
    maxUses: t.int({ description: 'omitted: unlimited' }),
    expiresInSeconds: t.int({ description: 'omitted: 7 days; at most 30 days' }),
  }),
});

builder.mutationFields((t) => ({
  createInvite: t.field({
    type: InviteRef,
    description: 'Needs CREATE_INVITE (in the channel, when channelId is given)',
    args: { input: t.arg({ type: CreateInviteInput, required: true }) },
    resolve: async (_r, { input }, ctx) => {
      const v = requireViewer(ctx);
      await limit(ctx, 'mutation');
      return inviteService.createInvite(ctx.deps, v, {
        ...input,
        guildId: decodeId(input.guildId, 'Guild', 'guildId'),
        channelId: input.channelId ? decodeId(input.channelId, 'Channel', 'channelId') : null,
      });
    },
  }),
  revokeInvite: t.boolean({
    description: 'The inviter or a holder of MANAGE_GUILD',
    args: { code: t.arg.string({ required: true, validate: codeArg }) },
    resolve: async (_r, { code }, ctx) => {
      const v = requireViewer(ctx);
      await limit(ctx, 'mutation');
      return inviteService.revokeInvite(ctx.deps, v, code);
    },
  }),
  joinGuild: t.field({
    type: GuildRef,
    description: 'Already a member: answers the guild without using the invite',
    args: { code: t.arg.string({ required: true, validate: codeArg }) },
    resolve: async (_r, { code }, ctx) => {
      const v = requireViewer(ctx);
      await limit(ctx, 'mutation');
      return inviteService.joinGuild(ctx.deps, v, code);
    },
  }),
}));
