/** Prints schema.graphql; with --check, fails when the committed file has drifted. */
import { readFileSync, writeFileSync } from 'node:fs';
import { lexicographicSortSchema, printSchema } from 'graphql';
import { buildSchema } from '../schema/index.ts';

const file = new URL('../schema.graphql', import.meta.url);
const sdl = `${printSchema(lexicographicSortSchema(buildSchema()))}\n`;
if (process.argv.includes('--check')) {
  let current = '';
  try {
    current = readFileSync(file, 'utf8');
  } catch {}
  if (current !== sdl) {
    console.error('schema.graphql is out of date: run `npm run schema:print` and commit it.');
    process.exit(1);
  }
  console.log('schema.graphql is up to date');
} else {
  writeFileSync(file, sdl);
  console.log('wrote schema.graphql');
}
