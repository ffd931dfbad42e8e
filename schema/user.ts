import { and, eq, isNull, sql } from 'drizzle-orm';
import { z } from 'zod';
import { users } from '../core/db/tables.ts';
import { notFound } from '../core/errors.ts';
import * as auth from '../core/services/auth.service.ts';
import * as userService from '../core/services/user.service.ts';
import { builder, decodeId, nodeId, requireViewer } from './builder.ts';
import { limit } from './limits.ts';

export type UserRow = typeof users.$inferSelect;

export const UserRef = builder.loadableNodeRef<UserRow, string, string>('User', {
  id: nodeId('User', (u) => u.id),
  load: async (ids, ctx) => {
    const rows = await ctx.deps.db.select().from(users).where(sql`${users.id} in ${ids}`);
    const byId = new Map(rows.map((r) => [r.id, r]));
    return ids.map((id) => byId.get(id) ?? notFound('User'));
  },
});

UserRef.implement({
  fields: (t) => ({
    username: t.exposeString('username'),
    displayName: t.exposeString('displayName', { nullable: true }),
    bio: t.exposeString('bio', { nullable: true }),
    avatarUrl: t.exposeString('avatarUrl', { nullable: true }),
    isAdmin: t.exposeBoolean('isAdmin'),
    isBot: t.exposeBoolean('isBot'),
    deactivated: t.boolean({ resolve: (u) => !!u.deactivatedAt }),
    createdAt: t.expose('createdAt', { type: 'DateTime' }),
  }),
});

const SessionRef = builder.objectRef<{
  id: string;
  deviceName: string | null;
  createdAt: Date;
  lastUsedAt: Date;
  ip: string | null;
}>('Session');
SessionRef.implement({
  description: 'A signed-in device',
  fields: (t) => ({
    id: t.string({ resolve: (s) => s.id }),
    deviceName: t.exposeString('deviceName', { nullable: true }),
    createdAt: t.expose('createdAt', { type: 'DateTime' }),
    lastUsedAt: t.expose('lastUsedAt', { type: 'DateTime' }),
    current: t.boolean({ resolve: (s, _a, ctx) => s.id === ctx.viewer?.sessionId }),
  }),
});

/** The signed-in user and what hangs off it; other files add fields with builder.objectField. */
export const ViewerRef = builder.objectRef<{ userId: string }>('Viewer');
ViewerRef.implement({
  fields: (t) => ({
    user: t.field({ type: UserRef, resolve: (v) => v.userId }),
    sessions: t.field({
      type: [SessionRef],
      resolve: (_v, _a, ctx) => auth.listSessions(ctx.deps, requireViewer(ctx)),
    }),
  }),
});

builder.queryField('viewer', (t) =>
  t.field({
    type: ViewerRef,
    nullable: true,
    description: 'The signed-in user; null when not signed in.',
    resolve: (_r, _a, ctx) => (ctx.viewer ? { userId: ctx.viewer.userId } : null),
  }),
);

const AuthPayload = builder.objectRef<auth.AuthResult>('AuthPayload');
AuthPayload.implement({
  fields: (t) => ({
    accessToken: t.exposeString('accessToken'),
    refreshToken: t.exposeString('refreshToken'),
    user: t.field({ type: UserRef, resolve: (r) => r.userId }),
  }),
});

const RegisterInput = builder.inputType('RegisterInput', {
  fields: (t) => ({
    // Bounds before any work; the service applies the exact rules.
    username: t.string({ required: true, validate: z.string().max(100) }),
    email: t.string({ required: true, validate: z.string().max(320) }),
    password: t.string({ required: true, validate: z.string().max(256) }),
    deviceName: t.string({ validate: z.string().max(100) }),
  }),
});
const LoginInput = builder.inputType('LoginInput', {
  fields: (t) => ({
    // Bounded here because it becomes a rate-limit key before the service looks at it.
    login: t.string({ required: true, description: 'username or email', validate: z.string().max(320) }),
    password: t.string({ required: true, validate: z.string().max(256) }),
    deviceName: t.string({ validate: z.string().max(100) }),
  }),
});

