#!/usr/bin/env bash
# The one test command (npm test): type-check, lint, schema drift, then the suite twice:
# on embedded PGlite, and on the local PostgreSQL + Redis.
set -euo pipefail
cd "$(dirname "$0")/.."
echo "== typecheck"; npx tsc --noEmit
echo "== lint"; npx biome check .
echo "== schema drift"; npx tsx scripts/print-schema.ts --check
files=(${TEST_FILES:-test/*.test.ts})
echo "== suite on PGlite (embedded)"
BANTER_TEST_DB=pglite node --import tsx --test --test-concurrency=2 --test-timeout=120000 "${files[@]}"
echo "== suite on PostgreSQL + Redis"
BANTER_TEST_DB=postgres node --import tsx --test --test-concurrency=2 --test-timeout=120000 "${files[@]}"
