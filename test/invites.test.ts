import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import { sql } from 'drizzle-orm';
import { decodeAnyId } from '../schema/builder.ts';
import { createTestApp, fails, gql, ok, signUp, type TestApp, type TestUser } from './helpers.ts';

let app: TestApp;
before(async () => {
  app = await createTestApp();
});
after(() => app.destroy());

const raw = (id: string) => decodeAnyId(id).id;
async function rows<T = Record<string, unknown>>(q: ReturnType<typeof sql>): Promise<T[]> {
  return ((await app.deps.db.execute(q)) as unknown as { rows: T[] }).rows;
}
async function makeGuild(owner: TestUser) {
  const d = await ok(
    app,
    `mutation { createGuild(input: { name: "Club" }) { id channels { id } } }`,
    {},
    owner.token,
  );
  return { id: d.createGuild.id as string, general: d.createGuild.channels[0].id as string };
}

const CREATE = `mutation($i: CreateInviteInput!) { createInvite(input: $i) { code maxUses uses expiresAt guild { id name } inviter { id } channel { id } } }`;
const JOIN = `mutation($c: String!) { joinGuild(code: $c) { id name } }`;
const REVOKE = `mutation($c: String!) { revokeInvite(code: $c) }`;
const PREVIEW = `query($c: String!) { invite(code: $c) { code guildName memberCount inviter { id } expiresAt } }`;
const INVITES = `query($id: ID!) { guild(id: $id) { invites { code uses } } }`;

