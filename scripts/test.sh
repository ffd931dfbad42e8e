#!/usr/bin/env bash
# The one test command (npm test): type-check, lint, schema drift, then the suite twice:
# on embedded PGlite, and on the local PostgreSQL + Redis.
set -euo pipefail
cd "$(dirname "$0")/.."
echo "== typecheck"; npx tsc --noEmit
echo "== lint"; npx biome check .
echo "== schema drift"; npx tsx scripts/print-schema.ts --check
files=(${TEST_FILES:-test/*.test.ts})
# --test-timeout bounds each test and each file as a whole: at load 20+ a heavy realtime file
# (realtime-access, -catchup, -transport) passed 120 s with every test in it passing.
echo "== suite on PGlite (embedded)"
BANTER_TEST_DB=pglite node --import tsx --test --test-concurrency=2 --test-timeout=240000 "${files[@]}"
echo "== suite on PostgreSQL + Redis"
BANTER_TEST_DB=postgres node --import tsx --test --test-concurrency=2 --test-timeout=240000 "${files[@]}"
