/**
 * Query abuse limits, applied before execution. The numbers admit GraphiQL's introspection query
 * and any query a client writes by hand; tests in test/api.test.ts pin both sides.
 */
import { EnvelopArmorPlugin } from '@escape.tech/graphql-armor';
import {
  type ASTNode,
  type DocumentNode,
  type FragmentDefinitionNode,
  GraphQLError,
  Kind,
  type OperationDefinitionNode,
  type SelectionSetNode,
  SingleFieldSubscriptionsRule,
  type ValidationContext,
  type ValidationRule,
} from 'graphql';
import type { Plugin } from 'graphql-yoga';
import { MAX_PAGE as MAX_MEMBERS_PAGE } from '../core/services/member.service.ts';
import { MAX_PAGE as MAX_MESSAGES_PAGE } from '../core/services/message-history.service.ts';
import { MAX_SEARCH_PAGE } from '../core/services/search.service.ts';
import { MAX_PAGE as MAX_MODERATION_PAGE } from '../schema/moderation.ts';

export const ARMOR_LIMITS = {
  /** Selection depth outside introspection. */
  maxDepth: 12,
  /**
   * graphql-armor's cost (objects 2, scalars 1, times 1.5 per level, times a literal `first` or
   * `last`), with `first`/`last` counted at most at maxPage (pagedCostRule).
   */
  maxCost: 8000,
  /**
   * The largest page any field serves (messages, members, reports, audit log, search: 100); a
   * larger `first` or `last` is refused by its resolver (BAD_USER_INPUT, with its bound) or served
   * at that size, so the cost counts it as this.
   */
  maxPage: Math.max(MAX_MESSAGES_PAGE, MAX_MEMBERS_PAGE, MAX_MODERATION_PAGE, MAX_SEARCH_PAGE),
  maxAliases: 20,
  maxDirectives: 30,
  /** GraphiQL's introspection query is about 190 tokens. */
  maxTokens: 3000,
  /**
   * Selections a document holds with every fragment spread expanded, over all its definitions
   * (see expandedSelections). Armor's depth and cost checks walk a fragment once per path to it:
   * fragments that each spread the next twice (a few hundred bytes, well within the token limit)
   * make 2^n paths, seconds of the event loop at n = 20 and no end at the n the tokens allow.
   * Over this the document is refused before any rule walks it. A query within maxCost holds at
   * most maxCost selections (each costs 1 or more); introspection (which armor does not cost) is a
   * few hundred.
   */
  maxExpandedSelections: 20_000,
  /**
   * Nested list fields inside `__schema`/`__type` (types > fields > args is 3). Armor skips
   * introspection for depth and cost, and `fields { type { fields { type ... } } }` grows the
   * response exponentially with each level, so this bounds it separately.
   */
  maxIntrospectionLists: 3,
} as const;

const INTROSPECTION_LISTS = new Set([
  'types',
  'fields',
  'inputFields',
  'interfaces',
  'possibleTypes',
  'enumValues',
  'args',
  'directives',
]);

/** The document's fragment definitions by name (what the walks below follow spreads into). */
function fragmentsOf(doc: DocumentNode): Map<string, FragmentDefinitionNode> {
  const fragments = new Map<string, FragmentDefinitionNode>();
  for (const d of doc.definitions) if (d.kind === Kind.FRAGMENT_DEFINITION) fragments.set(d.name.value, d);
  return fragments;
}

function introspectionDepthRule(max: number): ValidationRule {
  return (context) => {
    const fragments = fragmentsOf(context.getDocument());
    // Deepest list nesting below `set`; `inside` once under __schema/__type. Fragment spreads are
    // followed but not re-entered on one path (cycles are rejected by another rule, possibly later).
    const walk = (set: SelectionSetNode, inside: boolean, seen: Set<string>): number => {
      let deepest = 0;
      for (const s of set.selections) {
        let d = 0;
        if (s.kind === Kind.FIELD) {
          const name = s.name.value;
          const now = inside || name === '__schema' || name === '__type';
          const own = now && INTROSPECTION_LISTS.has(name) ? 1 : 0;
          d = own + (s.selectionSet ? walk(s.selectionSet, now, seen) : 0);
        } else if (s.kind === Kind.INLINE_FRAGMENT) {
          d = walk(s.selectionSet, inside, seen);
        } else {
          const f = fragments.get(s.name.value);
          if (f && !seen.has(f.name.value)) {
            d = walk(f.selectionSet, inside, new Set(seen).add(f.name.value));
          }
        }
        if (d > deepest) deepest = d;
        if (deepest > max) return deepest;
      }
      return deepest;
    };
    return {
      OperationDefinition(node) {
        const depth = walk(node.selectionSet, false, new Set());
        if (depth > max) {
          context.reportError(
            new GraphQLError(`Introspection nests lists ${depth} deep; at most ${max} are allowed.`, {
              nodes: [node as ASTNode],
              extensions: { code: 'BAD_USER_INPUT' },
            }),
          );
        }
      },
    };
  };
}

