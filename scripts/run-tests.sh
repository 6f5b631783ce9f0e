#!/usr/bin/env bash
# Installs dependencies (Debian 12), builds everything CPU-only and runs every test.
# Usage: scripts/run-tests.sh [extra ctest args]
set -euo pipefail
cd "$(dirname "$0")/.."

./scripts/setup-debian.sh
cmake --preset cpu >/dev/null
cmake --build --preset cpu -j "$(nproc)"
ctest --preset cpu -j "$(nproc)" "$@"
