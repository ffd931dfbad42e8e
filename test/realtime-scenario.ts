/**
 * Resume under load, shared by the single-process and the two-process suites: writers send,
 * edit, delete and react continuously while a reader disconnects and resumes with its last
 * cursor (alternating between the given instances). The reader's final view must equal the
 * database, with no event repeated, none lost and log order (so channel order) kept.
 */
import assert from 'node:assert/strict';
import { comparePos, decodeCursor, encodeCursor } from '../core/realtime/cursor.ts';
import { decodeAnyId } from '../schema/builder.ts';
import { connect, subscribe } from './realtime-helpers.ts';

export interface ScenarioApi {
  /** runs a mutation, throws on GraphQL errors */
  mutate(query: string, variables: Record<string, unknown>, token: string): Promise<any>;
  /** runs SQL on the shared database */
  sql(text: string, params?: unknown[]): Promise<any[]>;
  wsUrls: string[];
  /** called once, mid-way, e.g. to restart Redis */
  midway?(): Promise<void>;
}

const QUERY = `subscription($after: String) { events(after: $after) { __typename cursor
  ... on MessageCreated { message { id content channel { id } reactions { emoji count } } }
  ... on MessageUpdated { message { id content channel { id } reactions { emoji count } } }
  ... on MessageDeleted { messageId channelId }
  ... on ReactionAdded { message { id content channel { id } reactions { emoji count } } }
  ... on ReactionRemoved { message { id content channel { id } reactions { emoji count } } }
} }`;

const decodeGid = (g: string) => decodeAnyId(g).id;

