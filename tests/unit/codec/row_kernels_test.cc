// The SIMD row kernels against the scalar reference: bit-identical on random and adversarial
// inputs, and the reference's own round-trip accuracy against named thresholds.
#include "spectrumkv/codec/row_kernels.h"

#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "gtest/gtest.h"
#include "spectrumkv/codec/half.h"

namespace skv {
namespace {

// Round-trip RMS error relative to the data's standard deviation, for Gaussian groups of 128.
// Uniform quantization gives range / (2^bits - 1) / sqrt(12) with range ~ 5.4 sigma; these
// thresholds allow ~25% above that for fp16 rounding of the parameters.
constexpr double kMaxRelRmsInt8 = 0.008;
constexpr double kMaxRelRmsInt4 = 0.13;
constexpr double kMaxRelRmsInt2 = 0.65;
// Hadamard applied twice is the identity up to fp32 rounding of log2(n) butterfly stages.
constexpr double kHadamardRoundTripUlps = 16;

enum class Pattern {
  kGaussian,
  kZeros,
  kConstant,
  kOutliers,
  kDenormals,
  kNonFinite,
  kHuge,
  kRandomBits
};

std::vector<float> MakeData(Pattern p, size_t n, std::mt19937& rng) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> x(n);
  for (size_t i = 0; i < n; ++i) {
    switch (p) {
      case Pattern::kGaussian:
        x[i] = normal(rng);
        break;
      case Pattern::kZeros:
        x[i] = 0.0f;
        break;
      case Pattern::kConstant:
        x[i] = 3.25f;
        break;
      case Pattern::kOutliers:
        x[i] = (i % 13 == 3) ? 900.0f * normal(rng) : normal(rng);
        break;
      case Pattern::kDenormals:
        x[i] = std::ldexp(normal(rng), -20);
        break;  // fp16 subnormals
      case Pattern::kNonFinite: {
        const float specials[] = {std::numeric_limits<float>::quiet_NaN(),
                                  std::numeric_limits<float>::infinity(),
                                  -std::numeric_limits<float>::infinity(), normal(rng)};
        x[i] = specials[rng() % 4];
        break;
      }
      case Pattern::kHuge:
        x[i] = 60000.0f * (rng() % 2 ? 1.0f : -1.0f) * (rng() % 100) / 100.0f;
        break;
      case Pattern::kRandomBits:
        x[i] = BitsFloat(uint32_t(rng()));
        break;  // any float at all
    }
  }
  return x;
}

constexpr Pattern kAllPatterns[] = {Pattern::kGaussian, Pattern::kZeros,     Pattern::kConstant,
                                    Pattern::kOutliers, Pattern::kDenormals, Pattern::kNonFinite,
                                    Pattern::kHuge,     Pattern::kRandomBits};

class Avx2VsReference : public ::testing::Test {
 protected:
  void SetUp() override {
    fast_ = Avx2RowKernels();
    if (fast_ == nullptr) GTEST_SKIP() << "this CPU has no AVX2/F16C; only the reference runs";
  }
  const RowKernels& ref_ = ReferenceRowKernels();
  const RowKernels* fast_ = nullptr;
};

bool SameBits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * 4) == 0;
}

TEST_F(Avx2VsReference, LoadAndStoreAreBitIdentical) {
  std::mt19937 rng(1);
  for (DType dtype : {DType::kFp16, DType::kBf16}) {
    for (size_t n : {1, 7, 8, 9, 64, 129, 1000}) {
      std::vector<uint16_t> src(n);
      for (auto& v : src) v = uint16_t(rng());
      std::vector<float> a(n), b(n);
      ref_.load(src.data(), dtype, n, a.data());
      fast_->load(src.data(), dtype, n, b.data());
      EXPECT_TRUE(SameBits(a, b)) << "load n=" << n;
      for (Pattern p : kAllPatterns) {
        std::vector<float> x = MakeData(p, n, rng);
        std::vector<uint16_t> ra(n), rb(n);
        ref_.store(x.data(), dtype, n, ra.data());
        fast_->store(x.data(), dtype, n, rb.data());
        EXPECT_EQ(ra, rb) << "store n=" << n << " pattern " << int(p);
      }
    }
  }
}

TEST_F(Avx2VsReference, HadamardIsBitIdentical) {
  std::mt19937 rng(2);
  for (size_t block : {8, 16, 32, 64, 128, 256}) {
    for (Pattern p : kAllPatterns) {
      std::vector<float> a = MakeData(p, block * 3, rng), b = a;
      ref_.hadamard(a.data(), a.size(), block);
      fast_->hadamard(b.data(), b.size(), block);
      EXPECT_TRUE(SameBits(a, b) || p == Pattern::kNonFinite) << "block " << block;
      if (p == Pattern::kNonFinite) {  // NaN payloads may differ; positions of NaN may not
        for (size_t i = 0; i < a.size(); ++i) EXPECT_EQ(std::isnan(a[i]), std::isnan(b[i]));
      }
    }
  }
}

