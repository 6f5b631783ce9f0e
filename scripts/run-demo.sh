#!/usr/bin/env bash
# Installs dependencies (Debian 12), builds, and runs the main job: the codec benchmark on a
# 7B-shaped layer set (until the daemon pair demo lands, this is what SpectrumKV runs).
set -euo pipefail
cd "$(dirname "$0")/.."

./scripts/setup-debian.sh
cmake --preset default >/dev/null
cmake --build --preset default -j "$(nproc)" --target skv-codec-bench
./build/bin/skv-codec-bench "$@"
