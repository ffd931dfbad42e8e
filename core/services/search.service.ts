/**
 * Message search. This service owns the rules (input, which channels the viewer may search,
 * deleted messages, paging); the engine behind deps.search (core/ports/search.ts) only matches.
 *
 * The viewer's readable channels are computed per search, not cached, so a kick, a ban or a new
 * overwrite applies to the very next search. The cost is a fixed number of statements: one for
 * the viewer's guilds, DMs and threads, one (access.service) for their permissions in every guild
 * channel, one search, one load — plus one per thread that carries overwrites of its own.
 */
import { sql } from 'drizzle-orm';
import type { Deps, Viewer } from '../deps.ts';
import { badInput, forbidden, notFound } from '../errors.ts';
import { has, Permission } from '../permissions.ts';
import type { SearchDocument, SearchEngine, SearchHas } from '../ports/search.ts';
import { createPostgresSearch } from '../search/postgres.search.ts';
import {
  loadChannelAccess,
  loadGuildsChannelsAccess,
  requireChannel,
  requireGuild,
} from './access.service.ts';
import type { MessageRow } from './message.service.ts';
import { type AttachmentRow, messagesByIds } from './message-history.service.ts';

export const DEFAULT_SEARCH_PAGE = 25;
export const MAX_SEARCH_PAGE = 100;
export const MAX_SEARCH_TEXT = 200;

const READ = Permission.VIEW_CHANNEL | Permission.READ_HISTORY;

export interface SearchInput {
  text?: string | null;
  guildId?: string | null;
  channelId?: string | null;
  authorId?: string | null;
  has?: readonly SearchHas[] | null;
  before?: Date | null;
  after?: Date | null;
}

export interface SearchPage {
  /** page size; default 25, above 100 is read as 100 */
  first?: number | null;
  /** the id of the last message of the previous page */
  after?: string | null;
}

export interface SearchResultPage {
  /** newest first */
  rows: MessageRow[];
  hasNextPage: boolean;
}

/** The engine the app configured, or Postgres FTS over the same database (workers, scripts). */
export function searchEngine(deps: Deps): SearchEngine {
  return deps.search ?? createPostgresSearch(deps.db);
}

export async function searchMessages(
  deps: Deps,
  viewer: Viewer,
  input: SearchInput,
  page: SearchPage = {},
): Promise<SearchResultPage> {
  const text = validateText(input.text);
  const hasFilters = [...new Set(input.has ?? [])];
  if (
    text === null &&
    !input.guildId &&
    !input.channelId &&
    !input.authorId &&
    !hasFilters.length &&
    !input.before &&
    !input.after
  )
    throw badInput('Give at least one of text, guildId, channelId, authorId, has, before or after.');
  const limit = pageSize(page.first);
  const channelIds = await readableChannels(deps, viewer, input.guildId ?? null, input.channelId ?? null);
  if (!limit || !channelIds.length) return { rows: [], hasNextPage: false };
  const found = await searchEngine(deps).query({
    text,
    channelIds,
    authorId: input.authorId ?? null,
    has: hasFilters,
    before: input.before ?? null,
    after: input.after ?? null,
    olderThan: page.after ?? null,
    limit,
  });
  // An engine with its own copy may lag behind a delete or a permission change: the rows decide.
  const scope = new Set(channelIds);
  const byId = new Map((await messagesByIds(deps.db, found.ids)).map((r) => [r.id, r]));
  const rows = found.ids.flatMap((id) => {
    const r = byId.get(id);
    return r && scope.has(r.channelId) ? [r] : [];
  });
  return { rows, hasNextPage: found.hasMore };
}

function validateText(raw: string | null | undefined): string | null {
  if (raw === null || raw === undefined) return null;
  const text = raw.trim();
  if (!text || text.length > MAX_SEARCH_TEXT)
    throw badInput(`text must be 1-${MAX_SEARCH_TEXT} characters.`, 'text');
  return text;
}

function pageSize(n: number | null | undefined): number {
  if (n === null || n === undefined) return DEFAULT_SEARCH_PAGE;
  if (!Number.isInteger(n) || n < 0) throw badInput('first must be zero or more.', 'first');
  return Math.min(n, MAX_SEARCH_PAGE);
}

