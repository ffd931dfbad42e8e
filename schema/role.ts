import { createContextCache } from '@pothos/core';
import DataLoader from 'dataloader';
import { z } from 'zod';
import { BanterError, notFound } from '../core/errors.ts';
import {
  DM_PERMISSIONS,
  PERMISSION_NAMES,
  type PermissionName,
  permissionNames,
  permissionsFromNames,
} from '../core/permissions.ts';
import { loadChannelAccess } from '../core/services/access.service.ts';
import { recipientsByChannel } from '../core/services/direct.service.ts';
import * as roleService from '../core/services/role.service.ts';
import { builder, type Context, decodeAnyId, decodeId, encodeId, nodeId, requireViewer } from './builder.ts';
import { ChannelRef } from './channel.ts';
import { GuildRef, guildAccessLoader, requireGuildBatched } from './guild.ts';
import { limit } from './limits.ts';
import { UserRef } from './user.ts';

export const PermissionEnum = builder.enumType('Permission', { values: PERMISSION_NAMES });

const names = (p: bigint) => permissionNames(p);
const bits = (list: readonly PermissionName[] | null | undefined) =>
  list == null ? null : permissionsFromNames(list);

/** Roles load without a permission check: they are reached through a guild the viewer is in. */
export const RoleRef = builder.loadableNodeRef<roleService.RoleRow, string, string>('Role', {
  id: nodeId('Role', (r) => r.id),
  load: async (ids, ctx) => {
    const rows = await roleService.rolesByIds(ctx.deps, ids);
    const byId = new Map(rows.map((r) => [r.id, r]));
    return ids.map((id) => byId.get(id) ?? notFound('Role'));
  },
});

RoleRef.implement({
  fields: (t) => ({
    name: t.exposeString('name'),
    color: t.exposeInt('color', { description: '0xRRGGBB; 0 means no color' }),
    position: t.exposeInt('position', { description: 'higher is more senior; @everyone is 0' }),
    permissions: t.field({ type: [PermissionEnum], resolve: (r) => names(r.permissions) }),
    mentionable: t.exposeBoolean('mentionable'),
    isEveryone: t.exposeBoolean('isEveryone'),
    guild: t.field({ type: GuildRef, resolve: (r) => r.guildId }),
  }),
});

/** Each guild's roles, batched across a list of guilds (not cached: see guildAccessLoader). */
const guildRolesLoader = createContextCache(
  (ctx: Context) =>
    new DataLoader<string, roleService.RoleRow[]>((ids) => roleService.rolesOfGuilds(ctx.deps, ids), {
      cache: false,
    }),
);

builder.objectFields(GuildRef, (t) => ({
  roles: t.field({
    type: [RoleRef],
    description: 'Highest position first; @everyone last',
    resolve: async (g, _a, ctx) => {
      requireViewer(ctx);
      const [, list] = await Promise.all([requireGuildBatched(ctx, g.id), guildRolesLoader(ctx).load(g.id)]);
      return list;
    },
  }),
  viewerPermissions: t.field({
    type: [PermissionEnum],
    description: 'What the viewer may do guild-wide (channel overwrites not applied)',
    resolve: async (g, _a, ctx) => {
      requireViewer(ctx);
      return names((await requireGuildBatched(ctx, g.id)).guild.permissions);
    },
  }),
}));

const OverwriteTargetType = builder.enumType('OverwriteTargetType', { values: ['ROLE', 'MEMBER'] as const });

const OverwriteRef = builder.objectRef<roleService.OverwriteRow>('PermissionOverwrite');
OverwriteRef.implement({
  fields: (t) => ({
    targetType: t.field({ type: OverwriteTargetType, resolve: (o) => o.targetType as 'ROLE' | 'MEMBER' }),
    targetId: t.id({
      description: 'a Role id or a User id',
      resolve: (o) => encodeId(o.targetType === 'ROLE' ? 'Role' : 'User', o.targetId),
    }),
    role: t.field({
      type: RoleRef,
      nullable: true,
      resolve: (o) => (o.targetType === 'ROLE' ? o.targetId : null),
    }),
    user: t.field({
      type: UserRef,
      nullable: true,
      resolve: (o) => (o.targetType === 'MEMBER' ? o.targetId : null),
    }),
    allow: t.field({ type: [PermissionEnum], resolve: (o) => names(o.allow) }),
    deny: t.field({ type: [PermissionEnum], resolve: (o) => names(o.deny) }),
  }),
});

