// The host half of the CUDA segment codec (segment_plan.h): plain C++ with no CUDA dependency,
// so the emulated kernel tests can use it where no CUDA toolkit is installed.
#include "segment_plan.h"

#include <cstring>

#include "absl/strings/str_cat.h"
#include "launch_support.h"
#include "spectrumkv/codec/crc32c.h"
#include "spectrumkv/codec/kv_view.h"
#include "spectrumkv/codec/segment.h"

namespace skv::cuda {
namespace internal {

absl::StatusOr<SegmentEncodePlan> PlanSegmentEncode(const DeviceKvView& source,
                                                    const SegmentSpec& spec,
                                                    std::span<const Tier> tiers,
                                                    const CodecOptions& options) {
  // The host encoder's checks, then the device view's own.
  if (absl::Status s =
          ValidateSegmentSpec(source.tokens, source.heads, source.head_dim, spec, tiers, options);
      !s.ok()) {
    return s;
  }
  if (absl::Status s = CheckDeviceView(source, "source"); !s.ok()) return s;

  // segment.cc's ChooseLayout: transforms only when some row is quantized.
  bool any_quantized = false;
  for (Tier t : tiers) any_quantized |= IsQuantized(t);
  const bool key = spec.kind == KvKind::kKey;
  SegmentEncodePlan plan;
  plan.group_size = EffectiveGroupSize(options, source.head_dim);
  if (any_quantized) {
    if (options.transform_profile != nullptr) {
      return absl::UnimplementedError(
          "transform coding is not implemented on CUDA; encode this segment with "
          "skv::EncodeSegment");
    }
    if (key && options.per_channel_keys) {
      return absl::UnimplementedError(
          "per-channel key scales are not implemented on CUDA; encode this segment with "
          "skv::EncodeSegment");
    }
    plan.rotated = key ? options.rotate_keys : options.rotate_values;
    plan.centred = key ? options.centre_keys : options.centre_values;
  }

  plan.tier_map_bytes = TierMapBytes(tiers.size());
  plan.mean_bytes = plan.centred ? source.row_elements() * 2 : 0;
  uint64_t at = 0;
  plan.record_offsets.resize(tiers.size());
  for (size_t i = 0; i < tiers.size(); ++i) {
    plan.record_offsets[i] = uint32_t(at);
    at += RowBytes(tiers[i], source.heads, source.head_dim, plan.group_size);
    if (at > UINT32_MAX) break;
  }
  plan.payload_bytes = at;
  plan.total_bytes = sizeof(SegmentHeader) + plan.tier_map_bytes + plan.mean_bytes + at;
  if (plan.total_bytes > UINT32_MAX) {
    return absl::InvalidArgumentError("segment would exceed 4 GiB; set tokens_per_segment");
  }
  {  // The CPU writer's size arithmetic must agree, or the bytes cannot.
    KvTensorView shape;
    shape.dtype = source.dtype;
    shape.tokens = source.tokens;
    shape.heads = source.heads;
    shape.head_dim = source.head_dim;
    if (EncodedSegmentBytes(shape, spec, tiers, options) != plan.total_bytes) {
      return absl::InternalError("CUDA segment layout disagrees with skv::EncodedSegmentBytes");
    }
  }

  SegmentHeader h = NewSegmentHeader(spec, source.heads, source.head_dim, source.dtype);
  h.flags = (plan.rotated ? kSegmentRotated : 0) | (plan.centred ? kSegmentCentred : 0);
  h.group_size = static_cast<uint16_t>(plan.group_size);
  h.channel_group_tokens = 0;
  h.tier_map_bytes = static_cast<uint32_t>(plan.tier_map_bytes);
  h.mean_bytes = static_cast<uint32_t>(plan.mean_bytes);
  h.channel_params_bytes = 0;
  h.payload_bytes = static_cast<uint32_t>(plan.payload_bytes);
  h.total_bytes = static_cast<uint32_t>(plan.total_bytes);
  h.crc32c = 0;
  plan.prefix.assign(sizeof(SegmentHeader) + plan.tier_map_bytes, 0);
  std::memcpy(plan.prefix.data(), &h, sizeof(h));
  PackTierMap(tiers, plan.prefix.data() + sizeof(SegmentHeader));
  return plan;
}

void SealSegment(uint8_t* segment, size_t total) {
  const uint32_t crc = Crc32c(segment, total);
  std::memcpy(segment + offsetof(SegmentHeader, crc32c), &crc, sizeof(crc));
}

absl::StatusOr<SegmentDecodePlan> PlanSegmentDecode(const ParsedSegment& segment,
                                                    const DeviceKvView& destination) {
  const SegmentHeader& h = segment.header;
  if (absl::Status s = CheckDeviceView(destination, "destination"); !s.ok()) return s;
  if (absl::Status s = ValidateSegmentDestination(h, destination.tokens, destination.heads,
                                                  destination.head_dim, destination.dtype);
      !s.ok()) {
    return s;
  }
  if (h.flags & kSegmentPerChannelScales) {
    return absl::UnimplementedError(
        "per-channel key scales are not implemented on CUDA; decode this segment with "
        "skv::DecodeSegment");
  }
  if (h.flags & kSegmentTransformCoded) {
    return absl::UnimplementedError(
        "transform coding is not implemented on CUDA; decode this segment with "
        "skv::DecodeSegment");
  }
  if (absl::Status s = CheckGroupSize(h.group_size, h.head_dim); !s.ok()) return s;
  // ParseSegment guarantees the rest; a hand-made ParsedSegment may not.
  SegmentDecodePlan plan;
  plan.rotated = (h.flags & kSegmentRotated) != 0;
  plan.centred = (h.flags & kSegmentCentred) != 0;
  if (h.token_count == 0 || segment.tier_map.size() != TierMapBytes(h.token_count) ||
      segment.mean.size() != (plan.centred ? destination.row_elements() * 2 : 0)) {
    return absl::InvalidArgumentError("segment sections do not match its header");
  }
  std::vector<Tier> tiers(h.token_count);
  for (uint32_t i = 0; i < h.token_count; ++i) {
    tiers[i] = segment.tier(i);
    if (static_cast<int>(tiers[i]) >= kNumTiers) {
      return absl::InvalidArgumentError(absl::StrCat("segment token ", i, " has an unknown tier"));
    }
  }
  absl::StatusOr<uint32_t> payload_bytes =
      ComputeRecordOffsets(tiers, h.heads, h.head_dim, h.group_size, &plan.record_offsets);
  if (!payload_bytes.ok()) return payload_bytes.status();
  if (*payload_bytes != segment.payload.size()) {
    return absl::InvalidArgumentError("segment payload size does not match its tier map");
  }
  return plan;
}

}  // namespace internal

absl::StatusOr<uint32_t> ComputeRecordOffsets(std::span<const Tier> tiers, uint32_t heads,
                                              uint32_t head_dim, uint32_t group_size,
                                              std::vector<uint32_t>* offsets) {
  offsets->resize(tiers.size());
  uint64_t at = 0;
  for (size_t i = 0; i < tiers.size(); ++i) {
    (*offsets)[i] = uint32_t(at);
    at += RowBytes(tiers[i], heads, head_dim, group_size);
    if (at > UINT32_MAX) {
      return absl::OutOfRangeError("segment payload would exceed 4 GiB; set tokens_per_segment");
    }
  }
  return uint32_t(at);
}

}  // namespace skv::cuda
