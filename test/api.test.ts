/**
 * The API's operational surface: abuse limits, GraphQL over HTTP, health, readiness, metrics,
 * logs and request ids. Rate limits are in test/limits.test.ts, process behaviour in process.test.ts.
 */
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { monitorEventLoopDelay } from 'node:perf_hooks';
import { Writable } from 'node:stream';
import { after, before, describe, it } from 'node:test';
import { sql } from 'drizzle-orm';
import { getIntrospectionQuery, Kind, parse, validate } from 'graphql';
import { type App, buildApp } from '../api/app.ts';
import { ARMOR_LIMITS, expandedSelections, subscriptionRootRule } from '../api/armor.ts';
import { loadConfig } from '../api/config.ts';
import { createLogger } from '../api/logger.ts';
import { MAX_OPERATION_NAMES } from '../api/metrics.ts';
import { newId } from '../core/ids.ts';
import { encodeId } from '../schema/builder.ts';
import { buildSchema } from '../schema/index.ts';
import { createTestApp, createTestDatabase, gql, onPostgres, signUp, type TestApp } from './helpers.ts';
import { guildWithChannel, invite, rawSocket, sseStream, untilLive } from './realtime-helpers.ts';

let app: TestApp;
let base: string;
before(async () => {
  app = await createTestApp();
  base = `http://127.0.0.1:${await app.start(0)}`;
});
after(() => app.destroy());

const post = (body: unknown, headers: Record<string, string> = {}) =>
  fetch(`${base}/graphql`, {
    method: 'POST',
    headers: { 'content-type': 'application/json', accept: 'application/graphql-response+json', ...headers },
    body: typeof body === 'string' ? body : JSON.stringify(body),
  });

/** Asserts a 4xx-class GraphQL refusal: an error with a code and no data. */
async function refused(query: string, code = 'BAD_USER_INPUT', match?: RegExp) {
  const r = await gql(app, query);
  assert.ok(r.errors?.length, `expected errors for ${query.slice(0, 80)}`);
  assert.ok(r.status >= 400 && r.status < 500, `status ${r.status}`);
  assert.equal(r.data ?? undefined, undefined);
  assert.equal(r.errors![0].extensions?.code, code, JSON.stringify(r.errors));
  if (match) assert.match(r.errors![0].message, match);
  return r;
}

/** `{ __type { fields { type { fields ... } } } }`: n nested `fields` lists. */
const nested = (n: number) =>
  `{ __type(name: "Query") { ${'fields { type { '.repeat(n)} name ${'} } '.repeat(n)} } }`;

/** guild > channels > guild > ...: depth 2 + 2k. */
const deepGuild = (k: number) =>
  `{ guild(id: "x") { ${'channels { guild { '.repeat(k)} id ${'} } '.repeat(k)} } }`;

/** `text` parsed, with every look into a fragment (a read of its selectionSet) counted. */
function countingFragmentReads(text: string) {
  const doc = parse(text);
  let reads = 0;
  for (const d of doc.definitions) {
    if (d.kind !== Kind.FRAGMENT_DEFINITION) continue;
    const set = d.selectionSet;
    Object.defineProperty(d, 'selectionSet', {
      enumerable: true,
      get() {
        reads++;
        return set;
      },
    });
  }
  return { doc, reads: () => reads };
}

