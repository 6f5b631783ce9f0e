// Host half of the segment codec (internal to kernels/cuda): everything about a segment that is
// not kernel work. CudaSegmentCodec runs these around the kernels; tests/unit/cuda composes
// them with the kernels run on the CPU to check whole segments without a GPU. Plain C++: it and
// segment_plan.cc build without the CUDA toolkit (library skv_codec_cuda_host).
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

#include "absl/status/statusor.h"
#include "spectrumkv/codec/cuda/row_launchers.h"
#include "spectrumkv/codec/formats.h"
#include "spectrumkv/codec/options.h"
#include "spectrumkv/codec/segment.h"

namespace skv::cuda {

// Public in cuda_codec.h; declared here too so the host half needs no CUDA header.
absl::StatusOr<uint32_t> ComputeRecordOffsets(std::span<const Tier> tiers, uint32_t heads,
                                              uint32_t head_dim, uint32_t group_size,
                                              std::vector<uint32_t>* offsets);

namespace internal {

struct SegmentEncodePlan {
  bool rotated = false;
  bool centred = false;
  uint32_t group_size = 0;
  size_t tier_map_bytes = 0;
  size_t mean_bytes = 0;
  size_t payload_bytes = 0;
  size_t total_bytes = 0;
  std::vector<uint8_t> prefix;           // SegmentHeader (crc32c = 0) + tier map
  std::vector<uint32_t> record_offsets;  // per row, into the payload
  size_t mean_at() const { return prefix.size(); }
  size_t payload_at() const { return prefix.size() + mean_bytes; }
};

// skv::EncodeSegment's checks, layout choice and sizes; the header and tier map it writes.
// Per-channel key scales: Unimplemented.
absl::StatusOr<SegmentEncodePlan> PlanSegmentEncode(const DeviceKvView& source,
                                                    const SegmentSpec& spec,
                                                    std::span<const Tier> tiers,
                                                    const CodecOptions& options);

// Writes the CRC32C of segment[0, total) (whose crc32c field is 0) into its header.
void SealSegment(uint8_t* segment, size_t total);

struct SegmentDecodePlan {
  bool rotated = false;
  bool centred = false;
  std::vector<uint32_t> record_offsets;
};

// skv::DecodeSegment's checks against the destination, and the record offsets.
absl::StatusOr<SegmentDecodePlan> PlanSegmentDecode(const ParsedSegment& segment,
                                                    const DeviceKvView& destination);

}  // namespace internal
}  // namespace skv::cuda
