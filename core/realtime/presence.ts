/**
 * Presence: a user is online while any of its sockets is open (on any instance), offline a
 * short grace after the last one closes. The chosen status (ONLINE, IDLE, DND, INVISIBLE)
 * applies to all of the user's devices; INVISIBLE is shown to others as OFFLINE. In Redis when
 * configured (one hash per user, entries with deadlines refreshed by each instance), so every
 * instance agrees; in process otherwise.
 */
import type { Redis } from 'ioredis';
import type { Bus } from '../ports/bus.ts';

export type PresenceChoice = 'ONLINE' | 'IDLE' | 'DND' | 'INVISIBLE';
export type PresenceShown = 'ONLINE' | 'IDLE' | 'DND' | 'OFFLINE';

/**
 * A connection entry lives this long unless refreshed (an instance that dies drops out): the
 * default of createRedisPresence's `connectionTtlMs` (Config.presenceConnectionTtlMs).
 */
export const CONNECTION_TTL_MS = 60_000;
/** Offline only after the last socket has been closed this long (a reconnect is not a flap). */
export const OFFLINE_GRACE_MS = 5_000;
/**
 * How long after the store is back its changes are told: other instances' bus subscribers
 * reconnect too (ioredis waits up to 2 s between attempts), and a signal sent before they are
 * back is lost.
 */
export const RECONNECT_SETTLE_MS = 3_000;

export interface PresenceStore {
  /** How long a connection entry lives unless refreshed; the tracker refreshes at a third of it. */
  readonly connectionTtlMs: number;
  /**
   * Marks connections alive until now + connectionTtlMs; with `choice`, sets the user's chosen
   * status first, in the same write (a Redis that answers late applies both, in that order).
   */
  touch(userId: string, connIds: string[], choice?: PresenceChoice): Promise<void>;
  drop(userId: string, connId: string): Promise<void>;
  choose(userId: string, choice: PresenceChoice): Promise<void>;
  /** What others see. */
  shown(userIds: string[]): Promise<Map<string, PresenceShown>>;
  /**
   * Users whose connection entries all ran out without being dropped (the instance that held
   * their sockets died: killed, frozen, cut off), those entries removed; each user is handed to
   * one caller only. Missing for a store in process: its process is every instance.
   */
  lapsed?(): Promise<string[]>;
  /**
   * Calls `fn` whenever the store is back after being unreachable (it may have lost its entries,
   * and writes made meanwhile failed). Returns a function that stops it.
   */
  onReconnect?(fn: () => void): () => void;
}

function show(choice: PresenceChoice | undefined, live: boolean): PresenceShown {
  if (!live) return 'OFFLINE';
  const c = choice ?? 'ONLINE';
  return c === 'INVISIBLE' ? 'OFFLINE' : c;
}

export function createMemoryPresence(): PresenceStore {
  const conns = new Map<string, Map<string, number>>();
  const choices = new Map<string, PresenceChoice>();
  return {
    connectionTtlMs: CONNECTION_TTL_MS,
    async touch(userId, connIds, choice) {
      if (choice) choices.set(userId, choice);
      let m = conns.get(userId);
      if (!m) {
        m = new Map();
        conns.set(userId, m);
      }
      for (const c of connIds) m.set(c, Date.now() + CONNECTION_TTL_MS);
    },
    async drop(userId, connId) {
      const m = conns.get(userId);
      m?.delete(connId);
      if (m && !m.size) conns.delete(userId);
    },
    async choose(userId, choice) {
      choices.set(userId, choice);
    },
    async shown(userIds) {
      const now = Date.now();
      return new Map(
        userIds.map((u) => [
          u,
          show(
            choices.get(u),
            [...(conns.get(u)?.values() ?? [])].some((t) => t > now),
          ),
        ]),
      );
    },
  };
}

/** Most users whose last shown status a tracker keeps for when its store is unreachable. */
const KNOWN_MAX = 100_000;

/** How long Redis keeps its copy of a chosen status (written again at every connection). */
const CHOICE_TTL_S = 30 * 86_400;

