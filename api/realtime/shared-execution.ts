/**
 * Operations over the socket, with subscription work shared between subscribers. The hub hands
 * every local subscriber the same row object; the first subscriber to execute a given (document,
 * variables) for that row runs GraphQL with a context that records whether `viewer` was read. If
 * it was not, the result cannot differ between viewers (visibility was already decided by the
 * hub), so every other subscriber with the same document reuses it instead of executing again.
 *
 * The shared result is serialised and encoded once, and each subscriber's `next` frame is its
 * own id prefix plus those bytes, written synchronously when the result is ready: one callback
 * per shared execution, not one promise chain per subscriber.
 */
import { AsyncResource } from 'node:async_hooks';
import {
  type ASTNode,
  createSourceEventStream,
  type DocumentNode,
  type ExecutionArgs,
  type ExecutionResult,
  execute,
  GraphQLError,
  getOperationAST,
  Kind,
  visit,
} from 'graphql';
import { RepeatedFailures } from '../../core/realtime/failures.ts';
import {
  type Delivered,
  EventFailedError,
  type Sink,
  SlowConsumerError,
  Subscription,
} from '../../core/realtime/subscription.ts';
import type { Context } from '../../schema/builder.ts';
import type { OperationSink, Running } from './protocol.ts';

type Mask = (error: unknown, message: string) => Error;

export interface DeliveryHooks {
  mask: Mask;
  /** events sent so far, by whether the execution was shared (read by the metrics scrape) */
  counts: { shared: number; own: number };
  /**
   * the source failed (slow consumer, or an event that failed to execute: EventFailedError): the
   * caller decides what to do with the socket
   */
  onSourceError(err: unknown, sink: OperationSink): void;
  /**
   * an event's execution failed (once per execution, whoever shares it, in the async context of the
   * operation that executed it; again for subscribers that take it later: FailureReport): `held`,
   * its subscribers are cut off to resume from before it; `sent`, it failed for good and goes out
   * with its errors; `dropped`, an ephemeral one (failureOf). `reached`: the subscribers it
   * reached, by the request ids an operator looks for (a `sent` one's error carries each
   * subscriber's own in `extensions.requestId`).
   */
  onEventFailed(row: Delivered, errors: readonly GraphQLError[], outcome: Outcome, reached: Reached): void;
}

/** What became of an event whose execution failed (DeliveryHooks.onEventFailed). */
export type Outcome = 'held' | 'sent' | 'dropped';

/** The subscribers a failed execution reached: the request ids of the first LOGGED_REQUEST_IDS, and how many. */
export interface Reached {
  requestIds: string[];
  count: number;
}

/** At most this many request ids of one failed execution's subscribers are logged; the rest are counted. */
export const LOGGED_REQUEST_IDS = 20;

/** What executing events one by one needs of the hooks (executeEach; the SSE path has only these). */
export type EventHooks = Pick<DeliveryHooks, 'mask' | 'onEventFailed' | 'counts'>;

interface DocInfo {
  id: number;
  /** variables used only in the arguments of the operation's root fields */
  rootOnly: Set<string>;
}
const docs = new WeakMap<DocumentNode, DocInfo>();
let nextDocId = 1;

function variablesIn(node: ASTNode): string[] {
  const names: string[] = [];
  visit(node, {
    Variable(v) {
      names.push(v.name.value);
    },
  });
  return names;
}

/**
 * Variables that only choose the stream (e.g. `events(after: $cursor)`) cannot change how an
 * event executes, so they are left out of the sharing key: subscribers resuming from different
 * cursors share executions once live.
 */
function docInfo(args: ExecutionArgs): DocInfo {
  let info = docs.get(args.document);
  if (info) return info;
  const op = getOperationAST(args.document, args.operationName);
  const root = new Set<string>();
  const elsewhere = new Set<string>();
  for (const d of args.document.definitions) if (d !== op) for (const v of variablesIn(d)) elsewhere.add(v);
  for (const sel of op?.selectionSet.selections ?? []) {
    if (sel.kind !== Kind.FIELD) {
      for (const v of variablesIn(sel)) elsewhere.add(v);
      continue;
    }
    for (const a of sel.arguments ?? []) for (const v of variablesIn(a)) root.add(v);
    for (const d of sel.directives ?? []) for (const v of variablesIn(d)) elsewhere.add(v);
    if (sel.selectionSet) for (const v of variablesIn(sel.selectionSet)) elsewhere.add(v);
  }
  info = { id: nextDocId++, rootOnly: new Set([...root].filter((v) => !elsewhere.has(v))) };
  docs.set(args.document, info);
  return info;
}

