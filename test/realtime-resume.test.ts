import { after, before, it } from 'node:test';
import pg from 'pg';
import { createTestApp, ok, onPostgres, signUp, type TestApp } from './helpers.ts';
import { guildWithChannel } from './realtime-helpers.ts';
import { resumeUnderLoad } from './realtime-scenario.ts';

let app: TestApp;
let url: string;
before(async () => {
  app = await createTestApp({ rateLimits: false });
  url = `ws://127.0.0.1:${await app.start(0)}/graphql`;
});
after(() => app.destroy());

it('resume under load: zero lost, zero repeated, order kept, final view = database', {
  timeout: 180_000,
}, async () => {
  const u = await signUp(app);
  const { guildId, channelId } = await guildWithChannel(app, u.token);
  const second = await ok(
    app,
    `mutation($g: ID!) { createChannel(input: { guildId: $g, name: "two", type: TEXT }) { id } }`,
    { g: guildId },
    u.token,
  );
  // Raw SQL on the same database the app uses (pg pool or PGlite).
  const pool = onPostgres ? new pg.Pool({ connectionString: app.config.databaseUrl }) : undefined;
  const sql = async (text: string, params: unknown[] = []) => {
    if (pool) return (await pool.query(text, params)).rows;
    const client = (
      app.deps.db as unknown as { $client: { query(t: string, p: unknown[]): Promise<{ rows: any[] }> } }
    ).$client;
    return (await client.query(text, params)).rows;
  };
  try {
    await resumeUnderLoad(
      { mutate: (q, v, t) => ok(app, q, v, t), sql, wsUrls: [url] },
      {
        token: u.token,
        channelIds: [channelId, second.createChannel.id],
        messages: 300,
        reconnects: 10,
        // PGlite runs one statement at a time: under four writers a session needs longer to see anything.
        stay: onPostgres ? [150, 500] : [800, 2000],
      },
    );
  } finally {
    await pool?.end();
  }
});