describe('abuse limits', () => {
  it("admits GraphiQL's introspection query and ordinary queries", async () => {
    const full = getIntrospectionQuery({
      descriptions: true,
      specifiedByUrl: true,
      directiveIsRepeatable: true,
      schemaDescription: true,
      inputValueDeprecation: true,
      oneOf: true,
    });
    const r = await gql(app, full);
    assert.equal(r.errors, undefined, JSON.stringify(r.errors));
    assert.ok(r.data.__schema.types.length > 10);
    const u = await signUp(app);
    const q = await gql(
      app,
      `query Home { viewer { user { id username displayName avatarUrl } sessions { id current } }
        serverInfo { name version } }`,
      {},
      { token: u.token },
    );
    assert.equal(q.errors, undefined, JSON.stringify(q.errors));
  });

  it('refuses a query deeper than the depth limit', async () => {
    const within = await gql(app, deepGuild(4));
    assert.equal(within.status, 200, JSON.stringify(within.errors));
    await refused(deepGuild(ARMOR_LIMITS.maxDepth / 2), 'BAD_USER_INPUT', /depth limit/i);
  });

  it('refuses too many aliases, directives and tokens, and costly queries', async () => {
    const aliases = Array.from(
      { length: ARMOR_LIMITS.maxAliases + 1 },
      (_, i) => `a${i}: serverInfo { name }`,
    ).join(' ');
    await refused(`{ ${aliases} }`, 'BAD_USER_INPUT', /alias/i);
    const directives = '@include(if: true) '.repeat(ARMOR_LIMITS.maxDirectives + 1);
    await refused(`{ __typename ${directives} }`, 'BAD_USER_INPUT', /directive/i);
    const tokens = '__typename '.repeat(ARMOR_LIMITS.maxTokens + 1);
    await refused(`{ ${tokens} }`, 'GRAPHQL_PARSE_FAILED', /token/i);
    // Within every other limit, but broad at each level: cost multiplies.
    const wide = 'id name topic type';
    const level = (inner: string) => `channels { ${wide} guild { id name ${inner} } }`;
    const costly = `{ ${Array.from({ length: 19 }, (_, i) => `g${i}: guild(id: "x") { ${level(level(level(level('id'))))} }`).join(' ')} }`;
    await refused(costly, 'BAD_USER_INPUT', /cost/i);
  });

  it("a page's size over its bound (messages(first: 1000)) is answered with the bound (BAD_USER_INPUT), not a cost the client cannot act on; the cost counts it at the bound, so a costly query is still refused", async () => {
    const u = await signUp(app);
    const { channelId } = await guildWithChannel(app, u.token);
    const page = (arg: string) => `messages(${arg}) { edges { node { id content } } }`;
    const query = (...pages: string[]) =>
      `query($c: ID!) { channel(id: $c) { ${pages.map((p, i) => `p${i}: ${p}`).join(' ')} } }`;
    for (const arg of ['first: 1000', 'last: 1000']) {
      const r = await gql(app, query(page(arg)), { c: channelId }, { token: u.token });
      assert.deepEqual(
        r.errors?.map((e) => [e.extensions?.code, e.message]),
        [['BAD_USER_INPUT', `${arg.split(':')[0]} must be between 0 and 100.`]],
        arg,
      );
    }
    const within = await gql(app, query(page('first: 100')), { c: channelId }, { token: u.token });
    assert.equal(within.status, 200, JSON.stringify(within.errors));
    assert.equal(within.errors, undefined);
    // Four pages of 100 cost more than maxCost (8000); so do four of 1000, counted at 100.
    for (const arg of ['first: 100', 'first: 1000', 'last: 100000']) {
      const pages = Array.from({ length: 4 }, () => page(arg));
      const r = await gql(app, query(...pages), { c: channelId }, { token: u.token });
      assert.equal(r.errors?.[0]?.extensions?.code, 'BAD_USER_INPUT', arg);
      assert.match(String(r.errors?.[0]?.message), /cost limit/i, arg);
    }
  });

  it('a page given beside a null first/last (messages(last: null, first: 100)) is costed at its size, as the resolver serves it', async () => {
    const u = await signUp(app);
    const { channelId } = await guildWithChannel(app, u.token);
    const page = (args: string) => `messages(${args}) { edges { node { id content } } }`;
    const query = (...pages: string[]) =>
      `query($c: ID!) { channel(id: $c) { ${pages.map((p, i) => `p${i}: ${p}`).join(' ')} } }`;
    for (const args of ['last: null, first: 100', 'first: null, last: 100']) {
      // One is served (null is no argument to the resolver): a page of 100.
      const one = await gql(app, query(page(args)), { c: channelId }, { token: u.token });
      assert.equal(one.errors, undefined, `${args}: ${JSON.stringify(one.errors)}`);
      // Four cost what four pages of 100 do (over maxCost), not four of 1.
      const r = await gql(
        app,
        query(...Array.from({ length: 4 }, () => page(args))),
        { c: channelId },
        { token: u.token },
      );
      assert.equal(
        r.errors?.[0]?.extensions?.code,
        'BAD_USER_INPUT',
        `${args}: ${JSON.stringify(r.errors ?? r.data)}`,
      );
      assert.match(String(r.errors?.[0]?.message), /cost limit/i, args);
    }
  });

  it('counts aliases of __typename toward the alias limit, as aliases of any other field', async () => {
    const typenames = (n: number) => Array.from({ length: n }, (_, i) => `t${i}: __typename`).join(' ');
    const within = await gql(app, `{ ${typenames(ARMOR_LIMITS.maxAliases)} }`);
    assert.equal(within.status, 200, JSON.stringify(within.errors));
    assert.equal(within.data.t0, 'Query');
    // Before: armor's default allowList (['__typename']) left them out of the count, and any
    // number of them passed.
    await refused(`{ ${typenames(ARMOR_LIMITS.maxAliases + 1)} }`, 'BAD_USER_INPUT', /alias/i);
  });

  it('refuses introspection that nests type lists (exponential responses)', async () => {
    const r = await refused(
      nested(ARMOR_LIMITS.maxIntrospectionLists + 1),
      'BAD_USER_INPUT',
      /Introspection nests lists/,
    );
    assert.ok(r.errors);
    // Through fragments too.
    await refused(
      `{ __schema { ...T } } fragment T on __Schema { types { fields { type { ...F } } } }
       fragment F on __Type { fields { type { fields { name } } } }`,
      'BAD_USER_INPUT',
      /Introspection nests lists/,
    );
  });

  // The rule that refuses @skip/@include at a subscription's root looks through the fragments
  // the root is made of. It walked each fragment once per path to it: a fragment spread twice by
  // each one before it (a few hundred bytes, well under the token limit) was walked 2^n times,
  // blocking the event loop of one request for 12 s at n = 22 (graphql-js's own rule: 9 ms).
  it("looks into each fragment of a subscription's root once for @skip/@include, not once per path (2^n walks before)", () => {
    const n = 16;
    let text = 'subscription { ...F0 }\n';
    for (let i = 0; i < n; i++) text += `fragment F${i} on Subscription { ...F${i + 1} ...F${i + 1} }\n`;
    text += `fragment F${n} on Subscription { events { cursor } }`;
    const { doc, reads } = countingFragmentReads(text);
    assert.deepEqual(validate(buildSchema(), doc, [subscriptionRootRule]), []);
    // Once by the visitor, once by graphql-js's own rule (which it calls), once by the walk.
    assert.ok(reads() <= 3 * (n + 1), `${reads()} reads of ${n + 1} fragments`);
  });

  // Armor's depth and cost checks (and the introspection rule) walk a fragment once per path to
  // it: fragments that each spread the next twice make 2^n paths (n = 20: ~2.5 s of the event
  // loop for one request, over HTTP or a socket; the token limit allows n ~ 290). The document's
  // size with its fragments expanded is counted first, each fragment once, and refused past
  // maxExpandedSelections before any rule walks it.
  it('refuses at once a document whose fragments each spread the next twice (2^n paths for the depth and cost checks)', async () => {
    const doubling = (n: number, last: string) => {
      let text = '{ ...F0 }\n';
      for (let i = 0; i < n; i++) text += `fragment F${i} on Query { ...F${i + 1} ...F${i + 1} }\n`;
      return `${text}fragment F${n} on Query { ${last} }`;
    };
    await refused(doubling(22, 'viewer { user { id } }'), 'BAD_USER_INPUT', /expands to more than/);
    // Within the bound, armor's checks still answer, through the fragments (cost or depth first).
    await refused(
      doubling(
        4,
        `${'viewer { user { '.repeat(ARMOR_LIMITS.maxDepth)}id${' } }'.repeat(ARMOR_LIMITS.maxDepth)}`,
      ),
      'BAD_USER_INPUT',
      /depth limit|cost limit/i,
    );
    // The count reads each fragment once, however many paths lead to it.
    const { doc, reads } = countingFragmentReads(doubling(40, '__typename'));
    assert.equal(
      expandedSelections(doc, ARMOR_LIMITS.maxExpandedSelections),
      ARMOR_LIMITS.maxExpandedSelections + 1,
    );
    assert.ok(reads() <= 41, `${reads()} reads of 41 fragments`);
    // GraphiQL's introspection query is far within it.
    const full = parse(
      getIntrospectionQuery({ descriptions: true, inputValueDeprecation: true, oneOf: true }),
    );
    assert.ok(expandedSelections(full, ARMOR_LIMITS.maxExpandedSelections) < 1_000);
  });

  it('refuses batched (array) bodies', async () => {
    const res = await post([{ query: '{ __typename }' }, { query: '{ __typename }' }]);
    assert.ok(res.status >= 400 && res.status < 500, `status ${res.status}`);
    const body = (await res.json()) as { errors?: unknown[] };
    assert.ok(body.errors?.length);
  });

  it('answers 413 to a body over MAX_BODY_BYTES, and the server stays up', async () => {
    const big = JSON.stringify({
      query: `{ __typename }`,
      variables: { s: 'x'.repeat(app.config.maxBodyBytes) },
    });
    const res = await post(big);
    assert.equal(res.status, 413);
    const body = (await res.json()) as { errors: { extensions: { code: string } }[] };
    assert.equal(body.errors[0].extensions.code, 'BAD_USER_INPUT');
    assert.equal((await fetch(`${base}/healthz`)).status, 200);
  });

  it('hostile queries get errors, never a crash or a stalled event loop', async () => {
    const h = monitorEventLoopDelay({ resolution: 10 });
    h.enable();
    const hostile = [
      // deeply nested selections
      `{ ${'viewer { '.repeat(5000)}${'}'.repeat(5000)} }`,
      // huge alias fan-out
      `{ ${Array.from({ length: 20000 }, (_, i) => `a${i}: serverInfo { name }`).join(' ')} }`,
      // a ~1 MB string literal (just under the body cap)
      `{ guild(id: "${'x'.repeat(1_000_000)}") { id } }`,
      // many fragments
      `{ ...F0 } ${Array.from({ length: 5000 }, (_, i) => `fragment F${i} on Query { ...F${i + 1} __typename }`).join(' ')} fragment F5000 on Query { __typename }`,
      // fragment cycle
      `{ ...A } fragment A on Query { ...B } fragment B on Query { ...A }`,
      // unbalanced garbage
      '{'.repeat(200_000),
    ];
    for (const q of hostile) {
      const res = await post({ query: q });
      // 4xx when refused before execution; the 1 MB id reaches its resolver and fails there (200).
      assert.ok(res.status < 500, `status ${res.status} for ${q.slice(0, 40)}`);
      const body = (await res.json()) as { errors?: { extensions?: { code?: string } }[] };
      assert.ok(body.errors?.length, q.slice(0, 40));
      assert.ok(body.errors![0].extensions?.code, JSON.stringify(body.errors![0]).slice(0, 200));
    }
    h.disable();
    const maxMs = h.max / 1e6;
    assert.ok(maxMs < 1000, `event loop stalled for ${maxMs.toFixed(0)} ms`);
    assert.equal((await fetch(`${base}/healthz`)).status, 200);
  });
});

