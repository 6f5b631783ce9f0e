#include <cstring>

#include "segment_plan.h"
#include "spectrumkv/codec/cuda/cuda_codec.h"

namespace skv::cuda {
namespace {
size_t RoundUp16(size_t n) { return (n + 15) / 16 * 16; }
}  // namespace

absl::StatusOr<size_t> CudaSegmentCodec::Encode(const DeviceKvView& source, const SegmentSpec& spec,
                                                std::span<const Tier> tiers,
                                                const CodecOptions& options, cudaStream_t stream,
                                                ByteBuffer* out) {
  if (out == nullptr) return absl::InvalidArgumentError("out is null");
  absl::StatusOr<internal::SegmentEncodePlan> plan =
      internal::PlanSegmentEncode(source, spec, tiers, options);
  if (!plan.ok()) return plan.status();
  const size_t total = plan->total_bytes;

  // Staging: the whole segment (header and tier map go up, everything comes back), then the
  // record offsets.
  const size_t offsets_at = RoundUp16(total);
  const size_t offsets_bytes = plan->record_offsets.size() * sizeof(uint32_t);
  if (absl::Status s = staging_.Reserve(offsets_at + offsets_bytes); !s.ok()) return s;
  if (absl::Status s = device_segment_.Reserve(total); !s.ok()) return s;
  if (absl::Status s = device_offsets_.Reserve(offsets_bytes); !s.ok()) return s;
  uint8_t* host = staging_.bytes();
  std::memcpy(host, plan->prefix.data(), plan->prefix.size());
  std::memcpy(host + offsets_at, plan->record_offsets.data(), offsets_bytes);

  uint8_t* device = device_segment_.bytes();
  SKV_CUDA_RETURN_IF_ERROR(
      cudaMemcpyAsync(device, host, plan->prefix.size(), cudaMemcpyHostToDevice, stream));
  SKV_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(device_offsets_.data(), host + offsets_at, offsets_bytes,
                                           cudaMemcpyHostToDevice, stream));
  const uint8_t* device_tier_map = device + sizeof(SegmentHeader);
  if (plan->centred) {
    ChannelMeanJob job;
    job.source = source;
    job.token_begin = spec.token_begin;
    job.token_count = spec.token_count;
    job.tier_map = device_tier_map;
    job.mean_out = device + plan->mean_at();
    if (absl::Status s = LaunchChannelMean(&job, 1, stream); !s.ok()) return s;
  }
  if (plan->payload_bytes > 0) {
    EncodeRowsJob job;
    job.source = source;
    job.token_begin = spec.token_begin;
    job.token_count = spec.token_count;
    job.tier_map = device_tier_map;
    job.record_offsets = device_offsets_.as<uint32_t>();
    job.mean = plan->centred ? device + plan->mean_at() : nullptr;
    job.payload = device + plan->payload_at();
    job.rotate = plan->rotated;
    if (absl::Status s = LaunchEncodeRows(&job, 1, plan->group_size, stream); !s.ok()) return s;
  }
  SKV_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(host, device, total, cudaMemcpyDeviceToHost, stream));
  SKV_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream));
  internal::SealSegment(host, total);
  out->insert(out->end(), host, host + total);
  return total;
}

absl::Status CudaSegmentCodec::Decode(const ParsedSegment& segment, const DeviceKvView& destination,
                                      cudaStream_t stream) {
  absl::StatusOr<internal::SegmentDecodePlan> plan =
      internal::PlanSegmentDecode(segment, destination);
  if (!plan.ok()) return plan.status();
  const SegmentHeader& h = segment.header;

  // Device copy of tier map, mean and payload, contiguous as in the segment.
  const size_t sections = segment.tier_map.size() + segment.mean.size() + segment.payload.size();
  const size_t offsets_bytes = plan->record_offsets.size() * sizeof(uint32_t);
  const size_t sections_at = RoundUp16(offsets_bytes);
  if (absl::Status s = staging_.Reserve(sections_at + sections); !s.ok()) return s;
  if (absl::Status s = device_segment_.Reserve(sections); !s.ok()) return s;
  if (absl::Status s = device_offsets_.Reserve(offsets_bytes); !s.ok()) return s;
  uint8_t* host = staging_.bytes();
  std::memcpy(host, plan->record_offsets.data(), offsets_bytes);
  uint8_t* at = host + sections_at;
  for (std::span<const uint8_t> part : {segment.tier_map, segment.mean, segment.payload}) {
    if (!part.empty()) std::memcpy(at, part.data(), part.size());
    at += part.size();
  }
  SKV_CUDA_RETURN_IF_ERROR(
      cudaMemcpyAsync(device_offsets_.data(), host, offsets_bytes, cudaMemcpyHostToDevice, stream));
  SKV_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(device_segment_.data(), host + sections_at, sections,
                                           cudaMemcpyHostToDevice, stream));
  const uint8_t* device = device_segment_.bytes();
  DecodeRowsJob job;
  job.destination = destination;
  job.token_begin = h.token_begin;
  job.token_count = h.token_count;
  job.tier_map = device;
  job.record_offsets = device_offsets_.as<uint32_t>();
  job.mean = plan->centred ? device + segment.tier_map.size() : nullptr;
  job.payload = device + segment.tier_map.size() + segment.mean.size();
  job.rotate = plan->rotated;
  if (absl::Status s = LaunchDecodeRows(&job, 1, h.group_size, stream); !s.ok()) return s;
  SKV_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream));
  return absl::OkStatus();
}

}  // namespace skv::cuda
