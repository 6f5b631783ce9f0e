// The codec's inner loops over one token row, behind a table of function pointers so the scalar
// reference (the specification) and the SIMD version are interchangeable and testable against
// each other. Every fast implementation must produce bit-identical outputs to the reference.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>

#include "spectrumkv/codec/codec_math.h"
#include "spectrumkv/codec/formats.h"

namespace skv {

// One quantized tier's entry points in one backend (the tier's bits are fixed by the entry).
struct TierRowKernels {
  // Quantizes n values in groups of `group`. For each group writes GroupParams then the group's
  // codes to `out`. NaN is treated as 0 and values are clamped to the fp16 range first.
  void (*quantize)(const float* x, size_t n, size_t group, uint8_t* out) = nullptr;
  // Inverse of quantize: reads what quantize wrote and writes n values.
  void (*dequantize)(const uint8_t* in, size_t n, size_t group, float* x) = nullptr;
};

struct RowKernels {
  const char* name;
  // dst[i] = float(src[i]) for n 16-bit values of `dtype`.
  void (*load)(const uint16_t* src, DType dtype, size_t n, float* dst);
  // dst[i] = round-to-nearest-even(src[i]) in `dtype`.
  void (*store)(const float* src, DType dtype, size_t n, uint16_t* dst);
  // In-place orthonormal Hadamard transform of n / block consecutive blocks of `block` values
  // (block a power of two >= 8). It is its own inverse.
  void (*hadamard)(float* x, size_t n, size_t block);
  // The encoder's row preparation in one pass: out = hadamard(load(src) - mean), with `mean`
  // optional (nullptr) and block = 0 meaning no rotation. Bit-identical to load, then
  // out[i] -= mean[i], then hadamard.
  void (*transform)(const uint16_t* src, DType dtype, size_t n, const float* mean, size_t block,
                    float* out);
  // Its inverse on the decode side, in one pass: dst = store(hadamard(x) + mean). `x` is
  // scratch (may be overwritten). Bit-identical to hadamard, then x[i] += mean[i], then store.
  void (*untransform)(float* x, size_t n, const float* mean, size_t block, DType dtype,
                      uint16_t* dst);
  // sum[i] += float(src[i]) for n 16-bit values of `dtype`, non-finite values counted as +0
  // (the channel means' accumulation).
  void (*accumulate)(const uint16_t* src, DType dtype, size_t n, float* sum);
  // Per group of `group` values: the squared-error estimate of quantizing it at every quantized
  // tier (step^2 / 12 per value, the step from the group's sanitized range), added to err[tier].
  // Entries of other tiers are left alone. Used by the rd planner.
  void (*estimate_error)(const float* x, size_t n, size_t group, double err[kNumTiers]);
  // Entry points per tier, indexed by the tier's wire value; set exactly for quantized tiers
  // (tests/unit/codec/row_kernels_test.cc checks every backend).
  std::array<TierRowKernels, kNumTiers> tiers;

  // The entry points of `t`, or nullptr when this backend has none (not a quantized tier).
  const TierRowKernels* ForTier(Tier t) const {
    if (!IsKnownTier(t)) return nullptr;
    const TierRowKernels& k = tiers[static_cast<int>(t)];
    return k.quantize != nullptr && k.dequantize != nullptr ? &k : nullptr;
  }
};

// A backend's `tiers` from its function Tier -> entry points.
template <typename EntryOf>
constexpr std::array<TierRowKernels, kNumTiers> MakeTierKernels(EntryOf entry_of) {
  std::array<TierRowKernels, kNumTiers> table{};
  for (Tier t : kAllTiers) table[static_cast<int>(t)] = entry_of(t);
  return table;
}

// The scalar reference implementation.
const RowKernels& ReferenceRowKernels();
// AVX2 + F16C when the CPU has them (and SKV_FORCE_SCALAR is unset), else the reference.
const RowKernels& BestRowKernels();
// The AVX2 kernels, or nullptr when this CPU or build lacks AVX2/F16C.
const RowKernels* Avx2RowKernels();

// ---- Helpers shared by every implementation so all agree bit for bit. ------------------------

inline constexpr float kFp16Max = 65504.0f;

// Sanitizes a value before quantization: NaN -> 0, clamp to [-65504, 65504].
inline float SanitizeForQuant(float v) {
  if (v != v) return 0.0f;
  return v < -kFp16Max ? -kFp16Max : (v > kFp16Max ? kFp16Max : v);
}

// Parameters of one group from its sanitized min and max (offset rounded down, scale up to fp16,
// so every value maps into [0, max_code] without clipping), and 1 / scale for quantizing (0 for a
// constant group). One definition for every implementation, host and device: codec_math.h.
using math::InverseScale;
using math::MakeGroupParams;

// Adds the step^2 / 12 error estimate of one group of `group` values spanning `range` to
// err[tier] for every quantized tier (the estimate_error kernels' shared arithmetic).
inline void AddQuantizationErrors(double range, size_t group, double err[kNumTiers]) {
  for (Tier t : kQuantizedTiers) {
    const double step = range / MaxCode(TierBits(t));
    err[static_cast<int>(t)] += double(group) * step * step / 12.0;
  }
}

}  // namespace skv
