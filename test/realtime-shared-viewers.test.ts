/**
 * Shared subscription execution (api/realtime/shared-execution.ts) between different viewers: two
 * or more users subscribed with the same document over real sockets (and SSE), one event, and each gets the
 * payload its own execution would give. A result is reused only when its execution did not read
 * the viewer and the subscribers' documents and variables are the same.
 */
import assert from 'node:assert/strict';
import { after, before, it } from 'node:test';
import { parse } from 'graphql';
import type { Client } from 'graphql-ws';
import { createMaskError } from '../api/errors.ts';
import { executeEach, startSubscription } from '../api/realtime/shared-execution.ts';
import { requestStore } from '../api/request-store.ts';
import { ROUND_MS } from '../core/realtime/failures.ts';
import { type Delivered, EventFailedError, type Subscription } from '../core/realtime/subscription.ts';
import { authenticate } from '../core/services/auth.service.ts';
import { decodeAnyId } from '../schema/builder.ts';
import { buildSchema } from '../schema/index.ts';
import { createTestApp, ok, signUp, type TestApp, type TestUser } from './helpers.ts';
import {
  channelAccessHelpers,
  connect,
  errorsLogged,
  guildWithChannel,
  invite,
  rawSocket,
  send,
  sleep,
  sseStream,
  untilLive,
} from './realtime-helpers.ts';

let app: TestApp;
let url: string;
before(async () => {
  app = await createTestApp({ rateLimits: false });
  url = `ws://127.0.0.1:${await app.start(0)}/graphql`;
});
after(() => app.destroy());

const { everyoneRole, overwrite, createChannel, hideFromEveryone, denyToEveryone } = channelAccessHelpers(
  () => app,
);

interface Collected {
  events: any[];
  errors: any[];
  until(pred: (events: any[]) => boolean, what: string, ms?: number): Promise<void>;
  close(): Promise<void>;
}

/**
 * `u`'s socket subscribed with `query` and `variables` as given (the suite's helper sends only
 * `after`); collects every `events` payload but presence.
 */
function streamOf(u: TestUser, query: string, variables: Record<string, unknown> = {}): Collected {
  const { client } = connect(url, u.token);
  const events: any[] = [];
  const errors: any[] = [];
  (client as Client).subscribe(
    { query, variables },
    {
      next: (r: any) => {
        if (r.errors) errors.push(...r.errors);
        else if (r.data.events.__typename !== 'PresenceChanged') events.push(r.data.events);
      },
      error: (e: any) => errors.push(Array.isArray(e) ? e[0] : e),
      complete: () => {},
    },
  );
  return {
    events,
    errors,
    async until(pred, what, ms = 10_000) {
      const deadline = Date.now() + ms;
      while (!pred(events)) {
        if (errors.length) throw new Error(`subscription errors: ${JSON.stringify(errors)}`);
        if (Date.now() > deadline)
          throw new Error(`timed out waiting for ${what}; have ${JSON.stringify(events)}`);
        await new Promise((r) => setTimeout(r, 20));
      }
    },
    close: () => client.dispose() as Promise<void>,
  };
}

const viewerOf = (u: TestUser) => authenticate(app.deps, u.token);

const created = (s: Collected, content: string) =>
  s.events.find((e) => e.__typename === 'MessageCreated' && e.message.content === content);

it('subscribers whose variables differ only in one named $__proto__ do not share an execution: each gets the fields its own @include asked for', async () => {
  const [a, b] = await Promise.all([signUp(app), signUp(app)]);
  const { guildId, channelId } = await guildWithChannel(app, a.token);
  await invite(app, a.token, guildId, b.token);
  // A legal variable name; as an own key of the JSON-parsed variables (as every transport makes
  // them) it is a variable like any other, where an assignment `vars[k] = v` sets a prototype.
  const query = `subscription($__proto__: Boolean!) { events { __typename
    ... on MessageCreated { message { content author { username @include(if: $__proto__) } } } } }`;
  const sa = streamOf(a, query, JSON.parse('{"__proto__": true}'));
  await untilLive(app, [a]);
  const sb = streamOf(b, query, JSON.parse('{"__proto__": false}'));
  try {
    await untilLive(app, [b]);
    await send(app, a.token, channelId, 'shape');
    await sa.until(() => !!created(sa, 'shape'), 'a gets it');
    await sb.until(() => !!created(sb, 'shape'), 'b gets it');
    assert.deepEqual(created(sa, 'shape').message, { content: 'shape', author: { username: a.username } });
    assert.deepEqual(
      created(sb, 'shape').message,
      { content: 'shape', author: {} },
      'b asked for no username',
    );
  } finally {
    await Promise.all([sa.close(), sb.close()]);
  }
});

