// The tier table: every precision a token row can travel at, and what each layer of the codec
// needs to know about it (name, bits on the wire, how the row is encoded). Everything else reads
// tier facts from here; code that must act per tier switches on the Tier with an error default.
//
// Adding a tier: add one line to SKV_FOR_EACH_TIER, give each backend's RowKernels its entry
// points (kernels/ref, kernels/cpu, the CUDA chunk packers), add the value to the API's Tier enum
// (proto/spectrumkv/v1/spectrumkv.proto, same name, wire value + 1) and extend the tests.
#pragma once

#include <array>
#include <cstdint>

#if defined(__CUDACC__)
#define SKV_HOST_DEVICE __host__ __device__
#else
#define SKV_HOST_DEVICE
#endif

namespace skv {

// How a tier's rows are stored in a segment's payload.
enum class TierEncoding : uint8_t {
  kInvalid = 0,  // not a tier (a corrupt tier map)
  kRaw,          // the source's 16-bit values, bit-exact
  kAffine,       // per group: GroupParams (scale, offset) then `bits`-bit integer codes
  kDropped,      // nothing on the wire; masked on the decode side
};

// X(enumerator, wire value, name, bits per element on the wire, encoding, allowed by default).
// Wire values are stable (they are the 4-bit entries of a segment's tier map). The table order
// (= wire order) is also the order of the per-tier sections of a segment (formats.h).
// "Allowed by default": in CodecOptions::allowed_tiers by default (only read for quantized
// tiers; FP16 and DROP are always available to the allocators).
#define SKV_FOR_EACH_TIER(X)             \
  X(kFp16, 0, "fp16", 16, kRaw, true)    \
  X(kInt8, 1, "int8", 8, kAffine, true)  \
  X(kInt4, 2, "int4", 4, kAffine, true)  \
  X(kInt2, 3, "int2", 2, kAffine, false) \
  X(kDrop, 4, "drop", 0, kDropped, true)

enum class Tier : uint8_t {
#define SKV_TIER_ENUMERATOR(id, wire, name, bits, encoding, allowed) id = wire,
  SKV_FOR_EACH_TIER(SKV_TIER_ENUMERATOR)
#undef SKV_TIER_ENUMERATOR
};

// Number of tiers; wire values are 0 .. kNumTiers - 1.
inline constexpr int kNumTiers = 0
#define SKV_TIER_COUNT(id, wire, name, bits, encoding, allowed) +1
    SKV_FOR_EACH_TIER(SKV_TIER_COUNT)
#undef SKV_TIER_COUNT
    ;
static_assert(kNumTiers <= 16, "a tier map entry is 4 bits");

struct TierTraits {
  const char* name;  // lower case, as in logs, metric labels and reports
  int bits;          // bits per element on the wire (0 for a dropped row)
  TierEncoding encoding;
  bool allowed_by_default;
};

// The table row of `t`; encoding kInvalid for a value outside the table (a corrupt map).
SKV_HOST_DEVICE constexpr TierTraits GetTierTraits(Tier t) {
  switch (t) {
#define SKV_TIER_TRAITS(id, wire, name, bits, encoding, allowed) \
  case Tier::id:                                                 \
    return TierTraits{name, bits, TierEncoding::encoding, allowed};
    SKV_FOR_EACH_TIER(SKV_TIER_TRAITS)
#undef SKV_TIER_TRAITS
  }
  return TierTraits{"invalid", 0, TierEncoding::kInvalid, false};
}

SKV_HOST_DEVICE constexpr int TierBits(Tier t) { return GetTierTraits(t).bits; }
SKV_HOST_DEVICE constexpr TierEncoding EncodingOf(Tier t) { return GetTierTraits(t).encoding; }
SKV_HOST_DEVICE constexpr bool IsKnownTier(Tier t) {
  return EncodingOf(t) != TierEncoding::kInvalid;
}
// True for tiers whose rows are integer codes (they take the low-bit transforms and params).
SKV_HOST_DEVICE constexpr bool IsQuantized(Tier t) {
  return EncodingOf(t) == TierEncoding::kAffine;
}
SKV_HOST_DEVICE constexpr int MaxCode(int bits) { return (1 << bits) - 1; }
inline const char* TierName(Tier t) { return GetTierTraits(t).name; }

// The tiers in table order, for loops over all of them.
inline constexpr Tier kAllTiers[] = {
#define SKV_TIER_LIST(id, wire, name, bits, encoding, allowed) Tier::id,
    SKV_FOR_EACH_TIER(SKV_TIER_LIST)
#undef SKV_TIER_LIST
};

// The quantized tiers in table order (the order of a segment's per-tier parameter sections).
inline constexpr int kNumQuantizedTiers = [] {
  int n = 0;
  for (Tier t : kAllTiers) n += IsQuantized(t) ? 1 : 0;
  return n;
}();
inline constexpr std::array<Tier, kNumQuantizedTiers> kQuantizedTiers = [] {
  std::array<Tier, kNumQuantizedTiers> quantized{};
  int i = 0;
  for (Tier t : kAllTiers) {
    if (IsQuantized(t)) quantized[i++] = t;
  }
  return quantized;
}();

constexpr bool TiersAreInWireOrder() {
  for (int i = 0; i < kNumTiers; ++i) {
    if (static_cast<int>(kAllTiers[i]) != i) return false;
  }
  return true;
}
static_assert(TiersAreInWireOrder(), "SKV_FOR_EACH_TIER lists wire values 0, 1, 2, ... in order");

// A set of tiers (bit i = wire value i).
class TierSet {
 public:
  constexpr TierSet() = default;
  static constexpr TierSet Defaults() {
    TierSet s;
    for (Tier t : kAllTiers) s = s.With(t, GetTierTraits(t).allowed_by_default);
    return s;
  }
  constexpr bool Has(Tier t) const { return (bits_ >> static_cast<int>(t)) & 1u; }
  constexpr TierSet With(Tier t, bool present) const {
    TierSet s;
    const uint16_t bit = uint16_t(1u << static_cast<int>(t));
    s.bits_ = present ? uint16_t(bits_ | bit) : uint16_t(bits_ & ~bit);
    return s;
  }
  constexpr bool operator==(const TierSet& other) const { return bits_ == other.bits_; }

 private:
  uint16_t bits_ = 0;
};

}  // namespace skv
