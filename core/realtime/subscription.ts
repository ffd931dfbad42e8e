/**
 * One subscriber's stream: live rows from the tailer are queued, checked for permission in log
 * order and handed to the consumer. The consumer either pulls (an async iterator) or attaches a
 * sink that rows are pushed into synchronously, in order (the WebSocket fan-out path: no promise
 * per row per subscriber). A subscriber that falls too far behind is failed as a slow consumer;
 * it resumes by cursor.
 *
 * While a resuming subscriber replays, the tailer's rows (every row of the instance, not yet
 * checked) wait for it, up to a bound; past it they are dropped, and the hub replays them from
 * the log once this replay ends (restartAt): on a busy instance a long replay costs one more short
 * read, not the subscriber's memory, nor a cut-off that would make it resume, and replay, again.
 */
import { comparePos, finishedIn, type Position, type Snapshot } from './cursor.ts';
import type { LogRow } from './log.ts';
import type { ViewerAccess, Visible } from './visibility.ts';

/** A row as delivered: durable rows carry their cursor, ephemeral ones (typing, presence) null. */
export interface Delivered extends LogRow, Pick<Visible, 'audience'> {
  cursor: string | null;
}

export class SlowConsumerError extends Error {}

/**
 * An event could not be delivered for a reason of the server's (a pool timeout, a dropped
 * connection, a statement timeout) while it was executed (api/realtime/shared-execution.ts) or
 * checked against the viewer's access (`cause`: why): its result is not sent, since with `data`
 * null (its fields are non-null) it carries no cursor and the client's next cursor would be past
 * an event it never got. The subscriber is cut off, as a slow consumer is (1013 on a socket; over
 * SSE its stream ends with this message, api/realtime/sse.ts), and resumes from its last cursor,
 * which precedes the failed event. One that fails so in every round is passed in the end
 * (failures.ts): an execution goes out with its error, a check's row is skipped.
 */
export class EventFailedError extends Error {
  constructor(
    readonly cursor: string | null,
    cause?: unknown,
  ) {
    super('An event could not be delivered: resume from your last cursor.', { cause });
  }
}

/** A push consumer: takes rows in order; `backlog` is how many it holds not yet written. */
export interface Sink {
  deliver(row: Delivered): void;
  backlog(): number;
  /** the subscription ended, closed or failed (with why): write nothing more */
  close(failure?: unknown): void;
}

/** Rows waiting for one subscriber before it is cut off (see overBound). */
export const MAX_PENDING = 5_000;
/** Rows not checked yet may take the bound this many times over (see overBound). */
const CHECK_SLACK = 4;
/** Replay pauses while this many rows wait for the consumer (a quarter of maxPending if less). */
const REPLAY_WINDOW = 256;
/** Live rows a replaying subscriber holds at most (a quarter of maxPending if less); see hold(). */
const CATCH_UP_BUFFER = 1_000;

export class Subscription implements AsyncIterableIterator<Delivered> {
  /** live rows not yet checked */
  private input: Delivered[] = [];
  private output: Delivered[] = [];
  private waiting: ((r: IteratorResult<Delivered>) => void) | undefined;
  private rejectWaiting: ((err: unknown) => void) | undefined;
  private spaceWaiter: (() => void) | undefined;
  private live = false;
  private pumping = false;
  private sink: Sink | undefined;
  private failure: unknown;
  /** replayed rows waiting for the consumer before the replay pauses */
  private readonly window: number;
  /** while a replay runs, live rows held for after it, at most (0: no replay) */
  private readonly holdLimit: number;
  private dropped = false;
  closed = false;
  delivered = 0;
  /** times the replay went on from the log because live rows had to be dropped (restartAt) */
  restarts = 0;

  constructor(
    private maxPending: number,
    readonly access: ViewerAccess,
    /** rows at or before it are never delivered live (replay covers them) */
    public floor: Position,
    private onClose: (s: Subscription, failure?: unknown) => void,
    /** a replay comes first: live rows past the hold limit are dropped for it to read */
    replaying = false,
    /**
     * Whether a logged row whose check failed (the error given) is skipped, not delivered: its
     * check fails for good (skipsUnchecked in hub.ts). Otherwise the subscriber resumes.
     */
    private skipsUnchecked: (row: Delivered, err: unknown) => Promise<boolean> = async () => false,
  ) {
    // Going live, it holds at most holdLimit + window rows, half of maxPending: a consumer that
    // keeps up is not cut off by the live rows that come while it works through them.
    this.window = Math.max(1, Math.min(REPLAY_WINDOW, Math.floor(maxPending / 4)));
    this.holdLimit = replaying ? Math.max(1, Math.min(CATCH_UP_BUFFER, Math.floor(maxPending / 4))) : 0;
  }

