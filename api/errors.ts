import { GraphQLError } from 'graphql';
import type { Plugin } from 'graphql-yoga';
import { BanterError } from '../core/errors.ts';
import type { Logger } from './logger.ts';
import type { Metrics } from './metrics.ts';
import { requestStore } from './request-store.ts';

function findBanterError(err: unknown): BanterError | undefined {
  let e: unknown = err;
  for (let i = 0; i < 5 && e; i++) {
    if (e instanceof BanterError) return e;
    e = e instanceof GraphQLError ? e.originalError : (e as { cause?: unknown }).cause;
  }
  return undefined;
}

/**
 * Yoga's maskError: an error a client can act on becomes a GraphQL error with its code; anything
 * else is logged with the request id and masked as INTERNAL_SERVER_ERROR.
 */
export function createMaskError(log: Logger, metrics: Metrics) {
  return (error: unknown, message: string): Error => {
    const store = requestStore.getStore();
    const be = findBanterError(error);
    const gql = error instanceof GraphQLError ? error : undefined;
    if (be) {
      metrics.errors.inc({ code: be.code });
      if (be.code === 'RATE_LIMITED' && store) {
        store.retryAfter = Math.max(store.retryAfter ?? 0, Number(be.extra.retryAfter) || 1);
      }
      return new GraphQLError(be.message, {
        nodes: gql?.nodes,
        path: gql?.path,
        extensions: { code: be.code, ...be.extra },
      });
    }
    // Errors graphql-js made itself (validation, variable coercion, including a scalar's parseValue
    // throwing a GraphQLError): the client's fault, shown as they are.
    const inner = gql?.originalError;
    if (gql && (!inner || (inner instanceof GraphQLError && !inner.originalError))) {
      const code =
        (gql.extensions?.code as string) ??
        ((inner as GraphQLError | undefined)?.extensions?.code as string) ??
        'BAD_USER_INPUT';
      metrics.errors.inc({ code });
      // source and positions too: a syntax error has no nodes, only where in the source it is.
      return new GraphQLError(gql.message, {
        nodes: gql.nodes,
        source: gql.source,
        positions: gql.positions,
        path: gql.path,
        extensions: { ...gql.extensions, code },
      });
    }
    metrics.errors.inc({ code: 'INTERNAL_SERVER_ERROR' });
    log.error({ err: gql?.originalError ?? error, path: gql?.path }, 'unexpected error');
    return new GraphQLError(message, {
      nodes: gql?.nodes,
      path: gql?.path,
      extensions: { code: 'INTERNAL_SERVER_ERROR', requestId: store?.requestId },
    });
  };
}

/**
 * A syntax error's code and HTTP status (GRAPHQL_PARSE_FAILED, 400), whoever parses the document:
 * yoga sets them only for its HTTP requests, on the error object its parse cache then keeps for
 * that document, for both transports. A document refused over the socket first was then
 * BAD_USER_INPUT (200) over HTTP as well; over the socket it always was.
 */
export const parseFailedCode: Plugin = {
  onParse() {
    return ({ result }) => {
      if (!(result instanceof GraphQLError)) return;
      // GraphQLError's extensions are read-only in its type, not in fact: yoga sets these there too.
      const ext = result.extensions as Record<string, unknown>;
      ext.code ??= 'GRAPHQL_PARSE_FAILED';
      ext.http ??= { spec: true, status: 400 };
    };
  },
};
