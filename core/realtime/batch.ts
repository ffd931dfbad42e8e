/**
 * One statement for many callers asking at once (a crowd of sockets reconnecting): callers queue
 * their keys; while no statement is out, one is sent for every key queued, and the keys queued
 * meanwhile wait for the next. A caller only ever joins a statement sent after it asked, so what
 * it reads is at least as new as a statement of its own would have been (a read that must see a
 * write the caller made just before it, as presence's does, still sees it).
 */
export function batched<K, V>(run: (keys: K[]) => Promise<Map<K, V>>): (key: K) => Promise<V | undefined> {
  let waiting = new Map<K, { resolve(v: V | undefined): void; reject(err: unknown): void }[]>();
  let running = false;
  async function drain() {
    running = true;
    while (waiting.size) {
      const now = waiting;
      waiting = new Map();
      try {
        const found = await run([...now.keys()]);
        for (const [k, ws] of now) for (const w of ws) w.resolve(found.get(k));
      } catch (err) {
        for (const ws of now.values()) for (const w of ws) w.reject(err);
      }
    }
    running = false;
  }
  return (key) =>
    new Promise<V | undefined>((resolve, reject) => {
      const ws = waiting.get(key);
      if (ws) ws.push({ resolve, reject });
      else waiting.set(key, [{ resolve, reject }]);
      if (!running) void drain();
    });
}
