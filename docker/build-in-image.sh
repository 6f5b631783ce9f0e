#!/usr/bin/env bash
# Every command the Dockerfile runs, in one script, so the same steps can be checked on a plain
# Debian 12 machine without a Docker engine (tests/deploy/docker_build_steps_test.sh).
#
#   build-in-image.sh build-deps                 apt packages to build (+ CUDA toolkit when SKV_WITH_CUDA=ON)
#   build-in-image.sh build SRC BUILD STAGE      configure + compile + stage (what the Dockerfile runs)
#   build-in-image.sh configure SRC BUILD        the CMake configure line of the image
#   build-in-image.sh compile BUILD              build spectrumkvd and skvctl
#   build-in-image.sh stage SRC BUILD STAGE      binaries, health check, config (+ non-Debian libs) under STAGE
#   build-in-image.sh runtime-deps               apt packages the staged binaries need at run time
#   build-in-image.sh create-user                the non-root user the runtime image runs as
#   build-in-image.sh print-packages build|runtime
#
# Environment: SKV_WITH_CUDA=OFF|ON (default OFF), CUDA_VERSION=12.8 (NVIDIA's Debian 12 repository),
# CUDA_ARCHITECTURES="80;90", SKV_APT_DRY_RUN=1 (resolve packages with `apt-get -s` only).
set -euo pipefail

SKV_WITH_CUDA=${SKV_WITH_CUDA:-OFF}
CUDA_VERSION=${CUDA_VERSION:-12.8}
CUDA_ARCHITECTURES=${CUDA_ARCHITECTURES:-80;90}
SKV_UID=${SKV_UID:-10001}

# Same list as DESIGN section 9 / scripts/setup-debian.sh, minus test and benchmark-only packages.
BUILD_PACKAGES=(
  build-essential cmake ninja-build pkg-config ca-certificates
  libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler
  libucx-dev libspdlog-dev libabsl-dev prometheus-cpp-dev libzstd-dev
)
# What `ldd spectrumkvd` resolves to on Debian 12 (the test checks that this list covers it; libucx0
# also holds UCX's dlopen'ed transport modules), python3-grpcio for the health check, tini as PID 1.
RUNTIME_PACKAGES=(
  ca-certificates tini python3 python3-grpcio
  libgrpc++1.51 libgrpc29 libprotobuf32 libucx0 libspdlog1.10 libfmt9
  libprometheus-cpp-core1.0 libprometheus-cpp-pull1.0
  libabsl20220623 libssl3 libc-ares2 libre2-9 zlib1g libzstd1 libnuma1 libstdc++6 libgcc-s1
)

apt_install() {
  export DEBIAN_FRONTEND=noninteractive
  if [[ ${SKV_APT_DRY_RUN:-0} == 1 ]]; then
    # Simulation: proves every package (and its dependencies) resolves on this Debian release.
    apt-get -s install --no-install-recommends "$@" >/dev/null
    return
  fi
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "$@"
}

cuda_repo() {
  # NVIDIA's Debian 12 repository provides nvcc and cudart as ordinary Debian packages.
  apt_install ca-certificates curl
  curl -fsSL -o /tmp/cuda-keyring.deb \
    https://developer.download.nvidia.com/compute/cuda/repos/debian12/x86_64/cuda-keyring_1.1-1_all.deb
  dpkg -i /tmp/cuda-keyring.deb
  rm -f /tmp/cuda-keyring.deb
}

cmd=${1:-}
case "$cmd" in
  print-packages)
    case "${2:-}" in
      build) echo "${BUILD_PACKAGES[*]}" ;;
      runtime) echo "${RUNTIME_PACKAGES[*]}" ;;
      *) echo "usage: $0 print-packages build|runtime" >&2; exit 2 ;;
    esac
    ;;

  build-deps)
    apt_install "${BUILD_PACKAGES[@]}"
    if [[ $SKV_WITH_CUDA == ON ]]; then
      cuda_repo
      apt_install "cuda-nvcc-${CUDA_VERSION/./-}" "cuda-cudart-dev-${CUDA_VERSION/./-}"
    fi
    [[ ${SKV_APT_DRY_RUN:-0} == 1 ]] || rm -rf /var/lib/apt/lists/*
    ;;

  configure)
    src=${2:?source dir}; build=${3:?build dir}
    cuda_args=()
    if [[ $SKV_WITH_CUDA == ON ]]; then
      # NVIDIA's packages install into /usr/local/cuda-X.Y; /usr/local/cuda may point elsewhere.
      nvcc=/usr/local/cuda-$CUDA_VERSION/bin/nvcc
      [[ -x $nvcc ]] || nvcc=/usr/local/cuda/bin/nvcc
      cuda_args=("-DCMAKE_CUDA_COMPILER=$nvcc" "-DCMAKE_CUDA_ARCHITECTURES=$CUDA_ARCHITECTURES")
    fi
    # The image needs the daemon and the CLI only: no tests, benchmarks or reference engine.
    # SKV_WERROR off: a newer compiler's new warning must not break an image build.
    cmake -S "$src" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
      "-DSKV_WITH_CUDA=$SKV_WITH_CUDA" -DSKV_BUILD_TESTS=OFF -DSKV_BUILD_BENCH=OFF \
      -DSKV_BUILD_ENGINE=OFF -DSKV_WERROR=OFF "${cuda_args[@]}"
    ;;

  compile)
    build=${2:?build dir}
    cmake --build "$build" --target spectrumkvd skvctl -j "$(nproc)"
    ;;

  stage)
    src=${2:?source dir}; build=${3:?build dir}; stage=${4:?stage dir}
    mkdir -p "$stage/bin" "$stage/lib" "$stage/etc"
    install -m 0755 "$build/bin/spectrumkvd" "$build/bin/skvctl" "$stage/bin/"
    install -m 0755 "$src/docker/grpc-health-check.py" "$stage/bin/skv-health-check"
    install -m 0644 "$src/docker/spectrumkvd.conf" "$stage/etc/spectrumkvd.conf"
    # Shared libraries from outside Debian's packages (CUDA's cudart under /usr/local) travel
    # with the binaries; everything else comes from RUNTIME_PACKAGES.
    ldd "$stage/bin/spectrumkvd" | awk '$3 ~ /^\/usr\/local\// {print $3}' | sort -u |
      while read -r lib; do cp -L "$lib" "$stage/lib/"; done
    ;;

  build)
    bash "$0" configure "${2:?source dir}" "${3:?build dir}"
    bash "$0" compile "$3"
    bash "$0" stage "$2" "$3" "${4:?stage dir}"
    ;;

  runtime-deps)
    apt_install "${RUNTIME_PACKAGES[@]}"
    [[ ${SKV_APT_DRY_RUN:-0} == 1 ]] || rm -rf /var/lib/apt/lists/*
    ;;

  create-user)
    # A fixed uid so Kubernetes' runAsUser and file ownership agree.
    getent group spectrumkv >/dev/null || groupadd --system --gid "$SKV_UID" spectrumkv
    getent passwd spectrumkv >/dev/null ||
      useradd --system --uid "$SKV_UID" --gid spectrumkv --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin spectrumkv
    ;;

  *)
    sed -n '2,15p' "$0" >&2
    exit 2
    ;;
esac