/** Users looked at per round of lapsed(), and rounds per call (the rest wait for the next). */
const LAPSED_BATCH = 1000;
const LAPSED_ROUNDS = 10;

/**
 * lapsed()'s claim, in one step: of the users given (ARGV[2..], their hashes KEYS[2..]), those
 * still due (KEYS[1]'s score at or before ARGV[1]) leave the set, or are put back under their
 * latest live entry's deadline (a write that reached Redis after a later one); those whose
 * entries all ran out (or do not read as a deadline) lose them and are returned. Apart, a user
 * written again between the read of the due ones and a ZREM (a reconnect, a refresh) left the set
 * with its new deadline, never to be found if its instance died before its next refresh; and a
 * claimed user whose read or drop failed was lost.
 */
const CLAIM_LAPSED = `local now = tonumber(ARGV[1])
local out = {}
for i = 2, #ARGV do
  local s = redis.call('ZSCORE', KEYS[1], ARGV[i])
  if s and tonumber(s) <= now then
    redis.call('ZREM', KEYS[1], ARGV[i])
    local e = redis.call('HGETALL', KEYS[i])
    local dead = {}
    local alive = nil
    for j = 1, #e, 2 do
      local t = tonumber(e[j + 1]) or 0
      if t <= now then dead[#dead + 1] = e[j] elseif not alive or t > alive then alive = t end
    end
    if alive then
      redis.call('ZADD', KEYS[1], alive, ARGV[i])
    elseif #dead > 0 then
      for k = 1, #dead, 1000 do redis.call('HDEL', KEYS[i], unpack(dead, k, math.min(k + 999, #dead))) end
      out[#out + 1] = ARGV[i]
    end
  end
end
return out`;

/**
 * drop()'s step: the entry goes, and with the user's last one the user leaves the sweep's set
 * (KEYS[2]), in one step, so a user written meanwhile by another instance keeps its deadline.
 */
const DROP_ENTRY = `redis.call('HDEL', KEYS[1], ARGV[1])
if redis.call('EXISTS', KEYS[1]) == 0 then redis.call('ZREM', KEYS[2], ARGV[2]) end
return 0`;

/**
 * How long a user's hash of entries outlives its last write, in connection TTLs. lapsed() tells a
 * dead instance's users (entries there, run out) from users who left (none) by it: the sweeps
 * must reach every one of them before it goes. 2 minutes gave a sweeper ~3 calls, ~30,000 users.
 */
const HASH_TTLS = 10;

/**
 * `connectionTtlMs`: how long an entry lives unless refreshed, so how long after its instance
 * died a user is told OFFLINE (up to a third more: the sweep runs with the refresh). Only tests
 * set it shorter (Config.presenceConnectionTtlMs), to see that happen without a minute's wait.
 */
