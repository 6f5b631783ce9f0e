#!/usr/bin/env bash
# Lints docker/Dockerfile offline with dockerfile-utils (npm, installed by install-tools.sh), proves
# the linter rejects a broken Dockerfile, and cross-checks docker/compose.yaml (check-compose.js).
# Exit 77 (skip) without node or the npm tools.
# Usage: docker_files_test.sh SOURCE_DIR
set -euo pipefail
src=$1
lint=$src/tests/deploy/node_modules/.bin/dockerfile-utils
command -v node >/dev/null || { echo "SKIP: node not installed (apt-get install nodejs npm)"; exit 77; }
[[ -x $lint ]] || { echo "SKIP: npm tools missing: run tests/deploy/install-tools.sh"; exit 77; }
tmp=$(mktemp -d /tmp/skv-dockerlint.XXXXXX)
trap 'rm -rf "$tmp"' EXIT

out=$("$lint" lint "$src/docker/Dockerfile" 2>&1) || { echo "$out"; echo "FAIL: docker/Dockerfile has lint problems"; exit 1; }
[[ -z $out ]] || { echo "$out"; echo "FAIL: docker/Dockerfile has lint warnings"; exit 1; }
echo "ok   docker/Dockerfile: no lint problems"
printf 'FROM debian:12\nHEALTHCHECK CMD\nCOPY\n' >"$tmp/Dockerfile"
if "$lint" lint "$tmp/Dockerfile" >/dev/null 2>&1; then echo "FAIL: the linter accepted a broken Dockerfile"; exit 1; fi
echo "ok   the linter rejects a broken Dockerfile"
node "$src/tests/deploy/check-compose.js" "$src"
echo PASS
