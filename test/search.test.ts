import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { after, before, describe, it } from 'node:test';
import { eq, sql } from 'drizzle-orm';
import { attachments, members, messages } from '../core/db/tables.ts';
import { newId } from '../core/ids.ts';
import { Permission } from '../core/permissions.ts';
import { matchSql } from '../core/search/postgres.search.ts';
import type { MessageRow } from '../core/services/message.service.ts';
import type { AttachmentRow } from '../core/services/message-history.service.ts';
import { searchDocument } from '../core/services/search.service.ts';
import { encodeId } from '../schema/builder.ts';
import {
  createTestApp,
  fails,
  gql,
  ok,
  signUp,
  statementsOf,
  type TestApp,
  type TestUser,
} from './helpers.ts';
import {
  addMember,
  createChannel,
  type GuildFixture,
  overwrite,
  send,
  setupGuild,
  uuidOf,
} from './message-fixtures.ts';

const SEARCH = `query($i: SearchInput!, $first: Int, $after: String) {
  search(input: $i, first: $first, after: $after) {
    edges { cursor node { id content channel { id } author { id } } }
    pageInfo { hasNextPage hasPreviousPage endCursor }
  } }`;

let app: TestApp;
let g: GuildFixture;
let member: TestUser;
let stranger: TestUser;

/** A word no other test sends, so each test sees only its own messages. */
const tag = () => `t${randomBytes(4).toString('hex')}`;

async function search(user: TestUser, input: Record<string, unknown>, first?: number, after?: string) {
  const d = await ok(app, SEARCH, { i: input, first, after }, user.token);
  return d.search as {
    edges: { cursor: string; node: { id: string; content: string; channel: { id: string } } }[];
    pageInfo: { hasNextPage: boolean; hasPreviousPage: boolean; endCursor: string | null };
  };
}
const contents = async (user: TestUser, input: Record<string, unknown>) =>
  (await search(user, input)).edges.map((e) => e.node.content);

before(async () => {
  // One member runs well over the search rule's 60 a minute here; limits.test.ts covers that rule.
  app = await createTestApp({}, { RATE_LIMITS: 'off' });
  g = await setupGuild(app);
  member = await signUp(app);
  stranger = await signUp(app);
  await addMember(app, g.guildId, member);
});
after(() => app.destroy());

describe('search: text', () => {
  it('matches every word, any case, in any order, the last word as a prefix', async () => {
    const t = tag();
    await send(app, g.owner, g.channelId, `${t} The Quick brown fox`);
    await send(app, member, g.channelId, `${t} a lazy dog sleeps`);
    assert.deepEqual(await contents(member, { text: `${t} quick` }), [`${t} The Quick brown fox`]);
    assert.deepEqual(await contents(member, { text: `${t} QUICK` }), [`${t} The Quick brown fox`]);
    assert.deepEqual(await contents(member, { text: `fox ${t.toUpperCase()} brown` }), [
      `${t} The Quick brown fox`,
    ]);
    assert.deepEqual(await contents(member, { text: `${t} quick dog` }), []);
    assert.deepEqual(await contents(member, { text: `${t} sle` }), [`${t} a lazy dog sleeps`]);
    // Only the last word is a prefix.
    assert.deepEqual(await contents(member, { text: `${t} sle dog` }), []);
    assert.deepEqual(await contents(member, { text: t }), [
      `${t} a lazy dog sleeps`,
      `${t} The Quick brown fox`,
    ]);
  });

  it('handles other scripts, punctuation and query operators as plain text', async () => {
    const t = tag();
    await send(app, member, g.channelId, `${t} Привет мир, don't panic: see https://example.com/docs`);
    const want = [`${t} Привет мир, don't panic: see https://example.com/docs`];
    assert.deepEqual(await contents(member, { text: `${t} привет` }), want);
    assert.deepEqual(await contents(member, { text: `${t} don't` }), want);
    assert.deepEqual(await contents(member, { text: `${t} example.com` }), want);
    for (const text of [`${t} & | ! :* ( )`, `${t} 'quoted\\`, '!!!']) {
      const r = await gql(app, SEARCH, { i: { text } }, { token: member.token });
      assert.equal(r.errors, undefined, text);
    }
  });

  it('finds the edited text, not the old one', async () => {
    const [a, b] = [tag(), tag()];
    const m = await send(app, member, g.channelId, `${a} before`);
    await ok(
      app,
      `mutation($i: EditMessageInput!) { editMessage(input: $i) { id } }`,
      { i: { id: m.id, content: `${b} after` } },
      member.token,
    );
    assert.deepEqual(await contents(member, { text: a }), []);
    assert.deepEqual(await contents(member, { text: b }), [`${b} after`]);
  });

  it('never returns deleted messages', async () => {
    const t = tag();
    const m = await send(app, member, g.channelId, `${t} soon gone`);
    await send(app, member, g.channelId, `${t} stays`);
    await ok(app, `mutation($id: ID!) { deleteMessage(id: $id) }`, { id: m.id }, member.token);
    assert.deepEqual(await contents(member, { text: t }), [`${t} stays`]);
    assert.deepEqual(await contents(g.owner, { authorId: member.id, text: `${t} soon` }), []);
  });
});