it('a reply to a message a member may not read: the owner sees what it replies to, the member null, subscribed with the same document', async () => {
  const [o, v] = await Promise.all([signUp(app), signUp(app)]);
  const { guildId, channelId } = await guildWithChannel(app, o.token);
  await denyToEveryone(o.token, guildId, channelId, 'READ_HISTORY');
  const old = await send(app, o.token, channelId, 'old secret');
  await invite(app, o.token, guildId, v.token);
  const query = `subscription { events { __typename
    ... on MessageCreated { message { content replyTo { content } } } } }`;
  // Whichever of them executes the event first, the other must not be handed its result.
  const first = streamOf(o, query);
  await untilLive(app, [o]);
  const second = streamOf(v, query);
  await untilLive(app, [v]);
  try {
    await ok(
      app,
      `mutation($i: SendMessageInput!) { sendMessage(input: $i) { id } }`,
      { i: { channelId, content: 'the reply', replyToId: old } },
      o.token,
    );
    for (const s of [first, second]) await s.until(() => !!created(s, 'the reply'), 'the reply');
    assert.deepEqual(created(first, 'the reply').message.replyTo, { content: 'old secret' });
    assert.equal(created(second, 'the reply').message.replyTo, null, 'the member is shown the old message');
  } finally {
    await Promise.all([first.close(), second.close()]);
  }
});

it('over SSE too (its own sharing, executeEach): the owner sees what a reply replies to, a member who may not read it null', async () => {
  const [o, v] = await Promise.all([signUp(app), signUp(app)]);
  const { guildId, channelId } = await guildWithChannel(app, o.token);
  await denyToEveryone(o.token, guildId, channelId, 'READ_HISTORY');
  const old = await send(app, o.token, channelId, 'old sse secret');
  await invite(app, o.token, guildId, v.token);
  const query = `subscription($after: String) { events(after: $after) { __typename
    ... on MessageCreated { message { content replyTo { content } } } } }`;
  const http = url.replace('ws:', 'http:');
  const so = sseStream(http, o.token, { query });
  await untilLive(app, [o]);
  const sv = sseStream(http, v.token, { query });
  await untilLive(app, [v]);
  try {
    await ok(
      app,
      `mutation($i: SendMessageInput!) { sendMessage(input: $i) { id } }`,
      { i: { channelId, content: 'the sse reply', replyToId: old } },
      o.token,
    );
    const reply = (s: { events: any[] }) =>
      s.events.find((e) => e.__typename === 'MessageCreated' && e.message.content === 'the sse reply');
    for (const s of [so, sv]) await s.until(() => !!reply(s), 'the reply');
    assert.deepEqual(reply(so).message.replyTo, { content: 'old sse secret' });
    assert.equal(reply(sv).message.replyTo, null, 'the member is shown the old message');
  } finally {
    so.stop();
    sv.stop();
  }
});

