// CUDA errors as absl::Status, carrying the failing expression and file:line (as Mooncake TENT's
// CHECK_CUDA does), and a probe for a usable device.
#pragma once

#include <cuda_runtime_api.h>

#include "absl/status/status.h"

namespace skv::cuda {

// The Status for a failed CUDA call: the code follows the error (allocation -> ResourceExhausted,
// invalid value -> InvalidArgument, no device/driver -> Unavailable, else Internal); the message
// names the error, the expression and where it was evaluated.
absl::Status CudaErrorStatus(cudaError_t error, const char* expression, const char* file, int line);

// True when the CUDA runtime sees at least one device. Never crashes or leaves a sticky error
// behind on a machine without a GPU or driver.
bool CudaDeviceAvailable();

}  // namespace skv::cuda

// Evaluates a cudaError_t expression; on failure returns its Status from the enclosing function.
#define SKV_CUDA_RETURN_IF_ERROR(expr)                                                 \
  do {                                                                                 \
    const cudaError_t skv_cuda_error_ = (expr);                                        \
    if (skv_cuda_error_ != cudaSuccess) {                                              \
      return ::skv::cuda::CudaErrorStatus(skv_cuda_error_, #expr, __FILE__, __LINE__); \
    }                                                                                  \
  } while (0)

// After a <<<...>>> launch: the launch's own error (bad configuration, no kernel image for this
// GPU) as a Status naming the kernel (a string literal).
#define SKV_CUDA_RETURN_IF_LAUNCH_FAILED(kernel_name)                                          \
  do {                                                                                         \
    const cudaError_t skv_cuda_error_ = cudaGetLastError();                                    \
    if (skv_cuda_error_ != cudaSuccess) {                                                      \
      return ::skv::cuda::CudaErrorStatus(skv_cuda_error_, "launch of " kernel_name, __FILE__, \
                                          __LINE__);                                           \
    }                                                                                          \
  } while (0)
