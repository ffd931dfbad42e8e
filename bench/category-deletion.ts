/**
 * What a category's deletion costs the realtime hub with many member subscribers: a guild with a
 * category of N channels and M members subscribed (in process, one stream each), a bystander in
 * another guild. The category is deleted (a PERMISSIONS_CHANGED row per channel, then its
 * CHANNEL_DELETED, in one transaction); then the owner sends a message in the guild's first
 * channel and the bystander one in its own guild. Prints one JSON line: the statements the app
 * ran from the deletion until every member had the owner's message, the time from the deletion's
 * commit until then, and the bystander's delay (its message's commit to its delivery).
 *
 *   BANTER_TEST_DB=postgres N=500 M=500 VISIBLE=1 npm run bench:category-deletion
 *
 * VISIBLE=1: the category denies @everyone SEND_MESSAGES (members see its channels and are told
 * each); VISIBLE=0: it denies VIEW_CHANNEL (told nothing). Bounded: every wait gives up after
 * TIMEOUT_MS (default 300 s). Uses the test harness (test/helpers.ts): a fresh database, dropped.
 */
import { performance } from 'node:perf_hooks';
import { sql } from 'drizzle-orm';
import type { Delivered } from '../core/realtime/subscription.ts';
import { decodeAnyId } from '../schema/builder.ts';
import { createTestApp, ok, signUp } from '../test/helpers.ts';

const N = Number(process.env.N ?? 50);
const M = Number(process.env.M ?? 100);
const VISIBLE = process.env.VISIBLE !== '0';
const TIMEOUT_MS = Number(process.env.TIMEOUT_MS ?? 300_000);

const raw = (id: string) => decodeAnyId(id).id;

async function waitFor(cond: () => boolean, what: string) {
  const deadline = Date.now() + TIMEOUT_MS;
  while (!cond()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 2));
  }
}

