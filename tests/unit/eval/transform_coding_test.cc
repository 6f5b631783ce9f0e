// Transform coding (transform_coding.h): the quantizers against published Gaussian values, the
// bit allocation by hand, and the coder on synthetic KV drawn from a known profile, where each
// component's error must be what its bits predict.
#include "transform_coding.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>
#include <vector>

namespace skv::eval {
namespace {

TEST(TransformCodingTest, QuantizerErrorsMatchMaxsTables) {
  const std::span<const double> lloyd_max = GaussianQuantizerMses(true);
  const std::span<const double> uniform = GaussianQuantizerMses(false);
  // Max (1960), N(0, 1): Lloyd-Max 1, 2, 3 bits; the best uniform quantizer at 2, 3, 4 bits.
  EXPECT_NEAR(lloyd_max[0], 1.0, 1e-12);
  EXPECT_NEAR(lloyd_max[1], 0.3634, 2e-4);
  EXPECT_NEAR(lloyd_max[2], 0.1175, 2e-4);
  EXPECT_NEAR(lloyd_max[3], 0.03454, 1e-4);
  EXPECT_NEAR(uniform[1], 0.3634, 2e-4);  // one bit: the same quantizer
  EXPECT_NEAR(uniform[2], 0.1188, 2e-4);
  EXPECT_NEAR(uniform[3], 0.03744, 1e-4);
  EXPECT_NEAR(uniform[4], 0.01154, 1e-4);
  for (size_t b = 1; b <= 8; ++b) {
    EXPECT_LT(lloyd_max[b], lloyd_max[b - 1]) << b;
    EXPECT_LE(lloyd_max[b], uniform[b] + 1e-12) << b;
  }
}

TEST(TransformCodingTest, LloydMaxBitsGoWhereTheErrorDropsMost) {
  const std::vector<double> variances = {4.0, 1.0, 0.0};
  const std::span<const double> lloyd_max = GaussianQuantizerMses(true);
  // 1st bit: 4 * 0.6366 > 1 * 0.6366; 2nd: 4 * (0.3634 - 0.1175) = 0.98 > 0.64; 3rd: 0.64 >
  // 4 * (0.1175 - 0.0345) = 0.33. A zero variance never gets a bit.
  EXPECT_EQ(AllocateComponentBits(variances, 1, lloyd_max), (std::vector<uint8_t>{1, 0, 0}));
  EXPECT_EQ(AllocateComponentBits(variances, 2, lloyd_max), (std::vector<uint8_t>{2, 0, 0}));
  EXPECT_EQ(AllocateComponentBits(variances, 3, lloyd_max), (std::vector<uint8_t>{2, 1, 0}));
  EXPECT_EQ(AllocateComponentBits(variances, 100, lloyd_max), (std::vector<uint8_t>{8, 8, 0}));
}

// A profile with a random orthonormal basis (Gram-Schmidt) and geometric variances, and KV whose
// rows are drawn from exactly that distribution (keys then RoPE-rotated, as the engine stores
// them).
struct Synthetic {
  KvProfile profile;
  engine::KvCache kv;
};

Synthetic MakeSynthetic(int layers, int heads, int d, int tokens, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<double> normal;
  Synthetic s;
  s.profile.layers = layers;
  s.profile.kv_heads = heads;
  s.profile.head_dim = d;
  auto random_basis = [&] {
    KvBasis b;
    std::vector<std::vector<double>> rows;
    for (int c = 0; c < d; ++c) {
      std::vector<double> v(static_cast<size_t>(d));
      for (double& x : v) x = normal(rng);
      for (const auto& r : rows) {
        const double dot = std::inner_product(v.begin(), v.end(), r.begin(), 0.0);
        for (int i = 0; i < d; ++i) v[size_t(i)] -= dot * r[size_t(i)];
      }
      const double norm = std::sqrt(std::inner_product(v.begin(), v.end(), v.begin(), 0.0));
      for (double& x : v) x /= norm;
      rows.push_back(v);
      for (double x : v) b.basis.push_back(float(x));
      b.variance.push_back(float(4.0 * std::pow(0.85, c)));
      b.mean.push_back(float(0.1 * normal(rng)));
    }
    return b;
  };
  for (int i = 0; i < layers * heads; ++i) {
    s.profile.keys.push_back(random_basis());
    s.profile.values.push_back(random_basis());
  }
  s.kv.tokens = tokens;
  s.kv.n_layers = layers;
  s.kv.n_kv_heads = heads;
  s.kv.head_dim = d;
  for (int l = 0; l < layers; ++l) {
    for (int kind = 0; kind < 2; ++kind) {
      std::vector<uint16_t> rows;
      for (int t = 0; t < tokens; ++t) {
        for (int h = 0; h < heads; ++h) {
          const KvBasis& b = (kind == 0 ? s.profile.keys : s.profile.values)[size_t(l * heads + h)];
          std::vector<float> x(b.mean.begin(), b.mean.end());
          for (int c = 0; c < d; ++c) {
            const double coefficient = std::sqrt(double(b.variance[size_t(c)])) * normal(rng);
            for (int i = 0; i < d; ++i)
              x[size_t(i)] += float(coefficient * b.basis[size_t(c * d + i)]);
          }
          if (kind == 0) ApplyInterleavedRope(x, t, 10000.0);
          for (float v : x) rows.push_back(engine::FloatToFp16Bits(v));
        }
      }
      (kind == 0 ? s.kv.keys : s.kv.values).push_back(std::move(rows));
    }
  }
  return s;
}

TEST(TransformCodingTest, EachComponentsErrorIsWhatItsBitsPredict) {
  const int layers = 2, heads = 2, d = 32, tokens = 512;
  Synthetic s = MakeSynthetic(layers, heads, d, tokens, 7);
  const double budget = 0.2;
  auto coded = RunTransformCoding(s.kv, s.profile, budget, {});
  ASSERT_TRUE(coded.ok()) << coded.status();

  // The bytes: never above the budget, and exactly headers + gains + whole-byte codes.
  const size_t raw = size_t(layers) * 2 * size_t(tokens) * heads * d * 2;
  EXPECT_LE(double(coded->wire_bytes), budget * double(raw));
  EXPECT_GT(double(coded->wire_bytes), (budget - 0.01) * double(raw));
  EXPECT_EQ(coded->wire_bytes,
            64 * size_t(layers) * 2 + size_t(tokens) * layers * heads * 2 * 2 + coded->code_bytes);

  // The allocation the coder made (it depends on the profile and the bits only).
  std::vector<double> variances;
  for (int l = 0; l < layers; ++l)
    for (int h = 0; h < heads; ++h)
      for (int kind = 0; kind < 2; ++kind)
        for (float v :
             (kind == 0 ? s.profile.keys : s.profile.values)[size_t(l * heads + h)].variance)
          variances.push_back(v);
  const size_t per_token_bits = coded->code_bytes * 8 / size_t(tokens);
  const std::vector<uint8_t> bits =
      AllocateComponentBits(variances, per_token_bits, kGaussianUniformMse);
  EXPECT_GT(bits[0], bits[size_t(d - 1)]);  // the leading component gets more than the last

  // Error along each component of layer 1, head 0, values (no RoPE): what the component's bits
  // predict, within sampling and gain noise; a 0-bit component keeps all of its variance.
  const KvBasis& b = s.profile.values[2];
  const size_t offset = size_t((1 * heads + 0) * 2 + 1) * size_t(d);
  int checked = 0;
  for (int c = 0; c < d; c += 5) {
    double error = 0;
    for (int t = 0; t < tokens; ++t) {
      double e = 0;
      for (int i = 0; i < d; ++i) {
        const size_t at = (size_t(t) * heads + 0) * size_t(d) + size_t(i);
        e += double(engine::Fp16BitsToFloat(coded->kv.values[1][at]) -
                    engine::Fp16BitsToFloat(s.kv.values[1][at])) *
             b.basis[size_t(c * d + i)];
      }
      error += e * e / tokens;
    }
    const double predicted = b.variance[size_t(c)] * kGaussianUniformMse[bits[offset + size_t(c)]];
    EXPECT_NEAR(error, predicted, 0.35 * predicted + 2e-5)
        << "component " << c << " bits " << bits[offset + size_t(c)];
    ++checked;
  }
  EXPECT_EQ(checked, 7);
}

// drop_tokens: at a low budget the least important tokens go, the sinks stay, the kept ones are
// coded as before, and the bitmap is counted within the budget.
TEST(TransformCodingTest, DroppingKeepsTheImportantTokensWithinTheBudget) {
  const int tokens = 256, d = 32;
  Synthetic s = MakeSynthetic(2, 1, d, tokens, 9);
  std::vector<float> importance(size_t(tokens), 0.01f);
  for (int t = 0; t < tokens; t += 4) importance[size_t(t)] = 1.0f;  // every 4th token matters
  const TransformCodingOptions options{.lloyd_max = true, .drop_tokens = true};
  const double budget = 0.06;
  auto coded = RunTransformCoding(s.kv, s.profile, budget, options, importance);
  ASSERT_TRUE(coded.ok()) << coded.status();
  const size_t raw = size_t(2) * 2 * size_t(tokens) * d * 2;
  EXPECT_LE(double(coded->wire_bytes), budget * double(raw));
  const int kept = int(std::count(coded->keep.begin(), coded->keep.end(), 1));
  EXPECT_GT(kept, 4);
  EXPECT_LT(kept, tokens) << "at b = 0.06 some tokens must go";
  for (int t = 0; t < 4; ++t) EXPECT_EQ(coded->keep[size_t(t)], 1) << "sink " << t;
  int important_kept = 0, unimportant_kept = 0;
  for (int t = 4; t < tokens; ++t) {
    (importance[size_t(t)] > 0.5f ? important_kept : unimportant_kept) += coded->keep[size_t(t)];
    const uint16_t* key = coded->kv.keys[1].data() + size_t(t) * d;
    const bool zero = std::all_of(key, key + d, [](uint16_t v) { return v == 0; });
    EXPECT_EQ(zero, coded->keep[size_t(t)] == 0) << "token " << t;
  }
  EXPECT_GT(important_kept, unimportant_kept);
  // Bytes: headers + bitmap + gains and codes of the kept tokens.
  EXPECT_EQ(coded->wire_bytes,
            64 * 2 * 2 + size_t(tokens) / 8 + size_t(kept) * 4 * 2 + coded->code_bytes);
  EXPECT_EQ(coded->code_bytes % size_t(kept), 0u);

  // Without importance scores the option is refused by name.
  auto refused = RunTransformCoding(s.kv, s.profile, budget, options);
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(refused.status().message().find("token_importance"), std::string::npos);
}

TEST(TransformCodingTest, BadInputsAreRefusedByName) {
  Synthetic s = MakeSynthetic(1, 1, 16, 64, 3);
  auto too_low = RunTransformCoding(s.kv, s.profile, 0.01, {});
  EXPECT_EQ(too_low.status().code(), absl::StatusCode::kOutOfRange);
  EXPECT_NE(too_low.status().message().find("minimum"), std::string::npos) << too_low.status();
  KvProfile other = s.profile;
  other.head_dim = 32;
  EXPECT_EQ(RunTransformCoding(s.kv, other, 0.3, {}).status().code(),
            absl::StatusCode::kInvalidArgument);
  // FP16 sinks are sent exactly.
  auto sinks = RunTransformCoding(s.kv, s.profile, 0.3, {.fp16_sink_tokens = 4});
  ASSERT_TRUE(sinks.ok()) << sinks.status();
  for (size_t i = 0; i < 4 * 16; ++i) {
    EXPECT_EQ(sinks->kv.keys[0][i], s.kv.keys[0][i]);
    EXPECT_EQ(sinks->kv.values[0][i], s.kv.values[0][i]);
  }
}

}  // namespace
}  // namespace skv::eval
