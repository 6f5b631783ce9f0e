#!/usr/bin/env bash
# Compiles the CUDA implementation (kernels, launchers, their tests and the daemon's CUDA device,
# server/device) in a Release build with warnings as errors, so that device code cannot rot while
# the CPU build and its tests pass. Runs nothing on a GPU. Skips (exit 0, with a message) where no
# nvcc is installed: CUDA is optional.
# Usage: scripts/check-cuda-build.sh [build dir, default build-cuda-release]
set -euo pipefail
cd "$(dirname "$0")/.."
build=${1:-build-cuda-release}
if ! command -v nvcc >/dev/null && [ ! -x /usr/local/cuda/bin/nvcc ]; then
  echo "check-cuda-build: SKIPPED: no nvcc (PATH or /usr/local/cuda/bin)"
  exit 0
fi
cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DSKV_WITH_CUDA=ON >/dev/null
cmake --build "$build" -j "$(nproc)" --target skv_codec_cuda skv_device skv_codec_cuda_host_test \
  skv_codec_cuda_test skv-codec-bench
echo "check-cuda-build: the CUDA implementation compiles (Release, -Werror)"
