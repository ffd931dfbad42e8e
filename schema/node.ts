/**
 * Visibility for `node(id)`: each Node type answers exactly as its own root query does, so the
 * generic entry point reveals nothing the specific ones hide.
 */
import { and, eq, isNull } from 'drizzle-orm';
import { roles, users } from '../core/db/tables.ts';
import { notFound } from '../core/errors.ts';
import { requireChannel, requireGuild } from '../core/services/access.service.ts';
import * as history from '../core/services/message-history.service.ts';
import * as reportService from '../core/services/report.service.ts';
import { registerNodeGuard, requireViewer } from './builder.ts';

registerNodeGuard('User', async (ctx, id) => {
  requireViewer(ctx);
  const [u] = await ctx.deps.db
    .select({ id: users.id })
    .from(users)
    .where(and(eq(users.id, id), isNull(users.deactivatedAt)));
  if (!u) throw notFound('User');
});
registerNodeGuard('Guild', (ctx, id) =>
  requireGuild(ctx.deps.db, requireViewer(ctx).userId, id, 0n, ctx.deps.now()),
);
registerNodeGuard('Channel', (ctx, id) =>
  requireChannel(ctx.deps.db, requireViewer(ctx).userId, id, 0n, ctx.deps.now()),
);
registerNodeGuard('Message', (ctx, id) => history.getMessage(ctx.deps, requireViewer(ctx), id));
registerNodeGuard('Report', (ctx, id) => reportService.getReport(ctx.deps, requireViewer(ctx), id));
registerNodeGuard('Role', async (ctx, id) => {
  const v = requireViewer(ctx);
  const [r] = await ctx.deps.db.select({ guildId: roles.guildId }).from(roles).where(eq(roles.id, id));
  if (!r) throw notFound('Role');
  await requireGuild(ctx.deps.db, v.userId, r.guildId, 0n, ctx.deps.now());
});
