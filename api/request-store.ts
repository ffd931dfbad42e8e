import { AsyncLocalStorage } from 'node:async_hooks';

/** Per-request state reachable from anywhere in its async call tree (logs, error masking). */
export interface RequestStore {
  requestId: string;
  /** set when an error in this request was RATE_LIMITED, so HTTP can add Retry-After */
  retryAfter?: number;
}

export const requestStore = new AsyncLocalStorage<RequestStore>();