function keyOf(args: ExecutionArgs): string {
  const info = docInfo(args);
  // Entries, not an object built by assignment: `$__proto__` is a legal variable name, and
  // `vars.__proto__ = v` sets a prototype that JSON.stringify leaves out, so subscribers that
  // differed only in it (an @include on it) shared one shape.
  const vars = Object.entries(args.variableValues ?? {}).filter(([k]) => !info.rootOnly.has(k));
  return `${info.id}|${args.operationName ?? ''}|${JSON.stringify(vars)}`;
}

/**
 * An event whose subject was deleted between the log read and execution resolves to NOT_FOUND:
 * it is skipped, as replay skips it (the deletion event follows in the stream).
 */
function isGone(r: ExecutionResult): boolean {
  const data = r.data as Record<string, unknown> | null | undefined;
  const empty = !data || Object.values(data).every((v) => v === null);
  return empty && !!r.errors?.length && r.errors.every((e) => e.extensions?.code === 'NOT_FOUND');
}

/**
 * A masked result with an unexpected error (the server's, not an outcome of the request such as
 * NOT_FOUND or FORBIDDEN, which executing again would only repeat): the event must not be sent.
 */
function failedOf(r: ExecutionResult): boolean {
  return !!r.errors?.some((e) => {
    const code = e.extensions?.code;
    return code === undefined || code === 'INTERNAL_SERVER_ERROR';
  });
}

/**
 * Executions that failed, by event (core/realtime/failures.ts): one that fails in REPEATS rounds
 * goes out as it is, the error in place of its data, and the stream goes on.
 */
const executionFailures = new RepeatedFailures();

/**
 * What becomes of an event whose masked result failed for a reason of the server's (failedOf);
 * undefined when it did not. A logged event is `held` back, its subscribers cut off to resume from
 * before it (EventFailedError), until it has failed for good (executionFailures): then it is `sent`
 * with its errors. An ephemeral one (typing, presence: never logged, never replayed) is `dropped`:
 * it went out with its error in place of its data (`events` is non-null: `data: null`), which a
 * client can do nothing with, and on which some end their subscription (Apollo Client's default
 * error policy). Counted once per execution.
 */
function failureOf(row: Delivered | null | undefined, r: ExecutionResult): Outcome | undefined {
  if (!row || !failedOf(r)) return undefined;
  if (row.cursor === null) return 'dropped';
  return executionFailures.failsForGood(row.cursor) ? 'sent' : 'held';
}

/**
 * A failed execution as the hooks are told of it (onEventFailed): once, with every subscriber that
 * takes its result, each adding its request id as it does (on the failure path only: a result that
 * did not fail has no report). Logged once under the first subscriber's id, another subscriber's
 * (the one its client got in `extensions.requestId`) was in no log line. Told in the next turn of
 * the event loop, in the context of the operation that executed it, with those that took it by
 * then: the subscribers waiting for it, and those the row reaches meanwhile. One that takes it
 * later (its permission check or the rows ahead of it took longer) is told in a line of its own
 * with the others as late as it, so that no id is left out of the log.
 */
class FailureReport {
  private reached: Reached = { requestIds: [], count: 0 };
  private pending = false;
  /** the executing operation's async context (its request store): the lines log under its id */
  private readonly scope = new AsyncResource('BanterFailureReport');

  constructor(
    readonly row: Delivered,
    private readonly errors: readonly GraphQLError[],
    readonly outcome: Outcome,
    private readonly hooks: EventHooks,
  ) {
    this.schedule();
  }

  /** A subscriber with this request id took the failed result. */
  reach(requestId: string) {
    const r = this.reached;
    r.count++;
    if (r.requestIds.length < LOGGED_REQUEST_IDS) r.requestIds.push(requestId);
    this.schedule();
  }

