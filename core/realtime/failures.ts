/**
 * A failure that keeps coming back for the same logged event is no hiccup. An event that cannot be
 * delivered for a reason of the server's closes its subscribers to resume from before it (1013 on
 * a socket, a resume item over SSE); if it fails the same way every time, every resume meets it
 * again and is closed again, forever. Once it has failed in REPEATS rounds (a second or more
 * apart, however many subscribers fail at once in each) it fails for good, and its stream goes on
 * past it: an execution goes out with its error (api/realtime/shared-execution.ts), a check is
 * skipped (hub.ts). Kept per process, for the last FAILURES_KEPT events that failed.
 */
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
