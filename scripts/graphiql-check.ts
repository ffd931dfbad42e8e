/**
 * Manual check (not in the suite): GraphiQL loads and runs a query with no internet. Starts the
 * api on embedded PGlite, drives headless Chromium (playwright-core, /usr/bin/chromium) and saves
 * a screenshot. Usage: npx tsx scripts/graphiql-check.ts [screenshot.png]
 */
import { spawn } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const port = 4000 + Math.floor(Math.random() * 1000);
const dir = mkdtempSync(path.join(tmpdir(), 'banter-graphiql-'));
const shot = process.argv[2] ?? 'graphiql.png';
const srv = spawn(process.execPath, ['--import', 'tsx', 'api/main.ts'], {
  cwd: root,
  env: { PATH: process.env.PATH, PORT: String(port), DATA_DIR: dir, LOG_LEVEL: 'warn' },
  stdio: 'inherit',
});
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
  const browser = await chromium.launch({
    executablePath: '/usr/bin/chromium',
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking'],
  });
  const page = await browser.newPage({ viewport: { width: 1400, height: 800 } });
  const external: string[] = [];
  page.on('request', (r) => {
    if (!/^(blob:)?http:\/\/localhost:\d+\//.test(r.url()) && !r.url().startsWith('data:'))
      external.push(r.url());
  });
  await page.goto(`http://localhost:${port}/graphql`);
  await page.waitForSelector('.graphiql-container', { timeout: 20000 });
  await page.waitForSelector('.cm-editor, .CodeMirror, .monaco-editor', { timeout: 20000 });
  // Type a query into the operation editor.
  const editor = page
    .locator('.graphiql-query-editor .CodeMirror, .graphiql-query-editor .monaco-editor, .graphiql-editor')
    .first();
  await editor.click();
  await page.keyboard.press('Control+A');
  await page.keyboard.press('Delete');
  await page.keyboard.type('{ serverInfo { name version features } }');
  await page.keyboard.press('Escape');
  await page.click('.graphiql-execute-button');
  await page.waitForFunction(() => (document.body.textContent ?? '').includes('"features"'), null, {
    timeout: 15000,
  });
  await page.waitForTimeout(500);
  await page.screenshot({ path: shot });
  console.log(
    `screenshot: ${shot}; requests leaving localhost: ${external.length ? external.join(', ') : 'none'}`,
  );
  if (external.length) process.exitCode = 1;
  await browser.close();
} finally {
  srv.kill('SIGTERM');
  await new Promise((r) => srv.once('exit', r));
  rmSync(dir, { recursive: true, force: true });
}