const app = await createTestApp({ rateLimits: false });
const hub = app.deps.realtime!;
const db = app.deps.db;
try {
  const owner = await signUp(app);
  const bystander = await signUp(app);
  const mk = async (token: string) => {
    const g = await ok(
      app,
      `mutation { createGuild(input: { name: "G" }) { id channels { id } } }`,
      {},
      token,
    );
    return { guildId: g.createGuild.id as string, channelId: g.createGuild.channels[0].id as string };
  };
  const main = await mk(owner.token);
  const other = await mk(bystander.token);
  const g = raw(main.guildId);
  const tag = g.slice(0, 8);
  await db.execute(sql`insert into users (id, username, email, password_hash)
    select gen_random_uuid(), 'pm' || i || '_' || ${tag}, 'pm' || i || '_' || ${tag} || '@test', 'x'
    from generate_series(1, ${M}) i`);
  await db.execute(sql`insert into members (guild_id, user_id)
    select ${g}::uuid, id from users where username like ${`pm%\\_${tag}`}`);
  const memberIds = (
    (await db.execute(sql`select id from users where username like ${`pm%\\_${tag}`}`)) as unknown as {
      rows: { id: string }[];
    }
  ).rows.map((r) => r.id);
  const roles = await ok(
    app,
    `query($g: ID!) { guild(id: $g) { roles { id isEveryone } } }`,
    { g: main.guildId },
    owner.token,
  );
  const everyone = (roles.guild.roles as { id: string; isEveryone: boolean }[]).find((r) => r.isEveryone)!.id;
  const cat = await ok(
    app,
    `mutation($g: ID!) { createChannel(input: { guildId: $g, name: "cat", type: CATEGORY }) { id } }`,
    { g: main.guildId },
    owner.token,
  );
  const catId = cat.createChannel.id as string;
  await ok(
    app,
    `mutation($i: SetChannelOverwriteInput!) { setChannelOverwrite(input: $i) { targetId } }`,
    {
      i: {
        channelId: catId,
        targetType: 'ROLE',
        targetId: everyone,
        allow: [],
        deny: [VISIBLE ? 'SEND_MESSAGES' : 'VIEW_CHANNEL'],
      },
    },
    owner.token,
  );
  await db.execute(sql`insert into channels (id, guild_id, parent_id, type, name)
    select gen_random_uuid(), ${g}::uuid, ${raw(catId)}::uuid, 'TEXT', 'c' || i
    from generate_series(1, ${N}) i`);

  // Every member's stream, drained as it comes: what it was told, and when it had each mark.
  interface Seen {
    told: number;
    at: Map<string, number>;
    failed?: unknown;
  }
  const seen = new Map<string, Seen>();
  const streams: AsyncIterableIterator<Delivered>[] = [];
  const consume = async (userId: string, s: AsyncIterableIterator<Delivered>) => {
    const me: Seen = { told: 0, at: new Map() };
    seen.set(userId, me);
    try {
      for await (const r of s) {
        if (r.type === 'PERMISSIONS_CHANGED' || r.type === 'CHANNEL_DELETED') me.told++;
        const content = (r.message as { content?: string } | undefined)?.content;
        if (content) me.at.set(content, performance.now());
      }
    } catch (e) {
      me.failed = e;
    }
  };
  const all = [...memberIds, raw(bystander.id)];
  for (const id of all) {
    const s = (await hub.subscribe({ userId: id }, null, {
      onFail: (e) => {
        seen.get(id)!.failed = e;
      },
    })) as AsyncIterableIterator<Delivered>;
    streams.push(s);
    void consume(id, s);
  }
  await waitFor(() => all.every((id) => hub.liveCount(id) >= 1), 'subscriptions live');
  const send = (token: string, channelId: string, content: string) =>
    ok(
      app,
      `mutation($i: SendMessageInput!) { sendMessage(input: $i) { id } }`,
      { i: { channelId, content } },
      token,
    );
  // Warm: each member has its standing and the first channel loaded, as a connected client would.
  await send(owner.token, main.channelId, 'warm');
  await send(bystander.token, other.channelId, 'warm');
  await waitFor(() => all.every((id) => seen.get(id)!.at.has('warm')), 'warm-up delivered');

  const q0 = app.deps.database.queryCount;
  const elu0 = performance.eventLoopUtilization();
  const t0 = performance.now();
  await ok(app, `mutation($id: ID!) { deleteChannel(id: $id) }`, { id: catId }, owner.token);
  const committed = performance.now();
  const [, bySent] = await Promise.all([
    send(owner.token, main.channelId, 'after').then(() => performance.now()),
    send(bystander.token, other.channelId, 'after').then(() => performance.now()),
  ]);
  const by = raw(bystander.id);
  await waitFor(() => !!seen.get(by)!.at.get('after') || !!seen.get(by)!.failed, 'bystander after');
  await waitFor(
    () => memberIds.every((id) => seen.get(id)!.at.has('after') || seen.get(id)!.failed),
    'members after',
  );
  const done = Math.max(...memberIds.map((id) => seen.get(id)!.at.get('after') ?? 0));
  const elu = performance.eventLoopUtilization(elu0);
  const statements = app.deps.database.queryCount - q0;
  const told = memberIds.map((id) => seen.get(id)!.told);
  const failed = all.filter((id) => seen.get(id)!.failed).length;
  console.log(
    JSON.stringify({
      db: process.env.BANTER_TEST_DB ?? 'pglite',
      N,
      M,
      visible: VISIBLE,
      statements,
      deleteMs: Math.round(committed - t0),
      membersDoneMs: Math.round(done - committed),
      bystanderMs: Math.round(seen.get(by)!.at.get('after')! - bySent),
      loopBusyMs: Math.round(elu.active),
      toldMin: Math.min(...told),
      toldMax: Math.max(...told),
      failed,
    }),
  );
  for (const s of streams) await s.return?.();
} finally {
  await app.destroy();
}
