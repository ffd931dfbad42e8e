/** loadConfig: defaults, validation naming the variable at fault, production rules. */
import assert from 'node:assert/strict';
import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { describe, it } from 'node:test';
import { ConfigError, loadConfig } from '../api/config.ts';

const SECRET = 'x'.repeat(40);

describe('loadConfig', () => {
  it('has the documented defaults', () => {
    const dir = mkdtempSync(path.join(tmpdir(), 'banter-cfg-'));
    try {
      const c = loadConfig({ DATA_DIR: dir });
      assert.equal(c.port, 4000);
      assert.equal(c.databaseUrl, undefined);
      assert.equal(c.redisUrl, undefined);
      assert.equal(c.rateLimits, true);
      assert.equal(c.graphiql, true);
      assert.equal(c.maxBodyBytes, 1024 * 1024);
      assert.equal(c.logLevel, 'info');
      // scrypt's N = 2^14 for new password hashes; the test harness's lower cost is an override only.
      assert.equal(c.passwordHashCost, 14);
      // The generated secret is kept in DATA_DIR and reused.
      assert.ok(c.jwtSecret.length >= 32);
      assert.equal(readFileSync(path.join(dir, 'jwt-secret'), 'utf8').trim(), c.jwtSecret);
      assert.equal(loadConfig({ DATA_DIR: dir }).jwtSecret, c.jwtSecret);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it('refuses bad values with a message naming the variable', () => {
    const cases: [string, string][] = [
      ['PORT', '-1'],
      ['PORT', '4000.5'],
      ['DATABASE_POOL_SIZE', '0'],
      ['DATABASE_QUERY_TIMEOUT_MS', '-5'],
      ['DATABASE_URL', 'not a url'],
      ['DATABASE_URL', 'mysql://localhost/x'],
      ['REDIS_URL', 'http://localhost'],
      ['RATE_LIMITS', 'maybe'],
      ['GRAPHIQL', 'yes please'],
      ['LOG_LEVEL', 'loud'],
      ['JWT_SECRET', 'short'],
      ['MAX_BODY_BYTES', '10'],
      ['S3_ENDPOINT', 'ftp://x'],
    ];
    for (const [name, value] of cases) {
      assert.throws(
        () => loadConfig({ JWT_SECRET: SECRET, DATA_DIR: tmpdir(), [name]: value }),
        (err: Error) =>
          err instanceof ConfigError && err.message.includes(name) && !err.message.includes('\n'),
        `${name}=${value}`,
      );
    }
    assert.throws(
      () => loadConfig({ JWT_SECRET: SECRET, TYPESENSE_URL: 'http://ts:8108' }),
      /TYPESENSE_API_KEY/,
    );
  });

  it('RATE_LIMITS=off turns limits off', () => {
    assert.equal(loadConfig({ JWT_SECRET: SECRET, RATE_LIMITS: 'off' }).rateLimits, false);
    assert.equal(loadConfig({ JWT_SECRET: SECRET, RATE_LIMITS: 'on' }).rateLimits, true);
  });

  it('production needs JWT_SECRET, never writes one, and turns GraphiQL off by default', () => {
    const dir = mkdtempSync(path.join(tmpdir(), 'banter-cfg-'));
    try {
      assert.throws(() => loadConfig({ NODE_ENV: 'production', DATA_DIR: dir }), /JWT_SECRET/);
      assert.equal(existsSync(path.join(dir, 'jwt-secret')), false);
      const prod = loadConfig({ NODE_ENV: 'production', JWT_SECRET: SECRET });
      assert.equal(prod.graphiql, false);
      assert.equal(prod.jwtSecret, SECRET);
      assert.equal(
        loadConfig({ NODE_ENV: 'production', JWT_SECRET: SECRET, GRAPHIQL: 'true' }).graphiql,
        true,
      );
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});
