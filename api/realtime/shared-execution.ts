/**
 * Subscription execution that shares work between subscribers. The hub hands every local
 * subscriber the same row object; the first subscriber to execute a given (document, variables)
 * for that row runs GraphQL with a context that records whether `viewer` was read. If it was
 * not, the result cannot differ between viewers (visibility was already decided by the hub), so
 * every other subscriber with the same document reuses it instead of executing again.
 */
import {
  createSourceEventStream,
  type DocumentNode,
  type ExecutionArgs,
  type ExecutionResult,
  execute,
  GraphQLError,
} from 'graphql';
import type { Context } from '../../schema/builder.ts';

type Mask = (error: unknown, message: string) => Error;

interface Shared {
  result: Promise<ExecutionResult>;
  viewerFree: Promise<boolean>;
}

const docIds = new WeakMap<DocumentNode, number>();
let nextDocId = 1;
const perEvent = new WeakMap<object, Map<string, Shared>>();

function keyOf(args: ExecutionArgs): string {
  let id = docIds.get(args.document);
  if (!id) {
    id = nextDocId++;
    docIds.set(args.document, id);
  }
  return `${id}|${args.operationName ?? ''}|${JSON.stringify(args.variableValues ?? {})}`;
}

/**
 * An event whose subject was deleted between the log read and execution resolves to NOT_FOUND:
 * it is skipped, as replay skips it (the deletion event follows in the stream).
 */
function isGone(r: ExecutionResult): boolean {
  const data = r.data as Record<string, unknown> | null | undefined;
  const empty = !data || Object.values(data).every((v) => v === null);
  return empty && !!r.errors?.length && r.errors.every((e) => e.extensions?.code === 'NOT_FOUND');
}

export function maskResult(result: ExecutionResult, mask: Mask): ExecutionResult {
  if (!result.errors?.length) return result;
  return {
    ...result,
    errors: result.errors.map((e) => mask(e, 'Unexpected error.') as GraphQLError),
  };
}

/** A context whose `viewer` read is recorded; loaders stay per execution. */
function tracking(ctx: Context): { ctx: Context; touched: () => boolean } {
  let touched = false;
  const viewer = ctx.viewer;
  const tracked = { ...ctx };
  Object.defineProperty(tracked, 'viewer', {
    enumerable: true,
    get() {
      touched = true;
      return viewer;
    },
  });
  return { ctx: tracked, touched: () => touched };
}

export interface SharedSubscribeHooks {
  mask: Mask;
  /** each result sent; `shared` when it was reused from another subscriber */
  onResult?(shared: boolean): void;
  /** the source failed (e.g. slow consumer): the caller decides what to do with the socket */
  onSourceError?(err: unknown): void;
}

/**
 * Like graphql's `subscribe`, with results shared between subscribers where that is provably
 * safe. Errors from the source stream (bad cursor, expired cursor) come back as a result with
 * the masked error, as the protocol expects.
 */
export async function subscribeShared(
  args: ExecutionArgs,
  hooks: SharedSubscribeHooks,
): Promise<AsyncIterableIterator<ExecutionResult> | ExecutionResult> {
  const source = await createSourceEventStream(args);
  if (!(Symbol.asyncIterator in (source as object))) {
    return maskResult(source as ExecutionResult, hooks.mask);
  }
  const iterable = source as AsyncIterable<unknown>;
  const key = keyOf(args);
  const ctx = args.contextValue as Context;

  const run = (payload: unknown): Shared => {
    const t = tracking(ctx);
    const result = Promise.resolve(execute({ ...args, rootValue: payload, contextValue: t.ctx })).then((r) =>
      maskResult(r, hooks.mask),
    );
    return { result, viewerFree: result.then(() => !t.touched()) };
  };

  // A hand-made iterator, not an async generator: a generator's return() waits for its pending
  // next(), which for an idle stream is forever, so closed sockets would leak subscriptions.
  const it = iterable[Symbol.asyncIterator]();
  let finished = false;
  const done = (): IteratorResult<ExecutionResult> => ({ value: undefined, done: true });

  async function nextResult(payload: unknown): Promise<ExecutionResult | null> {
    if (typeof payload !== 'object' || payload === null) {
      const r = await run(payload).result;
      return isGone(r) ? null : r;
    }
    let byDoc = perEvent.get(payload);
    if (!byDoc) {
      byDoc = new Map();
      perEvent.set(payload, byDoc);
    }
    const existing = byDoc.get(key);
    if (existing && (await existing.viewerFree)) {
      const r = await existing.result;
      if (isGone(r)) return null;
      hooks.onResult?.(true);
      return r;
    }
    const mine = run(payload);
    if (!existing) byDoc.set(key, mine);
    const r = await mine.result;
    if (isGone(r)) return null;
    hooks.onResult?.(false);
    return r;
  }

  const mapped: AsyncIterableIterator<ExecutionResult> & {
    return(): Promise<IteratorResult<ExecutionResult>>;
  } = {
    async next() {
      while (!finished) {
        let step: IteratorResult<unknown>;
        try {
          step = await it.next();
        } catch (err) {
          finished = true;
          hooks.onSourceError?.(err);
          return {
            value: maskResult(
              { errors: [new GraphQLError((err as Error).message, { originalError: err as Error })] },
              hooks.mask,
            ),
            done: false,
          };
        }
        if (step.done) break;
        const r = await nextResult(step.value);
        if (r) return { value: r, done: false };
      }
      finished = true;
      return done();
    },
    async return() {
      finished = true;
      await it.return?.();
      return done();
    },
    async throw(err: unknown) {
      finished = true;
      await it.return?.();
      throw err;
    },
    [Symbol.asyncIterator]() {
      return mapped;
    },
  };
  return mapped;
}
