/**
 * The Message type. Other files extend it with builder.objectField(MessageRef, ...)
 * (reactions, pins); this file owns its core fields, history and the message mutations.
 */
import { sql } from 'drizzle-orm';
import { messages } from '../core/db/tables.ts';
import { notFound } from '../core/errors.ts';
import { builder } from './builder.ts';

export type MessageRow = typeof messages.$inferSelect;

/** Loads by id; deleted messages are NOT_FOUND for everyone. */
export const MessageRef = builder.loadableNodeRef<MessageRow, string, string>('Message', {
  id: { resolve: (m) => m.id },
  load: async (ids, ctx) => {
    const rows = await ctx.deps.db.select().from(messages).where(sql`${messages.id} in ${ids}`);
    const byId = new Map(rows.filter((r) => !r.deletedAt).map((r) => [r.id, r]));
    return ids.map((id) => byId.get(id) ?? notFound('Message'));
  },
});

MessageRef.implement({
  fields: (t) => ({
    content: t.exposeString('content'),
    createdAt: t.expose('createdAt', { type: 'DateTime' }),
    editedAt: t.expose('editedAt', { type: 'DateTime', nullable: true }),
  }),
});
