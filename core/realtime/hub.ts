/**
 * The realtime hub of one api process: one log tailer and the local subscribers.
 *
 * The tailer reads finished rows after its own position in one query, on every bus ring and on a
 * short poll (the safety net for rings lost in a Redis restart), and hands each row, the same
 * object, to every local subscriber. A send made here hands its rows over as its result arrives
 * (follow): they go out from the result itself when nothing can come before them, else the
 * log is read on the send's connection, and its ring then needs no read of its own. A subscriber with
 * `after` registers at the tailer's position P, replays (after, P] from the log, then takes live
 * rows > max(after, P): no gap, no duplicate (live rows that came faster than it could hold them
 * during the replay are read from the log too: see catchUp).
 * A subscriber without `after` registers at P, then takes a database snapshot: live rows of
 * transactions finished in that snapshot are dropped, every other row is delivered.
 */
import { AsyncResource } from 'node:async_hooks';
import { eq, sql } from 'drizzle-orm';
import { type Db, databaseOf, followCommits, uuidArray } from '../db/client.ts';
import { users } from '../db/tables.ts';
import type { CoreSettings, Log } from '../deps.ts';
import { BanterError } from '../errors.ts';
import type { Bus, LoggedEventRef, SignalTopics } from '../ports/bus.ts';
import { observeEvents } from '../services/access-cache.ts';
import { batched } from './batch.ts';
import {
  comparePos,
  compareXid,
  decodeCursor,
  encodeCursor,
  maxPos,
  ORIGIN,
  type Position,
  type Snapshot,
} from './cursor.ts';
import { isOwnFailure, RepeatedFailures } from './failures.ts';
import {
  assertAfterWatermark,
  assertResumable,
  awaitsFormerMembers,
  type BoundedRead,
  discardRowsFromAnotherCluster,
  type Horizon,
  headPosition,
  loadFormerMembers,
  loadMessages,
  loadViewerScopes,
  mayConcern,
  type PruneStatus,
  prunedThrough,
  pruneEventsReporting,
  type ResumeBounds,
  readAfter,
  readAfterBounded,
  readAfterWatched,
  readRange,
  readRangeAll,
  resumeBounds,
  snapshotNow,
  type ViewerScope,
  type WrittenLog,
} from './log.ts';
import { createMemoryPresence, createPresenceTracker, type PresenceStore } from './presence.ts';
import { type Delivered, EventFailedError, MAX_PENDING, Subscription } from './subscription.ts';
import { createMemoryThrottle, type TypingThrottle } from './typing.ts';
import { accessAnswers, presenceAudience, ViewerAccess } from './visibility.ts';

export interface HubDeps {
  db: Db;
  bus: Bus;
  log: Log;
  settings: CoreSettings;
}

/** Hooks for metrics; all optional. */
export interface HubObserver {
  delivered?(n: number): void;
  replayed?(n: number): void;
  subscriptions?(delta: number): void;
  /** a read of the log: behind a write on its connection, for a bus ring, or the poll */
  read?(via: 'follow' | 'ring' | 'poll'): void;
  /** a write's own rows dispatched from its result, with no read */
  fromWrite?(): void;
}

export interface HubOptions {
  /** Log poll interval in ms, the safety net for lost rings. Default 500. */
  pollMs?: number;
  /** Rows a subscriber may have waiting before it is cut off as a slow consumer. Default 5,000. */
  maxPending?: number;
  /** Prune interval in ms. Default 1 hour. */
  pruneMs?: number;
  observer?: HubObserver;
  /** Where presence is kept. Default: in process. */
  presence?: PresenceStore;
  /** Where the typing throttle is kept (shared with other instances in Redis). Default: in process. */
  typingThrottle?: TypingThrottle;
}

export interface SubscribeOptions {
  /** Called when the subscriber is cut off (slow consumer). */
  onFail?(err: unknown): void;
  /** Where `after` came from, named in its error when malformed: `after` (default), or Last-Event-ID. */
  cursorFrom?: string;
}

const BATCH = 1000;
/** Longest a presence change waits to be batched with others (see flushPresence). */
const PRESENCE_BATCH_MS = 100;
const REPLAY_PAGE = 500;
/**
 * A replay of at most about this many rows of the log (by seq, the whole log's rows, not only the
 * viewer's) reads shared pages (see sharedPage); a longer one reads its viewer's rows alone, so a
 * client resuming from long ago does not make the instance read every row of every guild for it.
 */
const SHARED_REPLAY_ROWS = 2_000;
/** How long a shared replay page serves subscribers resuming from where it begins, once read. */
const SHARED_PAGE_MS = 1_000;
/**
 * Most shared pages kept at once (each up to REPLAY_PAGE rows with their messages): past it the
 * oldest is forgotten (its readers keep it until they are done), so a crowd resuming from many
 * cursors at once does not hold N pages for SHARED_PAGE_MS.
 */
const MAX_SHARED_PAGES = 64;

/**
 * A viewer's scope (its guilds and DMs) for filtering shared pages, and the tailer's position when
 * it was asked for: every row up to there was final before the scope's statement was sent.
 */
interface HeldScope {
  scope: ViewerScope;
  asOf: Position;
}

/** A page of the log as read for replays: every row in (from, through], in log order. */
interface SharedPage {
  rows: Delivered[];
  through: Position;
}
/**
 * A prune held back by more than this (its oldest row left this far past the retention) is
 * logged at warn level, naming what holds it (see PruneStatus). Only a transaction of this
 * database open for longer than the retention holds it at all; the minute keeps a row that aged
 * while the prune ran from counting.
 */
