// The centring mean kernel (skv::internal::ChannelMeanFp16, bit for bit). Kernels only, so
// tests/unit/cuda can also run it on the CPU under an emulation of CUDA threads.
//
// The reference sums each channel in fp32 over the quantized rows in row order; fp32 addition is
// not associative, so each channel keeps one thread that adds its rows in that order. What is
// parallel is everything else: a block owns 16 channels (32 bytes of every row) and all its
// threads stream tiles of rows into shared memory, one tile ahead of the 16 summing threads.
// The per-segment cost floor is tokens x one dependent fp32 add; a launch over many segments
// (layers x K/V) runs their chains side by side.
#pragma once

#include <cstdint>

#include "device_primitives.cuh"
#include "launch_support.h"
#include "spectrumkv/codec/codec_math.h"
#include "spectrumkv/codec/cuda/row_launchers.h"

namespace skv::cuda::kernels {

namespace m = ::skv::math;

inline constexpr uint32_t kMeanThreads = 128;
inline constexpr uint32_t kMeanChannels = 16;   // channels per block: two 8-channel pieces per row
inline constexpr uint32_t kMeanTileRows = 256;  // rows per shared-memory tile
inline constexpr uint32_t kPiecesPerThread = kMeanTileRows * 2 / kMeanThreads;

struct MeanBatch {
  uint32_t num_jobs;
  uint32_t channels;  // heads * head_dim
  bool vector_rows;
  ChannelMeanJob jobs[kMaxJobsPerLaunch];
};
static_assert(sizeof(MeanBatch) <= 4000, "kernel parameters are limited to 4 KB");

// Fills `batch` for one launch over jobs[0, count) (count <= kMaxJobsPerLaunch, one row shape).
// The launcher and the emulation tests use it.
inline void FillMeanBatch(const ChannelMeanJob* jobs, size_t count, MeanBatch* batch) {
  batch->num_jobs = uint32_t(count);
  batch->channels = uint32_t(jobs[0].source.row_elements());
  batch->vector_rows = true;
  for (size_t i = 0; i < count; ++i) {
    batch->jobs[i] = jobs[i];
    batch->vector_rows = batch->vector_rows && internal::RowsAreVectorAligned(jobs[i].source);
  }
}

template <DType kDtype>
__global__ void __launch_bounds__(kMeanThreads)
    ChannelMeanKernel(const __grid_constant__ MeanBatch batch) {
  __shared__ __align__(16) uint16_t tile[2][kMeanTileRows][kMeanChannels];
  __shared__ uint8_t counted[2][kMeanTileRows];
  const ChannelMeanJob& job = batch.jobs[blockIdx.y];
  const uint32_t c0 = blockIdx.x * kMeanChannels;
  if (c0 >= batch.channels) return;
  const uint32_t pieces = batch.channels - c0 >= kMeanChannels ? 2 : 1;
  const uint32_t rows = job.token_count;

  // Loader: piece q = threadIdx.x + kMeanThreads * k is row q / 2, 8-channel piece q % 2.
  uint4 staged[kPiecesPerThread];
  bool quantized[kPiecesPerThread];
  auto load_tile = [&](uint32_t tile_begin) {
#pragma unroll
    for (uint32_t k = 0; k < kPiecesPerThread; ++k) {
      const uint32_t q = threadIdx.x + kMeanThreads * k;
      const uint32_t r = tile_begin + q / 2;
      quantized[k] = r < rows && IsQuantized(detail::TierAt(job.tier_map, r));
      staged[k] = make_uint4(0, 0, 0, 0);
      if (quantized[k] && q % 2 < pieces) {
        const uint8_t* row = detail::RowPointer(job.source, job.token_begin + r);
        staged[k] = detail::Load8(row + 2 * size_t{c0 + 8 * (q % 2)}, batch.vector_rows);
      }
    }
  };

  float sum = 0.0f;
  uint32_t count = 0;
  uint32_t buffer = 0;
  load_tile(0);
  for (uint32_t tile_begin = 0; tile_begin < rows; tile_begin += kMeanTileRows) {
#pragma unroll
    for (uint32_t k = 0; k < kPiecesPerThread; ++k) {
      const uint32_t q = threadIdx.x + kMeanThreads * k;
      *reinterpret_cast<uint4*>(&tile[buffer][q / 2][8 * (q % 2)]) = staged[k];
      if (q % 2 == 0) counted[buffer][q / 2] = quantized[k];
    }
    __syncthreads();
    if (tile_begin + kMeanTileRows < rows) load_tile(tile_begin + kMeanTileRows);  // in flight
    if (threadIdx.x < kMeanChannels) {
      const uint32_t tile_rows = min(kMeanTileRows, rows - tile_begin);
      for (uint32_t r = 0; r < tile_rows; ++r) {
        if (!counted[buffer][r]) continue;
        const float v = m::LoadHalf<kDtype>(tile[buffer][r][threadIdx.x]);
        sum = m::AddRn(sum, m::IsFinite(v) ? v : 0.0f);
        ++count;
      }
    }
    buffer ^= 1;  // the next tile's writes go to the other buffer; this one is read until the
                  // next __syncthreads, which every thread passes before writing it again
  }
  const uint32_t c = c0 + threadIdx.x;
  if (threadIdx.x < kMeanChannels && c < batch.channels) {
    const uint16_t mean =
        count == 0 ? uint16_t{0} : FloatToFp16(m::Sanitize(m::DivRn(sum, float(count))));
    detail::PutU16(job.mean_out + 2 * size_t{c}, mean);
  }
}

}  // namespace skv::cuda::kernels