describe('GraphQL over HTTP', () => {
  it('serves GET queries and refuses GET mutations with 405', async () => {
    const q = encodeURIComponent('{ serverInfo { name } }');
    const res = await fetch(`${base}/graphql?query=${q}`, { headers: { accept: 'application/json' } });
    assert.equal(res.status, 200);
    assert.equal(((await res.json()) as any).data.serverInfo.name, 'Banter');
    const m = encodeURIComponent('mutation { logout }');
    const res2 = await fetch(`${base}/graphql?query=${m}`, {
      headers: { accept: 'application/graphql-response+json' },
    });
    assert.equal(res2.status, 405);
    assert.match(res2.headers.get('allow') ?? '', /POST/);
  });

  it('uses the graphql-response+json status codes for parse and validation errors', async () => {
    const parse = await post({ query: '{ serverInfo { ' });
    assert.equal(parse.status, 400);
    assert.match(parse.headers.get('content-type') ?? '', /application\/graphql-response\+json/);
    const invalid = await post({ query: '{ noSuchField }' });
    assert.equal(invalid.status, 400);
    const okRes = await post({ query: '{ serverInfo { name } }' });
    assert.equal(okRes.status, 200);
    // A resolver error is still 200 with data (the request itself was well-formed).
    const notFound = await post({ query: '{ guild(id: "nope") { id } }' });
    assert.equal(notFound.status, 200);
    const body = (await notFound.json()) as { errors: { extensions: { code: string } }[] };
    assert.equal(body.errors[0].extensions.code, 'UNAUTHENTICATED');
  });

  it('answers 404 off the known paths', async () => {
    assert.equal((await fetch(`${base}/nope`)).status, 404);
  });
});

