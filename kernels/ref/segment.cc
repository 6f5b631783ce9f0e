#include "spectrumkv/codec/segment.h"

#include <cmath>
#include <cstring>
#include <vector>

#include "absl/strings/str_cat.h"
#include "row_transform.h"
#include "spectrumkv/codec/crc32c.h"
#include "spectrumkv/codec/entropy.h"
#include "spectrumkv/codec/half.h"
#include "spectrumkv/codec/transform_coding.h"

namespace skv {
namespace {

constexpr uint32_t kMaxSegmentHeads = 4096;

struct SegmentLayout {
  bool transform_coded = false;  // quantized rows in a profile's basis; excludes the three below
  bool rotated = false;
  bool centred = false;
  bool per_channel = false;
  uint32_t group_size = 0;
  uint32_t chunk = 0;  // tokens per params chunk, per-channel mode
};

SegmentLayout ChooseLayout(KvKind kind, std::span<const Tier> tiers, const CodecOptions& options,
                           uint32_t head_dim) {
  bool any_quantized = false;
  for (Tier t : tiers) any_quantized |= IsQuantized(t);
  SegmentLayout layout;
  layout.group_size = EffectiveGroupSize(options, head_dim);
  if (!any_quantized) return layout;  // transforms only matter for quantized rows
  if (options.transform_profile != nullptr) {
    layout.transform_coded = true;
    return layout;
  }
  const bool key = kind == KvKind::kKey;
  layout.rotated = key ? options.rotate_keys : options.rotate_values;
  layout.centred = key ? options.centre_keys : options.centre_values;
  layout.per_channel = key && options.per_channel_keys;
  layout.chunk = layout.per_channel ? options.channel_group_tokens : 0;
  return layout;
}

size_t RecordBytes(Tier t, const SegmentLayout& layout, size_t heads, size_t head_dim) {
  if (layout.transform_coded && IsQuantized(t)) return TransformCodedRowBytes(t, heads, head_dim);
  if (layout.per_channel && IsQuantized(t)) return RowCodeBytes(t, heads, head_dim);
  return RowBytes(t, heads, head_dim, layout.group_size);
}

struct SectionSizes {
  size_t tier_map = 0, mean = 0, channel_params = 0, payload = 0;
  size_t total() const {
    return sizeof(SegmentHeader) + tier_map + mean + channel_params + payload;
  }
};

// Sizes implied by a tier map; shared by the writer and the reader so they cannot disagree.
template <typename TierAt>
SectionSizes ComputeSizes(size_t count, TierAt tier_at, const SegmentLayout& layout, size_t heads,
                          size_t head_dim) {
  SectionSizes s;
  s.tier_map = TierMapBytes(count);
  s.mean = layout.centred ? heads * head_dim * 2 : 0;
  size_t per_tier[kNumTiers] = {};
  for (size_t i = 0; i < count; ++i) {
    const Tier t = tier_at(i);
    ++per_tier[static_cast<int>(t)];
    s.payload += RecordBytes(t, layout, heads, head_dim);
  }
  if (layout.per_channel) {
    for (Tier t : kQuantizedTiers) {
      s.channel_params +=
          ChannelParamsBytes(per_tier[static_cast<int>(t)], layout.chunk, heads, head_dim);
    }
  }
  return s;
}

// Every quantized tier in `tiers` has entry points in `kernels` (a backend that lacks a tier
// refuses the segment instead of writing another tier's layout).
template <typename TierAt>
absl::Status CheckKernelsCover(size_t count, TierAt tier_at, const RowKernels& kernels) {
  bool checked[kNumTiers] = {};
  for (size_t i = 0; i < count; ++i) {
    const Tier t = tier_at(i);
    if (!IsQuantized(t) || checked[static_cast<int>(t)]) continue;
    checked[static_cast<int>(t)] = true;
    if (kernels.ForTier(t) == nullptr) {
      return absl::UnimplementedError(absl::StrCat("the ", kernels.name, " row kernels have no ",
                                                   TierName(t), " entry points"));
    }
  }
  return absl::OkStatus();
}

void PutCode(uint8_t* codes, size_t index, int bits, unsigned code) {
  const size_t bit = index * bits;
  codes[bit / 8] |= static_cast<uint8_t>(code << (bit % 8));
}
unsigned GetCode(const uint8_t* codes, size_t index, int bits) {
  const size_t bit = index * bits;
  return (codes[bit / 8] >> (bit % 8)) & unsigned(MaxCode(bits));
}

// Per-channel key quantization: rows of one tier in chunks of `chunk`, one GroupParams per
// channel per chunk, computed with the same arithmetic as the per-token kernels.
void EncodePerChannel(const KvTensorView& source, const SegmentSpec& spec,
                      std::span<const Tier> tiers, const SegmentLayout& layout,
                      const std::vector<float>& mean, const std::vector<size_t>& record_offset,
                      const RowKernels& k, uint8_t* params_out, uint8_t* payload) {
  const size_t n = source.row_elements();
  std::vector<float> staged;
  for (Tier tier : kQuantizedTiers) {
    const int bits = TierBits(tier);
    std::vector<uint32_t> rows;
    for (uint32_t i = 0; i < spec.token_count; ++i) {
      if (tiers[i] == tier) rows.push_back(i);
    }
    for (size_t first = 0; first < rows.size(); first += layout.chunk) {
      const size_t count = std::min<size_t>(layout.chunk, rows.size() - first);
      staged.resize(count * n);
      for (size_t r = 0; r < count; ++r) {
        internal::TransformRow(source.row(spec.token_begin + rows[first + r]), source,
                               layout.rotated, mean, k, staged.data() + r * n);
        std::memset(payload + record_offset[rows[first + r]], 0,
                    RowCodeBytes(tier, source.heads, source.head_dim));
      }
      for (size_t c = 0; c < n; ++c) {
        float lo = SanitizeForQuant(staged[c]);
        float hi = lo;
        for (size_t r = 1; r < count; ++r) {
          const float v = SanitizeForQuant(staged[r * n + c]);
          lo = v < lo ? v : lo;
          hi = v > hi ? v : hi;
        }
        const GroupParams p = MakeGroupParams(lo, hi, bits);
        std::memcpy(params_out, &p, sizeof(p));
        params_out += sizeof(p);
        const float offset = Fp16ToFloat(p.offset);
        const float inv = InverseScale(p.scale);
        for (size_t r = 0; r < count; ++r) {
          float q = std::nearbyint((SanitizeForQuant(staged[r * n + c]) - offset) * inv);
          q = q < 0.0f ? 0.0f : (q > float(MaxCode(bits)) ? float(MaxCode(bits)) : q);
          PutCode(payload + record_offset[rows[first + r]], c, bits, static_cast<unsigned>(q));
        }
      }
    }
  }
}

// One transform-coded row: per head, LoadHeadForCoding, then EncodeHeadRow with the tier's bits.
void EncodeTransformCodedRow(const uint16_t* row, const KvTensorView& source,
                             const SegmentSpec& spec, uint32_t token, Tier tier,
                             const TransformProfile& profile, const RowKernels& k,
                             std::span<float> head, std::span<float> scratch, uint8_t* out) {
  for (uint32_t h = 0; h < source.heads; ++h) {
    LoadHeadForCoding(row, source.dtype, spec.kind, h, token, profile, k, head);
    EncodeHeadRow(head, profile.Head(spec.layer, spec.kind, h),
                  profile.Bits(spec.layer, spec.kind, h, tier), scratch,
                  out + profile.HeadOffset(spec.layer, spec.kind, tier, h));
  }
}

void DecodeTransformCodedRow(const uint8_t* record, const SegmentHeader& header, uint32_t token,
                             Tier tier, const TransformProfile& profile, const RowKernels& k,
                             DType dtype, std::span<float> head, uint16_t* row) {
  const size_t d = header.head_dim;
  const KvKind kind = static_cast<KvKind>(header.kind);
  for (uint32_t h = 0; h < header.heads; ++h) {
    DecodeHeadRow(record + profile.HeadOffset(header.layer, kind, tier, h),
                  profile.Head(header.layer, kind, h), profile.Bits(header.layer, kind, h, tier),
                  head);
    if (kind == KvKind::kKey && profile.rope_theta > 0) {
      ApplyInterleavedRope(head, token, profile.rope_theta);
    }
    k.store(head.data(), dtype, d, row + h * d);
  }
}

}  // namespace

size_t EncodedSegmentBytes(const KvTensorView& source, const SegmentSpec& spec,
                           std::span<const Tier> tiers, const CodecOptions& options) {
  const SegmentLayout layout = ChooseLayout(spec.kind, tiers, options, source.head_dim);
  return ComputeSizes(
             tiers.size(), [&](size_t i) { return tiers[i]; }, layout, source.heads,
             source.head_dim)
      .total();
}

SegmentHeader NewSegmentHeader(const SegmentSpec& spec, uint32_t heads, uint32_t head_dim,
                               DType dtype) {
  SegmentHeader h{};
  h.magic = kSegmentMagic;
  h.version = kSegmentVersion;
  h.header_bytes = sizeof(SegmentHeader);
  h.request_id = spec.request_id;
  h.layer = spec.layer;
  h.token_begin = spec.token_begin;
  h.token_count = spec.token_count;
  h.heads = static_cast<uint16_t>(heads);
  h.head_dim = static_cast<uint16_t>(head_dim);
  h.kind = static_cast<uint8_t>(spec.kind);
  h.dtype = static_cast<uint8_t>(dtype);
  return h;
}

void PackTierMap(std::span<const Tier> tiers, uint8_t* out) {
  std::memset(out, 0, TierMapBytes(tiers.size()));
  for (size_t i = 0; i < tiers.size(); ++i) {
    out[i / 2] |= static_cast<uint8_t>(static_cast<unsigned>(tiers[i]) << (4 * (i % 2)));
  }
}

absl::Status ValidateSegmentSpec(uint32_t tensor_tokens, uint32_t heads, uint32_t head_dim,
                                 const SegmentSpec& spec, std::span<const Tier> tiers,
                                 const CodecOptions& options) {
  if (spec.token_count == 0) return absl::InvalidArgumentError("segment token_count must be > 0");
  if (size_t{spec.token_begin} + spec.token_count > tensor_tokens) {
    return absl::OutOfRangeError(absl::StrCat("segment tokens [", spec.token_begin, ", ",
                                              spec.token_begin + size_t{spec.token_count},
                                              ") exceed the tensor's ", tensor_tokens, " tokens"));
  }
  if (tiers.size() != spec.token_count) {
    return absl::InvalidArgumentError(
        absl::StrCat("got ", tiers.size(), " tiers for ", spec.token_count, " tokens"));
  }
  for (Tier t : tiers) {
    if (!IsKnownTier(t)) {
      return absl::InvalidArgumentError(
          absl::StrCat("unknown tier ", static_cast<int>(t), " in plan"));
    }
  }
  if (heads == 0 || heads > kMaxSegmentHeads) {
    return absl::InvalidArgumentError(absl::StrCat("heads must be in [1, ", kMaxSegmentHeads, "]"));
  }
  return ValidateOptions(options, head_dim);
}

absl::StatusOr<size_t> EncodeSegment(const KvTensorView& source, const SegmentSpec& spec,
                                     std::span<const Tier> tiers, const CodecOptions& options,
                                     const RowKernels& kernels, ByteBuffer* out) {
  if (absl::Status s =
          ValidateSegmentSpec(source.tokens, source.heads, source.head_dim, spec, tiers, options);
      !s.ok()) {
    return s;
  }
  const SegmentLayout layout = ChooseLayout(spec.kind, tiers, options, source.head_dim);
  if (layout.transform_coded) {
    if (absl::Status s = CheckProfileFits(*options.transform_profile, spec.layer + 1, source.heads,
                                          source.head_dim);
        !s.ok()) {
      return s;
    }
  } else if (!layout.per_channel) {
    absl::Status s = CheckKernelsCover(
        tiers.size(), [&](size_t i) { return tiers[i]; }, kernels);
    if (!s.ok()) return s;
  }
  const size_t heads = source.heads, head_dim = source.head_dim, n = source.row_elements();
  const SectionSizes sizes = ComputeSizes(
      tiers.size(), [&](size_t i) { return tiers[i]; }, layout, heads, head_dim);
  if (sizes.total() > UINT32_MAX) {
    return absl::InvalidArgumentError("segment would exceed 4 GiB; set tokens_per_segment");
  }

  const size_t start = out->size();
  out->resize(start + sizes.total());
  uint8_t* base = out->data() + start;

  SegmentHeader h = NewSegmentHeader(spec, heads, head_dim, source.dtype);
  h.flags = (layout.rotated ? kSegmentRotated : 0) | (layout.centred ? kSegmentCentred : 0) |
            (layout.per_channel ? kSegmentPerChannelScales : 0) |
            (layout.transform_coded ? kSegmentTransformCoded : 0);
  h.group_size = static_cast<uint16_t>(layout.group_size);
  h.channel_group_tokens = static_cast<uint16_t>(layout.chunk);
  h.tier_map_bytes = static_cast<uint32_t>(sizes.tier_map);
  h.mean_bytes = static_cast<uint32_t>(sizes.mean);
  h.channel_params_bytes = static_cast<uint32_t>(sizes.channel_params);
  h.payload_bytes = static_cast<uint32_t>(sizes.payload);
  h.total_bytes = static_cast<uint32_t>(sizes.total());

  uint8_t* tier_map = base + sizeof(SegmentHeader);
  PackTierMap(tiers, tier_map);
  uint8_t* mean_out = tier_map + sizes.tier_map;
  uint8_t* params_out = mean_out + sizes.mean;
  uint8_t* payload = params_out + sizes.channel_params;

  std::vector<float> mean;
  if (layout.centred) {
    const std::vector<uint16_t> mean_fp16 =
        internal::ChannelMeanFp16(source, spec.token_begin, spec.token_count, tiers, kernels);
    std::memcpy(mean_out, mean_fp16.data(), sizes.mean);
    mean.resize(n);
    for (size_t c = 0; c < n; ++c) mean[c] = Fp16ToFloat(mean_fp16[c]);
  }

  std::vector<size_t> record_offset(tiers.size());
  size_t offset = 0;
  for (size_t i = 0; i < tiers.size(); ++i) {
    record_offset[i] = offset;
    offset += RecordBytes(tiers[i], layout, heads, head_dim);
  }

  std::vector<float> row_f32(n), scratch(head_dim);
  for (uint32_t i = 0; i < spec.token_count; ++i) {
    const Tier t = tiers[i];
    const uint16_t* row = source.row(spec.token_begin + i);
    switch (EncodingOf(t)) {
      case TierEncoding::kRaw:
        std::memcpy(payload + record_offset[i], row, n * 2);
        break;
      case TierEncoding::kAffine:
        if (layout.transform_coded) {
          EncodeTransformCodedRow(
              row, source, spec, spec.token_begin + i, t, *options.transform_profile, kernels,
              std::span(row_f32).first(head_dim), scratch, payload + record_offset[i]);
          break;
        }
        if (layout.per_channel) break;  // EncodePerChannel below
        internal::TransformRow(row, source, layout.rotated, mean, kernels, row_f32.data());
        kernels.ForTier(t)->quantize(row_f32.data(), n, layout.group_size,
                                     payload + record_offset[i]);
        break;
      case TierEncoding::kDropped:
        break;
      case TierEncoding::kInvalid:
        return absl::InternalError("unknown tier after validation");
    }
  }
  if (layout.per_channel) {
    EncodePerChannel(source, spec, tiers, layout, mean, record_offset, kernels, params_out,
                     payload);
  }

  std::memcpy(base, &h, sizeof(h));
  h.crc32c = Crc32c(base, sizes.total());
  std::memcpy(base, &h, sizeof(h));
  return sizes.total();
}

namespace {

SegmentLayout LayoutOf(const SegmentHeader& h) {
  SegmentLayout layout;
  layout.transform_coded = h.flags & kSegmentTransformCoded;
  layout.rotated = h.flags & kSegmentRotated;
  layout.centred = h.flags & kSegmentCentred;
  layout.per_channel = h.flags & kSegmentPerChannelScales;
  layout.group_size = h.group_size;
  layout.chunk = h.channel_group_tokens;
  return layout;
}

// The most the sections of a segment of this shape can take: every row at its largest record,
// and in per-channel mode one params chunk per quantized tier beyond what the rows fill. An
// entropy-coded segment claiming more is refused before it is decoded.
uint64_t MaxSectionBytes(const SegmentHeader& h) {
  const SegmentLayout layout = LayoutOf(h);
  const uint64_t channels = uint64_t{h.heads} * h.head_dim;
  uint64_t record = 0;
  for (int t = 0; t < kNumTiers; ++t) {
    if (IsKnownTier(Tier(t))) {
      record = std::max<uint64_t>(record, RecordBytes(Tier(t), layout, h.heads, h.head_dim));
    }
  }
  uint64_t bytes = TierMapBytes(h.token_count) + (layout.centred ? channels * 2 : 0) +
                   uint64_t{h.token_count} * record;
  if (layout.per_channel) {
    bytes += (h.token_count / layout.chunk + kNumQuantizedTiers) * channels * sizeof(GroupParams);
  }
  return bytes;
}

}  // namespace

absl::StatusOr<SegmentHeader> ParseSegmentHeader(std::span<const uint8_t> bytes) {
  if (bytes.size() < sizeof(SegmentHeader)) {
    return absl::DataLossError(absl::StrCat("segment truncated: ", bytes.size(),
                                            " bytes is smaller than its 64-byte header"));
  }
  SegmentHeader h;
  std::memcpy(&h, bytes.data(), sizeof(h));
  if (h.magic != kSegmentMagic)
    return absl::DataLossError("segment magic mismatch: not a SpectrumKV segment");
  if (h.version != kSegmentVersion) {
    return absl::FailedPreconditionError(absl::StrCat(
        "segment version ", h.version, " is not supported (expected ", kSegmentVersion, ")"));
  }
  if (h.header_bytes != sizeof(SegmentHeader)) {
    return absl::DataLossError(absl::StrCat("segment header_bytes ", h.header_bytes, " != 64"));
  }
  if (h.total_bytes != bytes.size()) {
    return absl::DataLossError(
        absl::StrCat("segment size mismatch: header says ", h.total_bytes, " bytes, received ",
                     bytes.size(), h.total_bytes > bytes.size() ? " (truncated)" : " (oversized)"));
  }
  SegmentHeader zeroed = h;
  zeroed.crc32c = 0;
  uint32_t crc = Crc32c(&zeroed, sizeof(zeroed));
  crc = Crc32c(bytes.data() + sizeof(h), bytes.size() - sizeof(h), crc);
  if (crc != h.crc32c) return absl::DataLossError("segment CRC32C mismatch: corrupted in transit");

  if (h.kind > 1) return absl::DataLossError(absl::StrCat("segment kind ", h.kind, " is invalid"));
  if (h.dtype > 1)
    return absl::DataLossError(absl::StrCat("segment dtype ", h.dtype, " is invalid"));
  if ((h.flags & ~kKnownSegmentFlags) != 0 || h.reserved0 != 0) {
    return absl::DataLossError("segment has unknown flags");
  }
  if (h.token_count == 0 || uint64_t{h.token_begin} + h.token_count > UINT32_MAX) {
    return absl::DataLossError("segment token range is empty or overflows");
  }
  if (h.heads == 0 || h.heads > kMaxSegmentHeads || h.head_dim < kMinHeadDim ||
      h.head_dim > kMaxHeadDim || h.head_dim % 8 != 0) {
    return absl::DataLossError(
        absl::StrCat("segment shape heads=", h.heads, " head_dim=", h.head_dim, " is unsupported"));
  }
  if (h.group_size < 8 || h.group_size % 8 != 0 || h.head_dim % h.group_size != 0) {
    return absl::DataLossError(absl::StrCat("segment group_size ", h.group_size, " is invalid"));
  }
  if ((h.flags & kSegmentTransformCoded) &&
      (h.flags & (kSegmentRotated | kSegmentCentred | kSegmentPerChannelScales))) {
    return absl::DataLossError(
        "segment is transform-coded and also rotated, centred or per-channel");
  }
  if (bool(h.flags & kSegmentPerChannelScales) != (h.channel_group_tokens != 0)) {
    return absl::DataLossError("segment channel_group_tokens disagrees with its flags");
  }
  if (h.flags & kSegmentEntropyCoded) {
    const uint64_t claimed = SectionBytes(h), most = MaxSectionBytes(h);
    if (claimed > most) {
      return absl::DataLossError(absl::StrCat("entropy-coded segment claims ", claimed,
                                              " bytes of sections; its ", h.token_count,
                                              " rows take at most ", most));
    }
  }
  return h;
}

absl::StatusOr<ParsedSegment> ParseSegmentSections(const SegmentHeader& h,
                                                   std::span<const uint8_t> bytes,
                                                   ByteBuffer* inflated) {
  ParsedSegment seg;
  seg.header = h;
  std::span<const uint8_t> sections = bytes.subspan(sizeof(h));
  if (h.flags & kSegmentEntropyCoded) {
    if (inflated == nullptr) {
      return absl::FailedPreconditionError(
          "segment is entropy-coded and this reader has no buffer to decode it into");
    }
    if (absl::Status s = InflateSections(h, sections, inflated); !s.ok()) return s;
    sections = *inflated;
  }

  const size_t tier_map_bytes = TierMapBytes(h.token_count);
  if (h.tier_map_bytes != tier_map_bytes || sections.size() < tier_map_bytes) {
    return absl::DataLossError("segment tier map size mismatch");
  }
  seg.tier_map = sections.first(tier_map_bytes);
  for (uint32_t i = 0; i < h.token_count; ++i) {
    if (!IsKnownTier(seg.tier(i))) {
      return absl::DataLossError(
          absl::StrCat("segment token ", i, " has unknown tier ", static_cast<int>(seg.tier(i))));
    }
  }
  if (h.token_count % 2 == 1 && (seg.tier_map.back() >> 4) != 0) {
    return absl::DataLossError("segment tier map padding is not zero");
  }
  const SectionSizes sizes = ComputeSizes(
      h.token_count, [&](size_t i) { return seg.tier(uint32_t(i)); }, LayoutOf(h), h.heads,
      h.head_dim);
  if (h.mean_bytes != sizes.mean || h.channel_params_bytes != sizes.channel_params ||
      h.payload_bytes != sizes.payload || sizes.total() != sizeof(h) + sections.size()) {
    return absl::DataLossError("segment section sizes disagree with its tier map");
  }
  size_t at = tier_map_bytes;
  seg.mean = sections.subspan(at, sizes.mean);
  at += sizes.mean;
  seg.channel_params = sections.subspan(at, sizes.channel_params);
  at += sizes.channel_params;
  seg.payload = sections.subspan(at, sizes.payload);
  return seg;
}

absl::StatusOr<ParsedSegment> ParseSegment(std::span<const uint8_t> bytes, ByteBuffer* inflated) {
  absl::StatusOr<SegmentHeader> h = ParseSegmentHeader(bytes);
  if (!h.ok()) return h.status();
  return ParseSegmentSections(*h, bytes, inflated);
}

absl::Status ValidateSegmentDestination(const SegmentHeader& h, uint32_t tokens, uint32_t heads,
                                        uint32_t head_dim, DType dtype) {
  if (heads != h.heads || head_dim != h.head_dim || static_cast<uint8_t>(dtype) != h.dtype) {
    return absl::InvalidArgumentError(
        absl::StrCat("segment shape heads=", h.heads, " head_dim=", h.head_dim, " dtype=", h.dtype,
                     " does not match the destination's heads=", heads, " head_dim=", head_dim,
                     " dtype=", static_cast<int>(dtype)));
  }
  if (uint64_t{h.token_begin} + h.token_count > tokens) {
    return absl::OutOfRangeError(absl::StrCat("segment tokens [", h.token_begin, ", ",
                                              uint64_t{h.token_begin} + h.token_count,
                                              ") exceed the destination's ", tokens));
  }
  return absl::OkStatus();
}

absl::Status DecodeSegment(const ParsedSegment& segment, const KvTensorView& destination,
                           const RowKernels& kernels, const TransformProfile* profile) {
  const SegmentHeader& h = segment.header;
  if (absl::Status s = ValidateSegmentDestination(h, destination.tokens, destination.heads,
                                                  destination.head_dim, destination.dtype);
      !s.ok()) {
    return s;
  }
  const SegmentLayout layout = LayoutOf(h);
  const size_t n = destination.row_elements();
  if (layout.transform_coded) {
    if (profile == nullptr) {
      return absl::FailedPreconditionError(
          "segment is transform-coded and no model profile was given to decode it with");
    }
    if (absl::Status s = CheckProfileFits(*profile, h.layer + 1, h.heads, h.head_dim); !s.ok()) {
      return s;
    }
  } else if (!layout.per_channel) {
    absl::Status s = CheckKernelsCover(
        h.token_count, [&](size_t i) { return segment.tier(uint32_t(i)); }, kernels);
    if (!s.ok()) return s;
  }

  std::vector<float> mean;
  if (layout.centred) {
    mean.resize(n);
    for (size_t c = 0; c < n; ++c) {
      uint16_t v;
      std::memcpy(&v, segment.mean.data() + 2 * c, 2);
      mean[c] = Fp16ToFloat(v);
    }
  }
  // Per-channel mode: where each tier's params start, and how many rows of it were seen.
  size_t params_start[kNumTiers] = {};
  uint32_t rows_seen[kNumTiers] = {};
  if (layout.per_channel) {
    uint32_t per_tier[kNumTiers] = {};
    for (uint32_t i = 0; i < h.token_count; ++i) ++per_tier[static_cast<int>(segment.tier(i))];
    size_t at = 0;
    for (Tier t : kQuantizedTiers) {
      params_start[static_cast<int>(t)] = at;
      at += ChannelParamsBytes(per_tier[static_cast<int>(t)], layout.chunk, h.heads, h.head_dim);
    }
  }

  std::vector<float> row_f32(n);
  const uint8_t* record = segment.payload.data();
  for (uint32_t i = 0; i < h.token_count; ++i) {
    const Tier t = segment.tier(i);
    uint16_t* out = destination.mutable_row(h.token_begin + i);
    const size_t record_bytes = RecordBytes(t, layout, h.heads, h.head_dim);
    switch (EncodingOf(t)) {
      case TierEncoding::kRaw:
        std::memcpy(out, record, n * 2);
        break;
      case TierEncoding::kDropped:
        std::memset(out, 0, n * 2);
        break;
      case TierEncoding::kAffine:
        if (layout.transform_coded) {
          DecodeTransformCodedRow(record, h, h.token_begin + i, t, *profile, kernels,
                                  destination.dtype, std::span(row_f32).first(h.head_dim), out);
          break;
        }
        if (layout.per_channel) {
          const int bits = TierBits(t);
          const uint32_t chunk_index = rows_seen[static_cast<int>(t)]++ / layout.chunk;
          const uint8_t* params = segment.channel_params.data() +
                                  params_start[static_cast<int>(t)] +
                                  size_t{chunk_index} * n * sizeof(GroupParams);
          for (size_t c = 0; c < n; ++c) {
            GroupParams p;
            std::memcpy(&p, params + c * sizeof(p), sizeof(p));
            row_f32[c] =
                float(GetCode(record, c, bits)) * Fp16ToFloat(p.scale) + Fp16ToFloat(p.offset);
          }
        } else {
          kernels.ForTier(t)->dequantize(record, n, layout.group_size, row_f32.data());
        }
        kernels.untransform(row_f32.data(), n, layout.centred ? mean.data() : nullptr,
                            layout.rotated ? HadamardBlock(h.head_dim) : 0, destination.dtype, out);
        break;
      case TierEncoding::kInvalid:
        return absl::DataLossError("segment has an unknown tier");  // ParseSegment refuses these
    }
    record += record_bytes;
  }
  return absl::OkStatus();
}

}  // namespace skv
