// Wire and block formats of the SpectrumKV codec. Shared by host and device code: plain structs,
// fixed sizes, little-endian. Every change to a layout here bumps kSegmentVersion (a new flag that
// old readers refuse keeps it: kSegmentEntropyCoded).
#pragma once

#include <cstddef>
#include <cstdint>

#include "spectrumkv/codec/tiers.h"

namespace skv {

// Element type of the KV tensors as the engine stores them.
enum class DType : uint8_t { kFp16 = 0, kBf16 = 1 };

enum class KvKind : uint8_t { kKey = 0, kValue = 1 };

// Asymmetric quantization parameters of one group: value = code * scale + offset.
// Both are fp16 bit patterns; offset <= every value of the group and scale >= 0.
struct GroupParams {
  uint16_t scale;
  uint16_t offset;
};
static_assert(sizeof(GroupParams) == 4);

inline constexpr uint32_t kSegmentMagic = 0x31564B53;  // "SKV1" read as little-endian bytes
inline constexpr uint16_t kSegmentVersion = 1;

enum SegmentFlags : uint8_t {
  kSegmentRotated = 1u << 0,           // block Hadamard over head_dim applied before quantizing
  kSegmentCentred = 1u << 1,           // per-(head, channel) mean subtracted; mean section present
  kSegmentPerChannelScales = 1u << 2,  // quantized rows use per-channel params (params section)
  kSegmentEntropyCoded = 1u << 3,      // the sections are one zstd frame (entropy.h)
  kSegmentTransformCoded = 1u << 4,    // quantized rows coded in a model profile's basis
};
inline constexpr uint8_t kKnownSegmentFlags = kSegmentRotated | kSegmentCentred |
                                              kSegmentPerChannelScales | kSegmentEntropyCoded |
                                              kSegmentTransformCoded;

// One segment = one layer's K or V for a token range:
//   SegmentHeader
//   tier map        ceil(token_count / 2) bytes, one Tier per token, low nibble first
//   mean            heads * head_dim fp16 values            (kSegmentCentred only)
//   channel params  see ChannelParamsBytes()                (kSegmentPerChannelScales only)
//   payload         one record per token in token order:
//                     kFp16: heads * head_dim 16-bit values in the source dtype
//                     kIntN: per head, per group of group_size channels:
//                            GroupParams then group_size * N / 8 code bytes
//                            (per-channel mode: code bytes only, params in the params section)
//                     kDrop: nothing
//                     transform-coded (kSegmentTransformCoded, never with the rotated, centred
//                     or per-channel flags): a kIntN row is, per head, an fp16 gain then the
//                     component codes, head_dim * N bits spread over the components by the
//                     decoder's model profile (transform_coding.h)
// crc32c covers every byte of the segment, computed with the crc32c field set to zero.
//
// Entropy-coded (kSegmentEntropyCoded): everything after the header is one zstd frame whose
// content is the sections above; the header's section sizes are the decoded sizes, total_bytes
// and crc32c cover the coded bytes as sent. A reader that predates the flag refuses the segment
// as having unknown flags, so the version stays 1 and plain segments still reach it.
struct SegmentHeader {
  uint32_t magic;
  uint16_t version;
  uint16_t header_bytes;  // always sizeof(SegmentHeader) = 64; readers refuse any other value
  uint64_t request_id;
  uint32_t layer;
  uint32_t token_begin;  // first token of this segment within the request
  uint32_t token_count;
  uint16_t heads;
  uint16_t head_dim;
  uint8_t kind;   // KvKind
  uint8_t dtype;  // DType
  uint8_t flags;  // SegmentFlags
  uint8_t reserved0;
  uint16_t group_size;            // channels per quantization group (per-token params)
  uint16_t channel_group_tokens;  // tokens per params chunk in per-channel mode, else 0
  uint32_t tier_map_bytes;
  uint32_t mean_bytes;
  uint32_t channel_params_bytes;
  uint32_t payload_bytes;
  uint32_t total_bytes;  // header + every section
  uint32_t crc32c;
};
static_assert(sizeof(SegmentHeader) == 64);
static_assert(offsetof(SegmentHeader, crc32c) == 60);

// ---- Size arithmetic, shared by the planner (costs), the writer and the reader. ----------------

SKV_HOST_DEVICE constexpr size_t TierMapBytes(size_t tokens) { return (tokens + 1) / 2; }

// Payload bytes of one token row in per-token-params mode.
SKV_HOST_DEVICE constexpr size_t RowBytes(Tier t, size_t heads, size_t head_dim, size_t group) {
  switch (EncodingOf(t)) {
    case TierEncoding::kAffine:
      return heads * (head_dim / group) * (sizeof(GroupParams) + group * TierBits(t) / 8);
    case TierEncoding::kRaw:
    case TierEncoding::kDropped:
      return heads * head_dim * TierBits(t) / 8;
    case TierEncoding::kInvalid:
      break;
  }
  return 0;  // callers validate tiers first (IsKnownTier)
}

// Payload bytes of one token row in per-channel-params mode (codes only).
SKV_HOST_DEVICE constexpr size_t RowCodeBytes(Tier t, size_t heads, size_t head_dim) {
  return heads * head_dim * TierBits(t) / 8;
}

// Per-channel mode: for each quantized tier in table order (tiers.h), for each chunk of up to
// `chunk` consecutive tokens of that tier, heads * head_dim GroupParams (one per channel).
SKV_HOST_DEVICE constexpr size_t ChannelParamsBytes(size_t tokens_in_tier, size_t chunk,
                                                    size_t heads, size_t head_dim) {
  return (tokens_in_tier + chunk - 1) / chunk * heads * head_dim * sizeof(GroupParams);
}

}  // namespace skv

namespace skv {

// Block size of the rotation over one head: the largest power of two dividing head_dim.
SKV_HOST_DEVICE constexpr uint32_t HadamardBlock(uint32_t head_dim) {
  return head_dim & (~head_dim + 1u);
}

inline constexpr uint32_t kMinHeadDim = 8;
inline constexpr uint32_t kMaxHeadDim = 512;

}  // namespace skv
