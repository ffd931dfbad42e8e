import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import { and, eq, inArray } from 'drizzle-orm';
import {
  auditLog,
  channels,
  memberRoles,
  members,
  messages,
  permissionOverwrites,
  reports,
  roles,
} from '../core/db/tables.ts';
import { newId } from '../core/ids.ts';
import { Permission, permissionsFromNames } from '../core/permissions.ts';
import { decodeAnyId, encodeId } from '../schema/builder.ts';
import { createTestApp, fails, gql, ok, signUp, type TestApp, type TestUser } from './helpers.ts';

let app: TestApp;
/** The first account registered: the instance admin. */
let admin: TestUser;
let owner: TestUser;
before(async () => {
  app = await createTestApp();
  admin = await signUp(app);
  owner = await signUp(app);
});
after(() => app.destroy());

const raw = (globalId: string) => decodeAnyId(globalId).id;
const gid = encodeId;

async function makeGuild() {
  const d = await ok(
    app,
    `mutation { createGuild(input: { name: "R" }) { id channels { id } } }`,
    {},
    owner.token,
  );
  return {
    id: d.createGuild.id as string,
    raw: raw(d.createGuild.id),
    channel: raw(d.createGuild.channels[0].id),
  };
}
async function join(guildRaw: string, ...us: TestUser[]) {
  for (const u of us) await app.deps.db.insert(members).values({ guildId: guildRaw, userId: raw(u.id) });
}
async function giveRole(guildRaw: string, u: TestUser, perms: string[]) {
  const id = newId();
  await app.deps.db
    .insert(roles)
    .values({ id, guildId: guildRaw, name: 'mod', position: 1, permissions: permissionsFromNames(perms) });
  await app.deps.db.insert(memberRoles).values({ guildId: guildRaw, userId: raw(u.id), roleId: id });
}
async function postMessage(channelRaw: string, guildRaw: string | null, u: TestUser, content: string) {
  const id = newId();
  await app.deps.db
    .insert(messages)
    .values({ id, channelId: channelRaw, guildId: guildRaw, authorId: raw(u.id), content });
  return { raw: id, id: gid('Message', id) };
}

const REPORT = `mutation($m: ID!, $r: String!) { reportMessage(messageId: $m, reason: $r) {
  id status reason contentSnapshot createdAt resolvedAt resolution resolvedBy { id } reporter { id } author { id }
  message { id content } } }`;
const RESOLVE = `mutation($id: ID!, $r: String!) { resolveReport(id: $id, resolution: $r) {
  id status resolution resolvedAt resolvedBy { id } } }`;
const LIST = `query($s: ReportStatus, $g: ID, $f: Int, $a: String) { reports(status: $s, guildId: $g, first: $f, after: $a) {
  edges { cursor node { id status reason contentSnapshot message { id } } } pageInfo { hasNextPage endCursor } } }`;

