/**
 * The bus is a doorbell, not the truth: after a transaction that wrote event-log rows commits,
 * the service rings it so subscribers read the log. Implementations: in-process (default) and
 * Redis pub/sub (when REDIS_URL is set).
 */
export interface LoggedEventRef {
  seq: number;
  type: string;
  guildId: string | null;
  channelId: string | null;
  userId: string | null;
}

export interface Bus {
  /** Announce committed event-log rows. Never throws: a missed ring is caught up from the log. */
  announce(events: LoggedEventRef[]): Promise<void>;
  /** Ephemeral signals (typing, presence): not logged, never replayed. */
  signal(topic: string, payload: unknown): Promise<void>;
  close(): Promise<void>;
}

/** Until realtime delivery is wired, the bus only counts what it was told. */
export function createNullBus(): Bus & { announced: number } {
  return {
    announced: 0,
    async announce(events) {
      this.announced += events.length;
    },
    async signal() {},
    async close() {},
  };
}