it("one event, one document, two viewers: each gets its own nonce, reactions' me, forwarded source, parent category and permissions", async () => {
  const [o, m] = await Promise.all([signUp(app), signUp(app)]);
  const { guildId } = await guildWithChannel(app, o.token);
  await invite(app, o.token, guildId, m.token);
  // A staff channel hidden from m, and a category hidden from m holding a channel m may view.
  const staff = await createChannel(o.token, guildId, 'staff');
  await hideFromEveryone(o.token, guildId, staff);
  const cat = await createChannel(o.token, guildId, 'staff-cat', 'CATEGORY');
  await hideFromEveryone(o.token, guildId, cat);
  const open = await createChannel(o.token, guildId, 'open', 'TEXT', cat);
  await overwrite(o.token, {
    channelId: open,
    targetType: 'ROLE',
    targetId: await everyoneRole(o.token, guildId),
    allow: ['VIEW_CHANNEL', 'READ_HISTORY', 'SEND_MESSAGES', 'ADD_REACTIONS'],
    deny: [],
  });
  const secret = await send(app, o.token, staff, 'staff secret');
  const seen = await ok(app, `query($c: ID!) { channel(id: $c) { parent { id } } }`, { c: open }, m.token);
  assert.equal(seen.channel.parent, null, 'm may view the channel, not its category');

  const query = `subscription { events { __typename
    ... on MessageCreated { message { content nonce forwardedFrom { content }
      channel { parent { name } viewerPermissions } } }
    ... on ReactionAdded { emoji message { content reactions { emoji count me } } } } }`;
  const so = streamOf(o, query);
  await untilLive(app, [o]);
  const sm = streamOf(m, query);
  await untilLive(app, [m]);
  try {
    const r = await ok(
      app,
      `mutation($i: SendMessageInput!) { sendMessage(input: $i) { id } }`,
      { i: { channelId: open, content: 'fwd', forwardedFromId: secret, nonce: 'o-nonce' } },
      o.token,
    );
    await ok(
      app,
      `mutation($m: ID!) { addReaction(messageId: $m, emoji: "👍") { id } }`,
      { m: r.sendMessage.id },
      o.token,
    );
    const reacted = (s: Collected) => s.events.find((e) => e.__typename === 'ReactionAdded');
    for (const s of [so, sm])
      await s.until(() => !!created(s, 'fwd') && !!reacted(s), 'message and reaction');
    const [mo, mm] = [created(so, 'fwd').message, created(sm, 'fwd').message];
    assert.equal(mo.nonce, 'o-nonce');
    assert.equal(mm.nonce, null, "m is shown the author's nonce");
    assert.deepEqual(mo.forwardedFrom, { content: 'staff secret' });
    assert.equal(mm.forwardedFrom, null, 'm is shown a message of a channel hidden from it');
    assert.deepEqual(mo.channel.parent, { name: 'staff-cat' });
    assert.equal(mm.channel.parent, null, 'm is shown a category hidden from it');
    assert.ok(mo.channel.viewerPermissions.includes('MANAGE_CHANNELS'));
    assert.ok(
      !mm.channel.viewerPermissions.includes('MANAGE_CHANNELS'),
      "m is shown the owner's permissions",
    );
    assert.deepEqual(reacted(so).message.reactions, [{ emoji: '👍', count: 1, me: true }]);
    assert.deepEqual(reacted(sm).message.reactions, [{ emoji: '👍', count: 1, me: false }]);
  } finally {
    await Promise.all([so.close(), sm.close()]);
  }
});

it('one document holding two subscriptions: subscribers naming different operations each get their own', async () => {
  const [a, b] = await Promise.all([signUp(app), signUp(app)]);
  const { guildId, channelId } = await guildWithChannel(app, a.token);
  await invite(app, a.token, guildId, b.token);
  // The same string, so the same parsed document (yoga's parse cache): the operation tells them apart.
  const query = `subscription Contents { events { __typename ... on MessageCreated { m: message { content } } } }
    subscription Authors { events { __typename ... on MessageCreated { m: message { content author { username } } } } }`;
  const sub = (u: TestUser, operationName: string) => {
    const { client } = connect(url, u.token);
    const events: any[] = [];
    client.subscribe(
      { query, operationName },
      {
        next: (r: any) => r.data?.events?.m && events.push(r.data.events.m),
        error: () => {},
        complete: () => {},
      },
    );
    return { events, close: () => client.dispose() as Promise<void> };
  };
  const sa = sub(a, 'Contents');
  await untilLive(app, [a]);
  const sb = sub(b, 'Authors');
  await untilLive(app, [b]);
  try {
    await send(app, a.token, channelId, 'two ops');
    const deadline = Date.now() + 10_000;
    while ((!sa.events.length || !sb.events.length) && Date.now() < deadline)
      await new Promise((r) => setTimeout(r, 20));
    assert.deepEqual(sa.events, [{ content: 'two ops' }]);
    assert.deepEqual(sb.events, [{ content: 'two ops', author: { username: a.username } }]);
  } finally {
    await Promise.all([sa.close(), sb.close()]);
  }
});

