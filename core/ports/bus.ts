/**
 * The bus is a doorbell, not the truth: after a transaction that wrote event-log rows commits,
 * the service rings it so subscribers read the log. Implementations: in-process (default) and
 * Redis pub/sub (when REDIS_URL is set). A ring that is lost (Redis restart) costs latency only:
 * every tailer also polls the log.
 */
import { randomUUID } from 'node:crypto';
import type { Redis } from 'ioredis';

export interface LoggedEventRef {
  seq: number;
  type: string;
  guildId: string | null;
  channelId: string | null;
  userId: string | null;
}

/** Ephemeral signals, one typed map for publish and subscribe. */
export interface SignalTopics {
  /** close the sockets of a user (all, or one session's) on every instance */
  disconnect: { userId: string; sessionId?: string; code: number; reason: string };
  typing: {
    channelId: string;
    guildId: string | null;
    userId: string;
    at: number;
    /** who is not shown it: whom the typist blocked and who blocked it (missing: nobody) */
    hiddenFrom?: string[];
  };
  presence: { userId: string; status: string };
}
export type SignalTopic = keyof SignalTopics;
export type SignalHandler = <T extends SignalTopic>(topic: T, payload: SignalTopics[T]) => void;

export interface Bus {
  kind: 'memory' | 'redis';
  /** Announce committed event-log rows. Never throws: a missed ring is caught up from the log. */
  announce(events: LoggedEventRef[]): Promise<void>;
  /** Ephemeral signals (typing, presence, disconnects): not logged, never replayed. */
  signal<T extends SignalTopic>(topic: T, payload: SignalTopics[T]): Promise<void>;
  /** Called for every announce, local or from another instance; also (with []) after a reconnect. */
  onAnnounce(fn: (events: LoggedEventRef[]) => void): () => void;
  onSignal(fn: SignalHandler): () => void;
  close(): Promise<void>;
}

function listeners() {
  const announce = new Set<(e: LoggedEventRef[]) => void>();
  const signal = new Set<SignalHandler>();
  const safe = (fn: () => void) => {
    try {
      fn();
    } catch {
      // A listener's failure must not stop the others; listeners log their own errors.
    }
  };
  return {
    announce,
    signal,
    fireAnnounce(e: LoggedEventRef[]) {
      for (const fn of announce) safe(() => fn(e));
    },
    fireSignal(topic: SignalTopic, payload: unknown) {
      for (const fn of signal) safe(() => fn(topic, payload as never));
    },
  };
}

/** One process: delivery is a function call. */
export function createMemoryBus(): Bus {
  const l = listeners();
  return {
    kind: 'memory',
    async announce(events) {
      queueMicrotask(() => l.fireAnnounce(events));
    },
    async signal(topic, payload) {
      queueMicrotask(() => l.fireSignal(topic, payload));
    },
    onAnnounce(fn) {
      l.announce.add(fn);
      return () => l.announce.delete(fn);
    },
    onSignal(fn) {
      l.signal.add(fn);
      return () => l.signal.delete(fn);
    },
    async close() {
      l.announce.clear();
      l.signal.clear();
    },
  };
}

/** How often the bus's subscriber connection is checked (see createRedisBus). */
const HEARTBEAT_MS = 2_000;

/**
 * Redis pub/sub: `publisher` is shared with the rest of the app; `subscriber` is a dedicated
 * connection (a subscribed connection cannot issue other commands). Channels carry `prefix`.
 *
 * This instance's own listeners hear its rings at once, as on the in-process bus, not after the
 * round trip through Redis (a hop between a commit and its delivery here): each message carries
 * the instance's id (`o`), and its echo is skipped. Messages without one (an older instance's
 * bare array of events) are heard as before.
 */
export function createRedisBus(publisher: Redis, subscriber: Redis, prefix: string): Bus {
  const l = listeners();
  // A subscribed connection only listens: one whose peer went silent without a reset (a network
  // partition, a frozen VM, a failover that left it open) looks like a quiet one, and this instance
  // would miss every other instance's rings and signals (typing, presence, disconnects) until TCP
  // gave up, which it never does on a connection that writes nothing. A PING now and then gives the
  // client's socketTimeout (set by the caller) something to wait on: unanswered, the connection is
  // replaced, and its 'ready' asks for a log read below. One at a time, so none pile up.
  let pinging = false;
  const heartbeat = setInterval(() => {
    if (pinging || subscriber.status !== 'ready') return;
    pinging = true;
    subscriber
      .ping()
      .catch(() => {})
      .finally(() => {
        pinging = false;
      });
  }, HEARTBEAT_MS);
  heartbeat.unref();
  const chEvents = `${prefix}bus:events`;
  const chSignal = `${prefix}bus:signal`;
  const origin = randomUUID();
  // Errors surface as reconnects; the poll covers the gap, so they are not fatal here.
  subscriber.on('error', () => {});
  subscriber.on('message', (channel: string, message: string) => {
    try {
      if (channel === chEvents) {
        const m = JSON.parse(message) as LoggedEventRef[] | { o: string; e: LoggedEventRef[] };
        if (Array.isArray(m)) l.fireAnnounce(m);
        else if (m.o !== origin) l.fireAnnounce(m.e);
      } else if (channel === chSignal) {
        const m = JSON.parse(message) as { t: SignalTopic; p: unknown; o?: string };
        if (m.o !== origin) l.fireSignal(m.t, m.p);
      }
    } catch {
      // A malformed message is dropped; the log poll covers events.
    }
  });
  // After a reconnect, rings sent while we were away are lost: ask listeners to read the log now.
  subscriber.on('ready', () => l.fireAnnounce([]));
  const subscribed = subscriber.subscribe(chEvents, chSignal).catch(() => {});
  return {
    kind: 'redis',
    // Not awaited: a request never waits on Redis (down, it would wait out the client's
    // retries). Other instances that miss a ring catch up by polling; a lost signal is lost.
    async announce(events) {
      queueMicrotask(() => l.fireAnnounce(events));
      publisher.publish(chEvents, JSON.stringify({ o: origin, e: events })).catch(() => {});
    },
    async signal(topic, payload) {
      queueMicrotask(() => l.fireSignal(topic, payload));
      publisher.publish(chSignal, JSON.stringify({ t: topic, p: payload, o: origin })).catch(() => {});
    },
    onAnnounce(fn) {
      l.announce.add(fn);
      return () => l.announce.delete(fn);
    },
    onSignal(fn) {
      l.signal.add(fn);
      return () => l.signal.delete(fn);
    },
    async close() {
      clearInterval(heartbeat);
      await subscribed;
      l.announce.clear();
      l.signal.clear();
      await subscriber.quit().catch(() => subscriber.disconnect());
    },
  };
}

/** Kept for tests of services that do not care about delivery. */
export function createNullBus(): Bus & { announced: number } {
  const bus = createMemoryBus();
  return Object.assign(bus, {
    announced: 0,
    async announce(this: { announced: number }, events: LoggedEventRef[]) {
      this.announced += events.length;
    },
  });
}
