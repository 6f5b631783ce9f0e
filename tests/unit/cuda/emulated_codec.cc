// clang-format off
#include "cuda_emulation.h"  // first: defines the CUDA built-ins the kernel headers use
// clang-format on

#include "emulated_codec.h"

#include <algorithm>
#include <mutex>

#include "absl/strings/str_cat.h"
#include "channel_mean_kernels.cuh"
#include "launch_support.h"
#include "row_codec_kernels.cuh"
#include "segment_plan.h"
#include "spectrumkv/codec/cuda/device_view.h"

namespace skv::cuda::testing {
namespace {

namespace emu = ::skv::cuda::emulation;
namespace k = ::skv::cuda::kernels;

// Few blocks, so every block loops over several rows (the grid-stride path and the alternating
// shared-memory stages are exercised).
constexpr uint32_t kEmulatedBlocksX = 3;

template <typename Job, DType kDtype, int kLanes>
void RunRowKernel(const k::RowBatch<Job>& batch, dim3 grid, const k::RowLaunchShape& shape) {
  emu::Launch(grid, dim3(shape.threads), shape.shared_bytes, [&batch] {
    if constexpr (std::is_same_v<Job, EncodeRowsJob>) {
      k::EncodeRowsKernel<kDtype, kLanes>(batch);
    } else {
      k::DecodeRowsKernel<kDtype, kLanes>(batch);
    }
  });
}

template <typename Job, DType kDtype>
absl::Status DispatchLanes(const k::RowBatch<Job>& batch, dim3 grid,
                           const k::RowLaunchShape& shape) {
  switch (shape.lanes_per_head) {
    case 1:
      RunRowKernel<Job, kDtype, 1>(batch, grid, shape);
      break;
    case 2:
      RunRowKernel<Job, kDtype, 2>(batch, grid, shape);
      break;
    case 4:
      RunRowKernel<Job, kDtype, 4>(batch, grid, shape);
      break;
    case 8:
      RunRowKernel<Job, kDtype, 8>(batch, grid, shape);
      break;
    case 16:
      RunRowKernel<Job, kDtype, 16>(batch, grid, shape);
      break;
    case 32:
      RunRowKernel<Job, kDtype, 32>(batch, grid, shape);
      break;
    case 64:
      RunRowKernel<Job, kDtype, 64>(batch, grid, shape);
      break;
    default:
      return absl::InvalidArgumentError(absl::StrCat("lanes ", shape.lanes_per_head));
  }
  return absl::OkStatus();
}

template <typename Job>
absl::Status EmulateRows(const std::vector<Job>& jobs, uint32_t group_size) {
  if (jobs.empty()) return absl::OkStatus();
  const DeviceKvView& shape = JobTensor(jobs[0]);
  const k::RowLaunchShape launch = k::PlanRowLaunch(shape.heads, shape.head_dim);
  for (size_t first = 0; first < jobs.size(); first += kMaxJobsPerLaunch) {
    const size_t count = std::min(jobs.size() - first, kMaxJobsPerLaunch);
    auto batch = std::make_unique<k::RowBatch<Job>>();
    const uint32_t max_rows = k::FillRowBatch(jobs.data() + first, count, group_size, batch.get());
    const dim3 grid(std::min(max_rows, kEmulatedBlocksX), uint32_t(count));
    const absl::Status s = shape.dtype == DType::kFp16
                               ? DispatchLanes<Job, DType::kFp16>(*batch, grid, launch)
                               : DispatchLanes<Job, DType::kBf16>(*batch, grid, launch);
    if (!s.ok()) return s;
  }
  return absl::OkStatus();
}

// Rows [begin, begin + count) of `view` (host memory standing for a device's) into `to`, dense.
void CopyRows(const KvTensorView& view, uint32_t begin, uint32_t count, uint8_t* to) {
  for (uint32_t t = 0; t < count; ++t)
    std::memcpy(to + size_t{t} * view.row_bytes(), view.row(begin + t), view.row_bytes());
}

// The emulated device reads host memory: the host block table serves as the device's.
DeviceKvView AsDeviceView(const KvTensorView& view) {
  return ToDeviceView(view, view.block_table.data());
}

// The emulation runs one block at a time on process-wide state: every emulated device (a sender's
// and a receiver's in one test) takes turns.
std::mutex emulation_mu;

class EmulatedCudaKvDevice final : public device::KvDevice {
 public:
  const std::string& name() const override { return name_; }

  absl::StatusOr<device::HostRows> ReadRows(std::span<const KvLayerViews> layers,
                                            uint32_t token_begin, uint32_t token_count) override {
    device::HostRows rows;
    auto copies = std::make_shared<std::vector<std::unique_ptr<AlignedBytes>>>();
    for (const KvLayerViews& layer : layers) {
      KvLayerViews host;
      for (int kind = 0; kind < 2; ++kind) {
        const KvTensorView& view = kind == 0 ? layer.key : layer.value;
        if (uint64_t{token_begin} + token_count > view.tokens) {
          return absl::OutOfRangeError(absl::StrCat("rows past the tensor's ", view.tokens));
        }
        auto& copy = copies->emplace_back(
            std::make_unique<AlignedBytes>(size_t{token_count} * view.row_bytes(), 0));
        CopyRows(view, token_begin, token_count, copy->data());
        (kind == 0 ? host.key : host.value) =
            KvTensorView::Dense(copy->data(), view.dtype, token_count, view.heads, view.head_dim);
      }
      rows.layers.push_back(host);
    }
    rows.storage = std::move(copies);
    return rows;
  }

