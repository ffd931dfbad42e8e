/**
 * Message reports: reportMessage for everyone, the report queue and resolveReport for the
 * instance admin and guild moderators (core/services/report.service.ts decides who sees what).
 */
import { z } from 'zod';
import * as reportService from '../core/services/report.service.ts';
import { builder, decodeId, nodeId, requireViewer } from './builder.ts';
import { limit } from './limits.ts';
import { MessageRef } from './message.ts';
import { decodeCursor, pageSize, toConnection } from './moderation.ts';
import { UserRef } from './user.ts';

const ReportStatus = builder.enumType('ReportStatus', { values: reportService.REPORT_STATUSES });

/** node(id) on a report goes through the same check as the queue: moderators only. */
export const ReportRef = builder.loadableNodeRef<reportService.ReportRow, string, string>('Report', {
  id: nodeId('Report', (r) => r.id),
  load: (ids, ctx) =>
    Promise.all(
      ids.map((id) => reportService.getReport(ctx.deps, requireViewer(ctx), id).catch((e: Error) => e)),
    ),
});

ReportRef.implement({
  fields: (t) => ({
    message: t.loadable({
      type: MessageRef,
      nullable: true,
      description:
        'null once the message is deleted, or when the viewer cannot see its channel; contentSnapshot keeps what was reported.',
      load: (keys: string[], ctx) =>
        reportService.visibleMessageIds(
          ctx.deps,
          requireViewer(ctx),
          keys.map((k) => {
            const [messageId, channelId] = k.split('|');
            return { messageId, channelId };
          }),
        ),
      resolve: (r) => `${r.messageId}|${r.channelId}`,
    }),
    reporter: t.field({ type: UserRef, resolve: (r) => r.reporterId }),
    author: t.field({
      type: UserRef,
      description: 'who wrote the reported message',
      resolve: (r) => r.authorId,
    }),
    reason: t.exposeString('reason'),
    status: t.field({ type: ReportStatus, resolve: (r) => r.status as reportService.ReportStatus }),
    contentSnapshot: t.exposeString('contentSnapshot'),
    createdAt: t.expose('createdAt', { type: 'DateTime' }),
    resolvedAt: t.expose('resolvedAt', { type: 'DateTime', nullable: true }),
    resolvedBy: t.field({ type: UserRef, nullable: true, resolve: (r) => r.resolvedBy }),
    resolution: t.exposeString('resolution', { nullable: true }),
  }),
});

const ReportConnection = builder.connectionObject(
  { type: ReportRef, name: 'ReportConnection' },
  { name: 'ReportEdge' },
);

builder.queryField('reports', (t) =>
  t.field({
    type: ReportConnection,
    description:
      'Reports, newest first. Without guildId: the instance admin only. With guildId: members with MANAGE_MESSAGES there, for the channels where they also have VIEW_CHANNEL and MANAGE_MESSAGES. first defaults to 50; above 100 is BAD_USER_INPUT.',
    args: {
      status: t.arg({ type: ReportStatus }),
      guildId: t.arg.id(),
      first: t.arg.int(),
      after: t.arg.string(),
    },
    resolve: async (_r, a, ctx) => {
      const v = requireViewer(ctx);
      const first = pageSize(a.first);
      const afterId = decodeCursor(a.after);
      const rows = await reportService.listReports(ctx.deps, v, {
        status: a.status,
        guildId: a.guildId ? decodeId(a.guildId, 'Guild', 'guildId') : null,
        first,
        afterId,
      });
      return toConnection(rows, first, afterId);
    },
  }),
);

const text1000 = z.string().max(reportService.MAX_REPORT_TEXT);

builder.mutationFields((t) => ({
  reportMessage: t.field({
    type: ReportRef,
    args: {
      messageId: t.arg.id({ required: true }),
      reason: t.arg.string({ required: true, validate: text1000 }),
    },
    resolve: async (_r, a, ctx) => {
      const v = requireViewer(ctx);
      await limit(ctx, 'mutation');
      return reportService.reportMessage(ctx.deps, v, {
        messageId: decodeId(a.messageId, 'Message', 'messageId'),
        reason: a.reason,
      });
    },
  }),
  resolveReport: t.field({
    type: ReportRef,
    args: {
      id: t.arg.id({ required: true }),
      resolution: t.arg.string({ required: true, validate: text1000 }),
    },
    resolve: async (_r, a, ctx) => {
      const v = requireViewer(ctx);
      await limit(ctx, 'mutation');
      return reportService.resolveReport(ctx.deps, v, {
        id: decodeId(a.id, 'Report'),
        resolution: a.resolution,
      });
    },
  }),
}));
