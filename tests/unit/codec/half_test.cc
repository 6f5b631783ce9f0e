#include "spectrumkv/codec/half.h"

#include <cmath>
#include <cstring>
#include <limits>
#include <random>

#include "gtest/gtest.h"
#include "spectrumkv/codec/crc32c.h"

namespace skv {
namespace {

TEST(Half, EveryFp16ValueRoundTripsThroughFloat) {
  for (uint32_t h = 0; h < 0x10000; ++h) {
    const float f = Fp16ToFloat(uint16_t(h));
    if (std::isnan(f)) {
      EXPECT_TRUE((FloatToFp16(f) & 0x7c00) == 0x7c00 && (FloatToFp16(f) & 0x3ff) != 0) << h;
      continue;
    }
    EXPECT_EQ(FloatToFp16(f), h) << "fp16 bits " << h;
  }
}

TEST(Half, Fp16RoundsToNearestEven) {
  EXPECT_EQ(FloatToFp16(1.0f), 0x3c00);
  EXPECT_EQ(FloatToFp16(1.0f + 1.0f / 2048), 0x3c00);  // halfway, ties to even (down)
  EXPECT_EQ(FloatToFp16(1.0f + 3.0f / 2048), 0x3c02);  // halfway, ties to even (up)
  EXPECT_EQ(FloatToFp16(65504.0f), 0x7bff);
  EXPECT_EQ(FloatToFp16(65519.0f), 0x7bff);
  EXPECT_EQ(FloatToFp16(65520.0f), 0x7c00);  // overflows to Inf
  EXPECT_EQ(FloatToFp16(-std::numeric_limits<float>::infinity()), 0xfc00);
  EXPECT_EQ(FloatToFp16(std::ldexp(1.0f, -24)), 0x0001);  // smallest subnormal
  EXPECT_EQ(FloatToFp16(std::ldexp(1.0f, -25)), 0x0000);  // halfway to it: ties to even (0)
  EXPECT_EQ(FloatToFp16(std::ldexp(1.5f, -25)), 0x0001);
  EXPECT_EQ(FloatToFp16(-0.0f), 0x8000);
}

TEST(Half, Bf16RoundsToNearestEvenAndKeepsNaN) {
  EXPECT_EQ(FloatToBf16(1.0f), 0x3f80);
  EXPECT_EQ(FloatToBf16(BitsFloat(0x3f808000u)), 0x3f80);  // halfway, even stays
  EXPECT_EQ(FloatToBf16(BitsFloat(0x3f818000u)), 0x3f82);  // halfway, odd rounds up
  EXPECT_TRUE(std::isnan(Bf16ToFloat(FloatToBf16(std::nanf("")))));
  for (uint32_t b = 0; b < 0x10000; ++b) {
    const float f = Bf16ToFloat(uint16_t(b));
    if (!std::isnan(f)) {
      EXPECT_EQ(FloatToBf16(f), b);
    }
  }
}

TEST(Crc32c, MatchesTheStandardCheckValue) {
  const char* check = "123456789";
  EXPECT_EQ(Crc32c(check, 9), 0xE3069283u);
  EXPECT_EQ(Crc32cPortable(check, 9), 0xE3069283u);
  EXPECT_EQ(Crc32c(nullptr, 0), 0u);
}

TEST(Crc32c, HardwareAndPortableAgreeAndChain) {
  std::mt19937 rng(7);
  std::vector<uint8_t> data(3 * 4096 * 2 + 4099);  // past the three-stripe path's thresholds
  for (auto& b : data) b = uint8_t(rng());
  for (size_t len : {size_t{0}, size_t{1}, size_t{7}, size_t{8}, size_t{9}, size_t{63}, size_t{64},
                     size_t{1000}, size_t{4099}, size_t{3 * 4096 - 1}, size_t{3 * 4096},
                     size_t{3 * 4096 + 5}, size_t{6 * 4096}, data.size()}) {
    EXPECT_EQ(Crc32c(data.data(), len), Crc32cPortable(data.data(), len)) << len;
  }
  const uint32_t whole = Crc32c(data.data(), data.size());
  EXPECT_EQ(Crc32c(data.data() + 1000, data.size() - 1000, Crc32c(data.data(), 1000)), whole);
}

}  // namespace
}  // namespace skv
