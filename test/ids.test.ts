import assert from 'node:assert/strict';
import { it } from 'node:test';
import { type ExecutionResult, execute, type GraphQLObjectType, isObjectType, parse } from 'graphql';
import { idAtTime, isUuid, newId, timeOfId } from '../core/ids.ts';
import { loadedAuthors } from '../core/services/message-history.service.ts';
import { decodeAnyId, encodeId } from '../schema/builder.ts';
import { buildSchema } from '../schema/index.ts';

it('makes unique, well-formed v7 ids that sort in creation order, across random-pool refills', () => {
  const before = Date.now();
  const ids = Array.from({ length: 5_000 }, () => newId());
  assert.equal(new Set(ids).size, ids.length);
  for (let i = 0; i < ids.length; i++) {
    assert.ok(isUuid(ids[i]), ids[i]);
    assert.equal(ids[i][14], '7');
    if (i) assert.ok(ids[i] > ids[i - 1], `${ids[i - 1]} then ${ids[i]}`);
  }
  assert.ok(timeOfId(ids[0]) >= before - 1);
  assert.ok(idAtTime(before - 1000) < ids[0]);
});

it('resolves every Node id synchronously, and a MessageCreated read with its row executes without a promise', () => {
  const schema = buildSchema();
  const nodes = Object.values(schema.getTypeMap()).filter(
    (t) => isObjectType(t) && t.getInterfaces().some((i) => i.name === 'Node'),
  );
  assert.ok(nodes.length >= 6, nodes.map((t) => t.name).join());
  const raw = newId();
  for (const t of nodes) {
    const id = (t as GraphQLObjectType).getFields().id.resolve!({ id: raw }, {}, {}, {} as never);
    assert.equal(id, encodeId(t.name, raw), t.name);
    assert.deepEqual(decodeAnyId(id as string), { typename: t.name, id: raw });
  }
  // What the realtime fan-out needs to share one execution synchronously (shared-execution.ts).
  const message = {
    id: newId(),
    channelId: newId(),
    guildId: null,
    authorId: newId(),
    content: 'hi',
    createdAt: new Date(0),
    editedAt: null,
    replyToId: null,
    forwardedFromId: null,
  };
  loadedAuthors.set(message as never, { id: message.authorId, username: 'ann' } as never);
  const result = execute({
    schema,
    document: parse(
      'subscription { events { cursor ... on MessageCreated { message { id content createdAt author { id username } } } } }',
    ),
    rootValue: {
      xid: '1',
      seq: 1,
      cursor: 'c',
      type: 'MESSAGE_CREATED',
      guildId: null,
      channelId: message.channelId,
      userId: null,
      payload: { messageId: message.id },
      message,
    },
    contextValue: { viewer: { userId: newId() } },
  });
  assert.equal(typeof (result as { then?: unknown }).then, 'undefined');
  assert.deepEqual(JSON.parse(JSON.stringify((result as ExecutionResult).data)), {
    events: {
      cursor: 'c',
      message: {
        id: encodeId('Message', message.id),
        content: 'hi',
        createdAt: '1970-01-01T00:00:00.000Z',
        author: { id: encodeId('User', message.authorId), username: 'ann' },
      },
    },
  });
});
