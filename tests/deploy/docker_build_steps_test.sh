#!/usr/bin/env bash
# Runs, on this Debian 12 machine, the steps of docker/Dockerfile that are safe here (no Docker
# engine is needed, none is available):
#   1. every RUN of the Dockerfile is a build-in-image.sh subcommand this test covers;
#   2. build-deps and runtime-deps: every apt package resolves on Debian 12 (`apt-get -s`), and the
#      build packages are installed here;
#   3. configure: the image's exact CMake configure line in a fresh directory, then `ninja -n` proves
#      spectrumkvd and skvctl are buildable targets of that configuration;
#   4. stage: from the binaries already built in BUILD_DIR (same sources; the image's compile step
#      itself is only run with SKV_DOCKER_FULL_BUILD=1, it takes minutes);
#   5. every shared library of the staged binaries comes from a runtime package or its dependencies;
#   6. the staged daemon runs as uid 10001 with the image's config, the image's HEALTHCHECK command
#      reports SERVING, and SIGTERM stops it.
#   (3b. with an nvcc under /usr/local/cuda-*: the SKV_WITH_CUDA=ON configure line as well.)
# Not run: the CUDA toolkit install from NVIDIA's repository (needs the network) and a CUDA compile.
# Usage: docker_build_steps_test.sh SOURCE_DIR BUILD_DIR
set -euo pipefail
src=$1 built=$2
script=$src/docker/build-in-image.sh
fail() { echo "FAIL: $*"; exit 1; }

tmp=$(mktemp -d /tmp/skv-docker-steps.XXXXXX)
chmod 0755 "$tmp"  # the staged daemon runs as uid 10001
pid=""
cleanup() {
  if [[ -n $pid ]]; then kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; fi
  rm -rf "$tmp"
}
trap cleanup EXIT

