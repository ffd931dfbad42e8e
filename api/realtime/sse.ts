/**
 * Subscriptions over HTTP: yoga serves them as Server-Sent Events (`POST /graphql` or `GET` with
 * `Accept: text/event-stream`), one `next` item per result, then `complete`. Left to yoga, an
 * event whose execution failed for a reason of the server's would go out as an error item with
 * no cursor and the stream would go on: the client's next cursor would be past an event it never
 * got. Here SSE subscriptions execute their events through executeEach (shared-execution.ts), as
 * the socket's pull path does, so such an event is held back by the same rule and counting
 * (failureOf): the stream ends with one last item, RESUME_MESSAGE with INTERNAL_SERVER_ERROR, and
 * the client resumes from its last cursor, which precedes the failed event. After REPEATS rounds
 * of the same event failing, it goes out with its errors and the stream goes on. An event whose
 * access check fails at delivery ends the stream the same way (the subscription fails with
 * EventFailedError), and after REPEATS rounds is skipped (core/realtime/failures.ts, hub.ts).
 *
 * A stream lives no longer than its viewer's session and access token, as a socket does (closed
 * with 4403 or 4401): its last item is then an UNAUTHENTICATED error, and the client resumes from
 * its last cursor once signed in again or refreshed.
 */
import {
  createSourceEventStream,
  type ExecutionArgs,
  type ExecutionResult,
  GraphQLError,
  type subscribe,
} from 'graphql';
import type { Plugin } from 'graphql-yoga';
import { decodeJwt } from 'jose';
import type { Db } from '../../core/db/client.ts';
import type { Deps } from '../../core/deps.ts';
import { rateLimited } from '../../core/errors.ts';
import { endedSessions, SESSION_CHECK_MS } from '../../core/realtime/disconnect.ts';
import type { Hub } from '../../core/realtime/hub.ts';
import { EventFailedError, SlowConsumerError } from '../../core/realtime/subscription.ts';
import type { Context } from '../../schema/builder.ts';
import type { Logger } from '../logger.ts';
import { newConnectionFrom } from './server.ts';
import { cursorOfResult, type EventHooks, executeEach, restamped } from './shared-execution.ts';

type Mask = EventHooks['mask'];

/** retryAfter (s) of a stream refused at the per-user limit, as for a socket's subscribe */
const SLOT_RETRY_S = 5;

/** The message of the last item of an SSE stream ended so that its client resumes. */
export const RESUME_MESSAGE = new EventFailedError(null).message;
/** ... ended because its reader fell too far behind (the socket's 1013 slow-consumer close). */
export const SLOW_MESSAGE =
  'Slow consumer: you are not reading your events fast enough; resume from your last cursor.';

/**
 * A mask that leaves errors it made alone (and those shared-execution's ownRequestId made from
 * them): SSE results are masked before yoga's own mask sees them (failureOf reads the masked
 * codes), and masking twice would count every error twice.
 */
export function maskingOnce(mask: Mask): Mask {
  const made = new WeakSet<object>();
  return (error, message) => {
    if (typeof error === 'object' && error !== null && (made.has(error) || restamped.has(error)))
      return error as Error;
    const masked = mask(error, message);
    made.add(masked);
    return masked;
  };
}

/**
 * Why an SSE stream ended, for the metrics: its client closed it (or the server stopped),
 * 'unauthenticated' (session or token ended), a slow consumer, a held-back event, the source's end.
 */
type EndReason = 'closed' | 'unauthenticated' | 'slow_consumer' | 'event_failed' | 'completed' | 'error';

/** The results as a stream that can be cut off: `cutOff(error)` ends it with that error as its last item. */
interface Ending extends AsyncIterableIterator<ExecutionResult> {
  cutOff(error: GraphQLError): void;
}

/**
 * The results, ending with a resume item instead of a rejection when an event is held back, or
 * with the error it is cut off with. `release` runs once, when the stream is over.
 */