TEST_F(Avx2VsReference, AccumulateIsBitIdentical) {
  std::mt19937 rng(8);
  for (DType dtype : {DType::kFp16, DType::kBf16}) {
    for (size_t n : {1, 7, 8, 9, 64, 129, 1000}) {
      std::vector<float> a(n, 0.0f), b(n, 0.0f);
      for (int row = 0; row < 20; ++row) {
        std::vector<uint16_t> src(n);
        for (auto& v : src) v = uint16_t(rng());  // every bit pattern: NaN, infinities, denormals
        ref_.accumulate(src.data(), dtype, n, a.data());
        fast_->accumulate(src.data(), dtype, n, b.data());
      }
      EXPECT_TRUE(SameBits(a, b)) << "n=" << n;
      if (dtype == DType::kFp16) {  // (bf16's largest finite values can sum to infinity)
        for (float v : a) EXPECT_TRUE(std::isfinite(v)) << "non-finite values count as 0";
      }
    }
  }
}

// The fused row passes equal the reference's separate passes bit for bit, for every block size
// (in registers up to 128, the fallback beyond), with and without a mean and a rotation.
TEST_F(Avx2VsReference, TransformAndUntransformAreBitIdentical) {
  std::mt19937 rng(6);
  for (DType dtype : {DType::kFp16, DType::kBf16}) {
    for (size_t head_dim : {8, 16, 24, 32, 64, 96, 128, 256, 512}) {
      const size_t n = head_dim * 3;
      for (size_t block : {size_t{0}, size_t{HadamardBlock(uint32_t(head_dim))}}) {
        for (bool with_mean : {false, true}) {
          for (Pattern p : {Pattern::kGaussian, Pattern::kOutliers, Pattern::kHuge}) {
            std::vector<uint16_t> src(n);
            ref_.store(MakeData(p, n, rng).data(), dtype, n, src.data());
            const std::vector<float> mean = MakeData(Pattern::kGaussian, n, rng);
            const float* m = with_mean ? mean.data() : nullptr;
            std::vector<float> ta(n), tb(n);
            ref_.transform(src.data(), dtype, n, m, block, ta.data());
            fast_->transform(src.data(), dtype, n, m, block, tb.data());
            ASSERT_TRUE(SameBits(ta, tb))
                << "transform head_dim=" << head_dim << " block=" << block << " mean=" << with_mean;
            std::vector<float> xa = ta, xb = ta;
            std::vector<uint16_t> ua(n), ub(n);
            ref_.untransform(xa.data(), n, m, block, dtype, ua.data());
            fast_->untransform(xb.data(), n, m, block, dtype, ub.data());
            ASSERT_EQ(ua, ub) << "untransform head_dim=" << head_dim << " block=" << block;
          }
        }
      }
    }
  }
}

TEST_F(Avx2VsReference, QuantizeDequantizeAndErrorAreBitIdentical) {
  std::mt19937 rng(3);
  for (Tier tier : kQuantizedTiers) {
    const int bits = TierBits(tier);
    const TierRowKernels& ref = *ref_.ForTier(tier);
    const TierRowKernels& fast = *fast_->ForTier(tier);
    for (size_t head_dim = 8; head_dim <= 256; head_dim += 8) {
      for (size_t group : {size_t{8}, size_t{32}, head_dim}) {
        if (head_dim % group != 0) continue;
        const size_t n = head_dim * (1 + rng() % 3);
        for (Pattern p : kAllPatterns) {
          const std::vector<float> x = MakeData(p, n, rng);
          const size_t bytes = n / group * (4 + group * bits / 8);
          std::vector<uint8_t> qa(bytes, 0xAA), qb(bytes, 0x55);
          ref.quantize(x.data(), n, group, qa.data());
          fast.quantize(x.data(), n, group, qb.data());
          ASSERT_EQ(qa, qb) << TierName(tier) << " head_dim=" << head_dim << " group=" << group
                            << " pattern=" << int(p);
          std::vector<float> da(n), db(n);
          ref.dequantize(qa.data(), n, group, da.data());
          fast.dequantize(qa.data(), n, group, db.data());
          ASSERT_TRUE(SameBits(da, db));
          for (float v : da) ASSERT_TRUE(std::isfinite(v)) << "dequantized values are finite";
          double ea[kNumTiers] = {}, eb[kNumTiers] = {};
          ref_.estimate_error(x.data(), n, group, ea);
          fast_->estimate_error(x.data(), n, group, eb);
          for (int t = 0; t < kNumTiers; ++t) ASSERT_EQ(ea[t], eb[t]);
        }
      }
    }
  }
}