  absl::StatusOr<size_t> EncodeSegment(const KvTensorView& source, const SegmentSpec& spec,
                                       std::span<const Tier> tiers, const CodecOptions& options,
                                       ByteBuffer* out) override {
    std::lock_guard<std::mutex> lock(emulation_mu);
    absl::StatusOr<std::vector<uint8_t>> segment =
        EmulatedEncodeSegment(AsDeviceView(source), spec, tiers, options);
    if (!segment.ok()) return segment.status();
    out->insert(out->end(), segment->begin(), segment->end());
    return segment->size();
  }

  absl::Status DecodeSegment(const ParsedSegment& segment, const KvTensorView& destination,
                             const TransformProfile* /*profile*/) override {
    std::lock_guard<std::mutex> lock(emulation_mu);
    return EmulatedDecodeSegment(segment, AsDeviceView(destination));
  }

  absl::Status WaitForEvent(absl::string_view /*ipc_event*/) override {
    return absl::FailedPreconditionError("the emulated device has no CUDA events");
  }

 private:
  const std::string name_ = "emulated-cuda";
};

}  // namespace

absl::Status EmulateEncodeRows(const std::vector<EncodeRowsJob>& jobs, uint32_t group_size) {
  return EmulateRows(jobs, group_size);
}

absl::Status EmulateDecodeRows(const std::vector<DecodeRowsJob>& jobs, uint32_t group_size) {
  return EmulateRows(jobs, group_size);
}

void EmulateMean(const std::vector<ChannelMeanJob>& jobs) {
  auto batch = std::make_unique<k::MeanBatch>();
  k::FillMeanBatch(jobs.data(), jobs.size(), batch.get());
  const dim3 grid((batch->channels + k::kMeanChannels - 1) / k::kMeanChannels,
                  uint32_t(jobs.size()));
  const k::MeanBatch& b = *batch;
  emu::Launch(grid, dim3(k::kMeanThreads), 0, [&b] {
    if (b.jobs[0].source.dtype == DType::kFp16) {
      k::ChannelMeanKernel<DType::kFp16>(b);
    } else {
      k::ChannelMeanKernel<DType::kBf16>(b);
    }
  });
}

absl::StatusOr<std::vector<uint8_t>> EmulatedEncodeSegment(const DeviceKvView& source,
                                                           const SegmentSpec& spec,
                                                           std::span<const Tier> tiers,
                                                           const CodecOptions& options) {
  absl::StatusOr<internal::SegmentEncodePlan> plan =
      internal::PlanSegmentEncode(source, spec, tiers, options);
  if (!plan.ok()) return plan.status();
  AlignedBytes segment(plan->total_bytes, 0xCC);  // kernels must write every mean/payload byte
  std::memcpy(segment.data(), plan->prefix.data(), plan->prefix.size());
  const uint8_t* tier_map = segment.data() + sizeof(SegmentHeader);
  if (plan->centred) {
    EmulateMean({ChannelMeanJob{source, spec.token_begin, spec.token_count, tier_map,
                                segment.data() + plan->mean_at()}});
  }
  if (plan->payload_bytes > 0) {
    EncodeRowsJob job{source,
                      spec.token_begin,
                      spec.token_count,
                      tier_map,
                      plan->record_offsets.data(),
                      plan->centred ? segment.data() + plan->mean_at() : nullptr,
                      segment.data() + plan->payload_at(),
                      plan->rotated};
    if (absl::Status s = EmulateRows<EncodeRowsJob>({job}, plan->group_size); !s.ok()) return s;
  }
  internal::SealSegment(segment.data(), plan->total_bytes);
  return std::vector<uint8_t>(segment.data(), segment.data() + plan->total_bytes);
}

absl::Status EmulatedDecodeSegment(const ParsedSegment& segment, const DeviceKvView& destination) {
  absl::StatusOr<internal::SegmentDecodePlan> plan =
      internal::PlanSegmentDecode(segment, destination);
  if (!plan.ok()) return plan.status();
  AlignedBytes sections(segment.tier_map.size() + segment.mean.size() + segment.payload.size(), 0);
  uint8_t* at = sections.data();
  for (std::span<const uint8_t> part : {segment.tier_map, segment.mean, segment.payload}) {
    if (!part.empty()) std::memcpy(at, part.data(), part.size());
    at += part.size();
  }
  const uint8_t* base = sections.data();
  DecodeRowsJob job{destination,
                    segment.header.token_begin,
                    segment.header.token_count,
                    base,
                    plan->record_offsets.data(),
                    plan->centred ? base + segment.tier_map.size() : nullptr,
                    base + segment.tier_map.size() + segment.mean.size(),
                    plan->rotated};
  return EmulateRows<DecodeRowsJob>({job}, segment.header.group_size);
}

std::unique_ptr<device::KvDevice> MakeEmulatedCudaKvDevice() {
  return std::make_unique<EmulatedCudaKvDevice>();
}

}  // namespace skv::cuda::testing