/** DM recipients per channel, batched (not cached: see guildAccessLoader). */
const recipientsLoader = createContextCache(
  (ctx: Context) =>
    new DataLoader((ids: readonly string[]) => recipientsByChannel(ctx.deps, ids), { cache: false }),
);

builder.objectFields(ChannelRef, (t) => ({
  viewerPermissions: t.field({
    type: [PermissionEnum],
    description: 'What the viewer may do in this channel, overwrites applied',
    resolve: async (c, _a, ctx) => {
      const v = requireViewer(ctx);
      if (c.viewerPermissions !== undefined) return names(c.viewerPermissions);
      // Batched for lists (Viewer.directChannels, a page's Message.channel); threads need their chain.
      if (c.guildId && c.type !== 'THREAD') {
        const a = await guildAccessLoader(ctx).load(c.guildId);
        return names(a.permissions.get(c.id) ?? 0n);
      }
      if (!c.guildId) {
        const recipients = await recipientsLoader(ctx).load(c.id);
        return names(recipients.some((u) => u.id === v.userId) ? DM_PERMISSIONS : 0n);
      }
      const a = await loadChannelAccess(ctx.deps.db, v.userId, c.id, ctx.deps.now());
      return names(a?.permissions ?? 0n);
    },
  }),
  overwrites: t.field({
    type: [OverwriteRef],
    description: 'Visible to members with MANAGE_CHANNELS or MANAGE_ROLES here (FORBIDDEN otherwise)',
    resolve: (c, _a, ctx) => roleService.listOverwrites(ctx.deps, requireViewer(ctx), c.id),
  }),
}));

const colorArg = z.number().int().min(0).max(0xffffff);

const CreateRoleInput = builder.inputType('CreateRoleInput', {
  fields: (t) => ({
    guildId: t.id({ required: true }),
    name: t.string({ required: true, validate: z.string().max(1000) }),
    color: t.int({ validate: colorArg }),
    permissions: t.field({ type: [PermissionEnum] }),
    mentionable: t.boolean(),
    position: t.int({ description: '1 (default, just above @everyone) to one above the highest role' }),
  }),
});

const UpdateRoleInput = builder.inputType('UpdateRoleInput', {
  description: 'Fields left out stay as they are. Moving a role shifts the roles in between.',
  fields: (t) => ({
    id: t.id({ required: true }),
    name: t.string({ validate: z.string().max(1000) }),
    color: t.int({ validate: colorArg }),
    permissions: t.field({ type: [PermissionEnum] }),
    mentionable: t.boolean(),
    position: t.int(),
  }),
});

const SetChannelOverwriteInput = builder.inputType('SetChannelOverwriteInput', {
  fields: (t) => ({
    channelId: t.id({ required: true }),
    targetType: t.field({ type: OverwriteTargetType, required: true }),
    targetId: t.id({ required: true, description: 'a Role id (ROLE) or a User id (MEMBER)' }),
    allow: t.field({ type: [PermissionEnum], required: true }),
    deny: t.field({ type: [PermissionEnum], required: true }),
  }),
});