  private schedule() {
    if (this.pending) return;
    this.pending = true;
    setImmediate(() => this.scope.runInAsyncScope(() => this.tell()));
  }

  private tell() {
    const reached = this.reached;
    this.reached = { requestIds: [], count: 0 };
    this.pending = false;
    this.hooks.onEventFailed(this.row, this.errors, this.outcome, reached);
  }
}

/**
 * Errors made by ownRequestId: masked already (api/realtime/sse.ts's maskingOnce leaves them as
 * they are, as it does the errors its mask made).
 */
export const restamped = new WeakSet<object>();

const requestIdOf = (e: GraphQLError) => e.extensions?.requestId;

/**
 * A shared result as it goes to a subscriber other than the one whose execution it is: an
 * unexpected error's `extensions.requestId` is the id of the operation that executed it (the mask
 * reads it from that operation's request store), which another subscriber, maybe another user,
 * must not be sent (an SSE request's is its client's to choose: x-request-id). Each gets its own
 * operation's. `r` itself when no error carries one.
 */
function ownRequestId(r: ExecutionResult, requestId: string): ExecutionResult {
  if (!r.errors?.some((e) => requestIdOf(e) !== undefined)) return r;
  return {
    ...r,
    errors: r.errors.map((e) => {
      if (requestIdOf(e) === undefined) return e;
      const own = new GraphQLError(e.message, {
        nodes: e.nodes,
        source: e.source,
        positions: e.positions,
        path: e.path,
        extensions: { ...e.extensions, requestId },
      });
      restamped.add(own);
      return own;
    }),
  };
}

/** The request id of the operation whose context this is (its errors carry it). */
const requestIdIn = (args: ExecutionArgs) => (args.contextValue as Context).requestId;

export function maskResult(result: ExecutionResult, mask: Mask): ExecutionResult {
  if (!result.errors?.length) return result;
  return {
    ...result,
    errors: result.errors.map((e) => mask(e, 'Unexpected error.') as GraphQLError),
  };
}

/** A context whose `viewer` read is recorded; loaders stay per execution. */
function tracking(ctx: Context): { ctx: Context; touched: () => boolean } {
  let touched = false;
  const viewer = ctx.viewer;
  const tracked = { ...ctx };
  Object.defineProperty(tracked, 'viewer', {
    enumerable: true,
    get() {
      touched = true;
      return viewer;
    },
  });
  return { ctx: tracked, touched: () => touched };
}

const isPromise = <T>(x: unknown): x is Promise<T> => typeof (x as Promise<T> | null)?.then === 'function';

const EMPTY = Buffer.alloc(0);

/** Replay waits while a subscriber holds this many rows not yet written. */
const PUSH_WINDOW = 256;

/**
 * Replay also waits while its socket has this many bytes not yet taken by the kernel, until they
 * are: a replay is paced by the client's reading (README), where otherwise it went on at the
 * speed of execution and a client reading slowly passed the slow-consumer bound mid-replay (1013,
 * then the same replay again). Well below that bound (4 MiB by default).
 */
const REPLAY_BUFFERED_BYTES = 512 * 1024;

/**
 * One execution of a row for a document, shared by the subscribers that wait on it. When it is
 * done, `json` is the masked result serialised once.
 */
class Work {
  done = false;
  gone = false;
  /** the execution failed (failedOf): its subscribers are cut off to resume */
  failed = false;
  /** how it failed, told to the hooks with each subscriber it reaches; none when it did not */
  failure: FailureReport | undefined;
  /** the masked result as UTF-8 JSON, encoded once for all its subscribers */
  bytes = EMPTY;
  /**
   * the masked result, when it goes out with an error carrying its owner's request id: each other
   * subscriber's frame is encoded with its own (ownRequestId)
   */
  stamped: ExecutionResult | undefined;
  viewerFree = false;
  private waiters: Delivery[] = [];