# 1. RUN instructions.
mapfile -t runs < <(grep -E '^RUN ' "$src/docker/Dockerfile")
[[ ${#runs[@]} -ge 3 ]] || fail "expected RUN instructions in docker/Dockerfile"
for run in "${runs[@]}"; do
  mapfile -t parts < <(sed -e 's/^RUN //' -e 's/ *&& */\n/g' <<<"$run")
  for part in "${parts[@]}"; do
    read -r cmd sub _ <<<"$part"
    [[ $cmd == /usr/local/bin/build-in-image.sh ]] || fail "Dockerfile runs '$part', which this test does not cover"
    case $sub in build-deps | build | runtime-deps | create-user) ;; *) fail "unknown subcommand in '$part'" ;; esac
  done
done
echo "ok   ${#runs[@]} RUN instructions, all build-in-image.sh subcommands"

# 2. Packages.
apt-cache show cmake >/dev/null 2>&1 || fail "apt package lists are missing (run apt-get update)"
SKV_APT_DRY_RUN=1 bash "$script" build-deps || fail "build packages do not resolve on this release"
SKV_APT_DRY_RUN=1 bash "$script" runtime-deps || fail "runtime packages do not resolve on this release"
read -ra build_pkgs <<<"$(bash "$script" print-packages build)"
read -ra runtime_pkgs <<<"$(bash "$script" print-packages runtime)"
for p in "${build_pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" ||
    fail "build package $p is not installed here (scripts/setup-debian.sh installs the same set)"
done
echo "ok   ${#build_pkgs[@]} build and ${#runtime_pkgs[@]} runtime packages resolve (apt-get -s)"

# 3. Configure exactly as the image does.
bash "$script" configure "$src" "$tmp/build" >"$tmp/configure.log" 2>&1 ||
  { tail -30 "$tmp/configure.log"; fail "the image's CMake configure failed"; }
ninja -C "$tmp/build" -n spectrumkvd skvctl >/dev/null || fail "spectrumkvd/skvctl are not targets of the image's configuration"
echo "ok   configure (SKV_WITH_CUDA=OFF, no tests/bench/engine) and build graph for spectrumkvd, skvctl"
# The CUDA variant's configure line (SKV_WITH_CUDA=ON), when this machine has an nvcc.
nvcc=$(ls -d /usr/local/cuda-*/bin/nvcc 2>/dev/null | sort -V | tail -1 || true)
if [[ -n $nvcc ]]; then
  cuda_version=$(basename "$(dirname "$(dirname "$nvcc")")"); cuda_version=${cuda_version#cuda-}
  SKV_WITH_CUDA=ON CUDA_VERSION=$cuda_version bash "$script" configure "$src" "$tmp/build-cuda" >"$tmp/configure-cuda.log" 2>&1 ||
    { tail -30 "$tmp/configure-cuda.log"; fail "the image's CMake configure with SKV_WITH_CUDA=ON failed"; }
  grep -q 'CUDA kernels enabled' "$tmp/configure-cuda.log" || fail "SKV_WITH_CUDA=ON configured without CUDA"
  ninja -C "$tmp/build-cuda" -n spectrumkvd skvctl >/dev/null || fail "no spectrumkvd/skvctl in the CUDA configuration"
  echo "ok   configure with SKV_WITH_CUDA=ON (nvcc $cuda_version): CUDA enabled, targets present"
else
  echo "note: no /usr/local/cuda-*/bin/nvcc here; the SKV_WITH_CUDA=ON configure line is not run"
fi
if [[ ${SKV_DOCKER_FULL_BUILD:-0} == 1 ]]; then
  bash "$script" compile "$tmp/build" || fail "the image's compile step failed"
  built=$tmp/build
  echo "ok   compile"
fi

# 4. Stage.
[[ -x $built/bin/spectrumkvd && -x $built/bin/skvctl ]] || fail "$built/bin has no spectrumkvd/skvctl (build them first)"
stage=$tmp/stage
bash "$script" stage "$src" "$built" "$stage"
for f in bin/spectrumkvd bin/skvctl bin/skv-health-check etc/spectrumkvd.conf; do
  [[ -f $stage/$f ]] || fail "stage lacks $f"
done
echo "ok   stage: $(cd "$stage" && find . -type f | sort | tr '\n' ' ')"

# 5. Runtime libraries: each comes from a runtime package or one of its dependencies.
mapfile -t closure < <(apt-cache depends --recurse --no-recommends --no-suggests --no-conflicts \
  --no-breaks --no-replaces --no-enhances "${runtime_pkgs[@]}" 2>/dev/null | grep -v '^ ' | sed 's/:.*//' | sort -u)
declare -A have=()
for p in "${closure[@]}"; do have[$p]=1; done
# One ldd and one dpkg -S for all libraries (dpkg -S is slow per call).
mapfile -t libs < <(for bin in spectrumkvd skvctl; do LD_LIBRARY_PATH=$stage/lib ldd "$stage/bin/$bin"; done |
  awk '/=> not found/ {print "NOTFOUND " $1; next} $3 ~ /^\// {print $3}' | sort -u)
for lib in "${libs[@]}"; do [[ $lib != NOTFOUND* ]] || fail "a staged binary needs ${lib#NOTFOUND }, which is not found"; done
declare -A owner=()
while IFS= read -r line; do
  pkg=${line%%: *}; path=${line#*: }
  owner[$path]=${pkg%%:*}
done < <(for lib in "${libs[@]}"; do echo "$lib"; readlink -f "$lib"; done | sort -u | xargs dpkg -S 2>/dev/null || true)
checked=0
for lib in "${libs[@]}"; do
  [[ $lib == "$stage/lib/"* ]] && continue  # carried in the image (non-Debian, e.g. cudart)
  pkg=${owner[$lib]:-${owner[$(readlink -f "$lib")]:-}}
  [[ -n $pkg ]] || fail "a staged binary needs $lib, which no Debian package provides"
  [[ -n ${have[$pkg]:-} ]] || fail "a staged binary needs $lib from package $pkg, not among the runtime packages or their dependencies"
  checked=$((checked + 1))
done
echo "ok   $checked shared libraries of the staged binaries are covered by the runtime packages"

# 6. Run the staged daemon like the image: uid 10001, the image's config, overrides by SKV_* env.
read -r grpc data metrics < <(/usr/bin/python3 -c '
import socket; s=[socket.socket() for _ in range(3)]
[x.bind(("127.0.0.1",0)) for x in s]; print(*[x.getsockname()[1] for x in s])')
echo "image-test-token" >"$tmp/token"
chmod 0644 "$tmp/token"
as_user=()
if [[ $(id -u) -eq 0 ]]; then as_user=(setpriv --reuid=10001 --regid=10001 --clear-groups); fi
env -i PATH="$stage/bin:/usr/bin:/bin" LD_LIBRARY_PATH="$stage/lib" SKV_CONFIG_FILE="$stage/etc/spectrumkvd.conf" \
  SKV_GRPC_LISTEN_ADDRESS="127.0.0.1:$grpc" SKV_DATA_LISTEN_ADDRESS="127.0.0.1:$data" \
  SKV_METRICS_LISTEN_ADDRESS="127.0.0.1:$metrics" SKV_AUTH_TOKEN_FILE="$tmp/token" SKV_DAEMON_ID=image-test \
  "${as_user[@]}" "$stage/bin/spectrumkvd" >"$tmp/daemon.log" 2>&1 &
pid=$!
healthy=0
for _ in $(seq 40); do
  if SKV_HEALTH_TARGET="127.0.0.1:$grpc" "$stage/bin/skv-health-check" --timeout=1 >"$tmp/health.out" 2>&1; then
    healthy=1; break
  fi
  kill -0 "$pid" 2>/dev/null || break
  sleep 0.25
done
[[ $healthy == 1 ]] || { cat "$tmp/daemon.log" "$tmp/health.out"; fail "the image's HEALTHCHECK never reported SERVING"; }
grep -q 'SERVING' "$tmp/health.out" || fail "unexpected health output: $(cat "$tmp/health.out")"
curl -fsS -o "$tmp/metrics.txt" "http://127.0.0.1:$metrics/metrics" || fail "no /metrics from the staged daemon"
grep -q '^spectrumkv_transfers_in_flight' "$tmp/metrics.txt" || fail "/metrics lacks spectrumkv_transfers_in_flight"
[[ ${#as_user[@]} -eq 0 ]] || [[ $(ps -o uid= -p "$pid" | tr -d ' ') == 10001 ]] || fail "daemon is not running as uid 10001"
echo "ok   staged daemon runs as uid $(ps -o uid= -p "$pid" | tr -d ' '), health check: $(cat "$tmp/health.out")"
kill -TERM "$pid"
for _ in $(seq 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
kill -0 "$pid" 2>/dev/null && fail "spectrumkvd did not stop within 10 s of SIGTERM"
rc=0; wait "$pid" || rc=$?; pid=""
[[ $rc == 0 ]] || fail "spectrumkvd exited with $rc after SIGTERM"
# The health check must fail when nothing serves.
if SKV_HEALTH_TARGET="127.0.0.1:$grpc" "$stage/bin/skv-health-check" --timeout=1 >/dev/null 2>&1; then
  fail "the health check passed with no daemon running"
fi
echo "ok   SIGTERM stops the daemon (exit 0); the health check fails without it"
echo "PASS"