describe('reportMessage', () => {
  it('files a report with a content snapshot; one open report per reporter and message', async () => {
    const g = await makeGuild();
    const [author, reporter] = [await signUp(app), await signUp(app)];
    await join(g.raw, author, reporter);
    const m = await postMessage(g.channel, g.raw, author, 'something nasty');
    const r = (await ok(app, REPORT, { m: m.id, r: ' harassment ' }, reporter.token)).reportMessage;
    assert.equal(r.status, 'OPEN');
    assert.equal(r.reason, 'harassment');
    assert.equal(r.contentSnapshot, 'something nasty');
    assert.equal(r.reporter.id, reporter.id);
    assert.equal(r.author.id, author.id);
    assert.equal(r.message.id, m.id);
    assert.equal(r.resolvedAt, null);
    await fails(app, 'CONFLICT', REPORT, { m: m.id, r: 'again' }, reporter.token);
    // Someone else may report the same message; after resolution the first reporter may again.
    await ok(app, REPORT, { m: m.id, r: 'me too' }, owner.token);
    await ok(app, RESOLVE, { id: r.id, r: 'warned' }, owner.token);
    await ok(app, REPORT, { m: m.id, r: 'still at it' }, reporter.token);
    const rows = await app.deps.db.select().from(reports).where(eq(reports.messageId, m.raw));
    assert.equal(rows.length, 3);
  });

  it('works in DMs the reporter is part of', async () => {
    const [a, b] = [await signUp(app), await signUp(app)];
    const { channelRecipients } = await import('../core/db/tables.ts');
    const dm = newId();
    await app.deps.db.insert(channels).values({ id: dm, type: 'DM' });
    await app.deps.db.insert(channelRecipients).values([
      { channelId: dm, userId: raw(a.id) },
      { channelId: dm, userId: raw(b.id) },
    ]);
    const m = await postMessage(dm, null, a, 'dm spam');
    const r = (await ok(app, REPORT, { m: m.id, r: 'spam' }, b.token)).reportMessage;
    assert.equal(r.contentSnapshot, 'dm spam');
    const stranger = await signUp(app);
    await fails(app, 'NOT_FOUND', REPORT, { m: m.id, r: 'spam' }, stranger.token);
    // A DM report has no guild: only the instance admin sees it.
    const list = await ok(app, LIST, {}, admin.token);
    assert.ok(list.reports.edges.some((e: any) => e.node.id === r.id));
  });

  it('refuses with the right code and writes nothing', async () => {
    const g = await makeGuild();
    const [author, member, hidden, stranger] = await Promise.all([1, 2, 3, 4].map(() => signUp(app)));
    await join(g.raw, author, member, hidden);
    await app.deps.db.insert(permissionOverwrites).values({
      channelId: g.channel,
      targetType: 'MEMBER',
      targetId: raw(hidden.id),
      deny: Permission.VIEW_CHANNEL,
    });
    const m = await postMessage(g.channel, g.raw, author, 'hi');
    const deleted = await postMessage(g.channel, g.raw, author, 'gone');
    await app.deps.db
      .update(messages)
      .set({ deletedAt: new Date(), content: '' })
      .where(eq(messages.id, deleted.raw));
    await fails(app, 'UNAUTHENTICATED', REPORT, { m: m.id, r: 'x' });
    await fails(app, 'NOT_FOUND', REPORT, { m: m.id, r: 'x' }, stranger.token);
    await fails(app, 'NOT_FOUND', REPORT, { m: m.id, r: 'x' }, hidden.token);
    await fails(app, 'NOT_FOUND', REPORT, { m: deleted.id, r: 'x' }, member.token);
    await fails(app, 'NOT_FOUND', REPORT, { m: gid('Message', newId()), r: 'x' }, member.token);
    await fails(app, 'BAD_USER_INPUT', REPORT, { m: g.id, r: 'x' }, member.token);
    await fails(app, 'BAD_USER_INPUT', REPORT, { m: m.id, r: '   ' }, member.token);
    await fails(app, 'BAD_USER_INPUT', REPORT, { m: m.id, r: 'x'.repeat(1001) }, member.token);
    await fails(app, 'BAD_USER_INPUT', REPORT, { m: m.id, r: 'my own' }, author.token);
    assert.equal((await app.deps.db.select().from(reports).where(eq(reports.guildId, g.raw))).length, 0);
    await ok(app, REPORT, { m: m.id, r: 'x'.repeat(1000) }, member.token);
  });
});