  /** From the tailer (durable, same object for every subscriber) or a signal (ephemeral). */
  push(row: Delivered) {
    if (this.closed) return;
    if (row.cursor !== null && comparePos(row, this.floor) <= 0) return;
    if (!this.live) {
      this.hold(row);
      return;
    }
    if (this.overBound()) {
      this.fail(new SlowConsumerError('The client is not reading its events fast enough.'));
      return;
    }
    // Nothing waits ahead of it (the common case): checked at once, without the queue.
    if (!this.pumping && !this.input.length) this.pump(row);
    else {
      this.input.push(row);
      if (!this.pumping) this.pump();
    }
  }

  /**
   * A row before going live. Ephemeral ones are never replayed: dropped. During a replay, durable
   * ones wait up to holdLimit; the next is dropped with all that wait, as is every one after it
   * until restartAt (the log has them all, and they are all at or before the tailer's position
   * then). Waiting for its snapshot (no replay) the slow-consumer bound applies, as live.
   */
  private hold(row: Delivered) {
    if (row.cursor === null || this.dropped) return;
    if (this.holdLimit) {
      if (this.input.length < this.holdLimit) this.input.push(row);
      else {
        this.input = [];
        this.dropped = true;
      }
      return;
    }
    if (this.overBound()) {
      this.fail(new SlowConsumerError('The client is not reading its events fast enough.'));
      return;
    }
    this.input.push(row);
  }

  /**
   * Whether one more row passes the bound: maxPending rows on their way to the client (checked,
   * not yet written), or CHECK_SLACK times that in all with the rows not checked yet. Those wait
   * for this server, not the client: the check of a row that needs a permission load (the first
   * row of a guild in a while) holds every row behind it, and the tailer hands over 1,000 rows a
   * read, another guild's burst (a channel deleted with its threads, a raid of joins) included.
   * With one bound for both, one slow load in a burst cut off a client that was reading.
   */
  private overBound(): boolean {
    const toClient = this.output.length + (this.sink?.backlog() ?? 0);
    return toClient + 1 > this.maxPending || this.input.length + toClient + 1 > this.maxPending * CHECK_SLACK;
  }

  /** Live rows were dropped during this replay: it must go on from the log (restartAt). */
  get behind() {
    return this.dropped;
  }

  /**
   * The replay goes on to `head`, the tailer's position now, read in the same synchronous step
   * (see subscribe() in hub.ts): rows up to it come from the log, rows after it wait here again.
   * Returns the new floor; the replay's next range is (old floor, new floor].
   */
  restartAt(head: Position): Position {
    if (comparePos(head, this.floor) > 0) this.floor = head;
    this.input = [];
    this.dropped = false;
    this.restarts++;
    return this.floor;
  }

  /** A replay is under way: open, and not live yet. */
  get replaying() {
    return !this.live && !this.closed && this.holdLimit > 0;
  }

  /**
   * Rows go to `sink` from now on, in order, instead of to next(); rows already waiting go first.
   * The sink hears of the end through close(); next() is not to be called any more.
   */
  attach(sink: Sink) {
    this.sink = sink;
    const waiting = this.output;
    this.output = [];
    for (const row of waiting) sink.deliver(row);
  }

  /** The sink's backlog went down: replay may go on. */
  spaceAvailable() {
    const w = this.spaceWaiter;
    this.spaceWaiter = undefined;
    w?.();
  }

  /** rows of transactions finished in it are not news to a live-only subscriber */
  private startedAt: Snapshot | undefined;

  /**
   * Live only from `s`: rows of transactions that had finished when it was taken are dropped until
   * the first row of one that had not; from there every row is delivered, whenever it committed.
   * A cursor names a place in the log, and a resume from one brings every row after it: a row
   * dropped after one this stream took (committed behind an older transaction still open at `s`,
   * then read after that one's rows) would come back in a resume from that row's cursor. Called
   * before goLive; rows pushed meanwhile are filtered too.
   */
  startAfter(s: Snapshot) {
    this.startedAt = s;
  }

  /** Live: a row committed from now on is delivered, whatever the replay or snapshot left out. */
  get isLive() {
    return this.live && !this.closed;
  }

  /** Replay is over: deliver what queued up meanwhile. */
  goLive() {
    this.live = true;
    this.pump();
  }

  /**
   * Replayed rows, already ordered and before every live row. `live`: a row that came after the
   * subscriber registered, read from the log only because it could not be held (see hold): it is
   * judged as live rows are, so whether it arrives does not depend on how busy the instance was.
   */
  async emitReplayed(row: Delivered, live = false) {
    this.access.observe(row);
    if (row.gone) return;
    let ok = this.access.canSee(row, !live);
    if (typeof ok !== 'boolean') {
      try {
        ok = await ok;
      } catch (err) {
        // As a live row (resumeAfter): the subscriber resumes from before it, or it is skipped.
        if (await this.skipsUnchecked(row, err)) return;
        throw new EventFailedError(row.cursor, err);
      }
    }
    if (!ok || this.closed) return;
    this.emit(row);
    if ((this.sink ? this.sink.backlog() : this.output.length) >= this.window) {
      await new Promise<void>((r) => {
        this.spaceWaiter = r;
      });
    }
  }

