/**
 * The V8 heap's growth (api/main.ts): it may grow to twice what a full collection left live before
 * the next one (as Go's GOGC=100). V8 chose far less here (a limit of 95 MB for 72 MB live at 1,000
 * subscribers), and starts marking once the room left is under the young generation's size: paced
 * at 10 messages/s, a full collection ran every 2-6 s, its pause and marking steps (3-40 ms) in the
 * way of whatever message was being fanned out; with this, none in 20 s.
 */
export const HEAP_GROWING_FLAG = '--heap-growing-percent=100';

/**
 * HEAP_GROWING_FLAG, for setFlagsFromString at start; undefined when node was given the flag
 * itself (in `execArgv`), which wins. V8 takes `-` and `_` alike in a flag's name: its own
 * spelling, `--heap_growing_percent=30`, was overridden when only the dashed one was looked for.
 */
export function heapGrowingFlag(execArgv: readonly string[]): string | undefined {
  return execArgv.some((a) => /^--heap[-_]growing[-_]percent(=|$)/.test(a)) ? undefined : HEAP_GROWING_FLAG;
}
