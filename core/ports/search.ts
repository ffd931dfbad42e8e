/**
 * The search port: finds message ids for a query inside channels the caller has already decided
 * the viewer may read. Permissions, deleted-message filtering and loading the rows stay in
 * core/services/search.service.ts, so an engine only matches and orders.
 *
 * Implementations: Postgres full-text search (core/search/postgres.search.ts, the default, reads
 * the messages table itself) and, later, Typesense (when TYPESENSE_URL is set), which keeps its
 * own copy of each message and so needs `index` and `remove` called as messages change.
 */

/** The `has:` filters of SearchInput. */
export type SearchHas = 'LINK' | 'FILE' | 'IMAGE' | 'EMBED';
export const SEARCH_HAS: readonly SearchHas[] = ['LINK', 'FILE', 'IMAGE', 'EMBED'];

/** What an engine that keeps its own copy stores for one message. */
export interface SearchDocument {
  id: string;
  channelId: string;
  guildId: string | null;
  authorId: string;
  content: string;
  createdAt: Date;
  /** which `has:` filters this message satisfies */
  has: SearchHas[];
}

export interface SearchQuery {
  /** words to match; every word must match, the last one also as a prefix */
  text?: string | null;
  /** only messages in these channels (never empty: an empty scope is answered without asking) */
  channelIds: readonly string[];
  authorId?: string | null;
  /** every listed filter must hold */
  has?: readonly SearchHas[];
  /** createdAt strictly before / after */
  before?: Date | null;
  after?: Date | null;
  /** a message id: only older messages (the page after the one that ended there) */
  olderThan?: string | null;
  /** how many ids to return */
  limit: number;
}

export interface SearchResult {
  /** newest first */
  ids: string[];
  /** more matches exist past the last id */
  hasMore: boolean;
}

export interface SearchEngine {
  kind: 'postgres' | 'typesense';
  /** Adds or replaces a message's document (a no-op for engines reading the messages table). */
  index(message: SearchDocument): Promise<void>;
  /** Forgets a deleted message (a no-op for engines reading the messages table). */
  remove(id: string): Promise<void>;
  query(q: SearchQuery): Promise<SearchResult>;
}
