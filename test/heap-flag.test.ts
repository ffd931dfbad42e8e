/**
 * The heap flag api/main.ts sets at start (api/heap.ts), and that one given to node wins, in
 * either spelling V8 takes: a real node started with it, its process.execArgv as main.ts reads it.
 */
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { it } from 'node:test';
import { HEAP_GROWING_FLAG, heapGrowingFlag } from '../api/heap.ts';

/** What heapGrowingFlag says in a node started with `flags`. */
function inNodeWith(flags: string[]): string {
  const code = `import('./api/heap.ts').then((m) => console.log(String(m.heapGrowingFlag(process.execArgv))))`;
  return execFileSync(process.execPath, [...flags, '--import', 'tsx', '-e', code], {
    encoding: 'utf8',
  }).trim();
}

it('sets --heap-growing-percent=100 when node was not given the flag', () => {
  assert.equal(inNodeWith([]), HEAP_GROWING_FLAG);
  assert.equal(heapGrowingFlag(['--max-old-space-size=512']), HEAP_GROWING_FLAG);
});

it('leaves a --heap-growing-percent given to node alone, in either spelling V8 takes (- or _)', () => {
  for (const flag of [
    '--heap-growing-percent=30',
    '--heap_growing_percent=30',
    '--heap-growing_percent=30',
  ]) {
    assert.equal(inNodeWith([flag]), 'undefined', flag);
  }
});