  constructor(
    readonly owner: Delivery,
    args: ExecutionArgs,
    readonly row: Delivered,
    hooks: DeliveryHooks,
  ) {
    const mask = hooks.mask;
    const t = tracking(args.contextValue as Context);
    const settle = (r: ExecutionResult) => {
      const masked = maskResult(r, mask);
      const outcome = failureOf(row, masked);
      if (outcome) this.failure = new FailureReport(row, masked.errors ?? [], outcome, hooks);
      this.gone = outcome === 'dropped' || isGone(masked);
      this.failed = outcome === 'held';
      if (!this.failed && !this.gone) {
        this.bytes = Buffer.from(JSON.stringify(masked));
        if (masked.errors?.some((e) => requestIdOf(e) !== undefined)) this.stamped = masked;
      }
      this.viewerFree = !t.touched();
      this.done = true;
      const waiters = this.waiters;
      this.waiters = [];
      for (const d of waiters) d.flush();
    };
    const failed = (err: unknown) => settle({ errors: [mask(err, 'Unexpected error.') as GraphQLError] });
    try {
      const r = execute({ ...args, rootValue: row, contextValue: t.ctx });
      if (isPromise<ExecutionResult>(r)) r.then(settle, failed);
      else settle(r);
    } catch (err) {
      failed(err);
    }
  }

  wait(d: Delivery) {
    this.waiters.push(d);
  }
}

const works = new WeakMap<object, Map<string, Work>>();

/** A subscriber's push sink: rows in, `next` frames out, in row order. */
class Delivery implements Sink {
  private queue: { row: Delivered; work: Work }[] = [];
  private closed = false;
  /** the replay waits for the socket to drain (a listener is set) */
  private draining = false;
  /**
   * The async context of the subscriber's operation (its request store: made in it): the
   * executions it runs, shared or not, log under its request id, not under that of whatever
   * read the row (the hub's reads run in a context of their own).
   */
  private readonly scope = new AsyncResource('BanterDelivery');

  constructor(
    private args: ExecutionArgs,
    private key: string,
    private hooks: DeliveryHooks,
    private sub: Subscription,
    private out: OperationSink,
  ) {}

  backlog() {
    return this.queue.length + (this.socketFull() ? PUSH_WINDOW : 0);
  }

  /** Replaying, with more unsent on the socket than the replay may add to. */
  private socketFull() {
    return this.sub.replaying && this.out.socket.bufferedAmount >= REPLAY_BUFFERED_BYTES;
  }

  /** Lets the replay go on: now, or once the socket has drained. */
  private space() {
    if (!this.socketFull()) {
      this.sub.spaceAvailable();
      return;
    }
    if (this.draining) return;
    const tcp = (this.out.socket as unknown as { _socket?: import('node:net').Socket })._socket;
    if (!tcp) return;
    this.draining = true;
    tcp.once('drain', () => {
      this.draining = false;
      this.space();
    });
  }

  close(failure?: unknown) {
    if (this.closed) return;
    this.closed = true;
    this.queue = [];
    if (failure) {
      this.hooks.onSourceError(failure, this.out);
      // A failed event is logged once for all its subscribers (masking it here would log it once
      // per subscriber), and its socket is closing: no error frame. Nor for a slow consumer, whose
      // close says why: masked, it was logged as an unexpected server error for every socket cut
      // off, and its client got an INTERNAL_SERVER_ERROR before the close.
      if (!(failure instanceof EventFailedError || failure instanceof SlowConsumerError))
        this.out.next(sourceErrorResult(failure, this.hooks.mask));
    }
    this.out.complete();
  }

  deliver(row: Delivered) {
    if (this.closed) return;
    let byKey = works.get(row);
    if (!byKey) {
      byKey = new Map();
      works.set(row, byKey);
    }
    let work = byKey.get(this.key);
    if (!work) {
      work = this.execute(row);
      byKey.set(this.key, work);
    }
    if (!this.queue.length && work.done && this.mayUse(work)) {
      // Nothing waits ahead of it and its result is ready (the common case): written at once.
      this.write(work);
      this.space();
      return;
    }
    this.queue.push({ row, work });
    if (this.queue.length === 1) this.flush();
  }

  /** This subscriber's execution of `row`, in its operation's context. */
  private execute(row: Delivered): Work {
    return this.scope.runInAsyncScope(() => new Work(this, this.args, row, this.hooks));
  }