describe('search: filters', () => {
  let other: string;
  let t: string;
  let fox: any;
  let link: any;
  let file: any;
  let image: any;
  let embed: any;
  before(async () => {
    t = tag();
    other = await createChannel(app, g.owner, g.guildId);
    fox = await send(app, g.owner, g.channelId, `${t} fox in general`);
    link = await send(app, member, other, `${t} read https://example.com/a`);
    file = await send(app, member, other, `${t} a file`);
    image = await send(app, member, g.channelId, `${t} an image`);
    embed = await send(app, g.owner, other, `${t} with embed`);
    const att = (messageId: string, contentType: string) => ({
      id: newId(),
      messageId: uuidOf(messageId),
      uploaderId: uuidOf(member.id),
      filename: 'f',
      contentType,
      size: 1,
      storageKey: `k/${newId()}`,
    });
    await app.deps.db
      .insert(attachments)
      .values([att(file.id, 'application/pdf'), att(image.id, 'image/png'), att(image.id, 'text/plain')]);
    await app.deps.db
      .update(messages)
      .set({ embeds: [{ title: 'x' }] })
      .where(eq(messages.id, uuidOf(embed.id)));
  });
  const ids = async (input: Record<string, unknown>) =>
    (await search(member, { text: t, ...input })).edges.map((e) => e.node.id);

  it('filters by channel, guild and author, combined', async () => {
    assert.deepEqual(await ids({ channelId: other }), [embed.id, file.id, link.id]);
    assert.deepEqual(await ids({ guildId: g.guildId }), [embed.id, image.id, file.id, link.id, fox.id]);
    assert.deepEqual(await ids({ authorId: g.owner.id }), [embed.id, fox.id]);
    assert.deepEqual(await ids({ authorId: g.owner.id, channelId: other }), [embed.id]);
    assert.deepEqual(await ids({ authorId: stranger.id }), []);
    // Without text: an author filter alone is enough.
    const all = (await search(member, { authorId: g.owner.id, guildId: g.guildId }, 100)).edges;
    assert.ok(all.some((e) => e.node.id === embed.id));
    assert.ok(all.every((e) => e.node.content !== link.content));
  });

  it('filters by has: LINK, FILE, IMAGE, EMBED (all listed must hold)', async () => {
    assert.deepEqual(await ids({ has: ['LINK'] }), [link.id]);
    assert.deepEqual(await ids({ has: ['FILE'] }), [image.id, file.id]);
    assert.deepEqual(await ids({ has: ['IMAGE'] }), [image.id]);
    assert.deepEqual(await ids({ has: ['EMBED'] }), [embed.id]);
    assert.deepEqual(await ids({ has: ['FILE', 'IMAGE'] }), [image.id]);
    assert.deepEqual(await ids({ has: ['LINK', 'FILE'] }), []);
    const onlyHas = await search(member, { has: ['EMBED'], channelId: other });
    assert.deepEqual(
      onlyHas.edges.map((e) => e.node.id),
      [embed.id],
    );
  });

  it('filters by time', async () => {
    const at = async (id: string) =>
      (
        await app.deps.db
          .select()
          .from(messages)
          .where(eq(messages.id, uuidOf(id)))
      )[0].createdAt;
    const mid = await at(file.id);
    assert.deepEqual(await ids({ before: mid.toISOString() }), [link.id, fox.id]);
    assert.deepEqual(await ids({ after: mid.toISOString() }), [embed.id, image.id]);
    assert.deepEqual(await ids({ after: (await at(fox.id)).toISOString(), before: mid.toISOString() }), [
      link.id,
    ]);
  });
});

