import { randomBytes } from 'node:crypto';

/**
 * UUIDv7 ids, monotonic within a process: ids sort in creation order (Postgres compares uuids
 * bytewise), so message id order is send order. The 12-bit rand_a field holds a counter that
 * carries into the timestamp when more than 4096 ids are made in one millisecond.
 */
let lastMs = 0;
let counter = 0;

/** Random bytes are drawn 4 KiB at a time: one syscall per 256 ids instead of one per id. */
const POOL_SIZE = 4096;
let pool = Buffer.alloc(0);
let poolAt = 0;

export function newId(): string {
  let ms = Date.now();
  if (ms <= lastMs) {
    ms = lastMs;
    counter++;
    if (counter > 0xfff) {
      ms = ++lastMs;
      counter = 0;
    }
  } else {
    counter = 0;
  }
  lastMs = ms;
  const b = Buffer.allocUnsafe(16);
  if (poolAt + 16 > pool.length) {
    pool = randomBytes(POOL_SIZE);
    poolAt = 0;
  }
  pool.copy(b, 0, poolAt, poolAt + 16);
  poolAt += 16;
  b.writeUIntBE(ms, 0, 6);
  b[6] = 0x70 | (counter >> 8);
  b[7] = counter & 0xff;
  b[8] = (b[8] & 0x3f) | 0x80;
  const h = b.toString('hex');
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}

const UUID_RE = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/;
export const isUuid = (s: string) => UUID_RE.test(s);

/** The smallest v7 id at a given time: used to turn a time into an id bound. */
export function idAtTime(ms: number): string {
  const h = ms.toString(16).padStart(12, '0');
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-7000-8000-000000000000`;
}

export function timeOfId(id: string): number {
  return Number.parseInt(id.replace(/-/g, '').slice(0, 12), 16);
}
