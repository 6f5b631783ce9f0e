#!/usr/bin/env bash
# The GPU check, run on a GPU machine from the repository root with .gpu-bundle/ (made by
# scripts/gpu-bundle.sh on a Debian 12 build machine) next to it. Needs only the NVIDIA driver,
# glibc and python3: every other library comes from the bundle.
#
#   1. cuda_kernel_tests  skv_codec_cuda_test: the CUDA kernels bit for bit against the CPU
#                         reference (expect 963 tests, 0 skipped, 0 failed)
#   2. device_e2e         skv_device_path_e2e_test: two spectrumkvd processes move KV between
#                         cudaMalloc allocations exported by CUDA IPC; equal, byte for byte and in
#                         their Send statistics, to the same transfer through shared memory
#   3. codec_bench_cuda   skv-codec-bench --device cuda --json: encode and decode bandwidth against
#                         device-to-device copy, 32 layers x 8 KV heads x 128 dims at 1K, 4K and
#                         8K tokens (targets at 4K: encode >= 0.7x, decode >= 0.8x of the copy)
#
# Every step runs (each under a timeout), whatever the others did. Output goes to
# ${OUT:-gpu-results}/: cuda_kernel_tests.txt, device_e2e.txt, codec_bench_cuda.json (+ its
# stderr in codec_bench_cuda.log) and summary.txt, one line per step: PASS, FAIL or SKIP (no CUDA
# device) with the wall seconds. Exit status: 0 when no step failed (skips are not failures), 1
# otherwise.
# Timeouts (seconds): SKV_KERNEL_TESTS_TIMEOUT (120), SKV_E2E_TIMEOUT (90), SKV_BENCH_TIMEOUT (120):
# at most about 5.5 minutes however it goes.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
root=$PWD
bundle=$root/.gpu-bundle
out=${OUT:-gpu-results}
mkdir -p "$out"
out=$(cd "$out" && pwd)
summary=$out/summary.txt
expected_kernel_tests=963

if [ ! -x "$bundle/bin/spectrumkvd" ]; then
  echo "gpu-check: $bundle/bin/spectrumkvd is missing: make the bundle with scripts/gpu-bundle.sh" \
    "on the build machine and carry .gpu-bundle/" | tee "$summary" >&2
  exit 1
fi
export LD_LIBRARY_PATH=$bundle/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export UCX_MODULE_DIR=$bundle/lib/ucx
export SKV_DAEMON_BINARY=$bundle/bin/spectrumkvd  # the e2e test's daemons (daemon_process.h)

{
  echo "SpectrumKV GPU check, $(date -u +%Y-%m-%dT%H:%M:%SZ), host $(hostname)"
  echo "os: $(. /etc/os-release 2>/dev/null && echo "$PRETTY_NAME"), glibc $(getconf GNU_LIBC_VERSION 2>/dev/null | cut -d' ' -f2)"
  echo "bundle: $(sed -n 2p "$bundle/MANIFEST.txt" 2>/dev/null)"
  echo "nvidia-smi -L:"
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi -L 2>&1 | sed 's/^/  /'
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null |
      sed 's/^/  /'
  else
    echo "  (nvidia-smi not found)"
  fi
  echo
} | tee "$summary"

failed=0
# record NAME STATUS SECONDS DETAIL
record() {
  local line
  line=$(printf '%-18s %-4s %7.1f s  %s' "$1" "$2" "$3" "$4")
  echo "$line" | tee -a "$summary"
  [ "$2" = FAIL ] && failed=1
  return 0
}
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

# A gtest binary's outcome from its rc and output: PASS, FAIL, or SKIP when every test skipped.
gtest_status() {
  local rc=$1 file=$2 ran skipped failed_tests
  ran=$(grep -oE '^\[==========\] [0-9]+ tests? from' "$file" | grep -oE '[0-9]+' | head -1)
  skipped=$(grep -oE '^\[  SKIPPED \] [0-9]+ test' "$file" | grep -oE '[0-9]+' | head -1)
  failed_tests=$(grep -oE '^\[  FAILED  \] [0-9]+ test' "$file" | grep -oE '[0-9]+' | head -1)
  ran=${ran:-0} skipped=${skipped:-0} failed_tests=${failed_tests:-0}
  local detail="rc $rc; $ran tests, $((ran - skipped - failed_tests)) passed, $skipped skipped, $failed_tests failed"
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
    echo "FAIL|$detail (timed out)"
  elif [ "$rc" != 0 ] || [ "$ran" = 0 ]; then
    echo "FAIL|$detail"
  elif [ "$skipped" = "$ran" ]; then
    local why
    why=$(grep -m1 -oE 'no CUDA device[^"]*|cudaGetDeviceCount[^"]*' "$file" | head -1)
    echo "SKIP|$detail${why:+ ($why)}"
  elif [ "$skipped" != 0 ]; then
    echo "FAIL|$detail (some skipped: a partial run)"
  else
    echo "PASS|$detail"
  fi
}

