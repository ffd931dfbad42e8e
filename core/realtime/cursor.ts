/**
 * Cursors name a place in the event log: (xid, seq) of the writing transaction and the row. The
 * log is read in that order, so every row that commits later sorts after any cursor handed out.
 */
import { badInput } from '../errors.ts';

export interface Position {
  /** xid8 as a decimal string (it can pass 2^53) */
  xid: string;
  seq: number;
}

export const ORIGIN: Position = { xid: '0', seq: 0 };

const PREFIX = 'e1.';

export function encodeCursor(p: Position): string {
  return Buffer.from(`${PREFIX}${p.xid}.${p.seq}`).toString('base64url');
}

/**
 * Malformed cursors are BAD_USER_INPUT (the client's fault, not expiry), naming where the cursor
 * came from: `after`, or an SSE request's Last-Event-ID header.
 */
export function decodeCursor(cursor: string, field = 'after'): Position {
  const raw = cursor.length <= 100 ? Buffer.from(cursor, 'base64url').toString() : '';
  const m = /^e1\.(\d{1,20})\.(\d{1,16})$/.exec(raw);
  if (!m) throw badInput(`${field}: not a valid events cursor.`, field);
  const seq = Number(m[2]);
  if (!Number.isSafeInteger(seq) || BigInt(m[1]) >= 1n << 63n)
    throw badInput(`${field}: not a valid events cursor.`, field);
  return { xid: BigInt(m[1]).toString(), seq };
}

/** Canonical decimals (no leading zeros): longer is larger, else compare as text. */
export function compareXid(a: string, b: string): number {
  if (a === b) return 0;
  if (a.length !== b.length) return a.length - b.length;
  return a < b ? -1 : 1;
}

export function comparePos(a: Position, b: Position): number {
  // Called per subscriber per row, so no BigInt parsing here.
  if (a.xid !== b.xid) return compareXid(a.xid, b.xid);
  return a.seq - b.seq;
}

/** A database snapshot (pg_current_snapshot): which transactions had committed at one moment. */
export interface Snapshot {
  xmin: string;
  xmax: string;
  /** in progress at the moment */
  xip: Set<string>;
}

/** True when transaction `xid` had finished when `s` was taken (its rows, if any, were committed). */
export function finishedIn(xid: string, s: Snapshot): boolean {
  if (compareXid(xid, s.xmin) < 0) return true;
  return compareXid(xid, s.xmax) < 0 && !s.xip.has(xid);
}

export const maxPos = (a: Position, b: Position) => (comparePos(a, b) >= 0 ? a : b);
