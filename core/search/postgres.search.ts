/**
 * The embedded search engine: Postgres full-text search over the messages table itself, through
 * the messages_search GIN index on to_tsvector('simple', content). Because it reads the live
 * table there is nothing to index or remove: edits and deletes are visible at once.
 */
import { and, desc, eq, gt, isNull, lt, type SQL, sql } from 'drizzle-orm';
import type { DbOrTx } from '../db/client.ts';
import { messages } from '../db/tables.ts';
import type { SearchEngine, SearchHas, SearchQuery, SearchResult } from '../ports/search.ts';

/**
 * A to_tsquery string for user text: every whitespace-separated word must match, the last also as
 * a prefix (search-as-you-type). Each word is a quoted lexeme, so operators typed by the user
 * (&, |, !, :) are plain text; Postgres's parser still splits a word like `example.com/foo` or
 * `don't` the way it split the indexed content. Null when nothing searchable is left.
 */
export function toTsQuery(text: string): string | null {
  const words = text
    // Control characters cannot be stored in text and never occur in indexed words.
    .replace(/\p{Cc}/gu, ' ')
    .split(/\s+/u)
    .filter(Boolean);
  if (!words.length) return null;
  return words
    .map((w, i) => {
      const quoted = `'${w.replace(/\\/g, '\\\\').replace(/'/g, "''")}'`;
      return i === words.length - 1 ? `${quoted}:*` : quoted;
    })
    .join(' & ');
}

/** The match predicate; it repeats the index expression exactly so the planner can use it. */
export function matchSql(text: string): SQL {
  const q = toTsQuery(text);
  if (q === null) return sql`false`;
  return sql`to_tsvector('simple', ${messages.content}) @@ to_tsquery('simple', ${q})`;
}

const hasSql: Record<SearchHas, SQL> = {
  LINK: sql`${messages.content} ~* 'https?://[^[:space:]]'`,
  FILE: sql`exists (select 1 from attachments a where a.message_id = ${messages.id})`,
  IMAGE: sql`exists (select 1 from attachments a where a.message_id = ${messages.id} and a.content_type like 'image/%')`,
  EMBED: sql`jsonb_typeof(${messages.embeds}) = 'array' and jsonb_array_length(${messages.embeds}) > 0`,
};

export function createPostgresSearch(db: DbOrTx): SearchEngine {
  return {
    kind: 'postgres',
    async index() {},
    async remove() {},
    async query(q: SearchQuery): Promise<SearchResult> {
      if (!q.channelIds.length || q.limit <= 0) return { ids: [], hasMore: false };
      // One array parameter however many channels the viewer can read.
      const channels = `{${q.channelIds.join(',')}}`;
      const rows = await db
        .select({ id: messages.id })
        .from(messages)
        .where(
          and(
            sql`${messages.channelId} = any(${channels}::uuid[])`,
            isNull(messages.deletedAt),
            q.text != null ? matchSql(q.text) : undefined,
            q.authorId ? eq(messages.authorId, q.authorId) : undefined,
            q.before ? lt(messages.createdAt, q.before) : undefined,
            q.after ? gt(messages.createdAt, q.after) : undefined,
            q.olderThan ? lt(messages.id, q.olderThan) : undefined,
            ...[...new Set(q.has ?? [])].map((h) => hasSql[h]),
          ),
        )
        .orderBy(desc(messages.id))
        .limit(q.limit + 1);
      return { ids: rows.slice(0, q.limit).map((r) => r.id), hasMore: rows.length > q.limit };
    },
  };
}