it("a shared execution that fails for good goes to each subscriber with its own operation's request id (extensions.requestId), not the first's: over SSE another user's, maybe chosen by its client (x-request-id)", {
  timeout: 30_000,
}, async () => {
  // executeEach (the SSE path) on the app's schema and database, each subscriber in its own
  // request's store as yoga runs it. An event that fails to execute every time (its message id is
  // no uuid: the database refuses the statement), viewer-free: shared. It fails for good in its
  // third round (REPEATS, ROUND_MS apart): the first subscriber's execution goes out with its
  // error, and the second takes that result.
  const [a, b] = [await signUp(app), await signUp(app)];
  const schema = buildSchema();
  const document = parse(
    'subscription { events { __typename cursor ... on MessageUpdated { message { id } } } }',
  );
  const mask = createMaskError(app.log, app.metrics);
  const cursor = `e1.${Date.now()}.1`;
  const rowOf = () =>
    ({
      type: 'MESSAGE_UPDATED',
      xid: '1',
      seq: 1,
      cursor,
      guildId: null,
      channelId: null,
      userId: null,
      payload: { messageId: 'not-a-uuid' },
      audience: undefined,
    }) as unknown as Delivered;
  const told: { outcome: string; requestIds: string[]; count: number }[] = [];
  const first = (requestId: string, user: TestUser, row: Delivered) =>
    requestStore.run({ requestId }, async () => {
      const results = executeEach(
        {
          schema,
          document,
          contextValue: { deps: app.deps, viewer: await viewerOf(user), requestId, ip: 'test' },
        },
        {
          next: async () => ({ done: false, value: row }),
          return: async () => ({ done: true, value: undefined }),
        },
        {
          mask,
          counts: { shared: 0, own: 0 },
          onEventFailed(_row, _errors, outcome, reached) {
            told.push({ outcome, ...reached });
          },
        },
      );
      return results.next().catch((err: unknown) => err);
    });
  // Rounds 1 and 2: held back (its subscriber resumes from before it).
  for (let round = 1; round <= 2; round++) {
    assert.ok((await first(`round-${round}`, a, rowOf())) instanceof EventFailedError, `round ${round}`);
    await sleep(ROUND_MS + 100);
  }
  const row = rowOf();
  const ra = (await first('chosen-by-a', a, row)) as IteratorResult<any>;
  const rb = (await first('b-own-request', b, row)) as IteratorResult<any>;
  assert.deepEqual(
    [ra.value.errors[0].extensions, rb.value.errors[0].extensions],
    [
      { code: 'INTERNAL_SERVER_ERROR', requestId: 'chosen-by-a' },
      // Before: { code: 'INTERNAL_SERVER_ERROR', requestId: 'chosen-by-a' }, A's.
      { code: 'INTERNAL_SERVER_ERROR', requestId: 'b-own-request' },
    ],
  );
  // The failure is told with both readers' request ids (B, reading later, maybe in a line of its
  // own). Before: once, with neither (A's was only the line's own, from its context).
  const sent = () => told.filter((t) => t.outcome === 'sent');
  for (let i = 0; i < 100 && sent().reduce((n, t) => n + (t.count ?? 0), 0) < 2; i++) await sleep(20);
  assert.deepEqual(
    sent().flatMap((t) => t.requestIds ?? []),
    ['chosen-by-a', 'b-own-request'],
  );
});

/** A subscription whose MessageUpdated rows execute a load of their message by id. */
const BY_MESSAGE_ID =
  'subscription { events { __typename cursor ... on MessageUpdated { message { id } } } }';

/**
 * A MessageUpdated row of the channel, at `cursor`, that fails to execute every time (its message
 * id is no uuid: the database refuses the statement), as the tailer would hand it to subscribers.
 */
