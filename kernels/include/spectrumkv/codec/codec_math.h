// The codec's scalar arithmetic as host+device functions, defined once for every implementation:
// the reference (kernels/ref), the AVX2 kernels (kernels/cpu) and the CUDA kernels (kernels/cuda)
// all call these for a group's parameters (MakeGroupParams, InverseScale), and the CUDA kernels
// for the per-value steps too. Each performs the IEEE operations in one fixed order, so every
// implementation is bit-identical; tests/unit/cuda checks each function against the reference on
// a machine without a GPU.
//
// Rounding: on the device every + - * / goes through the _rn intrinsics, which are never
// contracted into FMA (the sources are also built with --fmad=false); on the host the build
// passes -ffp-contract=off. Division and rintf are IEEE round-to-nearest-even on both.
#pragma once

#include <cmath>
#include <cstdint>

#include "spectrumkv/codec/formats.h"
#include "spectrumkv/codec/half.h"

namespace skv::math {

SKV_HOST_DEVICE inline float AddRn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
SKV_HOST_DEVICE inline float SubRn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}
SKV_HOST_DEVICE inline float MulRn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
SKV_HOST_DEVICE inline float DivRn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}
// Round half to even (std::nearbyint in the default rounding mode).
SKV_HOST_DEVICE inline float RoundHalfEven(float x) {
#if defined(__CUDA_ARCH__)
  return rintf(x);
#else
  return std::nearbyint(x);
#endif
}

SKV_HOST_DEVICE inline bool IsFinite(float v) {
  return (FloatBits(v) & 0x7f800000u) != 0x7f800000u;
}

inline constexpr float kFp16MaxValue = 65504.0f;

// SanitizeForQuant: NaN -> 0, clamp to [-65504, 65504].
SKV_HOST_DEVICE inline float Sanitize(float v) {
  if (v != v) return 0.0f;
  return v < -kFp16MaxValue ? -kFp16MaxValue : (v > kFp16MaxValue ? kFp16MaxValue : v);
}

// skv::Fp16ToFloat without its normalisation loop: a subnormal is mant * 2^-24, which fp32
// represents exactly. Identical bits for all 65536 inputs, NaN payloads included (tested).
SKV_HOST_DEVICE inline float Fp16ToFloatExact(uint16_t h) {
  const uint32_t sign = uint32_t{h & 0x8000u} << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  const uint32_t mant = h & 0x3ffu;
  if (exp == 0x1fu) return BitsFloat(sign | 0x7f800000u | ((mant ? mant | 0x200u : 0u) << 13));
  if (exp != 0) return BitsFloat(sign | ((exp + 112u) << 23) | (mant << 13));
  const float magnitude = MulRn(static_cast<float>(mant), 5.9604644775390625e-8f);  // 2^-24
  return BitsFloat(sign | FloatBits(magnitude));
}

template <DType kDtype>
SKV_HOST_DEVICE inline float LoadHalf(uint16_t v) {
  if constexpr (kDtype == DType::kFp16) {
    return Fp16ToFloatExact(v);
  } else {
    return Bf16ToFloat(v);
  }
}
template <DType kDtype>
SKV_HOST_DEVICE inline uint16_t StoreHalf(float f) {
  if constexpr (kDtype == DType::kFp16) {
    return FloatToFp16(f);
  } else {
    return FloatToBf16(f);
  }
}

SKV_HOST_DEVICE inline uint16_t NextFp16Up(uint16_t h) {  // finite h: next fp16 toward +Inf
  if (h == 0x8000u) return 0x0001u;
  return (h & 0x8000u) ? uint16_t(h - 1) : uint16_t(h + 1);
}
SKV_HOST_DEVICE inline uint16_t NextFp16Down(uint16_t h) {
  if (h == 0x0000u) return 0x8001u;
  return (h & 0x8000u) ? uint16_t(h + 1) : uint16_t(h - 1);
}

// A group's fp16 (scale, offset): the offset is the minimum rounded down, the scale
// (max - offset) / max_code rounded up, so no value clips (kernels/README.md).
SKV_HOST_DEVICE inline GroupParams MakeGroupParams(float min_value, float max_value, int bits) {
  uint16_t offset = FloatToFp16(min_value);
  if (Fp16ToFloatExact(offset) > min_value) offset = NextFp16Down(offset);
  const float scale_f =
      DivRn(SubRn(max_value, Fp16ToFloatExact(offset)), static_cast<float>(MaxCode(bits)));
  uint16_t scale = FloatToFp16(scale_f > 0.0f ? scale_f : 0.0f);
  if (Fp16ToFloatExact(scale) < scale_f) scale = NextFp16Up(scale);
  return GroupParams{scale, offset};
}

// 1 / scale, or 0 for a zero scale (every code of such a group decodes to the offset).
SKV_HOST_DEVICE inline float InverseScale(uint16_t scale_fp16) {
  const float s = Fp16ToFloatExact(scale_fp16);
  return s > 0.0f ? DivRn(1.0f, s) : 0.0f;
}

// One code as QuantizeRef computes it: round_half_even((sanitized - offset) * inv), clamped.
SKV_HOST_DEVICE inline uint32_t QuantizeValue(float sanitized, float offset, float inv,
                                              float max_code) {
  float q = RoundHalfEven(MulRn(SubRn(sanitized, offset), inv));
  q = q < 0.0f ? 0.0f : (q > max_code ? max_code : q);
  return static_cast<uint32_t>(q);
}

// One value as DequantizeRef computes it: code * scale + offset.
SKV_HOST_DEVICE inline float DequantizeValue(uint32_t code, float scale, float offset) {
  return AddRn(MulRn(static_cast<float>(code), scale), offset);
}

// Combining steps of the reference's group scans (`lo = v < lo ? v : lo`): the result is the
// leftmost extreme element. Equal values differ only in the sign of zero, and the offset's fp16
// bits keep that sign, so a parallel reduction must combine partials in index order: `first`
// always covers lower indices than `second`. Then any reduction tree is exact.
SKV_HOST_DEVICE inline float MinFirst(float first, float second) {
  return second < first ? second : first;
}
SKV_HOST_DEVICE inline float MaxFirst(float first, float second) {
  return second > first ? second : first;
}

// 1 / sqrt(block) as the reference computes it (in double, then rounded to float).
inline float HadamardNorm(uint32_t block) {
  return static_cast<float>(1.0 / std::sqrt(static_cast<double>(block)));
}

}  // namespace skv::math