describe('search: who sees what', () => {
  it('strangers get nothing, and NOT_FOUND for the guild or its channels', async () => {
    const t = tag();
    await send(app, member, g.channelId, `${t} members only`);
    assert.deepEqual(await contents(stranger, { text: t }), []);
    await fails(app, 'NOT_FOUND', SEARCH, { i: { text: t, guildId: g.guildId } }, stranger.token);
    await fails(app, 'NOT_FOUND', SEARCH, { i: { text: t, channelId: g.channelId } }, stranger.token);
    await fails(app, 'NOT_FOUND', SEARCH, { i: { channelId: encodeId('Channel', newId()) } }, member.token);
    await fails(app, 'NOT_FOUND', SEARCH, { i: { guildId: encodeId('Guild', newId()) } }, member.token);
  });

  it('a member denied a channel gets nothing from it; without READ_HISTORY neither', async () => {
    const t = tag();
    const secret = await createChannel(app, g.owner, g.guildId);
    const noHistory = await createChannel(app, g.owner, g.guildId);
    await overwrite(app, secret, { user: member }, 0n, Permission.VIEW_CHANNEL);
    await overwrite(app, noHistory, { user: member }, 0n, Permission.READ_HISTORY);
    await send(app, g.owner, secret, `${t} secret plans`);
    await send(app, g.owner, noHistory, `${t} old news`);
    await send(app, g.owner, g.channelId, `${t} public`);
    assert.deepEqual(await contents(member, { text: t }), [`${t} public`]);
    assert.deepEqual(await contents(member, { text: t, guildId: g.guildId }), [`${t} public`]);
    assert.deepEqual(await contents(g.owner, { text: t }), [
      `${t} public`,
      `${t} old news`,
      `${t} secret plans`,
    ]);
    await fails(app, 'NOT_FOUND', SEARCH, { i: { text: t, channelId: secret } }, member.token);
    await fails(app, 'FORBIDDEN', SEARCH, { i: { text: t, channelId: noHistory } }, member.token);
  });

  it('threads follow their parent, or their own overwrites', async () => {
    const t = tag();
    const secret = await createChannel(app, g.owner, g.guildId);
    await overwrite(app, secret, { user: member }, 0n, Permission.VIEW_CHANNEL);
    const START = `mutation($m: ID!) { startThread(messageId: $m, name: "th") { id } }`;
    const src = await send(app, g.owner, g.channelId, `${t} root`);
    const thread = (await ok(app, START, { m: src.id }, g.owner.token)).startThread.id;
    const hiddenSrc = await send(app, g.owner, secret, `${t} hidden root`);
    const hiddenThread = (await ok(app, START, { m: hiddenSrc.id }, g.owner.token)).startThread.id;
    const closed = (
      await ok(app, START, { m: (await send(app, g.owner, g.channelId, `${t} r2`)).id }, g.owner.token)
    ).startThread.id;
    await overwrite(app, closed, { user: member }, 0n, Permission.VIEW_CHANNEL);
    await send(app, g.owner, thread, `${t} in thread`);
    await send(app, g.owner, hiddenThread, `${t} in hidden thread`);
    await send(app, g.owner, closed, `${t} in closed thread`);
    assert.deepEqual(await contents(member, { text: `${t} in` }), [`${t} in thread`]);
    assert.deepEqual(await contents(member, { text: t, channelId: thread }), [`${t} in thread`]);
    assert.equal((await contents(g.owner, { text: `${t} in` })).length, 3);
  });

  it('DMs: recipients only', async () => {
    const t = tag();
    const OPEN = `mutation($ids: [ID!]!) { openDirectChannel(userIds: $ids) { id } }`;
    const dm = (await ok(app, OPEN, { ids: [stranger.id] }, member.token)).openDirectChannel.id;
    await send(app, member, dm, `${t} just us`);
    assert.deepEqual(await contents(stranger, { text: t }), [`${t} just us`]);
    assert.deepEqual(await contents(member, { text: t, channelId: dm }), [`${t} just us`]);
    assert.deepEqual(await contents(g.owner, { text: t }), []);
    await fails(app, 'NOT_FOUND', SEARCH, { i: { text: t, channelId: dm } }, g.owner.token);
    // Scoped to a guild, DMs are outside it; a channel outside the guild matches nothing.
    assert.deepEqual(await contents(member, { text: t, guildId: g.guildId }), []);
    assert.deepEqual(await contents(member, { text: t, guildId: g.guildId, channelId: dm }), []);
    await fails(
      app,
      'NOT_FOUND',
      SEARCH,
      { i: { text: t, guildId: encodeId('Guild', newId()), channelId: dm } },
      member.token,
    );
  });

  it('a member who leaves stops seeing the guild at once', async () => {
    const t = tag();
    const leaver = await signUp(app);
    await addMember(app, g.guildId, leaver);
    await send(app, g.owner, g.channelId, `${t} hello`);
    assert.equal((await contents(leaver, { text: t })).length, 1);
    await app.deps.db.delete(members).where(eq(members.userId, uuidOf(leaver.id)));
    assert.deepEqual(await contents(leaver, { text: t }), []);
    await fails(app, 'NOT_FOUND', SEARCH, { i: { text: t, guildId: g.guildId } }, leaver.token);
  });

  it('costs the same number of statements however many guilds and channels', async () => {
    const count = async (u: TestUser) => (await statementsOf(app, () => search(u, { text: 'anything' }))).n;
    const u = await signUp(app);
    const one = await setupGuild(app);
    await addMember(app, one.guildId, u);
    const small = await count(u);
    for (let i = 0; i < 3; i++) {
      const more = await setupGuild(app);
      await addMember(app, more.guildId, u);
      const c = await createChannel(app, more.owner, more.guildId);
      const src = await send(app, more.owner, c, 'root');
      await ok(
        app,
        `mutation($m: ID!) { startThread(messageId: $m, name: "th") { id } }`,
        { m: src.id },
        more.owner.token,
      );
    }
    assert.equal(await count(u), small);
  });
});