  /**
   * Checks queued rows in order and emits them; synchronous while permissions are cached (the
   * common case), resumed from a promise when one must be loaded.
   */
  private pump(first?: Delivered) {
    this.pumping = true;
    let next = first;
    try {
      while (!this.closed) {
        if (next === undefined && !this.input.length) break;
        const row = next ?? this.input.shift()!;
        next = undefined;
        if (row.cursor !== null && this.startedAt) {
          if (finishedIn(row.xid, this.startedAt)) continue;
          this.startedAt = undefined;
        }
        if (row.cursor !== null) this.access.observe(row);
        if (row.gone) continue;
        const ok = this.access.canSee(row, false);
        if (typeof ok === 'boolean') {
          if (ok) this.emit(row);
          continue;
        }
        this.resumeAfter(ok, row);
        return; // still pumping: the promise resumes it
      }
    } catch (err) {
      this.fail(err);
    }
    this.pumping = false;
  }

  /** The pump waits for a permission load, then goes on (apart: pump's rows stay out of closures). */
  private resumeAfter(ok: Promise<boolean>, row: Delivered) {
    ok.then(
      (yes) => {
        try {
          if (yes) this.emit(row);
        } catch (err) {
          this.pumping = false;
          this.fail(err);
          return;
        }
        this.pump();
      },
      (err) => {
        // A row that could not be checked (the database away): an ephemeral one (typing, presence)
        // is dropped, it degrades itself only; a durable one cannot be skipped, the subscriber
        // resumes from before it, unless its check fails for good. Rows behind it wait meanwhile.
        if (row.cursor === null) {
          this.pump();
          return;
        }
        const resume = () => {
          this.pumping = false;
          this.fail(new EventFailedError(row.cursor, err));
        };
        this.skipsUnchecked(row, err).then((skip) => (skip ? this.pump() : resume()), resume);
      },
    );
  }

  private emit(row: Delivered) {
    if (this.closed) return;
    this.delivered++;
    if (this.sink) {
      this.sink.deliver(row);
      return;
    }
    const w = this.waiting;
    if (w) {
      this.waiting = undefined;
      this.rejectWaiting = undefined;
      w({ value: row, done: false });
    } else this.output.push(row);
  }

  fail(err: unknown) {
    if (this.closed) return;
    this.failure = err;
    // A consumer waiting in next() gets the error, not the end of the stream that finish() gives.
    const reject = this.rejectWaiting;
    this.waiting = undefined;
    this.rejectWaiting = undefined;
    this.finish();
    if (reject) {
      this.failure = undefined;
      reject(err);
    }
  }

  private finish() {
    if (this.closed) return;
    this.closed = true;
    this.input = [];
    // The consumer's and the owner's reactions to the end may throw; the end itself must not:
    // it can come from push(), inside the tailer's dispatch of a row to every subscriber.
    try {
      this.sink?.close(this.failure);
    } catch {
      // the consumer is gone either way
    }
    this.spaceWaiter?.();
    this.spaceWaiter = undefined;
    const w = this.waiting;
    this.waiting = undefined;
    this.rejectWaiting = undefined;
    try {
      this.onClose(this, this.failure);
    } catch {
      // as above
    }
    w?.({ value: undefined, done: true });
  }

  next(): Promise<IteratorResult<Delivered>> {
    if (this.output.length) {
      const value = this.output.shift()!;
      if (this.output.length < this.window / 2 && this.spaceWaiter) {
        this.spaceWaiter();
        this.spaceWaiter = undefined;
      }
      return Promise.resolve({ value, done: false });
    }
    if (!this.sink) this.spaceAvailable();
    if (this.failure) {
      const f = this.failure;
      this.failure = undefined;
      return Promise.reject(f);
    }
    if (this.closed) return Promise.resolve({ value: undefined, done: true });
    return new Promise((resolve, reject) => {
      this.waiting = resolve;
      this.rejectWaiting = reject;
    });
  }

  return(): Promise<IteratorResult<Delivered>> {
    this.output = [];
    this.finish();
    return Promise.resolve({ value: undefined, done: true });
  }

  throw(err: unknown): Promise<IteratorResult<Delivered>> {
    this.fail(err);
    return Promise.reject(err);
  }

  [Symbol.asyncIterator]() {
    return this;
  }
}