export const PRUNE_HELD_BACK_WARN_SECONDS = 60;
/** Longest typing waits for the log to be read before it is dropped (see afterLogRead). */
const LOG_READ_WAIT_MS = 3000;
/** Longest a ring waits for the follower read out when it came (see follow). */
const FOLLOW_WAIT_MS = 25;

interface ReadWaiter {
  /** reads begun when it came: a later read gives its bound */
  since: number;
  /** the xmax of the first read that began after it came (see afterLogRead) */
  bound?: string;
  resolve(ok: boolean): void;
  timer: NodeJS.Timeout;
}

/** Whether a batch has a GUILD_DELETED row still without its former members (rare: awaited only then). */
const deletesGuild = (batch: Delivered[]) => batch.some(awaitsFormerMembers);

/** The last `size` seqs added, for membership tests. */
class RecentSeqs {
  private set = new Set<number>();
  private ring: number[] = [];
  private at = 0;
  constructor(private size: number) {}
  add(seq: number) {
    if (this.set.has(seq)) return;
    if (this.ring.length < this.size) this.ring.push(seq);
    else {
      this.set.delete(this.ring[this.at]);
      this.ring[this.at] = seq;
      this.at = (this.at + 1) % this.size;
    }
    this.set.add(seq);
  }
  has(seq: number) {
    return this.set.has(seq);
  }
}

