#!/usr/bin/env bash
# Builds, on this Debian 12 machine (the project's packages and nvcc installed), what the GPU
# check needs, and packs it with every shared library it loads into .gpu-bundle/, so that
# scripts/gpu-check.sh can run it on a GPU machine that has none of the Debian packages (no gRPC,
# protobuf, abseil, UCX, spdlog, gtest or prometheus-cpp libraries; only glibc, the NVIDIA driver
# and python3). Carry .gpu-bundle/ (ignored by git) to that machine and run scripts/gpu-check.sh
# from the repository root there.
#
#   .gpu-bundle/bin/      spectrumkvd, skv_codec_cuda_test, skv_device_path_e2e_test,
#                         skv-codec-bench, skv-codec-bench-cuda (stripped)
#   .gpu-bundle/lib/      every library they need but glibc's (libc, libm, libpthread, libdl, librt,
#                         ld-linux, ...) and the driver's (libcuda, libnvidia-*), resolved with ldd
#   .gpu-bundle/lib/ucx/  UCX's transport modules (dlopen'ed by UCX from UCX_MODULE_DIR, so ldd
#                         does not list them), named as UCX opens them (libuct_ib.so.0, ...);
#                         their own dependencies go to lib/
#   .gpu-bundle/MANIFEST.txt  commit, build settings, newest glibc symbol version needed, sizes
#
# The binaries keep their RUNPATH (CUDA's lib folder); LD_LIBRARY_PATH=.gpu-bundle/lib comes first.
# Fails when the bundle is over 60 MiB (the device machine takes 64 MiB of carried files).
# Usage: scripts/gpu-bundle.sh [build dir, default build-gpu]
#   SKV_GPU_ARCHS     CUDA architectures of the kernels (CMAKE_CUDA_ARCHITECTURES). Default 90:
#                     SASS and PTX for sm_90, what the lent machines are (H100, H200). The project's
#                     own default, "80;90", doubles the kernels in each of the three binaries that
#                     carry them, which puts the bundle over the limit.
set -euo pipefail
cd "$(dirname "$0")/.."
build=${1:-build-gpu}
bundle=.gpu-bundle
limit_mib=60
targets=(spectrumkvd skv_codec_cuda_test skv_device_path_e2e_test skv-codec-bench
  skv-codec-bench-cuda)

nvcc=$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)
if [ ! -x "$nvcc" ]; then
  echo "gpu-bundle: no nvcc (PATH or /usr/local/cuda/bin): the bundle needs a CUDA build" >&2
  exit 1
fi
for tool in ldd strip readelf; do
  command -v "$tool" >/dev/null || { echo "gpu-bundle: $tool is missing" >&2; exit 1; }
done

cuda_archs=${SKV_GPU_ARCHS:-90}
echo "== configure $build (Release, SKV_WITH_CUDA=ON, benchmarks on, CUDA archs $cuda_archs) =="
cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DSKV_WITH_CUDA=ON \
  -DSKV_BUILD_SERVER=ON -DSKV_BUILD_TESTS=ON -DSKV_BUILD_BENCH=ON -DSKV_BUILD_ENGINE=OFF \
  -DCMAKE_CUDA_ARCHITECTURES="$cuda_archs" >/dev/null
echo "== build ${targets[*]} =="
cmake --build "$build" -j "$(nproc)" --target "${targets[@]}"

rm -rf "$bundle"
mkdir -p "$bundle/bin" "$bundle/lib/ucx"
for t in "${targets[@]}"; do
  cp "$build/bin/$t" "$bundle/bin/"
