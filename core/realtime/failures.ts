/**
 * A failure that keeps coming back for the same logged event is no hiccup. An event that cannot be
 * delivered for a reason of the server's closes its subscribers to resume from before it (1013 on
 * a socket, a resume item over SSE); if it fails the same way every time, every resume meets it
 * again and is closed again, forever. Once it has failed in REPEATS rounds (a second or more
 * apart, however many subscribers fail at once in each) it fails for good, and its stream goes on
 * past it: an execution goes out with its error (api/realtime/shared-execution.ts), a check is
 * skipped (hub.ts). Kept per process, for the last FAILURES_KEPT events that failed.
 */
import { databaseErrorOf } from '../db/client.ts';

export const REPEATS = 3;
export const ROUND_MS = 1_000;
const FAILURES_KEPT = 1_000;

/** Counts the failures of events by cursor: one counter per kind of failure (execution, check). */
export class RepeatedFailures {
  private failures = new Map<string, { rounds: number; last: number }>();

  /** Counts a failure of the event at `cursor`; true once it has failed in REPEATS rounds. */
  failsForGood(cursor: string, now = Date.now()): boolean {
    const f = this.failures.get(cursor) ?? { rounds: 0, last: 0 };
    if (now - f.last >= ROUND_MS) {
      f.rounds++;
      f.last = now;
    }
    this.failures.delete(cursor);
    this.failures.set(cursor, f);
    if (this.failures.size > FAILURES_KEPT) this.failures.delete(this.failures.keys().next().value!);
    return f.rounds >= REPEATS;
  }

  /** Whether the event at `cursor` has failed for good already (nothing counted). */
  failedForGood(cursor: string): boolean {
    return (this.failures.get(cursor)?.rounds ?? 0) >= REPEATS;
  }
}

/**
 * SQLSTATE classes of failures that pass, whatever the statement was about: connection (08),
 * transaction rollback (40: serialization, deadlock), resources (53), object not in prerequisite
 * state (55: lock_timeout's 55P03), operator intervention (57: a statement_timeout or a cancel,
 * 57014; shutdown), system (58).
 */
const PASSING = new Set(['08', '40', '53', '55', '57', '58']);
/**
 * Whether a check's failure is its own: the statement failed on what it read (a SQLSTATE of
 * another class, such as 21000 for a guild with two rows) or the code on what came back (a
 * TypeError; a SyntaxError of BigInt or JSON.parse on a malformed value). Not a failure that
 * passes (PASSING), nor one without a SQLSTATE, from the driver, the pool or the socket (a
 * connection lost, EPIPE, the wait for a connection timed out): the database can answer the
 * control an instant later and fail this row's check again in the next round for the same
 * passing reason, and counting those skipped a row that a subscriber may see.
 */
export function isOwnFailure(err: unknown): boolean {
  const db = databaseErrorOf(err);
  if (db) return !PASSING.has(db.code.slice(0, 2));
  return (
    err instanceof TypeError ||
    err instanceof RangeError ||
    err instanceof ReferenceError ||
    err instanceof SyntaxError
  );
}
