/** Query.search: message search over the channels the viewer can read (core/services/search.service.ts). */
import { BanterError } from '../core/errors.ts';
import { isUuid } from '../core/ids.ts';
import { SEARCH_HAS } from '../core/ports/search.ts';
import { DEFAULT_SEARCH_PAGE, MAX_SEARCH_PAGE, searchMessages } from '../core/services/search.service.ts';
import { builder, decodeId, requireViewer } from './builder.ts';
import { limit } from './limits.ts';
import { MessageConnection, toConnection } from './message.ts';

const SearchHasEnum = builder.enumType('SearchHas', {
  description:
    'LINK: an http(s) URL in the text; FILE: any attachment; IMAGE: an image attachment; EMBED: a link preview',
  values: SEARCH_HAS,
});

const SearchInput = builder.inputType('SearchInput', {
  description: 'Filters combine (all must hold); give at least one.',
  fields: (t) => ({
    text: t.string({
      description: '1-200 characters; every word must match (case-insensitive), the last also as a prefix',
    }),
    guildId: t.id(),
    channelId: t.id(),
    authorId: t.id(),
    has: t.field({ type: [SearchHasEnum], description: 'every listed kind must be present' }),
    before: t.field({ type: 'DateTime', description: 'sent before this time' }),
    after: t.field({ type: 'DateTime', description: 'sent after this time' }),
  }),
});

/** Cursors are the ones Channel.messages hands out (base64url of `msg:<id>`), so they stay opaque. */
const CURSOR_PREFIX = 'msg:';
function decodeCursor(cursor: string | null | undefined): string | null {
  if (cursor === null || cursor === undefined) return null;
  const raw = cursor.length <= 100 ? Buffer.from(cursor, 'base64url').toString() : '';
  const id = raw.slice(CURSOR_PREFIX.length);
  if (!raw.startsWith(CURSOR_PREFIX) || !isUuid(id))
    throw new BanterError('BAD_USER_INPUT', 'after is not a valid cursor.', { extra: { field: 'after' } });
  return id;
}

builder.queryField('search', (t) =>
  t.field({
    type: MessageConnection,
    description: `Messages the viewer can read (READ_HISTORY), newest first; deleted ones never appear. first defaults to ${DEFAULT_SEARCH_PAGE}, at most ${MAX_SEARCH_PAGE}. A guildId or channelId the viewer cannot see is NOT_FOUND.`,
    args: {
      input: t.arg({ type: SearchInput, required: true }),
      first: t.arg.int(),
      after: t.arg.string(),
    },
    resolve: async (_r, { input, first, after }, ctx) => {
      const v = requireViewer(ctx);
      await limit(ctx, 'search');
      const page = await searchMessages(
        ctx.deps,
        v,
        {
          text: input.text ?? null,
          guildId: input.guildId ? decodeId(input.guildId, 'Guild', 'guildId') : null,
          channelId: input.channelId ? decodeId(input.channelId, 'Channel', 'channelId') : null,
          authorId: input.authorId ? decodeId(input.authorId, 'User', 'authorId') : null,
          has: input.has ?? null,
          before: input.before ?? null,
          after: input.after ?? null,
        },
        { first, after: decodeCursor(after) },
      );
      return toConnection({ rows: page.rows, hasPreviousPage: false, hasNextPage: page.hasNextPage });
    },
  }),
);
