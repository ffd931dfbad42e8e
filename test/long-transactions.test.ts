/**
 * Writes whose one transaction grew with a community's size (see big-deletes.test.ts for the
 * deletions batched before). The realtime log delivers nothing written after a transaction still
 * in progress (core/realtime/log.ts, Horizon): one such transaction held every stream of every
 * guild. Asserted on the transaction's size (statements, rows read), not on time.
 */
import assert from 'node:assert/strict';
import { after, before, it } from 'node:test';
import { sql } from 'drizzle-orm';
import { resultRows } from '../core/db/client.ts';
import { decodeAnyId } from '../schema/builder.ts';
import { createTestApp, ok, signUp, statementsOf, type TestApp, type TestUser } from './helpers.ts';
import { guildWithChannel } from './realtime-helpers.ts';

let app: TestApp;
before(async () => {
  app = await createTestApp({ rateLimits: false });
});
after(async () => {
  await app?.destroy();
});

const raw = (id: string) => decodeAnyId(id).id;

/** A category hidden from @everyone, with `n` channels in it (written directly). */
async function categoryOf(owner: TestUser, guildId: string, n: number) {
  const cat = await ok(
    app,
    `mutation($g: ID!) { createChannel(input: { guildId: $g, name: "cat", type: CATEGORY }) { id } }`,
    { g: guildId },
    owner.token,
  );
  const id = cat.createChannel.id as string;
  await ok(
    app,
    `mutation($c: ID!, $t: ID!) { setChannelOverwrite(input: { channelId: $c, targetType: ROLE, targetId: $t, allow: [], deny: [VIEW_CHANNEL] }) { allow } }`,
    { c: id, t: await everyoneOf(owner, guildId) },
    owner.token,
  );
  await app.deps.db.execute(sql`insert into channels (id, guild_id, parent_id, type, name)
    select gen_random_uuid(), ${raw(guildId)}::uuid, ${raw(id)}::uuid, 'TEXT', 'c' || i from generate_series(1, ${n}) i`);
  return id;
}

async function everyoneOf(owner: TestUser, guildId: string): Promise<string> {
  const r = await ok(
    app,
    `query($g: ID!) { guild(id: $g) { roles { id name } } }`,
    { g: guildId },
    owner.token,
  );
  return r.guild.roles.find((x: { name: string }) => x.name === '@everyone').id;
}

it("a category's deletion takes as many statements for 300 channels as for 3 (one event insert, not one per channel)", {
  timeout: 120_000,
}, async () => {
  const owner = await signUp(app);
  const counts: number[] = [];
  for (const n of [3, 300]) {
    const { guildId } = await guildWithChannel(app, owner.token);
    const cat = await categoryOf(owner, guildId, n);
    const { n: statements } = await statementsOf(app, () =>
      ok(app, `mutation($id: ID!) { deleteChannel(id: $id) }`, { id: cat }, owner.token),
    );
    counts.push(statements);
    // Each channel told once, in the deletion's transaction, and keeps the category's overwrite.
    const told = resultRows<{ n: number; xids: number }>(
      await app.deps.db.execute(sql`select count(*)::int as n, count(distinct xid::text)::int as xids from events
        where guild_id = ${raw(guildId)}::uuid and type = 'PERMISSIONS_CHANGED' and payload ? 'parentId'`),
    );
    assert.deepEqual(told[0], { n, xids: 1 });
    const kept = resultRows<{ n: number }>(
      await app.deps.db.execute(sql`select count(*)::int as n from permission_overwrites o
        join channels c on c.id = o.channel_id where c.guild_id = ${raw(guildId)}::uuid`),
    );
    assert.equal(kept[0].n, n);
  }
  // Before: one insert per channel (a round trip each in the deletion's transaction: 500 channels
  // held it ~0.4 s, 2,000 ~1.1 s).
  assert.equal(counts[1], counts[0], `statements for 3 channels, then 300: ${counts}`);
});
