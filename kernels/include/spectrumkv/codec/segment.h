// Segment writer and strict reader (format in formats.h).
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "absl/status/statusor.h"
#include "spectrumkv/codec/byte_buffer.h"
#include "spectrumkv/codec/formats.h"
#include "spectrumkv/codec/kv_view.h"
#include "spectrumkv/codec/options.h"
#include "spectrumkv/codec/row_kernels.h"

namespace skv {

// Which rows of which tensor one segment carries.
struct SegmentSpec {
  uint64_t request_id = 0;
  uint32_t layer = 0;
  KvKind kind = KvKind::kKey;
  uint32_t token_begin = 0;
  uint32_t token_count = 0;
};

// A segment header with its identity filled in (magic, version, request, layer, kind, token
// range, shape); flags and section sizes are the encoder's to set. Shared with the device encoder.
SegmentHeader NewSegmentHeader(const SegmentSpec& spec, uint32_t heads, uint32_t head_dim,
                               DType dtype);
// Writes the 4-bit tier map of `tiers` (two per byte, low nibble first) to `out`
// (TierMapBytes(tiers.size()) bytes).
void PackTierMap(std::span<const Tier> tiers, uint8_t* out);

// The checks EncodeSegment makes before encoding, shared with the device encoder: the token
// range fits a tensor of `tensor_tokens` rows, one known tier per row, heads in range, options
// valid for head_dim.
absl::Status ValidateSegmentSpec(uint32_t tensor_tokens, uint32_t heads, uint32_t head_dim,
                                 const SegmentSpec& spec, std::span<const Tier> tiers,
                                 const CodecOptions& options);

// Encodes rows [token_begin, token_begin + token_count) of `source` with the given tiers (one per
// row of the segment) and appends the segment to `out`. Returns the segment's size. On error
// `out` is unchanged.
absl::StatusOr<size_t> EncodeSegment(const KvTensorView& source, const SegmentSpec& spec,
                                     std::span<const Tier> tiers, const CodecOptions& options,
                                     const RowKernels& kernels, ByteBuffer* out);

// Exact size EncodeSegment will produce, without encoding.
size_t EncodedSegmentBytes(const KvTensorView& source, const SegmentSpec& spec,
                           std::span<const Tier> tiers, const CodecOptions& options);

// A segment that passed every check; spans point into the caller's buffer (or, for an
// entropy-coded segment, into the buffer it was decoded into).
struct ParsedSegment {
  SegmentHeader header;
  std::span<const uint8_t> tier_map;
  std::span<const uint8_t> mean;
  std::span<const uint8_t> channel_params;
  std::span<const uint8_t> payload;

  Tier tier(uint32_t i) const {
    return static_cast<Tier>((tier_map[i / 2] >> (4 * (i % 2))) & 0xf);
  }
};

// Verifies structure, sizes, CRC32C and every tier before returning; never reads out of bounds.
// An entropy-coded segment (entropy.h) is decoded into `inflated`, which its sections' spans then
// point into (keep it alive and unchanged while they are used); without one it is refused
// (FAILED_PRECONDITION). ParseSegment = ParseSegmentHeader + ParseSegmentSections.
absl::StatusOr<ParsedSegment> ParseSegment(std::span<const uint8_t> bytes,
                                           ByteBuffer* inflated = nullptr);

// The checks that need only the header: structure, CRC32C of the bytes as received, shape, flags,
// and for an entropy-coded segment that its decoded size fits its rows. A reader checks the token
// range against its destination between the two steps, so that what a coded segment decodes to is
// bounded by the destination before it is allocated.
absl::StatusOr<SegmentHeader> ParseSegmentHeader(std::span<const uint8_t> bytes);
// The sections of a segment whose header passed ParseSegmentHeader: decoded when entropy-coded,
// the tier map and every size checked.
absl::StatusOr<ParsedSegment> ParseSegmentSections(const SegmentHeader& header,
                                                   std::span<const uint8_t> bytes,
                                                   ByteBuffer* inflated);

// Writes the segment's rows into `destination` (rows token_begin..), dequantized and with the
// transforms undone; dropped rows are zeroed. Shape and dtype must match the header.
// The checks DecodeSegment makes against its destination, shared with the device decoder: the
// segment's heads, head_dim and dtype match it and its token range fits in `tokens`.
absl::Status ValidateSegmentDestination(const SegmentHeader& header, uint32_t tokens,
                                        uint32_t heads, uint32_t head_dim, DType dtype);

// A transform-coded segment needs the encoder's `profile` (FAILED_PRECONDITION without one).
absl::Status DecodeSegment(const ParsedSegment& segment, const KvTensorView& destination,
                           const RowKernels& kernels, const TransformProfile* profile = nullptr);

}  // namespace skv