done
ucx_dir=/usr/lib/x86_64-linux-gnu/ucx
ucx_modules=()
if [ -d "$ucx_dir" ]; then
  # UCX dlopens <module dir>/libuct_ib<ext>, <ext> being the suffix of the libucs it was loaded
  # from (".so.0" for libucs.so.0): each module goes in under that name, as a plain file (the
  # device machine's file transfer drops symbolic links).
  ucs=$(LD_LIBRARY_PATH="" ldd "$bundle/bin/spectrumkvd" | grep -o 'libucs\.so[.0-9]*' | head -1)
  ext=${ucs#libucs}
  for m in "$ucx_dir"/*.so; do
    cp -L "$m" "$bundle/lib/ucx/$(basename "$m" .so)$ext"
    ucx_modules+=("$bundle/lib/ucx/$(basename "$m" .so)$ext")
  done
else
  echo "gpu-bundle: WARNING: $ucx_dir is missing; no UCX transport modules bundled" >&2
fi

# glibc's own libraries come from the GPU machine (a newer glibc than Debian 12's 2.36 runs these
# binaries; an older libc with a copied libpthread or libresolv does not), as does the driver.
system_lib='^(linux-vdso\.so|linux-gate\.so|ld-linux|libc\.so|libm\.so|libmvec\.so|libpthread\.so|libdl\.so|librt\.so|libresolv\.so|libutil\.so|libanl\.so|libnsl\.so|libBrokenLocale\.so|libthread_db\.so|libnss_|libcuda\.so|libnvidia-)'
declare -A copied=()
missing=0
for f in "${targets[@]/#/$bundle/bin/}" "${ucx_modules[@]}"; do
  while read -r name arrow path _; do
    [ -z "$name" ] && continue
    [[ $name =~ $system_lib ]] && continue
    if [ "$arrow" != "=>" ] || [ "$path" = "not" ]; then
      [[ $name == /* ]] && continue  # the loader itself, listed by path
      echo "gpu-bundle: $f: $name not found" >&2
      missing=1
      continue
    fi
    if [ -z "${copied[$name]:-}" ]; then
      cp -L "$path" "$bundle/lib/$name"
      copied[$name]=$path
    fi
  done < <(LD_LIBRARY_PATH="" ldd "$f")
done
[ "$missing" = 0 ] || { echo "gpu-bundle: unresolved libraries (above)" >&2; exit 1; }

chmod -R u+w "$bundle"
strip --strip-unneeded "$bundle"/bin/* "$bundle"/lib/*.so* "$bundle"/lib/ucx/*.so*

# Newest glibc symbol version any bundled file needs: the GPU machine's glibc must be at least it.
glibc_needed=$(for f in "$bundle"/bin/* "$bundle"/lib/*.so* "$bundle"/lib/ucx/*.so*; do
  readelf -V --wide "$f" 2>/dev/null | grep -o 'GLIBC_2\.[0-9]*' || true
done | sort -t. -k2 -n -u | tail -1)
{
  echo "SpectrumKV GPU bundle, made by scripts/gpu-bundle.sh"
  if commit=$(git rev-parse HEAD 2>/dev/null); then
    git diff --quiet HEAD 2>/dev/null || commit="$commit (plus uncommitted changes)"
  else
    commit=unknown
  fi
  echo "commit: $commit"
  echo "made: $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(. /etc/os-release && echo "$PRETTY_NAME")"
  echo "build: $build, Release, SKV_WITH_CUDA=ON, CUDA archs $cuda_archs, $("$nvcc" --version | tail -1)"
  echo "needs: glibc >= ${glibc_needed#GLIBC_}, an NVIDIA driver for CUDA $("$nvcc" --version | grep -o 'release [0-9.]*' | cut -d' ' -f2) or newer, x86-64"
  echo "run: scripts/gpu-check.sh (from the repository root)"
  echo
  (cd "$bundle" && find bin lib -type f -printf '%10s  %p\n' | sort -k2)
} >"$bundle/MANIFEST.txt"

bytes=$(du -sb "$bundle" | cut -f1)
mib=$(awk -v b="$bytes" 'BEGIN { printf "%.1f", b / 1048576 }')
echo "== $bundle: $(find "$bundle/bin" -type f | wc -l) binaries, $(find "$bundle/lib" -maxdepth 1 -type f | wc -l) libraries, $(find "$bundle/lib/ucx" -type f | wc -l) UCX modules; needs glibc >= ${glibc_needed#GLIBC_} =="
du -sh "$bundle/bin" "$bundle/lib"
echo "gpu-bundle: $bundle is $mib MiB ($bytes bytes; limit $limit_mib MiB)"
if ((bytes > limit_mib * 1048576)); then
  echo "gpu-bundle: FAIL: over $limit_mib MiB (try SKV_GPU_ARCHS=90)" >&2
  exit 1
fi
