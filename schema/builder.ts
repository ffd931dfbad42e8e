/**
 * All builder typing in one place (STYLE.md, Pothos complex-app): Context, scalars, plugins.
 * One file per GraphQL type adds its object and its own root fields; schema/index.ts imports them.
 */
import SchemaBuilder from '@pothos/core';
import DataloaderPlugin from '@pothos/plugin-dataloader';
import RelayPlugin from '@pothos/plugin-relay';
import ScopeAuthPlugin from '@pothos/plugin-scope-auth';
import ValidationPlugin from '@pothos/plugin-validation';
import { GraphQLError, GraphQLScalarType, Kind } from 'graphql';
import type { Deps, Viewer } from '../core/deps.ts';
import { BanterError } from '../core/errors.ts';
import { isUuid } from '../core/ids.ts';

export interface Context {
  deps: Deps;
  /** null when the request carries no valid token */
  viewer: Viewer | null;
  requestId: string;
  /** client address, for per-IP rate limits */
  ip: string;
}

/**
 * `node(id)` must not reveal what the type's own query would hide: each Node type registers the
 * visibility check its query uses; a type without one is never resolved through `node`.
 */
type NodeGuard = (ctx: Context, id: string) => Promise<unknown>;
const nodeGuards = new Map<string, NodeGuard>();
export function registerNodeGuard(typename: string, guard: NodeGuard) {
  nodeGuards.set(typename, guard);
}

export const builder = new SchemaBuilder<{
  Context: Context;
  Scalars: {
    ID: { Input: string; Output: string | number | bigint };
    DateTime: { Input: Date; Output: Date };
  };
  AuthScopes: { authenticated: boolean; instanceAdmin: boolean };
  DefaultFieldNullability: false;
}>({
  defaultFieldNullability: false,
  plugins: [ScopeAuthPlugin, RelayPlugin, DataloaderPlugin, ValidationPlugin],
  scopeAuth: {
    authScopes: (ctx) => ({ authenticated: !!ctx.viewer, instanceAdmin: !!ctx.viewer?.isAdmin }),
    unauthorizedError: (_parent, ctx) =>
      ctx.viewer ? new BanterError('FORBIDDEN') : new BanterError('UNAUTHENTICATED'),
  },
  relay: {
    clientMutationId: 'omit',
    cursorType: 'String',
    nodesQueryOptions: false,
    nodeQueryOptions: {
      description: 'Any object by its global id, if the viewer may see it (NOT_FOUND otherwise).',
      resolve: async (_root, args, ctx, _info, resolveNodes) => {
        const guard = nodeGuards.get(args.id.typename);
        if (!guard) throw new BanterError('NOT_FOUND', 'Not found.');
        await guard(ctx, args.id.id);
        return resolveNodes(args.id);
      },
    },
    encodeGlobalID: (typename, id) => encodeId(typename, String(id)),
    decodeGlobalID: (globalID) => decodeAnyId(globalID),
  },
  validation: {
    validationError: (failure) => {
      const issue = failure.issues[0];
      const field = issue?.path?.map((p) => (typeof p === 'object' ? String(p.key) : String(p))).join('.');
      return new BanterError(
        'BAD_USER_INPUT',
        issue ? `${field ? `${field}: ` : ''}${issue.message}` : undefined,
        {
          extra: field ? { field } : {},
        },
      );
    },
  },
});

/**
 * Node types' raw ids, by type name. Pothos relay resolves every node's `id` field with an async
 * function: a promise per object in every result, and a subscription's shared execution can
 * never finish synchronously. buildSchema() swaps in the same encoding, synchronously, from this
 * registry (and refuses a Node type that did not register here).
 */
export const nodeIdResolvers = new Map<string, (parent: never) => string>();
export function nodeId<T>(typename: string, resolve: (parent: T) => string) {
  nodeIdResolvers.set(typename, resolve as (parent: never) => string);
  return { resolve };
}

/** Relay global ids: base64url of `Type:uuid`, opaque to clients. */
export function encodeId(typename: string, id: string): string {
  return Buffer.from(`${typename}:${id}`).toString('base64url');
}

export function decodeAnyId(globalId: string): { typename: string; id: string } {
  const raw =
    typeof globalId === 'string' && globalId.length <= 200
      ? Buffer.from(globalId, 'base64url').toString()
      : '';
  const i = raw.indexOf(':');
  const typename = raw.slice(0, i);
  const id = raw.slice(i + 1);
  if (i <= 0 || !isUuid(id))
    throw new BanterError('BAD_USER_INPUT', `"${String(globalId).slice(0, 80)}" is not a valid id.`);
  return { typename, id };
}

/** Decodes a global id that must name `typename`; another type's id is BAD_USER_INPUT. */
export function decodeId(globalId: string, typename: string, field = 'id'): string {
  const d = decodeAnyId(globalId);
  if (d.typename !== typename) {
    throw new BanterError('BAD_USER_INPUT', `${field} must be a ${typename} id (got a ${d.typename} id).`, {
      extra: { field },
    });
  }
  return d.id;
}

builder.addScalarType(
  'DateTime',
  new GraphQLScalarType<Date, string>({
    name: 'DateTime',
    description: 'An ISO-8601 date and time in UTC',
    serialize: (v) => (v instanceof Date ? v : new Date(v as string)).toISOString(),
    parseValue: (v) => {
      const d = typeof v === 'string' ? new Date(v) : new Date(Number.NaN);
      if (Number.isNaN(d.getTime()))
        throw new GraphQLError('DateTime must be an ISO-8601 string', {
          extensions: { code: 'BAD_USER_INPUT' },
        });
      return d;
    },
    parseLiteral: (ast) => {
      const d = ast.kind === Kind.STRING ? new Date(ast.value) : new Date(Number.NaN);
      if (Number.isNaN(d.getTime()))
        throw new GraphQLError('DateTime must be an ISO-8601 string', {
          extensions: { code: 'BAD_USER_INPUT' },
        });
      return d;
    },
  }),
  {},
);

builder.queryType({});
builder.mutationType({});

/** The viewer or UNAUTHENTICATED: resolvers that need a signed-in user call this. */
export function requireViewer(ctx: Context): Viewer {
  if (!ctx.viewer) throw new BanterError('UNAUTHENTICATED');
  return ctx.viewer;
}
