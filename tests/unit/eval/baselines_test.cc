// The baselines (bench/eval/baselines.h) against numbers worked out independently: every FP8 E4M3
// code, Max's (1960) Gaussian quantizer tables, TurboQuant-style keys and values quantized by
// hand, the slot byte formula, FP16 boundary layers, the zstd floors' round trip, and a clear
// error for a head_dim the Hadamard rotation cannot take.
#include "baselines.h"

#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <vector>

#include "kv_methods.h"

namespace skv::eval {
namespace {

// ---- FP8 E4M3 -------------------------------------------------------------------------------

TEST(E4m3Test, EveryCodeRoundTrips) {
  for (int c = 0; c < 256; ++c) {
    const auto code = static_cast<uint8_t>(c);
    const float v = E4m3ToFloat(code);
    if ((c & 0x7f) == 0x7f) {
      EXPECT_TRUE(std::isnan(v)) << c;
    } else {
      EXPECT_FALSE(std::isnan(v)) << c;
      EXPECT_EQ(std::signbit(v), (c & 0x80) != 0) << c;  // -0 included
    }
    EXPECT_EQ(FloatToE4m3(v), code) << c << " = " << v;
  }
}

TEST(E4m3Test, KnownValuesAndOrder) {
  EXPECT_EQ(E4m3ToFloat(0x00), 0.0f);
  EXPECT_EQ(E4m3ToFloat(0x01), std::ldexp(1.0f, -9));      // smallest subnormal
  EXPECT_EQ(E4m3ToFloat(0x07), 7 * std::ldexp(1.0f, -9));  // largest subnormal
  EXPECT_EQ(E4m3ToFloat(0x08), std::ldexp(1.0f, -6));      // smallest normal
  EXPECT_EQ(E4m3ToFloat(0x38), 1.0f);                      // exponent field 7 = bias
  EXPECT_EQ(E4m3ToFloat(0x39), 1.125f);
  EXPECT_EQ(E4m3ToFloat(0x7e), 448.0f);  // largest finite
  EXPECT_EQ(E4m3ToFloat(0x77), 240.0f);  // 1.875 * 2^7
  EXPECT_EQ(E4m3ToFloat(0xb8), -1.0f);
  EXPECT_EQ(E4m3ToFloat(0xfe), -448.0f);
  for (int c = 0; c < 0x7e; ++c) {
    EXPECT_LT(E4m3ToFloat(uint8_t(c)), E4m3ToFloat(uint8_t(c + 1))) << c;
  }
}

TEST(E4m3Test, RoundsToNearestTiesToEven) {
  for (int c = 0; c < 0x7e; ++c) {
    const float lo = E4m3ToFloat(uint8_t(c)), hi = E4m3ToFloat(uint8_t(c + 1));
    const float mid = (lo + hi) / 2;  // exact: one bit more than E4M3 has
    const uint8_t even = (c % 2 == 0) ? uint8_t(c) : uint8_t(c + 1);  // even mantissa
    EXPECT_EQ(FloatToE4m3(mid), even) << "tie between codes " << c << " and " << c + 1;
    EXPECT_EQ(FloatToE4m3(-mid), even | 0x80) << c;
    EXPECT_EQ(FloatToE4m3(std::nextafter(mid, 0.0f)), c) << c;
    EXPECT_EQ(FloatToE4m3(std::nextafter(mid, 1000.0f)), c + 1) << c;
  }
  EXPECT_EQ(FloatToE4m3(1.0625f), 0x38);  // halfway between 1 and 1.125: to 1 (even)
  EXPECT_EQ(FloatToE4m3(1.1875f), 0x3a);  // halfway between 1.125 and 1.25: to 1.25 (even)
}

TEST(E4m3Test, SaturatesAndNeverMakesNaNFromFiniteValues) {
  EXPECT_EQ(FloatToE4m3(448.0f), 0x7e);
  EXPECT_EQ(FloatToE4m3(463.9f), 0x7e);
  EXPECT_EQ(FloatToE4m3(464.0f), 0x7e);  // would round to 480, which E4M3FN does not have
  EXPECT_EQ(FloatToE4m3(1e6f), 0x7e);
  EXPECT_EQ(FloatToE4m3(INFINITY), 0x7e);
  EXPECT_EQ(FloatToE4m3(-INFINITY), 0xfe);
  EXPECT_EQ(FloatToE4m3(-1e30f), 0xfe);
  EXPECT_EQ(FloatToE4m3(NAN) & 0x7f, 0x7f);
}

TEST(E4m3Test, SubnormalsDownTo2ToTheMinus9) {
  const float step = std::ldexp(1.0f, -9);
  EXPECT_EQ(FloatToE4m3(step), 0x01);
  EXPECT_EQ(FloatToE4m3(step / 2), 0x00);      // tie between 0 and 1: to 0 (even)
  EXPECT_EQ(FloatToE4m3(step * 0.51f), 0x01);  // just above the tie
  EXPECT_EQ(FloatToE4m3(step * 1.5f), 0x02);   // tie between 1 and 2: to 2
  EXPECT_EQ(FloatToE4m3(step * 2.5f), 0x02);   // tie between 2 and 3: to 2
  EXPECT_EQ(FloatToE4m3(step * 7.5f), 0x08);   // tie between the largest subnormal and 2^-6
  EXPECT_EQ(FloatToE4m3(1e-20f), 0x00);
  EXPECT_EQ(FloatToE4m3(-1e-20f), 0x80);
  EXPECT_EQ(FloatToE4m3(-step * 3), 0x83);
}

// ---- Lloyd-Max ------------------------------------------------------------------------------

// Max, "Quantizing for minimum distortion" (IRE Trans. Inf. Theory, 1960), Table I: the output
// levels of the MSE-optimal quantizer of a unit-variance Gaussian (positive half; symmetric).
TEST(LloydMaxTest, MatchesMaxsGaussianTables) {
  const std::vector<std::vector<double>> tables = {
      {0.7979},
      {0.4528, 1.5104},
      {0.2451, 0.7560, 1.3440, 2.1520},
      {0.1284, 0.3881, 0.6568, 0.9424, 1.2562, 1.6181, 2.0690, 2.7326}};
  for (const std::vector<double>& half : tables) {
    const int levels = int(half.size()) * 2;
    const std::vector<double> c = LloydMaxGaussian(levels);
    ASSERT_EQ(c.size(), size_t(levels));
    // 4 decimals; the table's 8-level 1.3440 is 1.34391 to 5 (hence 1e-4, not 5e-5).
    for (size_t i = 0; i < half.size(); ++i) {
      EXPECT_NEAR(c[half.size() + i], half[i], 1e-4) << levels << " levels, " << i;
      EXPECT_NEAR(c[half.size() - 1 - i], -half[i], 1e-4) << levels << " levels, " << i;
      EXPECT_NEAR(c[half.size() + i], -c[half.size() - 1 - i], 1e-9) << "symmetric";
    }
  }
  EXPECT_NEAR(LloydMaxGaussian(2)[1], std::sqrt(2 / M_PI), 1e-9);  // E|X| exactly
}

TEST(LloydMaxTest, ConvergesToTheFixedPointTo1e9) {
  // The centroid conditions iterated to convergence at 30 significant digits (mpmath).
  const std::vector<double> eight = {0.245094178944, 0.756005281206, 1.34390927851, 2.15194570454};
  const std::vector<double> sixteen = {0.128395029851, 0.38804829949, 0.656759118532,
                                       0.942340456487, 1.25623119735, 1.61804638602,
                                       2.06901722653,  2.732589571};
  for (const std::vector<double>* half : {&eight, &sixteen}) {
    const std::vector<double> c = LloydMaxGaussian(int(half->size()) * 2);
    for (size_t i = 0; i < half->size(); ++i) {
      EXPECT_NEAR(c[half->size() + i], (*half)[i], 1e-9) << c.size() << " levels, " << i;
    }
  }
}

TEST(LloydMaxTest, KeyCodebookIsScaledBy1OverSqrtD) {
  for (int bits : {3, 4}) {
    auto keys = TurboQuantKeys::Create(128, bits);
    ASSERT_TRUE(keys.ok()) << keys.status();
    const std::vector<double> unit = LloydMaxGaussian(1 << bits);
    ASSERT_EQ(keys->centroids().size(), unit.size());
    for (size_t i = 0; i < unit.size(); ++i) {
      EXPECT_NEAR(keys->centroids()[i], unit[i] / std::sqrt(128.0), 1e-7);
    }
  }
  EXPECT_NEAR(TurboQuantKeys::Create(128, 4)->centroids().back(), 2.7326 / std::sqrt(128.0), 1e-5);
}

// ---- TurboQuant-style keys and values, by hand --------------------------------------------------

void ExpectKey(int bits, const std::vector<float>& key, const std::vector<float>& expected) {
  auto codec = TurboQuantKeys::Create(int(key.size()), bits);
  ASSERT_TRUE(codec.ok()) << codec.status();
  std::vector<float> got(key.size());
  codec->RoundTrip(key, got);
  // Max's 4-digit levels leave ~1e-4 of slack; a wrong centroid would be off by > 0.1.
  for (size_t i = 0; i < key.size(); ++i) EXPECT_NEAR(got[i], expected[i], 2e-3) << i;
}

TEST(TurboQuantTest, KeysByHandWithNormCorrection) {
  // d = 4, 4 bits, k = (0, 0, 1.5, 3): ||k|| = sqrt(11.25) = 3.354102, stored as fp16 3.3535156.
  // H4/2 (rows ++++, +-+-, ++--, +--+) of k/||k|| = (4.5, -1.5, -4.5, 1.5) / 2 / 3.354102
  // = (0.67082, -0.22361, -0.67082, 0.22361); in units of sigma = 1/sqrt(4) = 1/2: (1.34164,
  // -0.44721, -1.34164, 0.44721), whose nearest 16-level centroids are (1.2562, -0.3881, -1.2562,
  // 0.3881) (the midpoints around 1.2562 are 1.0993 and 1.43715). Renormalised: (0.67560,
  // -0.20873, -0.67560, 0.20873); H4/2 of it = (0, 0, 0.46687, 0.88433); times 3.3535156:
  ExpectKey(4, {0.0f, 0.0f, 1.5f, 3.0f}, {0.0f, 0.0f, 1.565670f, 2.965593f});
  // d = 8, 3 bits (levels +-0.2451, 0.7560, 1.3440, 2.1520 times 1/sqrt(8)): ||k|| = sqrt(21.75)
  // = 4.663690 (fp16 4.6640625); the rotated unit key in sigma units is (1.82259, 0.75048,
  // 0.32163, 0.96490, 0.75048, 0.53606, 0.53606, -1.39375) -> centroids (2.152, 0.756, 0.2451,
  // 0.756, 0.756, 0.756, 0.756, -1.344), renormalised, rotated back, times the fp16 norm:
  ExpectKey(
      3, {2.5f, 1.5f, 2.0f, 0.0f, 2.0f, -1.0f, -0.5f, 2.0f},
      {2.605666f, 1.609355f, 2.160237f, -0.104106f, 1.609355f, -0.654988f, -0.104106f, 2.160237f});
  // d = 8, 4 bits: ||k|| = sqrt(14.25) = 3.774917 (fp16 3.7753906); rotated, in sigma units:
  // (-0.66227, -0.92717, 0.66227, -0.13245, -1.72189, 1.19208, 1.19208, -0.66227) -> centroids
  // (-0.6568, -0.9424, 0.6568, -0.1284, -1.6181, 1.2562, 1.2562, -0.6568):
  ExpectKey(4, {-0.5f, 0.0f, -1.5f, -2.5f, -0.5f, 1.0f, -0.5f, 2.0f},
            {-0.393917f, 0.051763f, -1.460184f, -2.499221f, -0.618459f, 0.960614f, -0.551333f,
             2.026880f});
  // A zero key has no direction: it comes back as zeros, not NaN.
  ExpectKey(4, {0, 0, 0, 0}, {0, 0, 0, 0});
}

TEST(TurboQuantTest, ValuesByHand) {
  const std::vector<float> v = {-1.0f, 0.27f, 0.55f, 2.0f, -0.66f, 1.13f, 0.05f, 1.61f};
  std::vector<float> got(v.size());
  // 4 bits: min -1, max 2, scale 3/15 = 0.2 (fp16 0.19995117), zero -1. Codes floor((v + 1) / 0.2
  // + 0.5): 0, 6 (6.85), 8 (8.25), 15, 2 (2.2), 11 (11.15), 5 (5.75), 13 (13.55); decoded with
  // the fp16 scale and zero: code * 0.199951171875 - 1.
  TurboQuantValueRoundTrip(v, 4, got);
  const int codes4[] = {0, 6, 8, 15, 2, 11, 5, 13};
  for (size_t i = 0; i < v.size(); ++i) {
    EXPECT_FLOAT_EQ(got[i], codes4[i] * 0.199951171875f - 1.0f) << i;
  }
  EXPECT_FLOAT_EQ(got[3], 1.999267578125f);  // the max comes back a little low: fp16 scale
  // 3 bits: scale 3/7 = 0.42857143 (fp16 0.42846680); codes 0, 3 (3.46), 4 (4.12), 7, 1 (1.29),
  // 5 (5.47), 2 (2.95), 6 (6.59).
  TurboQuantValueRoundTrip(v, 3, got);
  const int codes3[] = {0, 3, 4, 7, 1, 5, 2, 6};
  for (size_t i = 0; i < v.size(); ++i) {
    EXPECT_FLOAT_EQ(got[i], codes3[i] * 0.428466796875f - 1.0f) << i;
  }
  // A constant vector decodes to itself (codes 0, the zero carries it).
  const std::vector<float> flat(8, 0.75f);
  TurboQuantValueRoundTrip(flat, 4, got);
  for (float g : got) EXPECT_EQ(g, 0.75f);
}

TEST(TurboQuantTest, HadamardIsOrthonormalAndItsOwnInverse) {
  std::vector<float> x = {1, 2, 3, 4, 5, 6, 7, 8};
  std::vector<float> y = x;
  OrthonormalHadamard(y);
  EXPECT_NEAR(y[0], 36 / std::sqrt(8.0f), 1e-5);  // the first row is all ones
  EXPECT_NEAR(y[1], -4 / std::sqrt(8.0f), 1e-5);  // + - + - + - + -
  float n2 = 0;
  for (float v : y) n2 += v * v;
  EXPECT_NEAR(n2, 204.0f, 1e-3);
  OrthonormalHadamard(y);
  for (size_t i = 0; i < x.size(); ++i) EXPECT_NEAR(y[i], x[i], 1e-5);
}

TEST(TurboQuantTest, SlotBytes) {
  EXPECT_EQ(TurboQuantSlotBytes(128, 4, 4), 134u);  // 64 + 2 + 64 + 4
  EXPECT_EQ(TurboQuantSlotBytes(128, 3, 4), 118u);  // 48 + 2 + 64 + 4
  EXPECT_EQ(TurboQuantSlotBytes(128, 3, 3), 102u);  // 48 + 2 + 48 + 4
  EXPECT_EQ(TurboQuantSlotBytes(64, 4, 4), 70u);
  EXPECT_EQ(TurboQuantSlotBytes(64, 3, 3), 54u);
  EXPECT_EQ(TurboQuantSlotBytes(8, 3, 3), 12u);  // 3 + 2 + 3 + 4
  EXPECT_EQ(TurboQuantSlotBytes(4, 3, 3), 10u);  // 2 + 2 + 2 + 4
  EXPECT_EQ(TurboQuantSlotBytes(8, 3, 4), 14u);  // 3 + 2 + 4 + 4 = 13, rounded up to even
}

// ---- The methods on synthetic caches ---------------------------------------------------------

engine::KvCache RandomCache(int layers, int heads, int head_dim, int tokens, uint32_t seed) {
  engine::KvCache kv;
  kv.tokens = tokens;
  kv.n_layers = layers;
  kv.n_kv_heads = heads;
  kv.head_dim = head_dim;
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (int l = 0; l < layers; ++l) {
    for (auto* tensors : {&kv.keys, &kv.values}) {
      std::vector<uint16_t> t(kv.values_per_layer());
      for (uint16_t& h : t) h = engine::FloatToFp16Bits(normal(rng) * (1.0f + float(l)));
      tensors->push_back(std::move(t));
    }
  }
  return kv;
}

double RawBytes(const engine::KvCache& kv) {
  return 4.0 * double(kv.n_layers) * double(kv.values_per_layer());
}

TEST(BaselineMethodsTest, BoundaryLayersAreTheSourceBitForBit) {
  const engine::KvCache kv = RandomCache(6, 2, 64, 40, 11);
  BaselineOptions tq{.kind = BaselineKind::kTurboQuant, .key_bits = 3, .value_bits = 4};
  auto plain = RunBaseline(kv, tq);
  tq.fp16_boundary_layers = true;
  auto bl = RunBaseline(kv, tq);
  ASSERT_TRUE(plain.ok() && bl.ok());
  for (int l = 0; l < 6; ++l) {
    const bool boundary = l < 2 || l >= 4;
    EXPECT_EQ(bl->kv.keys[l] == kv.keys[l], boundary) << l;
    EXPECT_EQ(bl->kv.values[l] == kv.values[l], boundary) << l;
    if (!boundary) {  // the middle layers are exactly the plain method's
      EXPECT_EQ(bl->kv.keys[l], plain->kv.keys[l]) << l;
      EXPECT_EQ(bl->kv.values[l], plain->kv.values[l]) << l;
    }
  }
  // Per token and head (d = 64): 4 boundary layers at 2 x 128 B + 2 layers at 24 + 2 + 32 + 4 =
  // 62 B, over 6 x 256 B.
  EXPECT_DOUBLE_EQ(double(bl->wire_bytes) / RawBytes(kv), (4 * 256.0 + 2 * 62.0) / (6 * 256.0));
  EXPECT_DOUBLE_EQ(double(plain->wire_bytes) / RawBytes(kv), 62.0 / 256.0);

  // With <= 4 layers every layer is a boundary layer: the method sends FP16.
  for (int layers : {1, 3, 4}) {
    const engine::KvCache small = RandomCache(layers, 1, 64, 10, 12);
    auto all = RunBaseline(small, tq);
    ASSERT_TRUE(all.ok());
    EXPECT_EQ(all->kv.keys, small.keys) << layers;
    EXPECT_EQ(all->kv.values, small.values) << layers;
    EXPECT_DOUBLE_EQ(double(all->wire_bytes) / RawBytes(small), 1.0);
  }
}

TEST(BaselineMethodsTest, ZstdFloorsRoundTripAndCompressCompressibleData) {
  // Compressible KV: a few distinct values, mostly zeros.
  engine::KvCache kv = RandomCache(3, 2, 64, 64, 13);
  std::mt19937 rng(14);
  const float palette[] = {0.0f, 0.0f, 0.0f, 0.0f, 0.5f, -0.25f, 1.0f, 2.0f};
  for (auto* tensors : {&kv.keys, &kv.values}) {
    for (std::vector<uint16_t>& t : *tensors) {
      for (uint16_t& h : t) h = engine::FloatToFp16Bits(palette[rng() % 8]);
    }
  }
  auto floor16 = RunBaseline(kv, {.kind = BaselineKind::kFp16Zstd});
  ASSERT_TRUE(floor16.ok()) << floor16.status();
  EXPECT_EQ(floor16->kv.keys, kv.keys);
  EXPECT_EQ(floor16->kv.values, kv.values);
  EXPECT_LT(double(floor16->wire_bytes) / RawBytes(kv), 0.5);
  EXPECT_GT(floor16->wire_bytes, 0u);

  auto fp8 = RunBaseline(kv, {.kind = BaselineKind::kFp8Tensor});
  auto floor8 = RunBaseline(kv, {.kind = BaselineKind::kFp8Zstd});
  ASSERT_TRUE(fp8.ok() && floor8.ok());
  EXPECT_EQ(floor8->kv.keys, fp8->kv.keys);  // quality equals fp8's exactly
  EXPECT_EQ(floor8->kv.values, fp8->kv.values);
  EXPECT_LT(floor8->wire_bytes, fp8->wire_bytes / 2);
  // fp8: one code per element and a 4-byte scale per layer and K/V tensor.
  EXPECT_EQ(fp8->wire_bytes, size_t(3 * 2) * (kv.values_per_layer() + 4));
  // This palette is exact in E4M3 up to the scale (2/448): the values come back unchanged.
  EXPECT_EQ(fp8->kv.keys, kv.keys);

  // Gaussian data (incompressible mantissas) still round-trips bit for bit, at b < 1.
  const engine::KvCache noisy = RandomCache(2, 2, 64, 64, 15);
  auto floor_noisy = RunBaseline(noisy, {.kind = BaselineKind::kFp16Zstd, .zstd_level = 1});
  ASSERT_TRUE(floor_noisy.ok());
  EXPECT_EQ(floor_noisy->kv.keys, noisy.keys);
  EXPECT_LT(double(floor_noisy->wire_bytes) / RawBytes(noisy), 1.0);
}

TEST(BaselineMethodsTest, Fp8ScalesBoundTheError) {
  const engine::KvCache kv = RandomCache(2, 2, 64, 32, 16);
  for (BaselineKind kind : {BaselineKind::kFp8Tensor, BaselineKind::kFp8TokenHead}) {
    auto fp8 = RunBaseline(kv, {.kind = kind});
    ASSERT_TRUE(fp8.ok());
    for (int l = 0; l < 2; ++l) {
      for (size_t i = 0; i < kv.keys[l].size(); ++i) {
        const float a = engine::Fp16BitsToFloat(kv.keys[l][i]);
        const float b = engine::Fp16BitsToFloat(fp8->kv.keys[l][i]);
        // 3 mantissa bits: within 1/16 relative above the scaled subnormal range.
        EXPECT_LE(std::fabs(a - b), std::fabs(a) / 16 + 0.02f) << l << " " << i;
      }
    }
  }
  auto tokhead = RunBaseline(kv, {.kind = BaselineKind::kFp8TokenHead});
  EXPECT_EQ(tokhead->wire_bytes, size_t(2 * 2) * (kv.values_per_layer() + 2 * 32 * 2));
}

TEST(BaselineMethodsTest, BadHeadDimIsAClearError) {
  const engine::KvCache kv = RandomCache(2, 1, 48, 8, 17);
  for (const char* name : {"tq-4bit", "tq-k3v4-bl", "tq-3bit"}) {
    auto method = MethodByName(name);
    ASSERT_TRUE(method.ok());
    auto c = CompressKv(kv, engine::QueryWindow{}, *method, 1.0);
    ASSERT_FALSE(c.ok()) << name;
    EXPECT_EQ(c.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_NE(c.status().message().find("power-of-two head_dim"), std::string::npos) << c.status();
    EXPECT_NE(c.status().message().find("48"), std::string::npos) << c.status();
  }
  // FP8 and zstd take any head_dim.
  for (const char* name : {"fp8", "fp8-tokhead", "fp16-zstd", "fp8-zstd"}) {
    EXPECT_TRUE(CompressKv(kv, engine::QueryWindow{}, *MethodByName(name), 1.0).ok()) << name;
  }
  EXPECT_FALSE(TurboQuantKeys::Create(0, 4).ok());
  EXPECT_FALSE(TurboQuantKeys::Create(96, 4).ok());
}

}  // namespace
}  // namespace skv::eval
