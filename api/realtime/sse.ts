/**
 * Subscriptions over HTTP: yoga serves them as Server-Sent Events (`POST /graphql` or `GET` with
 * `Accept: text/event-stream`), one `next` item per result, then `complete`. Left to yoga, an
 * event whose execution failed for a reason of the server's would go out as an error item with
 * no cursor and the stream would go on: the client's next cursor would be past an event it never
 * got. Here SSE subscriptions execute their events through executeEach (shared-execution.ts), as
 * the socket's pull path does, so such an event is held back by the same rule and counting
 * (holdsBack): the stream ends with one last item, RESUME_MESSAGE with INTERNAL_SERVER_ERROR, and
 * the client resumes from its last cursor, which precedes the failed event. After REPEATS rounds
 * of the same event failing, it goes out with its errors and the stream goes on.
 */
import {
  createSourceEventStream,
  type ExecutionArgs,
  type ExecutionResult,
  GraphQLError,
  type subscribe,
} from 'graphql';
import type { Plugin } from 'graphql-yoga';
import { SlowConsumerError } from '../../core/realtime/subscription.ts';
import type { Logger } from '../logger.ts';
import { EventFailedError, type EventHooks, executeEach } from './shared-execution.ts';

type Mask = EventHooks['mask'];

/** The message of the last item of an SSE stream ended so that its client resumes. */
export const RESUME_MESSAGE = new EventFailedError(null).message;
/** ... ended because its reader fell too far behind (the socket's 1013 slow-consumer close). */
export const SLOW_MESSAGE =
  'Slow consumer: you are not reading your events fast enough; resume from your last cursor.';

/**
 * A mask that leaves errors it made alone: SSE results are masked before yoga's own mask sees
 * them (holdsBack reads the masked codes), and masking twice would count every error twice.
 */
export function maskingOnce(mask: Mask): Mask {
  const made = new WeakSet<object>();
  return (error, message) => {
    if (typeof error === 'object' && error !== null && made.has(error)) return error as Error;
    const masked = mask(error, message);
    made.add(masked);
    return masked;
  };
}

/** The results, ending with a resume item instead of a rejection when an event is held back. */
function endingToResume(
  results: AsyncIterableIterator<ExecutionResult>,
): AsyncIterableIterator<ExecutionResult> {
  let ended = false;
  return {
    async next() {
      if (ended) return { done: true, value: undefined };
      try {
        return await results.next();
      } catch (err) {
        // A held-back event, or a reader too far behind (the socket's 1013): the stream's last item
        // tells the client to resume. Anything else is yoga's to mask, log and send.
        const message =
          err instanceof EventFailedError
            ? err.message
            : err instanceof SlowConsumerError
              ? SLOW_MESSAGE
              : undefined;
        if (!message) throw err;
        ended = true;
        const resume = new GraphQLError(message, { extensions: { code: 'INTERNAL_SERVER_ERROR' } });
        return { done: false, value: { errors: [resume] } };
      }
    },
    return() {
      ended = true;
      return results.return!();
    },
    [Symbol.asyncIterator]() {
      return this;
    },
  };
}

/**
 * The yoga plugin: every subscription it serves (SSE, and app.fetch's in-process ones) runs its
 * events through executeEach. `mask` must be the mask yoga is given too, made with maskingOnce.
 */
export function sseSubscriptions(o: { mask: Mask; log: Logger }): Plugin {
  const hooks: EventHooks = {
    mask: o.mask,
    onEventFailed(row, errors, sent) {
      o.log.error(
        { cursor: row.cursor, type: row.type, errors: errors.map((e) => e.message), via: 'sse' },
        sent
          ? 'event execution failed again and again: sent with its errors, the stream goes on'
          : 'event execution failed: its SSE streams end for their clients to resume from before it',
      );
    },
  };
  const subscribeHolding = async (args: ExecutionArgs) => {
    const source = await createSourceEventStream(args);
    // A refused subscription (bad cursor, not signed in): its errors, as yoga would send them.
    if (!(Symbol.asyncIterator in (source as object))) return source as ExecutionResult;
    const it = (source as AsyncIterable<unknown>)[Symbol.asyncIterator]();
    return endingToResume(executeEach(args, it, hooks));
  };
  return {
    onSubscribe({ setSubscribeFn }) {
      setSubscribeFn(subscribeHolding as unknown as typeof subscribe);
    },
  };
}