describe('health, readiness, metrics', () => {
  it('healthz and readyz answer 200 when the database (and Redis) answer', async () => {
    const h = await fetch(`${base}/healthz`);
    assert.equal(h.status, 200);
    const r = await fetch(`${base}/readyz`);
    assert.equal(r.status, 200);
    const body = (await r.json()) as { checks: Record<string, string> };
    assert.equal(body.checks.database, 'ok');
    if (app.config.redisUrl) assert.equal(body.checks.redis, 'ok');
  });

  it('metrics has request counts, latency, errors by code and the pool gauge after traffic', async () => {
    await post({ query: '{ serverInfo { name } }' });
    await post({ query: '{ guild(id: "nope") { id } }' });
    const res = await fetch(`${base}/metrics`);
    assert.equal(res.status, 200);
    assert.match(res.headers.get('content-type') ?? '', /text\/plain/);
    const text = await res.text();
    assert.match(text, /banter_http_requests_total\{method="POST",route="graphql",status="200"\} \d+/);
    assert.match(text, /banter_http_request_duration_seconds_bucket\{le="0.1",route="graphql"\} \d+/);
    assert.match(text, /banter_graphql_errors_total\{code="UNAUTHENTICATED"\} \d+/);
    assert.match(text, /banter_graphql_operations_total\{type="query",name="anonymous"\} \d+/);
    assert.match(text, /banter_db_pool_connections\{state="total"\} \d+/);
    assert.match(text, /process_cpu_seconds_total/);
  });

  it('a subscription counts once in banter_graphql_operations_total whatever its transport: socket, SSE; and a socket query once', async () => {
    const tag = randomBytes(3).toString('hex');
    const u = await signUp(app);
    const s = rawSocket(`${base.replace('http:', 'ws:')}/graphql`);
    await s.send({ type: 'connection_init', payload: { authorization: `Bearer ${u.token}` } });
    await s.until(() => s.messages.some((m) => m.type === 'connection_ack'), 'ack');
    await s.send({
      id: 'q',
      type: 'subscribe',
      payload: { query: `query WsQuery${tag} { serverInfo { name } }` },
    });
    await s.until(() => s.messages.some((m) => m.id === 'q' && m.type === 'complete'), 'the query');
    await s.send({
      id: 's',
      type: 'subscribe',
      payload: { query: `subscription WsSub${tag} { events { cursor } }` },
    });
    await untilLive(app, [u]);
    const sse = sseStream(`${base}/graphql`, u.token, {
      query: `subscription SseSub${tag} { events { cursor } }`,
    });
    await untilLive(app, [u], 2);
    const text = await (await fetch(`${base}/metrics`)).text();
    sse.stop();
    s.ws.close();
    const count = (type: string, name: string) =>
      Number(
        new RegExp(`banter_graphql_operations_total\\{type="${type}",name="${name}"\\} (\\d+)`).exec(
          text,
        )?.[1] ?? 0,
      );
    // Before: the socket's and SSE's subscriptions were not counted at all (0, 0).
    assert.deepEqual(
      [
        count('query', `WsQuery${tag}`),
        count('subscription', `WsSub${tag}`),
        count('subscription', `SseSub${tag}`),
      ],
      [1, 1, 1],
      'socket query, socket subscription, SSE subscription',
    );
  });

  // Before the test below: it fills every name slot, and a name counted as (other) then says nothing.
  it('a long operation name is not a label: it counts as (other), not a series the size of the name kept and scraped for good', async () => {
    const name = `Long${randomBytes(3).toString('hex')}${'x'.repeat(100_000)}`;
    const r = await post({ query: `query ${name} { serverInfo { name } }` });
    assert.equal(r.status, 200);
    const text = await (await fetch(`${base}/metrics`)).text();
    // Before: a 100,000-character label, one of MAX_OPERATION_NAMES (about 200 x the body limit,
    // 1 MiB, in the registry and in every scrape).
    assert.ok(!text.includes(name.slice(0, 200)), `a ${name.length}-character label in /metrics`);
    assert.match(text, /banter_graphql_operations_total\{type="query",name="\(other\)"\} \d+/);
  });

  it('counts the operation that ran (operationName), not the first one of the document', async () => {
    const tag = randomBytes(3).toString('hex');
    const q = `query First${tag} { serverInfo { name } } query Second${tag} { serverInfo { name } }`;
    const r = await post({ query: q, operationName: `Second${tag}` });
    assert.equal(r.status, 200);
    const text = await (await fetch(`${base}/metrics`)).text();
    // Before: counted as First (it never ran), Second not at all.
    assert.match(text, new RegExp(`banter_graphql_operations_total\\{type="query",name="Second${tag}"\\} 1`));
    assert.ok(!text.includes(`First${tag}`), 'the operation that did not run is counted');
  });

  it('operation names a client makes up do not each add a series for good (at most MAX_OPERATION_NAMES)', async () => {
    const tag = randomBytes(3).toString('hex');
    for (let i = 0; i < MAX_OPERATION_NAMES + 50; i++) {
      const r = await post({ query: `query Made${tag}_${i} { serverInfo { name } }` });
      assert.equal(r.status, 200);
    }
    const text = await (await fetch(`${base}/metrics`)).text();
    const series = text.split('\n').filter((l) => l.startsWith('banter_graphql_operations_total{'));
    // Before: one series per name, 250 of them here, kept and scraped for the life of the process.
    // Now: MAX_OPERATION_NAMES names, and (other) and anonymous for each operation type.
    assert.ok(series.length <= MAX_OPERATION_NAMES + 6, `${series.length} operation series`);
    assert.match(text, /banter_graphql_operations_total\{type="query",name="\(other\)"\} \d+/);
  });
});