function endingToResume(
  results: AsyncIterableIterator<ExecutionResult>,
  release: (why: EndReason) => void,
  /** each item's cursor (undefined for none) is queued here as it is handed on, once `on` */
  cursors: ItemCursors,
): Ending {
  let ended = false;
  let cut: GraphQLError | undefined;
  const finish = (why: EndReason) => {
    if (ended) return;
    ended = true;
    release(why);
  };
  return {
    async next() {
      if (ended) return { done: true, value: undefined };
      try {
        const step = await results.next();
        // Cut off meanwhile: a result that came with it is not sent (the client resumes before it).
        if (cut) {
          finish('unauthenticated');
          if (cursors.on) cursors.queue.push(undefined);
          return { done: false, value: { errors: [cut] } };
        }
        if (step.done) finish('completed');
        else if (cursors.on) cursors.queue.push(cursorOfResult(step.value));
        return step;
      } catch (err) {
        // A held-back event, or a reader too far behind (the socket's 1013): the stream's last item
        // tells the client to resume. Anything else is yoga's to mask, log and send.
        finish(
          err instanceof EventFailedError
            ? 'event_failed'
            : err instanceof SlowConsumerError
              ? 'slow_consumer'
              : 'error',
        );
        const message =
          err instanceof EventFailedError
            ? err.message
            : err instanceof SlowConsumerError
              ? SLOW_MESSAGE
              : undefined;
        if (!message) throw err;
        const resume = new GraphQLError(message, { extensions: { code: 'INTERNAL_SERVER_ERROR' } });
        if (cursors.on) cursors.queue.push(undefined);
        return { done: false, value: { errors: [resume] } };
      }
    },
    return() {
      finish('closed');
      return results.return!();
    },
    cutOff(error) {
      if (ended || cut) return;
      cut = error;
      // A next() waiting on the source returns now, with the cut item.
      void results.return!();
    },
    [Symbol.asyncIterator]() {
      return this;
    },
  };
}

const unauthenticated = (message: string) =>
  new GraphQLError(message, { extensions: { code: 'UNAUTHENTICATED' } });

/**
 * The yoga plugin: every subscription it serves (SSE, and app.fetch's in-process ones) runs its
 * events through executeEach. `mask` must be the mask yoga is given too, made with maskingOnce.
 */