export async function resumeUnderLoad(
  api: ScenarioApi,
  o: {
    token: string;
    channelIds: string[];
    messages: number;
    reconnects: number;
    writers?: number;
    /** how long each reader session stays, ms (min, max) */
    stay?: [number, number];
  },
) {
  const received: any[] = [];
  // Start from the log's current end, so the expected set is "every row after it".
  const [top] = await api.sql(
    `select xid::text as xid, seq from events order by xid::text::bigint desc, seq desc limit 1`,
  );
  let cursor: string | null = encodeCursor({ xid: String(top.xid), seq: Number(top.seq) });
  const head = Number(top.seq);

  let done = false;
  let sent = 0;
  const ids: string[] = [];
  const writer = async (w: number) => {
    for (;;) {
      const n = sent++;
      if (n >= o.messages) return;
      const channelId = o.channelIds[n % o.channelIds.length];
      const r = await api.mutate(
        `mutation($i: SendMessageInput!) { sendMessage(input: $i) { id } }`,
        { i: { channelId, content: `m${n} w${w}` } },
        o.token,
      );
      ids.push(r.sendMessage.id);
      const pick = () => ids[Math.floor(Math.random() * ids.length)];
      if (n % 5 === 1) {
        await api
          .mutate(
            `mutation($i: EditMessageInput!) { editMessage(input: $i) { id } }`,
            { i: { id: pick(), content: `edit ${n}` } },
            o.token,
          )
          .catch((e) => assertGone(e));
      }
      if (n % 7 === 2) {
        await api
          .mutate(
            `mutation($m: ID!, $e: String!) { addReaction(messageId: $m, emoji: $e) { id } }`,
            { m: pick(), e: n % 2 ? '👍' : '🎉' },
            o.token,
          )
          .catch((e) => assertGone(e));
      }
      if (n % 11 === 3) {
        await api
          .mutate(`mutation($m: ID!) { deleteMessage(id: $m) }`, { m: pick() }, o.token)
          .catch((e) => assertGone(e));
      }
    }
  };
  const writers = Promise.all(Array.from({ length: o.writers ?? 4 }, (_, w) => writer(w))).finally(() => {
    done = true;
  });

  let sessions = 0;
  let midwayDone = false;
  while (!done || sessions <= o.reconnects) {
    const url = api.wsUrls[sessions % api.wsUrls.length];
    const c = connect(url, o.token, { retry: true });
    const s = subscribe(c.client, cursor, QUERY);
    const [lo, hi] = o.stay ?? [150, 500];
    const stayMs = done ? 1500 : lo + Math.random() * (hi - lo);
    await new Promise((r) => setTimeout(r, stayMs));
    s.stop();
    await c.client.dispose();
    assert.deepEqual(s.errors, [], 'no errors on the stream');
    if (process.env.DBG) console.log('session', sessions, Math.round(stayMs), s.events.length, c.closed());
    for (const e of s.events) received.push({ ...e, session: sessions });
    if (s.events.length) cursor = s.events.at(-1).cursor;
    sessions++;
    if (!midwayDone && api.midway && sent >= o.messages / 2) {
      midwayDone = true;
      await api.midway();
    }
    if (done && sessions > o.reconnects) {
      // Drain: one last session that stays until nothing new arrives.
      break;
    }
  }
  await writers;
  // Final catch-up on the first instance, until it has everything in the log.
  const [{ last }] = await api.sql(`select max(seq)::bigint as last from events`);
  const c = connect(api.wsUrls[0], o.token);
  const s = subscribe(c.client, cursor, QUERY);
  const lastSeq = Number(last);
  await s
    .until(
      () =>
        [...received, ...s.events].some((e) => e.cursor && decodeCursor(e.cursor).seq === lastSeq) || false,
      15_000,
      'the last log row',
    )
    .catch(async () => {
      // The last row may be one the reader cannot be sent (a change to a since-deleted message).
      await new Promise((r) => setTimeout(r, 1000));
    });
  s.stop();
  await c.client.dispose();
  received.push(...s.events);

  // Zero repeated, order kept.
  const cursors = received.map((e) => e.cursor as string);
  assert.equal(new Set(cursors).size, cursors.length, 'no event delivered twice');
  for (let i = 1; i < cursors.length; i++) {
    const ok = comparePos(decodeCursor(cursors[i - 1]), decodeCursor(cursors[i])) < 0;
    if (!ok && process.env.DBG)
      console.log(
        JSON.stringify(
          [received[i - 2], received[i - 1], received[i], received[i + 1]].map(
            (e) => e && [e.session, e.__typename, decodeCursor(e.cursor)],
          ),
        ),
      );
    assert.ok(ok, 'log order kept');
  }

  // Zero lost: every row after the start, except changes to messages deleted by now, arrived.
  const rows = await api.sql(
    `select e.seq::bigint as seq, e.type, e.payload->>'messageId' as mid, m.deleted_at is not null as gone
     from events e left join messages m on m.id = (e.payload->>'messageId')::uuid
     where e.seq > $1 and e.channel_id = any($2::uuid[]) order by e.seq`,
    [head, o.channelIds.map(decodeGid)],
  );
  const got = new Set(received.map((e) => decodeCursor(e.cursor).seq));
  const missing = rows.filter((r) => !got.has(Number(r.seq)) && !(r.gone && r.type !== 'MESSAGE_DELETED'));
  assert.deepEqual(missing, [], 'no event lost');

  // The final view equals the database.
  const view = new Map<string, { content: string; reactions: string }>();
  const fmt = (rs: { emoji: string; count: number }[]) =>
    rs
      .map((r) => `${r.emoji}${r.count}`)
      .sort()
      .join(',');
  for (const e of received) {
    if (e.__typename === 'MessageDeleted') view.delete(decodeGid(e.messageId));
    else
      view.set(decodeGid(e.message.id), { content: e.message.content, reactions: fmt(e.message.reactions) });
  }
  const db = await api.sql(
    `select m.id, m.content, coalesce((select string_agg(x.emoji || x.n, ',' order by x.emoji || x.n) from
       (select emoji, count(*) as n from reactions r where r.message_id = m.id group by emoji) x), '') as reactions
     from messages m where m.channel_id = any($1::uuid[]) and m.deleted_at is null`,
    [o.channelIds.map(decodeGid)],
  );
  const want = new Map(
    db.map((r) => [r.id as string, { content: r.content as string, reactions: r.reactions as string }]),
  );
  assert.equal(view.size, want.size, 'same number of messages');
  for (const [id, v] of want) assert.deepEqual(view.get(id), v, `message ${id}`);
  return { received: received.length, sessions: sessions + 1 };
}

function assertGone(e: unknown) {
  // Editing or reacting to a message another writer just deleted is expected to fail.
  if (!/NOT_FOUND|FORBIDDEN/.test(String((e as Error).message))) throw e;
}