const failingRow = (cursor: string, guildId: string, channelId: string) =>
  ({
    type: 'MESSAGE_UPDATED',
    xid: '999999999999',
    seq: 1,
    cursor,
    guildId: decodeAnyId(guildId).id,
    channelId: decodeAnyId(channelId).id,
    userId: null,
    payload: { messageId: 'not-a-uuid' },
    audience: undefined,
  }) as unknown as Delivered;

/**
 * Rounds 1 and 2 (REPEATS, ROUND_MS apart) of `row`'s failures, executed for `u` through
 * executeEach (the count is per cursor, whichever path failed): held back each time. Its next
 * failure is for good.
 */
async function failTwice(row: () => Delivered, u: TestUser) {
  const schema = buildSchema();
  const document = parse(BY_MESSAGE_ID);
  const mask = createMaskError(app.log, app.metrics);
  for (let round = 1; round <= 2; round++) {
    const requestId = `round-${round}`;
    const held = await requestStore.run({ requestId }, async () =>
      executeEach(
        {
          schema,
          document,
          contextValue: { deps: app.deps, viewer: await viewerOf(u), requestId, ip: 'test' },
        },
        {
          next: async () => ({ done: false, value: row() }),
          return: async () => ({ done: true, value: undefined }),
        },
        { mask, counts: { shared: 0, own: 0 }, onEventFailed() {} },
      )
        .next()
        .catch((err: unknown) => err),
    );
    assert.ok(held instanceof EventFailedError, `round ${round}`);
    await sleep(ROUND_MS + 100);
  }
}

/** The hub's subscriptions made from now on, until `restore()`. */
function subscriptionsMade() {
  const hub = app.deps.realtime!;
  const subscribe = hub.subscribe;
  const subs: Subscription[] = [];
  hub.subscribe = async (...args) => {
    const s = await subscribe(...args);
    subs.push(s as Subscription);
    return s;
  };
  return {
    subs,
    restore() {
      hub.subscribe = subscribe;
    },
  };
}

it("over the socket too (Work, shared bytes): each subscriber of a shared execution that fails for good gets its own operation's request id, not the first's", {
  timeout: 30_000,
}, async () => {
  // startSubscription (the socket's push path) with the hub's own subscriptions; the sinks
  // collect the frames' payloads. The event, pushed to both subscriptions as the tailer pushes
  // a row (one object for all), fails for good in this third round (rounds 1 and 2 through
  // executeEach: the count is per cursor, whichever path failed).
  const [a, b] = [await signUp(app), await signUp(app)];
  const { guildId, channelId } = await guildWithChannel(app, a.token);
  await invite(app, a.token, guildId, b.token);
  const schema = buildSchema();
  const document = parse(BY_MESSAGE_ID);
  const mask = createMaskError(app.log, app.metrics);
  const cursor = `e1.${Date.now()}.2`;
  const rowOf = () => failingRow(cursor, guildId, channelId);
  await failTwice(rowOf, a);
  const { subs, restore } = subscriptionsMade();
  const frames: any[][] = [[], []];
  const running: { stop(): void }[] = [];
  try {
    for (const [i, [u, requestId]] of [
      [a, 'a-request'],
      [b, 'b-request'],
    ].entries() as Iterable<[number, [TestUser, string]]>) {
      const out = {
        socket: { bufferedAmount: 0 } as never,
        next: (r: unknown) => frames[i].push(r) > 0,
        nextEncoded: (json: Buffer) => frames[i].push(JSON.parse(json.toString())) > 0,
        complete() {},
      };
      running.push(
        await requestStore.run({ requestId }, async () =>
          startSubscription(
            {
              schema,
              document,
              contextValue: { deps: app.deps, viewer: await viewerOf(u), requestId, ip: 'test' },
            },
            { mask, counts: { shared: 0, own: 0 }, onSourceError() {}, onEventFailed() {} },
            out,
          ),
        ),
      );
    }
    assert.equal(subs.length, 2);
    const row = rowOf();
    for (const s of subs) s.push(row);
    const deadline = Date.now() + 10_000;
    const failed = () => frames.map((f) => f.filter((r) => r.errors));
    while (failed().some((f) => !f.length) && Date.now() < deadline) await sleep(20);
    assert.deepEqual(
      failed().map((f) => f.map((r) => r.errors[0].extensions)),
      [
        [{ code: 'INTERNAL_SERVER_ERROR', requestId: 'a-request' }],
        // Before: [{ code: 'INTERNAL_SERVER_ERROR', requestId: 'a-request' }], A's.
        [{ code: 'INTERNAL_SERVER_ERROR', requestId: 'b-request' }],
      ],
    );
  } finally {
    restore();
    for (const r of running) r.stop();
  }
});