describe('readiness with Redis configured', () => {
  it('answers 503 naming redis when its Redis goes away', async (t) => {
    const port = 6390 + Math.floor(Math.random() * 500);
    const pidfile = path.join(tmpdir(), `banter-redis-${port}-${randomBytes(3).toString('hex')}.pid`);
    execFileSync('redis-server', [
      '--port',
      String(port),
      '--save',
      '',
      '--appendonly',
      'no',
      '--daemonize',
      'yes',
      '--pidfile',
      pidfile,
    ]);
    let pid = 0;
    for (let i = 0; i < 50 && !pid; i++) {
      try {
        pid = Number(readFileSync(pidfile, 'utf8').trim());
      } catch {
        await new Promise((r) => setTimeout(r, 50));
      }
    }
    const kill = () => {
      try {
        if (pid) process.kill(pid, 'SIGKILL');
      } catch {}
    };
    t.after(kill);
    const a = await createTestApp({ redisUrl: `redis://127.0.0.1:${port}` });
    t.after(() => a.destroy());
    const url = `http://127.0.0.1:${await a.start(0)}/readyz`;
    const up = await fetch(url);
    assert.equal(up.status, 200, await up.clone().text());
    kill();
    // SIGKILL is delivered when the kernel gets to it: on a loaded machine the server may still
    // answer a ping or two. Wait (bounded) until it is gone.
    for (let i = 0; i < 100; i++) {
      try {
        process.kill(pid, 0);
      } catch {
        break;
      }
      await new Promise((r) => setTimeout(r, 20));
    }
    const down = await fetch(url);
    assert.equal(down.status, 503);
    const body = (await down.json()) as { status: string; checks: Record<string, string> };
    assert.equal(body.status, 'unavailable');
    assert.match(body.checks.redis, /^down/);
    assert.equal(body.checks.database, 'ok');
  });
});