builder.mutationFields((t) => ({
  register: t.field({
    type: AuthPayload,
    args: { input: t.arg({ type: RegisterInput, required: true }) },
    resolve: async (_r, { input }, ctx) => {
      await limit(ctx, 'register');
      return auth.register(ctx.deps, input, ctx.ip);
    },
  }),
  login: t.field({
    type: AuthPayload,
    args: { input: t.arg({ type: LoginInput, required: true }) },
    resolve: async (_r, { input }, ctx) => {
      await limit(ctx, 'login', input.login.trim().toLowerCase());
      return auth.login(ctx.deps, input, ctx.ip);
    },
  }),
  refreshSession: t.field({
    type: AuthPayload,
    args: { refreshToken: t.arg.string({ required: true, validate: z.string().max(200) }) },
    resolve: async (_r, { refreshToken }, ctx) => {
      await limit(ctx, 'refresh');
      return auth.refreshSession(ctx.deps, refreshToken);
    },
  }),
  logout: t.boolean({
    resolve: async (_r, _a, ctx) => {
      const v = requireViewer(ctx);
      await limit(ctx, 'mutation');
      await auth.logout(ctx.deps, v);
      return true;
    },
  }),
  revokeSession: t.boolean({
    args: { id: t.arg.string({ required: true, validate: z.string().max(100) }) },
    resolve: async (_r, { id }, ctx) => {
      const v = requireViewer(ctx);
      await limit(ctx, 'mutation');
      await auth.revokeSession(ctx.deps, v, id);
      return true;
    },
  }),
}));

builder.queryField('user', (t) =>
  t.field({
    type: UserRef,
    args: { id: t.arg.id({ required: true }) },
    resolve: async (_r, { id }, ctx) => {
      requireViewer(ctx);
      const uid = decodeId(id, 'User');
      const [u] = await ctx.deps.db
        .select()
        .from(users)
        .where(and(eq(users.id, uid), isNull(users.deactivatedAt)));
      if (!u) throw notFound('User');
      return u;
    },
  }),
);

const UpdateProfileInput = builder.inputType('UpdateProfileInput', {
  description: 'Omitted fields stay as they are; null clears a field.',
  fields: (t) => ({
    displayName: t.string({ description: '1-32 characters after trimming', validate: z.string().max(1000) }),
    bio: t.string({ description: 'at most 190 characters', validate: z.string().max(10_000) }),
    avatarUrl: t.string({
      description: 'an http(s) URL of at most 2048 characters',
      validate: z.string().max(10_000),
    }),
  }),
});

builder.mutationFields((t) => ({
  updateProfile: t.field({
    type: UserRef,
    args: { input: t.arg({ type: UpdateProfileInput, required: true }) },
    resolve: async (_r, { input }, ctx) => {
      const v = requireViewer(ctx);
      await limit(ctx, 'mutation');
      return userService.updateProfile(ctx.deps, v, input);
    },
  }),
  changeUsername: t.field({
    type: UserRef,
    description: 'CONFLICT when another account has it (case-insensitively).',
    args: { username: t.arg.string({ required: true, validate: z.string().max(1000) }) },
    resolve: async (_r, { username }, ctx) => {
      const v = requireViewer(ctx);
      await limit(ctx, 'mutation');
      return userService.changeUsername(ctx.deps, v, username);
    },
  }),
  deactivateAccount: t.boolean({
    description:
      'Signs out every session and hides the account. A wrong password answers FORBIDDEN (the session stays valid).',
    args: { password: t.arg.string({ required: true, validate: z.string().max(256) }) },
    resolve: async (_r, { password }, ctx) => {
      const v = requireViewer(ctx);
      await limit(ctx, 'mutation');
      // Shares login's per-account budget: both guess the same password.
      await limit(ctx, 'login', `deactivate:${v.userId}`);
      await userService.deactivateAccount(ctx.deps, v, password);
      return true;
    },
  }),
}));

builder.queryField('searchUsers', (t) =>
  t.field({
    type: [UserRef],
    description:
      'Active users whose username starts with `prefix` (case-insensitive, 1-32 characters), in username order; `first` defaults to 10 and is capped at 25.',
    args: {
      prefix: t.arg.string({ required: true, validate: z.string().max(1000) }),
      first: t.arg.int(),
    },
    resolve: async (_r, { prefix, first }, ctx) => {
      const v = requireViewer(ctx);
      await limit(ctx, 'search');
      return userService.searchUsers(ctx.deps, v, prefix, first);
    },
  }),
);
