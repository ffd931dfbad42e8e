/**
 * Manual check (not in the suite): a subscription runs from GraphiQL over graphql-ws. Starts the
 * api on embedded PGlite, signs a user up, opens GraphiQL in headless Chromium with the token in
 * the Headers tab, subscribes to `events`, sends a message over HTTP and saves a screenshot of
 * the event arriving. Usage: npx tsx scripts/graphiql-subscription-check.ts [screenshot.png]
 */
import { spawn } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { type AddressInfo, createServer } from 'node:net';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
// A port the OS says is free (a random one in 5000-5999 once was PostgreSQL's 5432).
const port = await new Promise<number>((resolve) => {
  const probe = createServer().listen(0, '127.0.0.1', () => {
    const p = (probe.address() as AddressInfo).port;
    probe.close(() => resolve(p));
  });
});
const dir = mkdtempSync(path.join(tmpdir(), 'banter-graphiql-'));
const shot = process.argv[2] ?? 'graphiql-subscription.png';
const url = `http://localhost:${port}/graphql`;
const srv = spawn(process.execPath, ['--import', 'tsx', 'api/main.ts'], {
  cwd: root,
  env: { PATH: process.env.PATH, PORT: String(port), DATA_DIR: dir, LOG_LEVEL: 'warn' },
  stdio: 'inherit',
});

async function gql(query: string, variables: object, token?: string) {
  const r = await fetch(url, {
    method: 'POST',
    headers: { 'content-type': 'application/json', ...(token ? { authorization: `Bearer ${token}` } : {}) },
    body: JSON.stringify({ query, variables }),
  });
  const body = (await r.json()) as { data: any; errors?: unknown };
  if (body.errors) throw new Error(JSON.stringify(body.errors));
  return body.data;
}

try {
  for (let i = 0; i < 300; i++) {
    if (
      await fetch(`http://127.0.0.1:${port}/healthz`).then(
        (r) => r.ok,
        () => false,
      )
    )
      break;
    await new Promise((r) => setTimeout(r, 100));
  }
  const reg = await gql('mutation($i: RegisterInput!) { register(input: $i) { accessToken } }', {
    i: { username: 'graphiql', email: 'graphiql@example.test', password: 'password123' },
  });
  const token = reg.register.accessToken as string;
  const g = await gql(
    'mutation { createGuild(input: { name: "Playground" }) { channels { id } } }',
    {},
    token,
  );
  const channelId = g.createGuild.channels[0].id as string;

  const browser = await chromium.launch({
    executablePath: '/usr/bin/chromium',
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking'],
  });
  const page = await browser.newPage({ viewport: { width: 1400, height: 800 } });
  page.on('websocket', (ws) => {
    ws.on('framesent', (f) => console.log('ws>', String(f.payload).slice(0, 300)));
    ws.on('framereceived', (f) => console.log('ws<', String(f.payload).slice(0, 300)));
    ws.on('close', () => console.log('ws closed'));
  });
  await page.goto(url);
  await page.waitForSelector('.graphiql-container', { timeout: 20000 });
  // Headers tab: the token, which GraphiQL also sends as the graphql-ws connection_init payload.
  await page.getByText('Headers', { exact: true }).click();
  const headers = page.locator('.graphiql-editor-tool .graphiql-editor').last();
  await headers.click();
  await page.keyboard.type(`{"authorization": "Bearer ${token}"`);
  const editor = page.locator('.graphiql-query-editor .graphiql-editor').first();
  await editor.click();
  await page.keyboard.press('Control+A');
  await page.keyboard.press('Delete');
  await page.keyboard.type(
    'subscription { events { __typename cursor ... on MessageCreated { message { content author { username } } } ',
  );
  // Dismiss the autocomplete popup, which would otherwise cover the execute button.
  await page.keyboard.press('Escape');
  await page.mouse.click(1000, 500);
  await page.click('.graphiql-execute-button');
  await page.waitForTimeout(1500);
  await gql(
    'mutation($c: ID!) { sendMessage(input: { channelId: $c, content: "hello from HTTP, seen in GraphiQL" }) { id } }',
    { c: channelId },
    token,
  );
  await page
    // (the result editor renders spaces as no-break spaces)
    .waitForFunction(
      () => (document.body.textContent ?? '').replace(/\u00a0/g, ' ').includes('seen in GraphiQL'),
      null,
      {
        timeout: 15000,
      },
    )
    .catch(async (err) => {
      await page.screenshot({ path: shot });
      throw err;
    });
  await page.waitForTimeout(300);
  await page.screenshot({ path: shot });
  console.log(`screenshot: ${shot}`);
  await browser.close();
} finally {
  srv.kill('SIGTERM');
  await new Promise((r) => srv.once('exit', r));
  rmSync(dir, { recursive: true, force: true });
}
