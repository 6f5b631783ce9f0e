// Launchers of the row encode/decode kernels (row_codec_kernels.cuh): argument checks, the
// runtime (dtype, lanes per head) -> template dispatch, and the grid.
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "launch_support.h"
#include "row_codec_kernels.cuh"
#include "spectrumkv/codec/cuda/cuda_status.h"
#include "spectrumkv/codec/cuda/row_launchers.h"

namespace skv::cuda {
namespace {

using kernels::RowBatch;

template <typename Job>
absl::Status CheckJobs(const Job* jobs, size_t num_jobs, uint32_t group_size, const char* role) {
  if (jobs == nullptr || num_jobs == 0) return absl::InvalidArgumentError("no jobs to launch");
  const DeviceKvView& first = JobTensor(jobs[0]);
  if (absl::Status s = internal::CheckDeviceView(first, role); !s.ok()) return s;
  if (absl::Status s = internal::CheckGroupSize(group_size, first.head_dim); !s.ok()) return s;
  for (size_t i = 0; i < num_jobs; ++i) {
    const Job& job = jobs[i];
    const DeviceKvView& v = JobTensor(job);
    if (absl::Status s = internal::CheckDeviceView(v, role); !s.ok()) {
      return absl::InvalidArgumentError(absl::StrCat("job ", i, ": ", s.message()));
    }
    if (v.dtype != first.dtype || v.heads != first.heads || v.head_dim != first.head_dim) {
      return absl::InvalidArgumentError(absl::StrCat(
          "job ", i, ": every job of one launch must share dtype, heads and head_dim"));
    }
    if (uint64_t{job.token_begin} + job.token_count > v.tokens) {
      return absl::OutOfRangeError(absl::StrCat("job ", i, ": rows [", job.token_begin, ", ",
                                                uint64_t{job.token_begin} + job.token_count,
                                                ") exceed the ", role, "'s ", v.tokens, " tokens"));
    }
    if (job.tier_map == nullptr || job.record_offsets == nullptr || job.payload == nullptr) {
      return absl::InvalidArgumentError(
          absl::StrCat("job ", i, ": tier_map, record_offsets and payload are required"));
    }
  }
  return absl::OkStatus();
}

template <typename Job>
using RowKernel = void (*)(RowBatch<Job>);

// Runtime (dtype, lanes per head) -> the kernel instance; unknown values are an error.
template <typename Job, DType kDtype>
absl::StatusOr<RowKernel<Job>> PickForLanes(uint32_t lanes) {
  constexpr bool kEncode = std::is_same_v<Job, EncodeRowsJob>;
#define SKV_ROW_KERNEL_CASE(kLanes)                      \
  case kLanes:                                           \
    if constexpr (kEncode) {                             \
      return &kernels::EncodeRowsKernel<kDtype, kLanes>; \
    } else {                                             \
      return &kernels::DecodeRowsKernel<kDtype, kLanes>; \
    }
  switch (lanes) {
    SKV_ROW_KERNEL_CASE(1)
    SKV_ROW_KERNEL_CASE(2)
    SKV_ROW_KERNEL_CASE(4)
    SKV_ROW_KERNEL_CASE(8)
    SKV_ROW_KERNEL_CASE(16)
    SKV_ROW_KERNEL_CASE(32)
    SKV_ROW_KERNEL_CASE(64)
    default:
      return absl::InvalidArgumentError(
          absl::StrCat("no row kernel for ", lanes, " lanes per head (head_dim up to 512)"));
  }
#undef SKV_ROW_KERNEL_CASE
}

template <typename Job>
absl::StatusOr<RowKernel<Job>> PickRowKernel(DType dtype, uint32_t lanes) {
  switch (dtype) {
    case DType::kFp16:
      return PickForLanes<Job, DType::kFp16>(lanes);
    case DType::kBf16:
      return PickForLanes<Job, DType::kBf16>(lanes);
    default:
      return absl::InvalidArgumentError(absl::StrCat("no row kernel for dtype ", int(dtype)));
  }
}

template <typename Job>
absl::Status LaunchRows(const Job* jobs, size_t num_jobs, uint32_t group_size,
                        cudaStream_t stream) {
  constexpr bool kEncode = std::is_same_v<Job, EncodeRowsJob>;
  const char* role = kEncode ? "source" : "destination";
  if (absl::Status s = CheckJobs(jobs, num_jobs, group_size, role); !s.ok()) return s;
  const DeviceKvView& shape = JobTensor(jobs[0]);
  const kernels::RowLaunchShape launch = kernels::PlanRowLaunch(shape.heads, shape.head_dim);
  absl::StatusOr<RowKernel<Job>> kernel = PickRowKernel<Job>(shape.dtype, launch.lanes_per_head);
  if (!kernel.ok()) return kernel.status();
  // Enough blocks to fill every multiprocessor twice over; each loops over rows.
  const uint32_t resident_per_sm = 2048 / launch.threads < 32 ? 2048 / launch.threads : 32;
  const size_t target_blocks = size_t(internal::MultiprocessorCount()) * resident_per_sm * 2;

  for (size_t first = 0; first < num_jobs; first += kMaxJobsPerLaunch) {
    const size_t count =
        num_jobs - first < kMaxJobsPerLaunch ? num_jobs - first : kMaxJobsPerLaunch;
    RowBatch<Job> batch{};
    const uint32_t max_rows = kernels::FillRowBatch(jobs + first, count, group_size, &batch);
    if (max_rows == 0) continue;
    size_t blocks_x = (target_blocks + count - 1) / count;
    if (blocks_x > max_rows) blocks_x = max_rows;
    if (blocks_x > 65535) blocks_x = 65535;
    const dim3 grid(static_cast<uint32_t>(blocks_x), static_cast<uint32_t>(count));
    (*kernel)<<<grid, launch.threads, launch.shared_bytes, stream>>>(batch);
    if (kEncode) {
      SKV_CUDA_RETURN_IF_LAUNCH_FAILED("EncodeRowsKernel");
    } else {
      SKV_CUDA_RETURN_IF_LAUNCH_FAILED("DecodeRowsKernel");
    }
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status LaunchEncodeRows(const EncodeRowsJob* jobs, size_t num_jobs, uint32_t group_size,
                              cudaStream_t stream) {
  return LaunchRows(jobs, num_jobs, group_size, stream);
}

absl::Status LaunchDecodeRows(const DecodeRowsJob* jobs, size_t num_jobs, uint32_t group_size,
                              cudaStream_t stream) {
  return LaunchRows(jobs, num_jobs, group_size, stream);
}

}  // namespace skv::cuda