  /** Whether a done result serves this subscriber: its own, or one that did not depend on its viewer. */
  private mayUse(work: Work) {
    return work.owner === this || work.viewerFree;
  }

  private write(work: Work) {
    // Every subscriber a failed execution reaches, dropped, held back or sent, is in its log line.
    work.failure?.reach(requestIdIn(this.args));
    if (work.gone) return;
    if (work.failed) {
      // Not sent: the subscription fails as a slow consumer's does (the socket is closed with
      // 1013 and nothing more goes out on it), and the client resumes from before this event.
      this.sub.fail(new EventFailedError(work.row.cursor));
      return;
    }
    const bytes =
      work.owner !== this && work.stamped
        ? Buffer.from(JSON.stringify(ownRequestId(work.stamped, requestIdIn(this.args))))
        : work.bytes;
    // Counted when written: not a frame for a socket closing meanwhile, which its client never gets.
    if (!this.out.nextEncoded(bytes)) return;
    if (work.owner === this) this.hooks.counts.own++;
    else this.hooks.counts.shared++;
  }

  /** Writes the rows at the head of the queue whose results are ready; waits on the first that is not. */
  flush() {
    const q = this.queue;
    while (q.length && !this.closed) {
      const item = q[0];
      if (!item.work.done) {
        item.work.wait(this);
        return;
      }
      if (!this.mayUse(item.work)) {
        // The result depended on its viewer: this subscriber runs its own.
        item.work = this.execute(item.row);
        continue;
      }
      q.shift();
      this.write(item.work);
    }
    if (q.length < PUSH_WINDOW / 2) this.space();
  }
}

function sourceErrorResult(err: unknown, mask: Mask): ExecutionResult {
  return maskResult(
    { errors: [new GraphQLError((err as Error).message, { originalError: err as Error })] },
    mask,
  );
}

/**
 * Runs a subscription operation: `next` frames go to `out` until the stream ends (then
 * `complete`), or it fails (a `next` with the masked error, then `complete`). Errors from
 * setting up the stream (bad or expired cursor) come back the same way, as the protocol expects.
 */
export async function startSubscription(
  args: ExecutionArgs,
  hooks: DeliveryHooks,
  out: OperationSink,
): Promise<Running> {
  const source = await createSourceEventStream(args);
  if (!(Symbol.asyncIterator in (source as object))) {
    out.next(maskResult(source as ExecutionResult, hooks.mask));
    out.complete();
    return { stop() {} };
  }
  if (source instanceof Subscription) {
    source.attach(new Delivery(args, keyOf(args), hooks, source, out));
    return { stop: () => void source.return() };
  }
  // Any other stream: one execution per event, in order.
  const results = executeEach(args, (source as AsyncIterable<unknown>)[Symbol.asyncIterator](), hooks);
  let stopped = false;
  void (async () => {
    try {
      for (;;) {
        const step = await results.next();
        if (step.done || stopped) break;
        out.next(step.value);
      }
    } catch (err) {
      // A held-back event or a slow consumer: the hooks cut the subscriber off, with no error
      // frame (as Delivery does).
      if (err instanceof EventFailedError || err instanceof SlowConsumerError) hooks.onSourceError(err, out);
      else if (!stopped) out.next(sourceErrorResult(err, hooks.mask));
    }
    out.complete();
  })();
  return {
    stop() {
      stopped = true;
      void results.return?.();
    },
  };
}

/** An executeEach execution of a row, and whether its result serves other viewers too. */
interface Executed {
  result: ExecutionResult;
  viewerFree: boolean;
  /** its subject is gone (isGone): skipped */
  gone: boolean;
  /** it failed and is held back (failureOf, decided once for the execution) */
  held: boolean;
  /** how it failed, told to the hooks with each reader it reaches; none when it did not */
  failure: FailureReport | undefined;
}
/** executeEach's executions by row and document key (as `works` is for sockets). */
const executions = new WeakMap<object, Map<string, Promise<Executed>>>();

/** The cursor of the row an executeEach result is of (SSE sends it as the event's id). */
const resultCursors = new WeakMap<ExecutionResult, string>();
export const cursorOfResult = (r: ExecutionResult): string | undefined => resultCursors.get(r);