# 1. The kernels against the reference.
echo "== 1/3 skv_codec_cuda_test ==" >&2
t0=$(now)
timeout -k 10 "${SKV_KERNEL_TESTS_TIMEOUT:-120}" "$bundle/bin/skv_codec_cuda_test" \
  --gtest_brief=1 --gtest_color=no >"$out/cuda_kernel_tests.txt" 2>&1
rc=$?
IFS='|' read -r status detail < <(gtest_status "$rc" "$out/cuda_kernel_tests.txt")
total=$(grep -oE '^\[==========\] [0-9]+ tests? from' "$out/cuda_kernel_tests.txt" | grep -oE '[0-9]+' | head -1)
if [ -n "$total" ] && [ "$total" != "$expected_kernel_tests" ]; then
  detail="$detail; NOTE: expected $expected_kernel_tests tests"
fi
record cuda_kernel_tests "$status" "$(elapsed "$t0")" "$detail"

# 2. The daemon's device path end to end.
echo "== 2/3 skv_device_path_e2e_test ==" >&2
t0=$(now)
timeout -k 10 "${SKV_E2E_TIMEOUT:-90}" "$bundle/bin/skv_device_path_e2e_test" --gtest_color=no \
  >"$out/device_e2e.txt" 2>&1
rc=$?
IFS='|' read -r status detail < <(gtest_status "$rc" "$out/device_e2e.txt")
record device_e2e "$status" "$(elapsed "$t0")" "$detail"

# 3. Bandwidth: encode / decode against device-to-device copy.
echo "== 3/3 skv-codec-bench --device cuda --json ==" >&2
t0=$(now)
timeout -k 10 "${SKV_BENCH_TIMEOUT:-120}" "$bundle/bin/skv-codec-bench" --device cuda --json \
  >"$out/codec_bench_cuda.json" 2>"$out/codec_bench_cuda.log"
rc=$?
seconds=$(elapsed "$t0")
if [ "$rc" = 0 ]; then
  # Ratios at 4096 tokens against the targets (reported; the targets do not decide PASS).
  detail=$(python3 - "$out/codec_bench_cuda.json" <<'EOF' 2>&1
import json, sys
d = json.load(open(sys.argv[1]))
rows = sorted((r for r in d["results"] if r["tokens"] == 4096), key=lambda r: r["budget"])
verified = "yes" if all(r["verified"] is not False for r in d["results"]) else "NO"
if not rows:
    print(f'{d["device"]}; no 4096-token results; verified {verified}')
    sys.exit(0)
budgets = ",".join(f'{r["budget"]:g}' for r in rows)
enc = " ".join(f'{r["encode_vs_copy"]:.2f}' for r in rows)
dec = " ".join(f'{r["decode_vs_copy"]:.2f}' for r in rows)
met = lambda key, t: "met" if all(r[key] >= t for r in rows) else "NOT met"
print(f'{d["device"]}; 4K tokens, b={budgets}: encode/copy {enc}, decode/copy {dec}; '
      f'targets: encode >= 0.7 {met("encode_vs_copy", 0.7)}, decode >= 0.8 '
      f'{met("decode_vs_copy", 0.8)}; copy {rows[0]["copy_gbps"]:.0f} GB/s; verified {verified}')
EOF
)
  record codec_bench_cuda PASS "$seconds" "rc 0; $detail"
elif [ "$rc" = 2 ] && grep -q 'no CUDA device' "$out/codec_bench_cuda.log"; then
  record codec_bench_cuda SKIP "$seconds" "rc 2; $(grep -m1 'no CUDA device' "$out/codec_bench_cuda.log" | sed 's/^skv-codec-bench-cuda: //')"
elif [ "$rc" = 3 ]; then
  record codec_bench_cuda FAIL "$seconds" "rc 3; a result differs from the CPU reference (see codec_bench_cuda.log)"
elif [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
  record codec_bench_cuda FAIL "$seconds" "rc $rc; timed out"
else
  record codec_bench_cuda FAIL "$seconds" "rc $rc; $(tail -1 "$out/codec_bench_cuda.log")"
fi

echo | tee -a "$summary" >/dev/null
if [ "$failed" = 0 ]; then
  echo "gpu-check: no step failed; results in $out/" | tee -a "$summary"
else
  echo "gpu-check: FAILED (see the steps above); results in $out/" | tee -a "$summary"
fi
exit "$failed"