describe('reports queue and resolveReport', () => {
  it('lists for the admin (all) and guild moderators (their guild), newest first, paged', async () => {
    const g = await makeGuild();
    const other = await makeGuild();
    const [author, mod, plain, stranger] = await Promise.all([1, 2, 3, 4].map(() => signUp(app)));
    await join(g.raw, author, mod, plain);
    await join(other.raw, author, plain);
    await giveRole(g.raw, mod, ['MANAGE_MESSAGES']);
    const ids: string[] = [];
    for (const c of ['one', 'two', 'three']) {
      const m = await postMessage(g.channel, g.raw, author, c);
      ids.push((await ok(app, REPORT, { m: m.id, r: c }, plain.token)).reportMessage.id);
    }
    const elsewhere = await postMessage(other.channel, other.raw, author, 'elsewhere');
    const otherReport = (await ok(app, REPORT, { m: elsewhere.id, r: 'x' }, plain.token)).reportMessage.id;

    const p1 = (await ok(app, LIST, { g: g.id, f: 2 }, mod.token)).reports;
    assert.deepEqual(
      p1.edges.map((e: any) => e.node.id),
      [ids[2], ids[1]],
    );
    assert.equal(p1.pageInfo.hasNextPage, true);
    const p2 = (await ok(app, LIST, { g: g.id, f: 2, a: p1.pageInfo.endCursor }, mod.token)).reports;
    assert.deepEqual(
      p2.edges.map((e: any) => e.node.id),
      [ids[0]],
    );
    const all = (await ok(app, LIST, { f: 100 }, admin.token)).reports.edges.map((e: any) => e.node.id);
    assert.ok(all.includes(otherReport) && all.includes(ids[0]));
    // The moderator sees the live message; the admin, outside the guild, only its snapshot.
    assert.equal(p1.edges[0].node.message.id.length > 0, true);
    const adminInGuild = (await ok(app, LIST, { g: other.id }, admin.token)).reports.edges;
    assert.equal(adminInGuild[0].node.message, null);
    assert.equal(adminInGuild[0].node.contentSnapshot, 'elsewhere');
    assert.deepEqual(
      adminInGuild.map((e: any) => e.node.id),
      [otherReport],
    );

    await fails(app, 'UNAUTHENTICATED', LIST, {});
    await fails(app, 'FORBIDDEN', LIST, {}, mod.token);
    await fails(app, 'FORBIDDEN', LIST, { g: g.id }, plain.token);
    await fails(app, 'NOT_FOUND', LIST, { g: g.id }, stranger.token);
    await fails(app, 'NOT_FOUND', LIST, { g: other.id }, mod.token);
    await fails(app, 'BAD_USER_INPUT', LIST, { g: g.id, a: 'nope' }, mod.token);
    await fails(app, 'BAD_USER_INPUT', LIST, { g: ids[0] }, mod.token);

    // resolve: moderators of the guild and the admin; others never see the report.
    await fails(app, 'UNAUTHENTICATED', RESOLVE, { id: ids[0], r: 'ok' });
    await fails(app, 'NOT_FOUND', RESOLVE, { id: ids[0], r: 'ok' }, plain.token);
    await fails(app, 'NOT_FOUND', RESOLVE, { id: otherReport, r: 'ok' }, mod.token);
    await fails(app, 'NOT_FOUND', RESOLVE, { id: gid('Report', newId()), r: 'ok' }, mod.token);
    await fails(app, 'BAD_USER_INPUT', RESOLVE, { id: ids[0], r: '' }, mod.token);
    await fails(app, 'BAD_USER_INPUT', RESOLVE, { id: g.id, r: 'ok' }, mod.token);
    const [still] = await app.deps.db
      .select()
      .from(reports)
      .where(eq(reports.id, raw(ids[0])));
    assert.equal(still.status, 'OPEN');

    const done = (await ok(app, RESOLVE, { id: ids[0], r: 'deleted the spam' }, mod.token)).resolveReport;
    assert.equal(done.status, 'RESOLVED');
    assert.equal(done.resolution, 'deleted the spam');
    assert.equal(done.resolvedBy.id, mod.id);
    assert.ok(done.resolvedAt);
    await fails(app, 'CONFLICT', RESOLVE, { id: ids[0], r: 'again' }, mod.token);
    const audit = await app.deps.db
      .select()
      .from(auditLog)
      .where(and(eq(auditLog.guildId, g.raw), eq(auditLog.action, 'REPORT_RESOLVE')));
    assert.equal(audit.length, 1);
    assert.equal(audit[0].actorId, raw(mod.id));
    await ok(app, RESOLVE, { id: otherReport, r: 'fine' }, admin.token);

    const open = (await ok(app, LIST, { g: g.id, s: 'OPEN' }, mod.token)).reports.edges;
    assert.deepEqual(
      open.map((e: any) => e.node.id),
      [ids[2], ids[1]],
    );
    const resolved = (await ok(app, LIST, { g: g.id, s: 'RESOLVED' }, mod.token)).reports.edges;
    assert.deepEqual(
      resolved.map((e: any) => e.node.id),
      [ids[0]],
    );
  });

  it('keeps the snapshot when the message is deleted; message becomes null', async () => {
    const g = await makeGuild();
    const [author, reporter] = [await signUp(app), await signUp(app)];
    await join(g.raw, author, reporter);
    const m = await postMessage(g.channel, g.raw, author, 'evidence');
    const r = (await ok(app, REPORT, { m: m.id, r: 'bad' }, reporter.token)).reportMessage;
    await app.deps.db
      .update(messages)
      .set({ deletedAt: new Date(), content: '' })
      .where(eq(messages.id, m.raw));
    const [e] = (await ok(app, LIST, { g: g.id }, owner.token)).reports.edges;
    assert.equal(e.node.id, r.id);
    assert.equal(e.node.message, null);
    assert.equal(e.node.contentSnapshot, 'evidence');
  });

  it('a reported message does not stop its channel or guild from being deleted; the report stays for the admin, its snapshot kept', async () => {
    const g = await makeGuild();
    const [author, reporter] = [await signUp(app), await signUp(app)];
    await join(g.raw, author, reporter);
    const second = await ok(
      app,
      `mutation($g: ID!) { createChannel(input: { guildId: $g, name: "second", type: TEXT }) { id } }`,
      { g: g.id },
      owner.token,
    );
    const inChannel = await postMessage(g.channel, g.raw, author, 'in the channel');
    const inSecond = await postMessage(raw(second.createChannel.id), g.raw, author, 'in the guild');
    const r1 = (await ok(app, REPORT, { m: inChannel.id, r: 'bad' }, reporter.token)).reportMessage;
    const r2 = (await ok(app, REPORT, { m: inSecond.id, r: 'bad' }, reporter.token)).reportMessage;
    // Both failed with INTERNAL_SERVER_ERROR (the reports' foreign key on the message) before.
    await ok(
      app,
      `mutation($id: ID!) { deleteChannel(id: $id) }`,
      { id: gid('Channel', g.channel) },
      owner.token,
    );
    await ok(app, `mutation($id: ID!) { deleteGuild(id: $id) }`, { id: g.id }, owner.token);
    const left = await app.deps.db
      .select({ id: messages.id })
      .from(messages)
      .where(eq(messages.guildId, g.raw));
    assert.deepEqual(left, []);
    const list = (await ok(app, LIST, {}, admin.token)).reports.edges.map((e: any) => e.node);
    for (const [r, text] of [
      [r1, 'in the channel'],
      [r2, 'in the guild'],
    ] as const) {
      const n = list.find((x: any) => x.id === r.id);
      assert.ok(n, 'the admin still has the report');
      assert.equal(n.contentSnapshot, text);
      assert.equal(n.message, null);
    }
  });

  it('the admin resolves a report whose guild was deleted since (its audit row has no guild to go to)', async () => {
    const g = await makeGuild();
    const [author, reporter] = [await signUp(app), await signUp(app)];
    await join(g.raw, author, reporter);
    const m = await postMessage(g.channel, g.raw, author, 'spam');
    const r = (await ok(app, REPORT, { m: m.id, r: 'bad' }, reporter.token)).reportMessage;
    await ok(app, `mutation($id: ID!) { deleteGuild(id: $id) }`, { id: g.id }, owner.token);
    // INTERNAL_SERVER_ERROR before (the audit row's foreign key on the guild): open for good.
    const done = (await ok(app, RESOLVE, { id: r.id, r: 'guild gone' }, admin.token)).resolveReport;
    assert.equal(done.status, 'RESOLVED');
    assert.equal(done.resolution, 'guild gone');
  });

  it('lists a page in a fixed number of statements, however many reports it holds', async () => {
    const g = await makeGuild();
    const [author, reporter] = [await signUp(app), await signUp(app)];
    await join(g.raw, author, reporter);
    const file = async (n: number) => {
      for (let i = 0; i < n; i++) {
        const m = await postMessage(g.channel, g.raw, author, `m${i}`);
        await ok(app, REPORT, { m: m.id, r: 'x' }, reporter.token);
      }
    };
    const q = `query($g: ID!) { reports(guildId: $g, first: 100) { edges { node { id reporter { id } author { id }
      resolvedBy { id } message { id content } } } } }`;
    // The least of a few runs: the session check is cached and sometimes costs one statement.
    const cost = async () => {
      const runs: number[] = [];
      for (let i = 0; i < 3; i++) {
        const before = app.deps.database.queryCount;
        await ok(app, q, { g: g.id }, owner.token);
        runs.push(app.deps.database.queryCount - before);
      }
      return Math.min(...runs);
    };
    await file(2);
    const small = await cost();
    await file(10);
    assert.equal(await cost(), small);
  });

  it('shows a guild moderator only the reports of channels where they have VIEW_CHANNEL and MANAGE_MESSAGES', async () => {
    const g = await makeGuild();
    const [author, mod] = [await signUp(app), await signUp(app)];
    await join(g.raw, author, mod);
    await giveRole(g.raw, mod, ['MANAGE_MESSAGES']);
    const [modRole] = await app.deps.db
      .select({ id: memberRoles.roleId })
      .from(memberRoles)
      .where(and(eq(memberRoles.guildId, g.raw), eq(memberRoles.userId, raw(mod.id))));
    const [everyone] = await app.deps.db
      .select({ id: roles.id })
      .from(roles)
      .where(and(eq(roles.guildId, g.raw), eq(roles.isEveryone, true)));
    const channel = async (type: string, parentId: string | null = null) => {
      const id = newId();
      await app.deps.db
        .insert(channels)
        .values({ id, guildId: g.raw, type, name: type.toLowerCase(), parentId });
      return id;
    };
    const deny = (channelId: string, targetId: string, perm: bigint) =>
      app.deps.db
        .insert(permissionOverwrites)
        .values({ channelId, targetType: 'ROLE', targetId, allow: 0n, deny: perm });
    const secret = await channel('TEXT');
    await deny(secret, everyone.id, Permission.VIEW_CHANNEL);
    const readOnly = await channel('TEXT');
    await deny(readOnly, modRole.id, Permission.MANAGE_MESSAGES);
    const secretThread = await channel('THREAD', secret);
    const hiddenThread = await channel('THREAD', g.channel);
    await deny(hiddenThread, everyone.id, Permission.VIEW_CHANNEL);
    const openThread = await channel('THREAD', g.channel);
    const byChannel = new Map<string, string>();
    for (const c of [g.channel, secret, readOnly, secretThread, hiddenThread, openThread]) {
      const m = await postMessage(c, g.raw, author, `text in ${c}`);
      byChannel.set(c, (await ok(app, REPORT, { m: m.id, r: `why ${c}` }, owner.token)).reportMessage.id);
    }
    const visible = [openThread, g.channel].map((c) => byChannel.get(c));
    const hidden = [secret, readOnly, secretThread, hiddenThread].map((c) => byChannel.get(c)!);

    const list = async (token: string, f?: number, a?: string) =>
      (await ok(app, LIST, { g: g.id, f, a }, token)).reports;
    const modAll = await list(mod.token);
    assert.deepEqual(
      modAll.edges.map((e: any) => e.node.id),
      visible,
    );
    assert.ok(!JSON.stringify(modAll).includes(secret));
    // Filtered before paging: full pages, exact hasNextPage.
    const p1 = await list(mod.token, 1);
    assert.deepEqual(
      p1.edges.map((e: any) => e.node.id),
      [visible[0]],
    );
    assert.equal(p1.pageInfo.hasNextPage, true);
    const p2 = await list(mod.token, 1, p1.pageInfo.endCursor);
    assert.deepEqual(
      p2.edges.map((e: any) => e.node.id),
      [visible[1]],
    );
    assert.equal(p2.pageInfo.hasNextPage, false);
    assert.equal((await list(owner.token)).edges.length, 6);
    assert.equal((await list(admin.token)).edges.length, 6);

    // One at a time (node, resolve) follows the same rule, and a refused resolve changes nothing.
    const NODE = `query($id: ID!) { node(id: $id) { id ... on Report { reason contentSnapshot } } }`;
    for (const id of hidden) {
      await fails(app, 'NOT_FOUND', NODE, { id }, mod.token);
      await fails(app, 'NOT_FOUND', RESOLVE, { id, r: 'seen' }, mod.token);
    }
    const stillOpen = await app.deps.db
      .select({ status: reports.status })
      .from(reports)
      .where(inArray(reports.id, hidden.map(raw)));
    assert.deepEqual(
      stillOpen.map((r) => r.status),
      ['OPEN', 'OPEN', 'OPEN', 'OPEN'],
    );
    assert.equal((await ok(app, NODE, { id: visible[0] }, mod.token)).node.id, visible[0]);
    assert.equal(
      (await ok(app, RESOLVE, { id: visible[0], r: 'ok' }, mod.token)).resolveReport.status,
      'RESOLVED',
    );
    assert.equal(
      (await ok(app, RESOLVE, { id: hidden[0], r: 'ok' }, admin.token)).resolveReport.status,
      'RESOLVED',
    );

    // A moderator's page costs the same with reports spread over more (visible and hidden) channels.
    // Without message { id }: that field checks each live message's channel on its own.
    const cost = async () => {
      const runs: number[] = [];
      for (let i = 0; i < 3; i++) {
        const before = app.deps.database.queryCount;
        await ok(
          app,
          `query($g: ID!) { reports(guildId: $g) { edges { node { id reason } } } }`,
          { g: g.id },
          mod.token,
        );
        runs.push(app.deps.database.queryCount - before);
      }
      return Math.min(...runs);
    };
    const small = await cost();
    for (let i = 0; i < 6; i++) {
      const c = await channel('TEXT');
      if (i % 2) await deny(c, everyone.id, Permission.VIEW_CHANNEL);
      const m = await postMessage(c, g.raw, author, 'more');
      await ok(app, REPORT, { m: m.id, r: 'more' }, owner.token);
    }
    assert.equal((await list(mod.token)).edges.length, 5);
    assert.equal(await cost(), small);
  });

  it('node(id) shows a report to moderators only', async () => {
    const g = await makeGuild();
    const [author, reporter] = [await signUp(app), await signUp(app)];
    await join(g.raw, author, reporter);
    const m = await postMessage(g.channel, g.raw, author, 'x');
    const r = (await ok(app, REPORT, { m: m.id, r: 'bad' }, reporter.token)).reportMessage;
    const q = `query($id: ID!) { node(id: $id) { id ... on Report { reason } } }`;
    assert.equal((await ok(app, q, { id: r.id }, owner.token)).node.reason, 'bad');
    const res = await gql(app, q, { id: r.id }, { token: reporter.token });
    assert.equal(res.data?.node ?? null, null);
    assert.equal(res.errors?.[0]?.extensions?.code, 'NOT_FOUND');
  });
});
