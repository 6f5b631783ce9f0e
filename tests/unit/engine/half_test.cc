#include <gtest/gtest.h>

#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>

#include "spectrumkv/engine/engine.h"

namespace skv::engine {
namespace {

float FromBits(uint32_t bits) { return std::bit_cast<float>(bits); }
bool IsFp16Nan(uint16_t h) { return (h & 0x7c00) == 0x7c00 && (h & 0x3ff) != 0; }

TEST(HalfTest, Fp16KnownValues) {
  EXPECT_EQ(FloatToFp16Bits(0.0f), 0x0000);
  EXPECT_EQ(FloatToFp16Bits(-0.0f), 0x8000);
  EXPECT_EQ(FloatToFp16Bits(1.0f), 0x3c00);
  EXPECT_EQ(FloatToFp16Bits(-2.0f), 0xc000);
  EXPECT_EQ(FloatToFp16Bits(0.1f), 0x2e66);
  EXPECT_EQ(FloatToFp16Bits(65504.0f), 0x7bff);
  EXPECT_EQ(FloatToFp16Bits(65519.99f), 0x7bff);
  EXPECT_EQ(FloatToFp16Bits(65520.0f), 0x7c00);  // tie between 65504 and 2^16: even is Inf
  EXPECT_EQ(FloatToFp16Bits(-1e6f), 0xfc00);
  EXPECT_EQ(FloatToFp16Bits(std::numeric_limits<float>::infinity()), 0x7c00);
  EXPECT_TRUE(IsFp16Nan(FloatToFp16Bits(std::numeric_limits<float>::quiet_NaN())));
  EXPECT_TRUE(IsFp16Nan(FloatToFp16Bits(FromBits(0x7f800001))));  // payload only in low bits
  EXPECT_EQ(FloatToFp16Bits(std::ldexp(1.0f, -14)), 0x0400);      // smallest normal
  EXPECT_EQ(FloatToFp16Bits(std::ldexp(1.0f, -24)), 0x0001);      // smallest subnormal
  EXPECT_EQ(FloatToFp16Bits(std::ldexp(1.0f, -25)), 0x0000);      // tie: to even (zero)
  EXPECT_EQ(FloatToFp16Bits(std::ldexp(1.0000001f, -25)), 0x0001);
  EXPECT_EQ(FloatToFp16Bits(std::ldexp(3.0f, -25)), 0x0002);     // 1.5 steps: tie to even
  EXPECT_EQ(FloatToFp16Bits(std::ldexp(1023.5f, -24)), 0x0400);  // subnormal rounds up to normal
  EXPECT_EQ(FloatToFp16Bits(1.0f + std::ldexp(1.0f, -11)), 0x3c00);  // tie: to even
  EXPECT_EQ(FloatToFp16Bits(1.0f + std::ldexp(3.0f, -11)), 0x3c02);  // tie: to even
  EXPECT_EQ(FloatToFp16Bits(1.0f + std::ldexp(1.0f, -11) + std::ldexp(1.0f, -20)), 0x3c01);
  EXPECT_EQ(FloatToFp16Bits(std::ldexp(1.0f, -30)), 0x0000);
}

TEST(HalfTest, Fp16EveryPatternRoundTrips) {
  for (uint32_t bits = 0; bits <= 0xffff; ++bits) {
    const auto h = static_cast<uint16_t>(bits);
    const float value = Fp16BitsToFloat(h);
    if (IsFp16Nan(h)) {
      EXPECT_TRUE(std::isnan(value)) << std::hex << bits;
      EXPECT_TRUE(IsFp16Nan(FloatToFp16Bits(value))) << std::hex << bits;
    } else {
      EXPECT_EQ(FloatToFp16Bits(value), h) << std::hex << bits;
    }
  }
  EXPECT_EQ(Fp16BitsToFloat(0x0001), std::ldexp(1.0f, -24));
  EXPECT_EQ(Fp16BitsToFloat(0x03ff), std::ldexp(1023.0f, -24));
  EXPECT_EQ(Fp16BitsToFloat(0x7bff), 65504.0f);
  EXPECT_TRUE(std::signbit(Fp16BitsToFloat(0x8000)));
}

// Property: the result is a nearest fp16 value, and an exact tie picks the even pattern.
TEST(HalfTest, Fp16RoundsToNearestEvenOnRandomInputs) {
  std::mt19937 rng(12345);
  std::uniform_int_distribution<int> exponent(-27, 16);
  std::uniform_real_distribution<float> mantissa(1.0f, 2.0f);
  for (int i = 0; i < 200000; ++i) {
    float x = std::ldexp(mantissa(rng), exponent(rng));
    if (i % 3 == 0) {  // force exact ties: a value halfway between two neighbours
      const uint16_t h = FloatToFp16Bits(x);
      if (h >= 0x7bff) continue;
      x = static_cast<float>((static_cast<double>(Fp16BitsToFloat(h)) +
                              static_cast<double>(Fp16BitsToFloat(static_cast<uint16_t>(h + 1)))) /
                             2);
    }
    const uint16_t h = FloatToFp16Bits(x);
    if (h == 0x7c00) {
      EXPECT_GE(x, 65520.0f);
      continue;
    }
    const double error = std::fabs(static_cast<double>(Fp16BitsToFloat(h)) - x);
    for (int neighbour : {h - 1, h + 1}) {
      if (neighbour < 0 || neighbour > 0x7bff) continue;
      const double other =
          std::fabs(static_cast<double>(Fp16BitsToFloat(static_cast<uint16_t>(neighbour))) - x);
      ASSERT_LE(error, other) << x;
      if (error == other) {
        ASSERT_EQ(h & 1, 0) << "tie not to even for " << x;
      }
    }
  }
}

TEST(HalfTest, Bf16KnownValuesAndRoundTrip) {
  EXPECT_EQ(FloatToBf16Bits(1.0f), 0x3f80);
  EXPECT_EQ(FloatToBf16Bits(-0.0f), 0x8000);
  EXPECT_EQ(FloatToBf16Bits(FromBits(0x3f808000)), 0x3f80);  // tie: to even
  EXPECT_EQ(FloatToBf16Bits(FromBits(0x3f818000)), 0x3f82);  // tie: to even
  EXPECT_EQ(FloatToBf16Bits(FromBits(0x3f808001)), 0x3f81);
  EXPECT_EQ(FloatToBf16Bits(FromBits(0x7f7fffff)), 0x7f80);  // FLT_MAX rounds to Inf
  const uint16_t nan = FloatToBf16Bits(FromBits(0x7f800001));
  EXPECT_TRUE((nan & 0x7f80) == 0x7f80 && (nan & 0x7f) != 0);
  for (uint32_t bits = 0; bits <= 0xffff; ++bits) {
    const auto b = static_cast<uint16_t>(bits);
    if ((b & 0x7f80) == 0x7f80 && (b & 0x7f) != 0) continue;  // NaN
    EXPECT_EQ(FloatToBf16Bits(Bf16BitsToFloat(b)), b) << std::hex << bits;
  }
  EXPECT_EQ(KvBitsToFloat(FloatToKvBits(3.0f, KvDtype::kBf16), KvDtype::kBf16), 3.0f);
  EXPECT_EQ(KvBitsToFloat(FloatToKvBits(3.0f, KvDtype::kFp16), KvDtype::kFp16), 3.0f);
}

}  // namespace
}  // namespace skv::engine