/**
 * Ids of the channels the viewer may search now (VIEW_CHANNEL and READ_HISTORY), narrowed to one
 * guild or channel when asked. A guild or channel the viewer cannot see is NOT_FOUND; a visible
 * channel without READ_HISTORY is FORBIDDEN, as its history is.
 */
async function readableChannels(
  deps: Deps,
  viewer: Viewer,
  guildId: string | null,
  channelId: string | null,
): Promise<string[]> {
  const now = deps.now();
  if (channelId) {
    const a = await requireChannel(deps.db, viewer.userId, channelId, 0n, now);
    if (guildId && a.channel.guildId !== guildId) {
      // Filters combine: a channel outside the guild matches nothing, once the guild is visible.
      await requireGuild(deps.db, viewer.userId, guildId, 0n, now);
      return [];
    }
    if (!has(a.permissions, READ)) throw forbidden('You cannot read the history of this channel.');
    return [channelId];
  }
  return guildChannels(deps, viewer, guildId, now);
}

/** Every readable channel of the viewer's guilds (or of one guild), their threads and, unscoped, their DMs. */
async function guildChannels(deps: Deps, viewer: Viewer, onlyGuild: string | null, now: Date) {
  type Row = { guilds: string[]; dms: string[]; threads: { id: string; p: string; o: boolean }[] };
  const inGuilds = onlyGuild
    ? sql`select ${onlyGuild}::uuid as guild_id`
    : sql`select m.guild_id from members m where m.user_id = ${viewer.userId}`;
  const dms = onlyGuild
    ? sql`'[]'::json`
    : sql`(select coalesce(json_agg(cr.channel_id), '[]'::json)
          from channel_recipients cr join channels c on c.id = cr.channel_id
          where cr.user_id = ${viewer.userId} and c.guild_id is null)`;
  const r = (
    (await deps.db.execute(sql`
      with g as (${inGuilds})
      select
        (select coalesce(json_agg(g.guild_id), '[]'::json) from g) as guilds,
        ${dms} as dms,
        (select coalesce(json_agg(json_build_object('id', t.id, 'p', t.parent_id,
            'o', exists (select 1 from permission_overwrites o where o.channel_id = t.id))), '[]'::json)
          from channels t where t.type = 'THREAD' and t.guild_id in (select guild_id from g)) as threads`)) as unknown as {
      rows: Row[];
    }
  ).rows[0];
  const access = await loadGuildsChannelsAccess(deps.db, viewer.userId, r.guilds, now);
  if (onlyGuild && !access.get(onlyGuild)?.guild?.input.isMember) throw notFound('Guild');
  const perms = new Map<string, bigint>();
  for (const g of access.values()) for (const [id, p] of g.permissions) perms.set(id, p);
  const out = [...perms].filter(([, p]) => has(p, READ)).map(([id]) => id);
  out.push(...r.dms);
  // A thread with no overwrites of its own has exactly its parent's permissions (an empty level
  // changes nothing in computeChannelPermissions); the rare one with its own asks access.service.
  const own = r.threads.filter((t) => t.o);
  for (const t of r.threads) if (!t.o && has(perms.get(t.p) ?? 0n, READ)) out.push(t.id);
  const checked = await Promise.all(own.map((t) => loadChannelAccess(deps.db, viewer.userId, t.id, now)));
  for (const a of checked) if (a && has(a.permissions, READ)) out.push(a.channel.id);
  return out;
}

/** The document an engine with its own copy stores (see SearchEngine.index). */
export function searchDocument(row: MessageRow, files: readonly AttachmentRow[]): SearchDocument {
  const hasList: SearchHas[] = [];
  if (/https?:\/\/\S/i.test(row.content)) hasList.push('LINK');
  if (files.length) hasList.push('FILE');
  if (files.some((f) => f.contentType.startsWith('image/'))) hasList.push('IMAGE');
  if (Array.isArray(row.embeds) && row.embeds.length) hasList.push('EMBED');
  return {
    id: row.id,
    channelId: row.channelId,
    guildId: row.guildId,
    authorId: row.authorId,
    content: row.content,
    createdAt: row.createdAt,
    has: hasList,
  };
}
