// Transform coding (transform_coding.h): for one head row the quantizer constants against the
// Gaussian's exact error, the bit allocation by hand, the wire form, the error against its
// estimate, bad inputs and the RoPE inverse; then transform-coded segments and rd planning on
// them, on KV drawn from a known profile.
#include "spectrumkv/codec/transform_coding.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <random>
#include <vector>

#include "kv_test_data.h"
#include "spectrumkv/codec/codec.h"
#include "spectrumkv/codec/crc32c.h"
#include "spectrumkv/codec/segment.h"

namespace skv {
namespace {

// E[(X - q(X))^2] for X ~ N(0, 1) and the 2^bits-level uniform quantizer of step `step`, from the
// normal distribution function (no numerical integration).
double UniformQuantizerMse(int bits, double step) {
  auto cdf = [](double x) { return 0.5 * std::erfc(-x / std::sqrt(2.0)); };
  auto pdf = [](double x) {
    return std::isinf(x) ? 0.0 : std::exp(-0.5 * x * x) / std::sqrt(2 * M_PI);
  };
  // The integral of (x - c)^2 pdf(x) over (a, b).
  auto part = [&](double a, double b, double c) {
    auto f = [&](double x) {
      const double xp = std::isinf(x) ? 0.0 : x * pdf(x);
      return cdf(x) - xp + 2 * c * pdf(x) + c * c * cdf(x);
    };
    return f(b) - f(a);
  };
  const int n = 1 << bits;
  double mse = 0;
  for (int i = 0; i < n; ++i) {
    const double lo = i == 0 ? -INFINITY : (i - n / 2.0) * step;
    const double hi = i == n - 1 ? INFINITY : (i + 1 - n / 2.0) * step;
    mse += part(lo, hi, (i + 0.5 - n / 2.0) * step);
  }
  return mse;
}

TEST(TransformCodingTest, StepsAreTheGaussianOptimaWithTheirErrors) {
  EXPECT_EQ(kGaussianUniformMse[0], 1.0);
  for (int b = 1; b <= kMaxComponentBits; ++b) {
    const double step = kGaussianUniformStep[b];
    const double mse = UniformQuantizerMse(b, step);
    EXPECT_NEAR(mse, kGaussianUniformMse[b], 1e-6 * kGaussianUniformMse[b]) << b;
    // A minimum: a step 0.1% off either way does worse.
    EXPECT_GT(UniformQuantizerMse(b, step * 1.001), mse) << b;
    EXPECT_GT(UniformQuantizerMse(b, step * 0.999), mse) << b;
  }
  // Max (1960), uniform quantizer of a Gaussian: 2 bits step 0.9957 error 0.1188; 4 bits 0.3352
  // and 0.01154.
  EXPECT_NEAR(kGaussianUniformStep[2], 0.9957, 1e-4);
  EXPECT_NEAR(kGaussianUniformMse[2], 0.1188, 1e-4);
  EXPECT_NEAR(kGaussianUniformStep[4], 0.3352, 1e-4);
  EXPECT_NEAR(kGaussianUniformMse[4], 0.01154, 1e-5);
}

// The codec's codebooks are the Lloyd-Max quantizers of N(0, 1): symmetric, each level the
// centroid of its cell, with the errors of the table (Max 1960: 1 bit 0.7979 / 0.3634, 2 bits
// 0.4528, 1.510 / 0.1175, 3 bits 0.03454, 4 bits 0.009497).
TEST(TransformCodingTest, CodebooksAreTheGaussianLloydMaxQuantizers) {
  auto cdf = [](double x) { return 0.5 * std::erfc(-x / std::sqrt(2.0)); };
  auto pdf = [](double x) {
    return std::isinf(x) ? 0.0 : std::exp(-0.5 * x * x) / std::sqrt(2 * M_PI);
  };
  for (int b = 1; b <= kMaxComponentBits; ++b) {
    const std::span<const float> levels = GaussianLloydMaxLevels(b);
    ASSERT_EQ(levels.size(), size_t{1} << b);
    double mse = 0;
    for (size_t i = 0; i < levels.size(); ++i) {
      EXPECT_EQ(levels[i], -levels[levels.size() - 1 - i]) << b << " bits, level " << i;
      if (i > 0) {
        EXPECT_LT(levels[i - 1], levels[i]);
      }
      const double lo = i == 0 ? -INFINITY : (double(levels[i - 1]) + levels[i]) / 2;
      const double hi = i + 1 == levels.size() ? INFINITY : (double(levels[i]) + levels[i + 1]) / 2;
      const double centroid = (pdf(lo) - pdf(hi)) / (cdf(hi) - cdf(lo));
      EXPECT_NEAR(levels[i], centroid, 2e-4 * std::max(1.0, std::abs(centroid))) << b;
      const double c = levels[i];
      auto f = [&](double x) {
        const double xp = std::isinf(x) ? 0.0 : x * pdf(x);
        return cdf(x) - xp + 2 * c * pdf(x) + c * c * cdf(x);
      };
      mse += f(hi) - f(lo);
    }
    EXPECT_NEAR(mse, kGaussianLloydMaxMse[b], 1e-4 * kGaussianLloydMaxMse[b]) << b;
    EXPECT_LT(kGaussianLloydMaxMse[b], kGaussianUniformMse[b] + 1e-12) << b;
  }
  EXPECT_NEAR(GaussianLloydMaxLevels(1)[1], 0.7979, 1e-4);
  EXPECT_NEAR(GaussianLloydMaxLevels(2)[2], 0.4528, 1e-4);
  EXPECT_NEAR(GaussianLloydMaxLevels(2)[3], 1.510, 1e-3);
  EXPECT_NEAR(kGaussianLloydMaxMse[2], 0.1175, 1e-4);
  EXPECT_NEAR(kGaussianLloydMaxMse[3], 0.03454, 1e-5);
  EXPECT_NEAR(kGaussianLloydMaxMse[4], 0.009497, 1e-5);
  EXPECT_TRUE(GaussianLloydMaxLevels(0).empty());
  EXPECT_TRUE(GaussianLloydMaxLevels(9).empty());
}

TEST(TransformCodingTest, BitsGoWhereTheErrorDropsMost) {
  // Drops (Lloyd-Max errors): c0 4 * 0.637 = 2.55 -> c0; then c0 4 * 0.246 = 0.98 vs c1 0.637 ->
  // c0; then c0 4 * 0.083 = 0.33 vs c1 0.637 -> c1. The zero variance gets nothing.
  const std::vector<double> variances = {4.0, 1.0, 0.0};
  EXPECT_EQ(AllocateComponentBits(variances, 3), (std::vector<uint8_t>{2, 1, 0}));
  EXPECT_EQ(AllocateComponentBits(variances, 0), (std::vector<uint8_t>{0, 0, 0}));
  // Equal drops: the lower index first.
  EXPECT_EQ(AllocateComponentBits(std::vector<double>{1.0, 1.0}, 1), (std::vector<uint8_t>{1, 0}));
  // At most 8 bits each; what the components cannot take stays unspent.
  const std::vector<uint8_t> capped = AllocateComponentBits(std::vector<double>{1.0, 0.0}, 20);
  EXPECT_EQ(capped, (std::vector<uint8_t>{8, 0}));
  EXPECT_EQ(TotalBits(capped), 8u);
}

// A random orthonormal basis (Gram-Schmidt), a mean and decreasing variances.
struct TestBasis {
  std::vector<float> mean, basis, variance;
  HeadBasis view() const { return {mean, basis, variance}; }
};

TestBasis MakeBasis(size_t d, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<double> normal;
  std::vector<double> q(d * d);
  for (double& v : q) v = normal(rng);
  for (size_t c = 0; c < d; ++c) {
    double* row = q.data() + c * d;
    for (size_t p = 0; p < c; ++p) {
      const double* prev = q.data() + p * d;
      double dot = 0;
      for (size_t i = 0; i < d; ++i) dot += row[i] * prev[i];
      for (size_t i = 0; i < d; ++i) row[i] -= dot * prev[i];
    }
    double norm = 0;
    for (size_t i = 0; i < d; ++i) norm += row[i] * row[i];
    for (size_t i = 0; i < d; ++i) row[i] /= std::sqrt(norm);
  }
  TestBasis b;
  b.basis.assign(q.begin(), q.end());
  for (size_t i = 0; i < d; ++i) b.mean.push_back(float(0.1 * normal(rng)));
  for (size_t c = 0; c < d; ++c) b.variance.push_back(float(4.0 * std::pow(0.96, double(c))));
  return b;
}

// A row drawn from the basis's own distribution, scaled by `scale`.
std::vector<float> DrawRow(const TestBasis& b, double scale, std::mt19937& rng) {
  const size_t d = b.mean.size();
  std::normal_distribution<double> normal;
  std::vector<float> x(b.mean);
  for (size_t c = 0; c < d; ++c) {
    const double y = scale * std::sqrt(double(b.variance[c])) * normal(rng);
    for (size_t i = 0; i < d; ++i) x[i] += float(y * b.basis[c * d + i]);
  }
  return x;
}

// A row's bytes go to the heads whose error they cut most: equal heads share evenly, a head of
// 16x the variance takes more than half, a silent head nothing while another can use it; every
// byte is spent, and the expected error is below the even split's. The profile lays the heads'
// slots out by those shares, each row of a tier the same size.
TEST(TransformCodingTest, RowBytesGoToTheHeadsThatNeedThem) {
  constexpr size_t kDim = 16;
  auto heads_of = [](std::vector<double> scales) {
    std::vector<double> v;
    for (double s : scales) {
      for (size_t c = 0; c < kDim; ++c) v.push_back(s * std::pow(0.8, double(c)));
    }
    return v;
  };
  const size_t int4_bytes = 2 * kDim * 4 / 8;
  EXPECT_EQ(ShareRowBytes(heads_of({1, 1}), 2, int4_bytes), (std::vector<uint32_t>{8, 8}));
  EXPECT_EQ(ShareRowBytes(heads_of({1, 0}), 2, int4_bytes), (std::vector<uint32_t>{16, 0}));
  EXPECT_EQ(ShareRowBytes(heads_of({1, 0}), 2, 20), (std::vector<uint32_t>{16, 4}))
      << "a head takes at most 8 bits per component; the rest still has a place";
  const std::vector<double> uneven = heads_of({16, 1});
  const std::vector<uint32_t> shares = ShareRowBytes(uneven, 2, int4_bytes);
  EXPECT_GT(shares[0], 8u);
  EXPECT_EQ(shares[0] + shares[1], int4_bytes);
  auto expected_error = [&](const std::vector<uint32_t>& bytes) {
    double error = 0;
    for (size_t h = 0; h < 2; ++h) {
      const std::span<const double> v = std::span(uneven).subspan(h * kDim, kDim);
      const std::vector<uint8_t> bits = AllocateComponentBits(v, 8 * bytes[h]);
      for (size_t c = 0; c < kDim; ++c) error += v[c] * kGaussianLloydMaxMse[bits[c]];
    }
    return error;
  };
  EXPECT_LT(expected_error(shares), 0.8 * expected_error({8, 8}));

  // Coded for real: rows drawn from two heads of 16:1 energy, coded with the shared bytes and
  // with an even split.
  const TestBasis strong = MakeBasis(kDim, 5), weak = MakeBasis(kDim, 6);
  std::mt19937 rng(7);
  double shared_error = 0, even_error = 0;
  std::vector<float> scratch(kDim), decoded(kDim);
  std::vector<uint8_t> code(CodedHeadBytes(8 * kDim));
  for (int r = 0; r < 200; ++r) {
    for (size_t h = 0; h < 2; ++h) {
      const TestBasis& b = h == 0 ? strong : weak;
      const std::vector<float> x = DrawRow(b, h == 0 ? 4.0 : 1.0, rng);
      TestBasis scaled = b;  // the profile's variances: the heads' own energies
      for (float& v : scaled.variance) v *= h == 0 ? 16.0f : 1.0f;
      std::vector<double> v(scaled.variance.begin(), scaled.variance.end());
      for (const auto& [bytes, error] :
           {std::pair{shares[h], &shared_error}, std::pair{uint32_t{8}, &even_error}}) {
        const std::vector<uint8_t> bits = AllocateComponentBits(v, 8 * bytes);
        EncodeHeadRow(x, scaled.view(), bits, scratch, code.data());
        DecodeHeadRow(code.data(), scaled.view(), bits, decoded);
        for (size_t i = 0; i < kDim; ++i) *error += std::pow(double(decoded[i]) - x[i], 2);
      }
    }
  }
  EXPECT_LT(shared_error, 0.8 * even_error) << shared_error << " vs " << even_error;

  TransformProfile p = IdentityTransformProfile(1, 2, kDim);
  for (size_t i = 0; i < 2 * kDim; ++i) p.variances[i] = float(uneven[i]);  // layer 0, K heads
  ASSERT_TRUE(FinishTransformProfile(&p).ok());
  EXPECT_EQ(p.HeadOffset(0, KvKind::kKey, Tier::kInt4, 0), 0u);
  EXPECT_EQ(p.HeadOffset(0, KvKind::kKey, Tier::kInt4, 1), 2 + shares[0]);
  for (KvKind kind : {KvKind::kKey, KvKind::kValue}) {
    for (Tier tier : kQuantizedTiers) {
      EXPECT_EQ(p.HeadOffset(0, kind, tier, 2), TransformCodedRowBytes(tier, 2, kDim));
    }
  }
  EXPECT_EQ(TotalBits(p.Bits(0, KvKind::kKey, 0, Tier::kInt4)), 8 * shares[0]);
  EXPECT_EQ(TotalBits(p.Bits(0, KvKind::kValue, 0, Tier::kInt4)), kDim * 4) << "V heads are equal";
}

TEST(TransformCodingTest, ErrorMatchesTheEstimateAndEightBitsAreNearlyExact) {
  constexpr size_t kDim = 64;
  const TestBasis b = MakeBasis(kDim, 7);
  std::vector<double> variances(b.variance.begin(), b.variance.end());
  std::mt19937 rng(11);
  std::vector<float> scratch(kDim), decoded(kDim);
  for (size_t row_bits : {64u, 128u, 256u}) {
    const std::vector<uint8_t> bits = AllocateComponentBits(variances, row_bits);
    ASSERT_EQ(TotalBits(bits), row_bits);
    EXPECT_TRUE(std::is_sorted(bits.rbegin(), bits.rend())) << "more variance, more bits";
    if (row_bits == 64) {
      EXPECT_EQ(bits.back(), 0) << "trailing components get no bits";
    }
    std::vector<uint8_t> wire(CodedHeadBytes(row_bits));
    double error = 0, expected = 0;
    constexpr int kRows = 2000;
    for (int r = 0; r < kRows; ++r) {
      const double scale = 0.5 + 1.5 * (r % 4) / 3.0;  // gains differ from row to row
      const std::vector<float> x = DrawRow(b, scale, rng);
      EncodeHeadRow(x, b.view(), bits, scratch, wire.data());
      DecodeHeadRow(wire.data(), b.view(), bits, decoded);
      for (size_t i = 0; i < kDim; ++i) error += double(decoded[i] - x[i]) * (decoded[i] - x[i]);
      expected += ExpectedHeadRowError(HeadRowGain(x, b.view()), b.view(), bits);
    }
    // The gain is the row's own RMS, so the normalised components are not exactly N(0, 1): the
    // estimate holds to a few percent here. With fewer effective dimensions (variances decaying
    // as 0.85^c) the weak components' error runs ~15% over it at 4 bits per component, as
    // E[1 / gain^2] > 1 / E[gain^2].
    EXPECT_NEAR(error / expected, 1.0, 0.06) << row_bits << " bits";
  }
  const std::vector<uint8_t> eight(kDim, 8);
  const std::vector<float> x = DrawRow(b, 1.0, rng);
  std::vector<uint8_t> wire(CodedHeadBytes(TotalBits(eight)));
  EncodeHeadRow(x, b.view(), eight, scratch, wire.data());
  DecodeHeadRow(wire.data(), b.view(), eight, decoded);
  double energy = 0, error = 0;
  for (size_t i = 0; i < kDim; ++i) {
    energy += double(x[i] - b.mean[i]) * (x[i] - b.mean[i]);
    error += double(decoded[i] - x[i]) * (decoded[i] - x[i]);
  }
  EXPECT_LT(error, 1e-3 * energy);
}

TEST(TransformCodingTest, WireFormIsGainThenPackedCodesWithZeroPadding) {
  constexpr size_t kDim = 8;
  TestBasis b;
  b.mean.assign(kDim, 0.0f);
  b.basis.assign(kDim * kDim, 0.0f);
  for (size_t i = 0; i < kDim; ++i) b.basis[i * kDim + i] = 1.0f;  // identity: coefficients = x
  b.variance.assign(kDim, 1.0f);
  // Components 0..2 take 3 bits, the rest none: 9 bits, two code bytes.
  const std::vector<uint8_t> bits = {3, 3, 3, 0, 0, 0, 0, 0};
  ASSERT_EQ(CodedHeadBytes(TotalBits(bits)), 4u);
  // x = (0, 0, 0, 0, 0, 0, 0, sqrt(8)) has energy 8 over total variance 8: gain 1. The three coded
  // components are 0, on the boundary between the levels around zero: the upper one, code 4 of
  // 0..7.
  std::vector<float> x(kDim, 0.0f);
  x[7] = std::sqrt(8.0f);
  std::vector<float> scratch(kDim), decoded(kDim);
  std::vector<uint8_t> wire(4, 0xFF);
  EncodeHeadRow(x, b.view(), bits, scratch, wire.data());
  EXPECT_EQ(wire[0] | (wire[1] << 8), 0x3C00) << "fp16 1.0";
  // Codes 4, 4, 4 least significant bit first: 100 100 100 -> bits 0..8 = 0b1_0010_0100.
  EXPECT_EQ(wire[2], 0x24);
  EXPECT_EQ(wire[3], 0x01) << "the 7 padding bits are zero";
  DecodeHeadRow(wire.data(), b.view(), bits, decoded);
  for (size_t i = 0; i < 3; ++i) EXPECT_EQ(decoded[i], GaussianLloydMaxLevels(3)[4]);
  for (size_t i = 3; i < kDim; ++i) EXPECT_EQ(decoded[i], 0.0f) << "uncoded components vanish";
}

TEST(TransformCodingTest, NonFiniteAndHugeInputsGiveFiniteRows) {
  constexpr size_t kDim = 16;
  const TestBasis b = MakeBasis(kDim, 3);
  std::vector<double> variances(b.variance.begin(), b.variance.end());
  const std::vector<uint8_t> bits = AllocateComponentBits(variances, 4 * kDim);
  std::vector<float> x(kDim, 1.0f), scratch(kDim), decoded(kDim);
  x[0] = NAN;
  x[1] = INFINITY;
  x[2] = -1e30f;
  std::vector<uint8_t> wire(CodedHeadBytes(TotalBits(bits)));
  EncodeHeadRow(x, b.view(), bits, scratch, wire.data());
  DecodeHeadRow(wire.data(), b.view(), bits, decoded);
  for (float v : decoded) EXPECT_TRUE(std::isfinite(v));
  // An all-mean row has gain 0 and decodes to the mean.
  EncodeHeadRow(b.mean, b.view(), bits, scratch, wire.data());
  DecodeHeadRow(wire.data(), b.view(), bits, decoded);
  for (size_t i = 0; i < kDim; ++i) EXPECT_EQ(decoded[i], b.mean[i]);
}

TEST(TransformCodingTest, RopeUndoInvertsApply) {
  std::mt19937 rng(5);
  std::normal_distribution<float> normal;
  std::vector<float> key(64);
  for (float& v : key) v = normal(rng);
  const std::vector<float> original = key;
  ApplyInterleavedRope(key, 0, 10000.0);
  EXPECT_EQ(key, original) << "position 0 is the identity";
  ApplyInterleavedRope(key, 777, 10000.0);
  EXPECT_GT(std::abs(key[0] - original[0]) + std::abs(key[1] - original[1]), 1e-3);
  UndoInterleavedRope(key, 777, 10000.0);
  for (size_t i = 0; i < key.size(); ++i) EXPECT_NEAR(key[i], original[i], 1e-5) << i;
}

// ---- Transform-coded segments (CodecOptions::transform_profile). -------------------------------

// KV drawn from a known profile: per (layer, K/V, head) a random basis with variances decaying
// as 0.9^c; keys are then RoPE-rotated at their positions, as an engine stores them.
struct ProfiledKv {
  testing::SyntheticKvSpec spec;
  TransformProfile profile;
  std::unique_ptr<testing::SyntheticKv> kv;
};

std::unique_ptr<ProfiledKv> MakeProfiledKv(uint32_t tokens = 48) {
  auto out = std::make_unique<ProfiledKv>();
  out->spec.tokens = tokens;
  const testing::SyntheticKvSpec& spec = out->spec;
  TransformProfile& p = out->profile;
  p.layers = spec.layers;
  p.heads = spec.heads;
  p.head_dim = spec.head_dim;
  p.rope_theta = 10000.0;
  out->kv = std::make_unique<testing::SyntheticKv>(spec);
  std::mt19937 rng(3);
  for (uint32_t l = 0; l < spec.layers; ++l) {
    for (int kind = 0; kind < 2; ++kind) {
      std::vector<uint16_t>& buffer = out->kv->buffer(l, kind);
      for (uint32_t h = 0; h < spec.heads; ++h) {
        TestBasis b = MakeBasis(spec.head_dim, 100 + l * 10 + uint32_t(kind) * 5 + h);
        for (size_t c = 0; c < spec.head_dim; ++c) {
          b.variance[c] = float(2.0 * std::pow(0.9, double(c)));
        }
        for (uint32_t t = 0; t < spec.tokens; ++t) {
          std::vector<float> x = DrawRow(b, 1.0, rng);
          if (kind == 0) ApplyInterleavedRope(x, t, p.rope_theta);
          for (size_t i = 0; i < spec.head_dim; ++i) {
            buffer[(size_t{t} * spec.heads + h) * spec.head_dim + i] = FloatToFp16(x[i]);
          }
        }
        p.means.insert(p.means.end(), b.mean.begin(), b.mean.end());
        p.bases.insert(p.bases.end(), b.basis.begin(), b.basis.end());
        p.variances.insert(p.variances.end(), b.variance.begin(), b.variance.end());
      }
    }
  }
  EXPECT_TRUE(FinishTransformProfile(&p).ok());
  return out;
}

// Squared error of `decoded` against `source` over the rows whose tier is `tier`.
double TierError(const KvTensorView& source, const KvTensorView& decoded,
                 std::span<const Tier> tiers, Tier tier) {
  double error = 0;
  for (uint32_t t = 0; t < source.tokens; ++t) {
    if (tiers[t] != tier) continue;
    for (size_t i = 0; i < source.row_elements(); ++i) {
      const double e = Fp16ToFloat(decoded.row(t)[i]) - Fp16ToFloat(source.row(t)[i]);
      error += e * e;
    }
  }
  return error;
}

TEST(TransformCodedSegmentTest, RoundTripBeatsAffineRowsOnProfiledKv) {
  const std::unique_ptr<ProfiledKv> data = MakeProfiledKv();
  const KvTensorView& keys = data->kv->views()[1].key;  // layer 1: the profile's layer is used
  std::vector<Tier> tiers(keys.tokens);
  constexpr Tier kCycle[] = {Tier::kFp16, Tier::kInt8, Tier::kInt4, Tier::kInt2, Tier::kDrop};
  for (size_t t = 0; t < tiers.size(); ++t) tiers[t] = kCycle[t % 5];
  const SegmentSpec spec{1, /*layer=*/1, KvKind::kKey, 0, keys.tokens};

  CodecOptions coded;
  coded.transform_profile = &data->profile;
  const CodecOptions affine;  // rotation and centring, the default
  double error[2][kNumTiers] = {};
  for (int mode = 0; mode < 2; ++mode) {
    const CodecOptions& options = mode == 0 ? coded : affine;
    ByteBuffer segment;
    absl::StatusOr<size_t> size =
        EncodeSegment(keys, spec, tiers, options, ReferenceRowKernels(), &segment);
    ASSERT_TRUE(size.ok()) << size.status();
    EXPECT_EQ(*size, EncodedSegmentBytes(keys, spec, tiers, options));
    absl::StatusOr<ParsedSegment> parsed = ParseSegment(segment);
    ASSERT_TRUE(parsed.ok()) << parsed.status();
    EXPECT_EQ(bool(parsed->header.flags & kSegmentTransformCoded), mode == 0);
    testing::SyntheticKv out = testing::SyntheticKv::ZerosLike(data->spec);
    const KvTensorView& decoded = out.views()[1].key;
    ASSERT_TRUE(DecodeSegment(*parsed, decoded, ReferenceRowKernels(), &data->profile).ok());
    for (uint32_t t = 0; t < keys.tokens; ++t) {
      if (tiers[t] == Tier::kFp16) {
        EXPECT_EQ(0, std::memcmp(decoded.row(t), keys.row(t), keys.row_elements() * 2));
      }
    }
    for (Tier t : kQuantizedTiers) error[mode][int(t)] = TierError(keys, decoded, tiers, t);
  }
  // Row bytes: per head an fp16 gain and head_dim * bits / 8 code bytes.
  EXPECT_EQ(TransformCodedRowBytes(Tier::kInt4, 2, 64), 2u * (2 + 32));
  EXPECT_LT(error[0][int(Tier::kInt8)], error[0][int(Tier::kInt4)]);
  EXPECT_LT(error[0][int(Tier::kInt4)], error[0][int(Tier::kInt2)]);
  // In the profile's basis the bits go where the variance is.
  EXPECT_LT(error[0][int(Tier::kInt4)], 0.5 * error[1][int(Tier::kInt4)]);
  EXPECT_LT(error[0][int(Tier::kInt2)], 0.5 * error[1][int(Tier::kInt2)]);
}

TEST(TransformCodedSegmentTest, DecodingNeedsTheProfileAndFlagsMustAgree) {
  const std::unique_ptr<ProfiledKv> data = MakeProfiledKv(8);
  const KvTensorView& values = data->kv->views()[0].value;
  const std::vector<Tier> tiers(values.tokens, Tier::kInt4);
  const SegmentSpec spec{1, /*layer=*/0, KvKind::kValue, 0, values.tokens};
  CodecOptions options;
  options.transform_profile = &data->profile;
  ByteBuffer segment;
  ASSERT_TRUE(EncodeSegment(values, spec, tiers, options, ReferenceRowKernels(), &segment).ok());
  absl::StatusOr<ParsedSegment> parsed = ParseSegment(segment);
  ASSERT_TRUE(parsed.ok());
  testing::SyntheticKv out = testing::SyntheticKv::ZerosLike(data->spec);
  absl::Status no_profile = DecodeSegment(*parsed, out.views()[0].value, ReferenceRowKernels());
  EXPECT_EQ(no_profile.code(), absl::StatusCode::kFailedPrecondition) << no_profile;

  // A profile of another shape is refused on both sides.
  TransformProfile small = data->profile;
  small.layers = 0;
  EXPECT_EQ(DecodeSegment(*parsed, out.views()[0].value, ReferenceRowKernels(), &small).code(),
            absl::StatusCode::kInvalidArgument);
  CodecOptions wrong = options;
  TransformProfile narrow = data->profile;
  narrow.head_dim = 32;
  wrong.transform_profile = &narrow;
  ByteBuffer refused;
  EXPECT_EQ(
      EncodeSegment(values, spec, tiers, wrong, ReferenceRowKernels(), &refused).status().code(),
      absl::StatusCode::kInvalidArgument);

  // Transform coding with the rotation flag as well is a corrupt header.
  SegmentHeader h;
  std::memcpy(&h, segment.data(), sizeof(h));
  h.flags |= kSegmentRotated;
  h.crc32c = 0;
  std::memcpy(segment.data(), &h, sizeof(h));
  h.crc32c = Crc32c(segment.data(), segment.size());
  std::memcpy(segment.data(), &h, sizeof(h));
  EXPECT_EQ(ParseSegment(segment).status().code(), absl::StatusCode::kDataLoss);
}

TEST(TransformCodedSegmentTest, RdPlansOnCodedRowsAndStaysWithinTheBudget) {
  const std::unique_ptr<ProfiledKv> data = MakeProfiledKv(64);
  const std::vector<KvLayerViews>& views = data->kv->views();
  for (double budget : {0.15, 0.25, 0.4}) {
    double mse[2] = {};
    for (int mode = 0; mode < 2; ++mode) {
      CodecOptions options;
      options.budget = budget;
      if (mode == 0) options.transform_profile = &data->profile;
      absl::StatusOr<EncodedKv> enc = EncodeKv(views, {}, options, 7, ReferenceRowKernels());
      ASSERT_TRUE(enc.ok()) << enc.status();
      size_t wire = 0;
      for (const ByteBuffer& s : enc->segments) wire += s.size();
      EXPECT_EQ(wire, enc->stats.wire_bytes);
      EXPECT_LE(enc->stats.achieved_budget, budget) << budget;
      testing::SyntheticKv out = testing::SyntheticKv::ZerosLike(data->spec);
      std::vector<uint8_t> kept;
      const auto spans = testing::Spans(enc->segments);
      if (mode == 0) {
        EXPECT_EQ(DecodeKv(spans, out.views(), &kept, ReferenceRowKernels()).code(),
                  absl::StatusCode::kFailedPrecondition);
      }
      ASSERT_TRUE(DecodeKv(spans, out.views(), &kept, ReferenceRowKernels(),
                           mode == 0 ? &data->profile : nullptr)
                      .ok());
      for (size_t l = 0; l < views.size(); ++l) {
        for (int kind = 0; kind < 2; ++kind) {
          const KvTensorView& a = kind == 0 ? views[l].key : views[l].value;
          const KvTensorView& b = kind == 0 ? out.views()[l].key : out.views()[l].value;
          for (uint32_t t = 0; t < a.tokens; ++t) {
            for (size_t i = 0; i < a.row_elements(); ++i) {
              const double e = Fp16ToFloat(b.row(t)[i]) - Fp16ToFloat(a.row(t)[i]);
              mse[mode] += e * e;
            }
          }
        }
      }
    }
    EXPECT_LT(mse[0], mse[1]) << "transform coding at b = " << budget;
  }
}

}  // namespace
}  // namespace skv