it("a shared execution that fails is logged with the request id of every subscriber it reached (sent: the one each client got in extensions.requestId; held back: each closed socket's), not the first's alone", {
  timeout: 30_000,
}, async () => {
  // Real sockets, the server's own hooks and logger; the row is pushed to the hub's subscriptions
  // of the three users (one object for all, as the tailer pushes it), as in the test above.
  const users = [await signUp(app), await signUp(app), await signUp(app)];
  const { guildId, channelId } = await guildWithChannel(app, users[0].token);
  for (const u of users.slice(1)) await invite(app, users[0].token, guildId, u.token);
  const forGood = `e1.${Date.now()}.4`;
  await failTwice(() => failingRow(forGood, guildId, channelId), users[0]);
  const { subs, restore } = subscriptionsMade();
  const sockets = users.map(() => rawSocket(url));
  try {
    for (const [i, s] of sockets.entries()) {
      await s.send({ type: 'connection_init', payload: { authorization: `Bearer ${users[i].token}` } });
      await s.until(() => s.messages.some((m) => m.type === 'connection_ack'), 'connection_ack');
      await s.send({ id: 'e', type: 'subscribe', payload: { query: BY_MESSAGE_ID } });
    }
    await untilLive(app, users);
    assert.equal(subs.length, users.length);
    const SENT = 'event execution failed again and again';
    const HELD = 'event execution failed';
    // The lines of an outcome: a subscriber that takes the result after the first line (its
    // permission check still under way when the execution failed) is told in a line of its own.
    const told = (lines: { obj: Record<string, unknown>; msg?: string }[], outcome: string) => {
      const of = lines.filter((l) => l.msg?.split(':')[0] === outcome);
      return {
        requestIds: of.flatMap((l) => (l.obj.requestIds as string[] | undefined) ?? []).sort(),
        n: of.reduce((n, l) => n + ((l.obj.subscribers as number | undefined) ?? 0), 0),
      };
    };
    const { logged } = await errorsLogged(app, async () => {
      // Fails for good (its third round): sent, each subscriber's error with its own request id.
      const sent = failingRow(forGood, guildId, channelId);
      for (const s of subs) s.push(sent);
      for (const s of sockets)
        await s.until(() => s.messages.some((m) => m.type === 'next' && m.payload.errors), 'the error');
      // Fails for the first time: held back, every socket closed to resume from before it.
      const held = failingRow(`e1.${Date.now()}.5`, guildId, channelId);
      for (const s of subs) s.push(held);
      // Each line is written in the turn after its subscribers took the result, before their
      // clients can have had its frame or close.
      for (const s of sockets) assert.equal(await s.closedWith(), 1013);
    });
    const ids = sockets.map(
      (s) =>
        s.messages.find((m) => m.type === 'next' && m.payload.errors).payload.errors[0].extensions.requestId,
    );
    assert.equal(new Set(ids).size, users.length, `each client its own: ${ids}`);
    const all = { requestIds: [...ids].sort(), n: users.length };
    // Before: no request ids but the first subscriber's (the line's own, from its context).
    assert.deepEqual({ sent: told(logged, SENT), held: told(logged, HELD) }, { sent: all, held: all });
    // The first line of each tells of the subscribers the failure reached in the same turn.
    const first = logged.find((l) => l.msg?.split(':')[0] === SENT)!;
    assert.ok((first.obj.subscribers as number) >= 1);
  } finally {
    restore();
    for (const s of sockets) s.ws.close();
  }
});
