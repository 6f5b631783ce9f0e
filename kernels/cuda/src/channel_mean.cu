// Launchers of the centring mean kernel (channel_mean_kernels.cuh) and the record offsets scan.
#include <cuda_runtime.h>

#include <cstdint>
#include <cub/block/block_scan.cuh>

#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "channel_mean_kernels.cuh"
#include "device_primitives.cuh"
#include "launch_support.h"
#include "spectrumkv/codec/cuda/cuda_status.h"
#include "spectrumkv/codec/cuda/row_launchers.h"

namespace skv::cuda {
namespace {

using kernels::kMeanChannels;
using kernels::kMeanThreads;
using kernels::MeanBatch;

template <typename T>
using MeanKernel = void (*)(T);

absl::StatusOr<MeanKernel<MeanBatch>> PickMeanKernel(DType dtype) {
  switch (dtype) {
    case DType::kFp16:
      return &kernels::ChannelMeanKernel<DType::kFp16>;
    case DType::kBf16:
      return &kernels::ChannelMeanKernel<DType::kBf16>;
    default:
      return absl::InvalidArgumentError(absl::StrCat("no mean kernel for dtype ", int(dtype)));
  }
}

constexpr uint32_t kScanThreads = 1024;

struct TierBytes {
  uint32_t bytes[16];  // indexed by the 4-bit tier code; unknown codes cost 0
};

__global__ void __launch_bounds__(kScanThreads)
    RecordOffsetsKernel(const uint8_t* tier_map, uint32_t count, const TierBytes tier_bytes,
                        uint32_t* offsets, uint32_t* total_bytes) {
  using BlockScan = cub::BlockScan<uint32_t, kScanThreads>;
  __shared__ typename BlockScan::TempStorage scan_storage;
  const uint32_t per_thread = (count + kScanThreads - 1) / kScanThreads;
  const uint32_t begin = min(count, threadIdx.x * per_thread);
  const uint32_t end = min(count, begin + per_thread);
  uint32_t local = 0;
  for (uint32_t i = begin; i < end; ++i) {
    local += tier_bytes.bytes[static_cast<uint32_t>(detail::TierAt(tier_map, i))];
  }
  uint32_t running = 0, total = 0;
  BlockScan(scan_storage).ExclusiveSum(local, running, total);
  for (uint32_t i = begin; i < end; ++i) {
    offsets[i] = running;
    running += tier_bytes.bytes[static_cast<uint32_t>(detail::TierAt(tier_map, i))];
  }
  if (threadIdx.x == 0 && total_bytes != nullptr) *total_bytes = total;
}

}  // namespace

absl::Status LaunchChannelMean(const ChannelMeanJob* jobs, size_t num_jobs, cudaStream_t stream) {
  if (jobs == nullptr || num_jobs == 0) return absl::InvalidArgumentError("no jobs to launch");
  const DeviceKvView& first = jobs[0].source;
  for (size_t i = 0; i < num_jobs; ++i) {
    const ChannelMeanJob& job = jobs[i];
    if (absl::Status s = internal::CheckDeviceView(job.source, "source"); !s.ok()) {
      return absl::InvalidArgumentError(absl::StrCat("job ", i, ": ", s.message()));
    }
    if (job.source.dtype != first.dtype || job.source.row_elements() != first.row_elements()) {
      return absl::InvalidArgumentError(
          absl::StrCat("job ", i, ": every job of one launch must share dtype and row shape"));
    }
    if (uint64_t{job.token_begin} + job.token_count > job.source.tokens) {
      return absl::OutOfRangeError(
          absl::StrCat("job ", i, ": rows exceed the source's ", job.source.tokens, " tokens"));
    }
    if (job.tier_map == nullptr || job.mean_out == nullptr) {
      return absl::InvalidArgumentError(
          absl::StrCat("job ", i, ": tier_map and mean_out are required"));
    }
  }
  absl::StatusOr<MeanKernel<MeanBatch>> kernel = PickMeanKernel(first.dtype);
  if (!kernel.ok()) return kernel.status();
  const uint32_t channels = uint32_t(first.row_elements());
  for (size_t begin = 0; begin < num_jobs; begin += kMaxJobsPerLaunch) {
    const size_t count =
        num_jobs - begin < kMaxJobsPerLaunch ? num_jobs - begin : kMaxJobsPerLaunch;
    MeanBatch batch{};
    kernels::FillMeanBatch(jobs + begin, count, &batch);
    const dim3 grid((channels + kMeanChannels - 1) / kMeanChannels, uint32_t(count));
    (*kernel)<<<grid, kMeanThreads, 0, stream>>>(batch);
    SKV_CUDA_RETURN_IF_LAUNCH_FAILED("ChannelMeanKernel");
  }
  return absl::OkStatus();
}

absl::Status LaunchRecordOffsets(const uint8_t* tier_map, uint32_t token_count, uint32_t heads,
                                 uint32_t head_dim, uint32_t group_size, uint32_t* offsets,
                                 uint32_t* total_bytes, cudaStream_t stream) {
  if (tier_map == nullptr || offsets == nullptr) {
    return absl::InvalidArgumentError("tier_map and offsets are required");
  }
  if (heads == 0 || heads > 4096 || head_dim < kMinHeadDim || head_dim > kMaxHeadDim ||
      head_dim % 8 != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("unsupported shape heads=", heads, " head_dim=", head_dim));
  }
  if (absl::Status s = internal::CheckGroupSize(group_size, head_dim); !s.ok()) return s;
  if (uint64_t{token_count} * RowBytes(Tier::kFp16, heads, head_dim, group_size) > UINT32_MAX) {
    return absl::InvalidArgumentError("a payload of this many rows could exceed 4 GiB");
  }
  if (token_count == 0) return absl::OkStatus();
  TierBytes bytes{};
  for (int t = 0; t < kNumTiers; ++t) {
    bytes.bytes[t] = uint32_t(RowBytes(Tier(t), heads, head_dim, group_size));
  }
  RecordOffsetsKernel<<<1, kScanThreads, 0, stream>>>(tier_map, token_count, bytes, offsets,
                                                      total_bytes);
  SKV_CUDA_RETURN_IF_LAUNCH_FAILED("RecordOffsetsKernel");
  return absl::OkStatus();
}

}  // namespace skv::cuda
