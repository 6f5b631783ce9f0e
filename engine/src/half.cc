// fp32 <-> fp16 / bf16 bit conversions with round-to-nearest-even. The engine's own copy: it must
// not depend on the codec it is used to evaluate.
#include <bit>
#include <cstdint>

#include "spectrumkv/engine/engine.h"

namespace skv::engine {
namespace {

constexpr uint32_t kFloatInf = 0x7f800000;
constexpr uint32_t kFp16MinNormalAsFloat = 0x38800000;  // 2^-14
constexpr uint32_t kFp16OverflowAsFloat = 0x47800000;   // 2^16: rounds to Inf whatever the mantissa
constexpr uint32_t kExponentRebias = (127 - 15)
                                     << 10;  // float bias minus fp16 bias, at fp16's exponent bit

}  // namespace

uint16_t FloatToFp16Bits(float value) {
  const uint32_t bits = std::bit_cast<uint32_t>(value);
  const auto sign = static_cast<uint16_t>((bits >> 16) & 0x8000);
  const uint32_t magnitude = bits & 0x7fffffff;
  if (magnitude > kFloatInf) {  // NaN: force quiet, keep the top payload bits
    return static_cast<uint16_t>(sign | 0x7e00 | ((magnitude >> 13) & 0x3ff));
  }
  if (magnitude >= kFp16OverflowAsFloat) return static_cast<uint16_t>(sign | 0x7c00);
  if (magnitude >= kFp16MinNormalAsFloat) {
    // Add just under half an fp16 ulp, plus one when the kept lsb is odd: ties go to even. A carry
    // out of the mantissa bumps the exponent, which also turns [65520, 65536) into Inf.
    const uint32_t kept_lsb = (magnitude >> 13) & 1;
    const uint32_t rounded = magnitude + 0xfff + kept_lsb;
    return static_cast<uint16_t>(sign | ((rounded >> 13) - kExponentRebias));
  }
  // Subnormal or zero: in [0.5, 1) a float's ulp is 2^-24, the fp16 subnormal step, so adding 0.5
  // lets the FPU's own round-to-nearest-even do the rounding; 2^-14 carries into the exponent.
  const float shifted = std::bit_cast<float>(magnitude) + 0.5f;
  return static_cast<uint16_t>(sign | (std::bit_cast<uint32_t>(shifted) - 0x3f000000));
}

float Fp16BitsToFloat(uint16_t bits) {
  const uint32_t sign = static_cast<uint32_t>(bits & 0x8000) << 16;
  const uint32_t exponent = (bits >> 10) & 0x1f;
  const uint32_t mantissa = bits & 0x3ff;
  if (exponent == 0) {  // zero or subnormal: exactly mantissa * 2^-24
    const float magnitude = static_cast<float>(mantissa) * 0x1p-24f;
    return std::bit_cast<float>(std::bit_cast<uint32_t>(magnitude) | sign);
  }
  if (exponent == 0x1f) return std::bit_cast<float>(sign | kFloatInf | (mantissa << 13));
  return std::bit_cast<float>(sign | ((exponent + 112) << 23) | (mantissa << 13));
}

uint16_t FloatToBf16Bits(float value) {
  const uint32_t bits = std::bit_cast<uint32_t>(value);
  if ((bits & 0x7fffffff) > kFloatInf) return static_cast<uint16_t>((bits >> 16) | 0x0040);
  const uint32_t kept_lsb = (bits >> 16) & 1;
  return static_cast<uint16_t>((bits + 0x7fff + kept_lsb) >> 16);
}

float Bf16BitsToFloat(uint16_t bits) {
  return std::bit_cast<float>(static_cast<uint32_t>(bits) << 16);
}

uint16_t FloatToKvBits(float value, KvDtype dtype) {
  return dtype == KvDtype::kFp16 ? FloatToFp16Bits(value) : FloatToBf16Bits(value);
}

float KvBitsToFloat(uint16_t bits, KvDtype dtype) {
  return dtype == KvDtype::kFp16 ? Fp16BitsToFloat(bits) : Bf16BitsToFloat(bits);
}

}  // namespace skv::engine
