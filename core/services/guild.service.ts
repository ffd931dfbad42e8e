import { eq } from 'drizzle-orm';
import { channels, guilds, members, roles } from '../db/tables.ts';
import type { Deps, Viewer } from '../deps.ts';
import { badInput } from '../errors.ts';
import { transact } from '../events.ts';
import { newId } from '../ids.ts';
import { DEFAULT_EVERYONE } from '../permissions.ts';
import { writeAudit } from './audit.service.ts';

export type GuildRow = typeof guilds.$inferSelect;

export function validateName(raw: string, what: string, max = 100): string {
  const name = raw.trim();
  if (name.length < 1 || name.length > max) throw badInput(`${what} must be 1-${max} characters.`, 'name');
  return name;
}

/** Creates a guild with its @everyone role, the owner as first member and a #general channel. */
export async function createGuild(deps: Deps, viewer: Viewer, input: { name: string }): Promise<GuildRow> {
  const name = validateName(input.name, 'Guild name');
  const guildId = newId();
  const everyoneId = newId();
  const generalId = newId();
  return transact(deps, async (tx, log) => {
    const [g] = await tx.insert(guilds).values({ id: guildId, name, ownerId: viewer.userId }).returning();
    await tx.insert(roles).values({
      id: everyoneId,
      guildId,
      name: '@everyone',
      position: 0,
      permissions: DEFAULT_EVERYONE,
      isEveryone: true,
    });
    await tx.insert(members).values({ guildId, userId: viewer.userId });
    await tx.insert(channels).values({ id: generalId, guildId, type: 'TEXT', name: 'general', position: 0 });
    await writeAudit(tx, {
      guildId,
      actorId: viewer.userId,
      action: 'GUILD_CREATE',
      targetType: 'GUILD',
      targetId: guildId,
    });
    await log.append({ type: 'MEMBER_JOINED', guildId, payload: { userId: viewer.userId } });
    return g;
  });
}

export async function getGuild(deps: Deps, id: string): Promise<GuildRow | undefined> {
  const [g] = await deps.db.select().from(guilds).where(eq(guilds.id, id));
  return g;
}