export function createRedisPresence(
  redis: Redis,
  prefix: string,
  connectionTtlMs = CONNECTION_TTL_MS,
): PresenceStore {
  const key = (u: string) => `${prefix}presence:${u}`;
  const choiceKey = (u: string) => `${prefix}presence-choice:${u}`;
  /** each user with entries, by the last deadline written for it (lapsed() looks past it) */
  const deadlines = `${prefix}presence-deadlines`;
  return {
    connectionTtlMs,
    async touch(userId, connIds, choice) {
      if (!connIds.length && !choice) return;
      const m = redis.multi();
      if (choice) m.set(choiceKey(userId), choice, 'EX', CHOICE_TTL_S);
      if (connIds.length) {
        const until = String(Date.now() + connectionTtlMs);
        // The hash outlives its entries by a TTL: lapsed() tells entries left behind by an
        // instance that died (still there, run out) from ones dropped as their sockets closed.
        m.hset(key(userId), ...connIds.flatMap((c) => [c, until]))
          .pexpire(key(userId), HASH_TTLS * connectionTtlMs)
          .zadd(deadlines, until, userId);
      }
      await m.exec();
    },
    async drop(userId, connId) {
      // Out of the set with its last entry: else every sweep read it again for nothing once its
      // deadline came, and the users of a dead instance waited behind those who had just left.
      await redis.eval(DROP_ENTRY, 2, key(userId), deadlines, connId, userId);
    },
    async choose(userId, choice) {
      await redis.set(choiceKey(userId), choice, 'EX', CHOICE_TTL_S);
    },
    async shown(userIds) {
      const now = Date.now();
      const p = redis.pipeline();
      for (const u of userIds) p.hvals(key(u)).get(choiceKey(u));
      const r = (await p.exec()) ?? [];
      // A failed read is no answer (each would read as missing: OFFLINE): the caller's to handle.
      const failed = r.find(([err]) => err)?.[0];
      if (failed) throw failed;
      return new Map(
        userIds.map((u, i) => {
          const vals = (r[2 * i]?.[1] as string[] | null) ?? [];
          const choice = (r[2 * i + 1]?.[1] as PresenceChoice | null) ?? undefined;
          return [
            u,
            show(
              choice,
              vals.some((v) => Number(v) > now),
            ),
          ];
        }),
      );
    },
    async lapsed() {
      const now = Date.now();
      const out: string[] = [];
      for (let round = 0; round < LAPSED_ROUNDS; round++) {
        const due = await redis.zrangebyscore(deadlines, '-inf', now, 'LIMIT', 0, LAPSED_BATCH);
        if (!due.length) break;
        // Each claimed by one instance (atomic: the others find it gone), and only while still due.
        // None of its entries: dropped as their sockets closed (told then). Some alive: still
        // connected somewhere, kept in the set by them.
        const keys = [deadlines, ...due.map(key)];
        out.push(
          ...((await redis.eval(CLAIM_LAPSED, keys.length, ...keys, String(now), ...due)) as string[]),
        );
        if (due.length < LAPSED_BATCH) break;
      }
      return out;
    },
    onReconnect(fn) {
      redis.on('ready', fn);
      return () => redis.off('ready', fn);
    },
  };
}

/**
 * Tracks this instance's sockets and announces changes of what others see. The ws layer calls
 * connected/disconnected; the refresh timer keeps this instance's entries alive.
 */