builder.mutationFields((t) => ({
  createRole: t.field({
    type: RoleRef,
    description: 'Needs MANAGE_ROLES; only below your highest role, only with permissions you have',
    args: { input: t.arg({ type: CreateRoleInput, required: true }) },
    resolve: async (_r, { input }, ctx) => {
      const v = requireViewer(ctx);
      await limit(ctx, 'mutation');
      return roleService.createRole(ctx.deps, v, {
        ...input,
        guildId: decodeId(input.guildId, 'Guild', 'guildId'),
        permissions: bits(input.permissions),
      });
    },
  }),
  updateRole: t.field({
    type: RoleRef,
    description: 'Needs MANAGE_ROLES and a higher role than this one',
    args: { input: t.arg({ type: UpdateRoleInput, required: true }) },
    resolve: async (_r, { input }, ctx) => {
      const v = requireViewer(ctx);
      await limit(ctx, 'mutation');
      return roleService.updateRole(ctx.deps, v, {
        ...input,
        id: decodeId(input.id, 'Role'),
        permissions: bits(input.permissions),
      });
    },
  }),
  deleteRole: t.id({
    args: { id: t.arg.id({ required: true }) },
    resolve: async (_r, { id }, ctx) => {
      const v = requireViewer(ctx);
      await limit(ctx, 'mutation');
      return encodeId('Role', await roleService.deleteRole(ctx.deps, v, decodeId(id, 'Role')));
    },
  }),
  assignRole: t.boolean({
    description:
      'Needs MANAGE_ROLES, a role below your highest, and a member below you (only the owner may change their own roles)',
    args: {
      guildId: t.arg.id({ required: true }),
      userId: t.arg.id({ required: true }),
      roleId: t.arg.id({ required: true }),
    },
    resolve: async (_r, args, ctx) => {
      const v = requireViewer(ctx);
      await limit(ctx, 'mutation');
      return roleService.setMemberRole(ctx.deps, v, decodeAssignment(args), true);
    },
  }),
  unassignRole: t.boolean({
    description:
      'Needs MANAGE_ROLES, a role below your highest, and a member below you (only the owner may change their own roles)',
    args: {
      guildId: t.arg.id({ required: true }),
      userId: t.arg.id({ required: true }),
      roleId: t.arg.id({ required: true }),
    },
    resolve: async (_r, args, ctx) => {
      const v = requireViewer(ctx);
      await limit(ctx, 'mutation');
      return roleService.setMemberRole(ctx.deps, v, decodeAssignment(args), false);
    },
  }),
  setChannelOverwrite: t.field({
    type: OverwriteRef,
    description:
      'Needs MANAGE_ROLES in the channel; you can only allow or deny what you have there. A ROLE target must be below your highest role, a MEMBER target below you (only the owner may target themselves).',
    args: { input: t.arg({ type: SetChannelOverwriteInput, required: true }) },
    resolve: async (_r, { input }, ctx) => {
      const v = requireViewer(ctx);
      await limit(ctx, 'mutation');
      return roleService.setChannelOverwrite(ctx.deps, v, {
        channelId: decodeId(input.channelId, 'Channel', 'channelId'),
        targetType: input.targetType,
        targetId: decodeId(input.targetId, input.targetType === 'ROLE' ? 'Role' : 'User', 'targetId'),
        allow: permissionsFromNames(input.allow),
        deny: permissionsFromNames(input.deny),
      });
    },
  }),
  removeChannelOverwrite: t.boolean({
    description:
      "The same hierarchy as setChannelOverwrite; a former member's overwrite can always be removed.",
    args: { channelId: t.arg.id({ required: true }), targetId: t.arg.id({ required: true }) },
    resolve: async (_r, args, ctx) => {
      const v = requireViewer(ctx);
      await limit(ctx, 'mutation');
      const target = decodeAnyId(args.targetId);
      if (target.typename !== 'Role' && target.typename !== 'User')
        throw new BanterError('BAD_USER_INPUT', 'targetId must be a Role or User id.', {
          extra: { field: 'targetId' },
        });
      return roleService.removeChannelOverwrite(ctx.deps, v, {
        channelId: decodeId(args.channelId, 'Channel', 'channelId'),
        targetId: target.id,
      });
    },
  }),
}));

function decodeAssignment(a: { guildId: string; userId: string; roleId: string }) {
  return {
    guildId: decodeId(a.guildId, 'Guild', 'guildId'),
    userId: decodeId(a.userId, 'User', 'userId'),
    roleId: decodeId(a.roleId, 'Role', 'roleId'),
  };
}
