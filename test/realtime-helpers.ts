/** A graphql-ws client for tests: collects every `events` payload and waits for what it needs. */
import { connect as connectTcp, createServer, type Socket } from 'node:net';
import { sql } from 'drizzle-orm';
import { type Client, createClient } from 'graphql-ws';
import pg from 'pg';
import WebSocket from 'ws';
import type { App } from '../api/app.ts';
import { resultRows } from '../core/db/client.ts';
import type { Delivered } from '../core/realtime/subscription.ts';
import { decodeAnyId } from '../schema/builder.ts';
import { ok } from './helpers.ts';

export const EVENTS = `subscription($after: String) { events(after: $after) { __typename cursor
  ... on MessageCreated { message { id content channel { id } } }
  ... on MessageUpdated { message { id content channel { id } } }
  ... on MessageDeleted { messageId channelId }
  ... on ReactionAdded { emoji message { id reactions { emoji count } } }
  ... on ReactionRemoved { emoji message { id reactions { emoji count } } }
  ... on TypingStarted { channelId user { id } }
  ... on MemberJoined { guildId user { id } }
  ... on MemberKicked { guildId user { id } }
  ... on MemberBanned { guildId user { id } }
  ... on ChannelCreated { channel { id name } }
} }`;

export interface Stream {
  events: any[];
  errors: any[];
  closed?: { code: number; reason: string };
  /** resolves once `pred` holds for the collected events */
  until(pred: (events: any[]) => boolean, ms?: number, what?: string): Promise<void>;
  stop(): void;
  client: Client;
}

export function connect(url: string, token: string | undefined, opts: { retry?: boolean } = {}) {
  let closeEvent: { code: number; reason: string } | undefined;
  const client = createClient({
    url,
    webSocketImpl: WebSocket,
    connectionParams: token ? { authorization: `Bearer ${token}` } : {},
    retryAttempts: opts.retry ? 1000 : 0,
    retryWait: async () => new Promise((r) => setTimeout(r, 100)),
    shouldRetry: () => !!opts.retry,
    lazy: true,
    on: {
      closed: (e) => {
        closeEvent = { code: (e as { code: number }).code, reason: String((e as { reason: string }).reason) };
      },
    },
  });
  return { client, closed: () => closeEvent };
}

/** `onEvent` hears each collected event as it arrives (e.g. to stamp its receipt time). */
export function subscribe(
  client: Client,
  after?: string | null,
  query = EVENTS,
  onEvent?: (event: any) => void,
): Stream {
  const events: any[] = [];
  const errors: any[] = [];
  let wake: (() => void) | undefined;
  // Presence is batched (up to 100 ms) and may reach a stream it did not ask about by name (the
  // user's own ONLINE, say) at any point: only a document that names PresenceChanged collects it.
  const presence = query.includes('PresenceChanged');
  const stream: Stream = {
    events,
    errors,
    client,
    async until(pred, ms = 10_000, what = 'events') {
      const deadline = Date.now() + ms;
      while (!pred(events)) {
        if (errors.length) throw new Error(`subscription errors: ${JSON.stringify(errors)}`);
        const left = deadline - Date.now();
        if (left <= 0)
          throw new Error(
            `timed out waiting for ${what}; have ${JSON.stringify(events.map((e) => e.__typename))}`,
          );
        await new Promise<void>((r) => {
          wake = r;
          setTimeout(r, Math.min(left, 200));
        });
      }
    },
    stop: () => {},
  };
  stream.stop = client.subscribe(
    { query, variables: { after: after ?? null } },
    {
      next: (r: any) => {
        if (r.errors) errors.push(...r.errors);
        else if (presence || r.data.events.__typename !== 'PresenceChanged') {
          events.push(r.data.events);
          onEvent?.(r.data.events);
        }
        wake?.();
      },
      error: (e: any) => {
        errors.push(Array.isArray(e) ? e[0] : e);
        wake?.();
      },
      complete: () => {},
    },
  );
  return stream;
}

