import type { OperationDefinitionNode } from 'graphql';
import { Counter, collectDefaultMetrics, Gauge, Histogram, Registry } from 'prom-client';
import type { Database } from '../core/db/client.ts';

/**
 * Operation names counted under a label of their own; the ones past these are counted as
 * OTHER_OPERATIONS. The name is the client's to choose, and each new one was a series the registry
 * kept for the life of the process, and wrote on every scrape: a client that puts an id or a time
 * in its operation names (or one that means harm) grew both without end.
 */
export const MAX_OPERATION_NAMES = 200;
/**
 * Longest operation name counted under a label of its own; a longer one is counted as
 * OTHER_OPERATIONS. A name may be as long as the request body (1 MiB by default): bounded in
 * number only, 200 of them were up to 200 MiB kept in the registry and written on every scrape.
 */
export const MAX_OPERATION_NAME_LENGTH = 128;
/** The `name` label of operations past MAX_OPERATION_NAMES (no GraphQL name has parentheses). */
export const OTHER_OPERATIONS = '(other)';

/** One registry per app instance, so tests can build several apps in one process. */
export function createMetrics(database: Database) {
  const registry = new Registry();
  collectDefaultMetrics({ register: registry });
  const requests = new Counter({
    name: 'banter_http_requests_total',
    help: 'HTTP requests by method, route and status',
    labelNames: ['method', 'route', 'status'] as const,
    registers: [registry],
  });
  const latency = new Histogram({
    name: 'banter_http_request_duration_seconds',
    help: 'HTTP request latency',
    labelNames: ['route'] as const,
    buckets: [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5],
    registers: [registry],
  });
  const operations = new Counter({
    name: 'banter_graphql_operations_total',
    help: 'GraphQL operations by type and name',
    labelNames: ['type', 'name'] as const,
    registers: [registry],
  });
  const errors = new Counter({
    name: 'banter_graphql_errors_total',
    help: 'GraphQL errors by extensions.code',
    labelNames: ['code'] as const,
    registers: [registry],
  });
  new Gauge({
    name: 'banter_db_pool_connections',
    help: 'Database pool connections by state',
    labelNames: ['state'] as const,
    registers: [registry],
    collect() {
      const s = database.poolStats();
      this.set({ state: 'total' }, s.total);
      this.set({ state: 'idle' }, s.idle);
      this.set({ state: 'waiting' }, s.waiting);
    },
  });
  const named = new Set<string>();
  /**
   * The `name` label for an operation: its name while fewer than MAX_OPERATION_NAMES have one, and
   * not longer than MAX_OPERATION_NAME_LENGTH.
   */
  function operationLabel(name: string | undefined): string {
    if (name === undefined) return 'anonymous';
    if (named.has(name)) return name;
    if (named.size >= MAX_OPERATION_NAMES || name.length > MAX_OPERATION_NAME_LENGTH) return OTHER_OPERATIONS;
    named.add(name);
    return name;
  }
  /**
   * Counts an operation that runs (its execution or subscription begins), whatever its transport:
   * HTTP and SSE through yoga's hooks (api/app.ts), the socket's subscriptions from its server.
   */
  function countOperation(op: OperationDefinitionNode) {
    operations.inc({ type: op.operation, name: operationLabel(op.name?.value) });
  }
  return { registry, requests, latency, operations, errors, operationLabel, countOperation };
}
export type Metrics = ReturnType<typeof createMetrics>;
