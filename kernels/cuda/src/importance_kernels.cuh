// Token importance kernels: observation-window queries (skv::ImportanceFromQueries, one layer).
// A hint for the planner, so it is matched within float tolerance, not bit for bit:
//   1. SoftmaxStatsKernel: per (window query, query head) the max logit over its causal prefix
//      and the sum of exp(logit - max) (online softmax; one block per query, a warp per key).
//   2. AccumulateKernel: per token, the sum of its softmax probability over every query that
//      sees it, recomputing the same logits (a warp per token: no atomics, deterministic).
//   3. MaxPoolKernel: the max over `pool_window` neighbours.
// Logits come from one function in both passes, so each probability is exp(x - max) <= 1.
//
// Kernels only, so tests/unit/cuda can also run them on the CPU under an emulation of CUDA threads.
#pragma once

#include <cmath>
#include <cstdint>

#include "device_primitives.cuh"
#include "spectrumkv/codec/codec_math.h"
#include "spectrumkv/codec/cuda/row_launchers.h"

namespace skv::cuda::kernels {

using detail::kFullWarp;
namespace m = ::skv::math;

inline constexpr uint32_t kWarps = 8;
inline constexpr uint32_t kThreads = kWarps * 32;
inline constexpr uint32_t kMaxChunksPerLane =
    kMaxHeadDim / 8 / 32;  // 8-value chunks of a head per lane

struct ImportanceParams {
  DeviceKvView keys;
  const float* queries;
  uint32_t window;
  uint32_t query_heads;
  uint32_t group;  // query heads per KV head
  float inv_sqrt_d;
  uint32_t pool_radius;
  float2* stats;  // [window * query_heads]: (max logit, sum of exp)
  float* raw;     // [tokens]
  float* scores;  // [tokens]
};

// This lane's share of one head of a key row: chunks lane, lane + 32, ... of 8 values.
template <DType kDtype>
__device__ __forceinline__ void LoadKeyHead(const ImportanceParams& p, uint32_t token,
                                            uint32_t kv_head, float (&k)[kMaxChunksPerLane][8]) {
  const uint32_t d = p.keys.head_dim;
  const uint8_t* row = detail::RowPointer(p.keys, token) + 2 * size_t{kv_head} * d;
  const uint32_t lane = threadIdx.x % 32;
#pragma unroll
  for (uint32_t j = 0; j < kMaxChunksPerLane; ++j) {
    const uint32_t chunk = lane + 32 * j;
    const uint16_t* h = reinterpret_cast<const uint16_t*>(row) + 8 * chunk;
#pragma unroll
    for (int i = 0; i < 8; ++i) k[j][i] = 8 * chunk < d ? m::LoadHalf<kDtype>(h[i]) : 0.0f;
  }
}

// This lane's share of one query vector, in the same chunks as LoadKeyHead.
__device__ __forceinline__ void LoadQuery(const float* q, uint32_t d,
                                          float (&out)[kMaxChunksPerLane][8]) {
  const uint32_t lane = threadIdx.x % 32;
#pragma unroll
  for (uint32_t j = 0; j < kMaxChunksPerLane; ++j) {
    const uint32_t chunk = lane + 32 * j;
#pragma unroll
    for (int i = 0; i < 8; ++i) out[j][i] = 8 * chunk < d ? q[8 * chunk + i] : 0.0f;
  }
}

// q . k over one head, reduced across the warp (every lane gets the same value), then scaled;
// -inf when the dot is not finite, as the reference.
__device__ __forceinline__ float Logit(float inv_sqrt_d, const float (&q)[kMaxChunksPerLane][8],
                                       const float (&k)[kMaxChunksPerLane][8]) {
  float partial = 0.0f;
#pragma unroll
  for (uint32_t j = 0; j < kMaxChunksPerLane; ++j) {
#pragma unroll
    for (int i = 0; i < 8; ++i) partial = m::AddRn(partial, m::MulRn(q[j][i], k[j][i]));
  }
#pragma unroll
  for (uint32_t offset = 16; offset > 0; offset /= 2) {
    partial = m::AddRn(partial, __shfl_xor_sync(kFullWarp, partial, offset));
  }
  return m::IsFinite(partial) ? m::MulRn(partial, inv_sqrt_d) : -INFINITY;
}

template <DType kDtype>
__global__ void __launch_bounds__(kThreads)
    SoftmaxStatsKernel(const __grid_constant__ ImportanceParams p) {
  __shared__ float2 warp_stats[kWarps];
  const uint32_t w = blockIdx.x / p.query_heads, qh = blockIdx.x % p.query_heads;
  const uint32_t tokens = p.keys.tokens, d = p.keys.head_dim;
  const uint32_t position = tokens - p.window + w;  // attends to keys [0, position]
  float q[kMaxChunksPerLane][8];
  LoadQuery(p.queries + (size_t{w} * p.query_heads + qh) * d, d, q);
  const uint32_t warp = threadIdx.x / 32;
  float max_logit = -INFINITY, sum = 0.0f;
  for (uint32_t t = warp; t <= position; t += kWarps) {
    float k[kMaxChunksPerLane][8];
    LoadKeyHead<kDtype>(p, t, qh / p.group, k);
    const float x = Logit(p.inv_sqrt_d, q, k);
    if (x == -INFINITY) continue;
    if (x > max_logit) {
      sum = (max_logit == -INFINITY ? 0.0f : sum * expf(max_logit - x)) + 1.0f;
      max_logit = x;
    } else {
      sum += expf(x - max_logit);
    }
  }
  if (threadIdx.x % 32 == 0) warp_stats[warp] = make_float2(max_logit, sum);
  __syncthreads();
  if (threadIdx.x == 0) {
    float total_max = -INFINITY;
    for (uint32_t i = 0; i < kWarps; ++i) total_max = fmaxf(total_max, warp_stats[i].x);
    float total = 0.0f;
    if (total_max != -INFINITY) {
      for (uint32_t i = 0; i < kWarps; ++i) {
        if (warp_stats[i].x != -INFINITY)
          total += warp_stats[i].y * expf(warp_stats[i].x - total_max);
      }
    }
    p.stats[blockIdx.x] = make_float2(total_max, total);
  }
}

template <DType kDtype>
__global__ void __launch_bounds__(kThreads)
    AccumulateKernel(const __grid_constant__ ImportanceParams p) {
  const uint32_t t = blockIdx.x * kWarps + threadIdx.x / 32;
  const uint32_t tokens = p.keys.tokens, d = p.keys.head_dim;
  if (t >= tokens) return;                                                          // warp-uniform
  const uint32_t first_query = t + p.window >= tokens ? t + p.window - tokens : 0;  // sees t
  float raw = 0.0f;
  for (uint32_t kv_head = 0; kv_head < p.keys.heads; ++kv_head) {
    float k[kMaxChunksPerLane][8];
    LoadKeyHead<kDtype>(p, t, kv_head, k);
    for (uint32_t qh = kv_head * p.group; qh < (kv_head + 1) * p.group; ++qh) {
      for (uint32_t w = first_query; w < p.window; ++w) {
        const float2 st = p.stats[w * p.query_heads + qh];
        if (st.x == -INFINITY) continue;  // degenerate query: contributes nothing
        float q[kMaxChunksPerLane][8];
        LoadQuery(p.queries + (size_t{w} * p.query_heads + qh) * d, d, q);
        const float x = Logit(p.inv_sqrt_d, q, k);
        if (x != -INFINITY) raw += expf(x - st.x) / st.y;
      }
    }
  }
  if (threadIdx.x % 32 == 0) p.raw[t] = raw;
}

// A template only so that this header defines no non-inline function (it is included by more
// than one translation unit in the tests).
template <typename Params>
__global__ void MaxPoolKernel(const __grid_constant__ Params p) {
  const uint32_t t = blockIdx.x * blockDim.x + threadIdx.x;
  const uint32_t tokens = p.keys.tokens;
  if (t >= tokens) return;
  const uint32_t lo = t > p.pool_radius ? t - p.pool_radius : 0;
  const uint32_t hi = t + p.pool_radius < tokens ? t + p.pool_radius : tokens - 1;
  float best = 0.0f;
  for (uint32_t j = lo; j <= hi; ++j) best = fmaxf(best, p.raw[j]);
  p.scores[t] = best;
}

}  // namespace skv::cuda::kernels
