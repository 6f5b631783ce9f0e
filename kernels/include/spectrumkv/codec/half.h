// Scalar conversions between fp32 and the 16-bit KV dtypes, round-to-nearest-even, usable from
// host and device code. These define the rounding every fast path must reproduce.
#pragma once

#include <cstdint>
#include <cstring>

#include "spectrumkv/codec/formats.h"

namespace skv {

SKV_HOST_DEVICE inline uint32_t FloatBits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
SKV_HOST_DEVICE inline float BitsFloat(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

SKV_HOST_DEVICE inline float Fp16ToFloat(uint16_t h) {
  const uint32_t sign = uint32_t{h & 0x8000u} << 16;
  const uint32_t exp = (h >> 10) & 0x1f;
  uint32_t mant = h & 0x3ffu;
  if (exp == 0x1f) {  // Inf, or NaN made quiet as the F16C instruction vcvtph2ps does
    return BitsFloat(sign | 0x7f800000u | ((mant ? mant | 0x200u : 0u) << 13));
  }
  if (exp != 0) return BitsFloat(sign | ((exp + 112) << 23) | (mant << 13));
  if (mant == 0) return BitsFloat(sign);
  // Subnormal: normalise the mantissa.
  int e = 113;
  while ((mant & 0x400u) == 0) {
    mant <<= 1;
    --e;
  }
  return BitsFloat(sign | (uint32_t(e) << 23) | ((mant & 0x3ffu) << 13));
}

// Matches the x86 F16C instruction vcvtps2ph with round-to-nearest-even (NaN stays NaN, quiet).
SKV_HOST_DEVICE inline uint16_t FloatToFp16(float f) {
  const uint32_t u = FloatBits(f);
  const uint16_t sign = uint16_t((u >> 16) & 0x8000u);
  const uint32_t abs = u & 0x7fffffffu;
  if (abs > 0x7f800000u) return uint16_t(sign | 0x7e00u | ((abs >> 13) & 0x3ffu));  // NaN
  if (abs >= 0x477ff000u) return uint16_t(sign | 0x7c00u);  // rounds to >= 65520: Inf
  if (abs >= 0x38800000u) {                                 // normal fp16
    const uint32_t rounded = abs + 0x0fffu + ((abs >> 13) & 1u);
    return uint16_t(sign | ((rounded - 0x38000000u) >> 13));
  }
  if (abs < 0x33000000u) return sign;  // below half the smallest subnormal: zero
  // Subnormal fp16: shift the full mantissa into place with round-to-nearest-even.
  const uint32_t exp = abs >> 23;
  const uint32_t mant = (abs & 0x7fffffu) | 0x800000u;
  const uint32_t shift = 126 - exp;  // 14..24
  const uint32_t half = 1u << (shift - 1);
  const uint32_t rest = mant & ((1u << shift) - 1);
  uint32_t result = mant >> shift;
  if (rest > half || (rest == half && (result & 1u))) ++result;
  return uint16_t(sign | result);
}

SKV_HOST_DEVICE inline float Bf16ToFloat(uint16_t b) { return BitsFloat(uint32_t{b} << 16); }

SKV_HOST_DEVICE inline uint16_t FloatToBf16(float f) {
  const uint32_t u = FloatBits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40u);  // quiet NaN
  return uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

SKV_HOST_DEVICE inline float HalfToFloat(uint16_t v, DType t) {
  return t == DType::kFp16 ? Fp16ToFloat(v) : Bf16ToFloat(v);
}
SKV_HOST_DEVICE inline uint16_t FloatToHalf(float f, DType t) {
  return t == DType::kFp16 ? FloatToFp16(f) : FloatToBf16(f);
}

}  // namespace skv