describe('logs and request ids', () => {
  let logged: Record<string, any>[] = [];
  let a: App;
  let url: string;
  let drop: (() => Promise<void>) | undefined;
  before(async () => {
    const sink = new Writable({
      write(chunk, _enc, cb) {
        for (const line of String(chunk).split('\n')) if (line) logged.push(JSON.parse(line));
        cb();
      },
    });
    const db = onPostgres ? await createTestDatabase() : undefined;
    drop = db?.drop;
    const config = loadConfig(
      { NODE_ENV: 'test', ...(db ? { DATABASE_URL: db.url } : {}) },
      { dataDir: 'memory://', jwtSecret: randomBytes(32).toString('hex'), logLevel: 'debug' },
    );
    a = await buildApp(config, { logger: createLogger('debug', sink) });
    url = `http://127.0.0.1:${await a.start(0)}/graphql`;
  });
  after(async () => {
    await a.stop();
    await drop?.();
  });

  const call = (query: string, headers: Record<string, string> = {}) =>
    fetch(url, {
      method: 'POST',
      headers: { 'content-type': 'application/json', ...headers },
      body: JSON.stringify({ query }),
    });

  it('echoes x-request-id, or makes one up', async () => {
    const r1 = await call('{ serverInfo { name } }', { 'x-request-id': 'trace-abc-123' });
    assert.equal(r1.headers.get('x-request-id'), 'trace-abc-123');
    const r2 = await call('{ serverInfo { name } }');
    assert.match(r2.headers.get('x-request-id') ?? '', /^[0-9a-f-]{36}$/);
  });

  it("logs a client's mistakes below warn: they are not the server's errors", async () => {
    const u = await signUp(a);
    logged = [];
    const body = async (query: string) =>
      (await (
        await fetch(url, {
          method: 'POST',
          headers: { 'content-type': 'application/json', authorization: `Bearer ${u.token}` },
          body: JSON.stringify({ query }),
        })
      ).json()) as { errors: { extensions: { code: string } }[] };
    const missing = encodeId('Channel', newId());
    const sent = await body(
      `mutation { sendMessage(input: { channelId: "${missing}", content: "x" }) { id } }`,
    );
    assert.equal(sent.errors[0].extensions.code, 'NOT_FOUND');
    const bad = await body('mutation { sendMessage(input: { channelId: "nope", content: "x" }) { id } }');
    assert.equal(bad.errors[0].extensions.code, 'BAD_USER_INPUT');
    const loud = logged.filter((l) => l.level >= 40);
    assert.deepEqual(loud, []);
  });

  it('masks unexpected errors with the request id, logs them with the stack, ids on every line', async () => {
    const u = await signUp(a);
    // A real failure underneath: the table the resolver writes to is gone for a moment.
    await a.deps.db.execute(sql`alter table guilds rename to guilds_gone`);
    logged = [];
    let res: Response;
    try {
      res = await fetch(url, {
        method: 'POST',
        headers: { 'content-type': 'application/json', authorization: `Bearer ${u.token}` },
        body: JSON.stringify({ query: 'mutation { createGuild(input: { name: "Boom" }) { id } }' }),
      });
    } finally {
      await a.deps.db.execute(sql`alter table guilds_gone rename to guilds`);
    }
    const requestId = res.headers.get('x-request-id');
    const body = (await res.json()) as { errors: { message: string; extensions: Record<string, unknown> }[] };
    const e = body.errors[0];
    assert.equal(e.extensions.code, 'INTERNAL_SERVER_ERROR');
    assert.equal(e.extensions.requestId, requestId);
    assert.doesNotMatch(e.message, /guilds|relation|exist/i);
    const during = logged.filter((l) => l.msg !== 'banter api listening');
    assert.ok(during.length >= 2, JSON.stringify(during));
    for (const l of during) assert.equal(l.requestId, requestId, JSON.stringify(l));
    const err = during.find((l) => l.msg === 'unexpected error');
    assert.ok(err, 'the error is logged');
    assert.match(err.err.stack, /guilds/);
    assert.ok(during.some((l) => l.msg === 'request' && l.status === 200));
  });

  it('over the socket too, an unexpected error carries a request id, the one on its log lines (neither had one)', async () => {
    const u = await signUp(a);
    const s = rawSocket(url.replace('http:', 'ws:'));
    await s.send({ type: 'connection_init', payload: { authorization: `Bearer ${u.token}` } });
    await s.until(() => s.messages.some((m) => m.type === 'connection_ack'), 'connection_ack');
    await a.deps.db.execute(sql`alter table guilds rename to guilds_gone`);
    logged = [];
    try {
      await s.send({
        id: 'boom',
        type: 'subscribe',
        payload: { query: 'mutation { createGuild(input: { name: "Boom" }) { id } }' },
      });
      await s.until(() => s.messages.some((m) => m.id === 'boom' && m.type === 'next'), 'its result');
    } finally {
      await a.deps.db.execute(sql`alter table guilds_gone rename to guilds`);
      s.ws.close();
    }
    const e = s.messages.find((m) => m.id === 'boom' && m.type === 'next').payload.errors[0];
    assert.equal(e.extensions.code, 'INTERNAL_SERVER_ERROR');
    assert.match(String(e.extensions.requestId), /^[0-9a-f-]{36}$/);
    const err = logged.find((l) => l.msg === 'unexpected error');
    assert.ok(err, 'the error is logged');
    assert.equal(err.requestId, e.extensions.requestId);
  });

  // The log is read, and its rows executed for every subscriber, by whatever started the read: a
  // write's request (its follow-up read, or a statement grouping several users' sends), so an
  // event's failure was logged under the id of another user's request (its client may choose it:
  // x-request-id), which a socket's mutation now has too. It is logged under the id of the socket
  // operation that executed it.
  it("an event's execution for a socket subscriber is logged under that operation's request id, not the id of the request that wrote the event (another user's)", async () => {
    const [writer, reader] = [await signUp(a), await signUp(a)];
    const { guildId, channelId } = await guildWithChannel(a, writer.token);
    await invite(a, writer.token, guildId, reader.token);
    const s = rawSocket(url.replace('http:', 'ws:'));
    await s.send({ type: 'connection_init', payload: { authorization: `Bearer ${reader.token}` } });
    await s.until(() => s.messages.some((m) => m.type === 'connection_ack'), 'connection_ack');
    const query = 'subscription { events { ... on MessageCreated { message { id reactions { emoji } } } } }';
    await s.send({ id: 'e', type: 'subscribe', payload: { query } });
    await untilLive(a, [reader]);
    // The message is written; its event's execution (the reactions it reads) fails.
    await a.deps.db.execute(sql`alter table reactions rename to reactions_away`);
    logged = [];
    try {
      const res = await fetch(url, {
        method: 'POST',
        headers: {
          'content-type': 'application/json',
          authorization: `Bearer ${writer.token}`,
          'x-request-id': 'the-writers-request',
        },
        body: JSON.stringify({
          query: 'mutation($i: SendMessageInput!) { sendMessage(input: $i) { id } }',
          variables: { i: { channelId, content: 'hello' } },
        }),
      });
      assert.equal(res.status, 200);
      // Held back: the subscriber is cut off to resume from before it.
      assert.equal(await s.closedWith(), 1013);
    } finally {
      await a.deps.db.execute(sql`alter table reactions_away rename to reactions`);
      s.ws.close();
    }
    const lines = logged.filter(
      (l) => l.msg === 'unexpected error' || String(l.msg).startsWith('event execution failed'),
    );
    // The masked error, and the execution's failure (its subscriber cut off).
    assert.deepEqual(
      [...new Set(lines.map((l) => String(l.msg).split(':')[0]))].sort(),
      ['event execution failed', 'unexpected error'],
      JSON.stringify(logged),
    );
    for (const l of lines) {
      assert.notEqual(l.requestId, 'the-writers-request', l.msg);
      assert.match(String(l.requestId), /^[0-9a-f-]{36}$/, l.msg);
    }
  });
});
