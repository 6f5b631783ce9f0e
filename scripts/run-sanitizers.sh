#!/usr/bin/env bash
# The test suite under the sanitizers (CI runs both, before scripts/run-tests.sh).
# asan: every test under AddressSanitizer + UBSan (build-asan/, -O0) but the deployment-file checks
# (they inspect what an image would ship, and an ASan binary ships libasan) and the CUDA-emulation
# tests (20-80 s each at -O0 under ASan; they emulate the device kernels whose host paths the codec
# tests cover, and run in the plain build).
# tsan: the daemon, transport and integration tests under ThreadSanitizer (build-tsan/). Debian's
# gRPC, protobuf and abseil are not instrumented; tests/sanitizers/tsan.supp drops reports with a
# frame inside them (the transport's own lock is std::mutex-based so that TSan sees it).
# Any report fails the run (halt_on_error; a daemon started by a test exits and its test fails).
# Usage: scripts/run-sanitizers.sh [asan|tsan|both]   (default: both)
set -euo pipefail
cd "$(dirname "$0")/.."
which=${1:-both}

./scripts/setup-debian.sh
jobs=$(nproc)
# UCX replaces malloc hooks and maps memory behind the allocator's back; with the sanitizers'
# own allocators that only produces noise, so UCX's memory hooks stay off here.
export UCX_MEM_MALLOC_HOOKS=no UCX_MEM_EVENTS=no
export UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1

if [ "$which" != tsan ]; then
  export ASAN_OPTIONS=halt_on_error=1:detect_leaks=1:abort_on_error=0
  cmake --preset asan >/dev/null
  cmake --build --preset asan -j "$jobs"
  ctest --preset asan -j "$jobs" --timeout 600
fi
if [ "$which" != asan ]; then
  export TSAN_OPTIONS="halt_on_error=1:second_deadlock_stack=1:suppressions=$PWD/tests/sanitizers/tsan.supp"
  cmake --preset tsan >/dev/null
  cmake --build --preset tsan -j "$jobs"
  ctest --preset tsan -j "$jobs" --timeout 600
fi