describe('invites', () => {
  it('creates an invite (unlimited, 7 days by default), previews it and joins with it', async () => {
    const owner = await signUp(app);
    const joiner = await signUp(app);
    const g = await makeGuild(owner);
    const t0 = Date.now();
    const d = await ok(app, CREATE, { i: { guildId: g.id } }, owner.token);
    const inv = d.createInvite;
    assert.equal(inv.maxUses, null);
    assert.equal(inv.uses, 0);
    assert.equal(inv.guild.id, g.id);
    assert.equal(inv.inviter.id, owner.id);
    const ttl = Date.parse(inv.expiresAt) - t0;
    assert.ok(Math.abs(ttl - 7 * 24 * 3600 * 1000) < 60_000, `ttl ${ttl}`);
    const p = await ok(app, PREVIEW, { c: inv.code });
    assert.deepEqual(p.invite, {
      code: inv.code,
      guildName: 'Club',
      memberCount: 1,
      inviter: { id: owner.id },
      expiresAt: inv.expiresAt,
    });
    const j = await ok(app, JOIN, { c: inv.code }, joiner.token);
    assert.equal(j.joinGuild.id, g.id);
    // Joining again answers the guild and does not use the invite.
    await ok(app, JOIN, { c: inv.code }, joiner.token);
    const list = await ok(app, INVITES, { id: g.id }, owner.token);
    assert.deepEqual(list.guild.invites, [{ code: inv.code, uses: 1 }]);
    const ev = await rows(
      sql`select payload from events where guild_id = ${raw(g.id)}::uuid and type = 'MEMBER_JOINED'`,
    );
    assert.equal(ev.length, 2);
    const mine = await ok(app, `{ viewer { guilds { id } } }`, {}, joiner.token);
    assert.deepEqual(mine.viewer.guilds, [{ id: g.id }]);
    await fails(app, 'UNAUTHENTICATED', JOIN, { c: inv.code });
  });

  it('validates createInvite and needs CREATE_INVITE', async () => {
    const owner = await signUp(app);
    const stranger = await signUp(app);
    const g = await makeGuild(owner);
    const other = await makeGuild(stranger);
    for (const i of [
      { guildId: g.id, maxUses: 0 },
      { guildId: g.id, maxUses: 10_001 },
      { guildId: g.id, expiresInSeconds: 0 },
      { guildId: g.id, expiresInSeconds: 31 * 24 * 3600 },
      { guildId: g.general },
      { guildId: g.id, channelId: g.id },
    ]) {
      await fails(app, 'BAD_USER_INPUT', CREATE, { i }, owner.token);
    }
    await fails(app, 'NOT_FOUND', CREATE, { i: { guildId: g.id } }, stranger.token);
    await fails(app, 'UNAUTHENTICATED', CREATE, { i: { guildId: g.id } });
    await fails(app, 'NOT_FOUND', CREATE, { i: { guildId: g.id, channelId: other.general } }, owner.token);
    const d = await ok(
      app,
      CREATE,
      { i: { guildId: g.id, channelId: g.general, maxUses: 5, expiresInSeconds: 60 } },
      owner.token,
    );
    assert.equal(d.createInvite.channel.id, g.general);
    assert.equal(d.createInvite.maxUses, 5);
    const n = await rows(sql`select 1 from invites where guild_id = ${raw(g.id)}::uuid`);
    assert.equal(n.length, 1);
    const audit = await rows(
      sql`select 1 from audit_log where guild_id = ${raw(g.id)}::uuid and action = 'INVITE_CREATE'`,
    );
    assert.equal(audit.length, 1);
  });

  it('refuses unknown, revoked, expired and used-up codes with NOT_FOUND', async () => {
    const owner = await signUp(app);
    const a = await signUp(app);
    const b = await signUp(app);
    const g = await makeGuild(owner);
    await fails(app, 'NOT_FOUND', JOIN, { c: 'nope' }, a.token);
    await fails(app, 'NOT_FOUND', PREVIEW, { c: 'nope' });
    const once = (await ok(app, CREATE, { i: { guildId: g.id, maxUses: 1 } }, owner.token)).createInvite.code;
    await ok(app, JOIN, { c: once }, a.token);
    await fails(app, 'NOT_FOUND', JOIN, { c: once }, b.token);
    await fails(app, 'NOT_FOUND', PREVIEW, { c: once });
    const revoked = (await ok(app, CREATE, { i: { guildId: g.id } }, owner.token)).createInvite.code;
    assert.equal((await ok(app, REVOKE, { c: revoked }, owner.token)).revokeInvite, true);
    await fails(app, 'NOT_FOUND', JOIN, { c: revoked }, b.token);
    const expiring = (await ok(app, CREATE, { i: { guildId: g.id, expiresInSeconds: 1 } }, owner.token))
      .createInvite.code;
    await app.deps.db.execute(
      sql`update invites set expires_at = now() - interval '1 second' where code = ${expiring}`,
    );
    await fails(app, 'NOT_FOUND', JOIN, { c: expiring }, b.token);
    const m = await rows(
      sql`select 1 from members where guild_id = ${raw(g.id)}::uuid and user_id = ${raw(b.id)}::uuid`,
    );
    assert.equal(m.length, 0);
    const list = await ok(app, INVITES, { id: g.id }, owner.token);
    assert.deepEqual(list.guild.invites, []);
  });

  it('refuses banned users with FORBIDDEN', async () => {
    const owner = await signUp(app);
    const banned = await signUp(app);
    const g = await makeGuild(owner);
    const code = (await ok(app, CREATE, { i: { guildId: g.id } }, owner.token)).createInvite.code;
    await app.deps.db.execute(
      sql`insert into bans (guild_id, user_id, actor_id) values (${raw(g.id)}::uuid, ${raw(banned.id)}::uuid, ${raw(owner.id)}::uuid)`,
    );
    await fails(app, 'FORBIDDEN', JOIN, { c: code }, banned.token);
    const inv = await rows<{ uses: number }>(sql`select uses from invites where code = ${code}`);
    assert.equal(inv[0].uses, 0);
  });

  it('never lets concurrent joins exceed maxUses', async () => {
    const owner = await signUp(app);
    const g = await makeGuild(owner);
    const code = (await ok(app, CREATE, { i: { guildId: g.id, maxUses: 3 } }, owner.token)).createInvite.code;
    const users = await Promise.all(Array.from({ length: 8 }, () => signUp(app)));
    const results = await Promise.all(users.map((u) => gql(app, JOIN, { c: code }, { token: u.token })));
    const joined = results.filter((r) => !r.errors);
    const refused = results.filter((r) => r.errors?.[0].extensions?.code === 'NOT_FOUND');
    assert.equal(joined.length, 3);
    assert.equal(refused.length, 5);
    const inv = await rows<{ uses: number }>(sql`select uses from invites where code = ${code}`);
    assert.equal(inv[0].uses, 3);
    const m = await rows(sql`select 1 from members where guild_id = ${raw(g.id)}::uuid`);
    assert.equal(m.length, 4);
  });

  it('revokes: the inviter or MANAGE_GUILD; lists need MANAGE_GUILD', async () => {
    const owner = await signUp(app);
    const member = await signUp(app);
    const other = await signUp(app);
    const stranger = await signUp(app);
    const g = await makeGuild(owner);
    const code = (await ok(app, CREATE, { i: { guildId: g.id } }, owner.token)).createInvite.code;
    await ok(app, JOIN, { c: code }, member.token);
    await ok(app, JOIN, { c: code }, other.token);
    const mine = (await ok(app, CREATE, { i: { guildId: g.id } }, member.token)).createInvite.code;
    await fails(app, 'FORBIDDEN', REVOKE, { c: mine }, other.token);
    await fails(app, 'NOT_FOUND', REVOKE, { c: mine }, stranger.token);
    await fails(app, 'NOT_FOUND', REVOKE, { c: 'nope' }, owner.token);
    await fails(app, 'FORBIDDEN', INVITES, { id: g.id }, member.token);
    assert.equal((await ok(app, REVOKE, { c: mine }, member.token)).revokeInvite, true);
    assert.equal((await ok(app, REVOKE, { c: code }, owner.token)).revokeInvite, true);
    const audit = await rows(
      sql`select 1 from audit_log where guild_id = ${raw(g.id)}::uuid and action = 'INVITE_DELETE'`,
    );
    assert.equal(audit.length, 2);
  });
});