export function createHub(deps: HubDeps, opts: HubOptions = {}) {
  const pollMs = opts.pollMs ?? 500;
  const database = databaseOf(deps.db);
  let obs = opts.observer ?? {};
  let maxPending = opts.maxPending ?? MAX_PENDING;
  const subs = new Set<Subscription>();
  /**
   * The hub's own async context, where its reads of the log and its deliveries run: they belong
   * to no request. A read began in whatever asked for it (a write's ring or follow-up read, a
   * typing signal) serves every row it finds, other writers' too (a statement grouping several
   * users' sends): run there, each subscriber's execution of them was logged under that one
   * request's id (another user's, whose client may choose it). The socket's executions run in
   * their subscriber's operation (api/realtime/shared-execution.ts).
   */
  const scope = new AsyncResource('BanterHub');
  const inHub =
    <A extends unknown[], R>(fn: (...a: A) => R) =>
    (...a: A): R =>
      scope.runInAsyncScope(fn, null, ...a);
  let pos: Position | undefined;
  let ready: Promise<void> | undefined;
  let busy = false;
  let again = false;
  let tailing: Promise<void> = Promise.resolve();
  /** the next read is to use the exact horizon (a poll asked for it) */
  let exactWanted = false;
  /** reads of the log begun so far, and what waits for the log to be read (see afterLogRead) */
  let readsBegun = 0;
  let readWaiters: ReadWaiter[] = [];
  let stopped = false;
  let poll: NodeJS.Timeout | undefined;
  let prune: NodeJS.Timeout | undefined;
  /** what this instance's last prune left (metrics) */
  let pruneStatus: PruneStatus | undefined;
  /**
   * The highest watermark this hub has answered for (see lostToPrune): the one at its start (rows
   * up to it were gone before anyone subscribed here), or one that expired its subscribers.
   */
  let lostThrough: Position = ORIGIN;
  /**
   * The position before the first dispatch of a write's own rows (follow) since the watermark was
   * last compared with the tailer's position: such a dispatch moves the position with no read, so
   * past any rows the prune deleted before the tailer read them (a write's `before` is the last row
   * still there). The next read's watermark answers for it.
   */
  let unchecked: Position | undefined;
  /** dispatches of a write's own rows so far (a read clears `unchecked` only if none came during it) */
  let writeMoves = 0;
  const unsubs: (() => void)[] = [];
  let presenceBatch: Map<string, string> | undefined;
  let presenceTimer: NodeJS.Timeout | undefined;
  let presenceDone: Promise<void> = Promise.resolve();
  const disconnectHandlers = new Set<(s: SignalTopics['disconnect']) => void>();
  /** The log's bounds for resuming, one statement for every subscriber asking while one is out. */
  const sharedBounds = batched(async () => new Map([[0, await resumeBounds(deps.db)]]));
  /**
   * The statuses users chose, for presence as their sockets connect: twice per socket, and a crowd
   * reconnecting after its instance stopped made 2,000 statements of 1,000 sockets (bench:storm);
   * one statement for all that ask while one is out.
   */
  const loadChoices = batched(async (ids: string[]) => {
    const found = await deps.db
      .select({ id: users.id, choice: users.presenceChoice })
      .from(users)
      .where(sql`${users.id} = any(${uuidArray(ids)})`);
    return new Map(found.map((u) => [u.id, u.choice]));
  });
  const presence = createPresenceTracker(
    opts.presence ?? createMemoryPresence(),
    deps.bus,
    Math.random().toString(36).slice(2, 10),
    {
      async load(userId) {
        return (await loadChoices(userId)) ?? null;
      },
      async save(userId, choice) {
        await deps.db.update(users).set({ presenceChoice: choice }).where(eq(users.id, userId));
      },
    },
  );

  /** Checks that failed, by event (failures.ts): one that fails for good is skipped. */
  const checkFailures = new RepeatedFailures();
  /** the accessAnswers control under way, for every subscriber whose check failed meanwhile */
  let control: Promise<boolean> | undefined;

  /**
   * Whether a logged row whose access check failed is skipped, for every subscriber whose check
   * of it fails from now on: it failed in REPEATS rounds, each while the access statements answered
   * for a subject that does not exist (accessAnswers). Its subscribers could otherwise never get
   * past it: each resume would meet it and be closed again. It is not delivered: who may see it
   * cannot be told. A failure while the control fails too (the database away or restarting, a
   * table of the checks away: every check fails) is not counted, so that is never a reason to skip
   * a row, however long it lasts. Logged at error level once per row.
   */
  async function skipsUnchecked(row: Delivered, err: unknown): Promise<boolean> {
    const cursor = row.cursor!;
    // A failure that passes (a statement cancelled, a connection lost) is no reason to skip a row,
    // however often it comes: the subscriber resumes.
    if (!isOwnFailure(err)) return false;
    if (checkFailures.failedForGood(cursor)) return true;
    control ??= accessAnswers(deps.db).finally(() => {
      control = undefined;
    });
    const answers = await control;
    // Decided while this waited (another subscriber of the same row): already logged.
    if (checkFailures.failedForGood(cursor)) return true;
    if (!answers || !checkFailures.failsForGood(cursor)) return false;
    deps.log.error(
      { err, cursor, type: row.type, guildId: row.guildId, channelId: row.channelId },
      'an event could not be checked again and again while other checks could: skipped, not delivered; streams go on past it',
    );
    return true;
  }

  /** The users subscribed here: whose former memberships a deleted guild's row is read for. */
  function viewers(): Set<string> {
    const ids = new Set<string>();
    for (const s of subs) ids.add(s.access.userId);
    return ids;
  }

  /** Seqs of the rows dispatched lately: a ring for rows already read needs no read. */
  const seen = new RecentSeqs(4096);
  /** A read queued behind a write on its connection (follow), not yet answered. */
  let following = false;
  /** Rings heard while that read was out: read again for those it did not bring. */
  let deferred: LoggedEventRef[] = [];
  /** an empty ring came meanwhile: read once the follower is back, whatever it brought */
  let readAfterFollow = false;
  let deferTimer: NodeJS.Timeout | undefined;

  /**
   * Hands rows to every subscriber, those after the position only: two reads can be out at once
   * (a follower and a poll), and each returns a prefix of the same order (a row finished in an
   * older snapshot is finished in every newer one, and rows sort by xid first).
   */
  function dispatch(rows: Delivered[]) {
    let from = 0;
    while (from < rows.length && comparePos(rows[from], pos!) <= 0) from++;
    const batch = from ? rows.slice(from) : rows;
    if (!batch.length || stopped) return;
    // Other instances' access changes reach this process's access cache here.
    observeEvents(database, batch);
    for (const r of batch) {
      r.cursor = encodeCursor(r);
      seen.add(r.seq);
      if (r.malformed) {
        deps.log.error(
          { seq: r.seq, type: r.type, cursor: r.cursor },
          'event log row with a payload that is not a JSON object: skipped, delivered to no one',
        );
      }
    }
    // Position and dispatch move together, synchronously: a subscriber registering at any
    // moment sees either the old position and this batch, or the new one and not it. A copy, not
    // the row: the position is kept (here, and as the floor of every subscriber registering at
    // it), and a row keeps its shared executions (api/realtime/shared-execution.ts), each with the
    // subscriber that ran it, whose floor was the row before, and so on: a chain through every
    // subscriber since the process started, their sockets and viewers' access with them.
    const last = batch[batch.length - 1];
    pos = { xid: last.xid, seq: last.seq };
    for (const s of subs) {
      try {
        for (let i = 0; i < batch.length; i++) s.push(batch[i]);
      } catch (err) {
        // One subscriber's failure must not cost the others these rows (pos has moved past them).
        deps.log.error({ err }, 'a subscriber failed while taking rows: cut off');
        s.fail(err);
      }
    }
    for (const r of batch) if (r.type === 'RELATIONSHIP_UPDATED') void presenceAfterBlockChange(r);
  }

  /**
   * After a read made from `from` (begun when writeMoves was `moves`) whose snapshot had the
   * watermark at `pruned`: a watermark past where the tailer was means the prune deleted rows this
   * tailer had not read yet (an instance paused, suspended or blocked for a whole retention; rows a
   * transaction open that long held back, pruned within a poll of its commit). Its subscribers
   * would have a gap where those rows were: each whose stream began before the watermark is failed
   * with CURSOR_EXPIRED instead (its client refetches), before the read's rows are dispatched.
   */
  function lostToPrune(from: Position, pruned: Position | undefined, moves: number) {
    // With no subscriber when the read is done, no stream has a gap: whoever subscribes next begins
    // at the position then. (Kept, the position of a move before the last one left was compared
    // with the watermark a retention later: a false alarm of rows lost.)
    if (!subs.size) {
      unchecked = undefined;
      return;
    }
    if (!pruned) return;
    let since = from;
    if (unchecked && comparePos(unchecked, since) < 0) since = unchecked;
    // This read answers for the moves before it began; those during it began at `from` or later.
    // (Kept at the first unchecked position while writes kept coming, under a steady load it
    // stayed there for good, and once a week had gone by, the watermark passed it.)
    unchecked = moves === writeMoves ? undefined : from;
    if (comparePos(pruned, maxPos(since, lostThrough)) <= 0) return;
    lostThrough = pruned;
    const expired = [...subs].filter((s) => comparePos(s.floor, pruned) < 0);
    for (const s of expired) s.fail(new BanterError('CURSOR_EXPIRED'));
    deps.log.warn(
      { tailerAt: encodeCursor(since), prunedThrough: encodeCursor(pruned), expired: expired.length },
      'the event log was pruned past rows this instance had not read yet (was it paused, or the event loop blocked, for the retention?): its subscribers from before get CURSOR_EXPIRED',
    );
  }

  /** Reads the log until it has caught up; a call while a read is under way asks for another. */
  function tail(via: 'ring' | 'poll' = 'ring'): Promise<void> {
    if (stopped) return Promise.resolve();
    if (via === 'poll') exactWanted = true;
    if (busy) {
      again = true;
      return tailing;
    }
    busy = true;
    tailing = tailUntilCaughtUp(via);
    return tailing;
  }

  /**
   * Settles true once every transaction that had committed when this was called has been read
   * and dispatched; false if that takes longer than LOG_READ_WAIT_MS, a read fails, or the hub
   * stops (never rejects). A read that began after the call gives the bound, its snapshot's xmax;
   * a read whose horizon reached that bound, to its last row, settles it. Usually the first read
   * does both; a transaction of this database still open holds it until it ends. Not "once the
   * tailer has caught up": under steady traffic that may be never.
   */
  function afterLogRead(): Promise<boolean> {
    if (stopped) return Promise.resolve(false);
    const p = new Promise<boolean>((resolve) => {
      const w: ReadWaiter = {
        since: readsBegun,
        resolve: (ok) => {
          clearTimeout(w.timer);
          resolve(ok);
        },
        timer: setTimeout(() => {
          readWaiters = readWaiters.filter((x) => x !== w);
          w.resolve(false);
        }, LOG_READ_WAIT_MS),
      };
      readWaiters.push(w);
    });
    void tail();
    return p;
  }

  /**
   * Read number `n` was dispatched, `bound` saying how far it saw (only a bounded read, which the
   * tailer makes while anything waits, decides), `whole` when it was not a full page.
   */
  function readDone(n: number, bound: BoundedRead | undefined, whole: boolean) {
    if (!readWaiters.length || !bound) return;
    readWaiters = readWaiters.filter((w) => {
      if (n <= w.since) return true;
      w.bound ??= bound.xmax;
      if (!whole || compareXid(bound.horizon, w.bound) < 0) return true;
      w.resolve(true);
      return false;
    });
  }

  /** Everything waiting for a read of the log gives up (a read failed, the hub stops). */
  function abandonWaiters() {
    const all = readWaiters;
    readWaiters = [];
    for (const w of all) w.resolve(false);
  }

  async function tailUntilCaughtUp(via: 'ring' | 'poll') {
    try {
      do {
        again = false;
        for (;;) {
          // Rows reach subscribers only: with none here, nobody needs their messages.
          const withMessages = subs.size > 0;
          obs.read?.(via);
          // A poll's read tells this database's transactions from other databases' (see Horizon):
          // one open elsewhere holds the other reads back, never this one. So does a read something
          // waits for (afterLogRead), which also says how far it saw.
          const horizon: Horizon = exactWanted ? 'exact' : 'fast';
          exactWanted = false;
          const n = ++readsBegun;
          const at = pos!;
          const moves = writeMoves;
          let bound: BoundedRead | undefined;
          let batch: Delivered[];
          let pruned: Position | undefined;
          if (readWaiters.length) {
            bound = await readAfterBounded(deps.db, at, BATCH);
            batch = bound.rows as Delivered[];
            pruned = bound.pruned;
          } else if (withMessages) {
            const read = await readAfterWatched(deps.db, at, BATCH, horizon);
            batch = read.rows as Delivered[];
            pruned = read.pruned;
          } else batch = (await readAfter(deps.db, at, BATCH, horizon)) as Delivered[];
          // Read without the watermark (no subscriber then, one since), or an empty read after a
          // write's rows moved the position unread: asked apart (rare: never per row).
          if (!pruned && subs.size && (batch.length || unchecked)) pruned = await prunedThrough(deps.db);
          lostToPrune(at, pruned, moves);
          if (!batch.length || stopped) {
            readDone(n, bound, true);
            break;
          }
          if (!bound && !withMessages && subs.size) await loadMessages(deps.db, batch);
          if (deletesGuild(batch)) await loadFormerMembers(deps.db, batch, viewers());
          dispatch(batch);
          readDone(n, bound, batch.length < BATCH);
          if (batch.length < BATCH) break;
        }
      } while (again && !stopped);
    } catch (err) {
      deps.log.warn({ err }, 'event log tail failed; retrying on the next poll');
      // What waited for a read gives up (typing is dropped rather than judged on stale access).
      abandonWaiters();
    } finally {
      busy = false;
    }
  }

  /**
   * A hot write's result has just arrived (followCommits). Its own rows go out at once when they
   * come next in the log: every row ahead of them dispatched already (the write says which row
   * that is, when no other transaction could still put one there). Otherwise the log is read on
   * the write's connection, and its ring, heard meanwhile, waits for that read instead of
   * starting another. Only one such read at a time, and only while no other read is out, so reads
   * do not pile up under load.
   */
  function follow(db: Db, written?: WrittenLog): Promise<unknown> | undefined {
    if (stopped || !pos || !subs.size) return undefined;
    if (written && comparePos(pos, written.before ?? ORIGIN) >= 0) {
      obs.fromWrite?.();
      unchecked ??= pos;
      writeMoves++;
      dispatch(written.rows as Delivered[]);
      return undefined;
    }
    if (following || busy) return undefined;
    obs.read?.('follow');
    following = true;
    const at = pos;
    const moves = writeMoves;
    const read = readAfterWatched(db, at, BATCH).then((r) => {
      lostToPrune(at, r.pruned, moves);
      return r.rows;
    });
    const failed = (err: unknown) => {
      following = false;
      deps.log.warn({ err }, 'event log read after a write failed; reading again');
      settleDeferred(true);
    };
    const done = (batch: Delivered[]) => {
      try {
        following = false;
        dispatch(batch);
        settleDeferred(batch.length === BATCH);
      } catch (err) {
        failed(err);
      }
    };
    read.then((rows) => {
      const batch = rows as Delivered[];
      if (!deletesGuild(batch)) done(batch);
      else loadFormerMembers(deps.db, batch, viewers()).then(() => done(batch), failed);
    }, failed);
    return read;
  }

  /** A bus ring: read the log, unless the rows it names were read already or are being read. */
  function onRing(refs: LoggedEventRef[]) {
    if (following) {
      // An empty ring (the bus reconnected: rings may have been missed) asks for a read regardless.
      if (refs.length) deferred.push(...refs);
      else readAfterFollow = true;
      // A write stalled in front of its follower must not hold other rows back for long.
      deferTimer ??= setTimeout(() => settleDeferred(true), FOLLOW_WAIT_MS);
      return;
    }
    if (refs.length && allSeen(refs)) return;
    void tail();
  }

  function settleDeferred(readAnyway: boolean) {
    if (deferTimer) clearTimeout(deferTimer);
    deferTimer = undefined;
    const refs = deferred;
    deferred = [];
    const asked = readAfterFollow;
    readAfterFollow = false;
    if (readAnyway || asked || !allSeen(refs)) void tail();
  }

  /** Whether every row a ring names was dispatched already. */
  function allSeen(refs: LoggedEventRef[]) {
    return refs.every((r) => seen.has(Number(r.seq)));
  }

  function onSignal<T extends keyof SignalTopics>(topic: T, payload: SignalTopics[T]) {
    if (topic === 'disconnect') {
      for (const fn of disconnectHandlers) fn(payload as SignalTopics['disconnect']);
    } else if (topic === 'typing') {
      const t = payload as SignalTopics['typing'];
      const row: Delivered = {
        xid: '0',
        seq: 0,
        cursor: null,
        type: 'TYPING_STARTED',
        guildId: t.guildId,
        channelId: t.channelId,
        userId: null,
        payload: { userId: t.userId, at: t.at },
      };
      // Typing comes over the bus at once, and a kick or an overwrite committed before it may not
      // have been read here yet (another instance's, its ring lost or still on its way; behind a
      // transaction still open elsewhere): it goes out once every transaction committed before it
      // came has been read, so every subscriber observes such a change first, or not at all. The
      // reads of a burst of typing share one.
      const hidden = new Set(t.hiddenFrom);
      void afterLogRead().then((ok) => {
        if (!ok || stopped) return;
        for (const s of subs) if (s.access.userId !== t.userId && !hidden.has(s.access.userId)) s.push(row);
      });
    } else if (topic === 'presence') {
      const p = payload as SignalTopics['presence'];
      presence.heard(p.userId, p.status);
      if (!presenceBatch) {
        presenceBatch = new Map();
        presenceTimer = setTimeout(flushPresence, PRESENCE_BATCH_MS);
      }
      // The last status of each user, in the order of their last changes.
      presenceBatch.delete(p.userId);
      presenceBatch.set(p.userId, p.status);
    }
  }

  /**
   * Presence changes reach subscribers in batches, at most every PRESENCE_BATCH_MS: when many
   * users come online together (a server restart, a big guild waking up) each socket gets their
   * changes in one write instead of one write per change, and a user's flapping within the window
   * is one change.
   */
  function flushPresence() {
    const batch = presenceBatch;
    presenceBatch = undefined;
    presenceTimer = undefined;
    if (!batch || stopped) return;
    const rows = [...batch].map(([userId, status]) => presenceRow(userId, status));
    // Batches go out in order: the next waits for this one's audience.
    presenceDone = presenceDone.then(async () => {
      const viewers = new Set<string>();
      for (const s of subs) viewers.add(s.access.userId);
      let asked = false;
      try {
        const audience = await presenceAudience(deps.db, [...batch.keys()], [...viewers]);
        for (const r of rows) {
          const may = audience.get(String(r.payload.userId));
          if (may) r.audience = { asked: viewers, may };
        }
        asked = true;
      } catch (err) {
        // Each subscriber then asks for itself (slower, still right).
        deps.log.warn({ err }, 'presence audience failed; deciding per subscriber');
      }
      if (stopped) return;
      // A user who subscribed while the audience was worked out came online after these changes
      // (its client reads presence when it starts): not asking for it per socket keeps a crowd
      // reconnecting from costing a statement per (socket, change).
      for (const s of subs) {
        if (asked && !viewers.has(s.access.userId)) continue;
        for (const r of rows) s.push(r);
      }
    });
  }

  function presenceRow(userId: string, status: string, to?: string): Delivered {
    return {
      xid: '0',
      seq: 0,
      cursor: null,
      type: 'PRESENCE_CHANGED',
      guildId: null,
      channelId: null,
      userId: null,
      payload: to ? { userId, status, to } : { userId, status },
    };
  }

  /**
   * `owner`'s row about `other` is gone, or a block now (a friendship or request ended): a friend
   * who shares nothing else with `other` may no longer see its presence, and its streams showed
   * `other` as it last was for good (queries read OFFLINE). Told OFFLINE, to `owner` only; it is
   * told of the row itself anyway.
   */
  async function presenceAfterEnded(owner: string, other: string) {
    if (![...subs].some((s) => s.access.userId === owner)) return;
    const may = await presenceAudience(deps.db, [other], [owner]).catch(() => undefined);
    if (!may || may.get(other)?.has(owner)) return;
    const row = presenceRow(other, 'OFFLINE', owner);
    for (const s of subs) if (s.access.userId === owner) s.push(row);
  }

  /**
   * A (un)block changes what its target may see of the actor's presence, and nothing else would
   * tell the target's open streams: a block shows the actor OFFLINE to the target (as queries
   * then answer), any other change shows the actor's status again where the target may see it.
   */
  async function presenceAfterBlockChange(r: Delivered) {
    const actor = r.userId;
    const target = r.payload.targetId;
    if (!actor || typeof target !== 'string') return;
    if (r.payload.kind === null || r.payload.kind === 'BLOCKED') await presenceAfterEnded(actor, target);
    let row: Delivered;
    if (r.payload.kind === 'BLOCKED') {
      // Only a target that could see the actor's presence: a stranger would learn of the block.
      if (![...subs].some((s) => s.access.userId === target)) return;
      const shared = await presenceAudience(deps.db, [actor], [target], true).catch(() => undefined);
      if (!shared?.get(actor)?.has(target)) return;
      row = presenceRow(actor, 'OFFLINE', target);
    } else {
      const shown = await presence.shown([actor]).catch(() => undefined);
      row = presenceRow(actor, shown?.get(actor) ?? 'OFFLINE');
    }
    for (const s of subs) if (s.access.userId === target) s.push(row);
  }

  /**
   * The database snapshot for subscribers going live, one statement for all that ask while one
   * is running (a crowd reconnecting): a waiter only joins a statement sent after it asked, so
   * every subscriber's snapshot is taken after it registered, as subscribe() requires.
   */
  let snapshotWaiters: { resolve(s: Snapshot): void; reject(err: unknown): void }[] = [];
  let snapshotRunning = false;
  function sharedSnapshot(): Promise<Snapshot> {
    return new Promise((resolve, reject) => {
      snapshotWaiters.push({ resolve, reject });
      if (!snapshotRunning) void takeSnapshots();
    });
  }
  async function takeSnapshots() {
    snapshotRunning = true;
    while (snapshotWaiters.length) {
      const waiting = snapshotWaiters;
      snapshotWaiters = [];
      try {
        const s = await snapshotNow(deps.db);
        for (const w of waiting) w.resolve(s);
      } catch (err) {
        for (const w of waiting) w.reject(err);
      }
    }
    snapshotRunning = false;
  }

  /**
   * Replays (from, to] to a subscriber registered at `to`, then goes live. Live rows wait in the
   * subscriber meanwhile, up to a bound (every row of the instance comes, unchecked: on a busy
   * instance a long replay passes it). Past the bound it drops them, and once this replay ends it
   * is registered again at the tailer's position P2, as subscribe() registers it: rows up to P2 come
   * from the log, one more replay (to, P2], and rows after it wait again. That replay is shorter
   * (it holds what came during the last one, only the viewer's), so the rounds shrink until one
   * ends with every row after it held: then live. Memory stays bounded however long it takes.
   */
  async function catchUp(sub: Subscription, viewerId: string, from: Position, to: Position) {
    const held: { scope?: HeldScope } = {};
    let total = await replay(sub, viewerId, from, to, held);
    while (!sub.closed && sub.behind) {
      const at = sub.floor;
      // Position and registration move together, synchronously, as in subscribe(): a row the
      // tailer dispatches is either at or before P2 (this replay reads it) or after (held).
      // These rows came after it registered: judged as live rows, as they would have been held.
      total += await replay(sub, viewerId, at, sub.restartAt(pos!), held, true);
    }
    if (sub.closed) return;
    // Synchronous with the check above: no row can be dropped between it and going live.
    obs.replayed?.(total);
    sub.goLive();
  }

  /**
   * Pages of the log for replays, by where they begin: subscribers resuming from the same place
   * (a crowd reconnecting after its instance stopped holds a few cursors at most, all near the
   * head) read it once, and share the row objects, so their executions are shared too
   * (api/realtime/shared-execution.ts) as live rows' are. Each subscriber passes over the rows
   * its viewer's own read would not have held (see replay), and checks the others against its
   * viewer's access (emitReplayed), as it would a row of its own read.
   */
  const sharedPages = new Map<string, Promise<SharedPage>>();

  /**
   * The page of every row after `from`, up to the tailer's position now (rows up to it are
   * final, and it is at or past the `to` of every subscriber registered so far) or REPLAY_PAGE
   * rows. Read on first demand, then kept for SHARED_PAGE_MS: a page holds the messages as they
   * were when it was read, as a live row holds them as they were when the tailer read it (an edit
   * or deletion since is a later row of the log, which follows).
   */
  function sharedPage(from: Position): Promise<SharedPage> {
    const key = `${from.xid}:${from.seq}`;
    const known = sharedPages.get(key);
    if (known) return known;
    const to = pos!;
    const page = (async (): Promise<SharedPage> => {
      const rows = (await readRangeAll(deps.db, from, to, REPLAY_PAGE)) as Delivered[];
      await loadMessages(deps.db, rows);
      // For the viewers here now (the one replaying among them); one resuming later looks itself up
      // (ViewerAccess.lookUpDeletions: one statement for the page).
      await loadFormerMembers(deps.db, rows, viewers());
      // As replay() checks its own reads: after the last of them, so a prune that committed before
      // any is seen (one between the rows' read and their former members' deleted those with the
      // expired rows: a GUILD_DELETED the page holds would reach none of them).
      assertAfterWatermark(from, await prunedThrough(deps.db));
      for (const r of rows) {
        r.cursor = encodeCursor(r);
        // None recorded: nobody is known to have been in (a viewer's own read would say so).
        if (r.type === 'GUILD_DELETED') r.formerMembers ??= new Set();
      }
      return { rows, through: rows.length < REPLAY_PAGE ? to : rows[rows.length - 1] };
    })();
    sharedPages.set(key, page);
    if (sharedPages.size > MAX_SHARED_PAGES) sharedPages.delete(sharedPages.keys().next().value!);
    const forget = () => {
      if (sharedPages.get(key) === page) sharedPages.delete(key);
    };
    page.then(
      () => setTimeout(forget, SHARED_PAGE_MS).unref(),
      // A failed read is nobody's to reuse (those waiting on it fail with it, and resume).
      forget,
    );
    return page;
  }

  /**
   * The scopes of viewers filtering shared pages (mayConcern): one statement for every viewer
   * asking while one is out, each joining only a statement sent after it asked.
   */
  const loadScopes = batched((ids: string[]) => loadViewerScopes(deps.db, ids));
  const noScope: ViewerScope = { guilds: new Set(), channels: new Set() };
  async function scopeNow(viewerId: string): Promise<HeldScope> {
    // Taken before asking: every row up to it was final before the statement was sent, so the
    // statement sees every membership its rows' transactions made (a join and its guild's rows).
    const asOf = pos!;
    return { scope: (await loadScopes(viewerId)) ?? noScope, asOf };
  }

  /**
   * Replays (from, to]: how many rows were its viewer's. `live`: judge them as live rows
   * (catchUp). A shared page holds every row: those readRange's prefilter would not have read for
   * this viewer are passed over (mayConcern) with a scope read after them, as readRange reads the
   * viewer's guilds and DMs in the rows' own snapshot: a scope is used only for rows up to the
   * position it was asked at, and read again for a row past it (a page read since: a guild the
   * viewer joined meanwhile is in it). `held`: the scope, kept across the pages and rounds of
   * one catchUp.
   */
  async function replay(
    sub: Subscription,
    viewerId: string,
    from: Position,
    to: Position,
    held: { scope?: HeldScope },
    live = false,
  ) {
    let at = from;
    let total = 0;
    while (comparePos(at, to) < 0) {
      let page: Delivered[];
      let next: Position;
      let shared = false;
      if (to.seq - at.seq <= SHARED_REPLAY_ROWS) {
        const read = await sharedPage(at);
        page = read.rows;
        next = read.through;
        shared = true;
        await sub.access.lookUpDeletions(page);
      } else {
        page = (await readRange(deps.db, viewerId, at, to, REPLAY_PAGE)) as Delivered[];
        // The prune may have run since the cursor was checked (a slow reader's replay pauses for
        // it): rows of this page could be missing, and a replay with a hole in it is worse than
        // none. Checked after the read, so a prune that committed before it is seen.
        assertAfterWatermark(at, await prunedThrough(deps.db));
        await loadMessages(deps.db, page);
        for (const r of page) r.cursor = encodeCursor(r);
        next = page.length < REPLAY_PAGE ? to : page[page.length - 1];
      }
      for (const r of page) {
        // A shared page may go past this subscriber's range: rows after `to` come live.
        if (comparePos(r, to) > 0) return total;
        if (sub.closed) return total;
        if (shared) {
          if (!held.scope || comparePos(r, held.scope.asOf) > 0) held.scope = await scopeNow(viewerId);
          if (!mayConcern(r, viewerId, held.scope.scope)) continue;
        }
        total++;
        await sub.emitReplayed(r, live);
      }
      at = next;
    }
    return total;
  }

  const hub = {
    /** Loads the starting position and begins tailing. Idempotent. */
    start(): Promise<void> {
      // Its timers and listeners in the hub's context, whoever starts it.
      ready ??= scope.runInAsyncScope(async () => {
        const foreign = await discardRowsFromAnotherCluster(deps.db);
        if (foreign) {
          deps.log.warn(
            { rows: foreign },
            'event log rows from another cluster (a restore?) deleted; cursors from before are refused',
          );
        }
        pos = await headPosition(deps.db);
        // Rows up to the watermark now were gone before anyone subscribed here (read after the
        // head: a row deleted before that read was no row of this tailer's).
        lostThrough = await prunedThrough(deps.db);
        unsubs.push(deps.bus.onAnnounce(inHub(onRing)));
        if (database) unsubs.push(followCommits(database, inHub(follow)));
        unsubs.push(deps.bus.onSignal(inHub(onSignal)));
        poll = setInterval(() => void tail('poll'), pollMs);
        poll.unref();
        const runPrune = () =>
          pruneEventsReporting(deps.db, deps.settings.eventRetentionDays).then(
            (status) => {
              pruneStatus = status;
              if (status.heldBackSeconds > PRUNE_HELD_BACK_WARN_SECONDS) {
                deps.log.warn(
                  {
                    heldBackSeconds: Math.round(status.heldBackSeconds),
                    oldestRowAgeSeconds: Math.round(status.oldestAgeSeconds),
                    retentionDays: deps.settings.eventRetentionDays,
                    holder: status.holder ?? null,
                  },
                  'event log prune held back: a transaction of this database open longer than the retention (holder: its pid, application_name, state and age; null if it ended since or cannot be seen) keeps every row written since it began, and the log grows until it ends',
                );
              }
            },
            (err) => deps.log.warn({ err }, 'event log prune failed'),
          );
        prune = setInterval(runPrune, opts.pruneMs ?? 3_600_000);
        prune.unref();
        void runPrune();
      });
      return ready;
    },

    /**
     * The viewer's stream. Throws BAD_USER_INPUT for a malformed cursor and CURSOR_EXPIRED for
     * one past retention, before anything is registered.
     */
    async subscribe(
      viewer: { userId: string },
      after: string | null | undefined,
      o: SubscribeOptions = {},
    ): Promise<AsyncIterableIterator<Delivered>> {
      // Only a missing (or null) `after` means live: an empty one is a malformed cursor, refused,
      // not a silent start from now (a client whose stored cursor came back empty would miss what
      // happened while it was away).
      const from = after == null ? undefined : decodeCursor(after, o.cursorFrom);
      if (from) await assertResumable(deps.db, from, sharedBounds(0) as Promise<ResumeBounds>);
      await hub.start();
      const p = pos!;
      const sub = new Subscription(
        maxPending,
        new ViewerAccess(deps.db, viewer.userId, () => pos),
        from ? maxPos(from, p) : p,
        (s, failure) => {
          if (subs.delete(s)) obs.subscriptions?.(-1);
          obs.delivered?.(s.delivered);
          if (failure instanceof EventFailedError && failure.cause) {
            deps.log.warn(
              { err: failure.cause, cursor: failure.cursor },
              'an event could not be checked: its subscriber resumes',
            );
          }
          if (failure) o.onFail?.(failure);
        },
        !!from,
        skipsUnchecked,
      );
      subs.add(sub);
      obs.subscriptions?.(1);
      if (from) {
        catchUp(sub, viewer.userId, from, p).catch((err) => {
          // A row whose check failed is logged as the subscriber closes (with its cursor).
          if (!(err instanceof EventFailedError)) deps.log.warn({ err }, 'event replay failed');
          // CURSOR_EXPIRED is the client's to hear; a failure of the server's (the database away)
          // cuts it off to resume again from its cursor, as a live event that failed does.
          sub.fail(
            err instanceof BanterError || err instanceof EventFailedError ? err : new EventFailedError(null),
          );
        });
      } else {
        // Live means from now, exactly: registered first (so no row tailed from here on is missed),
        // then the snapshot says which of the rows that arrive were committed before this moment.
        try {
          sub.startAfter(await sharedSnapshot());
        } catch (err) {
          await sub.return();
          throw err;
        }
        sub.goLive();
      }
      return sub;
    },

    /** Close handlers for sockets of a user, on every instance (the signal goes over the bus). */
    onDisconnect(fn: (s: SignalTopics['disconnect']) => void) {
      disconnectHandlers.add(fn);
      return () => disconnectHandlers.delete(fn);
    },

    /** Changes limits at run time (tests, operators). */
    configure(o: { maxPending?: number }) {
      if (o.maxPending) maxPending = o.maxPending;
    },

    /** Sets the metrics hooks. */
    observe(o: HubObserver) {
      obs = o;
    },

    presence,

    typing: opts.typingThrottle ?? createMemoryThrottle(),

    /**
     * Reads the log now, as a poll does (tests use it): with the exact horizon, so a transaction
     * open in another database on the server (another test suite beside this one) does not hold
     * the read back.
     */
    poke: inHub(() => tail('poll')),

    get subscriberCount() {
      return subs.size;
    },

    /** What this instance's last prune left (PruneStatus); undefined before its first. */
    get pruneStatus(): PruneStatus | undefined {
      return pruneStatus;
    },

    /**
     * The user's subscribers that are live: any row that commits from now on reaches them (a
     * subscriber counted in subscriberCount may still be taking its snapshot or replaying). The
     * protocols do not acknowledge a subscription; tests wait on this before writing what it must get.
     */
    liveCount(userId: string) {
      let n = 0;
      for (const s of subs) if (s.isLive && s.access.userId === userId) n++;
      return n;
    },

    async stop() {
      stopped = true;
      abandonWaiters();
      if (presenceTimer) clearTimeout(presenceTimer);
      if (deferTimer) clearTimeout(deferTimer);
      presence.stop();
      if (poll) clearInterval(poll);
      if (prune) clearInterval(prune);
      for (const u of unsubs) u();
      for (const s of [...subs]) await s.return();
      sharedPages.clear();
      while (busy || following) await new Promise((r) => setTimeout(r, 10));
    },
  };
  return hub;
}

export type Hub = ReturnType<typeof createHub>;
