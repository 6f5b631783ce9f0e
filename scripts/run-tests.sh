#!/usr/bin/env bash
# Installs dependencies (Debian 12), builds everything CPU-only and runs every test.
# Usage: scripts/run-tests.sh [extra ctest args]
set -euo pipefail
cd "$(dirname "$0")/.."

./scripts/setup-debian.sh
# npm tools of the deploy checks (tests/deploy/node_modules); without them those tests skip.
./tests/deploy/install-tools.sh || echo "run-tests: tests/deploy/install-tools.sh failed; deploy checks that need npm tools will skip" >&2
cmake --preset cpu >/dev/null
cmake --build --preset cpu -j "$(nproc)"
ctest --preset cpu -j "$(nproc)" "$@"