export function createPresenceTracker(
  store: PresenceStore,
  bus: Bus,
  instanceId: string,
  /** where the status a user chose is kept for good (the database); null: ONLINE */
  kept?: {
    load(userId: string): Promise<PresenceChoice | null>;
    save(userId: string, choice: PresenceChoice): Promise<void>;
  },
) {
  const local = new Map<string, Set<string>>();
  const lastShown = new Map<string, PresenceShown>();
  /**
   * What was last shown of each user not OFFLINE, from every instance's signals and the store's
   * answers, for a store that can be unreachable (Redis): while it is, queries answer from here.
   * Else everyone connected read OFFLINE for the whole outage (a member list all offline). Bounded:
   * the oldest go first (read OFFLINE then, as all did before).
   */
  const known = store.onReconnect ? new Map<string, PresenceShown>() : undefined;
  function remember(userId: string, s: PresenceShown) {
    if (!known) return;
    known.delete(userId);
    if (s === 'OFFLINE') return;
    known.set(userId, s);
    if (known.size > KNOWN_MAX) known.delete(known.keys().next().value!);
  }
  /**
   * Users connected here whose entries this instance could not write for a while: they may have
   * run out meanwhile, and another instance told them OFFLINE (tellLapsed). Told again, whatever
   * this instance showed last, once written.
   */
  const retell = new Set<string>();
  let n = 0;

  /**
   * Signals what others now see of `userId` unless this instance already showed that (nothing
   * shown counts as OFFLINE: an invisible user's sockets coming and going say nothing). A choice
   * is always signalled: the status it replaces may have been shown by another instance.
   */
  async function announce(userId: string, chosen = false) {
    const s = (await store.shown([userId])).get(userId) ?? 'OFFLINE';
    const again = retell.delete(userId);
    if (!chosen && !again && (lastShown.get(userId) ?? 'OFFLINE') === s) return;
    if (s === 'OFFLINE') lastShown.delete(userId);
    else lastShown.set(userId, s);
    await bus.signal('presence', { userId, status: s });
  }

  /** Connection entries whose drop failed (the store was down), dropped when it is back. */
  const undropped = new Map<string, Set<string>>();
  const keepUndropped = (u: string, c: string) => undropped.set(u, (undropped.get(u) ?? new Set()).add(c));
  /**
   * Users whose change was maybe not told: a store command for it failed. A store that is slow or
   * paused fails its commands (the client's timeout) without reconnecting, so onReconnect does
   * not come for them: the refresh does them again.
   */
  const unsure = new Set<string>();

  /**
   * Writes a user's connection entries, with its chosen status from where it is kept: the store's
   * copy may be gone (a restarted Redis or process, its expiry) or behind (a choice whose write
   * failed), and an invisible user must not show as ONLINE. In the same write, before the
   * entries, so it never does meanwhile. Read again after: a choose() (on another instance) that
   * saved its choice after the read and wrote the store before this write was overwritten with
   * the old one, which is put right from what is kept now.
   */
  async function enter(u: string, connIds: string[]) {
    if (!kept) return store.touch(u, connIds);
    const choice = (await kept.load(u)) ?? 'ONLINE';
    await store.touch(u, connIds, choice);
    const now = (await kept.load(u)) ?? 'ONLINE';
    if (now !== choice) await store.choose(u, now);
  }

  /** Writes a user's entries again and does its failed drops; false when the store failed again. */
  async function rewrite(u: string): Promise<boolean> {
    const gone = [...(undropped.get(u) ?? [])];
    undropped.delete(u);
    try {
      await enter(u, [...(local.get(u) ?? [])]);
      for (const c of gone) await store.drop(u, c);
      return true;
    } catch {
      for (const c of gone) keepUndropped(u, c);
      return false;
    }
  }

  /** Writes a user's entries again and tells what others now see; unsure of it when that fails. */
  function rewriteAndTell(u: string) {
    void rewrite(u)
      .then((ok) => (ok ? announce(u) : Promise.reject()))
      .catch(() => unsure.add(u));
  }

  /**
   * Users whose instance died with their sockets: nobody dropped their entries or told them
   * OFFLINE, and queries show them OFFLINE once the entries run out. Told here (by the one
   * instance the store hands each to), as a drop would have.
   */
  async function tellLapsed() {
    for (const u of (await store.lapsed?.()) ?? []) {
      if (local.has(u)) {
        // Connected here after all (a write of ours that failed): written again, and shown.
        unsure.add(u);
        continue;
      }
      lastShown.delete(u);
      await bus.signal('presence', { userId: u, status: 'OFFLINE' });
    }
  }

  const refresh = setInterval(() => {
    void tellLapsed().catch(() => {});
    const redo = new Set([...unsure, ...undropped.keys()]);
    for (const [u, set] of local) {
      if (redo.has(u)) continue;
      void store.touch(u, [...set]).catch(() => {
        retell.add(u);
        unsure.add(u);
      });
    }
    for (const u of redo) {
      unsure.delete(u);
      rewriteAndTell(u);
    }
  }, store.connectionTtlMs / 3);
  refresh.unref();

  // Back from an outage, the store may have lost every entry (a restarted Redis) and has missed
  // what changed meanwhile: this instance's connections are written again and the drops that
  // failed done at once, and whatever others now see differently from what was last told is
  // told once other instances are listening again.
  const toTell = new Set<string>();
  let settle: NodeJS.Timeout | undefined;
  const offReconnect = store.onReconnect?.(() => {
    for (const u of local.keys()) retell.add(u);
    for (const u of new Set([...local.keys(), ...lastShown.keys(), ...undropped.keys(), ...unsure])) {
      toTell.add(u);
      unsure.delete(u);
      void rewrite(u);
    }
    clearTimeout(settle);
    settle = setTimeout(() => {
      for (const u of toTell) void announce(u).catch(() => unsure.add(u));
      const others = [...(known?.keys() ?? [])].filter((u) => !toTell.has(u));
      toTell.clear();
      void tellGone(others).catch(() => {});
    }, RECONNECT_SETTLE_MS);
    settle.unref();
  });

  /**
   * After the store was back, users another instance showed that it now reads OFFLINE are told so.
   * An instance that died shortly before a restarted (empty) Redis left no entries for the lapsed
   * sweep to find: its users were shown as they last were to every stream, for good, while queries
   * read OFFLINE (a host restarting Redis and an api process together). Each instance tells those
   * it knew of (the batches merge them); one still connected somewhere has been written again by
   * now (the settle), and a late one is answered by its instance (heard).
   */
  async function tellGone(users: string[]) {
    for (let i = 0; i < users.length; i += LAPSED_BATCH) {
      const now = await store.shown(users.slice(i, i + LAPSED_BATCH));
      for (const [u, s] of now) {
        if (s !== 'OFFLINE' || local.has(u) || !known?.has(u)) continue;
        known.delete(u);
        lastShown.delete(u);
        await bus.signal('presence', { userId: u, status: 'OFFLINE' });
      }
    }
  }

  return {
    store,
    /**
     * What others see of `userIds`, from the store; while it fails, what was last shown of them
     * (signals stop too: nothing newer is known anywhere until it is back).
     */
    async shown(userIds: string[]): Promise<Map<string, PresenceShown>> {
      try {
        const r = await store.shown(userIds);
        for (const [u, s] of r) remember(u, s);
        return r;
      } catch (err) {
        if (!known) throw err;
        return new Map(userIds.map((u) => [u, known.get(u) ?? 'OFFLINE']));
      }
    },
    /**
     * Returns the connection id to pass to disconnected. It does not fail: the id is this
     * instance's from the start, so a store or bus that is down now (the entry is written again by
     * the next refresh) still leaves the caller an id to release when the socket closes.
     */
    async connected(userId: string): Promise<string> {
      const id = `${instanceId}:${++n}`;
      let set = local.get(userId);
      if (!set) {
        set = new Set();
        local.set(userId, set);
      }
      set.add(id);
      try {
        await enter(userId, [id]);
        await announce(userId);
      } catch {
        // the refresh timer writes the entry again, and tells it; disconnected removes it
        unsure.add(userId);
      }
      return id;
    },
    disconnected(userId: string, connId: string) {
      const set = local.get(userId);
      set?.delete(connId);
      if (set && !set.size) local.delete(userId);
      setTimeout(() => {
        void store.drop(userId, connId).then(
          () => announce(userId).catch(() => unsure.add(userId)),
          () => keepUndropped(userId, connId),
        );
      }, OFFLINE_GRACE_MS).unref();
    },
    /**
     * Kept for good first (a failure there is the caller's), then into the store and told. When
     * the store fails, the refresh writes it again from where it is kept, and tells it.
     */
    async choose(userId: string, choice: PresenceChoice) {
      await kept?.save(userId, choice);
      try {
        await store.choose(userId, choice);
        await announce(userId, true);
      } catch {
        unsure.add(userId);
      }
    },
    /**
     * A presence change signalled by any instance. OFFLINE for a user with a socket here (an
     * instance that had not seen this one's entry, or the lapsed sweep racing a new socket) is
     * answered with what others should see: written again and told. Any OFFLINE is what others
     * now see, whatever this instance showed last: a socket of the user's here later is told.
     */
    heard(userId: string, status: string) {
      remember(userId, status as PresenceShown);
      if (status !== 'OFFLINE') return;
      lastShown.delete(userId);
      if (local.has(userId)) rewriteAndTell(userId);
    },
    stop() {
      clearInterval(refresh);
      offReconnect?.();
      clearTimeout(settle);
    },
  };
}
export type PresenceTracker = ReturnType<typeof createPresenceTracker>;