/**
 * SingleFieldSubscriptionsRule, refusing a subscription whose top level selection has @skip or
 * @include, as graphql-js 17 and the spec draft do: graphql-js 16 passed `@skip(if: true)`, whose
 * execution then failed on no root field (INTERNAL_SERVER_ERROR, logged as a server error), and
 * threw out of validation on a variable in them (which closed the socket with 4500).
 */
export const subscriptionRootRule: ValidationRule = (context) => {
  const single = SingleFieldSubscriptionsRule(context) as {
    OperationDefinition: (node: OperationDefinitionNode) => void;
  };
  const fragments = fragmentsOf(context.getDocument());
  // The top level selection: fields, and the fragments (inline or spread) it is made of. Each
  // fragment is looked into once per operation (`seen` is shared by every path): a fragment seen
  // before had no such directive under it, or the walk would have stopped there. Copied per path,
  // a fragment spread twice by each of the one before was walked 2^n times (n = 22: 12 s).
  const conditional = (set: SelectionSetNode, seen: Set<string>): boolean =>
    set.selections.some((sel) => {
      if (sel.directives?.some((d) => d.name.value === 'skip' || d.name.value === 'include')) return true;
      if (sel.kind === Kind.INLINE_FRAGMENT) return conditional(sel.selectionSet, seen);
      if (sel.kind !== Kind.FRAGMENT_SPREAD || seen.has(sel.name.value)) return false;
      seen.add(sel.name.value);
      const f = fragments.get(sel.name.value);
      return !!f && conditional(f.selectionSet, seen);
    });
  return {
    OperationDefinition(node) {
      if (node.operation === 'subscription' && conditional(node.selectionSet, new Set())) {
        const name = node.name ? `Subscription "${node.name.value}"` : 'Anonymous Subscription';
        context.reportError(
          new GraphQLError(
            `${name} must not use \`@skip\` or \`@include\` directives in the top level selection.`,
            {
              nodes: [node],
            },
          ),
        );
        return;
      }
      single.OperationDefinition(node);
    },
  };
};

/**
 * How many selections the document's definitions hold with fragment spreads expanded, counted
 * once per fragment (memoized), so in time linear in the document; counting stops past `cap`. A
 * spread of a fragment being counted (a cycle, refused by NoFragmentCyclesRule) counts nothing.
 */
export function expandedSelections(doc: DocumentNode, cap: number): number {
  const fragments = fragmentsOf(doc);
  const sizes = new Map<string, number>();
  const counting = new Set<string>();
  const sizeOf = (name: string): number => {
    const known = sizes.get(name);
    if (known !== undefined) return known;
    const f = fragments.get(name);
    if (!f || counting.has(name)) return 0;
    counting.add(name);
    const n = count(f.selectionSet);
    counting.delete(name);
    sizes.set(name, n);
    return n;
  };
  const count = (set: SelectionSetNode): number => {
    let n = 0;
    for (const s of set.selections) {
      if (s.kind === Kind.FIELD) n += 1 + (s.selectionSet ? count(s.selectionSet) : 0);
      else if (s.kind === Kind.INLINE_FRAGMENT) n += count(s.selectionSet);
      else n += sizeOf(s.name.value);
      if (n > cap) return cap + 1;
    }
    return n;
  };
  let total = 0;
  for (const d of doc.definitions) {
    if (d.kind === Kind.OPERATION_DEFINITION) total += count(d.selectionSet);
    else if (d.kind === Kind.FRAGMENT_DEFINITION) total += sizeOf(d.name.value);
    if (total > cap) return cap + 1;
  }
  return total;
}

/**
 * graphql-armor's cost limit (its costLimit, same weights and message), with a literal `first` or
 * `last` counted at most as maxPage. Armor multiplies by the literal as written: `messages(first:
 * 1000)` was refused for its cost ("Query Cost limit of 8000 exceeded") before its resolver could
 * say the bound ("first must be between 0 and 100."), and no page is ever larger than maxPage, so
 * the estimate stays an upper bound of the work. Of `first` and `last` the larger literal counts,
 * where armor took the first one written (a `last: null` ahead of `first: 100` counted 1). A
 * variable counts 1, as in armor.
 */
