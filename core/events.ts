import type { Tx } from './db/client.ts';
import { events } from './db/tables.ts';
import type { Deps } from './deps.ts';
import type { LoggedEventRef } from './ports/bus.ts';
import { observeEvents } from './services/access-cache.ts';

/** Every durable event type written to the event log. */
export type EventType =
  | 'MESSAGE_CREATED'
  | 'MESSAGE_UPDATED'
  | 'MESSAGE_DELETED'
  | 'REACTION_ADDED'
  | 'REACTION_REMOVED'
  | 'MESSAGE_PINNED'
  | 'MESSAGE_UNPINNED'
  | 'CHANNEL_CREATED'
  | 'CHANNEL_UPDATED'
  | 'CHANNEL_DELETED'
  | 'GUILD_UPDATED'
  | 'GUILD_DELETED'
  | 'MEMBER_JOINED'
  | 'MEMBER_LEFT'
  | 'MEMBER_UPDATED'
  | 'MEMBER_KICKED'
  | 'MEMBER_BANNED'
  | 'ROLE_CREATED'
  | 'ROLE_UPDATED'
  | 'ROLE_DELETED'
  | 'PERMISSIONS_CHANGED'
  | 'READ_STATE_UPDATED'
  | 'DIRECT_CHANNEL_CREATED'
  | 'RELATIONSHIP_UPDATED';

export interface NewEvent {
  type: EventType;
  guildId?: string | null;
  channelId?: string | null;
  /** set for events only this user may see */
  userId?: string | null;
  payload: Record<string, unknown>;
}

export interface EventWriter {
  /** Appends a row to the event log inside the current transaction. */
  append(e: NewEvent): Promise<void>;
  /**
   * Appends rows in one statement, in this order. For many rows (a ban's purge): one statement
   * per row kept the transaction, and with it every realtime stream (log.ts, Horizon), open for
   * a round trip per row (10k rows: ~10 s).
   */
  appendMany(es: readonly NewEvent[]): Promise<void>;
}

/** Rows per insert in appendMany: 5 parameters each, and a statement carries at most 65,535. */
const APPEND_CHUNK = 1_000;

/**
 * Runs `fn` in one transaction with an event writer; after commit, rings the bus for the rows
 * written. Nothing is announced for a transaction that rolls back.
 */
export async function transact<T>(deps: Deps, fn: (tx: Tx, log: EventWriter) => Promise<T>): Promise<T> {
  const written: LoggedEventRef[] = [];
  const result = await deps.db.transaction(async (tx) => {
    const appendMany = async (all: readonly NewEvent[]) => {
      for (let i = 0; i < all.length; i += APPEND_CHUNK) await appendChunk(all.slice(i, i + APPEND_CHUNK));
    };
    const appendChunk = async (es: readonly NewEvent[]) => {
      const rows = await tx
        .insert(events)
        .values(
          es.map((e) => ({
            type: e.type,
            guildId: e.guildId ?? null,
            channelId: e.channelId ?? null,
            userId: e.userId ?? null,
            payload: e.payload,
          })),
        )
        .returning({
          seq: events.seq,
          type: events.type,
          guildId: events.guildId,
          channelId: events.channelId,
          userId: events.userId,
        });
      written.push(...rows);
    };
    const log: EventWriter = { append: (e) => appendMany([e]), appendMany };
    return fn(tx, log);
  });
  await announce(deps, written);
  return result;
}

/**
 * Rings the bus for committed event-log rows. Used by transact() and by the few hot paths that
 * write their change and its event in one statement (atomic on its own, no BEGIN/COMMIT).
 */
export async function announce(deps: Deps, refs: LoggedEventRef[]): Promise<void> {
  if (!refs.length) return;
  // Before anything else can run: a request this process serves after the commit sees the change.
  observeEvents(deps.database, refs);
  try {
    await deps.bus.announce(refs);
  } catch (err) {
    deps.log.warn({ err }, 'bus announce failed; subscribers will catch up from the log');
  }
}
