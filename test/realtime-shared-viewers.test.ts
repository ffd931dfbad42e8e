/**
 * Shared subscription execution (api/realtime/shared-execution.ts) between different viewers: two
 * or more users subscribed with the same document over real sockets (and SSE), one event, and each gets the
 * payload its own execution would give. A result is reused only when its execution did not read
 * the viewer and the subscribers' documents and variables are the same.
 */
import assert from 'node:assert/strict';
import { after, before, it } from 'node:test';
import type { Client } from 'graphql-ws';
import { createTestApp, ok, signUp, type TestApp, type TestUser } from './helpers.ts';
import {
  channelAccessHelpers,
  connect,
  guildWithChannel,
  invite,
  send,
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
