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

/** Malformed cursors are BAD_USER_INPUT (the client's fault, not expiry). */
export function decodeCursor(cursor: string): Position {
  const raw = cursor.length <= 100 ? Buffer.from(cursor, 'base64url').toString() : '';
  const m = /^e1\.(\d{1,20})\.(\d{1,16})$/.exec(raw);
  if (!m) throw badInput('after: not a valid events cursor.', 'after');
  const seq = Number(m[2]);
  if (!Number.isSafeInteger(seq) || BigInt(m[1]) >= 1n << 63n)
    throw badInput('after: not a valid events cursor.', 'after');
  return { xid: BigInt(m[1]).toString(), seq };
}

export function comparePos(a: Position, b: Position): number {
  if (a.xid !== b.xid) {
    // Canonical decimals (no leading zeros): longer is larger, else compare as text. Called per
    // subscriber per row, so no BigInt parsing here.
    if (a.xid.length !== b.xid.length) return a.xid.length - b.xid.length;
    return a.xid < b.xid ? -1 : 1;
  }
  return a.seq - b.seq;
}

export const maxPos = (a: Position, b: Position) => (comparePos(a, b) >= 0 ? a : b);
