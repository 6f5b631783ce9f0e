// Launcher of the importance kernels (importance_kernels.cuh).
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "absl/strings/str_cat.h"
#include "importance_kernels.cuh"
#include "launch_support.h"
#include "spectrumkv/codec/cuda/cuda_status.h"
#include "spectrumkv/codec/cuda/row_launchers.h"

namespace skv::cuda {
namespace {

using kernels::ImportanceParams;
using kernels::kThreads;
using kernels::kWarps;

size_t StatsBytes(uint32_t window, uint32_t query_heads) {
  return (size_t{window} * query_heads * sizeof(float2) + 255) / 256 * 256;
}

}  // namespace

size_t QueryImportanceWorkspaceBytes(uint32_t tokens, uint32_t window, uint32_t query_heads) {
  return StatsBytes(window, query_heads) + size_t{tokens} * sizeof(float);
}

absl::Status LaunchQueryImportance(const DeviceKvView& keys, const DeviceQueryWindow& queries,
                                   uint32_t pool_window, void* workspace, size_t workspace_bytes,
                                   float* scores, cudaStream_t stream) {
  if (absl::Status s = internal::CheckDeviceView(keys, "keys"); !s.ok()) return s;
  if (keys.tokens == 0) return absl::InvalidArgumentError("keys have no tokens");
  if (queries.data == nullptr || queries.window == 0 || queries.window > keys.tokens ||
      queries.head_dim != keys.head_dim || queries.query_heads == 0 ||
      queries.query_heads % keys.heads != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "query window (window=", queries.window, ", query_heads=", queries.query_heads,
        ", head_dim=", queries.head_dim, ") does not fit its keys (tokens=", keys.tokens,
        ", heads=", keys.heads, ", head_dim=", keys.head_dim, ")"));
  }
  if (pool_window % 2 == 0 || pool_window > 255) {
    return absl::InvalidArgumentError(
        absl::StrCat("pool_window must be odd and <= 255, got ", pool_window));
  }
  if (scores == nullptr || workspace == nullptr ||
      workspace_bytes <
          QueryImportanceWorkspaceBytes(keys.tokens, queries.window, queries.query_heads)) {
    return absl::InvalidArgumentError("scores and a large enough workspace are required");
  }
  if (uint64_t{queries.window} * queries.query_heads > INT32_MAX) {
    return absl::InvalidArgumentError("too many window queries");
  }
  ImportanceParams p{};
  p.keys = keys;
  p.queries = queries.data;
  p.window = queries.window;
  p.query_heads = queries.query_heads;
  p.group = queries.query_heads / keys.heads;
  p.inv_sqrt_d = 1.0f / std::sqrt(float(keys.head_dim));
  p.pool_radius = pool_window / 2;
  p.stats = static_cast<float2*>(workspace);
  p.raw = reinterpret_cast<float*>(static_cast<uint8_t*>(workspace) +
                                   StatsBytes(queries.window, queries.query_heads));
  p.scores = scores;

  const uint32_t queries_total = queries.window * queries.query_heads;
  const uint32_t token_blocks = (keys.tokens + kWarps - 1) / kWarps;
  if (keys.dtype == DType::kFp16) {
    kernels::SoftmaxStatsKernel<DType::kFp16><<<queries_total, kThreads, 0, stream>>>(p);
    SKV_CUDA_RETURN_IF_LAUNCH_FAILED("SoftmaxStatsKernel");
    kernels::AccumulateKernel<DType::kFp16><<<token_blocks, kThreads, 0, stream>>>(p);
    SKV_CUDA_RETURN_IF_LAUNCH_FAILED("AccumulateKernel");
  } else if (keys.dtype == DType::kBf16) {
    kernels::SoftmaxStatsKernel<DType::kBf16><<<queries_total, kThreads, 0, stream>>>(p);
    SKV_CUDA_RETURN_IF_LAUNCH_FAILED("SoftmaxStatsKernel");
    kernels::AccumulateKernel<DType::kBf16><<<token_blocks, kThreads, 0, stream>>>(p);
    SKV_CUDA_RETURN_IF_LAUNCH_FAILED("AccumulateKernel");
  } else {
    return absl::InvalidArgumentError(
        absl::StrCat("no importance kernel for dtype ", int(keys.dtype)));
  }
  kernels::MaxPoolKernel<ImportanceParams><<<(keys.tokens + 255) / 256, 256, 0, stream>>>(p);
  SKV_CUDA_RETURN_IF_LAUNCH_FAILED("MaxPoolKernel");
  return absl::OkStatus();
}

}  // namespace skv::cuda