describe('search: paging', () => {
  it('pages newest first with opaque cursors; default 25, at most 100', async () => {
    const t = tag();
    const sent = [];
    for (let i = 0; i < 27; i++) sent.push((await send(app, member, g.channelId, `${t} n${i}`)).id);
    const newest = sent.reverse();
    const p1 = await search(member, { text: t }, 10);
    assert.deepEqual(
      p1.edges.map((e) => e.node.id),
      newest.slice(0, 10),
    );
    assert.equal(p1.pageInfo.hasNextPage, true);
    assert.equal(p1.pageInfo.hasPreviousPage, false);
    assert.ok(!p1.pageInfo.endCursor!.includes(uuidOf(newest[9])));
    const p2 = await search(member, { text: t }, 10, p1.pageInfo.endCursor!);
    assert.deepEqual(
      p2.edges.map((e) => e.node.id),
      newest.slice(10, 20),
    );
    const p3 = await search(member, { text: t }, 10, p2.pageInfo.endCursor!);
    assert.deepEqual(
      p3.edges.map((e) => e.node.id),
      newest.slice(20),
    );
    assert.equal(p3.pageInfo.hasNextPage, false);
    const dflt = await search(member, { text: t });
    assert.equal(dflt.edges.length, 25);
    assert.equal(dflt.pageInfo.hasNextPage, true);
    assert.equal((await search(member, { text: t }, 500)).edges.length, 27);
    assert.equal((await search(member, { text: t }, 0)).edges.length, 0);
  });
});

describe('search: bad input', () => {
  it('refuses with the right code', async () => {
    const bad = async (vars: Record<string, unknown>) =>
      fails(app, 'BAD_USER_INPUT', SEARCH, vars, member.token);
    await bad({ i: {} });
    await bad({ i: { has: [] } });
    await bad({ i: { text: '' } });
    await bad({ i: { text: '   ' } });
    await bad({ i: { text: 'x'.repeat(201) } });
    await bad({ i: { guildId: 'nope' } });
    await bad({ i: { guildId: g.channelId } });
    await bad({ i: { channelId: g.guildId } });
    await bad({ i: { authorId: g.channelId } });
    // An unknown enum value is refused by validation (as a literal; see the report about variables).
    const r = await gql(
      app,
      'query { search(input: { has: [VIDEO] }) { edges { cursor } } }',
      {},
      { token: member.token },
    );
    assert.equal(r.errors?.[0]?.extensions?.code, 'GRAPHQL_VALIDATION_FAILED');
    const d = await gql(
      app,
      'query { search(input: { before: "yesterday" }) { edges { cursor } } }',
      {},
      { token: member.token },
    );
    assert.equal(d.errors?.[0]?.extensions?.code, 'BAD_USER_INPUT', JSON.stringify(d.errors));
    await bad({ i: { text: 'x' }, after: 'not-a-cursor' });
    await bad({ i: { text: 'x' }, first: -1 });
    await ok(app, SEARCH, { i: { text: 'x'.repeat(200) } }, member.token);
    await fails(app, 'UNAUTHENTICATED', SEARCH, { i: { text: 'x' } });
  });
});

describe('search: documents for engines with their own copy', () => {
  it('lists the has: kinds a message satisfies', () => {
    const row = {
      id: newId(),
      channelId: newId(),
      guildId: null,
      authorId: newId(),
      content: 'see HTTPS://x.test',
      createdAt: new Date(),
      embeds: [{ title: 'x' }],
    } as unknown as MessageRow;
    const file = (contentType: string) => ({ contentType }) as unknown as AttachmentRow;
    assert.deepEqual(searchDocument(row, [file('image/png')]).has, ['LINK', 'FILE', 'IMAGE', 'EMBED']);
    assert.deepEqual(searchDocument({ ...row, content: 'http:// nothing', embeds: [] }, [file('a/b')]).has, [
      'FILE',
    ]);
  });
});

describe('search: the index', () => {
  it('the planner can answer the text match from messages_search', async () => {
    const plan = await app.deps.db.transaction(async (tx) => {
      await tx.execute(sql`set local enable_seqscan = off`);
      const r = (await tx.execute(
        sql`explain select ${messages.id} from ${messages} where ${matchSql('hello wor')}`,
      )) as unknown as { rows: Record<string, string>[] };
      return r.rows.map((x) => Object.values(x)[0]).join('\n');
    });
    assert.match(plan, /messages_search/);
  });
});