/**
 * Resolves once each of `users` has at least `n` live subscriptions on `app`'s hub, so that what
 * the test writes next reaches them. The protocol does not acknowledge a subscription, and a
 * stream without a cursor starts from its snapshot: a row committed before that is rightly not
 * delivered, so a pause that is too short for a loaded machine lost the test its first event.
 * Throws after `ms`.
 */
export async function untilLive(app: App, users: { id: string }[], n = 1, ms = 30_000) {
  const hub = app.deps.realtime!;
  const ids = users.map((u) => decodeAnyId(u.id).id);
  const deadline = Date.now() + ms;
  for (;;) {
    const counts = ids.map((id) => hub.liveCount(id));
    if (counts.every((c) => c >= n)) return;
    if (Date.now() > deadline)
      throw new Error(`subscriptions not live after ${ms} ms: ${counts} (want ${n} each)`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

export async function guildWithChannel(app: App, token: string) {
  const g = await ok(app, `mutation { createGuild(input: { name: "G" }) { id channels { id } } }`, {}, token);
  return { guildId: g.createGuild.id as string, channelId: g.createGuild.channels[0].id as string };
}

export async function invite(app: App, ownerToken: string, guildId: string, joinerToken: string) {
  const i = await ok(
    app,
    `mutation($g: ID!) { createInvite(input: { guildId: $g }) { code } }`,
    { g: guildId },
    ownerToken,
  );
  await ok(
    app,
    `mutation($c: String!) { joinGuild(code: $c) { id } }`,
    { c: i.createInvite.code },
    joinerToken,
  );
}

export async function send(app: App, token: string, channelId: string, content: string) {
  const r = await ok(
    app,
    `mutation($i: SendMessageInput!) { sendMessage(input: $i) { id } }`,
    { i: { channelId, content } },
    token,
  );
  return r.sendMessage.id as string;
}

/**
 * The server's /metrics now, from its GraphQL WebSocket url: `sample('name{labels}')` is that
 * sample's value, 0 when absent.
 */
export async function metricsOf(wsUrl: string): Promise<(sample: string) => number> {
  const text = await (await fetch(wsUrl.replace('ws:', 'http:').replace('/graphql', '/metrics'))).text();
  const values = new Map<string, number>();
  for (const line of text.split('\n')) {
    const at = line.lastIndexOf(' ');
    if (at > 0 && !line.startsWith('#')) values.set(line.slice(0, at), Number(line.slice(at + 1)));
  }
  return (sample) => values.get(sample) ?? 0;
}

/**
 * A raw graphql-transport-ws socket (no client library) that records every message and its close;
 * `send` resolves once the frame is written.
 */
export function rawSocket(url: string, protocol: string | null = 'graphql-transport-ws') {
  const ws = new WebSocket(url, protocol ?? undefined);
  const messages: any[] = [];
  let closed: { code: number; reason: string } | undefined;
  ws.on('message', (d) => messages.push(JSON.parse(String(d))));
  ws.on('close', (code, reason) => {
    closed = { code, reason: String(reason) };
  });
  ws.on('error', () => {});
  const opened = new Promise<void>((resolve) => ws.once('open', () => resolve()));
  const until = async (pred: () => boolean, what: string, ms = 5000) => {
    const deadline = Date.now() + ms;
    while (!pred()) {
      if (Date.now() > deadline)
        throw new Error(`timed out waiting for ${what}: ${JSON.stringify(messages)}`);
      await new Promise((r) => setTimeout(r, 20));
    }
  };
  return {
    ws,
    messages,
    closed: () => closed,
    send: async (m: unknown) => {
      await opened;
      await new Promise<void>((r) => ws.send(typeof m === 'string' ? m : JSON.stringify(m), () => r()));
    },
    until,
    closedWith: async () => {
      await until(() => !!closed, 'close');
      return closed!.code;
    },
  };
}

/**
 * A graphql-transport-ws `subscribe` frame for `events { cursor }` carrying its own token (as an
 * anonymous socket authenticates with its subscribe), for `rawSocket(...).send`.
 */
export function subscribeFrame(token: string, id = '1') {
  return {
    id,
    type: 'subscribe',
    payload: {
      query: 'subscription { events { cursor } }',
      extensions: { headers: { authorization: `Bearer ${token}` } },
    },
  };
}

/**
 * Channels and overwrites for the access tests, on the app `of()` returns when called (the tests'
 * app is made in their before()).
 */
export function channelAccessHelpers(of: () => App) {
  async function everyoneRole(token: string, guildId: string): Promise<string> {
    const r = await ok(
      of(),
      `query($g: ID!) { guild(id: $g) { roles { id isEveryone } } }`,
      { g: guildId },
      token,
    );
    return (r.guild.roles as { id: string; isEveryone: boolean }[]).find((x) => x.isEveryone)!.id;
  }
  async function overwrite(token: string, i: Record<string, unknown>) {
    await ok(
      of(),
      `mutation($i: SetChannelOverwriteInput!) { setChannelOverwrite(input: $i) { targetId } }`,
      { i },
      token,
    );
  }
  async function createChannel(
    token: string,
    guildId: string,
    name: string,
    type = 'TEXT',
    parentId?: string,
  ) {
    const r = await ok(
      of(),
      `mutation($g: ID!, $n: String!, $t: ChannelType!, $p: ID) { createChannel(input: { guildId: $g, name: $n, type: $t, parentId: $p }) { id } }`,
      { g: guildId, n: name, t: type, p: parentId ?? null },
      token,
    );
    return r.createChannel.id as string;
  }
  /** Denies `permission` to @everyone on the channel (or category). */
  async function denyToEveryone(token: string, guildId: string, channelId: string, permission: string) {
    const everyone = await everyoneRole(token, guildId);
    await overwrite(token, {
      channelId,
      targetType: 'ROLE',
      targetId: everyone,
      allow: [],
      deny: [permission],
    });
  }
  /** Denies VIEW_CHANNEL to @everyone on the channel (or category). */
  const hideFromEveryone = (token: string, guildId: string, channelId: string) =>
    denyToEveryone(token, guildId, channelId, 'VIEW_CHANNEL');
  /** A category hidden from @everyone with `n` text channels in it (written directly: fast). */
  async function hiddenCategoryOf(token: string, guildId: string, n: number) {
    const id = await createChannel(token, guildId, 'cat', 'CATEGORY');
    await hideFromEveryone(token, guildId, id);
    await of().deps.db.execute(sql`insert into channels (id, guild_id, parent_id, type, name)
      select gen_random_uuid(), ${decodeAnyId(guildId).id}::uuid, ${decodeAnyId(id).id}::uuid, 'TEXT', 'c' || i
      from generate_series(1, ${n}) i`);
    return id;
  }
  return { everyoneRole, overwrite, createChannel, hideFromEveryone, denyToEveryone, hiddenCategoryOf };
}

export interface SseStream {
  /** every `next` payload, in order */
  items: any[];
  /** `data.events` of the items that have it (presence left out) */
  events: any[];
  /** the errors of every item */
  errors: any[];
  /** the `id:` field of each item (undefined when it has none) */
  ids: (string | undefined)[];
  /** the server sent `complete` */
  completed: boolean;
  /** the response is over (completed, cut off or stopped) */
  ended: boolean;
  status?: number;
  /** resolves once `pred` holds for the stream; fails after `ms` */
  until(pred: (s: SseStream) => boolean, what: string, ms?: number): Promise<void>;
  stop(): void;
}

/**
 * An `events` subscription over SSE, read as it arrives: POST (JSON body) or GET (query string, as
 * an EventSource sends it), `headers` over the defaults (Accept: text/event-stream, the token).
 */
export function sseStream(
  httpUrl: string,
  token: string,
  o: {
    cursor?: string | null;
    method?: 'POST' | 'GET';
    headers?: Record<string, string>;
    query?: string;
  } = {},
): SseStream {
  const { cursor, method = 'POST', headers = {}, query = EVENTS } = o;
  const ac = new AbortController();
  let wake: (() => void) | undefined;
  let failure: unknown;
  const variables = JSON.stringify({ after: cursor ?? null });
  const url = method === 'GET' ? `${httpUrl}?${new URLSearchParams({ query, variables })}` : httpUrl;
  const s: SseStream = {
    items: [],
    events: [],
    errors: [],
    ids: [],
    completed: false,
    ended: false,
    async until(pred, what, ms = 10_000) {
      const deadline = Date.now() + ms;
      while (!pred(s)) {
        if (failure) throw new Error(`the SSE stream failed: ${String(failure)}`);
        const left = deadline - Date.now();
        if (left <= 0)
          throw new Error(
            `timed out waiting for ${what}; have ${JSON.stringify({ items: s.items, ended: s.ended })}`,
          );
        await new Promise<void>((r) => {
          wake = r;
          setTimeout(r, Math.min(left, 100));
        });
      }
    },
    stop: () => ac.abort(),
  };
  const onBlock = (block: string) => {
    let event = 'message';
    let id: string | undefined;
    const data: string[] = [];
    for (const line of block.split('\n')) {
      if (line.startsWith(':')) continue; // keep-alive ping
      const at = line.indexOf(':');
      const field = at < 0 ? line : line.slice(0, at);
      const value = at < 0 ? '' : line.slice(at + 1).replace(/^ /, '');
      if (field === 'event') event = value;
      else if (field === 'data') data.push(value);
      else if (field === 'id') id = value;
    }
    if (event === 'complete') s.completed = true;
    if (event !== 'next') return;
    const item = JSON.parse(data.join('\n'));
    s.items.push(item);
    s.ids.push(id);
    if (item.errors) s.errors.push(...item.errors);
    const e = item.data?.events;
    if (e && e.__typename !== 'PresenceChanged') s.events.push(e);
  };
  void (async () => {
    const res = await fetch(url, {
      method,
      headers: {
        accept: 'text/event-stream',
        authorization: `Bearer ${token}`,
        ...(method === 'POST' ? { 'content-type': 'application/json' } : {}),
        ...headers,
      },
      body: method === 'POST' ? JSON.stringify({ query, variables: { after: cursor ?? null } }) : undefined,
      signal: ac.signal,
    });
    s.status = res.status;
    const reader = res.body!.getReader();
    const decoder = new TextDecoder();
    let buf = '';
    for (;;) {
      const { done, value } = await reader.read();
      if (done) break;
      buf += decoder.decode(value, { stream: true });
      for (let i = buf.indexOf('\n\n'); i >= 0; i = buf.indexOf('\n\n')) {
        onBlock(buf.slice(0, i));
        buf = buf.slice(i + 2);
      }
      wake?.();
    }
  })()
    .catch((err) => {
      if (!ac.signal.aborted) failure = err;
    })
    .finally(() => {
      s.ended = true;
      wake?.();
    });
  return s;
}

/**
 * A TCP proxy to a Postgres or Redis server (`target`: its URL; `url` is the same through the
 * proxy), for the server going away under an app:
 * - `cut()` drops its connections and refuses new ones until `mend()` (the server away);
 * - `hold()` holds what either side sends, on open and new connections (nothing is closed: a
 *   server hung, a network partition that drops packets) until `release()` delivers it all;
 * - `hang()` leaves the open connections as a failover does: the server's end is gone (its
 *   backends exit), the application's end stays open and hears nothing more, no reset. New
 *   connections pass (once released, when held). Returns how many connections the proxy has had.
 */
export async function tcpProxy(target: string) {
  const to = new URL(target);
  const defaultPort = to.protocol.startsWith('redis') ? 6379 : 5432;
  const pairs: { a: Socket; b: Socket; hung: boolean }[] = [];
  let down = false;
  let holding = false;
  const held: (() => void)[] = [];
  const server = createServer((a) => {
    if (down) {
      a.destroy();
      return;
    }
    const b = connectTcp(Number(to.port || defaultPort), to.hostname);
    const pair = { a, b, hung: false };
    pairs.push(pair);
    for (const [x, y] of [
      [a, b],
      [b, a],
    ]) {
      x.on('data', (d) => {
        if (pair.hung) return;
        if (holding) held.push(() => pair.hung || y.write(d));
        else y.write(d);
      });
      x.on('error', () => pair.hung || y.destroy());
      x.on('close', () => pair.hung || y.destroy());
    }
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', () => r()));
  const url = new URL(to);
  url.host = `127.0.0.1:${(server.address() as { port: number }).port}`;
  const destroyAll = () => {
    for (const p of pairs) {
      p.a.destroy();
      p.b.destroy();
    }
  };
  return {
    url: url.toString(),
    cut() {
      down = true;
      destroyAll();
    },
    mend() {
      down = false;
    },
    hold() {
      holding = true;
    },
    release() {
      holding = false;
      for (const w of held.splice(0)) w();
    },
    hang() {
      for (const p of pairs) {
        p.hung = true;
        p.b.destroy();
      }
      return pairs.length;
    },
    close() {
      server.close();
      destroyAll();
    },
  };
}

/** A TCP port on 127.0.0.1 that nothing listens on just now. */
export function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = createServer();
    s.once('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const { port } = s.address() as { port: number };
      s.close(() => resolve(port));
    });
  });
}

export const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
/** `p`, or 'timeout' once `ms` have passed. */
export const within = <T>(p: Promise<T>, ms: number) =>
  Promise.race([p, sleep(ms).then(() => 'timeout' as const)]);

/**
 * Runs `during` while a ReactionAdded on message `messageId` (a uuid) is in the log and fails to
 * execute: its table is briefly renamed away (in production a pool timeout, a dropped connection,
 * a statement timeout). Returns the error-level log entries of failed executions meanwhile.
 */
export async function whileReactionFails(app: App, messageId: string, during: () => Promise<void>) {
  const logged: Record<string, unknown>[] = [];
  const error = app.log.error;
  app.log.error = ((obj: Record<string, unknown>, msg?: string) => {
    if (msg?.startsWith('event execution failed')) logged.push(obj);
  }) as typeof app.log.error;
  await app.deps.db.execute(sql`alter table reactions rename to reactions_away`);
  try {
    await app.deps.db.execute(sql`insert into events (type, guild_id, channel_id, payload)
      select 'REACTION_ADDED', guild_id, channel_id,
        jsonb_build_object('messageId', id::text, 'emoji', 'x', 'userId', author_id::text)
      from messages where id = ${messageId}::uuid`);
    await app.deps.realtime!.poke();
    await during();
  } finally {
    await app.deps.db.execute(sql`alter table reactions_away rename to reactions`);
    app.log.error = error;
  }
  return logged;
}

/** Error-level log entries of `app` with their messages, while `during` runs. */
export async function errorsLogged<T>(app: App, during: () => Promise<T>) {
  const logged: { obj: Record<string, unknown>; msg?: string }[] = [];
  const error = app.log.error;
  app.log.error = ((obj: Record<string, unknown>, msg?: string) => {
    logged.push({ obj, msg });
  }) as typeof app.log.error;
  try {
    return { result: await during(), logged };
  } finally {
    app.log.error = error;
  }
}

/**
 * A hub stream's rows (app.deps.realtime.subscribe) until one that `pred` holds for, that one
 * included, appended to `got` (returned; a row already there that `pred` holds for ends it at
 * once); throws after `ms`.
 */
export async function rowsUntil(
  s: AsyncIterator<Delivered>,
  pred: (r: Delivered) => boolean,
  what: string,
  got: Delivered[] = [],
  ms = 30_000,
): Promise<Delivered[]> {
  const deadline = Date.now() + ms;
  if (got.some(pred)) return got;
  for (;;) {
    let timer: NodeJS.Timeout | undefined;
    const r = await Promise.race([
      s.next(),
      new Promise<never>((_, reject) => {
        timer = setTimeout(
          () => reject(new Error(`timed out waiting for ${what}; have ${got.map((x) => x.type)}`)),
          Math.max(0, deadline - Date.now()),
        );
      }),
    ]).finally(() => clearTimeout(timer));
    if (r.done) throw new Error(`stream ended waiting for ${what}; have ${got.map((x) => x.type)}`);
    got.push(r.value);
    if (pred(r.value)) return got;
  }
}

/** The messages throughMarker sent and the typing throughTypingMarker started (channel + user). */
const markerIds = new Set<string>();
const typingMarkers = new Set<string>();
let markersSent = 0;
const isMarker = (e: any) =>
  (e?.__typename === 'MessageCreated' && markerIds.has(e.message?.id)) ||
  (e?.__typename === 'TypingStarted' && typingMarkers.has(`${e.channelId} ${e.user?.id}`));

/** `events` without the markers of throughMarker and throughTypingMarker. */
export const withoutMarkers = (events: any[]) => events.filter((e) => !isMarker(e));

/**
 * Waits (bounded) until `s` has an event `pred` holds for at index `from` or later; returns the
 * events before it, markers left out. `from`: how many events `s` had before the marker was caused.
 * One like the marker that came before (the same user's same status, the same typist's typing in
 * the channel more than the throttle ago) is not it: ended there, the check left out what came
 * between the two, and passed whatever that was.
 */
async function eventsBefore(
  s: Stream | SseStream,
  from: number,
  pred: (e: any) => boolean,
  what: string,
  ms: number,
) {
  const at = () => {
    for (let i = from; i < s.events.length; i++) if (pred(s.events[i])) return i;
    return -1;
  };
  if ('items' in s) await s.until(() => at() >= 0, what, ms);
  else await s.until(() => at() >= 0, ms, what);
  return withoutMarkers(s.events.slice(0, at()));
}

/**
 * "Nothing more arrives", without a pause that a loaded machine outlasts: sends a marker message as
 * `token` in `channelId`, which every one of `streams` may see, waits (bounded) until each has it,
 * and returns, for each, the events that came before it (earlier markers left out).
 *
 * A stream delivers in log order, and the marker is logged in a transaction of its own after
 * everything committed before this call, on the same path (the log, read by each instance's
 * tailer; a replay reads it too): an event committed before the call that a stream has not
 * delivered before the marker, it never delivers. The streams' document must select
 * `... on MessageCreated { message { id } }`.
 */
export async function throughMarker(
  app: App,
  token: string,
  channelId: string,
  streams: (Stream | SseStream)[],
  ms = 10_000,
): Promise<any[][]> {
  const from = streams.map((s) => s.events.length);
  const id = await send(app, token, channelId, `marker ${++markersSent}`);
  markerIds.add(id);
  const out: any[][] = [];
  for (const [i, s] of streams.entries())
    out.push(await eventsBefore(s, from[i], (e) => e?.message?.id === id, 'the marker', ms));
  return out;
}

/**
 * throughMarker for ephemeral events (typing is not logged): `typist` starts typing in `channelId`
 * over `app` (the instance the forbidden signal came from), and each of `streams` (subscribers that
 * may see that channel, none of them the typist's) waits until it has that TypingStarted; returns
 * the events before it. The pair must not have typed in the last 5 s (the throttle): nothing would
 * be signalled, and this times out (an earlier typing of the pair is not taken for the marker).
 *
 * What this orders: a typing signal reaches a hub at once on the in-process bus and for its own
 * instance on Redis (a microtask), and through one publisher connection, in order, for another
 * instance; the hub sends it once the log has been read past what committed before it came
 * (afterLogRead), and those reads resolve their waiters in the order they came, then each
 * subscriber checks its rows in order. So a TypingStarted signalled by the same instance before the
 * marker reaches each subscriber before it, or not at all (dropped after a 3 s wait). Not ordered:
 * signals of two instances against each other, and presence (batched apart).
 */
export async function throughTypingMarker(
  app: App,
  typist: { id: string; token: string },
  channelId: string,
  streams: (Stream | SseStream)[],
  ms = 10_000,
): Promise<any[][]> {
  typingMarkers.add(`${channelId} ${typist.id}`);
  const from = streams.map((s) => s.events.length);
  await ok(app, `mutation($c: ID!) { startTyping(channelId: $c) }`, { c: channelId }, typist.token);
  const out: any[][] = [];
  const mine = (e: any) =>
    e?.__typename === 'TypingStarted' && e.channelId === channelId && e.user?.id === typist.id;
  for (const [i, s] of streams.entries())
    out.push(await eventsBefore(s, from[i], mine, 'the typing marker', ms));
  return out;
}

/**
 * throughMarker for presence: `user` chooses `status` (one it does not show now) over `app`, and
 * each of `streams` (which may see `user`'s presence, and whose document names PresenceChanged)
 * waits until it has that change; returns the events before it. Presence changes a user chose
 * over one instance are signalled in the order their mutations returned, batched in that order
 * and each batch handed over after the one before: a change chosen on the same instance before
 * the marker comes before it. Not ordered with it: the log, typing, and a block's OFFLINE (worked
 * out on its own after the block's row).
 */
export async function throughPresenceMarker(
  app: App,
  user: { id: string; token: string },
  status: string,
  streams: Stream[],
  ms = 10_000,
): Promise<any[][]> {
  const from = streams.map((s) => s.events.length);
  await ok(app, `mutation($s: PresenceChoice!) { setPresence(status: $s) }`, { s: status }, user.token);
  const out: any[][] = [];
  const mine = (e: any) =>
    e?.__typename === 'PresenceChanged' && e.user?.id === user.id && e.status === status;
  for (const [i, s] of streams.entries())
    out.push(await eventsBefore(s, from[i], mine, 'the presence marker', ms));
  return out;
}

/**
 * Socket limits small enough that a slot leaked or counted twice shows at once (three sockets and
 * SSE streams per user, four operations per socket), for createTestApp({ rateLimits: false, ws }).
 */
export const SMALL_WS_LIMITS = {
  socketsPerUser: 3,
  operationsPerSocket: 4,
  connectionsPerIpPerMinute: 1000,
  initTimeoutMs: 2000,
  keepAliveMs: 12_000,
};

/** Waits (bounded) until `pred` holds, looking every 20 ms; returns whether it did. */
export async function holdsWithin(pred: () => boolean, ms = 5000) {
  const deadline = Date.now() + ms;
  while (!pred() && Date.now() < deadline) await sleep(20);
  return pred();
}

/**
 * A transaction on a connection of its own that writes a MESSAGE_UPDATED row of `messageId` (raw
 * uuids) and stays open (a session left in a transaction, a forgotten prepared one): every row
 * committed after it waits for it to end. The caller commits or rolls back, then ends it.
 * PostgreSQL only (PGlite has one session).
 */
export async function logWriteLeftOpen(
  app: App,
  guildId: string,
  channelId: string,
  messageId: string,
): Promise<pg.Client> {
  const long = new pg.Client({ connectionString: app.config.databaseUrl });
  await long.connect();
  await long.query('begin');
  await long.query(
    `insert into events (type, guild_id, channel_id, payload) values ('MESSAGE_UPDATED', $1, $2, $3)`,
    [guildId, channelId, { messageId }],
  );
  return long;
}

/**
 * What a restore from another cluster leaves: a row of the log whose xid this cluster has not
 * reached (`ahead` past the snapshot's xmax), written by hand into a guild that has rows. Its xid.
 */
export async function rowFromAnotherCluster(app: App, ahead: number): Promise<string> {
  const [r] = resultRows<{ x: string }>(
    await app.deps.db.execute(sql`insert into events (xid, type, guild_id, payload)
      select (pg_snapshot_xmax(pg_current_snapshot())::text::bigint + ${ahead})::text::xid8, 'GUILD_UPDATED', guild_id, '{}'::jsonb
      from events where guild_id is not null limit 1 returning xid::text as x`),
  );
  return String(r.x);
}
