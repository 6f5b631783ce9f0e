// Fuzz target over the segment reader and decoder: any byte string must be rejected with a
// Status or decode within the destination, never crash or read out of bounds. A segment that
// parses must also decode, identically with the reference and the fastest row kernels (the
// codec's bit-exactness contract), FP16 rows bit-exact, dropped rows zeroed, and nothing written
// outside its token range; any breach aborts. (NaN payloads may differ between kernels.) A
// transform-coded segment must be refused without a profile and decode with one of its shape.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

#include "spectrumkv/codec/crc32c.h"
#include "spectrumkv/codec/segment.h"
#include "spectrumkv/codec/transform_coding.h"

extern "C" size_t LLVMFuzzerMutate(uint8_t* data, size_t size, size_t max_size);

namespace {

constexpr uint16_t kUntouched = 0xA5A5;  // what the destination holds before decoding

void Check(bool ok) {
  if (!ok) std::abort();
}

// Same bits, or both NaN: NaN payloads (from corrupt params or means) are not part of the
// bit-exactness contract, as in the row kernels' tests; which NaN comes out may differ.
bool SameOrBothNan(uint16_t a, uint16_t b, skv::DType dtype) {
  const bool bf16 = dtype == skv::DType::kBf16;
  const uint16_t exponent = bf16 ? 0x7f80 : 0x7c00, mantissa = bf16 ? 0x007f : 0x03ff;
  auto is_nan = [&](uint16_t v) { return (v & exponent) == exponent && (v & mantissa) != 0; };
  return a == b || (is_nan(a) && is_nan(b));
}

bool Inside(std::span<const uint8_t> part, const uint8_t* data, size_t size) {
  return part.empty() || (part.data() >= data && part.data() + part.size() <= data + size);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  skv::ByteBuffer inflated;
  absl::StatusOr<skv::ParsedSegment> seg = skv::ParseSegment(std::span(data, size), &inflated);
  if (!seg.ok()) return 0;
  const skv::SegmentHeader& h = seg->header;
  // The sections lie in the input, or for an entropy-coded segment in what it decoded to.
  const bool coded = h.flags & skv::kSegmentEntropyCoded;
  const uint8_t* sections = coded ? inflated.data() : data + sizeof(h);
  const size_t sections_size = coded ? inflated.size() : size - sizeof(h);
  Check(h.total_bytes == size && Inside(seg->tier_map, sections, sections_size) &&
        Inside(seg->mean, sections, sections_size) &&
        Inside(seg->channel_params, sections, sections_size) &&
        Inside(seg->payload, sections, sections_size));
  Check(seg->tier_map.size() + seg->mean.size() + seg->channel_params.size() +
            seg->payload.size() ==
        sections_size);

  // Decode into a destination exactly as large as the header says (bounded to keep runs fast).
  const uint32_t tokens = h.token_begin + h.token_count;
  const size_t n = size_t{h.heads} * h.head_dim;
  if (size_t{tokens} * n > (size_t{1} << 22)) return 0;
  const auto dtype = static_cast<skv::DType>(h.dtype);
  std::vector<uint16_t> fast(size_t{tokens} * n, kUntouched), ref(fast);
  const auto fast_view = skv::KvTensorView::Dense(fast.data(), dtype, tokens, h.heads, h.head_dim);
  const bool transform = h.flags & skv::kSegmentTransformCoded;
  skv::TransformProfile profile;
  if (transform) {
    // Without the encoder's profile a transform-coded segment is refused before any write.
    Check(skv::DecodeSegment(*seg, fast_view, skv::BestRowKernels()).code() ==
          absl::StatusCode::kFailedPrecondition);
    if ((size_t{h.layer} + 1) * 2 * h.heads * h.head_dim * h.head_dim > (size_t{1} << 20)) {
      return 0;
    }
    profile = skv::IdentityTransformProfile(h.layer + 1, h.heads, h.head_dim);  // any of its shape
    Check(!profile.tier_bits.empty());
  }
  const skv::TransformProfile* decode_profile = transform ? &profile : nullptr;
  Check(skv::DecodeSegment(*seg, fast_view, skv::BestRowKernels(), decode_profile).ok());
  Check(skv::DecodeSegment(*seg,
                           skv::KvTensorView::Dense(ref.data(), dtype, tokens, h.heads, h.head_dim),
                           skv::ReferenceRowKernels(), decode_profile)
            .ok());
  for (size_t i = 0; i < fast.size(); ++i) Check(SameOrBothNan(fast[i], ref[i], dtype));

  for (size_t i = 0; i < size_t{h.token_begin} * n; ++i) Check(fast[i] == kUntouched);
  const bool per_channel = h.flags & skv::kSegmentPerChannelScales;
  size_t record = 0;
  for (uint32_t i = 0; i < h.token_count; ++i) {
    const skv::Tier t = seg->tier(i);
    const uint16_t* row = fast.data() + (size_t{h.token_begin} + i) * n;
    if (t == skv::Tier::kFp16) {
      Check(record + 2 * n <= seg->payload.size() &&
            std::memcmp(row, seg->payload.data() + record, 2 * n) == 0);
    } else if (t == skv::Tier::kDrop) {
      for (size_t c = 0; c < n; ++c) Check(row[c] == 0);
    }
    if (transform && skv::IsQuantized(t)) {
      record += skv::TransformCodedRowBytes(t, h.heads, h.head_dim);
    } else {
      record += per_channel && skv::IsQuantized(t)
                    ? skv::RowCodeBytes(t, h.heads, h.head_dim)
                    : skv::RowBytes(t, h.heads, h.head_dim, h.group_size);
    }
  }
  Check(record == seg->payload.size());
  return 0;
}

// Mutants mostly get a consistent size field and a fresh CRC32C, so the checks behind the CRC
// are reached (a random mutation almost never keeps the CRC right); some keep a stale one so the
// CRC check itself stays covered. Small values in header fields reach the shape checks.
extern "C" size_t LLVMFuzzerCustomMutator(uint8_t* data, size_t size, size_t max_size,
                                          unsigned int seed) {
  std::minstd_rand rng(seed);
  size = LLVMFuzzerMutate(data, size, max_size);
  if (size < sizeof(skv::SegmentHeader)) return size;
  if (rng() % 4 == 0) data[rng() % sizeof(skv::SegmentHeader)] = uint8_t(rng() % 8);
  if (rng() % 4 != 0) {
    const uint32_t total = uint32_t(size);
    std::memcpy(data + offsetof(skv::SegmentHeader, total_bytes), &total, 4);
  }
  if (rng() % 8 != 0) {
    const size_t crc_at = offsetof(skv::SegmentHeader, crc32c);
    std::memset(data + crc_at, 0, 4);
    const uint32_t crc = skv::Crc32c(data, size);
    std::memcpy(data + crc_at, &crc, 4);
  }
  return size;
}