export function sseSubscriptions(o: {
  mask: Mask;
  log: Logger;
  hub: Hub;
  db: Db;
  /**
   * The socket's limits, which SSE streams count toward as sockets do: a user's open sockets and
   * SSE streams together (`socketsOf`: its sockets), and new ones per address per minute (the
   * same count as the socket's: newConnectionFrom). Unset: no limits.
   */
  limits?: {
    perUser: number;
    perIpPerMinute: number;
    socketsOf(userId: string): number;
    deps: Pick<Deps, 'rateLimiter' | 'rateLimitsEnabled'>;
  };
}): {
  plugin: Plugin;
  /** the user's open SSE streams, and those being opened (they count toward the socket's limit) */
  streamsOf(userId: string): number;
  /** for the metrics: open SSE streams (signed in), and those ended so far by why */
  streams: { open(): number; ends: Record<string, number> };
  /** events sent on these subscriptions, by whether the execution was shared (for the metrics) */
  counts: { shared: number; own: number };
  /** stops the periodic session check */
  close(): void;
} {
  const hooks: EventHooks = {
    mask: o.mask,
    counts: { shared: 0, own: 0 },
    onEventFailed(row, errors, outcome, reached) {
      o.log.error(
        {
          cursor: row.cursor,
          type: row.type,
          errors: errors.map((e) => e.message),
          via: 'sse',
          // as the socket's (api/realtime/server.ts): every stream it reached, by its request id
          requestIds: reached.requestIds,
          subscribers: reached.count,
        },
        outcome === 'dropped'
          ? 'ephemeral event execution failed: dropped (never replayed), the stream goes on'
          : outcome === 'sent'
            ? 'event execution failed again and again: sent with its errors, the stream goes on'
            : 'event execution failed: its SSE streams end for their clients to resume from before it',
      );
    },
  };
  // Open streams by user: a session revoked or an account deactivated (told to every instance
  // over the bus, as for sockets) ends its streams.
  const byUser = new Map<string, Set<{ sessionId: string; stream: Ending }>>();
  /** SSE streams ended so far, by why (the metrics) */
  const ends: Record<string, number> = {};
  /** streams being set up (cursor check, snapshot, replay start), by user: counted in the limit */
  const opening = new Map<string, number>();
  const streamsOf = (userId: string) => (byUser.get(userId)?.size ?? 0) + (opening.get(userId) ?? 0);
  const opened = (userId: string, n: number) => {
    const m = (opening.get(userId) ?? 0) + n;
    if (m) opening.set(userId, m);
    else opening.delete(userId);
  };
  /**
   * A new stream of `userId`'s from `ip`, within the socket's limits: undefined (its place taken:
   * `opened(userId, -1)` gives it back), or the RATE_LIMITED error the request is answered with.
   * A socket past them is closed with 4029; an SSE stream gets the error, then complete, and an
   * EventSource reconnects (retries) after its retry time. An HTTP 429 would make it give up.
   */
  async function admit(userId: string, ip: string) {
    const l = o.limits;
    if (!l) return undefined;
    if (streamsOf(userId) + l.socketsOf(userId) >= l.perUser)
      return rateLimited(
        SLOT_RETRY_S,
        `Too many sockets and SSE streams for this user (${l.perUser}): close one, or retry in ${SLOT_RETRY_S} s.`,
      );
    opened(userId, 1);
    const r = await newConnectionFrom(l.deps, ip, l.perIpPerMinute);
    if (r.ok) return undefined;
    opened(userId, -1);
    return rateLimited(
      r.retryAfter,
      `Too many connections from this address: try again in ${r.retryAfter} s.`,
    );
  }
  const offDisconnect = o.hub.onDisconnect((d) => {
    for (const s of byUser.get(d.userId) ?? []) {
      if (!d.sessionId || s.sessionId === d.sessionId)
        s.stream.cutOff(unauthenticated(`${d.reason}: sign in again, then resume from your last cursor.`));
    }
  });
  // And within SESSION_CHECK_MS when that signal is missed (Redis down), as sockets are.
  const sessionTimer = setInterval(async () => {
    const ids = [...new Set([...byUser.values()].flatMap((set) => [...set].map((s) => s.sessionId)))];
    const dead = await endedSessions(o.db, ids.filter(Boolean)).catch((err) => {
      o.log.warn({ err }, 'SSE session check failed');
      return new Set<string>();
    });
    if (!dead.size) return;
    const ended = unauthenticated('Session ended: sign in again, then resume from your last cursor.');
    for (const set of byUser.values()) for (const s of set) if (dead.has(s.sessionId)) s.stream.cutOff(ended);
  }, SESSION_CHECK_MS);
  sessionTimer.unref();
  const subscribeHolding = async (args: ExecutionArgs) => {
    const ctx = args.contextValue as Context & { request?: Request };
    const viewer = ctx.viewer;
    // Counted from here (its place taken) until it is registered below or refused.
    if (viewer) {
      const refused = await admit(viewer.userId, ctx.ip);
      if (refused)
        return { errors: [o.mask(refused, 'Unexpected error.') as GraphQLError] } as ExecutionResult;
    }
    let source: Awaited<ReturnType<typeof createSourceEventStream>>;
    try {
      source = await createSourceEventStream(args);
    } finally {
      if (viewer && o.limits) opened(viewer.userId, -1);
    }
    // A refused subscription (bad cursor, not signed in): its errors, as yoga would send them.
    if (!(Symbol.asyncIterator in (source as object))) return source as ExecutionResult;
    const it = (source as AsyncIterable<unknown>)[Symbol.asyncIterator]();
    let timer: NodeJS.Timeout | undefined;
    const entry = { sessionId: viewer?.sessionId ?? '', stream: undefined as unknown as Ending };
    const cursors: ItemCursors = { on: false, queue: [] };
    if (ctx.request) cursorsOf.set(ctx.request, cursors);
    // The client gone (its connection closed: the request's signal aborts), the stream ends at
    // once and its subscriber is let go, as a closed socket's are. Nothing else reads it: yoga
    // notices only when it writes the next event to the dead connection, and an idle user's
    // subscribers (a client that reconnects and reconnects, a page reloaded) stayed registered
    // meanwhile, without bound.
    const signal = ctx.request?.signal;
    const gone = () => void entry.stream.return!();
    entry.stream = endingToResume(
      executeEach(args, it, hooks),
      (why) => {
        ends[why] = (ends[why] ?? 0) + 1;
        signal?.removeEventListener('abort', gone);
        clearTimeout(timer);
        const mine = viewer && byUser.get(viewer.userId);
        mine?.delete(entry);
        if (mine && !mine.size) byUser.delete(viewer.userId);
      },
      cursors,
    );
    if (signal?.aborted) {
      gone();
      return entry.stream;
    }
    signal?.addEventListener('abort', gone, { once: true });
    if (!viewer) return entry.stream;
    const mine = byUser.get(viewer.userId) ?? new Set();
    mine.add(entry);
    byUser.set(viewer.userId, mine);
    // The access token's expiry ends the stream (the request was authenticated with a valid one).
    const token = /^Bearer\s+(\S+)$/i.exec(ctx.request?.headers.get('authorization') ?? '')?.[1];
    const exp = token ? decodeJwt(token).exp : undefined;
    if (exp !== undefined) {
      const expired = unauthenticated('Access token expired: refresh it, then resume from your last cursor.');
      timer = setTimeout(() => entry.stream.cutOff(expired), Math.min(exp * 1000 - Date.now(), 2 ** 31 - 1));
      timer.unref();
    }
    return entry.stream;
  };
  const plugin: Plugin = {
    onSubscribe({ setSubscribeFn }) {
      setSubscribeFn(subscribeHolding as unknown as typeof subscribe);
    },
    onResultProcess({ request, result, resultProcessor, setResultProcessor }) {
      // A subscription's results (async iterables), going out as an event stream: for a
      // subscription, the only processor yoga has for them (whatever the Accept said, */* too).
      if (!(Symbol.asyncIterator in (result as object))) return;
      // None (the request accepts no event stream: `Accept: application/json`): yoga answers 406
      // and never reads or returns the subscription, and the request's signal no longer aborts
      // once that response is written. Left so, its subscriber stayed registered and its place in
      // the user's limit taken for the life of the process: three such requests, and the user
      // could open no socket or stream again.
      if (!resultProcessor) {
        void (result as AsyncIterable<unknown>)[Symbol.asyncIterator]().return?.();
        return;
      }
      // The results yoga's processor is handed went through the plugins' hooks (some as new
      // objects), one for one and in order: their cursors are those endingToResume queues.
      const cursors = cursorsOf.get(request);
      if (!cursors) return;
      setResultProcessor((res, fetchAPI, type) => {
        cursors.on = true;
        const response = resultProcessor(res, fetchAPI, type) as Response;
        if (response.headers.get('content-type')?.startsWith('text/event-stream'))
          return withEventIds(response, cursors.queue, fetchAPI);
        cursors.on = false;
        cursors.queue.length = 0;
        return response;
      }, 'text/event-stream');
    },
  };
  return {
    plugin,
    streamsOf,
    streams: { open: () => [...byUser.values()].reduce((n, set) => n + set.size, 0), ends },
    counts: hooks.counts,
    close() {
      clearInterval(sessionTimer);
      offDisconnect();
    },
  };
}

