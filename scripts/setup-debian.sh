#!/usr/bin/env bash
# Installs every Debian 12 package SpectrumKV needs to build, test and benchmark.
# Safe to re-run: apt-get skips what is already installed.
set -euo pipefail

PACKAGES=(
  build-essential cmake ninja-build pkg-config git clang clang-format python3-pyflakes
  libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler
  libucx-dev ucx-utils libspdlog-dev libabsl-dev
  libgtest-dev libgmock-dev libbenchmark-dev prometheus-cpp-dev
  libopenblas-dev libzstd-dev libeigen3-dev
  python3 python3-grpcio python3-protobuf
  # The Python package and its engine connectors (tests/python): pip install into a venv, torch tensors.
  python3-venv python3-setuptools python3-torch
  iproute2 iperf3 prometheus curl openssl
)

# ---- Deployment checks (tests/deploy): node + npm run the offline validators (npm packages go to
# tests/deploy/node_modules via tests/deploy/install-tools.sh), kubectl renders the kustomizations
# (Debian 12 ships it as kubernetes-client), prometheus above brings promtool. Each is added only
# when its command is missing, so tools installed from elsewhere (e.g. NodeSource's nodejs, which
# bundles npm and conflicts with Debian's npm) are left alone.
command -v node >/dev/null || PACKAGES+=(nodejs)
command -v npm >/dev/null || PACKAGES+=(npm)
command -v kubectl >/dev/null || PACKAGES+=(kubernetes-client)
# deploy.podman_image builds docker/Dockerfile and runs it with rootful podman: runc as the OCI
# runtime (the test selects it), debootstrap for the Debian 12 base images. Rootless extras
# (uidmap, slirp4netns, fuse-overlayfs) are not needed: root, host network, native overlayfs.
PACKAGES+=(podman runc debootstrap)
# ---- end of deployment checks

SUDO=""
if [[ $(id -u) -ne 0 ]]; then SUDO="sudo"; fi

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [[ ${#missing[@]} -eq 0 ]]; then
  echo "setup-debian: all ${#PACKAGES[@]} packages already installed"
  exit 0
fi
echo "setup-debian: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
