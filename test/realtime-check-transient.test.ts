/**
 * A row whose access check fails is skipped after a few rounds only when the failure is the row's
 * own (core/realtime/failures.ts, skipsUnchecked in hub.ts). A check that failed for a passing
 * reason (a statement cancelled: a statement_timeout or lock_timeout under a migration's lock, as
 * here; a connection dropped; the pool's wait) while the control asked right after succeeded
 * was counted all the same, and after three such rounds the row was skipped for the subscriber
 * whose check failed: the event lost for someone who may see it. Postgres only: it takes a
 * second connection to hold the lock.
 */
import assert from 'node:assert/strict';
import { after, before, it } from 'node:test';
import { sql } from 'drizzle-orm';
import pg from 'pg';
import { decodeAnyId } from '../schema/builder.ts';
import { cancelStatement, createTestApp, onPostgres, signUp, type TestApp } from './helpers.ts';
import { connect, guildWithChannel, send, sleep, subscribe, untilLive } from './realtime-helpers.ts';

const skip = !onPostgres;
let app: TestApp;
let wsUrl: string;
before(async () => {
  if (skip) return;
  app = await createTestApp({ rateLimits: false });
  wsUrl = `ws://127.0.0.1:${await app.start(0)}/graphql`;
});
after(() => app?.destroy());

const raw = (globalId: string) => decodeAnyId(globalId).id;

it('a check cancelled in round after round (the database answering in between) never skips the row', {
  skip,
  timeout: 90_000,
}, async () => {
  const u = await signUp(app);
  const { guildId, channelId } = await guildWithChannel(app, u.token);
  const c = connect(wsUrl, u.token);
  const s = subscribe(c.client);
  await untilLive(app, [u]);
  await send(app, u.token, channelId, 'one');
  await s.until((e) => e.some((x) => x.message?.content === 'one'));
  const last = s.events.find((e) => e.message?.content === 'one').cursor as string;
  s.stop();
  await c.client.dispose();
  await app.deps.db.execute(sql`insert into events (type, guild_id, channel_id, payload)
    values ('MESSAGE_DELETED', ${raw(guildId)}::uuid, ${raw(channelId)}::uuid,
      jsonb_build_object('messageId', gen_random_uuid()::text, 'channelId', ${raw(channelId)}::text))`);
  await send(app, u.token, channelId, 'two');

  const admin = new pg.Client({ connectionString: app.config.databaseUrl });
  await admin.connect();
  /** per round: what the resumed socket got, or its close code */
  const rounds: string[] = [];
  try {
    for (let i = 0; i < 4; i++) {
      // Past the 1 s channel-access cache: the check asks the database.
      await sleep(1_200);
      await admin.query('begin');
      await admin.query('lock table permission_overwrites in access exclusive mode');
      const r = connect(wsUrl, u.token);
      const rs = subscribe(r.client, last);
      let waiting: number | undefined;
      for (let t = 0; t < 100 && waiting === undefined; t++) {
        // Inside a transaction, pg_stat_activity is read once and kept: look again each time.
        await admin.query('select pg_stat_clear_snapshot()');
        const q = await admin.query<{ pid: number }>(
          `select pid from pg_stat_activity where datname = current_database()
             and wait_event_type = 'Lock' and pid <> pg_backend_pid()`,
        );
        waiting = q.rows[0]?.pid;
        if (waiting === undefined) await sleep(50);
      }
      assert.ok(waiting !== undefined, 'the check waits on the lock');
      // What a statement_timeout or lock_timeout does to it; the lock goes right after, so the
      // control (the same statements for no subject) then answers.
      assert.ok(await cancelStatement(admin, waiting), 'the cancelled statement ended');
      await admin.query('rollback');
      const deadline = Date.now() + 5000;
      const done = () => rs.events.some((e) => e.message?.content === 'two');
      while (!r.closed() && !done() && Date.now() < deadline) await sleep(50);
      rounds.push(
        done() ? rs.events.map((e) => e.__typename).join(',') : String(r.closed()?.code ?? 'nothing'),
      );
      rs.stop();
      await r.client.dispose();
    }
  } finally {
    await admin.query('rollback').catch(() => {});
    await admin.end();
  }
  // Every round is closed to resume (1013); none gets what follows the row without the row.
  for (const got of rounds)
    assert.ok(got === '1013' || got.startsWith('MessageDeleted'), JSON.stringify(rounds));
  const c2 = connect(wsUrl, u.token);
  const s2 = subscribe(c2.client, last);
  try {
    await s2.until(
      (e) => e.some((x) => x.__typename === 'MessageDeleted'),
      10_000,
      'the row, once checks pass',
    );
  } finally {
    s2.stop();
    await c2.client.dispose();
  }
});