/**
 * A subscription's item cursors, in order, for withEventIds; queued only once its response is
 * an event stream (`on`): nothing else takes them off.
 */
interface ItemCursors {
  on: boolean;
  queue: (string | undefined)[];
}
const cursorsOf = new WeakMap<Request, ItemCursors>();

const DATA_LINE = Buffer.from('data: ');

/**
 * The event stream with each event's cursor as its SSE `id`: an EventSource that reconnects sends
 * the last one back as Last-Event-ID, and the stream resumes after it (schema/events.ts), where
 * the URL it reconnects to still says where it first began. yoga writes an item as `event: next`,
 * then `data: <json>` (one line: JSON has no raw newline) and the blank line that ends it, in the
 * order `cursors` was filled; the id goes on the line before each `data: `. Items without a cursor
 * (an error) get none, and the last id the client saw stays its resume point. The complete item's
 * line is `data:` with nothing after it.
 */
function withEventIds(
  response: Response,
  cursors: (string | undefined)[],
  fetchAPI: {
    ReadableStream: typeof ReadableStream;
    TextEncoder: typeof TextEncoder;
    Response: typeof Response;
  },
): Response {
  if (!response.body) return response;
  const encoder = new fetchAPI.TextEncoder();
  const from = response.body.getReader();
  let lineStart = true;
  // Pulled only as the client reads (no buffer of its own): a reader that falls behind still
  // holds yoga back, and the subscription's bound then cuts it off (SLOW_MESSAGE).
  const body = new fetchAPI.ReadableStream<Uint8Array>(
    {
      async pull(controller) {
        const { done, value } = await from.read();
        if (done) {
          controller.close();
          return;
        }
        if (!value.byteLength) return;
        const bytes = Buffer.from(value.buffer, value.byteOffset, value.byteLength);
        let sent = 0;
        for (let at = bytes.indexOf(DATA_LINE); at >= 0; at = bytes.indexOf(DATA_LINE, at + 1)) {
          if (at === 0 ? !lineStart : bytes[at - 1] !== 0x0a) continue;
          const cursor = cursors.shift();
          if (!cursor) continue;
          if (at > sent) controller.enqueue(bytes.subarray(sent, at));
          controller.enqueue(encoder.encode(`id: ${cursor}\n`));
          sent = at;
        }
        controller.enqueue(sent ? bytes.subarray(sent) : value);
        lineStart = bytes[bytes.length - 1] === 0x0a;
      },
      cancel: (reason) => from.cancel(reason),
    },
    { highWaterMark: 0 },
  );
  return new fetchAPI.Response(body, { status: response.status, headers: response.headers });
}
