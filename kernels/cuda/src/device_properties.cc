// The CUDA-runtime half of launch_support.h (the rest, launch_support.cc, is plain C++).
#include <cuda_runtime_api.h>

#include <array>
#include <atomic>

#include "launch_support.h"

namespace skv::cuda::internal {

int MultiprocessorCount() {
  static std::array<std::atomic<int>, 64> cache{};
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) {
    (void)cudaGetLastError();
    return 1;
  }
  const bool cached = device >= 0 && device < int(cache.size());
  int count = cached ? cache[device].load(std::memory_order_relaxed) : 0;
  if (count > 0) return count;
  if (cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device) != cudaSuccess ||
      count <= 0) {
    (void)cudaGetLastError();
    return 1;
  }
  if (cached) cache[device].store(count, std::memory_order_relaxed);
  return count;
}

}  // namespace skv::cuda::internal
