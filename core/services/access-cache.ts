/**
 * A per-process, very short-lived cache of the channel-access statement's raw inputs for the send
 * path. Permissions are recomputed from the inputs on every use (timeouts depend on the clock).
 *
 * Staleness is bounded three ways: entries live ACCESS_CACHE_MS at most; this process drops every
 * entry synchronously when it commits an access-affecting event (announce() in core/events.ts);
 * other processes drop theirs when their realtime tailer reads such a row. A load that started
 * before an invalidation is not stored (generation check), so a slow read cannot resurrect
 * pre-change inputs.
 */
import type { Database } from '../db/client.ts';

/** Upper bound on how long another instance's permission change can go unseen by a send here. */
export const ACCESS_CACHE_MS = 1000;
const MAX_ENTRIES = 50_000;

/**
 * Event types that cannot change anyone's access to a channel. Every other type clears the cache:
 * new types are access-affecting until someone decides otherwise.
 */
const ACCESS_NEUTRAL = new Set([
  'MESSAGE_CREATED',
  'MESSAGE_UPDATED',
  'MESSAGE_DELETED',
  'REACTION_ADDED',
  'REACTION_REMOVED',
  'MESSAGE_PINNED',
  'MESSAGE_UNPINNED',
  'READ_STATE_UPDATED',
]);

interface Entry<T> {
  value: T;
  at: number;
}

export class AccessCache<T> {
  private entries = new Map<string, Entry<T>>();
  private generation = 0;

  /** The value under `key` if it is younger than ACCESS_CACHE_MS. */
  peek(key: string, t = Date.now()): T | undefined {
    const hit = this.entries.get(key);
    return hit && t - hit.at < ACCESS_CACHE_MS ? hit.value : undefined;
  }

  /** Taken before a load; pass it to put() so that a load overtaken by an invalidation is dropped. */
  mark(): number {
    return this.generation;
  }

  /** Stores a value loaded at `at` (ms), unless something was invalidated since `mark`. */
  put(key: string, value: T, mark: number, at: number): void {
    if (mark !== this.generation) return;
    if (this.entries.size >= MAX_ENTRIES) this.entries.clear();
    this.entries.set(key, { value, at });
  }

  clear(): void {
    this.generation++;
    this.entries.clear();
  }

  /** Clears when any of `types` may change access. */
  observe(types: Iterable<string>): void {
    for (const type of types) {
      if (!ACCESS_NEUTRAL.has(type)) {
        this.clear();
        return;
      }
    }
  }
}

const caches = new WeakMap<Database, AccessCache<unknown>>();

/** The cache of one database handle (apps in one process, as in tests, keep separate caches). */
export function accessCacheOf<T>(database: Database): AccessCache<T> {
  let c = caches.get(database);
  if (!c) {
    c = new AccessCache<unknown>();
    caches.set(database, c);
  }
  return c as AccessCache<T>;
}

/** Event rows committed (here or, via the tailer, elsewhere): drop access that may have changed. */
export function observeEvents(database: Database | undefined, rows: readonly { type: string }[]): void {
  if (!database || !rows.length) return;
  const c = caches.get(database);
  if (c) c.observe(rows.map((r) => r.type));
}
