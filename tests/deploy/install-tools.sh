#!/usr/bin/env bash
# Installs the npm tools of the offline deploy checks into tests/deploy/node_modules (gitignored),
# pinned by package-lock.json. Needs node and npm (scripts/setup-debian.sh installs them).
# Safe to re-run: skips npm when node_modules was installed from the same lock file.
set -euo pipefail
cd "$(dirname "$0")"
if ! command -v npm >/dev/null || ! command -v node >/dev/null; then
  echo "install-tools: node/npm not found (apt-get install nodejs npm); the deploy checks will skip" >&2
  exit 0
fi
stamp=node_modules/.skv-lock.sha256
want=$(sha256sum package-lock.json | cut -d' ' -f1)
if [[ -f $stamp && $(cat "$stamp") == "$want" ]]; then
  echo "install-tools: tests/deploy/node_modules is up to date"
  exit 0
fi
npm ci --no-audit --no-fund --loglevel=error
echo "$want" >"$stamp"
