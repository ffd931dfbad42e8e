/**
 * Setup for the message tests: guilds through the API; members, roles, overwrites and blocks
 * written straight to the tables, so these tests do not depend on the admin features' state.
 */
import { randomBytes } from 'node:crypto';
import type { App } from '../api/app.ts';
import { memberRoles, members, permissionOverwrites, relationships, roles } from '../core/db/tables.ts';
import { newId } from '../core/ids.ts';
import { accessCacheOf } from '../core/services/access-cache.ts';
import { decodeAnyId, encodeId } from '../schema/builder.ts';
import { ok, signUp, type TestUser } from './helpers.ts';

export const uuidOf = (globalId: string) => decodeAnyId(globalId).id;

export interface GuildFixture {
  owner: TestUser;
  guildId: string;
  /** global id of #general */
  channelId: string;
}

export async function setupGuild(app: App): Promise<GuildFixture> {
  const owner = await signUp(app);
  const d = await ok(
    app,
    `mutation { createGuild(input: { name: "G ${randomBytes(2).toString('hex')}" }) { id channels { id } } }`,
    {},
    owner.token,
  );
  return { owner, guildId: d.createGuild.id, channelId: d.createGuild.channels[0].id };
}

/** Fixtures write around the event log, so nothing tells sendMessage's access cache: they drop it. */
export async function addMember(app: App, guildId: string, user: TestUser): Promise<void> {
  await app.deps.db.insert(members).values({ guildId: uuidOf(guildId), userId: uuidOf(user.id) });
  accessCacheOf(app.deps.database).clear();
}

/** A role (returns its uuid), optionally given to users. */
export async function addRole(
  app: App,
  guildId: string,
  opts: { name: string; permissions?: bigint; mentionable?: boolean; users?: TestUser[] },
): Promise<string> {
  const id = newId();
  const gid = uuidOf(guildId);
  await app.deps.db.insert(roles).values({
    id,
    guildId: gid,
    name: opts.name,
    permissions: opts.permissions ?? 0n,
    mentionable: opts.mentionable ?? false,
    position: 1,
  });
  for (const u of opts.users ?? []) {
    await app.deps.db.insert(memberRoles).values({ guildId: gid, userId: uuidOf(u.id), roleId: id });
  }
  accessCacheOf(app.deps.database).clear();
  return id;
}

export async function overwrite(
  app: App,
  channelId: string,
  target: { roleId?: string; user?: TestUser },
  allow: bigint,
  deny: bigint,
): Promise<void> {
  await app.deps.db.insert(permissionOverwrites).values({
    channelId: uuidOf(channelId),
    targetType: target.roleId ? 'ROLE' : 'MEMBER',
    targetId: target.roleId ?? uuidOf(target.user!.id),
    allow,
    deny,
  });
  accessCacheOf(app.deps.database).clear();
}

export async function block(app: App, blocker: TestUser, blocked: TestUser): Promise<void> {
  await app.deps.db
    .insert(relationships)
    .values({ userId: uuidOf(blocker.id), targetId: uuidOf(blocked.id), kind: 'BLOCKED' });
}

export async function createChannel(
  app: App,
  owner: TestUser,
  guildId: string,
  opts: { name?: string; type?: string; slowmodeSeconds?: number } = {},
): Promise<string> {
  const d = await ok(
    app,
    `mutation($i: CreateChannelInput!) { createChannel(input: $i) { id } }`,
    {
      i: {
        guildId,
        name: opts.name ?? `c${randomBytes(2).toString('hex')}`,
        type: opts.type ?? 'TEXT',
        slowmodeSeconds: opts.slowmodeSeconds ?? 0,
      },
    },
    owner.token,
  );
  return d.createChannel.id;
}

export const SEND = `mutation($i: SendMessageInput!) {
  sendMessage(input: $i) { id content nonce createdAt author { id } channel { id }
    replyTo { id } forwardedFrom { id } mentions { id username } mentionEveryone mentionRoleIds attachments { id } embeds { title } } }`;

export async function send(
  app: App,
  user: TestUser,
  channelId: string,
  content: string,
  extra: Record<string, unknown> = {},
): Promise<any> {
  const d = await ok(app, SEND, { i: { channelId, content, ...extra } }, user.token);
  return d.sendMessage;
}

export const messageId = (uuid: string) => encodeId('Message', uuid);
