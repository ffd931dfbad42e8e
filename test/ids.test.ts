import assert from 'node:assert/strict';
import { it } from 'node:test';
import { idAtTime, isUuid, newId, timeOfId } from '../core/ids.ts';

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