export function pagedCostRule(maxCost: number, maxPage: number): ValidationRule {
  const OBJECT = 2;
  const SCALAR = 1;
  const FACTOR = 1.5;
  return (context) => {
    // Each fragment costed once, reused at every spread of it (as armor does; -1 while costed).
    const fragments = new Map<string, number>();
    const cost = (node: ASTNode): number => {
      if (node.kind === Kind.FIELD && node.name.value === '__schema') return 0;
      if ('selectionSet' in node && node.selectionSet) {
        let n = OBJECT;
        // The largest literal first/last: armor took the first of them written, so a `last: null`
        // (no argument to the resolver) ahead of `first: 100` made a page of 100 cost as one.
        let times = 1;
        if ('arguments' in node)
          for (const a of node.arguments ?? [])
            if ((a.name.value === 'first' || a.name.value === 'last') && a.value.kind === Kind.INT)
              times = Math.max(times, Math.min(Number(a.value.value), maxPage));
        for (const child of node.selectionSet.selections) n += FACTOR * cost(child);
        return n * times;
      }
      if (node.kind !== Kind.FRAGMENT_SPREAD) return SCALAR;
      const name = node.name.value;
      const known = fragments.get(name);
      if (known !== undefined) return SCALAR + FACTOR * known;
      fragments.set(name, -1);
      const f = context.getFragment(name);
      const n = f ? cost(f) : 0;
      if (fragments.get(name) === -1) fragments.set(name, n);
      return SCALAR + FACTOR * n;
    };
    return {
      OperationDefinition(node) {
        let total = 0;
        for (const s of node.selectionSet.selections) total += cost(s);
        if (total <= maxCost) return;
        context.reportError(
          new GraphQLError(`Query Cost limit of ${maxCost} exceeded, found ${total}.`, {
            extensions: { code: 'BAD_USER_INPUT' },
          }),
        );
      },
    };
  };
}

/** The armor plugins for yoga (and any other envelop, such as the WebSocket server's). */
export function armorPlugins(opts: { production: boolean }): Plugin[] {
  const L = ARMOR_LIMITS;
  // Armor throws from inside validation by default, which reaches the client as an execution
  // error (HTTP 200). Reported as validation errors they answer 400 like any invalid query.
  const report = {
    propagateOnRejection: false,
    onReject: [
      (ctx: ValidationContext | null, err: GraphQLError) =>
        ctx?.reportError(
          new GraphQLError(err.message.replace(/^Syntax Error: /, ''), {
            extensions: { code: 'BAD_USER_INPUT' },
          }),
        ),
    ],
  };
  return [
    {
      // First, and in place of every rule: what they walk (per path) is bounded by this count.
      onValidate({ params, setResult }) {
        const n = expandedSelections(params.documentAST, L.maxExpandedSelections);
        if (n <= L.maxExpandedSelections) return;
        setResult([
          new GraphQLError(
            `The document expands to more than ${L.maxExpandedSelections} selections through its fragments.`,
            { extensions: { code: 'BAD_USER_INPUT' } },
          ),
        ]);
      },
    },
    EnvelopArmorPlugin({
      maxDepth: { n: L.maxDepth, ignoreIntrospection: true, ...report },
      // pagedCostRule in its place (below).
      costLimit: { enabled: false },
      // Every alias counts, `__typename`'s too: armor leaves those out by default (allowList), and
      // a document of any number of them passed the limit.
      maxAliases: { n: L.maxAliases, allowList: [], ...report },
      maxDirectives: { n: L.maxDirectives, ...report },
      maxTokens: { n: L.maxTokens },
      blockFieldSuggestion: { enabled: opts.production },
    }) as Plugin,
    {
      onValidate({ addValidationRule, params }) {
        addValidationRule(introspectionDepthRule(L.maxIntrospectionLists));
        addValidationRule(pagedCostRule(L.maxCost, L.maxPage));
        // In place: the rules run in order, and graphql-js's own would throw before this one.
        const at = params.rules?.indexOf(SingleFieldSubscriptionsRule) ?? -1;
        if (at >= 0) (params.rules as ValidationRule[])[at] = subscriptionRootRule;
      },
    },
  ];
}
