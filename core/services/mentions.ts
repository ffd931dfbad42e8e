/**
 * Mentions in message content. Syntax is plain text, as people type it:
 * - `@username` mentions a user who is a member of the channel's guild (or a recipient of the DM);
 * - `@rolename` mentions a role of the guild whose name (case-insensitive, one word) matches, when
 *   the role is mentionable or the author holds MENTION_EVERYONE;
 * - `@everyone` / `@here` notify everyone only with MENTION_EVERYONE; without it they stay text.
 * Anything that matches nothing stays plain text: mentions never fail a send.
 */
import { sql } from 'drizzle-orm';
import type { DbOrTx } from '../db/client.ts';
import { has, Permission } from '../permissions.ts';
import type { ChannelAccess } from './access.service.ts';

export interface ParsedMentions {
  everyone: boolean;
  /** lower-cased names after `@`, without everyone/here, deduplicated */
  names: string[];
}

const MENTION_RE = /(^|[^\w@.])@([a-zA-Z0-9_.]{2,32})/g;
/** Bounds the lookup a message can cause. */
const MAX_NAMES = 50;

export function parseMentions(content: string): ParsedMentions {
  let everyone = false;
  const names = new Set<string>();
  if (!content.includes('@')) return { everyone, names: [] };
  for (const m of content.matchAll(MENTION_RE)) {
    // Sentence punctuation after a name ("thanks @bob.") is not part of it: usernames cannot end with a dot.
    const name = m[2].replace(/\.+$/, '').toLowerCase();
    if (name === 'everyone' || name === 'here') everyone = true;
    else if (name.length >= 2 && names.size < MAX_NAMES) names.add(name);
  }
  return { everyone, names: [...names] };
}

export interface ResolvedMentions {
  everyone: boolean;
  userIds: string[];
  roleIds: string[];
}

export const NO_MENTIONS: ResolvedMentions = { everyone: false, userIds: [], roleIds: [] };

/** SQL select-list items that resolve parsed names; merged into the caller's one statement. */
export function mentionLookupSql(access: ChannelAccess, names: string[]) {
  if (!names.length) return [];
  const list = sql.join(
    names.map((n) => sql`${n}`),
    sql`, `,
  );
  const guildId = access.channel.guildId;
  if (!guildId) {
    const rcp = access.recipientIds.length
      ? sql.join(
          access.recipientIds.map((id) => sql`${id}::uuid`),
          sql`, `,
        )
      : sql`null::uuid`;
    return [
      sql`(select coalesce(json_agg(u.id), '[]'::json) from users u
            where u.id in (${rcp}) and lower(u.username) in (${list})) as mention_users`,
    ];
  }
  return [
    sql`(select coalesce(json_agg(u.id), '[]'::json) from users u
          join members m on m.user_id = u.id and m.guild_id = ${guildId}::uuid
          where lower(u.username) in (${list})) as mention_users`,
    sql`(select coalesce(json_agg(json_build_object('id', r.id, 'm', r.mentionable)), '[]'::json) from roles r
          where r.guild_id = ${guildId}::uuid and not r.is_everyone and lower(r.name) in (${list})) as mention_roles`,
  ];
}

/** Applies the permission rules to what the lookup found. */
export function resolveMentions(
  parsed: ParsedMentions,
  permissions: bigint,
  row: { mention_users?: string[] | null; mention_roles?: { id: string; m: boolean }[] | null },
): ResolvedMentions {
  const mentionAll = has(permissions, Permission.MENTION_EVERYONE);
  return {
    everyone: parsed.everyone && mentionAll,
    userIds: [...new Set(row.mention_users ?? [])],
    roleIds: (row.mention_roles ?? []).filter((r) => r.m || mentionAll).map((r) => r.id),
  };
}

/** Resolves mentions on their own (edits); sends fold the lookup into their preflight statement. */
export async function lookupMentions(
  db: DbOrTx,
  access: ChannelAccess,
  content: string,
): Promise<ResolvedMentions> {
  const parsed = parseMentions(content);
  const items = mentionLookupSql(access, parsed.names);
  if (!items.length) return resolveMentions(parsed, access.permissions, {});
  const res = (await db.execute(sql`select ${sql.join(items, sql`, `)}`)) as unknown as {
    rows: { mention_users?: string[]; mention_roles?: { id: string; m: boolean }[] }[];
  };
  return resolveMentions(parsed, access.permissions, res.rows[0] ?? {});
}