/**
 * The pull path: takes events from `source` one at a time and executes each, in order, yielding
 * its masked result (events whose subject is gone are skipped). An event held back (failureOf)
 * is not yielded: the source is returned and next() rejects with EventFailedError, for the caller
 * to end its stream so the client resumes from before it. Used by subscriptions over SSE (whose
 * reader pulls at its own pace) and by non-hub streams on the socket.
 *
 * Not an async generator: return() must reach the source at once, even while next() waits on it
 * (a generator would queue the return behind that wait, keeping an idle subscriber registered).
 */
export function executeEach(
  args: ExecutionArgs,
  source: AsyncIterator<unknown>,
  hooks: EventHooks,
): AsyncIterableIterator<ExecutionResult> {
  let ended = false;
  const end = () => {
    if (ended) return;
    ended = true;
    void source.return?.();
  };
  const over = (): IteratorResult<ExecutionResult> => ({ done: true, value: undefined });
  const key = keyOf(args);
  const own = async (row: unknown): Promise<Executed> => {
    const t = tracking(args.contextValue as Context);
    let result: ExecutionResult;
    let viewerFree = false;
    try {
      result = maskResult(await execute({ ...args, rootValue: row, contextValue: t.ctx }), hooks.mask);
      viewerFree = !t.touched();
    } catch (err) {
      // As Work does: a throw is a failed execution, held back or sent like any other.
      result = { errors: [hooks.mask(err, 'Unexpected error.') as GraphQLError] };
    }
    // As Work does, a failure is counted (failureOf) once per execution, not per subscriber.
    const outcome = failureOf(row as Delivered | null, result);
    const failure = outcome && new FailureReport(row as Delivered, result.errors ?? [], outcome, hooks);
    failure?.reach(requestIdIn(args));
    return {
      result,
      viewerFree,
      gone: outcome === 'dropped' || isGone(result),
      held: outcome === 'held',
      failure,
    };
  };
  // As Work does for sockets: the first subscriber to take a row executes it, and those after
  // it with the same document and variables take its result when it did not read the viewer
  // (a copy: plugins downstream may set fields of their own on it). A live row is one object
  // for all its subscribers, and so is a replayed one read from a page shared by their replays
  // (a long replay reads its viewer's rows alone: each its own, and so executed by it).
  // A failure held back is not taken: a reader that comes to the row later (it pulls at its own
  // pace) executes it again, rather than counting the one failure as the event failing again
  // until it goes out with its errors (failureOf; REPEATS: core/realtime/failures.ts) when the
  // database is long back.
  const run = async (row: unknown): Promise<{ x: Executed; shared: boolean }> => {
    if (row === null || typeof row !== 'object') return { x: await own(row), shared: false };
    let byKey = executions.get(row);
    if (!byKey) {
      byKey = new Map();
      executions.set(row, byKey);
    }
    const first = byKey.get(key);
    let replaces = !first;
    if (first) {
      const done = await first;
      if (done.viewerFree && !done.held) {
        done.failure?.reach(requestIdIn(args));
        return { x: { ...done, result: { ...ownRequestId(done.result, requestIdIn(args)) } }, shared: true };
      }
      // Those after this one take its execution instead, if the first's failed (and still stands).
      replaces = done.held && byKey.get(key) === first;
    }
    const mine = own(row);
    if (replaces) byKey.set(key, mine);
    return { x: await mine, shared: false };
  };
  return {
    async next() {
      for (;;) {
        if (ended) return over();
        const step = await source.next();
        if (step.done || ended) {
          ended = true;
          return over();
        }
        const { x, shared } = await run(step.value);
        const r = x.result;
        if (ended) return over();
        if (x.gone) continue;
        const row = step.value as Delivered | null;
        if (x.held) {
          end();
          throw new EventFailedError(row!.cursor);
        }
        if (shared) hooks.counts.shared++;
        else hooks.counts.own++;
        if (row?.cursor) resultCursors.set(r, row.cursor);
        return { done: false, value: r };
      }
    },
    async return() {
      end();
      return over();
    },
    [Symbol.asyncIterator]() {
      return this;
    },
  };
}