// Every backend has entry points for exactly the quantized tiers of the tier table, and none for
// a value outside it (before the table, the AVX2 kernels packed any width but 8 and 4 as 2 bits).
TEST(RowKernelTable, EveryBackendCoversExactlyTheQuantizedTiers) {
  std::vector<const RowKernels*> backends = {&ReferenceRowKernels()};
  if (Avx2RowKernels() != nullptr) backends.push_back(Avx2RowKernels());
  for (const RowKernels* k : backends) {
    for (Tier t : kAllTiers) {
      EXPECT_EQ(k->ForTier(t) != nullptr, IsQuantized(t)) << k->name << " " << TierName(t);
    }
    EXPECT_EQ(k->ForTier(static_cast<Tier>(kNumTiers)), nullptr) << k->name;
    double err[kNumTiers] = {};
    const std::vector<float> x = {0, 1, 2, 3, 4, 5, 6, 7};
    k->estimate_error(x.data(), x.size(), x.size(), err);
    for (Tier t : kAllTiers) {
      EXPECT_EQ(err[static_cast<int>(t)] > 0, IsQuantized(t)) << k->name << " " << TierName(t);
    }
  }
}

double RelativeRms(const std::vector<float>& x, const std::vector<float>& y) {
  double err = 0, energy = 0;
  for (size_t i = 0; i < x.size(); ++i) {
    err += (double(x[i]) - y[i]) * (double(x[i]) - y[i]);
    energy += double(x[i]) * x[i];
  }
  return std::sqrt(err / energy);
}

TEST(ReferenceRoundTrip, ErrorPerTierIsBelowThreshold) {
  const RowKernels& k = ReferenceRowKernels();
  std::mt19937 rng(4);
  const size_t n = 128 * 256, group = 128;
  const std::vector<float> x = MakeData(Pattern::kGaussian, n, rng);
  for (auto [tier, threshold] :
       {std::pair{Tier::kInt8, kMaxRelRmsInt8}, std::pair{Tier::kInt4, kMaxRelRmsInt4},
        std::pair{Tier::kInt2, kMaxRelRmsInt2}}) {
    const int bits = TierBits(tier);
    std::vector<uint8_t> q(n / group * (4 + group * bits / 8));
    std::vector<float> y(n);
    k.ForTier(tier)->quantize(x.data(), n, group, q.data());
    k.ForTier(tier)->dequantize(q.data(), n, group, y.data());
    const double rel = RelativeRms(x, y);
    EXPECT_LT(rel, threshold) << "INT" << bits;
    // Every value lies within one step of its group's range (no clipping by the fp16 params).
    for (size_t g = 0; g < n; g += group) {
      const float lo = *std::min_element(x.begin() + g, x.begin() + g + group);
      const float hi = *std::max_element(x.begin() + g, x.begin() + g + group);
      const float step = (hi - lo) / MaxCode(bits);
      for (size_t i = g; i < g + group; ++i)
        ASSERT_LE(std::fabs(x[i] - y[i]), 0.5f * step * 1.01f + 1e-6f);
    }
  }
}

TEST(ReferenceRoundTrip, ConstantGroupsAreExact) {
  const RowKernels& k = ReferenceRowKernels();
  std::vector<float> x(64, 3.25f), y(64);
  std::vector<uint8_t> q(64 / 32 * (4 + 32 / 2));
  k.ForTier(Tier::kInt4)->quantize(x.data(), 64, 32, q.data());
  k.ForTier(Tier::kInt4)->dequantize(q.data(), 64, 32, y.data());
  for (float v : y) EXPECT_EQ(v, 3.25f);
}

TEST(ReferenceRoundTrip, HadamardTwiceIsIdentity) {
  const RowKernels& k = ReferenceRowKernels();
  std::mt19937 rng(5);
  for (size_t block : {8, 32, 128, 256}) {
    const std::vector<float> x = MakeData(Pattern::kGaussian, block * 4, rng);
    std::vector<float> y = x;
    k.hadamard(y.data(), y.size(), block);
    double energy_x = 0, energy_y = 0;
    for (size_t i = 0; i < x.size(); ++i)
      energy_x += double(x[i]) * x[i], energy_y += double(y[i]) * y[i];
    EXPECT_NEAR(energy_y / energy_x, 1.0, 1e-5) << "orthonormal";
    k.hadamard(y.data(), y.size(), block);
    float max_abs = 0;
    for (float v : x) max_abs = std::max(max_abs, std::fabs(v));
    const double tolerance =
        kHadamardRoundTripUlps * std::numeric_limits<float>::epsilon() * max_abs;
    for (size_t i = 0; i < x.size(); ++i) ASSERT_NEAR(y[i], x[i], tolerance) << "block " << block;
  }
}

TEST(ReferenceRoundTrip, HadamardSpreadsAnOutlierChannel) {
  const RowKernels& k = ReferenceRowKernels();
  std::vector<float> x(128, 0.0f);
  x[5] = 100.0f;
  k.hadamard(x.data(), 128, 128);
  for (float v : x) EXPECT_NEAR(std::fabs(v), 100.0f / std::sqrt(128.0f), 1e-3);
}

}  // namespace
}  // namespace skv
