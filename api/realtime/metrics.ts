import { Counter, Gauge, Histogram, type Registry } from 'prom-client';
import { CloseCode } from '../../core/realtime/disconnect.ts';
import { ProtocolClose } from './protocol.ts';

/** Close codes counted under a label of their own: the standard ones and those the server sends. */
const OWN_CLOSE_CODES = new Set<number>([...Object.values(CloseCode), ...Object.values(ProtocolClose)]);

/**
 * Codes of a close the client began counted under their own label: it went normally (1000) or
 * away (1001, a page left), it gave no code (1005), or the connection was lost (1006).
 */
const CLIENT_CLOSE_CODES = new Set([1000, 1001, 1005, 1006]);

/**
 * The `code` label of a close: 0 (none given); of a close the server began, its code (a standard
 * one, 1000-1015, or one of the codes it sends); of one its client began, 1000, 1001, 1005 or
 * 1006. Any other is `other`: a code the client chose (3000-4999), as a series of its own each was
 * kept, and scraped, for the life of the process; and a client's close with one of the server's
 * codes (4401, 4403, 4029, 1013...), which was counted as if the server had closed the socket so.
 */
export function closeLabel(code: number | undefined, byClient = false): string {
  if (!code) return '0';
  if (byClient) return CLIENT_CLOSE_CODES.has(code) ? String(code) : 'other';
  if ((code >= 1000 && code <= 1015) || OWN_CLOSE_CODES.has(code)) return String(code);
  return 'other';
}

/** Realtime metrics, on the app's registry. */
export function createRealtimeMetrics(
  registry: Registry,
  counts: {
    sockets(): number;
    subscriptions(): number;
    /** events sent so far, by whether the execution result was shared */
    delivered(): { shared: number; own: number };
    /** SSE streams: open now, and ended so far by why */
    sse?: { open(): number; ends: Record<string, number> };
    /** what this instance's last prune of the event log left (undefined before its first) */
    prune?(): { oldestAgeSeconds: number; heldBackSeconds: number } | undefined;
  },
) {
  const prune = counts.prune;
  if (prune) {
    new Gauge({
      name: 'banter_event_log_oldest_row_age_seconds',
      help: "Age of the event log's oldest row after this instance's last prune (hourly), by the database's clock; past the retention when a transaction holds the prune back",
      registers: [registry],
      collect() {
        const s = prune();
        if (s) this.set(s.oldestAgeSeconds);
      },
    });
    new Gauge({
      name: 'banter_event_log_prune_held_back_seconds',
      help: "How far past the retention the event log's oldest row was after this instance's last prune: a transaction of the database open since before it was written holds the prune back (0: not held)",
      registers: [registry],
      collect() {
        const s = prune();
        if (s) this.set(s.heldBackSeconds);
      },
    });
  }
  const sse = counts.sse;
  if (sse) {
    new Gauge({
      name: 'banter_sse_open_streams',
      help: 'Open events subscriptions over SSE (signed in)',
      registers: [registry],
      collect() {
        this.set(sse.open());
      },
    });
    const seenEnds: Record<string, number> = {};
    new Counter({
      name: 'banter_sse_ends_total',
      help: 'SSE events streams ended, by why: closed (by the client, or the server stopping), unauthenticated, slow_consumer, event_failed, completed, error',
      labelNames: ['reason'] as const,
      registers: [registry],
      collect() {
        for (const [reason, n] of Object.entries(sse.ends)) {
          this.inc({ reason }, n - (seenEnds[reason] ?? 0));
          seenEnds[reason] = n;
        }
      },
    });
  }
  new Gauge({
    name: 'banter_ws_open_sockets',
    help: 'Open GraphQL WebSocket connections',
    registers: [registry],
    collect() {
      this.set(counts.sockets());
    },
  });
  new Gauge({
    name: 'banter_ws_active_subscriptions',
    help: 'Active events subscriptions on this process',
    registers: [registry],
    collect() {
      this.set(counts.subscriptions());
    },
  });
  const seen = { shared: 0, own: 0 };
  new Counter({
    name: 'banter_events_delivered_total',
    help: 'Events sent to subscribers, by whether the execution result was shared',
    labelNames: ['shared'] as const,
    registers: [registry],
    collect() {
      const now = counts.delivered();
      this.inc({ shared: 'true' }, now.shared - seen.shared);
      this.inc({ shared: 'false' }, now.own - seen.own);
      seen.shared = now.shared;
      seen.own = now.own;
    },
  });
  const replay = new Histogram({
    name: 'banter_events_replay_rows',
    help: 'Log rows read per events(after) replay',
    buckets: [0, 1, 10, 100, 1000, 10_000, 100_000],
    registers: [registry],
  });
  const closes = new Counter({
    name: 'banter_ws_closes_total',
    help: "WebSocket closes by code: the server's own, a client's 1000, 1001, 1005 or 1006 (lost), any other client's close as other",
    labelNames: ['code'] as const,
    registers: [registry],
  });
  const reads = new Counter({
    name: 'banter_log_reads_total',
    help: 'Event log reads by the realtime tailer: behind a write on its connection (follow), for a bus ring, or the poll',
    labelNames: ['via'] as const,
    registers: [registry],
  });
  const fromWrites = new Counter({
    name: 'banter_log_writes_dispatched_total',
    help: 'Writes whose own event rows went to subscribers from the write result, with no log read',
    registers: [registry],
  });
  return { replay, closes, reads, fromWrites };
}
export type RealtimeMetrics = ReturnType<typeof createRealtimeMetrics>;
