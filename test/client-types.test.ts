/**
 * What a frontend that generates its types from the schema (graphql-codegen, Apollo, urql) relies
 * on: an event field that carries one of an enum's values is typed as that enum, so the generated
 * type can be narrowed and switched on exhaustively.
 */
import assert from 'node:assert/strict';
import { after, before, it } from 'node:test';
import { createTestApp, ok, signUp, type TestApp } from './helpers.ts';
import { connect, subscribe, untilLive } from './realtime-helpers.ts';

let app: TestApp;
let url: string;
before(async () => {
  app = await createTestApp({ rateLimits: false });
  url = `ws://127.0.0.1:${await app.start(0)}/graphql`;
});
after(() => app.destroy());

const Q = `subscription { events { __typename cursor ... on RelationshipUpdated { user { id } kind } } }`;
const rel = (events: any[]) =>
  events.filter((e) => e.__typename === 'RelationshipUpdated').map((e) => [e.user.id, e.kind]);

it('RelationshipUpdated.kind is a RelationshipKind (as Relationship.kind is), each side its own, null once none is left', {
  timeout: 30_000,
}, async () => {
  const [a, b] = await Promise.all([signUp(app), signUp(app)]);
  const ca = connect(url, a.token);
  const cb = connect(url, b.token);
  const sa = subscribe(ca.client, null, Q);
  const sb = subscribe(cb.client, null, Q);
  await untilLive(app, [a, b]);
  await ok(app, `mutation($u: ID!) { sendFriendRequest(userId: $u) { kind } }`, { u: b.id }, a.token);
  await ok(app, `mutation($u: ID!) { declineFriendRequest(userId: $u) { kind } }`, { u: a.id }, b.token);
  await sa.until((e) => rel(e).length >= 2, 10_000, "a's two relationship events");
  await sb.until((e) => rel(e).length >= 2, 10_000, "b's two relationship events");
  assert.deepEqual(rel(sa.events), [
    [b.id, 'OUTGOING'],
    [b.id, null],
  ]);
  assert.deepEqual(rel(sb.events), [
    [a.id, 'INCOMING'],
    [a.id, null],
  ]);
  await Promise.all([ca.client.dispose(), cb.client.dispose()]);

  const fieldType = async (type: string) => {
    const d = await ok(
      app,
      `query($t: String!) { __type(name: $t) { fields { name type { kind name ofType { kind name } } } } }`,
      { t: type },
    );
    return d.__type.fields.find((f: any) => f.name === 'kind').type;
  };
  // Relationship.kind: RelationshipKind!; the event's kind is the same values, null when none is left.
  assert.deepEqual(await fieldType('Relationship'), {
    kind: 'NON_NULL',
    name: null,
    ofType: { kind: 'ENUM', name: 'RelationshipKind' },
  });
  assert.deepEqual(await fieldType('RelationshipUpdated'), {
    kind: 'ENUM',
    name: 'RelationshipKind',
    ofType: null,
  });
});
