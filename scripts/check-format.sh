#!/usr/bin/env bash
# Formatting check, run by ctest as `format` (so CI runs it): every tracked C++/CUDA source
# against the repository's .clang-format (clang-format 14, Debian 12's), every tracked Python
# file with pyflakes. Exit 77 (ctest: skipped) when a tool is missing.
# Usage: scripts/check-format.sh          check, list what differs
#        scripts/check-format.sh --fix    rewrite the C++/CUDA sources in place
set -euo pipefail
cd "$(dirname "$0")/.."

for tool in clang-format pyflakes3; do
  command -v "$tool" >/dev/null || { echo "SKIP: $tool is not installed (scripts/setup-debian.sh installs it)"; exit 77; }
done
if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  mapfile -t cxx < <(git ls-files '*.cc' '*.h' '*.cu' '*.cuh')
  mapfile -t python < <(git ls-files '*.py')
else
  mapfile -t cxx < <(find . -path ./build\* -prune -o \( -name '*.cc' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh' \) -print)
  mapfile -t python < <(find . -path ./build\* -prune -o -name '*.py' -print)
fi

if [[ ${1:-} == --fix ]]; then
  clang-format -i "${cxx[@]}"
  echo "formatted ${#cxx[@]} files"
  exit 0
fi

differ=()
for f in "${cxx[@]}"; do
  clang-format --dry-run -Werror "$f" >/dev/null 2>&1 || differ+=("$f")
done
status=0
if ((${#differ[@]})); then
  echo "FAIL: ${#differ[@]} of ${#cxx[@]} C++/CUDA files differ from .clang-format (fix: scripts/check-format.sh --fix):"
  printf '  %s\n' "${differ[@]}"
  status=1
else
  echo "ok   ${#cxx[@]} C++/CUDA files match .clang-format ($(clang-format --version | head -1))"
fi
if pyflakes3 "${python[@]}"; then
  echo "ok   ${#python[@]} Python files pass pyflakes"
else
  echo "FAIL: pyflakes reports the Python files above"
  status=1
fi
exit $status
